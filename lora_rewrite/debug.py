"""The one home of runlora's debug output: logger, counters, per-graph reports, dumps.

- Logger `lora_rewrite` (so `TORCH_LOGS="+lora_rewrite"` shows it, with the compile id). Every graph
  logs one DEBUG line per site (what matched, what was chosen and why) and one per skipped chain.
  With `options={"debug": True}` (or RUNLORA_DEBUG=1) the whole report table is logged at INFO and a
  stderr handler is attached if nothing else shows the logger's records.
- Counters in `torch._dynamo.utils.counters["runlora"]`: graphs, sites_found, sites_rewritten,
  backward_rewritten, sites_skipped, chose_<variant> per chosen variant, sibling_groups_fused,
  sibling_products_fused, casts_merged (casts the rewrite repeated, merged with the graph's own), sites_failed
  and graphs_failed (exceptions runlora contained: the site, or
  the whole graph, left as stock Inductor compiles it; lora_rewrite/containment.py), and
  graphs_from_cache (graphs served from the compile cache, counted in the others as they were when
  compiled).
- `GraphReport` / `SiteReport` / `SkipReport`: what `lora_rewrite.explain` returns, printable as a
  table and convertible to plain dicts / JSON.

On a compile-cache hit the pass does not run: the backend publishes the report the pass stored when
it compiled the graph, marked `served_from_cache` (lora_rewrite/report_cache.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from lora_rewrite import compat
from lora_rewrite.variants import Dims

if TYPE_CHECKING:
    from lora_rewrite.passes.plan import Plan
    from lora_rewrite.passes.site import Site

log = logging.getLogger("lora_rewrite")

_collectors: list[list["GraphReport"]] = []


@dataclass
class SiteReport:
    module: str
    adapter: str | None
    N: Any                      # an int, or the symbolic expression as a string
    N_used: int | None          # the number the choice was made for (the size hint when N is symbolic)
    i: int
    o: int
    r: int
    scale: Any
    dropout: bool
    dtype: str
    needs_dx: bool
    dx_mode: str | None         # "total", "lora" or None (no input gradient)
    forward: str
    backward: str | None        # None: the backward was not rewritten (see notes)
    criterion: str
    forward_costs: dict = field(default_factory=dict)
    backward_costs: dict = field(default_factory=dict)
    cost_unit: str = "FLOPs"
    flops_before: int | None = None
    flops_after: int | None = None
    saved_bytes_avoided: int | None = None   # bytes of X·Aᵀ no longer saved for backward
    notes: list = field(default_factory=list)
    module_key: str | None = None            # Dynamo's key of the module (its id): explain() resolves it
    forms: dict = field(default_factory=dict)         # {role: form} (lora_rewrite/forms.py); unnamed: default
    form_seconds: dict = field(default_factory=dict)  # {role: {form: measured seconds}}
    forms_source: str = "direct"                      # measured [(kept on disk) / : nothing to choose] / direct / forced
    kind: str = "lora"                                # the site's kind (passes/kinds.py): "lora", "dora", …

    def forms_text(self) -> str:
        """The forms that differ from each role's default, e.g. "dB transposed, Z1_in_dX folded"."""
        from lora_rewrite.forms import ROLE_BY_NAME

        changed = [f"{role} {form}" for role, form in self.forms.items()
                   if role in ROLE_BY_NAME and form != ROLE_BY_NAME[role].forms[0]]
        return ", ".join(changed) if changed else "all default (direct, separate)"

    def measured_forms_text(self) -> str:
        """Every measured candidate, "role: form 1.23 ms* / other 2.34 ms" (* = chosen)."""
        parts = []
        for role, times in self.form_seconds.items():
            chosen = self.forms.get(role)
            cells = [f"{form} {seconds * 1e3:.3g} ms{'*' if form == chosen else ''}" for form, seconds in times.items()]
            parts.append(f"{role}: {' / '.join(cells)}")
        return "; ".join(parts)

    def line(self) -> str:
        bwd = self.backward or "-"
        flops = ""
        if self.flops_before is not None and self.flops_after is not None:
            flops = f" flops {self.flops_before:,} -> {self.flops_after:,}"
        saved = f" unsaved {self.saved_bytes_avoided:,}B" if self.saved_bytes_avoided else ""
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (f"{self.module}: N={self.N} i={self.i} o={self.o} r={self.r} s={self.scale} "
                f"dropout={'yes' if self.dropout else 'no'} {self.dtype} -> {self.forward}/{bwd}"
                f"{flops}{saved} forms {self.forms_source}: {self.forms_text()}{notes}")


