"""The entries of a run's two mixtures: data sources ([[data.sources]]) and UL2 modes ([[ul2.denoisers]])."""

from __future__ import annotations

from dataclasses import dataclass

from .config_errors import _check


@dataclass
class SourceConfig:
    """One data source of the mixture."""

    name: str
    """Short label used in logs and statistics, e.g. 'pile'; non-empty and distinct within
    data.sources. It also seeds the source's shuffle and keys its read cursor in checkpoints,
    so renaming a source mid-run changes its order and orphans its cursor."""
    path: str
    """Local file, glob or directory (JSONL, JSON, Parquet, text; .gz allowed) or a hub id;
    non-empty. A relative local path in a TOML run config is relative to that file."""
    weight: float
    """Share of the mixture's sequences, a number > 0, normalised over all sources (so 0.55
    and 55 mean the same)."""
    text_template: str = "{text}"
    """How a record becomes a document: str.format over the record's fields; it must name at
    least one field, e.g. '{text}' or '{inputs}\\n{targets}'."""
    hub_config: str = ""
    """Hub dataset configuration name, when `path` is a hub id that needs one ('' for none)."""
    split: str = "train"
    """Hub dataset split to stream, e.g. 'train' or 'validation' (local files always read as
    one split, whatever this says)."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", self.name, "a non-empty label")
        _check(bool(self.path), "path", self.path, "a file path or hub id")
        _check(isinstance(self.weight, (int, float)) and self.weight > 0, "weight", self.weight,
               "a positive number")
        _check("{" in self.text_template, "text_template", self.text_template,
               "a format string naming record fields, e.g. '{text}'")


@dataclass
class DenoiserConfig:
    """One UL2 mode: how a packed sequence becomes (prefix, target)."""

    name: str
    """Label of the mode in statistics and logs, e.g. 'S2S'; give each mode of a mix its own
    name (the mode's prefix tokens are looked up by it)."""
    weight: float
    """Probability of choosing this mode for a sequence, a number >= 0, normalised over the mix
    (0 keeps the mode configured but never picks it)."""
    kind: str
    """'prefix' (S-denoiser: split at a random point), 'span' (R/X: spans -> sentinels),
    or 'causal' (plain language modelling, no prefix)."""
    mode_prefix: str = ""
    """Paradigm text put before the sequence, e.g. '[S2S]' (tokenized, as Together did);
    '' puts nothing."""
    mean_span: float = 3.0
    """Span kinds: mean corrupted span length in tokens, a multiple of 0.5 that is >= 1; lengths
    are uniform on [1, 2*mean_span - 1], so 3 gives 1..5 (Together NLU) and 16.5 gives 1..32 (NLG)."""
    corruption_rate: float = 0.15
    """Span kinds without `num_spans`: probability that each span-sized chunk is corrupted, a
    fraction in (0, 1)."""
    num_spans: int = 0
    """Span kinds: corrupt exactly this many spans instead (Together NLG uses 1); an integer >= 0,
    0 = use corruption_rate."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "weight", self.weight, "a number >= 0")
        _check(self.kind in ("prefix", "span", "causal"), "kind", self.kind,
               "'prefix', 'span' or 'causal'")
        if self.kind == "span":
            _check(self.mean_span >= 1 and float(2 * self.mean_span).is_integer(), "mean_span",
                   self.mean_span, "a multiple of 0.5 that is >= 1")
            _check(0 < self.corruption_rate < 1, "corruption_rate", self.corruption_rate,
                   "a fraction in (0, 1)")
            _check(self.num_spans >= 0, "num_spans", self.num_spans, "an integer >= 0")
