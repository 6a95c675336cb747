"""The "time" criterion: run each legal variant at the site's exact shape, dtype and device, and time it.

What is timed is the whole stage of the layer, as the rewritten graph computes it: the forward
variants include the base product X·Wᵀ (forward1 accumulates onto it, forward2 replaces it), the
backward variants compute dA, dB and — when X needs a gradient — all of dX. Inputs are random (never
zeros). Each variant gets warm-up calls, then the median of several timed calls; results are cached per
(variant, N, i, o, r, dX, dtype, device) for the life of the process, so a model with many identical
layers times each shape once. RUNLORA_TIME_REPEATS sets the number of timed calls (default 7).

This runs at compile time on the compiling device and allocates the site's activations once more
(X [N,i], dY [N,o] and the products); on a GPU that is nearly full, prefer "roofline".
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch

from lora_rewrite.hardware import synchronize
from lora_rewrite.variants import BackwardOperands, Dims, DxMode, EagerOps, ForwardOperands, Variant


def _stage_fn(variant: Variant, dims: Dims, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    n, i, o, r = int(dims.N), dims.i, dims.o, dims.r
    x, w, a, b = rand(n, i), rand(o, i) / i**0.5, rand(r, i) / i**0.5, rand(o, r) / r**0.5
    bias, w_io = rand(o), w.t()
    ops = EagerOps()
    if variant.stage == "forward":
        if variant.merges_weight:
            def run():
                return variant.compute(ops, ForwardOperands(x=x, a=a, b=b, s=2.0, w_io=w_io, bias=bias))
        else:
            def run():
                base = ops.addmm(bias, x, w_io)
                return variant.compute(ops, ForwardOperands(x=x, a=a, b=b, s=2.0, base=base))
        return run
    dy = rand(n, o)
    operands = BackwardOperands(dy=dy, x=x, a=a, b=b, s=2.0, w_io=w_io, dx=DxMode.TOTAL if dims.needs_dx else None)

    def run():
        return variant.compute(ops, operands)

    return run


@functools.lru_cache(maxsize=None)
def _measure(name: str, n: int, i: int, o: int, r: int, needs_dx: bool, dtype: torch.dtype,
             device_type: str, device_index: int | None, repeats: int) -> float:
    from lora_rewrite.variants import BY_NAME

    from lora_rewrite.compat import unset_fake_temporarily

    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    # This runs inside the compiler, where fake tensors are active: time real ones.
    with unset_fake_temporarily(), torch.no_grad():
        run = _stage_fn(BY_NAME[name], Dims(n, i, o, r, needs_dx), dtype, device)
        for _ in range(2):
            run()
        synchronize(device)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            synchronize(device)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measured_seconds(variant: Variant, dims: Dims, *, dtype=None, device=None, stage: str = "") -> float:
    device = torch.device(device if device is not None else "cpu")
    repeats = int(os.environ.get("RUNLORA_TIME_REPEATS", "7"))
    return _measure(variant.name, int(dims.N), dims.i, dims.o, dims.r, bool(dims.needs_dx),
                    dtype or torch.float32, device.type, device.index, repeats)
