"""Stage planning, pure: which layers each stage holds. No I/O.

For now a balanced split of layers over the configured number of stages; the cost-model
scheduler replaces `plan_stages` behind the same signature.
"""

from __future__ import annotations

from gptjt_core.model import StageSpec


def plan_stages(n_layer: int, num_stages: int) -> list[StageSpec]:
    """Contiguous stages with layer counts differing by at most one; stage 0 embeds, the
    last holds the LM head."""
    if num_stages > n_layer:
        raise ValueError(f"pipeline.num_stages = {num_stages} exceeds the model's {n_layer} layers; "
                         "use at most one stage per layer")
    return StageSpec.even_split(n_layer, num_stages)
