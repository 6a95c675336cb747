"""The runlora graph pass: match every LoRA site, choose its variants, rewrite, fuse siblings, report.

Installed as `lora_rewrite.passes` (the repository keeps it in the top-level `passes/` folder). It
runs as Inductor's `joint_custom_post_pass`: on the joint forward+backward graph of a training
compile (before the min-cut partitioner), and on the forward graph of an inference compile.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch.fx import Graph

from lora_rewrite import compat, debug
from lora_rewrite.dump import GraphCapture
from lora_rewrite.options import RunLoraOptions
from lora_rewrite.variants import Dims, autograd_backward_gemms
from lora_rewrite.passes.match import Site, Skip, match_graph, match_site
from lora_rewrite.passes.fuse import fuse_siblings
from lora_rewrite.passes.plan import Plan, plan_site
from lora_rewrite.passes.rewrite import RewriteError, rewrite_site

__all__ = ["RunLoraPass", "rewrite_graph"]


def _fake_mode(graph: Graph):
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    mode = compat.detect_fake_mode([v for v in vals if v is not None])
    if mode is None:
        raise RuntimeError("runlora: the joint graph carries no fake tensors")
    return mode


def _site_report(site: Site, plan: Plan, criterion: str) -> debug.SiteReport:
    dims = site.dims
    n_used = plan.n_used
    report_dims = Dims(n_used, dims.i, dims.o, dims.r, dims.needs_dx) if n_used is not None else None
    flops_before = flops_after = saved = None
    if report_dims is not None:
        from lora_rewrite.variants import FORWARD1

        flops_before = FORWARD1.flops(report_dims)
        flops_after = plan.forward.variant.flops(report_dims)
        if site.has_backward:
            flops_before += sum(g.flops() for g in autograd_backward_gemms(report_dims))
            flops_after += plan.backward.variant.flops(report_dims) if plan.backward else 0
            saved = n_used * dims.r * site.x.meta["val"].element_size()
    n = dims.N
    return debug.SiteReport(
        module=site.module_path, adapter=site.adapter,
        N=n if isinstance(n, int) else compat.sym_expr(n), N_used=n_used,
        i=dims.i, o=dims.o, r=dims.r,
        scale=site.scale if isinstance(site.scale, (int, float)) else f"tensor {site.scale.name}",
        dropout=site.dropout, dtype=str(site.dtype).replace("torch.", ""), needs_dx=dims.needs_dx,
        dx_mode=site.dx_mode if plan.backward else None,
        forward=plan.forward.variant.name, backward=plan.backward.variant.name if plan.backward else None,
        criterion=criterion, forward_costs=dict(plan.forward.costs),
        backward_costs=dict(plan.backward.costs) if plan.backward else {},
        cost_unit=plan.forward.unit, flops_before=flops_before, flops_after=flops_after,
        saved_bytes_avoided=saved, notes=list(plan.notes), module_key=site.module_key,
    )


def rewrite_graph(graph: Graph, options: RunLoraOptions) -> debug.GraphReport:
    """Rewrite every LoRA site of `graph` in place; returns what was done (also published)."""
    anchors, backward = match_graph(graph)
    kind = "joint" if any(n.op == "placeholder" and "tangents" in str(n.target) for n in graph.nodes) \
        else "inference"
    report = debug.GraphReport(compat.compile_id(), kind, options.criterion)
    capture = GraphCapture(graph, options.dump_dir)
    fake_mode = _fake_mode(graph) if anchors else None
    rewritten = []
    for anchor in anchors:
        matched = match_site(anchor, backward)
        if isinstance(matched, Skip):
            report.skipped.append(debug.SkipReport(matched.module_path, matched.reason, matched.module_key))
            continue
        plan = plan_site(matched, options)
        before = capture.site_before(matched.nodes())
        try:
            new_nodes = rewrite_site(graph, fake_mode, matched, plan.forward.variant,
                                     plan.backward.variant if plan.backward else None)
        except RewriteError as e:
            debug.log.warning("runlora left %s untouched: %s", matched.module_path, e)
            report.skipped.append(debug.SkipReport(matched.module_path, f"rewrite failed, graph kept: {e}",
                                                   matched.module_key))
            continue
        capture.site_after(matched.module_path, before, new_nodes)
        report.sites.append(_site_report(matched, plan, options.criterion))
        rewritten.append((matched, new_nodes))
    if options.fuse_siblings and len(rewritten) > 1:
        for fusion in fuse_siblings(graph, fake_mode, rewritten):
            report.fused.append(debug.FusionReport(fusion.kind, [s.module_path for s in fusion.sites], fusion.ranks))
    if report.sites:
        compat.stable_topological_sort(graph)
        graph.lint()
    debug.publish(report, debug=options.debug)
    capture.finish(report)
    return report


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of the source files that decide a rewrite (lora_rewrite's modules and this pass, not the
    benchmark package): part of the compile-cache key."""
    import lora_rewrite

    files = sorted(Path(lora_rewrite.__file__).parent.glob("*.py")) + sorted(Path(__file__).parent.glob("*.py"))
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class RunLoraPass(compat.custom_graph_pass_base()):
    """Inductor `joint_custom_post_pass`; runs any passes the user had set there first."""

    def __init__(self, options: RunLoraOptions, chained: tuple = ()):
        self.options = options
        self.chained = tuple(chained)

    def __call__(self, graph: Graph) -> None:
        for user_pass in self.chained:
            user_pass(graph)
        if self.options.rewrite:
            rewrite_graph(graph, self.options)

    def uuid(self):
        chained = []
        for p in self.chained:
            key = p.uuid() if hasattr(p, "uuid") else None
            if not key:
                return None  # a user pass Inductor cannot key: caches are bypassed, as for that pass alone
            chained.append(key if isinstance(key, str) else repr(key))
        return f"runlora:{source_hash()}:{self.options.rewrite_key()}:{torch.__version__}:{chained}"