def site_report(site: Site, plan: Plan, criterion: str) -> SiteReport:
    """The report of one rewritten site: its shape, the plan, and the FLOPs and saved bytes against
    what stock Inductor runs (the site's kind says what that is: `SiteKind.before_gemms`)."""
    dims, n_used = site.dims, plan.n_used
    flops_before = flops_after = saved = None
    if n_used is not None:
        report_dims = Dims(n_used, dims.i, dims.o, dims.r, dims.needs_dx)
        trains = site.backward is not None
        flops_before = sum(g.flops() for g in site.kind.before_gemms(report_dims, site.facts, trains))
        flops_after = plan.forward.variant.flops(report_dims)
        if trains:
            flops_after += plan.backward.variant.flops(report_dims) if plan.backward else 0
            saved = n_used * dims.r * site.forward.x.meta["val"].element_size()
    n, scale = dims.N, site.forward.scale
    dx_mode = site.backward.dx_mode if site.backward is not None and plan.backward else None
    return SiteReport(
        module=site.provenance.path, adapter=site.provenance.adapter,
        N=n if isinstance(n, int) else compat.sym_expr(n), N_used=n_used,
        i=dims.i, o=dims.o, r=dims.r,
        scale=scale if isinstance(scale, (int, float)) else f"tensor {scale.name}",
        dropout=site.facts.dropout, dtype=str(site.forward.dtype).replace("torch.", ""), needs_dx=dims.needs_dx,
        dx_mode=dx_mode.value if dx_mode is not None else None,
        forward=plan.forward.variant.name, backward=plan.backward.variant.name if plan.backward else None,
        criterion=criterion, forward_costs=dict(plan.forward.costs),
        backward_costs=dict(plan.backward.costs) if plan.backward else {},
        cost_unit=plan.forward.unit.value, flops_before=flops_before, flops_after=flops_after,
        saved_bytes_avoided=saved, notes=list(plan.notes), module_key=site.provenance.key,
        forms=dict(plan.forms), form_seconds={k: dict(v) for k, v in plan.form_seconds.items()},
        forms_source=plan.forms_source, kind=site.kind.name,
    )


@dataclass
class SkipReport:
    module: str
    reason: str
    module_key: str | None = None

    def line(self) -> str:
        return f"{self.module}: not rewritten: {self.reason}"


@dataclass
class FusionReport:
    kind: str                   # which product: "X·Aᵀ" or "dA = Z1ᵀ·X"
    modules: list               # the sibling sites, in graph order
    ranks: list

    def line(self) -> str:
        return (f"fused {self.kind} of {', '.join(self.modules)} (r {'+'.join(map(str, self.ranks))}): "
                f"their shared input is read once instead of {len(self.modules)} times")


@dataclass
class FailureReport:
    """An exception runlora contained (lora_rewrite/containment.py): what it left as stock Inductor
    compiles it — one site (`module`), or the whole graph (`module` is GRAPH) — and why."""

    module: str
    stage: str                  # containment.Stage's value: "matching", "sibling fusion", …
    error: str                  # "TypeName: message"
    module_key: str | None = None
    note: str = ""              # what was done instead, when not simply "left untouched"

    def line(self) -> str:
        what = "the whole graph" if self.module == GRAPH else self.module
        instead = self.note or "left as stock Inductor compiles it"
        return f"{what}: {self.stage} failed ({self.error}); {instead}"


GRAPH = "<graph>"


