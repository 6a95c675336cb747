"""DoRA's dm = Σₙ dY ⊙ P / ‖W′‖ compiled by Inductor on a CPU: the plain column sum against the row-block
sum of lora_rewrite/dora.py `token_sum` (R = rows per block; R0 = the plain sum), with the pass that
writes dY before it as in a backward graph. The numbers behind BENCHMARKS.md "DoRA's dm reduction".

    python scripts/bench_token_sum.py N O [ROUNDS]     e.g. python scripts/bench_token_sum.py 4096 1024

Interleaved rounds in one process, 2 threads; prints the median and minimum per form, in ms, and the
largest difference to the plain sum.
"""

import sys
import time

import torch


def main(argv) -> None:
    torch.set_num_threads(2)
    n, o = int(argv[0]), int(argv[1])
    rounds = int(argv[2]) if len(argv) > 2 else 100
    t, g, p, norm = torch.randn(()), torch.randn(n, o), torch.randn(n, o), torch.rand(o) + 1

    def form(rows):
        def dm(t, g, p):
            dy = t * g
            e = dy * p
            total = e.sum(0) if rows == 0 else e.reshape(n // rows, rows, o).sum(1).sum(0)
            return dy, total / norm
        return dm

    forms = {f"R{rows}": torch.compile(form(rows)) for rows in (0, 8, 16, 32, 64) if rows == 0 or n % rows == 0}
    reference = forms["R0"](t, g, p)[1]
    error = {name: float((f(t, g, p)[1] - reference).abs().max()) for name, f in forms.items()}
    times = {name: [] for name in forms}
    for _ in range(rounds):
        for name, f in forms.items():
            start = time.perf_counter()
            f(t, g, p)
            times[name].append(time.perf_counter() - start)
    print(f"N={n} o={o} torch {torch.__version__}, {rounds} rounds")
    for name, ts in times.items():
        ts = sorted(ts)
        print(f"{name:>4}: median {ts[len(ts) // 2] * 1e3:7.3f} ms, min {ts[0] * 1e3:7.3f} ms, "
              f"max |Δ| to R0 {error[name]:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
