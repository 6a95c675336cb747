"""The DoRA table of docs/BENCHMARKS.md, from the raw JSON `runlora-bench --dora` wrote.

    python scripts/dora_table.py RUN.json [RUN2.json …]

One row per case: each implementation's overhead over the frozen floor of the same run (× frozen − 1),
the A/A noise (inductor-again vs inductor), runlora's DoRA overhead against the issue's three limits
(stock Inductor's plain-LoRA overhead; half of stock Inductor's DoRA overhead with one graph; runlora's own
plain-LoRA overhead + 0.05) and the bytes saved for backward against stock Inductor's plain LoRA plus one
[N,o] per DoRA site. Then how many cases met each.
"""

from __future__ import annotations

import json
import sys

IMPLS = ("eager", "inductor-breaks", "inductor", "runlora-flops", "inductor-lora", "runlora-flops-lora")


def rows(case: dict) -> dict:
    return {r["implementation"]: r for r in case["rows"]}


def overhead(by: dict, name: str):
    row = by.get(name)
    return None if row is None or row.get("ratio_to_frozen") is None else row["ratio_to_frozen"] - 1


def main(paths: list[str]) -> int:
    header = ["case"] + [f"{n}" for n in IMPLS] + ["A/A", "≤ stock LoRA", "≤ ½ stock DoRA", "≤ runlora LoRA + 0.05",
                                                 "saved MB (limit)"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    met = {"lora": 0, "half": 0, "own": 0, "bytes": 0}
    cases = 0
    for path in paths:
        data = json.load(open(path))
        for case in data["cases"]:
            by = rows(case)
            cells = [case["title"]]
            for name in IMPLS:
                value = overhead(by, name)
                cells.append("-" if value is None else f"{value:+.3f}")
            aa = None
            if "inductor" in by and "inductor-again" in by:
                aa = by["inductor-again"]["median_ms"] / by["inductor"]["median_ms"] - 1
            cells.append("-" if aa is None else f"{aa * 100:+.1f} %")
            ours = overhead(by, "runlora-flops")
            limits = [("lora", overhead(by, "inductor-lora"), 1.0, 0.0), ("half", overhead(by, "inductor"), 0.5, 0.0),
                      ("own", overhead(by, "runlora-flops-lora"), 1.0, 0.05)]
            for key, reference, factor, slack in limits:
                if ours is None or reference is None:
                    cells.append("-")
                    continue
                limit = factor * reference + slack
                ok = ours <= limit
                met[key] += ok
                cells.append(f"{'yes' if ok else 'no'} ({limit:+.3f})")
            bound_note = [n for n in case["notes"] if "saved for backward" in n]
            if bound_note:
                text = bound_note[0].strip()
                ok = text.endswith("met")
                met["bytes"] += ok
                saved = by["runlora-flops"]["saved_for_backward_mb"]
                limit = text.split("limit ")[1].split(" MB")[0]
                cells.append(f"{saved:.1f} ({limit}) {'yes' if ok else 'no'}")
            else:
                cells.append("-")
            cases += 1
            print("| " + " | ".join(cells) + " |")
    print()
    print(f"met in {cases} cases: ≤ stock LoRA {met['lora']}, ≤ ½ stock DoRA {met['half']}, "
          f"≤ runlora LoRA + 0.05 {met['own']}, bytes {met['bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
