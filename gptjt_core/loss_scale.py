"""Dynamic loss scaling shared by every stage of a pipeline: when it is on, and the next scale.

fp16 gradients underflow: activations' gradients of a GPT-J block are often below fp16's
smallest normal number (6e-5). The last stage multiplies its loss by the scale S before the
backward, so every gradient that flows back through the pipeline (and over the wire between
stages) is S times larger; each stage divides its parameters' gradients by S before it reports
their norm. A gradient that overflowed shows as a non-finite norm at the step's close.

The rule, as torch's GradScaler has it, with one difference: an overflowed step is re-run at
half the scale rather than dropped, so no micro-batch is lost and a step's data stays the
step's data (the ledger's exactly-once promise). After `growth_every` clean steps the scale
doubles. Scales are powers of two, so scaling and unscaling fp32 values is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SCALE = 1.0  # an overflow at scale 1 is no underflow problem: the step is skipped as any non-finite one
MAX_SCALE = float(2 ** 24)


def scaling_wanted(mode: str, precision: str, member_dtypes: set[str]) -> bool:
    """Is loss scaling on for a step? mode: train.loss_scaling; precision: train.precision;
    member_dtypes: the compute dtypes the step's members report ('fp32', 'bf16', 'fp16')."""
    if mode == "dynamic":
        return True
    if mode == "off":
        return False
    return precision == "fp16" or (precision == "auto" and "fp16" in member_dtypes)


@dataclass(frozen=True)
class ScaleState:
    """The scale in force and the clean steps closed at it since it last changed."""

    scale: float
    clean_steps: int = 0

    def after_overflow(self) -> ScaleState | None:
        """The scale to re-run an overflowed step at, or None when it is already at MIN_SCALE
        (then the overflow is no scaling problem: the step's update is skipped as today)."""
        if self.scale <= MIN_SCALE:
            return None
        return ScaleState(max(MIN_SCALE, self.scale / 2), 0)

    def after_clean_step(self, growth_every: int) -> ScaleState:
        """A step closed without overflow: count it; double the scale after growth_every of them."""
        clean = self.clean_steps + 1
        if clean >= growth_every and self.scale < MAX_SCALE:
            return ScaleState(min(MAX_SCALE, self.scale * 2), 0)
        return ScaleState(self.scale, clean)
