"""The local trainer: resume equals an uninterrupted run; NaNs are caught; loss falls on demo data."""

from __future__ import annotations

import math

import pytest
import torch

from gptjt_core.trainer import LocalTrainer, NonFiniteLossError
from tests.conftest import small_run


def test_resume_equals_uninterrupted(tmp_path):
    run = small_run(steps=4)
    straight = LocalTrainer(run, tmp_path / "a")
    straight_losses = [straight.train_step().loss for _ in range(4)]

    first = LocalTrainer(run, tmp_path / "b")
    losses = [first.train_step().loss for _ in range(2)]
    first.save_checkpoint()
    del first
    second = LocalTrainer(run, tmp_path / "b")
    assert second.resume() == 2
    losses += [second.train_step().loss for _ in range(2)]

    assert losses == straight_losses  # bit-identical: same data, same kernels, same state
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_fit_checkpoints_and_resume_continues(tmp_path):
    run = small_run(steps=3)
    run.train.checkpoint_every = 1
    trainer = LocalTrainer(run, tmp_path)
    trainer.fit(steps=2, progress=False)
    assert trainer.latest_checkpoint().name == "step-0000002"
    assert (trainer.checkpoint_root / "step-0000001").is_dir()
    again = LocalTrainer(run, tmp_path)
    assert again.resume() == 2
    stats = again.fit(progress=False)
    assert [s.step for s in stats] == [3]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_nan_weights_skip_updates_then_stop(tmp_path):
    trainer = LocalTrainer(small_run(steps=5), tmp_path)
    with torch.no_grad():
        trainer.model.transformer.h["1"].mlp.fc_in.weight[0, 0] = float("nan")
    before = trainer.model.transformer.h["2"].mlp.fc_in.weight.clone()
    stats = trainer.train_step()
    assert stats.skipped and math.isnan(stats.loss)
    assert torch.equal(before, trainer.model.transformer.h["2"].mlp.fc_in.weight)  # no update applied
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.train_step()


def test_eight_bit_adamw_and_bf16_autocast_train_on_cpu(tmp_path):
    run = small_run(steps=2)
    run.optim.eight_bit = True
    run.train.precision = "bf16"
    trainer = LocalTrainer(run, tmp_path)
    stats = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(s.loss) and not s.skipped for s in stats)
    state = trainer.optimizer.state[trainer.model.transformer.wte.weight]
    assert state["state1"].dtype == torch.uint8  # 8-bit moments


def test_loss_falls_by_a_third_on_demo_data(tmp_path):
    """The demo's promise: a couple of minutes of train-local on 2 cores cuts the loss by a third."""
    from gptjt_core.config import tiny_demo_config

    run = tiny_demo_config()
    run.train.steps = 40
    trainer = LocalTrainer(run, tmp_path)
    stats = trainer.fit(progress=False)
    start = sum(s.loss for s in stats[:3]) / 3
    end = sum(s.loss for s in stats[-5:]) / 5
    assert end < start * 2 / 3, (start, end)
