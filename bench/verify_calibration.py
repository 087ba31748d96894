"""bench verify-calibration: how far honest recomputations of a stage disagree; the tolerance that follows.

A 3-stage tiny GPT-J (embedding + layer 0 | layers 1-2 | layer 3 + head), real bundled-data
micro-batches of 2 x 128 tokens through the UL2 transform. Each stage's wire inputs (token ids;
the hidden states it receives; the gradient that comes back to the middle stage) are fixed
once, in fp32 on 1 thread; then every stage recomputes its forward output and the gradient it
sends back (worker.stage.LayerSlice, the real stage code) under each setting: fp32 with 1, 2
and 4 threads, fp32 with each micro-batch split into single sequences, bf16 CPU autocast with
1 and 2 threads. For each comparison: the relative error the spot check sees (the sketch
estimate, gptjt_core.commitment) over micro-batches, max and p99, for outputs and gradients,
and the exact error beside it. The tolerance recommended is MARGIN x the worst honest error,
floored; lying commitments are then checked against an honest recomputation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from gptjt_core.commitment import (DEFAULT_KEY, TOLERANCE_FP32, TOLERANCE_REDUCED, Commitment, compare,
                                   input_digest)
from gptjt_core.sketching import sketch_tensor
from gptjt_core.model import StageSpec

DESCRIPTION = "honest stage disagreement (threads, bf16, grouping) -> spot-check tolerance; lies caught; sketch ms"

MICRO_BATCH = 2
SPECS = {"first": StageSpec(0, 1, embed=True), "middle": StageSpec(1, 3), "last": StageSpec(3, 4, head=True)}
OUTPUTS = ("first output", "middle output")
GRADIENTS = ("middle gradient", "last gradient")
MARGIN = 10  # the tolerance is MARGIN x the worst honest error measured ...
FLOOR_FP32 = 1e-3  # ... and never below these: kernels, devices and trained weights not measured here
FLOOR_REDUCED = 1e-2
# sqrt(the 1e-6 lower quantile of chi^2_64 / 64): the sketch keeps at least 0.609 of a dense
# difference's norm except with probability 1e-6, so noise above tolerance / 0.609 is caught.
NOISE_KEEP = 0.609


@dataclass(frozen=True)
class Setting:
    """How a stage recomputes: torch threads, precision (CPU autocast) and batch grouping."""

    threads: int
    precision: str  # 'fp32' or 'bf16'
    split: bool = False  # each sequence of a micro-batch alone, outputs concatenated


REFERENCE = Setting(1, "fp32")
BF16 = Setting(1, "bf16")
# name -> (the claimer's setting, the verifier's setting, whether the check is a reduced-precision one)
COMPARISONS = {
    "fp32_threads_1_vs_2": (REFERENCE, Setting(2, "fp32"), False),
    "fp32_threads_1_vs_4": (REFERENCE, Setting(4, "fp32"), False),
    "fp32_whole_vs_split_micro_batch": (REFERENCE, Setting(1, "fp32", split=True), False),
    "bf16_vs_fp32": (BF16, REFERENCE, True),
    "bf16_threads_1_vs_2": (BF16, Setting(2, "bf16"), True),
}


@dataclass
class WireInputs:
    """What each stage received for one micro-batch, fixed once for every recomputation."""

    ids: torch.Tensor  # (B, T) token ids: the first stage's input
    prefix: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B, T)
    hidden: torch.Tensor  # (B, T, D): the middle stage's input
    hidden_last: torch.Tensor  # (B, T, D): the last stage's input
    grad_back: torch.Tensor  # (B, T, D): the gradient the last stage sent to the middle one


def _run(precision: str):
    from gptjt_core.config import tiny_demo_config

    run = tiny_demo_config()
    run.train.micro_batch = MICRO_BATCH
    run.train.precision = precision
    return run


def _stages(precision: str) -> dict:
    from worker.stage import LayerSlice

    run = _run(precision)
    return {name: LayerSlice(run, spec) for name, spec in SPECS.items()}


def _one(stages: dict, w: WireInputs, rows: slice, key: int, timings: dict) -> dict[str, torch.Tensor]:
    """Every stage's output and returned gradient for the sequences `rows` of one micro-batch;
    appends the middle and last stages' forward + backward seconds to timings[name]."""
    k = (key, 0)
    prefix, labels = w.prefix[rows], w.labels[rows]
    # Fresh leaf tensors, as decoded from the wire: a stage marks its input requires_grad.
    hidden, hidden_last = w.hidden[rows].detach().clone(), w.hidden_last[rows].detach().clone()
    out0 = stages["first"].forward(k, 0, w.ids[rows], prefix)
    stages["first"].discard(k)
    started = time.perf_counter()
    out1 = stages["middle"].forward(k, 0, hidden, prefix)
    grad1 = stages["middle"].backward(k, 0, w.grad_back[rows])
    timings.setdefault("middle", []).append(time.perf_counter() - started)
    last, started = stages["last"], time.perf_counter()
    _, _, grad2 = last.forward_backward(k, 0, hidden_last, prefix, labels, last.run.train.global_batch)
    timings.setdefault("last", []).append(time.perf_counter() - started)
    return {"first output": out0, "middle output": out1, "middle gradient": grad1, "last gradient": grad2}


