"""GPT-JT's recipe as data (../shared/RECIPE.md): the data mixture and Together's UL2 mix."""

from __future__ import annotations

from .mixture_config import DenoiserConfig, SourceConfig

# The recipe's scalar figures are the defaults of the run dataclasses, each named in its field's
# docstring: AdamW lr 1e-5 (OptimConfig.lr), 64 sequences per step (TrainConfig.global_batch),
# 2048 tokens per sequence (TrainConfig.seq_len), 2 s / 10 s heartbeats (CoordinatorConfig).


def recipe_mixture() -> list[SourceConfig]:
    """GPT-JT's second-phase mixture (RECIPE.md): 55% Pile, 20% P3, 20% NI, 5% CoT."""
    return [
        SourceConfig("pile", "monology/pile-uncopyrighted", 0.55),
        SourceConfig("p3", "Muennighoff/P3", 0.20, "{inputs}\n{targets}"),
        SourceConfig("ni", "Muennighoff/natural-instructions", 0.20,
                     "{definition}\n\n{inputs}\n{targets}"),
        SourceConfig("cot", "kaist-ai/CoT-Collection", 0.05, "{source}\n{rationale} {target}"),
    ]


def together_ul2_mix() -> list[DenoiserConfig]:
    """OpenChatKit's UL2R mix as GPT-JT was trained: S2S 50%, NLG 25%, NLU 25%."""
    return [
        DenoiserConfig("S2S", 0.50, "prefix", "[S2S]"),
        DenoiserConfig("NLG", 0.25, "span", "[NLG]", mean_span=16.5, num_spans=1),
        DenoiserConfig("NLU", 0.25, "span", "[NLU]", mean_span=3.0, corruption_rate=0.15),
    ]
