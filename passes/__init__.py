"""The runlora graph pass: match every LoRA site, choose its variants, rewrite, fuse siblings, report.

Installed as `lora_rewrite.passes` (the repository keeps it in the top-level `passes/` folder). It
runs as Inductor's `joint_custom_post_pass`: on the joint forward+backward graph of a training
compile (before the min-cut partitioner), and on the forward graph of an inference compile.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import torch
from torch.fx import Graph

from lora_rewrite import compat, debug
from lora_rewrite.containment import GraphSnapshot, SiteHalfRewritten, Stage, StageFailed, describe
from lora_rewrite.dump import GraphCapture
from lora_rewrite.options import RunLoraOptions
from lora_rewrite.passes.fuse import fuse_siblings
from lora_rewrite.passes.fx import merge_duplicate_casts
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


class _RestartWithout(Exception):
    """A site failed halfway through its rewrite: restore the graph and run again without it."""

    def __init__(self, index: int, failure: debug.FailureReport):
        super().__init__(failure.line())
        self.index = index
        self.failure = failure


def rewrite_graph(graph: Graph, options: RunLoraOptions) -> debug.GraphReport:
    """Rewrite every LoRA site of `graph` in place; returns what was done (also published).

    An exception inside is contained (lora_rewrite/containment.py) unless `options.strict`: a site's
    stage that fails leaves that site as stock Inductor compiles it, a whole-graph stage that fails
    leaves the whole graph so (restored from a snapshot taken before the first site was rewritten)."""
    capture = GraphCapture(graph, options.dump_dir)
    report = debug.GraphReport(compat.compile_id(), "joint", options.criterion)
    snapshot: GraphSnapshot | None = None
    failed: dict[int, debug.FailureReport] = {}   # by anchor index: skipped again after a restore
    try:
        while True:
            anchors, backward = _graph_stage(options, Stage.MATCH, match_graph, graph)
            report = debug.GraphReport(compat.compile_id(), "joint" if backward else "inference", options.criterion)
            if anchors and snapshot is None and not options.strict:
                snapshot = GraphSnapshot(graph)
            try:
                _rewrite_sites(graph, anchors, backward, options, report, capture, failed)
                break
            except _RestartWithout as restart:
                failed[restart.index] = restart.failure
                snapshot.restore()
                capture.restart()
    except StageFailed as failure:
        if snapshot is not None:
            snapshot.restore()
        capture.restart()
        graph_failure = debug.FailureReport(debug.GRAPH, failure.stage.value, describe(failure.error))
        debug.warn_contained(graph_failure, failure.error)
        report.sites.clear()
        report.fused.clear()
        report.casts_merged = 0
        report.failures.append(graph_failure)
    debug.publish(report, debug=options.debug)
    capture.finish(report)
    return report


def _graph_stage(options: RunLoraOptions, stage: Stage, fn, *args):
    """fn(*args), an exception in it tagged with its whole-graph stage (re-raised as it is when strict)."""
    try:
        return fn(*args)
    except Exception as e:
        if options.strict:
            raise
        raise StageFailed(stage, e) from e


def _site_stage(options: RunLoraOptions, stage: Stage, fn, *args):
    """fn(*args), an exception in it tagged with its site stage (re-raised as it is when strict). A
    StageFailed from inside (measuring forms, within planning) keeps its own stage."""
    try:
        return fn(*args)
    except (NoMatch, StageFailed):
        raise
    except Exception as e:
        if options.strict:
            raise
        raise StageFailed(stage, e) from e


def _module_of(anchor) -> tuple[str, str | None]:
    try:
        module = provenance_of(anchor)
        return module.path, module.key
    except Exception:
        return "<unknown module>", None


def _contained_site(path: str, key: str | None, stage: Stage, error: BaseException, *,
                    restored: bool = False) -> debug.FailureReport:
    """The report of a contained site failure, with its one warning."""
    note = ("left as stock Inductor compiles it (the graph was restored and its other sites rewritten again)"
            if restored else "")
    failure = debug.FailureReport(path, stage.value, describe(error), key, note)
    debug.warn_contained(failure, error)
    return failure


def _rewrite_sites(graph: Graph, anchors: list, backward: set, options: RunLoraOptions, report: debug.GraphReport,
                   capture: GraphCapture, failed: dict[int, debug.FailureReport]) -> None:
    """Match, plan and rewrite each site; then the whole-graph stages. Fills `report`."""
    fake_mode = _graph_stage(options, Stage.MATCH, _fake_mode, graph) if anchors else None
    rewritten, planned, rows = [], [], []
    for index, anchor in enumerate(anchors):
        if index in failed:   # it failed halfway before the graph was restored: leave it as it is
            report.failures.append(failed[index])
            continue
        try:
            site = _site_stage(options, Stage.MATCH, match_site, anchor, backward, options)
            plan = _site_stage(options, Stage.PLAN, plan_site, site, options)
            site_row = _site_stage(options, Stage.REPORT, debug.site_report, site, plan, options.criterion)
            before = capture.site_before(site)
            done = rewrite_site(graph, fake_mode, site, plan.forward.variant,
                                plan.backward.variant if plan.backward else None, plan.forms, options)
        except NoMatch as no_match:
            path, key = _module_of(anchor)
            report.skipped.append(debug.SkipReport(path, str(no_match), key))
            continue
        except (StageFailed, RewriteError) as failure:
            error = failure.error if isinstance(failure, StageFailed) else failure
            if options.strict:
                raise error
            stage = failure.stage if isinstance(failure, StageFailed) else Stage.REWRITE
            path, key = _module_of(anchor)
            if isinstance(failure, SiteHalfRewritten):
                raise _RestartWithout(index, _contained_site(path, key, stage, error, restored=True)) from error
            failed[index] = _contained_site(path, key, stage, error)   # not tried again after a restore
            report.failures.append(failed[index])
            continue
        except Exception as error:   # raised outside any stage: the graph's state is unknown, so restore it
            if options.strict:
                raise
            path, key = _module_of(anchor)
            raise _RestartWithout(index, _contained_site(path, key, Stage.REWRITE, error, restored=True)) from error
        capture.site_after(done, before)
        rows.append(site_row)
        rewritten.append(done)
        planned.append((site, plan))
    notes = _graph_stage(options, Stage.GUARD, guard_token_counts, planned, options)
    # each row is built whole: the guard's note, known once every site of the graph is planned, joins it here
    report.sites.extend(dataclasses.replace(row, notes=[*row.notes, note]) if note else row
                        for row, note in zip(rows, notes))
    if options.fuse_siblings and len(rewritten) > 1:
        for fusion in _graph_stage(options, Stage.FUSE, fuse_siblings, graph, fake_mode, rewritten):
            report.fused.append(debug.FusionReport(fusion.kind.name, [s.module_path for s in fusion.sites],
                                                   fusion.ranks))
    if report.sites and options.enabled("merge_casts"):
        report.casts_merged = _graph_stage(options, Stage.MERGE, merge_duplicate_casts, graph)
    if report.sites:
        _graph_stage(options, Stage.SORT, compat.stable_topological_sort, graph)
        _graph_stage(options, Stage.LINT, graph.lint)


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
        self.raised = False   # an exception left rewrite_graph: the backend compiles again without runlora

    def __call__(self, graph: Graph) -> None:
        for user_pass in self.chained:
            user_pass(graph)
        if self.options.rewrite:
            try:
                rewrite_graph(graph, self.options)
            except Exception:
                self.raised = True
                raise

    def uuid(self):
        """The compile caches' key of this pass. Should computing it fail, caches are bypassed for this
        compile (None), as for any pass Inductor cannot key; the compile goes on."""
        try:
            return self._uuid()
        except Exception as e:
            if self.options.strict:
                raise
            debug.log.warning("runlora could not compute its compile-cache key (%s: %s); this compile bypasses "
                              "the compile caches", type(e).__name__, e)
            return None

    def _uuid(self):
        chained = []
        for p in self.chained:
            key = p.uuid() if hasattr(p, "uuid") else None
            if not key:
                return None  # a user pass Inductor cannot key: caches are bypassed, as for that pass alone
            chained.append(key if isinstance(key, str) else repr(key))
        return f"runlora:{source_hash()}:{self.options.rewrite_key()}:{torch.__version__}:{chained}"