def recompute(setting: Setting, inputs: list[WireInputs], timings: dict | None = None) -> list[dict]:
    """Each stage's outputs and returned gradients for every micro-batch under `setting`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(setting.threads)
    timings = {} if timings is None else timings
    try:
        stages = _stages(setting.precision)
        results = []
        for i, w in enumerate(inputs):
            if not setting.split:
                results.append(_one(stages, w, slice(None), i, timings))
                continue
            parts = [_one(stages, w, slice(b, b + 1), i * MICRO_BATCH + b, timings) for b in range(MICRO_BATCH)]
            results.append({name: torch.cat([p[name] for p in parts]) for name in parts[0]})
        return [{name: t.detach().float() for name, t in r.items()} for r in results]
    finally:
        torch.set_num_threads(threads)


def wire_inputs(count: int) -> list[WireInputs]:
    """`count` real micro-batches and what each stage receives for them (fp32, 1 thread)."""
    from gptjt_core.batches import MicroBatchBuilder
    from gptjt_core.data import MicroBatchRef

    run = _run("fp32")
    builder = MicroBatchBuilder(run)
    batches = [builder.build(MicroBatchRef(0, i, i % run.data.num_shards, (i // run.data.num_shards) * MICRO_BATCH))
               for i in range(count)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = _stages("fp32")
        out = []
        for i, mb in enumerate(batches):
            k = (i, 0)
            hidden = stages["first"].forward(k, 0, mb.input_ids, mb.prefix_lengths)
            hidden_last = stages["middle"].forward(k, 0, hidden, mb.prefix_lengths)
            stages["middle"].discard(k)
            _, _, grad_back = stages["last"].forward_backward(k, 0, hidden_last, mb.prefix_lengths, mb.labels,
                                                              run.train.global_batch)
            out.append(WireInputs(mb.input_ids, mb.prefix_lengths, mb.labels, hidden.detach(), hidden_last.detach(),
                                  grad_back))
        return out
    finally:
        torch.set_num_threads(threads)


def _deep_stage(layers: int, width: int):
    """A stage of `layers` GPT-J blocks at `width` (tiny's head width, 32), GPT-J's seeded init."""
    from gptjt_core.flavours import flavour_config
    from gptjt_core.model import build_stage, gptj_config, random_init_tensor, stage_shapes

    config = gptj_config({**flavour_config("tiny"), "n_layer": layers, "n_embd": width, "n_inner": 4 * width,
                          "n_head": width // 32})
    spec = StageSpec(0, layers)
    state = {name: random_init_tensor(name, shape, 0, config.initializer_range)
             for name, shape in stage_shapes(config, spec).items()}
    return build_stage(config, spec, state).train()


def depth_sweep(widths: tuple[int, ...], depths: tuple[int, ...]) -> dict:
    """bf16-vs-fp32 relative error (exact, output and input gradient) of stages deeper and wider
    than the tiny pipeline's, fed hidden states at the embedding's scale (init std 0.02, as a
    first stage sees them), on 1 thread: how the honest error grows with what a stage holds."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for width in widths:
            x = torch.randn(MICRO_BATCH, 128, width, generator=gen) * 0.02
            grad_out = torch.randn(MICRO_BATCH, 128, width, generator=gen) * 1e-3
            for layers in depths:
                out[f"width_{width}_layers_{layers}"] = _bf16_error(_deep_stage(layers, width), x, grad_out)
    finally:
        torch.set_num_threads(threads)
    return out


def _bf16_error(stage, x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    from gptjt_core.precision import PrecisionPolicy

    got = {}
    for precision in ("fp32", "bf16"):
        leaf = x.clone().requires_grad_()
        with PrecisionPolicy(precision, "cpu").autocast():
            y = stage(leaf, torch.tensor([30, 64]))  # (B, T, width); UL2 prefixes of 30 and 64 tokens
        y.backward(grad_out.to(y.dtype))
        got[precision] = (y.detach().float(), leaf.grad.float())
    return {"output": _exact(got["fp32"][0], got["bf16"][0]), "gradient": _exact(got["fp32"][1], got["bf16"][1])}


def _p99(values: list[float]) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), 0.99))


