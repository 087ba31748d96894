"""Local-steps (DiLoCo-style) state of a stage replica: pseudo-gradients, the outer step, and
its place in the stage state (no network: the averaging round is replaced by the mean)."""

import pytest
import torch
from safetensors.torch import load

from gptjt_core.config import AveragingConfig, ConfigError, PipelineConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec
from worker.stage import LayerSlice

SPEC = StageSpec(0, 2, embed=True)


def _run(**averaging) -> RunConfig:
    from gptjt_core.config import ModelConfig

    return RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(global_batch=4, micro_batch=2),
                     pipeline=PipelineConfig(replicas_per_stage=2),
                     averaging=AveragingConfig(mode="local-steps", outer_every=2, **averaging))


def _step_on(stage: LayerSlice, step: int, seed: int, micro_batches: int = 1, pending=None) -> None:
    """One inner step on `micro_batches` of random tokens (the replica's share of a 2-micro-batch
    step); `pending`: the mean pseudo-gradient an averaging round of this step produced."""
    stage.begin(step, 0)
    if pending is not None:
        stage.pending_outer = [t.clone() for t in pending]
    gen = torch.Generator().manual_seed(seed)
    for i in range(micro_batches):
        ids = torch.randint(0, 1000, (2, 16), generator=gen)
        out = stage.forward((i, 0), step, ids, torch.zeros(2, dtype=torch.long))
        stage.backward((i, 0), step, torch.randn(out.shape, generator=gen) * 1e-2)
    norm = stage.grad_norm_sq() ** 0.5 * 2 / micro_batches
    assert stage.apply_local(step, norm, contribute=True, total_micro_batches=2)


def test_outer_step_averages_pseudo_gradients_and_replicas_share_the_anchor():
    run = _run()
    a, b = LayerSlice(run, SPEC), LayerSlice(run, SPEC)
    start = [p.detach().clone() for p in a.model.parameters()]
    for step in range(2):
        _step_on(a, step, seed=10 + step)
        _step_on(b, step, seed=20 + step)
    assert a.state_digest() == b.state_digest()  # the anchors: still the initial weights
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    da, db = a.pseudo_gradients(), b.pseudo_gradients()
    for d, s, p in zip(da, start, a.model.parameters()):
        assert torch.allclose(d, s - p.detach())
    mean = [(x + y) / 2 for x, y in zip(da, db)]
    # Step 2 starts with the outer step; a replica with no micro-batch then only moves on.
    b.begin(2, 0)
    b.pending_outer = [m.clone() for m in mean]
    assert b.apply_local(2, 0.0, contribute=True, total_micro_batches=2) and b.position == 3
    for p, s, m in zip(b.model.parameters(), start, mean):
        assert torch.allclose(p.detach(), s - m, atol=1e-7)  # outer_lr 1, no momentum: the mean of the replicas
    _step_on(a, 2, seed=30, pending=mean)
    assert a.state_digest() == b.state_digest()
    assert all(torch.equal(x, y) for x, y in zip(a.anchor, b.anchor))


def test_nesterov_outer_momentum_and_the_state_survive_a_checkpoint():
    run = _run(outer_lr=0.7, outer_momentum=0.9)
    a = LayerSlice(run, SPEC)
    _step_on(a, 0, seed=1)
    _step_on(a, 1, seed=2)
    delta = a.pseudo_gradients()
    anchor0 = [t.clone() for t in a.anchor]
    _step_on(a, 2, seed=3, pending=delta)
    for new, old, d in zip(a.anchor, anchor0, delta):  # m = d; update = d + 0.9 m
        assert torch.allclose(new, old - 0.7 * 1.9 * d, atol=1e-7)
    blob = a.checkpoint_blob()
    assert any(k.startswith("outer/momentum/") for k in load(blob))
    b = LayerSlice(run, SPEC, checkpoint=load(blob), position=a.position)
    assert b.state_digest() == a.state_digest()
    assert all(torch.equal(x, y) for x, y in zip(a.outer_momentum, b.outer_momentum))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_outer_schedule_and_bad_settings():
    cfg = AveragingConfig(mode="local-steps", outer_every=4)
    assert [s for s in range(13) if cfg.is_outer_step(s)] == [4, 8, 12]
    assert not AveragingConfig(outer_every=4).is_outer_step(4)  # every-step mode has no outer steps
    with pytest.raises(ConfigError, match="mode"):
        AveragingConfig(mode="sometimes")
    with pytest.raises(ConfigError, match="outer_momentum"):
        AveragingConfig(outer_momentum=1.0)


