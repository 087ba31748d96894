"""Dynamic loss scaling across stages: the rule, a stage's scaled backward, and the ledger's protocol.

The swarm's end-to-end drill (an overflow injected into one stage at step k) is in
tests/integration/test_loss_scale_swarm.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.ledger import APPLYING, RunLedger
from coordinator.scheduler import plan_stages
from gptjt_core.config import ConfigError, TrainConfig
from gptjt_core.loss_scale import MAX_SCALE, ScaleState, scaling_wanted
from tests.conftest import small_run
from tests.unit.test_ledger import Clock


def test_the_scale_halves_on_overflow_down_to_one_and_doubles_after_clean_steps():
    assert ScaleState(1024.0, 7).after_overflow() == ScaleState(512.0, 0)
    assert ScaleState(2.0).after_overflow() == ScaleState(1.0, 0)
    assert ScaleState(1.0).after_overflow() is None  # at the floor an overflow is no scaling matter
    state = ScaleState(8.0)
    for _ in range(2):
        state = state.after_clean_step(3)
    assert state == ScaleState(8.0, 2)
    assert state.after_clean_step(3) == ScaleState(16.0, 0)
    assert ScaleState(MAX_SCALE, 5).after_clean_step(1) == ScaleState(MAX_SCALE, 6)


@pytest.mark.parametrize("mode, precision, dtypes, wanted", [
    ("off", "fp16", {"fp16"}, False),
    ("dynamic", "fp32", {"fp32"}, True),
    ("auto", "fp16", set(), True),
    ("auto", "bf16", {"fp16"}, False),  # bf16 asked for: an fp16 report is a wrong one, not a reason
    ("auto", "auto", {"bf16", "fp32"}, False),
    ("auto", "auto", {"bf16", "fp16"}, True),  # a V100 or T4 joined a bf16 swarm
])
def test_when_scaling_is_on(mode, precision, dtypes, wanted):
    assert scaling_wanted(mode, precision, dtypes) is wanted


@pytest.mark.parametrize("field, value", [("loss_scaling", "static"), ("loss_scale_init", 1000.0),
                                          ("loss_scale_init", 0.5), ("loss_scale_init", 2.0 ** 25),
                                          ("loss_scale_growth_every", 0)])
def test_bad_loss_scale_settings_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def _last_stage():
    from gptjt_core.stage_spec import StageSpec
    from worker.stage import LayerSlice

    run = small_run(steps=2)
    return LayerSlice(run, StageSpec(2, 4, embed=False, head=True))


def test_a_scaled_last_stage_sends_scaled_gradients_and_keeps_unscaled_ones():
    """Scale 2^10: the gradient sent upstream is exactly 1024x; after unscale_gradients the
    parameter gradients and their norm are bit for bit the unscaled run's (powers of two)."""
    torch.manual_seed(0)
    stage = _last_stage()
    x = torch.randn(2, 64, stage.model.config.n_embd)
    prefix, labels = torch.tensor([8, 0]), torch.randint(0, 256, (2, 64))
    results = []
    for scale in (1.0, 1024.0):
        stage.reset_to_position()
        loss, _, sent = stage.forward_backward((1, 0), 0, x.clone(), prefix, labels, 4, loss_scale=scale)
        stage.unscale_gradients(scale)
        stage.unscale_gradients(scale)  # a retried report must not divide twice
        results.append((loss, sent, [p.grad.clone() for p in stage.model.parameters()], stage.grad_norm_sq()))
    (loss1, sent1, grads1, norm1), (loss2, sent2, grads2, norm2) = results
    assert loss1 == loss2  # the loss reported is the unscaled one
    assert torch.equal(sent2, sent1 * 1024)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert norm1 == norm2


def test_an_overflowed_gradient_reports_a_norm_that_is_not_finite():
    stage = _last_stage()
    x = torch.randn(1, 64, stage.model.config.n_embd)
    stage.forward_backward((1, 0), 0, x, torch.tensor([0]), torch.randint(0, 256, (1, 64)), 4, loss_scale=2.0 ** 16)
    stage.gradients()[0].view(-1)[0] = float("inf")
    stage.unscale_gradients(2.0 ** 16)
    assert not math.isfinite(stage.grad_norm_sq())


