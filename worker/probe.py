"""What this worker's device can do: memory and a measured matmul rate at the run's dtype."""

from __future__ import annotations

import platform
import time

import psutil
import torch

# Square matmul side per device type: big enough to reach the device's steady rate
# (an H100 needs ~8192 to leave launch overhead behind), small enough for any card (3 x 128 MiB).
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
