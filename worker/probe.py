"""What this worker's device can do: memory and a measured matmul rate at the run's dtype."""

from __future__ import annotations

import logging
import platform
import statistics
import time

import psutil
import torch

# Square matmul side per device type: big enough to reach the device's steady rate
# (an H100 needs ~8192 to leave launch overhead behind), small enough for any card (3 x 128 MiB).
log = logging.getLogger("gptjt.worker")

MATMUL_SIDE = {"cuda": 8192, "cpu": 1024}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.25, n: int | None = None) -> float:
    """Dense (n, n) @ (n, n) rate at `dtype` in TFLOP/s, measured for about `seconds` after one warm-up.

    CUDA launches are asynchronous: products are queued in batches and the clock is read only
    after a synchronize, so the figure is device time, not launch time."""
    n = n or MATMUL_SIDE.get(device.type, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    batch = 8 if device.type == "cuda" else 1
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(batch):
            a @ b
        sync()
        count += batch
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e12


def probe_device(device: str, dtype: torch.dtype = torch.float32, seconds: float = 0.25) -> dict:
    """{'kind', 'name', 'memory_bytes', 'matmul_tflops', 'dtype'} for a 'cpu' or 'cuda[:N]' device.

    memory_bytes is what is free now (CUDA) or available (CPU RAM): what the scheduler may fill."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        free, _total = torch.cuda.mem_get_info(dev)
        name, memory = torch.cuda.get_device_name(dev), free
    elif dev.type == "cpu":
        name, memory = platform.processor() or platform.machine(), psutil.virtual_memory().available
    else:
        raise RuntimeError(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda:N")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"probe dtype {dtype}: unsupported; use one of {sorted(DTYPE_NAMES.values())}")
    return {"kind": dev.type, "name": name, "memory_bytes": int(memory),
            "matmul_tflops": measure_matmul_tflops(dev, dtype, seconds), "dtype": DTYPE_NAMES[dtype]}


def peak_memory_bytes(device: str) -> int:
    """The torch allocator's peak on `device` since the last reset_peak_memory(): what a stage
    really needed, beside the memory model's prediction (bench gpu-swarm). 0 on CPU, where torch
    keeps no allocator statistics (RSS would count the interpreter and every library too)."""
    dev = torch.device(device)
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0


def reset_peak_memory(device: str) -> None:
    """Start peak_memory_bytes() afresh (when a stage is ready: loading and probing are not training)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def measure_block_tflops(config, device: str, precision, tokens: int, seq_len: int, seconds: float = 0.5) -> float:
    """The rate one block of the run's model reaches on this device: 6 x block parameters x
    tokens / (forward + backward seconds), at the run's micro-batch (tokens = micro-batch x
    seq_len) under the run's autocast. This is the figure the cost model divides by: unlike a
    square matmul it carries attention, normalisation and kernel efficiency (on an H100 a
    GPT-J 6B block at seq 2048 reaches about a third of the matmul peak).

    config: the run's GPTJConfig (one of its blocks is built, randomly initialised)."""
    import copy

    from gptjt_core.model import GPTJStage, StageSpec

    one = copy.deepcopy(config)
    one.n_layer = 1
    block = GPTJStage(one, StageSpec(0, 1)).to(torch.device(device))
    x, prefix = _hidden_batch(config, device, tokens, seq_len)

    def step():
        with precision.autocast():
            out = block(x, prefix)
        out.float().pow(2).mean().backward()

    return _rate(step, block, x.shape[0] * seq_len, device, seconds)


def measure_head_tflops(config, device: str, precision, tokens: int, seq_len: int, seconds: float = 0.5) -> float:
    """The same for what the last stage runs after its blocks: the final norm, the LM head and the
    UL2 loss over the vocabulary. Its matmul is one (d_model x vocab) product, but the softmax
    and cross-entropy over the vocabulary are memory-bound: on this 2-core CPU the tiny
    flavour's head reached about half a block's rate (0.85 s measured for the stage holding the
    last block and the head, 0.47 s priced at the block's rate), so the head is priced at its own."""
    from gptjt_core.model import GPTJStage, StageSpec
    from gptjt_core.ul2 import batch_loss

    head = GPTJStage(config, StageSpec(config.n_layer, config.n_layer, head=True)).to(torch.device(device))
    x, prefix = _hidden_batch(config, device, tokens, seq_len)
    labels = torch.randint(0, config.vocab_size, x.shape[:2], device=x.device)

    def step():
        with precision.autocast():
            logits = head(x, prefix)
        batch_loss(logits, labels, x.shape[0]).backward()

    return _rate(step, head, x.shape[0] * seq_len, device, seconds)


def _hidden_batch(config, device: str, tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random hidden states of one micro-batch (B, seq_len, d_model) and a half-length UL2 prefix (B,)."""
    batch = max(1, tokens // seq_len)
    dev = torch.device(device)
    x = torch.randn(batch, seq_len, config.n_embd, device=dev, requires_grad=True)
    return x, torch.full((batch,), seq_len // 2, device=dev, dtype=torch.long)


def _rate(step, module: torch.nn.Module, tokens: int, device: str, seconds: float) -> float:
    """6 x `module`'s parameters x `tokens` / the median seconds of `step` (forward + backward),
    timed for about `seconds` (at least 3 runs) after one warm-up, in TFLOP/s."""
    params = sum(p.numel() for p in module.parameters())
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    step()
    sync()
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 3:
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    # the median: a shared machine's hiccups would otherwise read as a slow device
    return 6 * params * tokens / statistics.median(times) / 1e12


def measure_at_run_dtype(run, device: str, simulated=None) -> dict:
    """The device figures the scheduler plans with (blocking, seconds): the matmul rate at the run's
    compute dtype, and the rate of one block of the run's own model at its micro-batch. run: a
    gptjt_core.config.RunConfig; simulated: a SimulatedDevice reports its own figures."""
    from gptjt_core.model import model_config_for
    from gptjt_core.precision import resolve_precision

    precision = resolve_precision(run.train.precision, device)
    if simulated is not None:  # paced by one formula for every parameter (worker/simulated_device.py)
        return {**simulated.device_info(precision.name), "block_tflops": simulated.tflops,
                "head_tflops": simulated.tflops}
    figures = probe_device(device, precision.compute_dtype)
    t = run.train
    config = model_config_for(run.model.source, run.model.attn_implementation)
    tokens = t.micro_batch * t.seq_len
    figures["block_tflops"] = measure_block_tflops(config, device, precision, tokens, t.seq_len)
    try:  # its logits are (micro-batch x seq_len x vocab): on a card a big stage fills, it may not fit
        figures["head_tflops"] = measure_head_tflops(config, device, precision, tokens, t.seq_len)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError included
        log.warning("could not measure the LM head's rate (%s); the scheduler prices the head at the block's", e)
        figures["head_tflops"] = 0.0
    log.info("measured %.4g TFLOP/s on one block of the run's model and %.4g on its head (matmul peak %.4g) at %s",
             figures["block_tflops"], figures["head_tflops"], figures["matmul_tflops"], precision.name)
    return figures


async def figures_for_the_plan(run, device: str, simulated, joined_with: dict) -> dict | None:
    """The device figures the scheduler should plan with, measured off the event loop while the
    stage loads; None if the probe failed (the join's fp32 figures stay: the plan is only less
    exact). With scheduler.placement 'even' nothing plans with them: the join's are confirmed as
    they are, and the CPU goes to loading the stage instead."""
    import asyncio

    if run.scheduler.placement != "cost-model":
        return dict(joined_with)
    try:
        return await asyncio.to_thread(measure_at_run_dtype, run, device, simulated)
    except (RuntimeError, ValueError) as e:
        log.warning("could not measure this device at the run's dtype (%s); the scheduler keeps the join's fp32 "
                    "figures", e)
        return None


class BusyRates:
    """Micro-batches per second and the busy share of the compute thread since the last call."""

    def __init__(self):
        self.t, self.busy, self.micro_batches = time.monotonic(), 0.0, 0

    def since_last(self, busy_seconds: float, micro_batches: int) -> dict:
        now = time.monotonic()
        dt = max(now - self.t, 1e-6)
        out = {"micro_batches_per_s": max(0, micro_batches - self.micro_batches) / dt,
               "busy_fraction": min(1.0, (busy_seconds - self.busy) / dt), "micro_batches": micro_batches}
        self.t, self.busy, self.micro_batches = now, busy_seconds, micro_batches
        return out
