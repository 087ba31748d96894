"""gptjt's model core: GPT-J stages, the UL2 objective, data, and the local trainer (no networking)."""

from .config import ConfigError, RunConfig, load_run_config, tiny_demo_config
from .model import GPTJStage, StageSpec, load_stage
from .ul2 import prefix_lm_mask

__all__ = ["ConfigError", "GPTJStage", "RunConfig", "StageSpec", "load_run_config", "load_stage",
           "prefix_lm_mask", "tiny_demo_config"]
