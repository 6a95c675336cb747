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
from lora_rewrite.passes.fuse import fuse_siblings
from lora_rewrite.passes.match import match_graph, match_site
from lora_rewrite.passes.plan import guard_token_counts, plan_site
from lora_rewrite.passes.provenance import provenance_of
from lora_rewrite.passes.rewrite import RewriteError, rewrite_site
from lora_rewrite.passes.site import NoMatch

__all__ = ["RunLoraPass", "rewrite_graph"]


def _fake_mode(graph: Graph):
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    mode = compat.detect_fake_mode([v for v in vals if v is not None])
    if mode is None:
        raise RuntimeError("runlora: the joint graph carries no fake tensors")
    return mode


def rewrite_graph(graph: Graph, options: RunLoraOptions) -> debug.GraphReport:
    """Rewrite every LoRA site of `graph` in place; returns what was done (also published)."""
    anchors, backward = match_graph(graph)
    report = debug.GraphReport(compat.compile_id(), "joint" if backward else "inference", options.criterion)
    capture = GraphCapture(graph, options.dump_dir)
    fake_mode = _fake_mode(graph) if anchors else None
    rewritten, planned = [], []
    for anchor in anchors:
        try:
            site = match_site(anchor, backward)
        except NoMatch as no_match:
            module = provenance_of(anchor)
            report.skipped.append(debug.SkipReport(module.path, str(no_match), module.key))
            continue
        plan = plan_site(site, options)
        before = capture.site_before(site.nodes())
        try:
            done = rewrite_site(graph, fake_mode, site, plan.forward.variant,
                                plan.backward.variant if plan.backward else None, plan.forms)
        except RewriteError as e:
            debug.log.warning("runlora left %s untouched: %s", site.module_path, e)
            report.skipped.append(debug.SkipReport(site.module_path, f"rewrite failed, graph kept: {e}",
                                                   site.provenance.key))
            continue
        capture.site_after(site.module_path, before, done.new_nodes)
        report.sites.append(debug.site_report(site, plan, options.criterion))
        rewritten.append(done)
        planned.append((site, plan))
    for site_row, note in zip(report.sites, guard_token_counts(planned, options)):
        if note:
            site_row.notes.append(note)
    if options.fuse_siblings and len(rewritten) > 1:
        for fusion in fuse_siblings(graph, fake_mode, rewritten):
            report.fused.append(debug.FusionReport(fusion.kind.name, [s.module_path for s in fusion.sites],
                                                   fusion.ranks))
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