@dataclass
class GraphReport:
    compile_id: str | None
    kind: str                   # "joint" (training) or "inference"
    criterion: str
    sites: list[SiteReport] = field(default_factory=list)
    skipped: list[SkipReport] = field(default_factory=list)
    fused: list[FusionReport] = field(default_factory=list)
    served_from_cache: bool = False   # True: a compile-cache hit; the pass ran when the graph was compiled
    failures: list[FailureReport] = field(default_factory=list)  # contained exceptions (site or graph)
    casts_merged: int = 0   # casts the rewrite repeated, merged with the graph's own (passes/fx.py)

    @property
    def graph_failed(self) -> bool:
        return any(f.module == GRAPH for f in self.failures)

    @property
    def sites_failed(self) -> list[FailureReport]:
        return [f for f in self.failures if f.module != GRAPH]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GraphReport":
        """The inverse of to_dict (the stored reports of lora_rewrite/report_cache.py)."""
        return cls(compile_id=data["compile_id"], kind=data["kind"], criterion=data["criterion"],
                   sites=[SiteReport(**s) for s in data["sites"]],
                   skipped=[SkipReport(**k) for k in data["skipped"]],
                   fused=[FusionReport(**f) for f in data["fused"]],
                   served_from_cache=data.get("served_from_cache", False),
                   failures=[FailureReport(**f) for f in data.get("failures", [])],
                   casts_merged=data.get("casts_merged", 0))

    def merged_line(self) -> str:
        return (f"merged {self.casts_merged} cast(s) the rewrite added with the same cast already in the graph "
                "(one value to one dtype, computed once)")

    def __str__(self) -> str:
        kind = f"{self.kind}, served from the compile cache" if self.served_from_cache else self.kind
        failed = ""
        if self.graph_failed:
            failed = ", the whole graph left as stock Inductor compiles it after a failure in runlora"
        elif self.failures:
            failed = f", {len(self.failures)} left after a failure in runlora"
        head = (f"runlora graph {self.compile_id or '?'} ({kind}): {len(self.sites)} site(s) rewritten, "
                f"{len(self.skipped)} left untouched{failed}, criterion={self.criterion}")
        rows = [["module", "N", "i→o", "r", "s", "drop", "dtype", "fwd", "bwd", "FLOPs before→after",
                 "X·Aᵀ bytes unsaved"]]
        for s in self.sites:
            flops = "" if s.flops_before is None else f"{s.flops_before:,}→{s.flops_after:,}"
            rows.append([s.module, str(s.N), f"{s.i}→{s.o}", str(s.r), _fmt_scale(s.scale),
                         "yes" if s.dropout else "no", s.dtype, s.forward, s.backward or "-", flops,
                         f"{s.saved_bytes_avoided:,}" if s.saved_bytes_avoided else "0"])
        lines = [head] + _table(rows) if self.sites else [head]
        for s in self.sites:
            lines.append(f"  forms {s.module} ({s.forms_source}): {s.forms_text()}")
            for note in s.notes:
                lines.append(f"  note {s.module}: {note}")
        for f in self.fused:
            lines.append(f"  {f.line()}")
        if self.casts_merged:
            lines.append(f"  {self.merged_line()}")
        for k in self.skipped:
            lines.append(f"  untouched {k.module}: {k.reason}")
        for f in self.failures:
            lines.append(f"  FAILED {f.line()}")
        return "\n".join(lines)


def _fmt_scale(s: Any) -> str:
    return f"{s:g}" if isinstance(s, float) else str(s)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


@contextlib.contextmanager
def collect_reports() -> Iterator[list[GraphReport]]:
    """Collect the reports of every graph the runlora pass processes inside the block."""
    reports: list[GraphReport] = []
    _collectors.append(reports)
    try:
        yield reports
    finally:   # by identity: nested collectors holding equal lists must not remove each other
        _collectors[:] = [c for c in _collectors if c is not reports]


_stderr_handler: logging.Handler | None = None


