"""The roofline cost model: what one matrix product costs on a device, from measured ceilings.

    seconds(product) = max(FLOPs / peak_rate, bytes / bandwidth) + launch_overhead

A LoRA variant is a handful of products; at LoRA ranks the rank-sized ones ([N,i]·[i,r] and friends)
read a whole [N,i] or [N,o] operand to do 2·r FLOPs per element, so they are bandwidth-bound on every
current GPU and CPU, and a variant that reads X or dY once more can lose to one with more FLOPs. The
paper's FLOP criterion cannot see that; this one can.

The three ceilings are measured once per (device, dtype) in this process — a large square matmul, a
large device-to-device copy, and a tiny op — not taken from datasheets: a CPU's or a throttled GPU's
real numbers are what matter, and the measurement takes well under a second.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Ceilings:
    flops_per_s: float
    bytes_per_s: float
    launch_s: float


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """What a measurement on `device` depends on: the GPU's name, or the CPU's model and torch's thread
    count (a 2-thread and a 16-thread run of one CPU choose differently)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock interval covers it (CPU ops are synchronous).
    The one helper every timer of lora_rewrite uses (the time criterion, the ceilings, the benchmark)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def measure_ceilings(device_type: str, device_index: int | None, dtype: torch.dtype) -> Ceilings:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    gpu = device.type == "cuda"
    n = 4096 if gpu else 768
    from lora_rewrite.compat import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        mm_s = _best_time(lambda: torch.mm(a, b), device)
        elements = (64 if gpu else 8) * 2**20
        src = torch.randn(elements, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        copy_s = _best_time(lambda: dst.copy_(src), device)
        tiny = torch.randn(8, 8, device=device, dtype=dtype)
        launch_s = _best_time(lambda: torch.mm(tiny, tiny), device, repeats=20)
    element_size = torch.empty((), dtype=dtype).element_size()
    return Ceilings(flops_per_s=2 * n**3 / mm_s,
                    bytes_per_s=2 * elements * element_size / copy_s,
                    launch_s=launch_s)


def ceilings_for(device, dtype) -> Ceilings:
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype if dtype is not None else torch.float32
    return measure_ceilings(device.type, device.index, dtype)


def roofline_seconds(gemms: Sequence, *, dtype=None, device=None) -> float:
    """Σ over the products of max(compute time, memory time) + launch overhead."""
    c = ceilings_for(device, dtype)
    element_size = torch.empty((), dtype=dtype or torch.float32).element_size()
    return sum(max(float(g.flops()) / c.flops_per_s, float(g.bytes(element_size)) / c.bytes_per_s) + c.launch_s
               for g in gemms)
