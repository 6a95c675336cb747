"""The overhead table of docs/BENCHMARKS.md: runlora's and stock Inductor's overhead over the frozen floor.

    python scripts/overhead_table.py AFTER.json [AFTER2.json …] [--before BEFORE.json …] [--impl runlora-flops]

For every case (matched by title between the after and before files) it prints, from each run's own
frozen and inductor rows: inductor/frozen − 1, runlora/frozen − 1, their ratio (runlora's overhead as a
share of Inductor's), runlora's speedup over Inductor, the A/A noise of the run (inductor-again vs
inductor) and, with --before, the same for the before run. Then the geomean speedup over all cases.
"""

from __future__ import annotations

import argparse
import json
import math
import re

from lora_rewrite.variants import BY_NAME, Dims

CHOICE = re.compile(r"(forward\d)/(backward\d|-) \(i=(\d+) o=(\d+) r=(\d+) N=(\d+)")


def adapter_flop_share(row: dict) -> float | None:
    """The chosen variants' matmul FLOPs over the frozen layer's (forward X·Wᵀ and dX = dY·W, 4·N·i·o per
    site), minus 1: the floor runlora/frozen could reach if every product ran at the frozen rate."""
    ours = frozen = 0
    for key, count in ((row.get("variants") or {}).get("choices") or {}).items():
        m = CHOICE.match(key)
        if m is None or m.group(2) == "-":
            return None
        i, o, r, n = (int(g) for g in m.groups()[2:])
        d = Dims(n, i, o, r, True)
        ours += count * (BY_NAME[m.group(1)].flops(d) + BY_NAME[m.group(2)].flops(d))
        frozen += count * 4 * n * i * o
    return ours / frozen - 1 if frozen else None


def load_cases(paths: list[str]) -> dict[str, dict]:
    cases = {}
    for path in paths:
        with open(path) as f:
            for case in json.load(f)["cases"]:
                settings = case.get("settings", {})
                title = case["title"] + (f", dropout {settings['lora_dropout']:g}" if settings.get("lora_dropout") else "") \
                    + (", fp32 adapters" if settings.get("fp32_adapters") else "")
                cases[title] = {row["implementation"]: row for row in case["rows"]}
    return cases


def overheads(rows: dict, impl: str) -> dict | None:
    frozen, inductor, ours = rows.get("frozen"), rows.get("inductor"), rows.get(impl)
    if not (frozen and inductor and ours):
        return None
    f = frozen["median_ms"]
    again = rows.get("inductor-again")
    return {
        "inductor_overhead": inductor["median_ms"] / f - 1,
        "runlora_overhead": ours["median_ms"] / f - 1,
        "speedup": inductor["median_ms"] / ours["median_ms"],
        "aa": (again["median_ms"] / inductor["median_ms"] - 1) if again else None,
        "first_step_ratio": (ours["first_step_s"] / inductor["first_step_s"]
                             if ours.get("first_step_s") and inductor.get("first_step_s") else None),
        "flop_share": adapter_flop_share(ours),
    }


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f} %"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("after", nargs="+")
    parser.add_argument("--before", nargs="*", default=[])
    parser.add_argument("--impl", default="runlora-flops")
    args = parser.parse_args(argv)
    after, before = load_cases(args.after), load_cases(args.before)
    head = ["case", "Inductor overhead", "runlora overhead", "share of Inductor's", "speedup vs Inductor",
            "A/A", "adapter FLOP share", "runlora − share", "first step vs Inductor"]
    if before:
        head += ["before: Inductor overhead", "before: runlora overhead", "before: speedup"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    speedups = []
    for title, rows in after.items():
        now = overheads(rows, args.impl)
        if now is None:
            continue
        speedups.append(now["speedup"])
        share = now["runlora_overhead"] / now["inductor_overhead"] if now["inductor_overhead"] > 0 else None
        cells = [title, pct(now["inductor_overhead"]), pct(now["runlora_overhead"]),
                 "–" if share is None else f"{share:.2f}", f"{now['speedup']:.3f}×", pct(now["aa"]),
                 pct(now["flop_share"]),
                 "–" if now["flop_share"] is None else pct(now["runlora_overhead"] - now["flop_share"]),
                 "–" if now["first_step_ratio"] is None else f"{now['first_step_ratio']:.2f}×"]
        if before:
            old = overheads(before.get(title, {}), args.impl)
            cells += ["–", "–", "–"] if old is None else [pct(old["inductor_overhead"]), pct(old["runlora_overhead"]),
                                                         f"{old['speedup']:.3f}×"]
        print("| " + " | ".join(cells) + " |")
    if speedups:
        geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        print(f"\ngeomean speedup of {args.impl} over stock Inductor, {len(speedups)} case(s): {geomean:.3f}×")


if __name__ == "__main__":
    main()
