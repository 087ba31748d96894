"""Pure rules of the step protocol: which contributions count, whether replicas agree, the norms.

No SQL and no clock: the step machine gathers the reports, asks these functions, and writes
what they decide. Norms are squared L2 norms of a stage's gradient (float; NaN when a worker
reported a non-finite one: SQLite stores NaN as NULL, see `norm_sq`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def norm_sq(value: float | None) -> float:
    """A report's gradient norm^2 as stored: SQLite keeps NaN as NULL."""
    return float("nan") if value is None else float(value)


@dataclass(frozen=True)
class Contribution:
    """One replica's CONTRIBUTION report: its own accumulated gradient over its micro-batches."""

    worker: str
    norm_sq: float
    micro_batches: int


@dataclass
class Verdict:
    """What judging a step's contributions decided."""
    contributors: dict[int, list[str]]  # stage -> replicas whose gradient counts
    refused: list[tuple[int, str, str]] = field(default_factory=list)  # (stage, worker, why)
    refs: dict[int, float] = field(default_factory=dict)  # each stage's reference size for the next step
    skip: bool = False  # some stage has no acceptable gradient: nobody updates


def judge_contributions(by_stage: dict[int, list[Contribution]], refs: dict[int, float],
                        factor: float) -> Verdict:
    """Refuse non-finite or far-too-large contributions (averaging.poison_norm_factor).

    A replica's size is its gradient norm per micro-batch; the stage's reference is the lower
    median of its replicas' sizes and the previous step's accepted size, so one bad replica of
    two cannot pass itself off as the norm."""
    verdict = Verdict(contributors={}, refs=dict(refs))
    for stage, rows in by_stage.items():
        sizes = {r.worker: math.sqrt(r.norm_sq) / r.micro_batches for r in rows
                 if math.isfinite(r.norm_sq) and r.micro_batches > 0}
        pool = sorted([*sizes.values(), *([refs[stage]] if stage in refs else [])])
        ref = pool[(len(pool) - 1) // 2] if pool else 0.0
        accepted = []
        for r in rows:
            size = sizes.get(r.worker)
            if not math.isfinite(r.norm_sq):
                verdict.refused.append((stage, r.worker, "NaN/Inf gradient"))
            elif size is not None and ref > 0 and size > factor * ref:
                verdict.refused.append((stage, r.worker, f"gradient norm per micro-batch {size:.4g} is over "
                                                         f"{factor:g} x the stage's {ref:.4g}"))
            else:
                accepted.append(r.worker)
        verdict.contributors[stage] = accepted
        kept = [sizes[w] for w in accepted if w in sizes]
        if kept:
            verdict.refs[stage] = sorted(kept)[(len(kept) - 1) // 2]
        else:
            verdict.skip = True
    return verdict


def total_norm(by_stage: dict[int, list[Contribution]]) -> float:
    """One replica per stage: the global norm is sqrt of the stages' norm^2 summed."""
    return sum(r.norm_sq for rows in by_stage.values() for r in rows) ** 0.5


def local_grad_norm(by_stage: dict[int, list[Contribution]], contributors: dict[int, list[str]],
                    total_micro_batches: int) -> float:
    """Local-steps mode: sqrt(sum over stages of the accepted replicas' mean |g_r * M / m_r|^2), where
    g_r is a replica's gradient over its m_r of the step's M micro-batches."""
    total = 0.0
    for stage, rows in by_stage.items():
        scaled = [r.norm_sq * (total_micro_batches / r.micro_batches) ** 2 for r in rows
                  if r.worker in contributors.get(stage, []) and r.micro_batches > 0]
        if scaled:
            total += sum(scaled) / len(scaled)
    return total ** 0.5


@dataclass(frozen=True)
class Sum:
    """One replica's AVERAGED report: the summed gradient it holds."""

    group_weight: float
    norm_sq: float


def replicas_disagree(by_stage: dict[int, list[Sum]], exact: bool) -> str:
    """Why the replicas of some stage hold different sums ("" if every stage agrees): a partial
    hivemind round. Exact (compression "none": float64 sums) must match to 1e-6, lossy to 1e-2."""
    tolerance = 1e-6 if exact else 1e-2
    for stage, sums in by_stage.items():
        weights = sorted({s.group_weight for s in sums})
        norms = [s.norm_sq for s in sums]
        spread = (max(norms) - min(norms)) / max(abs(max(norms)), 1e-30)
        if len(weights) > 1 or spread > tolerance:
            return (f"stage {stage}'s replicas summed different gradients (micro-batches {weights}, norm^2 "
                    f"{norms}); re-running the step")
    return ""


def averaged_norm(by_stage: dict[int, list[Sum]]) -> float:
    """The global norm after averaging: sqrt of the stages' (agreeing) summed norm^2."""
    return sum(sum(s.norm_sq for s in sums) / len(sums) for sums in by_stage.values()) ** 0.5


def exactly_once(counted: dict[int, int], micro_batches: int, step: int) -> tuple[int, int, str | None]:
    """(lost, double, violation) of a closed step from {micro-batch index: commits}: micro-batches
    never counted, counted more than once, and the complaint if either is not zero."""
    lost = sum(1 for idx in range(micro_batches) if idx not in counted)
    double = sum(n - 1 for n in counted.values() if n > 1)
    bad = len(counted) != micro_batches or any(n != 1 for n in counted.values())
    return lost, double, (f"step {step}: committed micro-batches {counted} (expected each of {micro_batches} once)"
                          if bad else None)


def attested_digests(by_worker: dict[str, str], exact: bool) -> list[str]:
    """The digests a copy of a stage's state may match after a step (sorted), from each member's
    APPLIED digest. Exact averaging (compression "none") leaves honest replicas bit-identical, so a
    digest a strict majority reported is the only one: a member that reports the digest of altered
    weights it hands out is then out-voted, as in spot checks. In a tie (two replicas, one lying)
    there is no telling which is honest and every digest stays (the close records
    replicas_diverged). Lossy rounds leave honest replicas a rounding apart: every digest."""
    digests = sorted(set(by_worker.values()))
    if not exact or len(digests) < 2:
        return digests
    counts = {d: list(by_worker.values()).count(d) for d in digests}
    top = max(digests, key=counts.__getitem__)
    return [top] if 2 * counts[top] > len(by_worker) else digests
