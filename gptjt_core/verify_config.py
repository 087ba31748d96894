"""Settings of spot checks: how much of the stages' work replicas recompute (docs/security.md)."""

from __future__ import annotations

from dataclasses import dataclass

from .config_errors import _check


@dataclass
class VerifyConfig:
    """Spot checks of stage work: the coordinator samples micro-batches a member committed to and
    asks another replica of the same stage to recompute them from the same inputs with the same
    weights (worker/spot_check.py). Stages with one replica are not checked this way yet (the
    chain check still compares their links)."""

    sample_rate: float = 0.05
    """Fraction of each member's micro-batches checked, a number in [0, 1] (0: no spot checks).
    Drawn by the coordinator after the commitment arrives, so a worker cannot know in advance
    which of its micro-batches will be checked."""
    first_checks: int = 2
    """Micro-batches of every new worker checked whatever the sample rate, an integer >= 0: a
    worker that lies from its first step is caught in its first step."""
    max_pending: int = 8
    """Checks a verifier is handed at once, an integer >= 1; checks wait in the ledger beyond that."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.sample_rate <= 1.0, "sample_rate", self.sample_rate, "a number in [0, 1]")
        _check(self.first_checks >= 0, "first_checks", self.first_checks, "an integer >= 0")
        _check(self.max_pending >= 1, "max_pending", self.max_pending, "an integer >= 1")
