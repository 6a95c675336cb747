"""The QLoRA table of docs/BENCHMARKS.md, from the raw JSON `runlora-bench --4bit` wrote.

    python scripts/qlora_table.py RUN.json [RUN2.json …]

One row per case: each implementation's overhead over the frozen 4-bit floor of the same run (× frozen − 1),
the A/A noise (inductor-again vs inductor), runlora's time against stock Inductor's and whether it is slower
beyond the A/A noise, and the bytes saved for backward against stock Inductor's minus one [N,r] (X·Aᵀ) per
site. Then how many cases met each.
"""

from __future__ import annotations

import json
import sys

IMPLS = ("eager", "inductor", "runlora-flops")


def overhead(by: dict, name: str):
    row = by.get(name)
    return None if row is None or row.get("ratio_to_frozen") is None else row["ratio_to_frozen"] - 1


def main(paths: list[str]) -> int:
    header = ["case"] + list(IMPLS) + ["A/A", "runlora vs inductor", "not slower beyond A/A",
                                       "saved MB: inductor", "runlora (limit)"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    met = {"time": 0, "bytes": 0}
    cases = 0
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for case in data["cases"]:
            by = {r["implementation"]: r for r in case["rows"]}
            cells = [case["title"]]
            for name in IMPLS:
                value = overhead(by, name)
                cells.append("-" if value is None else f"{value:+.3f}")
            inductor, again, ours = by["inductor"], by.get("inductor-again"), by["runlora-flops"]
            noise = abs(again["median_ms"] / inductor["median_ms"] - 1) if again else None
            slower = ours["median_ms"] / inductor["median_ms"] - 1
            cells.append("-" if noise is None else f"{noise * 100:.1f} %")
            cells.append(f"{slower * 100:+.1f} %")
            if noise is None:
                cells.append("-")
            else:
                ok = slower <= noise
                met["time"] += ok
                cells.append("yes" if ok else "no")
            note = [n for n in case["notes"] if "saved for backward" in n and "[N,r]" in n]
            cells.append(f"{inductor['saved_for_backward_mb']:.1f}")
            if note:
                text = note[0].strip()
                ok = text.endswith("met")
                met["bytes"] += ok
                limit = text.split("limit ")[1].split(" MB")[0]
                cells.append(f"{ours['saved_for_backward_mb']:.1f} ({limit}) {'yes' if ok else 'no'}")
            else:
                cells.append("-")
            cases += 1
            print("| " + " | ".join(cells) + " |")
    print()
    print(f"met in {cases} cases: not slower than stock Inductor beyond A/A {met['time']}, bytes {met['bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
