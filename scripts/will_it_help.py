"""The README's "Will it help you?" matrix, from the raw results under docs/results/ (no benchmark runs).

    python scripts/will_it_help.py              # the matrix, as the README holds it
    python scripts/will_it_help.py --standing   # BENCHMARKS.md's current standing: every case of each row

Each row is a configuration people run; `SOURCES` names, for each, the raw `runlora-bench` results BENCHMARKS.md
holds as current — with glibc keeping freed memory (`--keep-freed-memory`) and with its default malloc — and
which of each file's implementations are stock Inductor and runlora on that configuration (a DoRA run's
`inductor-lora` / `runlora-flops-lora` are the same model with plain LoRA). Per case:

    speed    stock Inductor's median step / runlora's (× > 1: runlora is faster)
    noise    |1 − inductor-again / inductor|: the same model timed twice in the same rounds (the A/A)
    memory   runlora's bytes saved for backward / stock Inductor's, as a change
A row's verdict: "faster" where every kept-memory case is faster than its noise, "not faster" where none is,
"in some cases" otherwise (the default-malloc figure where no kept-memory run exists). tests/test_docs.py checks that the
README holds exactly this script's output.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu"
LORA = ("inductor", "runlora-flops")                       # stock Inductor, runlora
LORA_BESIDE_DORA = ("inductor-lora", "runlora-flops-lora")  # the plain-LoRA rows of a DoRA run


@dataclass(frozen=True)
class Row:
    name: str
    kept: tuple          # (file under docs/results/cpu, (stock impl, runlora impl)) with freed memory kept
    default: tuple       # the same with glibc's default malloc


SOURCES = (
    Row("fp32", kept=(("lowering_kept_1206/sq1024_n4096.json", LORA), ("lowering_kept_1206/sq1024_n1024_8192.json", LORA),
                      ("lowering_kept_1206/mlp_up_n4096.json", LORA), ("lowering_kept_1206/mlp_down_n4096.json", LORA),
                      ("dora_kept_1206/llama_60m_r16.json", LORA_BESIDE_DORA)),
        default=(("lowering_avx512/after_sq1024_n4096.json", LORA), ("lowering_avx512/after_sq1024_n1024_8192.json", LORA),
                 ("lowering_avx512/after_mlp_up_n4096.json", LORA), ("lowering_avx512/after_mlp_down_n4096.json", LORA),
                 ("lowering_avx512/after_llama_60m_r16.json", LORA), ("lowering_avx512/after_llama_130m_r16.json", LORA),
                 ("lowering_avx512/after_llama_60m_r128.json", LORA), ("lowering_avx512/after_llama_130m_r128.json", LORA))),
    Row("bf16 model, bf16 adapters (`autocast_adapter_dtype=False`)",
        kept=(("lora_kept_bf16_1206/sq1024_bf16_r41.json", LORA),),
        default=(("lowering_avx512/after_sq1024_bf16.json", LORA),)),
    Row("bf16 model, PEFT's default fp32 adapters",
        kept=(("lora_kept_bf16_1206/sq1024_bf16_fp32adapters_r41.json", LORA),    # the same case, three runs
              ("lora_kept_bf16_1206/sq1024_bf16_fp32adapters_r41_1.json", LORA),
              ("lora_kept_bf16_1206/sq1024_bf16_fp32adapters_r41_2.json", LORA),
              ("lora_kept_bf16_1206/llama_60m_bf16_fp32adapters_r16.json", LORA),
              ("lora_kept_bf16_1206/llama_130m_bf16_fp32adapters_r16.json", LORA)),
        default=(("lowering_avx512/after_sq1024_bf16_fp32adapters_r21.json", LORA),
                 ("lowering_avx512/after_llama_60m_bf16_fp32adapters_r16.json", LORA),
                 ("lowering_avx512/after_llama_130m_bf16_fp32adapters_r16.json", LORA))),
    Row("`torch.autocast` bf16 on an fp32 model (`Trainer(bf16=True)`)",
        kept=(("dora_narrow_base/autocast_sq1024_kept_total.json", LORA_BESIDE_DORA),
              ("dora_narrow_base/autocast_llama_60m_r16_kept_total.json", LORA_BESIDE_DORA)),
        default=(("dora_narrow_base/autocast_sq1024.json", LORA_BESIDE_DORA),
                 ("dora_narrow_base/autocast_llama_60m_r16.json", LORA_BESIDE_DORA))),
    Row("QLoRA, 4-bit base, fp32 compute",
        kept=(("qdora_kept_1206/llama_60m_r16.json", LORA_BESIDE_DORA),),
        default=(("qlora/sq1024.json", LORA), ("qlora/mlp_up.json", LORA), ("qlora/llama_60m_r16.json", LORA))),
    Row("the QLoRA recipe: 4-bit base, bf16 compute, fp32 adapters", kept=(),
        default=(("dora_narrow_base/qdora_recipe_llama_60m_r16.json", LORA_BESIDE_DORA),)),
    Row("DoRA, fp32",
        kept=(("dora_kept_1206/sq1024.json", LORA), ("dora_kept_1206/mlp_up.json", LORA),
              ("dora_kept_1206/mlp_down.json", LORA), ("dora_kept_1206/llama_60m_r16.json", LORA)),
        default=(("dora_1205/sq1024.json", LORA), ("dora_1205/mlp_up.json", LORA), ("dora_1205/mlp_down.json", LORA),
                 ("dora_1205/llama_60m_r16.json", LORA))),
    Row("QDoRA, fp32 compute", kept=(("qdora_kept_1206/llama_60m_r16.json", LORA),),
        default=(("qdora/sq1024.json", LORA), ("qdora/llama_60m_r16.json", LORA))),
    Row("QDoRA in the QLoRA recipe", kept=(), default=(("dora_narrow_base/qdora_recipe_llama_60m_r16.json", LORA),)),
    Row("`lora_dropout` 0.1, fp32", kept=(), default=(("lowering_avx512/after_sq1024_dropout.json", LORA),)),
    Row("gradient checkpointing, fp32", kept=(),
        default=(("dora_ckpt_1206/llama_60m_r16.json", LORA_BESIDE_DORA),)),
)


@dataclass(frozen=True)
class Case:
    title: str
    speed: float       # stock median / runlora median
    noise: float       # the run's A/A
    memory: float      # runlora saved / stock saved − 1
    date: str

    @property
    def faster(self) -> bool:
        return self.speed - 1 > self.noise


def read_cases(sources) -> list[Case]:
    cases = []
    for name, (stock, ours) in sources:
        data = json.loads((RESULTS / name).read_text())
        for case in data["cases"]:
            rows = {r["implementation"]: r for r in case["rows"]}
            if stock not in rows or ours not in rows:
                continue
            again = rows.get("inductor-again")
            noise = abs(1 - again["median_ms"] / rows["inductor"]["median_ms"]) if again else 0.0
            memory = rows[ours]["saved_for_backward_mb"] / rows[stock]["saved_for_backward_mb"] - 1
            cases.append(Case(case["title"], rows[stock]["median_ms"] / rows[ours]["median_ms"], noise, memory,
                              data["machine"]["date"][:10]))
    return cases


def speeds(cases: list[Case]) -> str:
    if not cases:
        return "not measured"
    low, high = min(c.speed for c in cases), max(c.speed for c in cases)
    span = f"{low:.2f}×" if round(low, 2) == round(high, 2) else f"{low:.2f}–{high:.2f}×"
    return f"{span} ({len(cases)})"


def verdict(cases: list[Case]) -> str:
    if all(c.faster for c in cases):
        return "faster"
    if not any(c.faster for c in cases):
        return "**not faster**"
    return "in some cases"


def memories(cases: list[Case]) -> str:
    low, high = min(c.memory for c in cases), max(c.memory for c in cases)
    return f"{100 * low:+.0f} %" if round(100 * low) == round(100 * high) else f"{100 * low:+.0f} to {100 * high:+.0f} %"


def matrix() -> list[str]:
    lines = ["| configuration | speed vs stock Inductor, freed memory kept | default malloc | verdict | "
             "saved for backward vs stock | measured |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in SOURCES:
        kept, default = read_cases(row.kept), read_cases(row.default)
        judged = kept or default
        dates = sorted({c.date for c in kept + default})
        when = dates[-1] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines.append(f"| {row.name} | {speeds(kept)} | {speeds(default)} | {verdict(judged)} | "
                     f"{memories(judged)} | {when} |")
    lines.append("| any configuration on a GPU | not measured | not measured | not measured | not measured | — |")
    return lines


def headline() -> str:
    """One number: the geomean speed over stock Inductor of the fp32 cases with freed memory kept."""
    cases = read_cases(SOURCES[0].kept)
    geomean = math.exp(sum(math.log(c.speed) for c in cases) / len(cases))
    return f"{geomean:.3f}× over stock Inductor in fp32 ({len(cases)} cases, freed memory kept)"


def in_short() -> str:
    """The matrix in one sentence: the headline, then the rows by verdict."""
    by_verdict: dict[str, list[str]] = {}
    for row in SOURCES:
        by_verdict.setdefault(verdict(read_cases(row.kept) or read_cases(row.default)).strip("*"), []).append(row.name)
    parts = [f"{label}: {'; '.join(by_verdict[key])}" for key, label in
             (("faster", "Faster in every case"), ("in some cases", "Faster in some cases"),
              ("not faster", "**Not faster in any case**"))
             if by_verdict.get(key)]
    return f"In short: **{headline()}**. {'. '.join(parts)}."


def commands(sources) -> list[str]:
    seen = []
    for name, _ in sources:
        command = json.loads((RESULTS / name).read_text())["command"]
        if command not in seen:
            seen.append(command)
    return seen


def standing() -> list[str]:
    """BENCHMARKS.md's current standing: per row of the matrix, every case with freed memory kept and with
    default malloc side by side, the raw files and the commands that wrote them."""
    lines = []
    for row in SOURCES:
        kept = {c.title: c for c in read_cases(row.kept)}
        default = {c.title: c for c in read_cases(row.default)}
        lines += [f"### {row.name}", "",
                  "| case | freed memory kept: speed (A/A) | default malloc: speed (A/A) | saved for backward vs stock |",
                  "| --- | --- | --- | --- |"]
        runs: dict[str, list] = {}
        for case in read_cases(row.kept) + read_cases(row.default):
            runs.setdefault(case.title, []).append(case)
        for title in runs:
            cell = lambda cases: ", ".join(f"{c.speed:.3f}× ({100 * c.noise:.1f} %)" for c in cases) or "—"  # noqa
            in_kept = [c for c in read_cases(row.kept) if c.title == title]
            in_default = [c for c in read_cases(row.default) if c.title == title]
            memory = (in_kept or in_default)[0].memory
            lines.append(f"| {title} | {cell(in_kept)} | {cell(in_default)} | {100 * memory:+.0f} % |")
        del kept, default
        raw = [f"`{name}`" for name, _ in row.kept] + [f"`{name}` (default malloc)" for name, _ in row.default]
        lines += ["", "Raw (under docs/results/cpu/): " + ", ".join(raw) + ".", "", "```bash"]
        lines += commands(row.kept + row.default) + ["```", ""]
    return lines


def readme_block() -> list[str]:
    """What the README holds between its markers: the matrix and the sentence under it."""
    return matrix() + ["", in_short()]


def main(argv: list[str]) -> None:
    print("\n".join(readme_block()))
    if "--standing" in argv:
        print("\n" + "\n".join(standing()))


if __name__ == "__main__":
    main(sys.argv[1:])
