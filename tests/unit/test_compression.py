"""Tensor codecs: round trips within their bounds, error feedback, corrupt payloads refused."""

from __future__ import annotations

import pytest
import torch

from gptjt_core.codec_sizes import bytes_per_value
from gptjt_core.compression import BLOCK, CODECS, LOSSY, CodecError, Encoded, decode, encode

QMAX = {"q8": 127, "q4": 7, "q3": 3}
QUANT = list(QMAX)


@pytest.fixture(scope="module")
def tiny_activations() -> dict[str, torch.Tensor]:
    """A tiny GPT-J's boundary activations (2 x 64 random tokens) and their gradients."""
    from bench.codec import boundary_tensors

    acts, grads = boundary_tensors(batch=2, seq=64)
    return {"activations": acts, "gradients": grads}


def block_bound(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-value error bound: half a quantization step of the value's block (the step is
    absmax / qmax rounded up to a bfloat16, under 2**-7 larger), plus float32 rounding in
    x * (1 / scale), a few ulps of absmax = qmax steps."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCK)
    step = blocks.abs().amax(dim=1, keepdim=True) / qmax * (1 + 2.0**-7)
    slack = 1 + 1e-5 + 4 * qmax * 2.0**-24
    return (step.expand_as(blocks).reshape(-1)[:flat.numel()] / 2 * slack + 1e-12).view(x.shape)


@pytest.mark.parametrize("shape", [(3, 5, 7), (BLOCK,), (BLOCK * 4 + 1,), (BLOCK * 2 + 13,), (9,), (1,), (),
                                   (0,), (2, 520, 128)])
@pytest.mark.parametrize("codec", QUANT)
def test_quantized_round_trip_within_half_a_step(codec, shape):
    x = torch.randn(shape) * 3
    x.reshape(-1)[0:1] *= 50  # an outlier: only its own block loses precision
    y = decode(encode(x, codec))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(((y - x).abs() <= block_bound(x, QMAX[codec])).all())


@pytest.mark.parametrize("codec", QUANT)
def test_every_code_at_every_position_survives_exactly(codec):
    """Blocks of integers in [-qmax, qmax] whose absmax is qmax have scale 1, so each code
    must come back exactly: a packing that drops or swaps codes shows up here. Over more
    than one encode chunk (1024 blocks) and a ragged last block."""
    q = QMAX[codec]
    torch.manual_seed(0)
    x = torch.randint(-q, q + 1, (BLOCK * 1100 + 21,)).float()
    x[::BLOCK] = q  # every block reaches qmax
    assert torch.equal(decode(encode(x, codec)), x)
    assert encode(x, codec).data == encode(x.clone(), codec).data  # deterministic


def _reference_codes(codes: list[int], codec: str) -> bytes:
    """The documented code layout, packed one value at a time."""
    if codec == "q8":
        return bytes(c & 0xFF for c in codes)
    if codec == "q4":
        return bytes((lo + 8) | (hi + 8) << 4 for lo, hi in zip(codes[::2], codes[1::2]))
    out = b""
    for i in range(0, len(codes), 8):
        word = sum((c + 3) << (3 * j) for j, c in enumerate(codes[i:i + 8]))
        out += word.to_bytes(3, "little")
    return out


@pytest.mark.parametrize("codec", QUANT)
def test_wire_layout(codec):
    q = QMAX[codec]
    torch.manual_seed(1)
    x = torch.randint(-q, q + 1, (3, BLOCK)).float()
    x[:, 0] = torch.tensor([q, -q, q])
    x[2] *= 0.5  # scale 0.5
    scales = torch.tensor([1.0, 1.0, 0.5])  # on the bfloat16 grid, so no rounding up
    codes = (x / scales[:, None]).int().reshape(-1).tolist()
    bf16_scales = bytes.fromhex("803f" "803f" "003f")  # bfloat16 1.0, 1.0, 0.5, little-endian
    assert encode(x, codec).data == _reference_codes(codes, codec) + bf16_scales


@pytest.mark.parametrize("codec", QUANT)
def test_scales_round_up_to_bfloat16_so_no_code_clips(codec):
    """A block whose absmax / qmax is not a bfloat16 gets the next bfloat16 above it: the
    largest value's code stays within qmax, and the block's values keep their bound."""
    q = QMAX[codec]
    x = torch.full((BLOCK,), 0.25)
    x[0] = q * 1.00390625 * 1.001  # absmax / qmax = 1.00490..., between bfloat16 1.0039 and 1.0078
    enc = encode(x, codec)
    stored = int.from_bytes(enc.data[-2:], "little")
    assert stored == 0x3F81  # bfloat16 1.0078125: rounded up, not to nearest (0x3F80 is 1.0)
    assert bool(((decode(enc) - x).abs() <= block_bound(x, q)).all())
    assert decode(enc)[0] <= x[0] + block_bound(x, q)[0]


