"""The result table: the paper's columns (Implementation | Mean F-B loop, ms | Memory, MB | Speedup, % |
Memory saved, MB), with the median instead of the mean (the protocol's statistic; the mean is in the
CSV and JSON), its min–max spread, speedup over eager AND over stock Inductor, the ratio to the frozen
floor and the first-step (compile) time.

Speedup, % is the paper's: (t_ref − t) / t_ref · 100 on medians, so 13.6 means 13.6 % less time
than the reference. Memory saved, MB is the reference's memory minus this row's.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from typing import Sequence

from lora_rewrite.bench.measure import Measurement

MB = 2**20

COLUMNS = [
    ("implementation", "Implementation"),
    ("median_ms", "Median F-B loop, ms"),
    ("spread_ms", "min–max, ms"),
    ("memory_mb", "Memory, MB"),
    ("speedup_vs_eager_pct", "Speedup vs eager, %"),
    ("speedup_vs_inductor_pct", "Speedup vs inductor, %"),
    ("memory_saved_vs_eager_mb", "Memory saved vs eager, MB"),
    ("memory_saved_vs_inductor_mb", "Memory saved vs inductor, MB"),
    ("ratio_to_frozen", "× frozen"),
    ("first_step_s", "First step (compile), s"),
]
CSV_FIELDS = ["case", "implementation", "median_ms", "mean_ms", "min_ms", "max_ms", "samples",
              "memory_mb", "cuda_peak_mb", "saved_for_backward_mb", "speedup_vs_eager_pct",
              "speedup_vs_inductor_pct", "memory_saved_vs_eager_mb", "memory_saved_vs_inductor_mb",
              "ratio_to_frozen", "first_step_s", "sites_rewritten", "variants"]


@dataclass
class Row:
    implementation: str
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    samples: int
    memory_mb: float | None
    cuda_peak_mb: float | None
    saved_for_backward_mb: float | None
    first_step_s: float | None
    speedup_vs_eager_pct: float | None = None
    speedup_vs_inductor_pct: float | None = None
    memory_saved_vs_eager_mb: float | None = None
    memory_saved_vs_inductor_mb: float | None = None
    ratio_to_frozen: float | None = None
    sites_rewritten: int | None = None
    variants: dict = field(default_factory=dict)
    samples_ms: list = field(default_factory=list)
    page_faults_per_step: float | None = None   # median minor page faults of a timed step (CPU)

    @property
    def spread_ms(self) -> str:
        return f"{self.min_ms:.2f}–{self.max_ms:.2f}"


@dataclass
class Case:
    """One table: a model or a layer shape, with its settings and rows."""

    title: str
    settings: dict
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def _speedup(reference: Row | None, row: Row) -> float | None:
    if reference is None or reference is row:
        return None
    return (reference.median_ms - row.median_ms) / reference.median_ms * 100.0


def _saved(reference: Row | None, row: Row) -> float | None:
    if reference is None or reference is row or reference.memory_mb is None or row.memory_mb is None:
        return None
    return reference.memory_mb - row.memory_mb


def build_rows(measurements: Sequence[Measurement], *, cuda: bool) -> list[Row]:
    rows = []
    for m in measurements:
        peak = None if m.peak_bytes is None else m.peak_bytes / MB
        saved = None if m.saved_bytes is None else m.saved_bytes / MB
        rows.append(Row(
            implementation=m.name, median_ms=m.median_s * 1e3, mean_ms=m.mean_s * 1e3, min_ms=m.min_s * 1e3,
            max_ms=m.max_s * 1e3, samples=len(m.samples_s), memory_mb=peak if cuda else saved,
            cuda_peak_mb=peak, saved_for_backward_mb=saved, first_step_s=m.first_step_s,
            sites_rewritten=m.runlora_counters.get("sites_rewritten", 0) if m.runlora else None,
            variants=m.runlora_choices, samples_ms=[s * 1e3 for s in m.samples_s],
            page_faults_per_step=statistics.median(m.page_faults) if m.page_faults else None))
    by_name = {r.implementation: r for r in rows}
    eager, inductor, frozen = by_name.get("eager"), by_name.get("inductor"), by_name.get("frozen")
    for row in rows:
        row.speedup_vs_eager_pct = _speedup(eager, row)
        row.speedup_vs_inductor_pct = _speedup(inductor, row)
        row.memory_saved_vs_eager_mb = _saved(eager, row)
        row.memory_saved_vs_inductor_mb = _saved(inductor, row)
        if frozen is not None:
            row.ratio_to_frozen = row.median_ms / frozen.median_ms
    return rows


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(row: Row, key: str) -> str:
    if key == "spread_ms":
        return row.spread_ms
    if key == "ratio_to_frozen":
        return _fmt(row.ratio_to_frozen, 3)
    if key.startswith("memory"):
        return _fmt(getattr(row, key), 3)
    return _fmt(getattr(row, key))


def markdown_table(case: Case) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "| " + " | ".join(":---:" for _ in COLUMNS) + " |",
             f"| **{case.title}** |" + " |" * (len(COLUMNS) - 1)]
    for row in case.rows:
        lines.append("| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def variants_summary(case: Case) -> list[str]:
    lines = []
    for row in case.rows:
        if not row.variants:
            continue
        choices = ", ".join(f"{count}× {what}" for what, count in row.variants.get("choices", {}).items())
        skipped = row.variants.get("skipped") or {}
        skipped_text = "; untouched: " + ", ".join(f"{n}× {why}" for why, n in skipped.items()) if skipped else ""
        fused = row.variants.get("fused") or {}
        fused_text = (f"; sibling fusion: {fused['products']} products in {fused['groups']} group(s)"
                      if fused.get("groups") else "")
        lines.append(f"- {row.implementation}: {row.variants.get('sites', 0)} site(s) rewritten: "
                     f"{choices or 'none'}{fused_text}{skipped_text}")
    return lines


def markdown_report(cases: Sequence[Case], meta: dict) -> str:
    machine = meta["machine"]
    device = machine.get("gpu") or machine.get("cpu")
    out = [f"# runlora-bench — {device}", "",
           f"- command: `{meta['command']}`",
           f"- date: {machine['date']}; torch {machine['torch']}, transformers {machine.get('transformers')}, "
           f"peft {machine.get('peft')}; {machine['device']}, {machine['torch_threads']} thread(s) "
           f"of {machine['cores']} core(s)",
           f"- memory: {meta['memory_method']}",
           f"- timing: median of {meta['rounds']}+ interleaved rounds after {meta['warmup']} warm-up round(s); "
           f"spread is min–max; speedup = (t_ref − t) / t_ref on medians",
           ]
    out += [f"- {note}" for note in meta.get("notes", [])]
    for case in cases:
        out += ["", f"## {case.title}", ""]
        out += [f"- {note}" for note in case.notes]
        if case.notes:
            out.append("")
        out.append(markdown_table(case))
        summary = variants_summary(case)
        if summary:
            out += [""] + summary
    return "\n".join(out) + "\n"


def write_csv(path, cases: Sequence[Case]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for case in cases:
            for row in case.rows:
                record = {k: getattr(row, k) for k in CSV_FIELDS if k not in ("case", "variants")}
                record["case"] = case.title
                record["variants"] = json.dumps(row.variants.get("choices", {})) if row.variants else ""
                writer.writerow(record)


def to_json(cases: Sequence[Case], meta: dict) -> dict:
    return {
        **meta,
        "columns": {key: title for key, title in COLUMNS},
        "cases": [{"title": c.title, "settings": c.settings, "notes": c.notes,
                   "rows": [dict(vars(r)) for r in c.rows]} for c in cases],
    }


def write_json(path, cases: Sequence[Case], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump(to_json(cases, meta), f, indent=2, default=str)
        f.write("\n")


TWIN_SUFFIXES = ("-lora", "-base-dtype")   # rows timed on a twin of the model (lora_rewrite/bench/__main__.py)


def _runlora_row(rows: Sequence[Row], twin: str | None = None) -> Row | None:
    """The first runlora row on the model itself (`twin` None) or on the twin with that suffix."""
    for row in rows:
        if not row.implementation.startswith("runlora"):
            continue
        suffix = next((s for s in TWIN_SUFFIXES if row.implementation.endswith(s)), None)
        if suffix == twin:
            return row
    return None


def _overhead(row: Row | None) -> float | None:
    """`× frozen − 1`: what the adapters cost over the frozen floor of the same run."""
    return None if row is None or row.ratio_to_frozen is None else row.ratio_to_frozen - 1


def dora_verdicts(rows: Sequence[Row], *, tokens: int, out_features: Sequence[int], element_size: int) -> list[str]:
    """The DoRA targets, read off one case's rows (each overhead is `× frozen − 1` of the same run):
    runlora's DoRA overhead at most stock Inductor's plain-LoRA overhead, at most half of stock
    Inductor's DoRA overhead, within 0.05 of runlora's own plain-LoRA overhead; bytes saved for backward
    at most stock Inductor's plain-LoRA bytes plus one [N,o] per DoRA site."""
    by_name = {r.implementation: r for r in rows}
    runlora, runlora_lora = _runlora_row(rows), _runlora_row(rows, "-lora")
    if runlora is None or runlora.ratio_to_frozen is None:
        return []
    overhead = _overhead
    ours = overhead(runlora)
    lines = [f"DoRA: {runlora.implementation} overhead over frozen {ours:+.3f}"]
    checks = [("stock Inductor's plain-LoRA overhead", overhead(by_name.get("inductor-lora")), 1.0, 0.0),
              ("half of stock Inductor's DoRA overhead (one graph)", overhead(by_name.get("inductor")), 0.5, 0.0),
              ("runlora's own plain-LoRA overhead + 0.05", overhead(runlora_lora), 1.0, 0.05)]
    for what, reference, factor, slack in checks:
        if reference is not None:
            limit = factor * reference + slack
            lines.append(f"  vs {what}: limit {limit:+.3f} -> {'met' if ours <= limit else 'MISSED'}")
    lora_saved = by_name.get("inductor-lora")
    if lora_saved is not None and lora_saved.saved_for_backward_mb is not None and runlora.saved_for_backward_mb is not None:
        bound = lora_saved.saved_for_backward_mb + tokens * sum(out_features) * element_size / MB
        verdict = "met" if runlora.saved_for_backward_mb <= bound + 1e-6 else "MISSED"
        lines.append(f"  saved for backward {runlora.saved_for_backward_mb:.1f} MB: limit {bound:.1f} MB (stock plain "
                     f"LoRA {lora_saved.saved_for_backward_mb:.1f} MB + one [N,o] per site, {len(out_features)} "
                     f"sites) -> {verdict}")
    return lines


