"""Which replica of the next stage a micro-batch goes to: least expected wait, or a lane in
local-steps mode (worker/routing.py)."""

from __future__ import annotations

from gptjt_proto import coordinator_pb2 as cpb
from worker.routing import NextStageRouter, lane_partner


def assignment(peers: list[str], nexts: list[str]) -> cpb.StageAssignment:
    """A stage's assignment whose members are `peers` and whose next stage's are `nexts` (in
    the coordinator's order, not sorted), each at address "addr-<id>"."""
    return cpb.StageAssignment(stage=0, peer_ids=peers, next_ids=nexts, next_addresses=[f"addr-{n}" for n in nexts])


def test_least_expected_wait_spreads_unmeasured_replicas_and_skips_a_failed_one():
    router = NextStageRouter()
    router.update(["a", "b"], forgive=True)
    assert {router.pick(), router.pick()} == {"a", "b"}  # one in flight each
    router.done("a", 0.0, ok=False)
    assert router.pick() == "b"


def test_lane_partners_pair_the_members_of_two_stages_in_id_order():
    a = assignment(["w2", "w1"], ["x9", "x3"])
    assert lane_partner("w1", a, "local-steps") == "addr-x3"
    assert lane_partner("w2", a, "local-steps") == "addr-x9"


def test_no_lane_unless_local_steps_a_member_and_as_many_replicas_next():
    assert lane_partner("w1", assignment(["w1", "w2"], ["x1", "x2"]), "every-step") is None
    assert lane_partner("w3", assignment(["w1", "w2"], ["x1", "x2"]), "local-steps") is None  # not a member
    assert lane_partner("w1", assignment(["w1", "w2"], ["x1", "x2", "x3"]), "local-steps") is None
    assert lane_partner("w1", assignment(["w1", "w2"], ["x1"]), "local-steps") is None
    assert lane_partner("w1", assignment(["w1"], []), "local-steps") is None  # the last stage


def test_the_lane_partner_takes_every_micro_batch_while_it_answers():
    router = NextStageRouter()
    router.update(["a", "b"], forgive=True, lane="b")
    assert [router.pick() for _ in range(4)] == ["b"] * 4  # least wait alone would alternate
    router.done("b", 0.0, ok=False)
    assert router.pick() == "a"  # the partner failed: another replica rather than a stall
    router.update(["a", "b"], forgive=True, lane="b")  # a new plan forgives it
    assert router.pick() == "b"


def test_a_lane_partner_the_plan_no_longer_lists_is_dropped():
    router = NextStageRouter()
    router.update(["a", "b"], forgive=True, lane="c")
    assert router.lane is None
    assert router.pick() in ("a", "b")
