"""Lying stages (worker/lies.py): each lie-* kind changes what the stage sends as worker/faults.py
says, only from its step on, on a reproducible fraction of micro-batches; and through
work_micro_batch the next stage receives the lying output, the previous one the lying gradient."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from gptjt_core.compression import Encoded, encode
from gptjt_core.config import ModelConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec
from gptjt_proto import stage_pb2 as pb
from worker.commitments import received_parts, tokens_parts
from worker.compute import ComputeQueue
from worker.faults import Faults, LieSettings, parse_faults
from worker.lies import Liar, chosen
from worker.micro_batch_work import StageInput, work_micro_batch
from worker.stage import LayerSlice

TOLERANCE = 1e-2  # the relative tolerance of an honest-recompute check: every lie must exceed it


def liar(text: str, settings: LieSettings = LieSettings()) -> Liar:
    return Liar(Faults(parse_faults(text), lie=settings))


def rel_err(sent: torch.Tensor, honest: torch.Tensor) -> float:
    return float((sent.float() - honest.float()).norm() / honest.float().norm())


def tensor(seed: int, shape=(2, 24, 128), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_an_unarmed_liar_and_an_armed_one_before_its_step_send_the_honest_tensor():
    t = tensor(0)
    assert liar("").output((1, 0), 5, t) is t and liar("").gradient((1, 0), 5, t) is t
    assert liar("poison@1").output((1, 0), 5, t) is t  # other kinds tell no lie
    early = liar("lie-zero@3,lie-scale-grad@3")
    assert early.output((1, 0), 2, t) is t and early.gradient((1, 0), 2, t) is t
    assert early.output((1, 0), 3, t).abs().sum() == 0 and early.output((2, 0), 9, t).abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_noise_and_zero_change_the_tensor_as_specified(dtype):
    t = tensor(1, dtype=dtype)
    scaled = liar("lie-scale@0").output((1, 0), 0, t)
    assert scaled.dtype == dtype and torch.equal(scaled, (t.float() * 1.1).to(dtype))
    assert torch.equal(liar("lie-scale@0", LieSettings(scale=0.5)).output((1, 0), 0, t), t * 0.5)
    noisy = liar("lie-noise@0").output((1, 0), 0, t)
    assert noisy.dtype == dtype and 0.045 < rel_err(noisy, t) < 0.055  # 5 % of the RMS, over 6144 values
    assert torch.equal(noisy, liar("lie-noise@0").output((1, 0), 0, t))  # seeded by the micro-batch...
    assert not torch.equal(noisy, liar("lie-noise@0").output((2, 0), 0, t))  # ...so another one differs
    assert 0.18 < rel_err(liar("lie-noise@0", LieSettings(noise=0.2)).output((1, 0), 0, t), t) < 0.22
    zero = liar("lie-zero@0").output((1, 0), 0, t)
    assert zero.dtype == dtype and zero.abs().sum() == 0
    for sent in (scaled, noisy, zero):
        assert rel_err(sent, t) > 4 * TOLERANCE


def test_stale_replays_the_last_honest_tensor_of_another_micro_batch_of_the_same_shape():
    stale, a, b, c, small = liar("lie-stale@1"), tensor(1), tensor(2), tensor(3), tensor(4, shape=(1, 24, 128))
    assert stale.output((1, 0), 0, a) is a  # before step 1: honest, and kept
    assert stale.output((2, 0), 1, b) is a  # replays the earlier one
    assert stale.output((3, 0), 1, c) is b  # keeps one: the last honest tensor
    assert stale.output((3, 1), 1, c) is c  # the same ticket again: nothing stale to replay
    assert stale.output((4, 0), 1, small) is small  # another shape: nothing to replay
    assert stale.output((5, 0), 1, c) is c  # the kept one is that other shape's
    assert stale.output((6, 0), 1, b) is c
    assert rel_err(a, b) > TOLERANCE


def test_grad_kinds_lie_on_the_gradient_only_and_output_kinds_on_the_output_and_the_loss():
    t, grad_liar = tensor(5), liar("lie-scale-grad@0")
    assert grad_liar.output((1, 0), 0, t) is t and grad_liar.loss((1, 0), 0, 2.5) == 2.5
    assert torch.equal(grad_liar.gradient((1, 0), 0, t), t * 1.1)
    assert grad_liar.gradient((1, 0), 0, None) is None  # stage 0 sends no gradient
    output_liar = liar("lie-scale@0")
    assert output_liar.gradient((1, 0), 0, t) is t and output_liar.loss((1, 0), 0, 2.5) == pytest.approx(2.75)
    assert liar("lie-zero@0").loss((1, 0), 0, 2.5) == 0.0


def test_a_fraction_picks_a_reproducible_share_of_micro_batches_near_it():
    keys = [(ticket, attempt) for ticket in range(1000) for attempt in range(2)]
    picked = [k for k in keys if chosen("lie-scale", k, 0.25)]
    assert 0.22 < len(picked) / len(keys) < 0.28
    assert picked == [k for k in keys if chosen("lie-scale", k, 0.25)]  # the same in every run
    assert not set(picked) >= {k for k in keys if chosen("lie-zero", k, 0.25)}  # each kind draws its own
    t, one, other = tensor(6), liar("lie-zero@0:0.25"), liar("lie-zero@0:0.25")
    lied = [k for k in keys[:200] if one.output(k, 0, t) is not t]
    assert lied == [k for k in keys[:200] if other.output(k, 0, t) is not t]
    assert lied == [k for k in keys[:200] if chosen("lie-zero", k, 0.25)]


def test_the_first_lie_is_logged_once(caplog):
    told, t = liar("lie-noise-grad@2:0.5"), tensor(7)
    with caplog.at_level(logging.WARNING, logger="worker.lies"):
        for ticket in range(20):
            told.gradient((ticket, 0), 2, t)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("fault injection: lying (noise) from step 2 on this stage's gradient sent upstream, "
                               "50% of micro-batches")


# -- through work_micro_batch: what the neighbours receive ---------------------------------------

RUN = RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(global_batch=4, micro_batch=2))
KEY, STEP = (7, 0), 0


class LastStage:
    """The next stage in process: records what it receives, answers with the gradient its work returns."""

    def __init__(self, liar_: Liar, labels: torch.Tensor):
        self.stage = LayerSlice(RUN, StageSpec(2, 4, head=True))
        self.stage.begin(STEP, KEY[1])
        self.compute, self.liar, self.labels = ComputeQueue("stage-1"), liar_, labels
        self.received: torch.Tensor | None = None

    async def send(self, header: pb.MicroBatchHeader, out: torch.Tensor) -> tuple[pb.ReplyHeader, Encoded, Encoded]:
        self.received = out.clone()
        sent = encode(out, "fp32")
        header.activations.CopyFrom(pb.TensorMeta(shape=list(sent.shape), dtype=sent.dtype, codec=sent.codec,
                                                  nbytes=len(sent.data)))
        item = StageInput(KEY, STEP, out, torch.tensor(list(header.prefix_lengths)), self.labels, 4,
                          received_parts(header, sent.data), "fp32")
        done = await work_micro_batch(self.stage, self.compute, None, item, lambda: header, self.liar)
        assert done.sent_grad == encode(done.input_grad, "fp32")
        return pb.ReplyHeader(loss=done.loss, target_tokens=done.target_tokens), done.sent_grad, sent


def run_chain(first_liar: Liar, last_liar: Liar) -> tuple[LayerSlice, LastStage, float]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50257, (2, 24), generator=gen)
    prefix = torch.tensor([5, 0])
    first, last = LayerSlice(RUN, StageSpec(0, 2, embed=True)), LastStage(last_liar, ids.clone())
    first.begin(STEP, KEY[1])
    compute = ComputeQueue("stage-0")
    header = pb.MicroBatchHeader(ticket_id=KEY[0], step=STEP, attempt=KEY[1], prefix_lengths=prefix.tolist(), stage=1)
    item = StageInput(KEY, STEP, ids, prefix, ids.clone(), 4, tokens_parts(ids, ids, prefix))
    done = asyncio.run(work_micro_batch(first, compute, last, item, lambda: header, first_liar))
    compute.close()
    last.compute.close()
    return first, last, done.loss


def grads(stage: LayerSlice) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in stage.model.named_parameters() if p.grad is not None}


def test_the_next_stage_receives_the_lying_output_and_the_previous_one_the_lying_gradient():
    honest_first, honest_last, honest_loss = run_chain(liar(""), liar(""))
    assert honest_last.received.abs().sum() > 0

    first, last, loss = run_chain(liar("lie-zero@0"), liar(""))
    assert last.received.abs().sum() == 0 and loss != pytest.approx(honest_loss)
    # the liar commits to what it sent, its lie, so its neighbour's digests agree with it
    assert first.commitments[KEY].commitment.output.norm == 0
    assert honest_first.commitments[KEY].commitment.output.norm > 0
    assert first.commitments[KEY].links.sent == last.stage.commitments[KEY].commitment.input

    first, last, loss = run_chain(liar(""), liar("lie-scale-grad@0"))
    assert loss == honest_loss and torch.equal(last.received, honest_last.received)
    honest_grads = grads(honest_first)
    for name, g in grads(first).items():  # backward is linear in the gradient it is handed
        assert torch.allclose(g, honest_grads[name] * 1.1, rtol=1e-4, atol=1e-7), name
    honest_own = grads(honest_last.stage)
    for name, g in grads(last.stage).items():  # the liar's own parameter gradients stay honest
        assert torch.equal(g, honest_own[name]), name


def test_lie_state_scales_the_weights_a_copy_gets_from_its_step_on_and_nothing_else():
    """lie-state@3: the state FetchState hands out after 3 or more steps has its weights x 1.1; its
    optimizer and outer state, and every state before step 3, go out as they are."""
    from safetensors.torch import load, save

    from gptjt_core.stage_checkpoint import OPTIM, OUTER
    from worker.lies import altered_state

    honest = {"h.0.w": tensor(1, (4, 4)), f"{OPTIM}h.0.w/exp_avg": tensor(2, (4, 4)),
              f"{OUTER}anchor/h.0.w": tensor(3, (4, 4)), "steps": torch.tensor([7])}
    blob = save(honest)
    faults = Faults(parse_faults("lie-state@3"))
    assert altered_state(blob, 2, faults) == blob
    assert altered_state(blob, 2, Faults({})) == blob
    sent = load(altered_state(blob, 3, faults))
    assert torch.allclose(sent["h.0.w"], honest["h.0.w"] * 1.1)
    for name in (f"{OPTIM}h.0.w/exp_avg", f"{OUTER}anchor/h.0.w", "steps"):
        assert torch.equal(sent[name], honest[name]), name
