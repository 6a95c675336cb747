"""Graph dumps and pictures: what `options={"dump_dir": ...}` (or RUNLORA_DUMP_DIR) writes, and the
structured-trace artifacts TORCH_TRACE + tlparse users see.

Per compiled graph, a folder `<dump_dir>/<seq>_<compile id>/` with:

    joint_before.py / joint_after.py       the joint (or inference) graph before and after the rewrite
    forward.py / backward.py / inference.py  the partitioned graphs Inductor compiles
    report.json                             the GraphReport (what matched, what was chosen and why)
    site<k>_before.png|svg / site<k>_after.png|svg   each rewritten site by role (lora_rewrite/pictures.py)

Where each graph's dump went is logged at INFO (shown on stderr when a dump dir is set).

Structured trace (always, cheap when TORCH_TRACE is unset): artifacts `runlora_joint_before`,
`runlora_joint_after` and `runlora_report` in the compile's trace.

Debug output never breaks a compile: any failure in here is logged as a warning and the compile goes
on without that piece; without matplotlib the pictures are skipped with one warning per process and
the graphs and the report are still written.
"""

from __future__ import annotations

import itertools
import re
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from lora_rewrite import compat, debug

_sequence = itertools.count()
_lock = threading.Lock()
_folders: dict[str, Path] = {}     # compile id -> folder, so partitioned graphs land beside their joint
_last_folder: list[Path] = []
_warned_no_matplotlib = False


def graph_code(graph: torch.fx.Graph) -> str:
    gm = graph.owning_module
    if gm is not None:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    return str(graph)


def pictures_available() -> bool:
    """matplotlib (the one drawing dependency) importable; if not, say so once per process."""
    global _warned_no_matplotlib
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        if not _warned_no_matplotlib:
            _warned_no_matplotlib = True
            debug.log.warning("runlora dump_dir: site pictures skipped, %s (pip install matplotlib); the graphs "
                              "and report.json are still written", e)
        return False
    return True


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "graph"


class GraphCapture:
    """Collects what debug output needs from one graph while the pass runs: the code before and
    after, each site's subgraph before and after. Cheap when nothing is asked for; never raises."""

    def __init__(self, graph: torch.fx.Graph, dump_dir: str | None):
        self.graph = graph
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.folder: Path | None = None
        self.pictures: list[tuple[str, Any, Any]] = []
        with debug.never_raise("the structured-trace artifact runlora_joint_before"):
            compat.trace_artifact("runlora_joint_before", lambda: graph_code(graph))
        if self.dump_dir is not None:
            with debug.never_raise(f"writing the dump to {self.dump_dir}"):
                cid = compat.compile_id() or "nocompileid"
                with _lock:
                    folder = self.dump_dir / f"{next(_sequence):03d}_{_safe(cid)}"
                    _folders[cid] = folder
                    _last_folder[:] = [folder]
                folder.mkdir(parents=True, exist_ok=True)
                self.folder = folder
                (folder / "joint_before.py").write_text(graph_code(graph))
                debug.ensure_visible()

    def restart(self) -> None:
        """The graph was restored from its snapshot (lora_rewrite/containment.py): forget its sites."""
        self.pictures.clear()

    @property
    def wants_pictures(self) -> bool:
        return self.folder is not None

    def site_before(self, site):
        """The picture of a matched site (passes/site.py `Site`), before it is rewritten; None if no
        pictures are asked for or reading it failed."""
        if not self.wants_pictures:
            return None
        with debug.never_raise("reading a site for its picture"):
            from lora_rewrite import pictures

            return pictures.capture_site(site)
        return None

    def site_after(self, done, before) -> None:
        """The picture of the same site rewritten (passes/rewrite.py `RewrittenSite`), kept with `before`."""
        if before is None:
            return
        module = done.site.module_path
        with debug.never_raise(f"reading {module} for its picture"):
            from lora_rewrite import pictures

            self.pictures.append((module, before, pictures.capture_rewritten(done, before)))

    def finish(self, report) -> None:
        with debug.never_raise("the structured-trace artifacts runlora_joint_after and runlora_report"):
            compat.trace_artifact("runlora_joint_after", lambda: graph_code(self.graph))
            compat.trace_artifact("runlora_report", lambda: debug.dump_json(report), encoding="json")
        if self.folder is None:
            return
        with debug.never_raise(f"writing joint_after.py and report.json to {self.folder}"):
            (self.folder / "joint_after.py").write_text(graph_code(self.graph))
            (self.folder / "report.json").write_text(debug.dump_json(report))
        drawn = 0
        if self.pictures and pictures_available():
            sites: dict[str, list] = {}   # in report order; a layer with several active adapters has several
            for s in report.sites:
                sites.setdefault(s.module, []).append(s)
            for k, (module, before, after) in enumerate(self.pictures):
                site = sites[module].pop(0) if sites.get(module) else None
                with debug.never_raise(f"drawing the pictures of {module}"):
                    draw_site(self.folder / f"site{k}", module, site, before, after, report.kind)
                    drawn += 1
        debug.log.info("runlora: graph %s dumped to %s (%d site picture pair(s))", report.compile_id or "?",
                       self.folder, drawn)