def qlora_verdicts(rows: Sequence[Row], *, tokens: int, adapters: Sequence[tuple[int, int]]) -> list[str]:
    """The QLoRA targets, read off one case's rows: runlora never slower than stock Inductor beyond the
    A/A noise (inductor-again against inductor); bytes saved for backward at most stock Inductor's minus
    one [N,r] (X·Aᵀ, never saved by runlora) per site. `adapters` is (r, element size of X·Aᵀ) per site."""
    by_name = {r.implementation: r for r in rows}
    inductor, again = by_name.get("inductor"), by_name.get("inductor-again")
    runlora = _runlora_row(rows)
    if runlora is None or inductor is None:
        return []
    slower = runlora.median_ms / inductor.median_ms - 1
    lines = [f"QLoRA: {runlora.implementation} vs stock Inductor {slower * 100:+.1f} %"]
    if again is not None:
        noise = abs(again.median_ms / inductor.median_ms - 1)
        verdict = "met" if slower <= noise else "MISSED"
        lines[0] += f", A/A noise {noise * 100:.1f} % -> never slower beyond it: {verdict}"
    if inductor.saved_for_backward_mb is not None and runlora.saved_for_backward_mb is not None:
        bound = inductor.saved_for_backward_mb - tokens * sum(r * size for r, size in adapters) / MB
        verdict = "met" if runlora.saved_for_backward_mb <= bound + 1e-6 else "MISSED"
        lines.append(f"  saved for backward {runlora.saved_for_backward_mb:.1f} MB: limit {bound:.1f} MB (stock "
                     f"Inductor {inductor.saved_for_backward_mb:.1f} MB − one [N,r] per site, {len(adapters)} "
                     f"sites) -> {verdict}")
    return lines


