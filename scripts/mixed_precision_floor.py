"""The floor for PEFT's fp32 adapters on a bf16 layer, from one machine's raw results (docs/BENCHMARKS.md).

    python scripts/mixed_precision_floor.py BF16_ADAPTERS.json FP32_ADAPTERS.json

Both files are runlora-bench layer runs of the same shape on the same machine: one with the adapters in bf16,
one with PEFT's default fp32 adapters (`--fp32-adapters`). An fp32 factor is, to fp32's 24 bits, the sum of
three bf16 parts, so the adapters' products at fp32 accuracy can run as bf16 GEMMs with p = 2 or 3 times the
rank's columns, reading X and dY in bf16 — *if* a GEMM with bf16 inputs and an fp32 result exists. For each
shape this prints:

- the adapters' FLOPs (forward1 + backward1 over the frozen layer's 4·N·i·o) and, p = 3, the split form's;
- the bf16 rate of the frozen step (4·N·i·o over its median), so what those FLOPs cost at that rate;
- the measured price of the 1-part products (runlora with bf16 adapters over the frozen floor): the split form
  reads the same bf16 bytes and does p times the FLOPs, so its price lies between 1 and p times that;
- the speedup over stock Inductor (fp32 adapters) that price range gives, beside the issue's target;
- whether this torch has such a GEMM on this machine's CPU (`torch.mm(..., out_dtype=torch.float32)`).
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from lora_rewrite.variants import BACKWARD1, FORWARD1, Dims

TITLE = re.compile(r"i=(\d+) o=(\d+) N=(\d+) .*r=(\d+)")
TARGET = {16: 1.10, 64: 1.05}   # issue 32: over stock Inductor, r = 16 and r = 64


def cases(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    out = {}
    for case in data["cases"]:
        i, o, n, r = map(int, TITLE.search(case["title"]).groups())
        out[(i, o, n, r)] = {row["implementation"]: row["median_ms"] for row in case["rows"]}
    return out


def cpu_has_wide_bf16_gemm() -> str:
    a = torch.ones(4, 8, dtype=torch.bfloat16)
    try:
        torch.mm(a, a.t(), out_dtype=torch.float32)
        return "yes"
    except (RuntimeError, NotImplementedError, TypeError) as error:
        return f"no ({str(error).splitlines()[0][:90]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bf16_adapters")
    parser.add_argument("fp32_adapters")
    parser.add_argument("--parts", type=int, default=3)
    args = parser.parse_args()
    half, full = cases(args.bf16_adapters), cases(args.fp32_adapters)
    print(f"torch {torch.__version__}: a bf16 × bf16 → fp32 GEMM on the CPU: {cpu_has_wide_bf16_gemm()}\n")
    print("| shape | adapter GFLOP (split ×{p}) | at the frozen step's bf16 rate, ms | frozen ms | stock, fp32 adapters, ms "
          "| runlora, fp32 adapters, ms | 1-part price (runlora, bf16 adapters − frozen), ms | split price range, ms "
          "| speedup over stock in that range | target |".format(p=args.parts))
    print("| --- " * 10 + "|")
    for key in sorted(set(half) & set(full)):
        i, o, n, r = key
        dims = Dims(N=n, i=i, o=o, r=r)
        frozen_flops = 4 * n * i * o
        adapter_flops = FORWARD1.flops(dims) + BACKWARD1.flops(dims) - frozen_flops
        frozen_ms = full[key]["frozen"]
        rate = frozen_flops / (frozen_ms / 1e3)
        one_part = half[key]["runlora-flops"] - half[key]["frozen"]
        low, high = one_part, args.parts * one_part
        stock = full[key]["inductor"]
        print(f"| i={i} o={o} N={n} r={r} | {adapter_flops / 1e9:.2f} ({args.parts * adapter_flops / 1e9:.2f}) "
              f"| {adapter_flops / rate * 1e3:.1f} ({args.parts * adapter_flops / rate * 1e3:.1f}) | {frozen_ms:.1f} "
              f"| {stock:.1f} | {full[key]['runlora-flops']:.1f} | {one_part:.1f} | {low:.1f} – {high:.1f} "
              f"| {stock / (frozen_ms + high):.3f}× – {stock / (frozen_ms + low):.3f}× | {TARGET.get(r, '')}× |")


if __name__ == "__main__":
    main()