def draw_site(stem: Path, module: str, site, before, after, kind: str = "joint") -> None:
    """site<k>_before / site<k>_after, titled with the site, the variants chosen and the cost."""
    from lora_rewrite import pictures

    for stage, picture in (("before", before), ("after", after)):
        pictures.draw(picture, Path(f"{stem}_{stage}"), stage=stage, title=site_title(module, site, stage, kind))


def site_title(module: str, site, stage: str, kind: str = "joint") -> str:
    """Two lines: the site and the stage; its sizes, the variants chosen, the FLOPs before → after."""
    if stage == "before":
        what = ("before: PEFT's forward and autograd's backward, as traced" if kind == "joint"
                else "before: PEFT's forward, as traced (inference)")
    else:
        what = "after runlora"
    if site is None:
        return f"{module}, {what}"
    scale = f"{site.scale:g}" if isinstance(site.scale, float) else str(site.scale)
    n = site.N if site.N_used is None or site.N == site.N_used else f"{site.N} (decided at {site.N_used})"
    if site.backward:
        chosen = f"{site.forward} + {site.backward}"
    else:
        chosen = site.forward + (" (inference: no backward)" if kind != "joint" else " (backward not rewritten)")
    cost = ""
    if site.flops_before is not None and site.flops_after is not None and site.flops_before:
        change = (site.flops_after - site.flops_before) / site.flops_before * 100
        cost = f"; matmul FLOPs {site.flops_before:,} → {site.flops_after:,} ({change:+.1f} %)"
    unsaved = f"; X·Aᵀ not saved: {site.saved_bytes_avoided:,} B" if site.saved_bytes_avoided else ""
    return (f"{module}, {what}\nN={n}  i={site.i}  o={site.o}  r={site.r}  s={scale}  {site.dtype}: "
            f"runlora chose {chosen} ({site.criterion}){cost}{unsaved}")


def dumping_inner_compile(dump_dir: str, inner: Callable | None) -> Callable:
    """An Inductor `inner_compile` that writes the partitioned graph beside its joint graph first."""

    def inner_compile(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            name = "backward.py"
        elif kwargs.get("is_inference"):
            name = "inference.py"
        else:
            name = "forward.py"
        with debug.never_raise(f"writing {name} to the dump"):
            cid = compat.compile_id()
            with _lock:
                folder = _folders.get(cid) if cid else None
                if folder is None:
                    folder = _last_folder[0] if _last_folder else Path(dump_dir) / _safe(cid or "nocompileid")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(gm.print_readable(print_output=False, include_stride=True,
                                                         include_device=True))
        return (inner or compat.compile_fx_inner)(gm, example_inputs, **kwargs)

    return inner_compile
