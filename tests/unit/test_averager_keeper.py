"""The averager keeper's count of failed rounds: only rounds that formed no group lead to a rebuild."""

from __future__ import annotations

from gptjt_core.config import RunConfig
from worker.averager_keeper import AveragerKeeper


def test_only_rounds_without_a_group_count_toward_a_rebuild():
    run = RunConfig()
    run.averaging.rebuild_after_failures = 3
    keeper = AveragerKeeper(run, "127.0.0.1", lambda: None)
    assert not keeper.round_failed() and not keeper.round_failed()
    # a round that formed a group and lost parts: this peer reaches the others; the count restarts
    assert not keeper.round_failed(group_formed=True)
    assert not keeper.round_failed() and not keeper.round_failed()
    assert keeper.round_failed()  # the third in a row without a group
    keeper.round_succeeded()
    assert keeper.failed_rounds == 0
