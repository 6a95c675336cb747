"""How much the time of one and the same product drifts on this machine (docs/BENCHMARKS.md, "The same table
with freed memory kept").

    python scripts/mm_drift.py [BLOCKS] [SECONDS]      e.g. 8 3

The fp32 product X·Wᵀ, X 4096 × 1024, W 1024 × 1024 (the 1024² layer's base product), into the same output
buffer back to back (no allocation, no page fault), in BLOCKS blocks of SECONDS each, 2 threads. Per block:
the median, min and max ms of a call, and the share of CPU time /proc/stat gives user, idle and steal.
"""

import sys
import time

import torch


def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(t) for t in f.readline().split()[1:]]


def main(argv) -> None:
    torch.set_num_threads(2)
    blocks = int(argv[0]) if argv else 8
    seconds = float(argv[1]) if len(argv) > 1 else 3.0
    x, w, out = torch.randn(4096, 1024), torch.randn(1024, 1024), torch.empty(4096, 1024)
    torch.mm(x, w.t(), out=out)
    for block in range(blocks):
        before, times, start = cpu_times(), [], time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            torch.mm(x, w.t(), out=out)
            times.append((time.perf_counter() - t) * 1e3)
        spent = [b - a for a, b in zip(before, cpu_times())]
        total = sum(spent) or 1
        times.sort()
        print(f"block {block}: {len(times)} calls, median {times[len(times) // 2]:.1f} ms, min {times[0]:.1f}, "
              f"max {times[-1]:.1f}; CPU user {spent[0] / total:.2f}, idle {spent[3] / total:.2f}, "
              f"steal {spent[7] / total:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
