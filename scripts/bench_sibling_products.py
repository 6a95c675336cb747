"""The products sibling fusion merges, in isolation: three X·Aₖᵀ against one X·[A₁;A₂;A₃]ᵀ, and three
Z1ₖᵀ·X against one [Z1₁,Z1₂,Z1₃]ᵀ·X, as plain eager torch.mm (median of torch.utils.benchmark).

    python scripts/bench_sibling_products.py
"""

import torch
from torch.utils.benchmark import Timer

CASES = [(4096, 1024, 16, torch.float32), (4096, 1024, 64, torch.float32), (4096, 1024, 16, torch.bfloat16),
         (1024, 512, 16, torch.float32)]


def median_ms(fn) -> float:
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1).median * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N | i | r | dtype | 3× X·Aₖᵀ, ms | X·[A₁;A₂;A₃]ᵀ, ms | 3× Z1ₖᵀ·X, ms | [Z1₁,Z1₂,Z1₃]ᵀ·X, ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, i, r, dtype in CASES:
        x = torch.randn(n, i, dtype=dtype)
        a = [torch.randn(r, i, dtype=dtype) for _ in range(3)]
        z1 = [torch.randn(n, r, dtype=dtype) for _ in range(3)]
        times = [median_ms(lambda: [x @ ak.t() for ak in a]),
                 median_ms(lambda: (x @ torch.cat(a).t()).split(r, 1)),
                 median_ms(lambda: [zk.t() @ x for zk in z1]),
                 median_ms(lambda: (torch.cat(z1, 1).t() @ x).split(r, 0))]
        print(f"| {n} | {i} | {r} | {str(dtype).removeprefix('torch.')} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


if __name__ == "__main__":
    main()