def test_an_outer_step_averaged_in_a_restarted_attempt_is_dropped():
    a = LayerSlice(_run(), SPEC)
    _step_on(a, 0, seed=1)
    _step_on(a, 1, seed=2)
    anchor = [t.clone() for t in a.anchor]
    a.begin(2, 0)
    a.pending_outer = a.pseudo_gradients()  # attempt 0's round succeeded on this replica ...
    a.begin(2, 1)  # ... then the step restarted
    assert a.pending_outer is None
    assert a.apply_local(2, 1.0, contribute=True, total_micro_batches=2) and a.position == 3
    assert all(torch.equal(x, y) for x, y in zip(a.anchor, anchor))


def test_sparsifier_picks_the_same_coordinates_everywhere_and_loses_nothing():
    from gptjt_core.outer_sparsity import OuterSparsifier, kept

    shapes = [torch.Size([64, 8]), torch.Size([10]), torch.Size([1])]
    a, b = OuterSparsifier(0.25, "run:0-2", shapes), OuterSparsifier(0.25, "run:0-2", shapes)
    assert a.averaged_shapes() == [torch.Size([128]), torch.Size([3]), torch.Size([1])]
    assert kept(10, 0.25) == 3 and kept(1, 0.01) == 1
    assert all(torch.equal(x, y) for x, y in zip(a.indices(4), b.indices(4)))  # no index on the wire
    assert not torch.equal(a.indices(4)[0], a.indices(8)[0])  # each outer step another draw
    assert not torch.equal(a.indices(4)[0], OuterSparsifier(0.25, "run:2-4", shapes).indices(4)[0])
    gen = torch.Generator().manual_seed(0)
    total = [torch.zeros(s) for s in shapes]
    sent = [torch.zeros(s) for s in shapes]
    for step in (4, 8, 12):
        deltas = [torch.randn(s, generator=gen) for s in shapes]
        values, residual = a.select(deltas, step)
        assert [v.shape for v in values] == a.averaged_shapes()
        if step == 8:  # a failed round: nothing committed, the next try sends the same
            again, _ = a.select(deltas, step)
            assert all(torch.equal(x, y) for x, y in zip(values, again))
        a.commit(residual)
        for t, s, d, e in zip(total, sent, deltas, a.expand(values, step)):
            t += d
            s += e
        # error feedback: what was sent plus what is kept is everything computed, to rounding
        for t, s, r in zip(total, sent, a.residual):
            assert torch.allclose(s + r, t, atol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        a.select([torch.zeros(3)], 16)


def test_sparse_outer_step_keeps_replicas_on_one_anchor_and_residuals_their_own():
    run = _run(outer_density=0.25)
    a, b = LayerSlice(run, SPEC), LayerSlice(run, SPEC)
    assert a.averaged_shapes() == b.averaged_shapes() != [p.shape for p in a.model.parameters()]
    start = [p.detach().clone() for p in a.model.parameters()]
    for step in range(2):
        _step_on(a, step, seed=10 + step)
        _step_on(b, step, seed=20 + step)
    da, db = a.pseudo_gradients(), b.pseudo_gradients()
    a.begin(2, 0)
    b.begin(2, 0)
    va, vb = a.outer_contribution(2), b.outer_contribution(2)
    mean = [(x + y) / 2 for x, y in zip(va, vb)]
    a.set_outer_mean(2, [m.clone() for m in mean])
    b.set_outer_mean(2, [m.clone() for m in mean])
    assert a.apply_local(2, 0.0, contribute=False, total_micro_batches=2)
    assert b.apply_local(2, 0.0, contribute=False, total_micro_batches=2)
    assert a.state_digest() == b.state_digest()  # one anchor: the outer step is all they apply here
    idx = a.sparsifier.indices(2)
    for i, (anchor, s) in enumerate(zip(a.anchor, start)):
        moved = (s - anchor).reshape(-1)
        expected = ((da[i] + db[i]) / 2).reshape(-1)
        assert torch.allclose(moved[idx[i]], expected[idx[i]], atol=1e-6)  # the chosen coordinates: the mean
        others = torch.ones_like(moved, dtype=torch.bool)
        others[idx[i]] = False
        assert torch.count_nonzero(moved[others]) == 0  # the rest waits in the residuals
        assert torch.allclose(a.sparsifier.residual[i].reshape(-1)[others], da[i].reshape(-1)[others])
        assert torch.count_nonzero(a.sparsifier.residual[i].reshape(-1)[idx[i]]) == 0


def test_outer_density_needs_local_steps():
    with pytest.raises(ConfigError, match="outer_density"):
        AveragingConfig(outer_density=0.5)
    with pytest.raises(ConfigError, match="outer_density"):
        AveragingConfig(mode="local-steps", outer_density=0.0)
    assert AveragingConfig(mode="local-steps", outer_density=0.1).outer_density == 0.1
