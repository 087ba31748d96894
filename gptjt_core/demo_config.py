"""The demo run: tiny GPT-J on the bundled data (data/demo), the embedded default of `make demo`."""

from __future__ import annotations

from pathlib import Path

from .coordinator_config import CoordinatorConfig, SchedulerConfig
from .mixture_config import SourceConfig
from .run_config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from .swarm_config import PipelineConfig


def demo_mixture(root: str | Path | None = None) -> list[SourceConfig]:
    """The bundled demo data (data/demo): Wikipedia prose plus instruction pairs and code."""
    base = Path(root) if root is not None else Path(__file__).resolve().parent.parent / "data" / "demo"
    return [
        SourceConfig("wiki", str(base / "wiki.jsonl.gz"), 0.6),
        SourceConfig("instructions", str(base / "instructions.jsonl.gz"), 0.3),
        SourceConfig("code", str(base / "code.jsonl.gz"), 0.1),
    ]


def tiny_demo_config() -> RunConfig:
    """The embedded default of `make demo`: tiny GPT-J on the bundled data, ~2 minutes on 2 cores."""
    return RunConfig(
        name="tiny-demo",
        model=ModelConfig(source="random:tiny:0"),
        data=DataConfig(sources=demo_mixture(), num_shards=4, shuffle_buffer=0,
                        heldout=[SourceConfig("heldout", str(Path(demo_mixture()[0].path).parent
                                                            / "heldout.jsonl.gz"), 1.0)]),
        optim=OptimConfig(lr=2e-3, warmup_steps=5, decay="cosine", weight_decay=0.0),
        train=TrainConfig(global_batch=8, micro_batch=4, seq_len=128, steps=60, seed=0,
                          precision="fp32", log_every=5, checkpoint_every=20),
        pipeline=PipelineConfig(num_stages=2, activation_codec="fp32", gradient_codec="fp32"),
        coordinator=CoordinatorConfig(listen="127.0.0.1:0", state_path="runs/demo/run.db"),
        scheduler=SchedulerConfig(min_workers=2),  # the demo's two workers are both in the first plan
    )
