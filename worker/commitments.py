"""What a stage commits to per micro-batch: digests of the codes it received and sent, sketches of what it sent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptjt_core.chain import Links, codes_digest, codes_parts, int64_bytes
from gptjt_core.commitment import DEFAULT_K, K_CHOICES, KEY_BYTES, Commitment, input_digest
from gptjt_core.sketching import sketch_tensor
from gptjt_core.compression import Encoded
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import stage_pb2 as spb


@dataclass(frozen=True)
class Committed:
    """One micro-batch's commitment and link digests, as the stage reports them with its CONTRIBUTION."""

    commitment: Commitment
    links: Links

    def to_pb(self, key: tuple[int, int]) -> cpb.MicroBatchCommitment:
        return cpb.MicroBatchCommitment(ticket_id=key[0], attempt=key[1], commitment=self.commitment.to_bytes(),
                                        sent=self.links.sent or b"", returned=self.links.returned or b"",
                                        sent_back=self.links.sent_back or b"")


def tokens_parts(input_ids: torch.Tensor, labels: torch.Tensor, prefix_lengths: torch.Tensor) -> tuple[bytes, ...]:
    """Stage 0's input: the ticket's token ids, labels and prefix lengths (int64, little-endian)."""
    return tuple(int64_bytes(t.reshape(-1).tolist()) for t in (input_ids, labels, prefix_lengths))


def received_parts(header: spb.MicroBatchHeader, payload: bytes) -> tuple[bytes, ...]:
    """A stage > 0's input: the activation codes as they arrived, with the labels and prefix
    lengths that came with them (the same parts the sender's sent_digest hashes)."""
    m = header.activations
    return codes_parts(m.codec, m.dtype, m.shape, payload, header.labels, int64_bytes(header.prefix_lengths))


def sent_digest(header: spb.MicroBatchHeader, activations: Encoded) -> bytes:
    """Digest of a micro-batch sent down: its codes and the header fields the receiver digests."""
    return codes_digest(activations.codec, activations.dtype, activations.shape, activations.data, header.labels,
                        int64_bytes(header.prefix_lengths))


def grad_digest(grad: Encoded | None) -> bytes | None:
    return None if grad is None else codes_digest(grad.codec, grad.dtype, grad.shape, grad.data)


def commit(input_parts: tuple[bytes, ...], output: torch.Tensor, sent: bytes | None, returned: Encoded | None,
           grad: torch.Tensor | None, sent_grad: Encoded | None) -> Committed:
    """The commitment to one micro-batch (call on the compute thread: it reads device tensors).

    output: what the stage sent forward before the codec ((B, T, D); the last stage's loss
    share, a 1-value tensor); grad: the input gradient it sent back before the codec (None at
    stage 0). Each sketch is keyed by the digest of the codes that carried it (the last stage's
    loss, which travels in a reply header, by its input digest): as commitment.Sketch says, the
    key then exists only once the output does, so a liar cannot aim a lie at the sketch's blind
    spots without grinding keys."""
    digest = input_digest(*input_parts)
    sent_back = grad_digest(sent_grad)
    k = DEFAULT_K if output.numel() > 1 else K_CHOICES[0]  # 64 values of one scalar say nothing more than 16
    out_sketch = sketch_tensor(output, key=(sent or digest)[:KEY_BYTES], k=k)
    grad_sketch = sketch_tensor(grad, key=sent_back[:KEY_BYTES]) if grad is not None and sent_back else None
    return Committed(Commitment(digest, out_sketch, grad_sketch), Links(sent, grad_digest(returned), sent_back))
