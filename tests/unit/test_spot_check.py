"""A replica recomputing another's micro-batch from its evidence (worker/spot_check.py, worker/evidence.py):
real stages of the tiny model linked in process. An honest stage's work recomputes to the same
commitment within the fp32 tolerance, before and after the verifier applies the step; each lie the
fault drill tells does not; evidence that is not what the stage committed to is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import copy

import pytest
import torch

from gptjt_core.commitment import TOLERANCE_FP32, compare, input_digest
from gptjt_core.config import ModelConfig, PipelineConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec
from gptjt_proto import stage_pb2 as pb
from tests.unit.test_micro_batch_work import KEY, STEP, InProcessLink, _tokens
from worker.commitments import tokens_parts
from worker.compute import ComputeQueue
from worker.evidence import EvidenceError, check_fits, read_evidence
from worker.faults import Faults, LieSettings, parse_faults
from worker.lies import Liar
from worker.micro_batch_work import StageInput, work_micro_batch
from worker.spot_check import WeightsGone, recompute
from worker.stage import LayerSlice
from worker.label_wire import labels_to_wire

RUN = RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(global_batch=4, micro_batch=2),
                pipeline=PipelineConfig(num_stages=3, replicas_per_stage=2))
SPECS = StageSpec.even_split(4, 3)
HONEST = Liar(Faults({}))


def _stage(spec: StageSpec) -> LayerSlice:
    stage = LayerSlice(RUN, spec)
    assert stage.keep_evidence  # replicas and spot checks on: it keeps what it received
    stage.begin(STEP, KEY[1])
    return stage


def _run_chain(first: Liar | None = None, loss_scale: float = 1.0) -> list[LayerSlice]:
    """One micro-batch through stages 0, 1, 2; returns the stages. Stage 0 lies as `first` says
    (None: honest); later stages as the process's liar (worker.micro_batch_work.process_liar).
    loss_scale: the attempt's, which the last stage applies."""
    ids, prefix, labels = _tokens()
    stages = [_stage(spec) for spec in SPECS]
    logs = [[] for _ in SPECS]
    links = [None] * 4
    for k in (2, 1):
        links[k] = InProcessLink(stages[k], links[k + 1], logs, k, labels, loss_scale)
    compute = ComputeQueue("stage-0")
    header = pb.MicroBatchHeader(ticket_id=KEY[0], step=STEP, attempt=KEY[1], prefix_lengths=prefix.tolist(), stage=1)
    header.labels = labels_to_wire(labels)
    item = StageInput(KEY, STEP, ids, prefix, labels, 4, tokens_parts(ids, labels, prefix))
    asyncio.run(work_micro_batch(stages[0], compute, links[1], item, lambda: header, first or HONEST))
    compute.close()
    for link in links[1:3]:
        link.compute.close()
    return stages


def _check(claimed_stage: LayerSlice, verifier: LayerSlice, step: int = STEP, loss_scale: float = 1.0):
    """The verifier's commitment to the claimed stage's micro-batch, and the verdict."""
    claimed = claimed_stage.commitments[KEY].commitment
    links = claimed_stage.commitments[KEY].links
    reply = claimed_stage.evidence[KEY].to_pb()
    inputs = read_evidence(reply, claimed.input, links.returned, verifier.spec.embed, verifier.spec.head)
    ours = recompute(verifier, step, tuple(reply.wire), inputs, claimed, RUN.train.global_batch, loss_scale)
    return ours, compare(claimed, ours, TOLERANCE_FP32)


def _replica(stage: LayerSlice) -> LayerSlice:
    """Another replica of the stage, holding the same weights (as sync averaging keeps them)."""
    other = _stage(stage.spec)
    other.model.load_state_dict(stage.model.state_dict())
    return other


