"""Stage planning, pure: which layers each stage holds. No I/O.

The running coordinator still uses a balanced split of layers over the configured number
of stages. The cost model (cost_model.py) and the placement search over measured devices
and links (placement.py) are pure and benchmarked (`gptjt bench scheduler`); the
coordinator does not call them yet.
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
