"""Never worse than stock Inductor: a failure inside runlora costs a warning, never a training run.

runlora is an optimisation layered on Inductor, so an exception inside it — a bug, a model family or
a torch release nobody here has run, an out-of-memory while measuring forms on a nearly full GPU —
is contained at the smallest depth that leaves a correct graph:

    depth     stages                                                   what is left as stock Inductor compiles it
    site      matching, planning, measuring forms, report, rewriting   that site (the other sites are still rewritten)
    graph     sibling fusion, the dX guard, topological sort, lint     the whole graph (restored from a snapshot)
    compile   Inductor compiling the rewritten graph                   the whole graph, compiled again without runlora

A site that failed while it was already changing the graph (`SiteHalfRewritten`) cannot be undone in
place: the graph is restored from the snapshot taken before the first site, and the pass runs again
without that site. Each containment logs one WARNING (site, stage, exception), is counted
(`sites_failed`, `graphs_failed` in `counters["runlora"]`) and is shown by the report, explain() and
the main job's summary line.

An out-of-memory while measuring product forms is not a failure of the site: it is rewritten in its
default forms, and nothing is written to the forms cache for it.

`options={"strict": True}` (or RUNLORA_STRICT=1) re-raises instead: for tests and for people
developing the pass, so containment never hides a bug from CI. Containment is for exceptions only:
the checks that a rewritten value has the shape and dtype of what it replaces stay as they are.
"""

from __future__ import annotations

import enum

import torch
from torch.fx import Graph, Node


class Stage(enum.Enum):
    """Where in runlora an exception was raised; the value is how reports and warnings name it."""

    MATCH = "matching"
    PLAN = "planning"
    MEASURE = "measuring product forms"
    REPORT = "reporting"
    REWRITE = "rewriting"
    FUSE = "sibling fusion"
    GUARD = "guarding the token count"
    MERGE = "merging duplicate casts"
    SORT = "topological sort"
    LINT = "graph lint"
    COMPILE = "Inductor compiling the rewritten graph"


SITE_STAGES = (Stage.MATCH, Stage.PLAN, Stage.MEASURE, Stage.REPORT, Stage.REWRITE)


class StageFailed(Exception):
    """An exception raised inside a stage, with the stage it was raised in."""

    def __init__(self, stage: Stage, error: BaseException):
        super().__init__(f"{stage.value} failed: {describe(error)}")
        self.stage = stage
        self.error = error


class SiteHalfRewritten(StageFailed):
    """A site's rewrite failed after it began redirecting uses: the graph must be restored."""


def describe(error: BaseException) -> str:
    """"TypeName: message" of an exception, the message cut to one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def is_out_of_memory(error: BaseException) -> bool:
    """A device (or host) allocation failed: torch.OutOfMemoryError on GPUs, a RuntimeError with the
    allocator's message elsewhere (the CPU allocator raises a plain RuntimeError)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                                or "not enough memory" in text)


def free_device_memory(device: torch.device) -> None:
    """After an out-of-memory: hand the failed measurement's cached blocks back to the device."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class GraphSnapshot:
    """A copy of a graph's nodes, to put back in place if a whole-graph stage fails.

    The placeholders are never changed by the pass, so they stay (AOTAutograd and the partitioner
    know the graph's inputs by them); every other node is erased and copied back from the snapshot,
    metadata included. Restored nodes may get new names (FX never reuses a name): names carry no
    meaning after the pass."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.copy = Graph()
        self._placeholders: list[tuple[Node, Node]] = []
        val_map: dict[Node, Node] = {}
        for node in graph.nodes:
            if node.op == "output":
                self._output_args = torch.fx.map_arg(node.args, val_map.__getitem__)
                self._output_kwargs = torch.fx.map_arg(node.kwargs, val_map.__getitem__)
                self._output_meta = dict(node.meta)
                self._output_type = node.type
                continue
            copied = self.copy.node_copy(node, val_map.__getitem__)
            copied.meta = dict(node.meta)
            val_map[node] = copied
            if node.op == "placeholder":
                self._placeholders.append((copied, node))

    def restore(self) -> None:
        """Put the snapshot's nodes back into the graph it was taken of, in place."""
        graph = self.graph
        doomed = [n for n in graph.nodes if n.op != "placeholder"]
        for node in doomed:   # first unlink every use: a failed stage may have left nodes out of order
            node.args, node.kwargs = (), {}
        for node in reversed(doomed):
            graph.erase_node(node)
        val_map = {copied: original for copied, original in self._placeholders}
        for node in self.copy.nodes:   # a graph's default insertion point is its end
            if node.op == "placeholder":
                continue
            restored = graph.node_copy(node, val_map.__getitem__)
            restored.meta = dict(node.meta)
            val_map[node] = restored
        output = graph.output(torch.fx.map_arg(self._output_args, val_map.__getitem__)[0], self._output_type)
        output.kwargs = torch.fx.map_arg(self._output_kwargs, val_map.__getitem__)
        output.meta = dict(self._output_meta)