def test_payloads_with_the_former_float32_scales_are_refused_by_size():
    """Until 2026-12-06 each block's scale was a float32 in front of the codes: such a payload
    from an older worker is 2 bytes a block too long, and says so instead of decoding wrongly."""
    x = torch.randn(300)
    for codec in QUANT:
        enc = encode(x, codec)
        blocks = -(-300 // BLOCK)
        former = b"\0" * (blocks * 4) + enc.data[:-blocks * 2]
        with pytest.raises(CodecError, match=f"must be {len(enc.data)} bytes, got {len(former)}.*too long"):
            decode(Encoded(former, enc.shape, enc.dtype, codec))


def test_tiny_blocks_go_as_zeros_and_empty_tensors_pass():
    x = torch.cat([torch.full((BLOCK,), 1e-39), torch.full((BLOCK,), 1e-30)])
    for codec in QUANT:
        y = decode(encode(x, codec))
        assert bool((y[:BLOCK] == 0).all()) and torch.allclose(y[BLOCK:], x[BLOCK:])
        assert decode(encode(torch.zeros(0, 5), codec)).shape == (0, 5)


def test_cast_codecs_and_sizes():
    x = torch.randn(4, 64, 128)
    assert torch.equal(decode(encode(x, "fp32")), x)
    assert torch.allclose(decode(encode(x, "fp16")), x, rtol=1e-3, atol=1e-3)
    fp16 = len(encode(x, "fp16").data)
    assert fp16 / len(encode(x, "q8").data) == pytest.approx(256 / 130)
    assert fp16 / len(encode(x, "q4").data) == pytest.approx(256 / 66)
    assert fp16 / len(encode(x, "q3").data) == pytest.approx(256 / 50)
    for codec in CODECS:
        assert bytes_per_value(codec) * x.numel() == len(encode(x, codec).data)
    assert set(CODECS) >= {"fp32", "fp16", "bf16", "q8", "q4", "q3"}
    assert LOSSY == {"q8", "q4", "q3"}


def test_zero_blocks_and_bf16_inputs():
    x = torch.zeros(BLOCK * 2)
    x[BLOCK:] = torch.linspace(-1, 1, BLOCK)
    assert torch.equal(decode(encode(x, "q8"))[:BLOCK], x[:BLOCK])
    b = torch.randn(10, 20, dtype=torch.bfloat16)
    assert decode(encode(b, "q8")).dtype == torch.bfloat16


def test_real_activations_and_gradients(tiny_activations):
    """Relative error on a tiny GPT-J's boundary activations and their gradients."""
    for name, t in tiny_activations.items():
        for codec, limit in (("q8", 0.01), ("q4", 0.15), ("q3", 0.35)):
            err = (decode(encode(t, codec)) - t).norm() / t.norm()
            assert err < limit, f"{codec} on {name}: relative error {err:.4f}"


@pytest.mark.parametrize("codec", [*QUANT, "fp16"])
def test_corrupt_payloads_are_refused(codec):
    enc = encode(torch.randn(300), codec)
    with pytest.raises(CodecError, match="truncated"):
        decode(Encoded(enc.data[:-1], enc.shape, enc.dtype, codec))
    with pytest.raises(CodecError, match="too long"):
        decode(Encoded(enc.data + b"\0", enc.shape, enc.dtype, codec))
    with pytest.raises(CodecError, match="unknown codec"):
        decode(Encoded(enc.data, enc.shape, enc.dtype, "q2"))


@pytest.mark.parametrize("codec", QUANT)
def test_bad_scales_and_non_finite_inputs_are_refused(codec):
    enc = encode(torch.randn(300), codec)  # 3 blocks: the scales are the last 6 bytes
    for bad_scale in (bytes.fromhex("c07f"), bytes.fromhex("807f"), bytes.fromhex("80bf")):  # NaN, Inf, -1.0
        with pytest.raises(CodecError, match="corrupt"):
            decode(Encoded(enc.data[:-4] + bad_scale + enc.data[-2:], enc.shape, enc.dtype, codec))
    with pytest.raises(CodecError, match="NaN/Inf"):
        encode(torch.tensor([1.0, float("inf")]), codec)
