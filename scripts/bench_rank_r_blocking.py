"""Would reading X and dY once for all of the backward's rank-r work pay off here? (issue 11, stretch)

The rank-r products of backward1/5 each read an N-row operand from memory: Z2 = X·Aᵀ and dA = Z1ᵀ·X
read X [N,i], dB = dYᵀ·Z2 reads dY [N,o]. A row-blocked computation reads each block of X and dY
once and reuses it from cache for all three:

    for each block of rows k:  Z2ₖ = Xₖ·Aᵀ,  dA += Z1ₖᵀ·Xₖ,  dB += dYₖᵀ·Z2ₖ

(the same FLOPs; dA and dB accumulated over K = N in blocks, i.e. split-K). This times the three
products as one pass over the block size, against the products as the rewrite emits them (every
product whole, direct and transposed), as plain eager torch.mm/addmm_ — an upper bound on what a
custom op doing this could gain, before any graph-break or dispatch cost. Median of
torch.utils.benchmark, one process, nothing else running. A dX-sized product (dY·W, what the step
spends most of its backward on) is printed beside it for scale.

    python scripts/bench_rank_r_blocking.py
"""

import torch
from torch.utils.benchmark import Timer

# (N, i, o, r): the layer cases with r ≤ 64 and N ≥ 4096
CASES = [(4096, 1024, 1024, 16), (8192, 1024, 1024, 16), (4096, 1024, 1024, 64), (4096, 1024, 2816, 64),
         (4096, 2816, 1024, 64)]
BLOCKS = (256, 512, 1024, 2048)


def median_ms(fn) -> float:
    return Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=1).median * 1e3


def whole(x, dy, z1, a, transposed=False):
    """Z2 = X·Aᵀ, dA = Z1ᵀ·X, dB = dYᵀ·Z2, each one product over all N rows."""  # 2N·r·(2i + o) FLOPs
    z2 = x @ a.t()
    if transposed:
        return (x.t() @ z1).t(), (z2.t() @ dy).t()
    return z1.t() @ x, dy.t() @ z2


def row_blocked(x, dy, z1, a, block):
    """The same three products block by block of rows, dA and dB accumulated."""  # the same FLOPs
    grad_a = x.new_zeros(a.shape)
    grad_b = x.new_zeros(dy.shape[1], a.shape[0])
    for start in range(0, x.shape[0], block):
        xk, dyk, z1k = x[start:start + block], dy[start:start + block], z1[start:start + block]
        grad_a.addmm_(z1k.t(), xk)
        grad_b.addmm_(dyk.t(), xk @ a.t())
    return grad_a, grad_b


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| N | i | o | r | dY·W, ms | whole, ms | whole transposed, ms | "
          + " | ".join(f"blocks of {b}, ms" for b in BLOCKS) + " | best blocked vs whole |")
    print("| --- " * (7 + len(BLOCKS) + 1) + "|")
    for n, i, o, r in CASES:
        x, dy, w = torch.randn(n, i), torch.randn(n, o), torch.randn(o, i)
        a, z1 = torch.randn(r, i), torch.randn(n, r)
        ref_a, ref_b = whole(x, dy, z1, a)
        for block in BLOCKS:   # the blocked sums are the same gradients
            got_a, got_b = row_blocked(x, dy, z1, a, block)
            for got, ref in ((got_a, ref_a), (got_b, ref_b)):   # fp32 sums in another order
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        base = median_ms(lambda: dy @ w)
        times = [median_ms(lambda: whole(x, dy, z1, a)), median_ms(lambda: whole(x, dy, z1, a, True))]
        unblocked = min(times)
        blocked = [median_ms(lambda b=b: row_blocked(x, dy, z1, a, b)) for b in BLOCKS]
        print(f"| {n} | {i} | {o} | {r} | {base:.1f} | " + " | ".join(f"{t:.2f}" for t in times + blocked)
              + f" | {min(blocked) / unblocked:.2f}× |")


if __name__ == "__main__":
    main()
