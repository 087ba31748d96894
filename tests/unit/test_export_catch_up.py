"""`gptjt export --coordinator` of a live run: a step's update reaches the stages one after another,
so a stage fetched before it applied holds the step before the others'. The export fetches only
that stage again, after a pause, instead of failing ("export again") as it did until 2026-12-06.
The stage link is stood in for by replicas that answer FetchState with a scripted step."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gptjt_cli.swarm_commands import CATCH_UP_TRIES, _stages_at_one_step
from tests.unit.test_export_attested import _stage

BLOB = _stage().checkpoint_blob()  # every replica sends the same weights: the test is about steps


class _Replicas:
    """Answers FetchState for each address with the next of its scripted steps (the last repeats)."""

    def __init__(self, steps: dict[str, list[int]]):
        self.steps, self.fetches = steps, {a: 0 for a in steps}

    async def fetch_state(self, address: str):
        script = self.steps[address]
        position = script[min(self.fetches[address], len(script) - 1)]
        self.fetches[address] += 1
        return SimpleNamespace(position=position), BLOB


def _status(members: list[list[str]]) -> dict:
    """Two stages, no step closed yet (nothing to check a state against)."""
    workers = [{"id": w, "address": f"h:{w}"} for ws in members for w in ws]
    return {"workers": workers, "history": [],
            "stages": [{"index": i, "members": ws, "workers": ws, "start_layer": i, "end_layer": i + 1}
                       for i, ws in enumerate(members)]}


def test_only_the_stage_a_step_behind_is_fetched_again():
    replicas = _Replicas({"h:a": [5, 6], "h:b": [6], "h:c": [6]})  # a: stage 0, still applying step 5
    status, skipped = _status([["a"], ["b", "c"]]), []
    states = asyncio.run(_stages_at_one_step(replicas, status, skipped, lambda: status, wait_s=0.0))
    assert len(states) == 2 and skipped == []
    assert replicas.fetches == {"h:a": 2, "h:b": 1, "h:c": 1}


def test_replicas_of_one_stage_at_two_steps_are_fetched_again_together():
    replicas = _Replicas({"h:a": [6], "h:b": [5, 5, 6], "h:c": [6]})  # b lags its own stage's a
    status = _status([["a", "b"], ["c"]])
    asyncio.run(_stages_at_one_step(replicas, status, [], lambda: status, wait_s=0.0))
    assert replicas.fetches == {"h:a": 3, "h:b": 3, "h:c": 1}


def test_a_stage_that_never_catches_up_fails_naming_the_steps():
    replicas = _Replicas({"h:a": [5], "h:b": [6]})
    status = _status([["a"], ["b"]])
    with pytest.raises(RuntimeError, match=r"different steps \{'a': 5, 'b': 6\} after 3 more fetches"):
        asyncio.run(_stages_at_one_step(replicas, status, [], lambda: status, wait_s=0.0))
    assert replicas.fetches == {"h:a": CATCH_UP_TRIES + 1, "h:b": 1}
