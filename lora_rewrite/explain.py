"""`lora_rewrite.explain(model, *args, **kwargs)`: what runlora does to one call of a model.

    report = lora_rewrite.explain(peft_model, input_ids=ids, labels=ids)
    print(report)            # a table: every rewritten site, every LoRA layer left untouched and why
    report.to_dict()         # plain dicts (report.to_json() for a string)

It compiles a fresh copy of the call with runlora — Dynamo's caches are reset first, as
`torch._dynamo.explain` does, and Inductor's/AOTAutograd's compile caches are off for the call, so the
pass really runs — runs the forward once (no backward: the joint graph is rewritten when the forward
compiles), and returns the reports of every graph, with module paths resolved in your model.

Besides the chains the pass found in the graphs, every PEFT LoRA layer of the model that no rewritten
site belongs to is listed with the reason read off the module: adapters disabled, merged, no active
adapter, or not reached by this call. A LoRA layer that ran outside every compiled graph ran there because
Dynamo broke the graph, or skipped a whole function, at a place the report names: every graph break of the
call is listed (`GraphBreak`: where, Dynamo's reason, and the fix where one is known, `KNOWN_CAUSES`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from lora_rewrite import compat, debug


@dataclass
class UntouchedLayer:
    module: str
    reason: str


@dataclass
class GraphBreak:
    """One graph break of the call, as Dynamo reported it: where (the user code it names), why, and the
    known fix where there is one (`KNOWN_CAUSES`)."""

    where: str
    reason: str
    fix: str | None = None

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.where}: {self.reason}{fix}"


# (what Dynamo's reason says, what the break is, its fix): the breaks met in LoRA fine-tuning, and what undoes
# them. Checked against the reason's text, lower-cased.
KNOWN_CAUSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("side effect", "outside the scope of this hop", "outer-scope object"),
     "a side effect inside a checkpointed region (gradient checkpointing), which Dynamo refuses there: the whole "
     "checkpointed function runs eagerly, its LoRA layers with it. transformers ≥ 5.25's kernels sets one in "
     "every attention layer; lora_rewrite's stand-in removes it where no hub kernel was selected (kernelize / "
     "use_kernels=True). Otherwise move the mutation out of the checkpointed function, or, where it need not be "
     "replayed when the backward recomputes the region, set "
     "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True"),
    (("dequantize_module_weight", "torchao"),
     "PEFT's torchao check in dequantize_module_weight (DoRA, torch 2.13 and 2.14): lora_rewrite installs a "
     "traceable stand-in when the backend loads; with another backend, import lora_rewrite first"),
    (("recompile_limit", "cache_size_limit"),
     "Dynamo's recompile limit was reached: the frame runs eagerly from now on. Raise "
     "torch._dynamo.config.recompile_limit, or mark the varying size dynamic (torch._dynamo.mark_dynamic)"),
    (("logging.logger",),
     "a logging call inside the model (transformers' warning_once): add the method to "
     "torch._dynamo.config.ignore_logging_functions"),
    (("dict_itemiterator",),
     "PEFT's PeftModel.forward filtering its keyword arguments: a break for every backend, before the model's "
     "own forward, which Dynamo resumes"),
    (("requires_grad_()",),
     "PEFT's enable_input_require_grads hook (gradient checkpointing): a break for every backend, at the "
     "embedding's output, outside the LoRA layers"),
)


def known_fix(reason: str) -> str | None:
    text = reason.lower()
    return next((fix for words, fix in KNOWN_CAUSES if any(w in text for w in words)), None)


SKIPPED = "Dynamo skipped a whole frame (it runs eagerly, every LoRA layer in it outside any graph): "


def dynamo_break_reasons(counters) -> dict:
    """The breaks of a run, from Dynamo's counters: its graph breaks (`counters["graph_break"]`), and the frames
    it gave up on (`counters["unimplemented"]`: a break it could not resume from, the recompile limit), those
    marked `SKIPPED`. Reason → how many times."""
    reasons = dict(counters.get("graph_break", {}))
    reasons.update({SKIPPED + reason: count for reason, count in counters.get("unimplemented", {}).items()})
    return reasons


def graph_break_summary(reasons: dict) -> list[str]:
    """The graph breaks of a run, from Dynamo's counters (`counters["graph_break"]`: reason → how many times),
    one line each, with the known fix where there is one: what a run's summary and the debug log say. Where
    they were is what `explain()` finds."""
    lines = []
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        first = reason.strip().splitlines()[0] if reason.strip() else "?"
        fix = known_fix(reason)
        lines.append(f"{first} (×{count})" + (f"; fix: {fix}" if fix else ""))
    return lines


def graph_breaks(records: list[str]) -> list[GraphBreak]:
    """Dynamo's graph-break records (compat.recorded_graph_breaks) as GraphBreaks: each place once, its reason
    as Dynamo's first lines say it (the kind of break and its explanation)."""
    found: dict[tuple, GraphBreak] = {}
    for record in records:
        head, _, rest = record.partition("\nGraph Break Reason: ")
        where = head.rsplit(" in user code at ", 1)[-1].strip()
        body = rest.split("\nUser code traceback:")[0].split("\n For more details")[0]
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        kinds = [line for line in lines if not line.startswith(("Encountered graph break", "Failed to handle",
                                                                 "Graph break", "Hint:", "Developer debug",
                                                                 "Higher Order Operator:", "***"))]
        kind = kinds[0] if kinds else (lines[0] if lines else body.strip())
        explanation = next((line.removeprefix("Explanation:").strip() for line in kinds[1:]
                            if line.startswith("Explanation:")), "")
        reason = f"{kind} ({explanation.split('. ')[0].rstrip('.')})" if explanation else kind
        if (where, kind) not in found:   # a break Dynamo met twice (nested, or again on a resume) once
            found[(where, kind)] = GraphBreak(where, reason, known_fix(body))
    return list(found.values())