def test_an_honest_stage_recomputes_to_its_commitment_at_every_stage():
    stages = _run_chain()
    for stage in stages:
        before = {n: None if p.grad is None else p.grad.clone() for n, p in stage.model.named_parameters()}
        verifier = _replica(stage)
        verifier.model.zero_grad(set_to_none=True)
        ours, verdict = _check(stage, verifier)
        assert verdict.agrees, (stage.spec, verdict.reason)
        assert verdict.output_rel_error < 1e-5
        assert (verdict.grad_rel_error is None) == stage.spec.embed  # stage 0 sends no gradient back
        # the check took its gradients with autograd.grad: the verifier's step gradients are untouched
        assert all(p.grad is None for p in verifier.model.parameters())
        assert all((p.grad is None and before[n] is None) or torch.equal(p.grad, before[n])
                   for n, p in stage.model.named_parameters())


def test_a_loss_scaled_attempt_is_checked_at_the_scale_the_ledger_gives():
    """The last stage sent its gradient scaled (fp16 runs): a check at the attempt's scale agrees,
    one that trusted scale 1 would call the honest stage a liar. Upstream stages recompute from
    the scaled gradient they received, so they need no scale."""
    stages = _run_chain(loss_scale=1024.0)
    assert _check(stages[2], _replica(stages[2]), loss_scale=1024.0)[1].agrees
    assert not _check(stages[2], _replica(stages[2]))[1].agrees
    assert _check(stages[1], _replica(stages[1]))[1].agrees


def test_after_its_update_the_verifier_checks_with_the_weights_it_kept():
    stages = _run_chain()
    stage = stages[1]
    verifier = _replica(stage)
    with torch.enable_grad():  # the verifier's own step: some gradient, then the update
        for p in verifier.model.parameters():
            p.grad = torch.full_like(p, 0.01)
    verifier.apply_step(STEP, 1.0)
    assert verifier.position == STEP + 1
    _, verdict = _check(stage, verifier)
    assert verdict.agrees, verdict.reason
    verifier.begin(STEP + 1, 0)
    verifier.apply_step(STEP + 1, 1.0)  # a second update: the weights of STEP are gone
    with pytest.raises(WeightsGone, match=f"not the weights of step {STEP}"):
        _check(stage, verifier)


def test_a_verifier_with_activation_checkpointing_recomputes_with_the_weights_it_kept():
    """Checkpointing would recompute in the backward with the module's own (updated) weights,
    after functional_call has put them back: the recomputation runs without it."""
    stages = _run_chain()
    stage = stages[1]
    verifier = _replica(stage)
    verifier.model.checkpoint_segment = 1  # pipeline.activation_checkpointing = "block"
    for p in verifier.model.parameters():
        p.grad = torch.full_like(p, 0.01)
    verifier.apply_step(STEP, 1.0)
    _, verdict = _check(stage, verifier)
    assert verdict.agrees, verdict.reason
    assert verifier.model.checkpoint_segment == 1  # given back


def _liar(kind: str, value: float = 1.0, scale: float = 1.01, noise: float = 0.01) -> Liar:
    return Liar(Faults(parse_faults(f"{kind}@{STEP}:{value}"), lie=LieSettings(scale=scale, noise=noise)))


@pytest.mark.parametrize("kind, stage_index", [
    ("lie-scale", 0), ("lie-noise", 1), ("lie-zero", 0), ("lie-scale-grad", 1), ("lie-noise-grad", 2),
    ("lie-zero-grad", 2),
])
def test_each_lie_recomputes_to_a_disagreement(kind, stage_index, monkeypatch):
    liar = _liar(kind)
    if stage_index == 0:
        stages = _run_chain(liar)
    else:  # stages after 0 take their liar from the process's faults: patch the one work_micro_batch uses
        monkeypatch.setattr("worker.micro_batch_work.process_liar", lambda: liar)
        stages = _run_chain()
    stage = stages[stage_index]
    _, verdict = _check(stage, _replica(stage))
    assert not verdict.agrees and verdict.input_matches, verdict.reason


