"""fp16 and the merged weight W + s·B·A: the error and the speed behind the fp16 guard in
lora_rewrite/variants.py (`FP16_RANGE`), printed as one JSON line per case.

    .venv/bin/python scripts/fp16_merged_weight.py

For each case, the forward of one LoRA linear in fp16 two ways — factored (forward1, what eager PEFT
computes: X·Wᵀ + s·(X·Aᵀ)·Bᵀ) and merged (forward2: X·(W + s·B·A)ᵀ) — against float64: whether the
result is finite, its relative error (max-norm), and the median time of each (EagerOps, the same aten
calls the rewrite emits; on a CPU without fp16 arithmetic units these times say little about a GPU). The
FLOP share forward2 saves is printed beside them: the most the merge can win.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from lora_rewrite.variants import FORWARD1, FORWARD2, Dims, EagerOps, ForwardOperands

# name: (N, i, o, r, lora_alpha, std of W, std of A, std of B, std of X)
CASES = {
    # The never-worse issue's case: huge alpha, large adapter weights, small inputs. s·B·A overflows fp16.
    "overflow (alpha 8192, r 4, adapters ~20, x ~1e-4)": (64, 16, 24, 4, 8192, 0.25, 20.0, 20.0, 1e-4),
    # A trained adapter at PEFT's usual scale (alpha = 2r), layer 1024², N = 4096.
    "typical 1024², r 16, N 4096": (4096, 1024, 1024, 16, 32, 1024 ** -0.5, 1024 ** -0.5, 0.02, 1.0),
    "typical 1024², r 64, N 4096": (4096, 1024, 1024, 64, 128, 1024 ** -0.5, 1024 ** -0.5, 0.02, 1.0),
}
REPEATS = 7


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return float((value.double() - reference).abs().max() / reference.abs().max())


def median_seconds(fn) -> float:
    fn()
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run_case(name: str, n, i, o, r, alpha, w_std, a_std, b_std, x_std) -> dict:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, std: torch.randn(*shape, generator=g, dtype=torch.float64) * std  # noqa: E731
    x, w, a, b = rand(n, i, std=x_std), rand(o, i, std=w_std), rand(r, i, std=a_std), rand(o, r, std=b_std)
    s = alpha / r
    reference = x @ w.T + s * (x @ a.T) @ b.T
    h = {k: v.half() for k, v in dict(x=x, w=w, a=a, b=b).items()}
    ops = EagerOps()

    def factored():
        return FORWARD1.compute(ops, ForwardOperands(x=h["x"], a=h["a"], b=h["b"], s=s,
                                                     base=h["x"] @ h["w"].T)).y

    def merged():
        return FORWARD2.compute(ops, ForwardOperands(x=h["x"], a=h["a"], b=h["b"], s=s, w_io=h["w"].T)).y

    dims = Dims(n, i, o, r, needs_dx=False)
    row = {"case": name, "N": n, "i": i, "o": o, "r": r, "s": s,
           "flops_saved_by_merging": 1 - FORWARD2.flops(dims) / FORWARD1.flops(dims)}
    for label, fn in (("factored", factored), ("merged", merged)):
        y = fn()
        row[f"{label}_finite"] = bool(torch.isfinite(y).all())
        row[f"{label}_rel_error"] = relative_error(reference, y) if row[f"{label}_finite"] else None
        row[f"{label}_ms"] = median_seconds(fn) * 1e3
    merged_weight = h["w"].double() + s * h["b"].double() @ h["a"].double()
    row["max_abs_merged_weight"] = float(merged_weight.abs().max())
    return row


def main() -> int:
    torch.set_num_threads(torch.get_num_threads())
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0]}))
    for name, case in CASES.items():
        print(json.dumps(run_case(name, *case)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
