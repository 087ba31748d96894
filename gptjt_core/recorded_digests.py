"""What a closed step's row records of one stage's state digests, read alike by the coordinator (a
joiner's assignment: coordinator/ledger/history.py) and by the export (from the status:
gptjt_cli/swarm_commands.py). Apart from gptjt_core/state_digest.py, which computes digests,
because it needs no torch: the coordinator's status process reads history rows and must start
without importing torch (tests/unit/test_ledger_scale.py)."""

from __future__ import annotations

from collections.abc import Mapping


def recorded_digests(reported: object) -> tuple[tuple[int, int], tuple[str, ...]] | None:
    """One stage's entry in a closed step's detail (coordinator/ledger/steps.py `_close`:
    {"layers": [start, end], "digests": {worker: digest}, "attested": [digest, ...], ...}): the
    layer range its members' digests are of and the digests a copy may match, sorted (`attested`:
    the majority's where replicas must be identical, coordinator/ledger/rules.attested_digests;
    every member's in a row from before it was recorded); None where no range was recorded (a row
    from before ranges were, or a stage no member reported on). Read by the coordinator for a
    joiner's assignment and by the export from the status, alike."""
    if not isinstance(reported, Mapping):
        return None
    layers, digests = reported.get("layers"), reported.get("digests") or {}
    if not (isinstance(layers, list) and len(layers) == 2 and isinstance(digests, Mapping)):
        return None
    attested = reported.get("attested")
    chosen = attested if isinstance(attested, list) else list(digests.values())
    return (int(layers[0]), int(layers[1])), tuple(sorted({str(d) for d in chosen}))
