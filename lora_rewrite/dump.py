"""Graph dumps and pictures: what `options={"dump_dir": ...}` (or RUNLORA_DUMP_DIR) writes, and the
structured-trace artifacts TORCH_TRACE + tlparse users see.

Per compiled graph, a folder `<dump_dir>/<seq>_<compile id>/` with:

    joint_before.py / joint_after.py       the joint (or inference) graph before and after the rewrite
    forward.py / backward.py / inference.py  the partitioned graphs Inductor compiles
    report.json                             the GraphReport (what matched, what was chosen and why)
    site<k>_before.png|svg / site<k>_after.png|svg   each rewritten site's subgraph, drawn with networkx

Structured trace (always, cheap when TORCH_TRACE is unset): artifacts `runlora_joint_before`,
`runlora_joint_after` and `runlora_report` in the compile's trace.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from lora_rewrite import compat

_sequence = itertools.count()
_lock = threading.Lock()
_folders: dict[str, Path] = {}     # compile id -> folder, so partitioned graphs land beside their joint
_last_folder: list[Path] = []


def graph_code(graph: torch.fx.Graph) -> str:
    gm = graph.owning_module
    if gm is not None:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    return str(graph)


@dataclass
class Subgraph:
    """A drawable copy of part of a graph, taken before the graph changes."""

    nodes: dict = field(default_factory=dict)   # name -> label
    edges: list = field(default_factory=list)   # (src name, dst name)
    roles: dict = field(default_factory=dict)   # name -> "input" | "site" | "new" | "user"


def _label(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    shape = ""
    if isinstance(val, torch.Tensor):
        shape = f"{str(val.dtype).replace('torch.', '')}{list(val.shape)}"
    target = node.target if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
    return f"{node.name}\n{target}\n{shape}"


def describe(core: Iterable[torch.fx.Node], core_role: str) -> Subgraph:
    """The nodes in `core`, their direct inputs, and their direct users outside `core`."""
    core = [n for n in core if isinstance(n, torch.fx.Node)]
    inside = set(core)
    sub = Subgraph()
    for n in core:
        sub.nodes[n.name] = _label(n)
        sub.roles[n.name] = core_role
        for a in n.all_input_nodes:
            if a not in inside:
                sub.nodes.setdefault(a.name, _label(a))
                sub.roles.setdefault(a.name, "input")
            sub.edges.append((a.name, n.name))
        for u in n.users:
            if u not in inside and u.op != "output":
                sub.nodes.setdefault(u.name, _label(u))
                sub.roles.setdefault(u.name, "user")
                sub.edges.append((n.name, u.name))
    return sub


ROLE_COLORS = {"input": "#d9d9d9", "site": "#f4a582", "new": "#92c5de", "user": "#ffffff"}


def draw(sub: Subgraph, stem: Path, title: str) -> list[Path]:
    """Draw with networkx (graphviz's `dot` layout where pydot and graphviz are installed, else a
    layered layout by topological generation); write PNG and SVG. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g = nx.DiGraph()
    for name, label in sub.nodes.items():
        g.add_node(name, label=label, role=sub.roles.get(name, "site"))
    g.add_edges_from(sub.edges)
    try:
        pos = nx.nx_pydot.graphviz_layout(g, prog="dot")
        layers = max(1, len(list(nx.topological_generations(g))))
    except Exception:
        generations = list(nx.topological_generations(g))
        for layer, names in enumerate(generations):
            for name in names:
                g.nodes[name]["layer"] = layer
        pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=-1)
        layers = max(1, len(generations))
    widest = max(1, max(len(x) for x in nx.topological_generations(g)))
    fig, ax = plt.subplots(figsize=(min(40.0, max(8.0, 2.0 * widest)), min(30.0, max(6.0, 1.5 * layers))))
    colors = [ROLE_COLORS.get(g.nodes[n]["role"], "#ffffff") for n in g]
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=12, node_size=2600, node_shape="s",
                           min_source_margin=14, min_target_margin=22, edge_color="#555555")
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=2600, edgecolors="#333333", node_shape="s")
    nx.draw_networkx_labels(g, pos, labels={n: g.nodes[n]["label"] for n in g}, font_size=6, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    written = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "graph"


class GraphCapture:
    """Collects what debug output needs from one graph while the pass runs: the code before and
    after, each site's subgraph before and after. Cheap when nothing is asked for."""

    def __init__(self, graph: torch.fx.Graph, dump_dir: str | None):
        self.graph = graph
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.folder: Path | None = None
        self.pictures: list[tuple[str, Subgraph, Subgraph]] = []
        compat.trace_artifact("runlora_joint_before", lambda: graph_code(graph))
        if self.dump_dir is not None:
            cid = compat.compile_id() or "nocompileid"
            with _lock:
                self.folder = self.dump_dir / f"{next(_sequence):03d}_{_safe(cid)}"
                _folders[cid] = self.folder
                _last_folder[:] = [self.folder]
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "joint_before.py").write_text(graph_code(graph))

    @property
    def wants_pictures(self) -> bool:
        return self.folder is not None

    def site_before(self, nodes: Iterable[torch.fx.Node]) -> Subgraph | None:
        return describe(nodes, "site") if self.wants_pictures else None

    def site_after(self, module: str, before: Subgraph | None, new_nodes: Iterable[torch.fx.Node]) -> None:
        if before is not None:
            self.pictures.append((module, before, describe(new_nodes, "new")))

    def finish(self, report) -> None:
        from lora_rewrite.debug import dump_json

        compat.trace_artifact("runlora_joint_after", lambda: graph_code(self.graph))
        compat.trace_artifact("runlora_report", lambda: dump_json(report), encoding="json")
        if self.folder is None:
            return
        (self.folder / "joint_after.py").write_text(graph_code(self.graph))
        (self.folder / "report.json").write_text(dump_json(report))
        for k, (module, before, after) in enumerate(self.pictures):
            draw(before, self.folder / f"site{k}_before", f"{module}: before (PEFT as traced)")
            draw(after, self.folder / f"site{k}_after", f"{module}: after runlora")


def dumping_inner_compile(dump_dir: str, inner: Callable | None) -> Callable:
    """An Inductor `inner_compile` that writes the partitioned graph beside its joint graph first."""

    def inner_compile(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            name = "backward.py"
        elif kwargs.get("is_inference"):
            name = "inference.py"
        else:
            name = "forward.py"
        cid = compat.compile_id()
        with _lock:
            folder = _folders.get(cid) if cid else None
            if folder is None:
                folder = _last_folder[0] if _last_folder else Path(dump_dir) / _safe(cid or "nocompileid")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(gm.print_readable(print_output=False, include_stride=True, include_device=True))
        return (inner or compat.compile_fx_inner)(gm, example_inputs, **kwargs)

    return inner_compile
