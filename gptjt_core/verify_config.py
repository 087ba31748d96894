"""Settings of spot checks: how much of the stages' work replicas recompute (docs/security.md)."""

from __future__ import annotations

from dataclasses import dataclass

from .config_errors import _check

# Steps of evidence a stage with one replica keeps (the step just applied and the ones before
# it): its checks go to standbys that first load the stage from the store, later than a replica
# answers. The coordinator lets such a check go stale when it is older than this.
STANDBY_EVIDENCE_STEPS = 4


@dataclass
class VerifyConfig:
    """Spot checks of stage work: the coordinator samples micro-batches a member committed to and
    asks another replica of the same stage to recompute them from the same inputs with the same
    weights (worker/spot_check.py). A stage with one replica is checked by standby workers with
    its weights from the checkpoint store, on the steps the store holds (worker/check_weights.py)."""

    sample_rate: float = 0.05
    """Fraction of each member's micro-batches checked, a number in [0, 1] (0: no spot checks).
    Drawn by the coordinator after the commitment arrives, so a worker cannot know in advance
    which of its micro-batches will be checked. A single-replica stage is checked on stored
    steps only, at sample_rate x train.checkpoint_every there (at most 1)."""
    first_checks: int = 2
    """Micro-batches of every new worker checked whatever the sample rate, an integer >= 0: a
    worker that lies from its first step is caught in its first step."""
    dispute_checks: int = 2
    """Micro-batches of each contribution checked, whatever the sample rate, while the worker is
    a side of a disagreement that a third opinion was asked to settle and has not (it is still
    pending, it went stale, or the third could not recompute), an integer >= 0. A third opinion
    must come before the step's weights are gone; one that came too late left a liar with a
    recorded disagreement to be drawn again at the sample rate only (bench verify, 2026-12-06:
    one liar of three never quarantined in 10 steps). Both sides are checked: the accuser may be
    the liar."""
    max_pending: int = 8
    """Checks a verifier is handed at once, an integer >= 1; checks wait in the ledger beyond that."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.sample_rate <= 1.0, "sample_rate", self.sample_rate, "a number in [0, 1]")
        _check(self.first_checks >= 0, "first_checks", self.first_checks, "an integer >= 0")
        _check(self.dispute_checks >= 0, "dispute_checks", self.dispute_checks, "an integer >= 0")
        _check(self.max_pending >= 1, "max_pending", self.max_pending, "an integer >= 1")