def test_evidence_that_is_not_what_the_stage_committed_to_is_refused():
    stages = _run_chain()
    stage = stages[1]
    claimed = stage.commitments[KEY].commitment
    returned = stage.commitments[KEY].links.returned
    reply = stage.evidence[KEY].to_pb()
    tampered = copy.deepcopy(reply)
    tampered.wire[1] = bytes(len(reply.wire[1]))  # other activations
    with pytest.raises(EvidenceError, match="input digest"):
        read_evidence(tampered, claimed.input, returned, False, False)
    tampered = copy.deepcopy(reply)
    tampered.returned_data = bytes(len(reply.returned_data))  # another gradient back
    with pytest.raises(EvidenceError, match="gradient codes"):
        read_evidence(tampered, claimed.input, returned, False, False)
    with pytest.raises(EvidenceError, match="4 parts"):  # digests right, but not a stage > 0's evidence
        read_evidence(pb.EvidenceReply(wire=[b"x"]), input_digest(b"x"), returned, False, False)


def test_a_stage_keeps_the_evidence_of_two_steps_only():
    stages = _run_chain()
    stage = stages[2]
    assert KEY in stage.evidence
    stage.apply_step(STEP, 1.0)
    assert KEY in stage.evidence  # checks of the step just applied come now
    stage.begin(STEP + 1, 0)
    stage.apply_step(STEP + 1, 1.0)
    assert KEY not in stage.evidence


def test_evidence_shaped_unlike_the_runs_micro_batches_is_refused_before_any_compute():
    stages = _run_chain()
    stage = stages[1]
    claimed, links = stage.commitments[KEY].commitment, stage.commitments[KEY].links
    inputs = read_evidence(stage.evidence[KEY].to_pb(), claimed.input, links.returned, False, False)
    width = stage.model.config.n_embd
    check_fits(inputs, RUN.train.micro_batch, RUN.train.seq_len, width, False)  # the honest one fits
    with pytest.raises(EvidenceError, match="at most 1 x"):
        check_fits(inputs, 1, RUN.train.seq_len, width, False)  # two sequences where the run sends one
    with pytest.raises(EvidenceError, match="width"):
        check_fits(inputs, RUN.train.micro_batch, RUN.train.seq_len, width + 1, False)
    bad = dataclasses.replace(inputs, inputs=torch.full_like(inputs.inputs, float("nan")))
    with pytest.raises(EvidenceError, match="NaN"):
        check_fits(bad, RUN.train.micro_batch, RUN.train.seq_len, width, False)


def test_a_verifier_moved_to_another_stage_says_so_instead_of_recomputing():
    """Another stage's weights would recompute garbage and accuse an honest worker."""
    from gptjt_proto import coordinator_pb2 as cpb
    from worker.spot_check import SpotChecker

    stages = _run_chain()
    answers, fetched = [], []

    async def report(worker_id, check_id, blob, unable):
        answers.append((check_id, blob, unable))
        return "unchecked"

    async def fetch(check):
        fetched.append(check)
        raise AssertionError("no evidence is fetched for a check of another stage")

    compute = ComputeQueue("verifier")
    checker = SpotChecker("v", compute, fetch, report, lambda: (2, stages[2]), RUN.train.global_batch)
    check = cpb.SpotCheck(check_id=5, step=STEP, attempt=KEY[1], ticket_id=KEY[0], stage=1, worker_id="w",
                          address="127.0.0.1:1", commitment=stages[1].commitments[KEY].commitment.to_bytes())
    asyncio.run(checker._answer(check))
    compute.close()
    assert answers == [(5, b"", "this worker holds stage 2 now, not stage 1")] and not fetched


