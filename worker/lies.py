"""A lying stage for tests and drills: the GPTJT_FAULTS lie-* kinds (worker/faults.py) applied to what it sends."""

from __future__ import annotations

import functools
import hashlib
import logging

import torch

from .faults import GRAD_SUFFIX, LIE_KINDS, STATE_LIE, Faults, LieSettings

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (ticket_id, attempt)
OUTPUT, GRADIENT = "output", "gradient"  # what a lie falsifies: the forward output, or the gradient sent upstream


def draw(kind: str, key: Key) -> int:
    """A 64-bit number fixed by the lie and the micro-batch: the seeded draw that says whether a
    fractional lie falsifies it, and the seed of its noise (the same in every run and process)."""
    digest = hashlib.blake2b(f"{kind}|{key[0]}|{key[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def chosen(kind: str, key: Key, fraction: float) -> bool:
    """Whether a lie told on `fraction` of micro-batches falsifies the one of `key`."""
    return fraction >= 1.0 or draw(kind, key) / 2.0**64 < fraction


def falsify(mode: str, t: torch.Tensor, settings: LieSettings, seed: int) -> torch.Tensor:
    """`t` as a scale, noise or zero lie makes it: a new tensor of its shape, dtype and device."""
    if mode == "zero":
        return torch.zeros_like(t)
    x = t.float()  # a bf16 output is falsified in fp32 and rounded back
    if mode == "scale":
        return (x * settings.scale).to(t.dtype)
    if mode == "noise":
        gen = torch.Generator(device=t.device).manual_seed(seed & (2**63 - 1))
        noise = torch.randn(x.shape, generator=gen, device=t.device, dtype=torch.float32)
        rms = x.pow(2).mean().sqrt()  # relative error of the lie ~= settings.noise on a tensor of many values
        return (x + noise * (settings.noise * rms)).to(t.dtype)
    raise ValueError(f"lie mode {mode!r} is not one falsify() makes; it makes scale, noise and zero")


class Liar:
    """Falsifies what this stage sends as the armed lie-* kinds say; honest when none is armed.

    An output lie replaces the forward output after the forward: the next stage receives the lie,
    and this stage's backward runs through its honest graph with the gradient the next stage
    computed for the lie. A gradient lie replaces the input gradient after the backward: the
    previous stage receives it. Either way the liar's own parameter gradients stay honest.
    Call from the stage's compute thread (a stale lie keeps the last honest tensor).
    """

    def __init__(self, faults: Faults):
        self.faults = faults
        self.lies = {(GRADIENT if kind.endswith(GRAD_SUFFIX) else OUTPUT): kind
                     for kind in faults.armed if kind in LIE_KINDS}
        self._kept: dict[str, tuple[int, torch.Tensor]] = {}  # target -> (ticket, its honest tensor): stale replays
        self._told: set[str] = set()  # kinds whose first lie was logged

    def output(self, key: Key, step: int, out: torch.Tensor) -> torch.Tensor:
        """The forward output (B, T, D) this stage sends down for micro-batch `key` of `step`."""
        return self._tell(OUTPUT, key, step, out)

    def gradient(self, key: Key, step: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """The input gradient (B, T, D) this stage sends back upstream (None at stage 0: none)."""
        return None if grad is None else self._tell(GRADIENT, key, step, grad)

    def loss(self, key: Key, step: int, loss: float) -> float:
        """The loss share the last stage reports: the only forward output it sends."""
        if OUTPUT not in self.lies:
            return loss
        # A liar sends a loss the coordinator takes (>= 0): a negative one is refused at the commit
        # and only tells on itself there, which is not what a drill of spot checks is for.
        return abs(float(self._tell(OUTPUT, key, step, torch.tensor(loss, dtype=torch.float64))))

    def _tell(self, target: str, key: Key, step: int, honest: torch.Tensor) -> torch.Tensor:
        kind = self.lies.get(target)
        if kind is None:
            return honest
        mode = kind.removeprefix("lie-").removesuffix(GRAD_SUFFIX)
        armed, sent = self.faults.armed.get(kind), honest
        if armed is not None and step >= armed.step and chosen(kind, key, armed.fraction) and self.faults.claim(kind):
            sent = (self._replay(target, key, honest) if mode == "stale"
                    else falsify(mode, honest, self.faults.lie, draw(kind, key)))
            if sent is not honest and kind not in self._told:
                self._told.add(kind)
                share = "every micro-batch" if armed.fraction >= 1.0 else f"{armed.fraction:.0%} of micro-batches"
                what = "gradient sent upstream" if target == GRADIENT else "forward output"
                log.warning("fault injection: lying (%s) from step %d on this stage's %s, %s (first: ticket %d "
                            "attempt %d of step %d)", mode, armed.step, what, share, key[0], key[1], step)
        if mode == "stale":
            self._kept[target] = (key[0], honest)
        return sent

    def _replay(self, target: str, key: Key, honest: torch.Tensor) -> torch.Tensor:
        """The last honest tensor of another ticket, if it has the shape and dtype of this one."""
        kept = self._kept.get(target)
        if kept is None or kept[0] == key[0] or kept[1].shape != honest.shape or kept[1].dtype != honest.dtype:
            return honest  # nothing to replay: honest this once
        return kept[1]


@functools.cache
def process_liar() -> Liar:
    """This process's liar, from GPTJT_FAULTS (read on the first micro-batch; the worker parsed it
    when it started, so a typo failed there)."""
    return Liar(Faults.from_env())


def altered_state(blob: bytes, position: int, faults: Faults) -> bytes:
    """The stage state FetchState sends (a safetensors blob of the state after `position` steps),
    altered if this process tells the lie-state lie from there on: its weights (not its optimizer
    or outer state) multiplied by GPTJT_LIE_SCALE, as a replica handing on a poisoned model would."""
    armed = faults.armed.get(STATE_LIE)
    if armed is None or position < armed.step or not faults.claim(STATE_LIE):
        return blob
    from safetensors.torch import load, save

    from gptjt_core.stage_checkpoint import OPTIM, OUTER

    tensors = load(blob)
    for name, t in tensors.items():
        if not name.startswith((OPTIM, OUTER)) and t.is_floating_point():
            tensors[name] = (t.float() * faults.lie.scale).to(t.dtype)
    log.warning("fault injection: the stage state after %d steps goes out with its weights x %g", position,
                faults.lie.scale)
    return save(tensors)