def _scaled_ledger(tmp_path, growth_every: int = 1000) -> tuple[RunLedger, list[str]]:
    run = small_run(steps=6, global_batch=4, micro_batch=2)
    run.pipeline.num_stages = 2
    run.train.loss_scaling, run.train.loss_scale_init, run.train.loss_scale_growth_every = "dynamic", 1024.0, growth_every
    ledger = RunLedger(tmp_path / "run.db", run, plan_stages(4, 2), Clock())
    ids = [ledger.join(f"w{i}", f"127.0.0.1:{9000 + i}", {})["id"] for i in range(2)]
    for worker_id in ids:
        ledger.heartbeat(worker_id, "ready", {}, ledger.restore_epoch, ledger.step)
    return ledger, ids


def _accumulate(ledger: RunLedger, ids: list[str], norms: tuple[float, float]) -> None:
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        assert ledger.commit(ids[0], t.id, t.attempt, 1.0, 128) == "committed"
    for worker_id, norm in zip(ids, norms):
        ledger.report(worker_id, ledger.step, ledger.attempt, "contribution", norm, 2)


def _apply(ledger: RunLedger, ids: list[str]) -> None:
    assert ledger.phase == APPLYING
    for worker_id in ids:
        assert ledger.report(worker_id, ledger.step, ledger.attempt, "applied")


def test_an_overflow_at_any_stage_reruns_the_step_at_half_the_scale_for_every_stage(tmp_path):
    ledger, ids = _scaled_ledger(tmp_path)
    assert [ledger.run_state(w)["loss_scale"] for w in ids] == [1024.0, 1024.0]
    _accumulate(ledger, ids, (4.0, float("inf")))  # stage 1 overflowed
    assert (ledger.step, ledger.attempt, ledger.phase) == (0, 1, "open")
    assert [ledger.run_state(w)["loss_scale"] for w in ids] == [512.0, 512.0]
    lowered = [e for e in ledger.status()["events"] if e["kind"] == "loss_scale_lowered"]
    assert len(lowered) == 1 and "1024" in lowered[0]["detail"] and ids[1] in lowered[0]["detail"]
    _accumulate(ledger, ids, (4.0, 4.0))
    assert ledger.global_grad_norm() == pytest.approx(8.0 ** 0.5)
    _apply(ledger, ids)
    assert ledger.step == 1 and ledger.status()["loss_scale"] == 512.0
    assert ledger.status()["history"][-1]["attempts"] == 2  # the step's data was done twice, counted once


def test_clean_steps_double_the_scale_and_a_restart_keeps_it(tmp_path):
    ledger, ids = _scaled_ledger(tmp_path, growth_every=2)
    for _ in range(2):
        _accumulate(ledger, ids, (4.0, 4.0))
        _apply(ledger, ids)
    assert ledger.run_state(ids[0])["loss_scale"] == 2048.0
    assert any(e["kind"] == "loss_scale_raised" for e in ledger.status()["events"])
    reopened = RunLedger(tmp_path / "run.db", ledger.run, plan_stages(4, 2), Clock())
    assert reopened.status()["loss_scale"] == 2048.0


def test_at_the_floor_an_overflow_is_judged_like_any_non_finite_gradient(tmp_path):
    ledger, ids = _scaled_ledger(tmp_path)
    ledger.db.set_meta("loss_scale", 1.0)  # as after ten halvings
    ledger.protocol.loss_scales.db.execute("UPDATE loss_scales SET scale=1.0")
    _accumulate(ledger, ids, (4.0, float("nan")))
    assert ledger.phase == APPLYING and math.isnan(ledger.global_grad_norm())  # every stage skips the update
    assert any(e["kind"] == "loss_scale_floor" for e in ledger.status()["events"])


def test_an_unscaled_run_sends_scale_one_and_skips_a_non_finite_step_as_before(tmp_path):
    ledger, ids = _scaled_ledger(tmp_path)
    ledger.run.train.loss_scaling = "off"
    _accumulate(ledger, ids, (4.0, 4.0))
    _apply(ledger, ids)  # step 0 opened scaled (decided once per attempt); step 1 opens unscaled
    assert ledger.run_state(ids[0])["loss_scale"] == 1.0 and ledger.status()["loss_scale"] is None
    _accumulate(ledger, ids, (float("inf"), 4.0))
    assert ledger.phase == APPLYING and not math.isfinite(ledger.global_grad_norm()) and ledger.attempt == 0
