"""The run configuration's stable import surface: model flavours, the run dataclasses, TOML loading.

Each concept lives in its own module; import from here, so that moving one of them again
changes no caller:

    config_errors       ConfigError (every message names the field, the value and the fix)
    flavours            GPT-J 6B and the tiny debug flavour, as GPTJConfig kwargs
    mixture_config      SourceConfig, DenoiserConfig: entries of the data and UL2 mixtures
    recipe              GPT-JT's data mixture and Together's UL2 mix (../shared/RECIPE.md)
    run_config          ModelConfig, DataConfig, UL2Config, OptimConfig, TrainConfig; RunConfig
    swarm_config        PipelineConfig, LinkConfig, AveragingConfig (codec names)
    coordinator_config  CoordinatorConfig, SchedulerConfig (read by the coordinator only)
    verify_config       VerifyConfig (spot checks of stage work)
    demo_config         the bundled demo data and tiny_demo_config
    config_loading      from_dict, load_run_config (TOML -> RunConfig)
"""

from __future__ import annotations

from .config_errors import ConfigError
from .config_loading import from_dict, load_run_config
from .coordinator_config import CoordinatorConfig, SchedulerConfig
from .demo_config import demo_mixture, tiny_demo_config
from .flavours import FLAVOURS, GPTJ_6B, TINY, flavour_config
from .mixture_config import DenoiserConfig, SourceConfig
from .recipe import recipe_mixture, together_ul2_mix
from .run_config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, UL2Config
from .swarm_config import (AVERAGING_COMPRESSIONS, CODEC_NAMES, AveragingConfig, LinkConfig,
                           PipelineConfig)
from .verify_config import VerifyConfig

__all__ = [
    "AVERAGING_COMPRESSIONS", "CODEC_NAMES", "FLAVOURS", "GPTJ_6B", "TINY",
    "AveragingConfig", "ConfigError", "CoordinatorConfig", "DataConfig", "DenoiserConfig",
    "LinkConfig", "ModelConfig", "OptimConfig", "PipelineConfig", "RunConfig", "SchedulerConfig",
    "SourceConfig", "TrainConfig", "UL2Config", "VerifyConfig",
    "demo_mixture", "flavour_config", "from_dict", "load_run_config", "recipe_mixture",
    "tiny_demo_config", "together_ul2_mix",
]
