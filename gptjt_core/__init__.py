"""gptjt's model core: GPT-J stages, the UL2 objective, data, and the local trainer (no networking)."""

from .config import ConfigError, RunConfig, load_run_config, tiny_demo_config

__all__ = ["ConfigError", "GPTJStage", "RunConfig", "StageSpec", "load_run_config", "load_stage",
           "prefix_lm_mask", "tiny_demo_config"]

# torch and transformers load only when a model name is used: `gptjt status` and the other
# operator commands import the config without paying seconds for them.
_LAZY = {"GPTJStage": ".model", "StageSpec": ".stage_spec", "load_stage": ".model", "prefix_lm_mask": ".ul2"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