def _exact(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(a.norm()), float(b.norm()))
    return float((a - b).norm()) / scale if scale else 0.0


def disagreement(claimed: list[dict], recomputed: list[dict]) -> dict:
    """Per kind (output, gradient): max and p99 over micro-batches of the sketch's estimate of
    the relative error, and the exact error's max."""
    out = {}
    for kind, names in (("output", OUTPUTS), ("gradient", GRADIENTS)):
        est, exact = [], []
        for c, r in zip(claimed, recomputed):
            for name in names:
                est.append(sketch_tensor(c[name]).rel_error(sketch_tensor(r[name])))
                exact.append(_exact(c[name], r[name]))
        out[kind] = {"max": max(est), "p99": _p99(est), "exact_max": max(exact)}
    return out


def lies(honest: list[torch.Tensor]) -> dict:
    """name -> function(micro-batch index) giving the output a liar claims for it."""
    gen = torch.Generator().manual_seed(0)

    def noise(y: torch.Tensor, rel: float) -> torch.Tensor:
        return y + torch.randn(y.shape, generator=gen) * (rel * float(y.norm()) / y.numel() ** 0.5)

    def one_token(y: torch.Tensor) -> torch.Tensor:
        z = y.clone()
        z[0, -1] = 0  # the last token of the first sequence zeroed
        return z

    return {
        "scale_1.05": lambda i: honest[i] * 1.05,
        "scale_1.01": lambda i: honest[i] * 1.01,
        "noise_1pct": lambda i: noise(honest[i], 0.01),
        "noise_0.2pct": lambda i: noise(honest[i], 0.002),
        "zeros": lambda i: torch.zeros_like(honest[i]),
        "stale_other_micro_batch": lambda i: honest[(i + 1) % len(honest)],
        "one_token_zeroed": lambda i: one_token(honest[i]),
    }


def detection(claims: list[dict], recomputed: list[dict], inputs: list[WireInputs], tolerance: float) -> dict:
    """Fraction of micro-batches on which each lie about the middle stage's output disagrees
    with an honest recomputation at `tolerance` (and how often the honest claim does: false
    positives)."""
    honest = [c["middle output"] for c in claims]
    digest = [input_digest(w.hidden.numpy().tobytes()) for w in inputs]
    verifier = [Commitment(digest[i], sketch_tensor(r["middle output"]), sketch_tensor(r["middle gradient"]))
                for i, r in enumerate(recomputed)]

    def caught(output_of) -> float:
        verdicts = [compare(Commitment(digest[i], sketch_tensor(output_of(i)), sketch_tensor(c["middle gradient"])),
                            verifier[i], tolerance) for i, c in enumerate(claims)]
        return sum(not v.agrees for v in verdicts) / len(verdicts)

    result = {"honest (false positives)": caught(lambda i: honest[i])}
    result.update({name: caught(lie) for name, lie in lies(honest).items()})
    return result