@dataclass
class ExplainReport:
    graphs: list = field(default_factory=list)        # debug.GraphReport, one per compiled graph
    untouched: list = field(default_factory=list)     # UntouchedLayer: LoRA layers with no rewritten site
    graph_breaks: list = field(default_factory=list)  # GraphBreak: where Dynamo broke the graph in this call

    @property
    def sites(self) -> list:
        return [s for g in self.graphs for s in g.sites]

    @property
    def skipped(self) -> list:
        return [s for g in self.graphs for s in g.skipped]

    def to_dict(self) -> dict:
        return {"graphs": [g.to_dict() for g in self.graphs], "untouched": [asdict(u) for u in self.untouched],
                "graph_breaks": [asdict(b) for b in self.graph_breaks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        """One table per graph with a LoRA site in it; graphs without one folded into one line."""
        empty = [g for g in self.graphs if not (g.sites or g.skipped or g.fused)]
        empty_ids = {id(g) for g in empty}
        parts = [str(g) for g in self.graphs if id(g) not in empty_ids]
        compile_ids = _id_list(empty)
        if not self.graphs:
            parts.append("runlora compiled no graph")
        elif not parts and not self.untouched:
            parts.append(f"no PEFT LoRA layer found in this model: runlora had nothing to rewrite "
                         f"({len(empty)} graph(s) compiled: {compile_ids})")
        elif empty:
            parts.append(f"{len(empty)} more graph(s) without a PEFT LoRA site: {compile_ids}")
        for site in self.sites:
            parts.append(f"why {site.module}: " + _why(site))
        if self.untouched:
            parts.append("LoRA layers with no rewritten site:")
            parts += [f"  {u.module}: {u.reason}" for u in self.untouched]
        if self.graph_breaks:
            parts.append(f"Dynamo broke the graph in {len(self.graph_breaks)} place(s) in this call:")
            parts += [f"  {b.line()}" for b in self.graph_breaks]
        return "\n".join(parts)


def _id_list(graphs: list, most: int = 12) -> str:
    ids = [g.compile_id or "?" for g in graphs]
    return ", ".join(ids[:most]) + (f", … ({len(ids) - most} more)" if len(ids) > most else "")


def _why(site) -> str:
    def costs(c: dict) -> str:
        if site.cost_unit == "FLOPs":
            return ", ".join(f"{k}={int(v):,}" for k, v in c.items())
        return ", ".join(f"{k}={v:.3g}s" for k, v in c.items())

    text = f"forward {site.forward}"
    if site.forward_costs:
        text += f" ({site.criterion}: {costs(site.forward_costs)})"
    if site.backward:
        text += f"; backward {site.backward}"
        if site.backward_costs:
            text += f" ({site.criterion}: {costs(site.backward_costs)})"
    if site.N_used is not None and not isinstance(site.N, int):
        text += f"; N={site.N} decided at its size hint {site.N_used}"
    text += f"; forms {site.forms_source}: {site.forms_text()}"
    if site.form_seconds:
        text += f" [{site.measured_forms_text()}]"
    return text


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers (they hold lora_A and a base_layer), by qualified name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A"), torch.nn.ModuleDict)}


def _name_in_model(relative: str, read: set, layers: dict) -> str:
    """A module path relative to a compiled frame (a graph break can make a LoRA layer's own forward
    the frame: its path is then ""), named in the model through the parameters that frame reads."""
    in_frame = [name for name in layers if any(p.startswith(name + ".lora_A.") for p in read)]
    candidates = [name for name in in_frame if not relative or name == relative or name.endswith("." + relative)]
    if len(candidates) == 1:
        return candidates[0]
    return relative or "<the compiled frame's own module>"


NOT_REACHED = "not reached by this call, or its products did not reach the graph in LoRA form"


def _untouched_reason(layer: torch.nn.Module, graph_reason: str | None, breaks: list) -> str:
    """What the module's own state says (disabled, merged, …), with what the graph showed; for a layer no graph
    holds, the graph breaks of the call that may have kept it out (and their known fixes)."""
    own = _module_reason(layer)
    if own is None:
        if graph_reason:
            return graph_reason
        if not breaks:
            return NOT_REACHED
        known = " (one with a known fix)" if any(b.fix for b in breaks) else ""
        return (f"{NOT_REACHED}; Dynamo broke the graph in {len(breaks)} place(s) in this call{known}, listed "
                "below: a function Dynamo skips runs eagerly, the LoRA layers it calls outside every graph")
    return f"{own} (in the graph: {graph_reason})" if graph_reason else own


def _module_reason(layer: torch.nn.Module) -> str | None:
    if getattr(layer, "disable_adapters", False):
        return "adapters are disabled (disable_adapter()): the layer runs its base only"
    if getattr(layer, "merged", False):
        return "the adapter is merged into the base weight: there is no adapter product to rewrite"
    active = [a for a in getattr(layer, "active_adapters", []) if a in layer.lora_A]
    if not active:
        return "no active adapter on this layer"
    if any(getattr(layer, "lora_bias", {}).get(a, False) for a in active):
        return "lora_bias=True: not covered by the rewrite"
    return None


def explain(model, *args, options: dict | None = None, **kwargs) -> ExplainReport:
    """Compile `model(*args, **kwargs)` afresh with runlora (`options` are runlora's), run it, report."""
    from lora_rewrite.backend import runlora

    names_by_key = {str(id(m)): name for name, m in model.named_modules()}
    parameter_names = {id(p): name for name, p in model.named_parameters()}
    frames: list[tuple[list, set]] = []   # per compiled frame: its reports, the model parameters it reads

    def recording_runlora(gm, example_inputs, **backend_kwargs):
        with debug.collect_reports() as frame_reports:
            compiled_fn = runlora(gm, example_inputs, **backend_kwargs)
        read = {parameter_names[id(t)] for t in example_inputs if id(t) in parameter_names}
        frames.append((list(frame_reports), read))
        return compiled_fn

    compat.reset_dynamo()
    try:
        with compat.fresh_compile_caches(), debug.collect_reports() as reports, \
                compat.recorded_graph_breaks() as break_records:
            compiled = torch.compile(model, backend=recording_runlora, options=dict(options or {}))
            compiled(*args, **kwargs)
    finally:
        compat.reset_dynamo()
    breaks = graph_breaks(break_records)
    layers = _lora_layers(model)
    for frame_reports, read in frames:
        for report in frame_reports:
            for entry in list(report.sites) + list(report.skipped) + list(report.sites_failed):
                if entry.module_key in names_by_key:
                    entry.module = names_by_key[entry.module_key]
                else:
                    entry.module = _name_in_model(entry.module, read, layers)
    rewritten = {s.module for r in reports for s in r.sites}
    skipped = {s.module: s.reason for r in reports for s in r.skipped}
    skipped.update({f.module: f"{f.stage} failed ({f.error}); {f.note or 'left as stock Inductor compiles it'}"
                    for r in reports for f in r.sites_failed})
    untouched = [UntouchedLayer(name, _untouched_reason(layer, skipped.get(name), breaks))
                 for name, layer in _lora_layers(model).items() if name not in rewritten]
    return ExplainReport(graphs=list(reports), untouched=untouched, graph_breaks=breaks)
