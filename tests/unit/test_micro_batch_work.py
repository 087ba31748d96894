"""The order of work for one micro-batch (worker/micro_batch_work.py), without gRPC: real stages
of the tiny model on their own compute threads, linked in process. Each stage must do what
gptjt_core.schedule.micro_batch_plan says, and the chain must train like the whole model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gptjt_core.chain import Links, Record, check_chain
from gptjt_core.commitment import Commitment
from gptjt_core.compression import Encoded, encode
from gptjt_core.config import ModelConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec
from gptjt_core.schedule import Action, Position, micro_batch_plan
from gptjt_proto import stage_pb2 as pb
from worker.commitments import received_parts, tokens_parts
from worker.compute import ComputeQueue
from worker.micro_batch_work import StageInput, work_micro_batch
from worker.routing import NoReplicaAvailable
from worker.stage import LayerSlice
from worker.label_wire import labels_to_wire

RUN = RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(global_batch=4, micro_batch=2))
KEY, STEP = (7, 0), 0


class RecordingStage(LayerSlice):
    """A stage that notes its forwards and backwards in a shared log."""

    def __init__(self, spec: StageSpec, log: list[Action]):
        super().__init__(RUN, spec)
        self.log = log
        self.begin(STEP, KEY[1])

    def forward(self, *args):
        self.log.append(Action.FORWARD)
        return super().forward(*args)

    def backward(self, *args):
        self.log.append(Action.BACKWARD)
        return super().backward(*args)

    def forward_backward(self, *args):
        self.log += [Action.FORWARD, Action.BACKWARD]
        return super().forward_backward(*args)


class InProcessLink:
    """Stands in for the network between two stages: `send` hands the output to the next stage's
    work and returns its reply as the transport would (the gradient encoded fp32: exact)."""

    def __init__(self, stage: LayerSlice, downstream: InProcessLink | None, logs: list[list[Action]], index: int,
                 labels: torch.Tensor, loss_scale: float = 1.0):
        self.stage, self.downstream, self.logs, self.index, self.labels = stage, downstream, logs, index, labels
        self.loss_scale = loss_scale  # the attempt's (RunState.loss_scale), which the last stage applies
        self.compute = ComputeQueue(f"stage-{index}")

    async def send(self, header: pb.MicroBatchHeader, out: torch.Tensor) -> tuple[pb.ReplyHeader, Encoded, Encoded]:
        self.logs[self.index - 1].append(Action.SEND)
        self.logs[self.index].append(Action.RECEIVE)
        sent = encode(out, "fp32")  # as the transport does: the header names the codes that follow
        header.activations.CopyFrom(pb.TensorMeta(shape=list(sent.shape), dtype=sent.dtype, codec=sent.codec,
                                                  nbytes=len(sent.data)))
        item = StageInput(KEY, STEP, out, torch.tensor(list(header.prefix_lengths)), self.labels,
                          RUN.train.global_batch, received_parts(header, sent.data), "fp32", self.loss_scale)
        down = pb.MicroBatchHeader()
        down.CopyFrom(header)
        down.stage = header.stage + 1
        done = await work_micro_batch(self.stage, self.compute, self.downstream, item, lambda: down)
        self.logs[self.index].append(Action.SEND)
        self.logs[self.index - 1].append(Action.RECEIVE)
        grad = done.sent_grad
        assert grad == encode(done.input_grad, "fp32")  # the codes sent back are of the gradient returned
        return pb.ReplyHeader(loss=done.loss, target_tokens=done.target_tokens), grad, sent


def _tokens():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50257, (2, 24), generator=gen)
    return ids, torch.tensor([5, 0]), ids.clone()


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_each_stage_follows_the_plan_and_the_chain_trains_like_the_whole_model(stages):
    ids, prefix, labels = _tokens()
    whole = LayerSlice(RUN, StageSpec(0, 4, embed=True, head=True))
    whole.begin(STEP, KEY[1])
    expected_loss, expected_targets, _ = whole.forward_backward(KEY, STEP, ids, prefix, labels, 4)

    logs: list[list[Action]] = [[] for _ in range(stages)]
    specs = StageSpec.even_split(4, stages)
    links: list[InProcessLink | None] = [None] * (stages + 1)
    for k in reversed(range(1, stages)):
        links[k] = InProcessLink(RecordingStage(specs[k], logs[k]), links[k + 1], logs, k, labels)
    first = RecordingStage(specs[0], logs[0])
    compute = ComputeQueue("stage-0")
    header = pb.MicroBatchHeader(ticket_id=KEY[0], step=STEP, attempt=KEY[1], prefix_lengths=prefix.tolist(), stage=1)
    header.labels = labels_to_wire(labels)
    done = asyncio.run(work_micro_batch(first, compute, links[1], StageInput(KEY, STEP, ids, prefix, labels, 4,
                                                                             tokens_parts(ids, labels, prefix)),
                                        lambda: header))
    for queue in [compute] + [link.compute for link in links[1:stages]]:
        queue.close()

    for k in range(stages):
        assert logs[k] == list(micro_batch_plan(Position(k, stages))), k
    assert done.input_grad is None  # stage 0 takes token ids
    assert done.loss == pytest.approx(expected_loss, rel=1e-5) and done.target_tokens == expected_targets
    grads = {n: p.grad for link in [*links[1:stages], None] for n, p in
             (first if link is None else link.stage).model.named_parameters()}
    for name, p in whole.model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-5, rtol=1e-4), name


def test_a_failed_send_discards_the_forward_and_passes_the_error_on():
    class NoNextStage:
        async def send(self, header, out):
            raise NoReplicaAvailable("no live replica of the next stage among []")

    ids, prefix, labels = _tokens()
    stage, compute = RecordingStage(StageSpec(0, 2, embed=True), []), ComputeQueue()
    with pytest.raises(NoReplicaAvailable):
        asyncio.run(work_micro_batch(stage, compute, NoNextStage(), StageInput(KEY, STEP, ids, prefix, labels, 4,
                                                                               tokens_parts(ids, labels, prefix)),
                                     lambda: pb.MicroBatchHeader()))
    compute.close()
    assert stage.log == [Action.FORWARD]
    with pytest.raises(Exception, match="no forward in flight"):  # the saved graph is gone
        stage.backward(KEY, STEP, torch.zeros(2, 24, 128))


def _chain(stages: int) -> list[LayerSlice]:
    """Run one micro-batch through `stages` in-process stages; return them (their commitments kept)."""
    ids, prefix, labels = _tokens()
    logs: list[list[Action]] = [[] for _ in range(stages)]
    specs = StageSpec.even_split(4, stages)
    links: list[InProcessLink | None] = [None] * (stages + 1)
    for k in reversed(range(1, stages)):
        links[k] = InProcessLink(RecordingStage(specs[k], logs[k]), links[k + 1], logs, k, labels)
    first, compute = RecordingStage(specs[0], logs[0]), ComputeQueue("stage-0")
    header = pb.MicroBatchHeader(ticket_id=KEY[0], step=STEP, attempt=KEY[1], prefix_lengths=prefix.tolist(),
                                 labels=labels_to_wire(labels), stage=1)
    asyncio.run(work_micro_batch(first, compute, links[1], StageInput(KEY, STEP, ids, prefix, labels, 4,
                                                                      tokens_parts(ids, labels, prefix)),
                                 lambda: header))
    for queue in [compute] + [link.compute for link in links[1:stages]]:
        queue.close()
    return [first] + [link.stage for link in links[1:stages]]


def _records(stages: list[LayerSlice]) -> list[Record]:
    return [Record(KEY[0], k, f"w{k}", s.commitments[KEY].commitment.input, s.commitments[KEY].links)
            for k, s in enumerate(stages)]


def test_every_stage_commits_to_what_it_sent_and_neighbours_agree():
    stages = _chain(3)
    kept = [s.commitments[KEY] for s in stages]
    assert [c.commitment.grad is None for c in kept] == [True, False, False]  # stage 0 sends no gradient back
    assert [c.links.sent is None for c in kept] == [False, False, True]  # the last sends its loss, no codes
    assert kept[2].commitment.output.numel == 1 and kept[1].commitment.output.numel == 2 * 24 * 128
    for c in kept:
        assert Commitment.from_bytes(c.commitment.to_bytes()) == c.commitment
        assert c.to_pb(KEY).ByteSize() < 1024
    assert kept[1].commitment.output.key == kept[1].links.sent[:16]  # keyed by the codes that carried it
    assert kept[1].commitment.input == kept[0].links.sent and kept[0].links.returned == kept[1].links.sent_back
    checks = check_chain(_records(stages))
    assert [(c.ticket, c.stage, c.upstream, c.downstream, c.agrees) for c in checks] == [
        (KEY[0], 0, "w0", ("w1",), True), (KEY[0], 1, "w1", ("w2",), True)]


def test_a_stage_whose_digest_disagrees_with_its_neighbour_is_named_with_it():
    records = _records(_chain(2))
    lied = Record(KEY[0], 1, "w1", bytes(32), records[1].links)  # claims other input codes than stage 0 sent
    (m,) = check_chain([records[0], lied])
    assert (m.ticket, m.stage, m.upstream, m.downstream, m.agrees) == (KEY[0], 0, "w0", ("w1",), False)
    assert "committed to sending codes" in m.detail
    back = Record(KEY[0], 1, "w1", records[1].input, Links(None, None, bytes(32)))  # another gradient sent back
    (m,) = check_chain([records[0], back])
    assert not m.agrees and "gradient codes" in m.detail and m.downstream == ("w1",)
