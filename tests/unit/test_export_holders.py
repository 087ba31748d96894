"""Which workers `gptjt export --coordinator` takes each stage's weights from
(gptjt_cli/swarm_commands.export_holders): every member, whose weights it averages."""

from __future__ import annotations

import pytest

from gptjt_cli.swarm_commands import export_holders


def stage(index: int, members: list[str], workers: list[str] | None = None) -> dict:
    return {"index": index, "members": members, "workers": workers if workers is not None else list(members)}


def test_every_member_of_a_stage_is_a_holder_and_a_joiner_is_not():
    status = {"stages": [stage(0, ["w2", "w1"], workers=["w1", "w2", "w3"]), stage(1, ["x9", "x1"])]}
    assert export_holders(status) == [["w1", "w2"], ["x1", "x9"]]


def test_a_live_worker_stands_in_where_a_stage_has_no_member():
    status = {"stages": [stage(0, ["w5"], workers=["w1", "w5"]), stage(1, [], workers=["x4", "x2"])]}
    assert export_holders(status) == [["w5"], ["x2"]]


def test_a_stage_without_a_live_worker_cannot_be_exported():
    with pytest.raises(RuntimeError, match="stage 1 has no live worker"):
        export_holders({"stages": [stage(0, ["w1"]), stage(1, [], workers=[])]})