@pytest.mark.parametrize("weights", ["store", "source"])
def test_a_standby_checks_each_stage_with_weights_from_the_store_or_the_model_source(weights):
    """A stage with one replica: a standby loads its layers at the checked step (worker/check_weights.py)
    and recomputes; honest work agrees at every stage. The store hands over what the stage saved."""
    from gptjt_core.commitment import Commitment
    from gptjt_proto import coordinator_pb2 as cpb
    from worker.check_weights import CheckWeights
    from worker.spot_check import SpotChecker

    stages = _run_chain()
    answers, asked = [], []

    async def report(worker_id, check_id, blob, unable):
        answers.append((check_id, blob, unable))
        return "agree"

    async def get_checkpoint(step, spec):
        asked.append((step, spec))
        (stage,) = [s for s in stages if s.spec == spec]
        return stage.checkpoint_blob()

    async def fetch(check):
        return stages[check.stage].evidence[KEY].to_pb()

    compute = ComputeQueue("standby")
    stored = CheckWeights(RUN, "cpu", compute, get_checkpoint)
    checker = SpotChecker("v", compute, fetch, report, lambda: (-1, None), RUN.train.global_batch, stored)
    for k, stage in enumerate(stages):
        claimed = stage.commitments[KEY]
        check = cpb.SpotCheck(check_id=k, step=STEP, attempt=KEY[1], ticket_id=KEY[0], stage=k, worker_id="w",
                              address="127.0.0.1:1", commitment=claimed.commitment.to_bytes(),
                              returned=claimed.links.returned or b"", weights=weights, start_layer=stage.spec.start,
                              end_layer=stage.spec.end, embed=stage.spec.embed, head=stage.spec.head)
        asyncio.run(checker._answer(check))
    late = cpb.SpotCheck(check_id=9, step=3, stage=1, weights="source", start_layer=1, end_layer=2)
    asyncio.run(checker._answer(late))  # the model source holds step 0's weights only
    compute.close()
    assert [a[0] for a in answers] == [0, 1, 2, 9] and all(not a[2] for a in answers[:3]), answers
    for (k, blob, _), stage in zip(answers, stages):
        assert compare(stage.commitments[KEY].commitment, Commitment.from_bytes(blob), TOLERANCE_FP32).agrees
    assert answers[3][1] == b"" and "cannot load weights 'source' of step 3" in answers[3][2]
    assert stored.loads == 3 and len(asked) == (3 if weights == "store" else 0)


def test_a_standby_asks_again_when_the_checked_worker_has_not_heard_of_its_check_yet():
    """The standby hears of its check on a heartbeat; the checked worker learns that the standby
    may fetch on its Watch stream: PERMISSION_DENIED is asked again, a few times, not at once final."""
    import grpc
    from gptjt_proto import coordinator_pb2 as cpb
    from worker.spot_check import SpotChecker

    stages = _run_chain()
    calls, answers = [], []

    async def fetch(check):
        calls.append(check.check_id)
        if len(calls) < 3:
            raise grpc.aio.AioRpcError(grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="'v' is no replica of this stage nor a standby checking it")
        return stages[1].evidence[KEY].to_pb()

    async def report(worker_id, check_id, blob, unable):
        answers.append((blob, unable))
        return "agree"

    compute = ComputeQueue("verifier")
    checker = SpotChecker("v", compute, fetch, report, lambda: (1, _replica(stages[1])), RUN.train.global_batch)
    claimed = stages[1].commitments[KEY]
    check = cpb.SpotCheck(check_id=3, step=STEP, attempt=KEY[1], ticket_id=KEY[0], stage=1, worker_id="w",
                          address="127.0.0.1:1", commitment=claimed.commitment.to_bytes(),
                          returned=claimed.links.returned or b"")
    asyncio.run(checker._answer(check))
    compute.close()
    assert len(calls) == 3 and answers and answers[0][0] and not answers[0][1], answers


def test_a_run_state_announcing_a_check_asks_for_one_heartbeat_unless_the_check_is_held():
    """worker/runner.py sends a heartbeat at once when SpotChecker.wants the announced check: once
    per id, never for one a heartbeat reply already handed over (or a newer one)."""
    from gptjt_proto import coordinator_pb2 as cpb
    from worker.spot_check import SpotChecker

    checker = SpotChecker("v", None, None, None, lambda: (-1, None), RUN.train.global_batch)
    assert not checker.wants(0)  # nothing waiting
    assert checker.wants(7) and not checker.wants(7)  # asked once; the reply is on its way
    checker.take([cpb.SpotCheck(check_id=9)])
    assert not checker.wants(9) and not checker.wants(8)  # held already
    assert checker.wants(10)
