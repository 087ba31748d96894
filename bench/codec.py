"""bench codec: bytes per micro-batch across a stage boundary with each codec, and codec speed.

activation_bytes_ratio_vs_fp16: (forward + backward bytes with fp16) / (the same with the
chosen pair), per micro-batch per boundary. Relative errors are measured on a tiny GPT-J's
real boundary activations and their gradients. Speed: encode and decode of one GPT-J 6B
activation (1 x 2048 x 4096 = 8.4M float32 values) on one core, as GB/s of float32 input,
median of several runs.
"""

from __future__ import annotations

import statistics
import time

import torch

from gptjt_core.compression import decode, encode

DESCRIPTION = "activation+gradient bytes vs fp16 per boundary; q8/q4/q3 encode/decode GB/s on one core"

PAIRS = {"q4/q8": ("q4", "q8"), "q4/q4": ("q4", "q4"), "q8/q8": ("q8", "q8"), "q3/q3": ("q3", "q3"),
         "q4/q3": ("q4", "q3")}
SPEED_CODECS = ("q8", "q4", "q3")
# What workers switch a slow link to in `gptjt bench link` (its loss gap shows q3 stays on the curve).
CHOSEN = "q3/q3"


def boundary_tensors(batch: int = 4, seq: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, T, D) hidden states a 2-stage tiny GPT-J sends forward at its boundary for random
    tokens, and the loss gradient that comes back."""
    from gptjt_core.model import StageSpec, load_stage
    from gptjt_core.ul2 import batch_loss

    torch.manual_seed(0)
    first = load_stage("random:tiny:0", StageSpec(0, 2, embed=True))
    last = load_stage("random:tiny:0", StageSpec(2, 4, head=True))
    ids = torch.randint(0, 50000, (batch, seq))
    prefix = torch.zeros(batch, dtype=torch.long)
    hidden = first(ids, prefix).detach().requires_grad_()
    batch_loss(last(hidden, prefix), ids, batch).backward()
    return hidden.detach(), hidden.grad.detach()


def _rel_err(t: torch.Tensor, codec: str) -> float:
    return float((decode(encode(t, codec)) - t).norm() / t.norm())


def _gbps(fn, nbytes: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def settings(quick: bool) -> dict:
    return {"chosen": CHOSEN, "pairs": sorted(PAIRS), "boundary_tokens": "4 x 128 (tiny GPT-J)",
            "speed_tensor": [1, 2048, 4096], "speed_threads": 1, "speed_repeats": 3 if quick else 7}


def run(quick: bool = False) -> dict:
    acts, grads = boundary_tensors()
    fp16 = len(encode(acts, "fp16").data) + len(encode(grads, "fp16").data)
    result: dict = {"chosen": CHOSEN}
    for name, (fwd, bwd) in PAIRS.items():
        size = len(encode(acts, fwd).data) + len(encode(grads, bwd).data)
        key = name.replace("/", "_")
        result[f"activation_bytes_ratio_vs_fp16_{key}"] = fp16 / size
        result[f"activation_rel_err_{key}"] = _rel_err(acts, fwd)
        result[f"gradient_rel_err_{key}"] = _rel_err(grads, bwd)
    result["activation_bytes_ratio_vs_fp16"] = result[f"activation_bytes_ratio_vs_fp16_{CHOSEN.replace('/', '_')}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(1, 2048, 4096)
        repeats = 3 if quick else 7
        for codec in SPEED_CODECS:
            enc = encode(x, codec)
            result[f"encode_gbps_{codec}"] = _gbps(lambda c=codec: encode(x, c), x.numel() * 4, repeats)
            result[f"decode_gbps_{codec}"] = _gbps(lambda e=enc: decode(e), x.numel() * 4, repeats)
    finally:
        torch.set_num_threads(threads)
    result["encode_gbps"] = min(result[f"encode_gbps_{codec}"] for codec in SPEED_CODECS)
    result["decode_gbps"] = min(result[f"decode_gbps_{codec}"] for codec in SPEED_CODECS)
    return result