def sketch_ms(shape: tuple[int, ...], repeats: int, fresh_keys: bool = False) -> float:
    """Median ms to sketch one float32 tensor of `shape` on one CPU thread: under one key, as a
    stage with a fixed key does (its bucket index is cached), or under a new key each time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(shape)
        sketch_tensor(x)
        times = []
        for i in range(repeats):
            key = (1000 + i).to_bytes(16, "little") if fresh_keys else DEFAULT_KEY
            started = time.perf_counter()
            sketch_tensor(x, key)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000
    finally:
        torch.set_num_threads(threads)


def _recommend(comparisons: dict, sweep: dict, reduced: bool) -> tuple[float, float]:
    """(worst honest error of the fp32 or the reduced-precision checks, the tolerance from it)."""
    worst = max(c[kind]["max"] for name, c in comparisons.items() if COMPARISONS[name][2] == reduced
                for kind in ("output", "gradient"))
    if reduced:
        worst = max([worst] + [e for errors in sweep.values() for e in errors.values()])
    return worst, max(MARGIN * worst, FLOOR_REDUCED if reduced else FLOOR_FP32)


def settings(quick: bool) -> dict:
    return {"micro_batches": 4 if quick else 16, "micro_batch": MICRO_BATCH, "seq_len": 128, "stages": 3,
            "comparisons": sorted(COMPARISONS), "margin": MARGIN}


def run(quick: bool = False) -> dict:
    count = 4 if quick else 16
    inputs = wire_inputs(count)
    timings: dict[str, list[float]] = {}
    cache = {REFERENCE: recompute(REFERENCE, inputs, timings)}
    for claimer, verifier, _ in COMPARISONS.values():
        for setting in (claimer, verifier):
            if setting not in cache:
                cache[setting] = recompute(setting, inputs)
    comparisons = {name: disagreement(cache[c], cache[v]) for name, (c, v, _) in COMPARISONS.items()}
    sweep = depth_sweep((128,) if quick else (128, 512), (1, 4, 16) if quick else (1, 2, 4, 8, 16))
    worst_fp32, tol_fp32 = _recommend(comparisons, sweep, reduced=False)
    worst_reduced, tol_reduced = _recommend(comparisons, sweep, reduced=True)
    stale = [_exact(a["middle output"], b["middle output"]) for a, b in zip(cache[REFERENCE], cache[REFERENCE][1:])]
    tiny_ms = sketch_ms((MICRO_BATCH, 128, 128), 20)
    middle_ms, last_ms = (statistics.median(timings[name]) * 1000 for name in ("middle", "last"))
    commitment = Commitment(input_digest(b""), sketch_tensor(inputs[0].hidden), sketch_tensor(inputs[0].grad_back))
    return {
        "micro_batches": count, "micro_batch": MICRO_BATCH, "seq_len": 128, "flavour": "tiny", "device": "cpu",
        "comparisons": comparisons,
        "bf16_vs_fp32_by_stage_size": sweep,
        "worst_honest_fp32": worst_fp32, "worst_honest_reduced": worst_reduced,
        "recommended_tolerance_fp32": tol_fp32, "recommended_tolerance_reduced": tol_reduced,
        "tolerance_fp32_in_use": TOLERANCE_FP32, "tolerance_reduced_in_use": TOLERANCE_REDUCED,
        "tolerances_in_use_cover_measurement": TOLERANCE_FP32 >= tol_fp32 and TOLERANCE_REDUCED >= tol_reduced,
        "smallest_caught_scale_fp32": 1 / (1 - TOLERANCE_FP32),
        "smallest_caught_noise_fp32": TOLERANCE_FP32 / NOISE_KEEP,
        "smallest_caught_scale_reduced": 1 / (1 - TOLERANCE_REDUCED),
        "smallest_caught_noise_reduced": TOLERANCE_REDUCED / NOISE_KEEP,
        "stale_rel_error_min": min(stale),
        "caught_fp32_vs_fp32": detection(cache[REFERENCE], cache[Setting(2, "fp32")], inputs, TOLERANCE_FP32),
        "caught_bf16_vs_fp32": detection(cache[BF16], cache[REFERENCE], inputs, TOLERANCE_REDUCED),
        "commitment_bytes": commitment.size_bytes,
        "sketch_ms_2x128x128": tiny_ms,
        "sketch_ms_1x2048x4096": sketch_ms((1, 2048, 4096), 3 if quick else 7),
        "sketch_ms_2x128x128_new_key_each": sketch_ms((MICRO_BATCH, 128, 128), 5, fresh_keys=True),
        "sketch_ms_1x2048x4096_new_key_each": sketch_ms((1, 2048, 4096), 3, fresh_keys=True),
        "middle_stage_fwd_bwd_ms": middle_ms, "last_stage_fwd_bwd_ms": last_ms,
        # the middle stage sketches its output and its gradient; the pipeline's pace is its slowest stage's
        "sketch_overhead_pct_middle_stage": 100 * 2 * tiny_ms / middle_ms,
        "sketch_overhead_pct_tokens_per_s": 100 * (max(middle_ms + 2 * tiny_ms, last_ms + tiny_ms)
                                                   / max(middle_ms, last_ms) - 1),
    }