def fp32_adapter_verdicts(rows: Sequence[Row]) -> list[str]:
    """The price of fp32 adapters on a 16-bit model, read off one case's rows where the twin with adapters in
    the model's dtype ran beside it (`-base-dtype`): each implementation's overhead over the frozen floor with
    fp32 adapters and with base-dtype adapters, and whether runlora's fp32-adapter overhead is within 0.05 of
    its own base-dtype overhead (issue 32's stretch target)."""
    by_name = {r.implementation: r for r in rows}
    runlora, runlora_twin = _runlora_row(rows), _runlora_row(rows, "-base-dtype")
    pairs = [("stock Inductor", by_name.get("inductor"), by_name.get("inductor-base-dtype")),
             ("runlora", runlora, runlora_twin)]
    lines = []
    for who, fp32, twin in pairs:
        if _overhead(fp32) is not None and _overhead(twin) is not None:
            lines.append(f"fp32 adapters: {who} overhead over frozen {_overhead(fp32):+.3f}, with adapters in the "
                         f"model's dtype {_overhead(twin):+.3f}: the fp32 adapters cost {_overhead(fp32) - _overhead(twin):+.3f}")
    if _overhead(runlora) is not None and _overhead(runlora_twin) is not None:
        price = _overhead(runlora) - _overhead(runlora_twin)
        lines.append(f"  runlora's fp32 adapters within 0.05 of its base-dtype overhead: "
                     f"{'met' if price <= 0.05 else 'MISSED'}")
    return lines
