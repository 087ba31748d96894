"""What this worker's device can do: memory and a measured matmul rate."""

from __future__ import annotations

import platform
import time

import psutil
import torch


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.25, n: int = 1024) -> float:
    """Dense matmul rate at `dtype`, measured for about `seconds` (after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e12


def probe_device(device: str, dtype: torch.dtype = torch.float32, seconds: float = 0.25) -> dict:
    """{'kind', 'name', 'memory_bytes', 'matmul_tflops'} for a 'cpu' or 'cuda[:N]' device."""
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
    return {"kind": dev.type, "name": name, "memory_bytes": int(memory),
            "matmul_tflops": measure_matmul_tflops(dev, dtype, seconds)}