def ensure_visible() -> None:
    """With debug on, make INFO records of this logger reach stderr unless something already shows them."""
    global _stderr_handler
    if _stderr_handler is not None or log.handlers or (log.propagate and logging.getLogger().handlers):
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        return
    _stderr_handler = logging.StreamHandler(sys.stderr)
    _stderr_handler.setFormatter(logging.Formatter("[lora_rewrite] %(message)s"))
    log.addHandler(_stderr_handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


@contextlib.contextmanager
def never_raise(what: str) -> Iterator[None]:
    """Debug output must not break training: log a failure inside the block, do not raise it."""
    try:
        yield
    except Exception as e:
        log.warning("runlora debug output: %s failed (%s: %s); the compile goes on without it",
                    what, type(e).__name__, e)
        log.debug("traceback of the failure above", exc_info=True)


def warn_contained(failure: FailureReport, error: BaseException) -> None:
    """The one WARNING of a contained failure (lora_rewrite/containment.py); its traceback at DEBUG."""
    log.warning("runlora %s. The run goes on; options={'strict': True} (or RUNLORA_STRICT=1) raises instead.",
                failure.line())
    log.debug("traceback of the failure above", exc_info=(type(error), error, error.__traceback__))


def publish(report: GraphReport, *, debug: bool) -> None:
    """Count, hand to collectors, log. Never raises: debug output must not break a compile."""
    with never_raise(f"publishing the report of graph {report.compile_id}"):
        _publish(report, debug=debug)


def _count(report: GraphReport, sign: int = 1) -> None:
    """Add a published report's numbers to counters["runlora"] (sign -1: take them back)."""
    from lora_rewrite.compat import dynamo_counters

    counters = dynamo_counters()["runlora"]
    counters["graphs"] += sign
    if report.served_from_cache:
        counters["graphs_from_cache"] += sign
    counters["sites_found"] += sign * (len(report.sites) + len(report.skipped) + len(report.sites_failed))
    counters["sites_rewritten"] += sign * len(report.sites)
    counters["sites_skipped"] += sign * len(report.skipped)
    counters["sites_failed"] += sign * len(report.sites_failed)
    counters["graphs_failed"] += sign * report.graph_failed
    for s in report.sites:
        counters["backward_rewritten"] += sign * (s.backward is not None)
        counters[f"chose_{s.forward}"] += sign
        if s.backward:
            counters[f"chose_{s.backward}"] += sign
    for f in report.fused:
        counters["sibling_groups_fused"] += sign
        counters["sibling_products_fused"] += sign * len(f.modules)
    if report.casts_merged:
        counters["casts_merged"] += sign * report.casts_merged


def record_late_failure(reports: list[GraphReport], failure: FailureReport, error: BaseException, *,
                        rewrite_undone: bool) -> None:
    """A failure after the pass published its reports (Inductor compiling the rewritten graph): warn
    once, and correct the published reports and the counters. `rewrite_undone`: the graph was compiled
    again without runlora, so none of its sites counts as rewritten any more."""
    warn_contained(failure, error)
    with never_raise("correcting the reports after a compile failure"):
        if not reports:   # nothing was published for it: count the failure alone
            from lora_rewrite.compat import dynamo_counters

            dynamo_counters()["runlora"]["graphs_failed"] += 1
        for report in reports:
            _count(report, -1)
            if rewrite_undone:
                report.sites.clear()
                report.fused.clear()
                report.casts_merged = 0
            report.failures.append(failure)
            _count(report, +1)


def _publish(report: GraphReport, *, debug: bool) -> None:
    _count(report)
    for c in _collectors:
        c.append(report)
    served = " [served from the compile cache]" if report.served_from_cache else ""
    for s in report.sites:
        log.debug("rewrote %s%s", s.line(), served)
    for f in report.fused:
        log.debug("%s%s", f.line(), served)
    if report.casts_merged:
        log.debug("%s%s", report.merged_line(), served)
    for k in report.skipped:
        log.debug("%s%s", k.line(), served)
    if report.served_from_cache:
        for f in report.failures:   # the compile that stored it warned; say it again, once per graph served
            log.warning("runlora (served from the compile cache) %s", f.line())
    cid = report.compile_id or "?"
    if report.served_from_cache:
        log.info("runlora graph %s (%s) served from the compile cache: %d site(s) rewritten, %d left untouched "
                 "when it was compiled", cid, report.kind, len(report.sites), len(report.skipped))
    if not report.sites and not report.skipped:
        log.info("runlora graph %s (%s): no PEFT LoRA layer found in this graph", cid, report.kind)
    elif not report.sites:
        reasons = sorted({k.reason for k in report.skipped})
        log.info("runlora graph %s (%s): %d PEFT LoRA chain(s) found, none rewritten (%s)", cid, report.kind,
                 len(report.skipped), "; ".join(reasons))
    if debug:
        ensure_visible()
        log.info("%s", report)
        _log_new_graph_breaks()


_breaks_logged: dict = {}   # reason -> how many of its breaks were logged already


def _log_new_graph_breaks() -> None:
    """With debug on, the graph breaks Dynamo met since the last report, with their known fixes: a LoRA layer in
    a function Dynamo skipped is in no graph, and no report of runlora's names it (explain() says where)."""
    from lora_rewrite.compat import dynamo_counters
    from lora_rewrite.explain import dynamo_break_reasons, graph_break_summary

    reasons = dynamo_break_reasons(dynamo_counters())
    new = {reason: count - _breaks_logged.get(reason, 0)
           for reason, count in reasons.items() if count > _breaks_logged.get(reason, 0)}
    if new:
        _breaks_logged.update(reasons)
        log.info("runlora: Dynamo broke the graph before this report (a LoRA layer in a function it skips is in no "
                 "graph; lora_rewrite.explain(model, batch) says where):\n  %s", "\n  ".join(graph_break_summary(new)))


def dump_json(report: GraphReport) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str)
