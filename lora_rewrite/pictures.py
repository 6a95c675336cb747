"""Site pictures for `dump_dir`: one rewritten site's dataflow before and after the rewrite.

Every box is labelled from a record, never from the graph's op names:

    inputs      X, drop(X), A, B, W, bias, base, dY (and the kind's own: DoRA's m)   the matcher's `Site`
    before      each node the matcher established, as its kind names it          `SiteKind.labels` (the
                (X·Aᵀ, Z1 = (s·dY)·B, dX = dY·W + Z1·A, …)                         equations of its record)
    after       each product as the chosen variants' product lists name it         `Variant.gemms`: `Gemm.what`
                (W + s·B·A, dA = Z1ᵀ·X, …); where two products have one shape,
                the equation of the role it was emitted under                       forms.py `Role.equation`
    results     Y, dA, dB, dX (and the kind's: DoRA's dm): what each old value's readers read after the rewrite

Views, transposes and casts are folded into the op that reads them (their dtype is shown); any other op is
shown by its symbol (⊙, Σ, √, …). The roles are the matcher's, read once before the rewrite and kept for the
after-picture (passes/rewrite.py replaced every use of each value that leaves the site).

Layout: networkx's layered layout (`multipartite_layout` over the topological generations), left to right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.fx import Node

from lora_rewrite import compat
from lora_rewrite.forms import ROLE_BY_NAME
from lora_rewrite.passes.fx import ADDMM, BMM, MM, REPRESENTATION_OPS, ROLE_META, TRANSPOSES, is_call
from lora_rewrite.variants import Dims

aten = torch.ops.aten

FOLDED = REPRESENTATION_OPS | set(TRANSPOSES) | {aten.expand.default}   # drawn inside the op that reads them
PRODUCTS = (MM, ADDMM, BMM)
SYMBOLS = {aten.mul.Tensor: "⊙", aten.div.Tensor: "÷", aten.add.Tensor: "+", aten.sub.Tensor: "−",
           aten.sqrt.default: "√", aten.sum.dim_IntList: "Σ", aten.pow.Tensor_Scalar: "x²", aten.neg.default: "−",
           aten.where.self: "select", aten.where.ScalarSelf: "select", aten.where.ScalarOther: "select",
           aten.eq.Scalar: "= 0 ?", aten.cat.default: "[ | ]", aten.slice.Tensor: "columns",
           aten.select.int: "one row", aten.eq.Tensor: "identity", aten.unsqueeze.default: "column"}
PARAMETER_ROLES = ("W", "A", "B", "bias", "m")
RESULTS = ("Y", "dA", "dB", "dX", "dm")


# --- what each value is ---------------------------------------------------------------------------------

@dataclass
class SiteRoles:
    """The matcher's record of the site, kept from before the rewrite to label the after-picture alike.

    `inputs` are nodes the rewrite leaves in place; the values that leave the site (Y, dA, dB, dX, dm) are
    replaced, every reader pointed at the new value: each is kept as where it is read (`readers`)."""
    inputs: dict            # Node -> role
    results: dict           # Node -> Y | dA | dB | dX | dm, the site's own nodes
    readers: list           # (role, a node outside the site that reads it, the position it reads it at)
    labels: dict            # Node -> what the kind's record says it is (`SiteKind.labels`)


def root(node: Any) -> Any:
    """The value a chain of views, transposes and casts starts from."""
    while is_call(node, *FOLDED) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def site_roles(site) -> SiteRoles:
    """The roles of a matched site (passes/site.py `Site`), from its record."""
    inside = set(site.nodes())
    results = _result_roles(site)
    readers = [(role, user, k) for node, role in results.items() for user in node.users if user not in inside
               for k, read in enumerate(_inputs_in_order(user)) if read is node]
    return SiteRoles(_input_roles(site), results, readers, site.kind.labels(site))


def _input_roles(site) -> dict[Node, str]:
    """X, A, B and the base term from the forward chain; W and bias from its base product; dY from its gradients;
    the kind's own (DoRA's m). Under the adapter's own dropout the adapter reads drop(X) and the base X."""
    fwd, facts, roles = site.forward, site.facts, {}
    base = fwd.base_product
    roles[root(fwd.base2d if fwd.base2d is not None else fwd.base)] = "base"
    if base.w_io is not None:
        roles[root(base.w_io)] = "W"
    if base.bias is not None:
        roles[root(base.bias)] = "bias"
    if base.x is not None and (facts.dropout or facts.adapter_reads_base_input):
        roles[root(base.x)] = "X"
    roles[root(fwd.x)] = "drop(X)" if facts.dropout else "X"
    roles[root(fwd.a)], roles[root(fwd.b)] = "A", "B"
    roles.update({root(node): role for node, role in site.kind.roles(site)[0].items()})
    if site.backward is not None:
        roles[root(site.backward.dy)] = "dY"
    return roles


def _result_roles(site) -> dict[Node, str]:
    """Y, dA, dB and dX as the record names them. dX is the sum the adapter's dX_a joins when the matcher found
    it (`InputGradSum`), else dX_a itself; the base's summand is listed too, because a rewritten total dX takes
    its place in the sum (passes/rewrite.py, DxMode.TOTAL)."""
    results = {site.forward.out: "Y"}
    grads = site.backward
    if grads is None:
        return results
    results[grads.grad_b] = "dB"
    if grads.grad_a is not None:
        results[grads.grad_a] = "dA"
    results.update(site.kind.roles(site)[1])
    if grads.dx_sum is not None:
        results[grads.dx_sum.lora_add] = results[grads.dx_sum.base_end] = "dX"
    elif grads.grad_x_lora is not None:
        results[grads.grad_x_lora] = "dX"
    return results


def _inputs_in_order(node: Node) -> list[Node]:
    """Every node `node` reads, once per place it reads it, in a fixed order."""
    read: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), read.append)
    return read


def replacement_roles(roles: SiteRoles, new_nodes: set) -> dict[Node, str]:
    """Y, dA, dB, dX, dm after the rewrite: what each old value's readers read now, where runlora made it."""
    results = {}
    for role, user, k in roles.readers:
        read = _inputs_in_order(user)
        if k < len(read) and read[k] in new_nodes:
            results[read[k]] = role
    return results


def product_dims(node: Node) -> tuple | None:
    """(m, k, n) of a product node P[m,k]·Q[k,n] (an addmm's P and Q; a bmm's per batch)."""
    p, q = (node.args[1], node.args[2]) if is_call(node, ADDMM) else node.args[:2]
    sp, sq = _shape(p), _shape(q)
    if sp is None or sq is None:
        return None
    return tuple(_number(d) for d in (sp[-2], sp[-1], sq[-1]))


def gemm_labels(gemms) -> dict[tuple, list[str]]:
    """{(m, k, n): the `what` of every product of a variant's list with those sizes}, either orientation ("+ P·Q":
    the product is accumulated onto what the addmm adds it to)."""
    by_dims: dict[tuple, list[str]] = {}
    for g in gemms:
        what = g.what.removesuffix(" (base)")
        for dims in {(g.m, g.k, g.n), (g.n, g.k, g.m)}:
            by_dims.setdefault(tuple(_number(d) for d in dims), []).append(what)
    return by_dims


# --- the picture -------------------------------------------------------------------------------------------

@dataclass
class Box:
    kind: str                 # "input" | "parameter" | "op"
    label: str
    shape: tuple | None
    dtype: str
    leaves: bool = False      # its value is read outside the site
    result: str | None = None   # Y, dA, dB, dX or dm, where it is one of the values the site hands on

    def text(self) -> tuple[str, str]:
        """(what the value is, its shape and dtype)."""
        main = self.label
        if self.result and not main.startswith(f"{self.result} ="):
            main = f"{self.result} = {main}"
        return main, f"{list(self.shape) if self.shape is not None else '?'} {self.dtype}".strip()


@dataclass
class SitePicture:
    """A drawable summary of one site's subgraph, taken before the graph changes further."""
    roles: SiteRoles | None
    boxes: dict = field(default_factory=dict)    # key -> Box
    edges: list = field(default_factory=list)    # (key, key)


def capture_site(site) -> SitePicture:
    """A matched site (passes/site.py `Site`) as PEFT and autograd computed it, labelled by its kind's record."""
    roles = site_roles(site)
    picture = capture(site.nodes(), roles.inputs, roles.results, lambda n: roles.labels.get(n))
    picture.roles = roles
    return picture


def capture_rewritten(done, before: SitePicture) -> SitePicture:
    """The same site after the rewrite (passes/rewrite.py `RewrittenSite`): the nodes runlora added, each product
    labelled by the chosen variants' product lists."""
    dims = done.site.dims
    n = dims.N if isinstance(dims.N, int) else compat.size_hint(dims.N) or 1
    report_dims = Dims(n, dims.i, dims.o, dims.r, dims.needs_dx)
    gemms = done.forward.gemms(report_dims) + (done.backward.gemms(report_dims) if done.backward else [])
    by_dims = gemm_labels(gemms)
    new_nodes = list(done.new_nodes)
    made = set(new_nodes)
    products = done.products   # the rewrite's record of the products later passes reuse
    named = {products.backward_xa: "Z2 = X·Aᵀ", products.z1: "Z1", products.forward_xa: "X·Aᵀ"}
    adapter_input = "drop(X)" if done.site.facts.dropout else "X"   # as the matcher's record names it

    def label(node: Node) -> str | None:
        text = _label(node)
        return re.sub(r"\bX\b", adapter_input, text) if text is not None else None

    def _label(node: Node) -> str | None:
        whats = set(by_dims.get(product_dims(node), [])) if is_call(node, *PRODUCTS) else set()
        if len(whats) == 1:
            what = whats.pop()
            if what.startswith("+ ") and is_call(node, ADDMM):   # accumulated onto the addmm's first argument
                accumulator = root(node.args[0])
                onto = label(accumulator) if accumulator in made else before.roles.inputs.get(accumulator)
                return f"{onto or '…'} {what}"
            return what
        if node in named:
            return named[node]
        role = ROLE_BY_NAME.get(node.meta.get(ROLE_META))
        if role is None or not (is_call(node, *PRODUCTS) or is_call(node, aten.slice.Tensor)):
            return None
        equation = role.equation.split(": ")[0].split(" [N")[0].split(" [o")[0].split(" [r")[0]
        if is_call(node, aten.slice.Tensor) and equation.startswith("["):
            blocks = equation[1:equation.index("]")].split(" | ")   # a column block of a folded product
            return blocks[0] if node.args[2] == 0 else blocks[-1]
        return equation

    return capture(new_nodes, before.roles.inputs, replacement_roles(before.roles, made), label)


def capture(core_nodes: Iterable[Any], inputs: dict, results: dict, label_of) -> SitePicture:
    """The site's computing nodes (folded ops inside their readers), its inputs by role, and the edges;
    `results` names the values among `core_nodes` the site hands on, `label_of(node)` says what a node is."""
    core = [n for n in core_nodes if isinstance(n, Node)]
    core_set = set(core)
    drawn = [n for n in core if not is_call(n, *FOLDED) and not _only_unread(n)]
    drawn_set = set(drawn)
    picture = SitePicture(roles=None)

    def source(arg: Node) -> str:
        """The box an argument comes from: a drawn node of the site, or an input (one box per input value)."""
        node = arg
        while node not in drawn_set and node not in inputs and is_call(node, *FOLDED) \
                and isinstance(node.args[0], Node):
            node = node.args[0]
        if node in drawn_set:
            return node.name
        role = inputs.get(node, "input")
        key = f"in:{role}" if node in inputs else f"in:{node.name}"
        if key not in picture.boxes:
            kind = "parameter" if role in PARAMETER_ROLES else "input"
            picture.boxes[key] = Box(kind, role, _shape(node), _dtype(node))
        return key

    for n in drawn:
        picture.boxes[n.name] = Box("op", label_of(n) or _symbol(n), _shape(n), _dtype(n))
    for n in drawn:
        for arg in _read_inputs(n):
            edge = (source(arg), n.name)
            if edge not in picture.edges:
                picture.edges.append(edge)
    for n in core:   # a value leaves the site when anything outside it (the output included) reads it
        if any(_read_outside(u, core_set) for u in n.users):
            box = n
            while box not in drawn_set and is_call(box, *FOLDED) and isinstance(box.args[0], Node):
                box = box.args[0]
            if box.name in picture.boxes:
                picture.boxes[box.name].leaves = True
                picture.boxes[box.name].result = results.get(n) or results.get(box) or picture.boxes[box.name].result
    return picture


def _only_unread(node: Node) -> bool:
    """A value only ever passed where it is not read (a beta = 0 addmm's first argument: runlora's s·(P·Q))."""
    return bool(node.users) and all(is_call(u, ADDMM) and u.kwargs.get("beta", 1) == 0 and node not in u.args[1:3]
                                    for u in node.users)


def _read_inputs(node: Node) -> list[Node]:
    if is_call(node, ADDMM) and node.kwargs.get("beta", 1) == 0:
        return [a for a in node.args[1:3] if isinstance(a, Node)]
    return node.all_input_nodes


def _read_outside(user: Node, core: set) -> bool:
    """`user` is outside the site, and is not merely a folded op that only the site reads."""
    if user in core:
        return False
    if is_call(user, *FOLDED):
        return any(_read_outside(u, core) for u in user.users)
    return True


def _shape(node: Any) -> tuple | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _dtype(node: Any) -> str:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else ""


def _number(size: Any) -> Any:
    return size if isinstance(size, int) else compat.size_hint(size)


def _symbol(node: Node) -> str:
    """An op no record names: its symbol (a product by a number is the scale, s·)."""
    if is_call(node, aten.mul.Tensor) and any(isinstance(a, (int, float)) for a in node.args):
        return "s·"
    if node.target in SYMBOLS:
        return SYMBOLS[node.target]
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))


# --- layout and drawing ------------------------------------------------------------------------------------

def layout(picture: SitePicture) -> dict[str, tuple[float, float]]:
    """{box: (column, row)}: networkx's layered layout, each box in the column of its topological generation
    (inputs pulled right next to their first reader), left to right."""
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(picture.boxes)
    dag.add_edges_from(picture.edges)
    for column, keys in enumerate(nx.topological_generations(dag)):
        for key in keys:
            dag.nodes[key]["column"] = column
    for key in dag:   # an input sits one column before its first reader
        if not dag.in_degree(key) and dag.out_degree(key):
            dag.nodes[key]["column"] = min(dag.nodes[c]["column"] for c in dag.successors(key)) - 1
    low = min((dag.nodes[k]["column"] for k in dag), default=0)
    for key in dag:
        dag.nodes[key]["column"] -= low
    positions = nx.multipartite_layout(dag, subset_key="column", align="vertical", scale=1.0)
    return {key: (float(x), float(y)) for key, (x, y) in positions.items()}


COLORS = {"input": "#e3e3e3", "parameter": "#fff0a8", "before": "#f4a582", "after": "#92c5de"}


def draw(picture: SitePicture, stem: Path, *, stage: str, title: str) -> list[Path]:
    """Write `stem`.png and `stem`.svg. `stage` is "before" (PEFT as traced) or "after" (runlora)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    positions = layout(picture)
    columns = len({round(x, 6) for x, _ in positions.values()}) or 1
    rows = max([sum(1 for p in positions.values() if abs(p[0] - x) < 1e-6) for x, _ in positions.values()] or [1])
    title_width = 0.075 * max(len(line) for line in title.splitlines())   # inches, at the title's 8.5 pt
    fig, ax = plt.subplots(figsize=(max(7.5, 2.4 * columns, title_width), max(3.5, 0.8 * rows + 1.8)))
    ax.axis("off")
    op_color = COLORS["after" if stage == "after" else "before"]
    for u, v in picture.edges:
        ax.annotate("", xy=positions[v], xytext=positions[u], zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color="#666666", linewidth=0.8, shrinkA=14, shrinkB=14,
                                    connectionstyle="arc3,rad=0.08"))
    for key, box in picture.boxes.items():
        main, sub = box.text()
        color = op_color if box.kind == "op" else COLORS[box.kind]
        ax.text(*positions[key], f"{main}\n{sub}", ha="center", va="center", fontsize=8, zorder=3,
                bbox=dict(boxstyle="round,pad=0.35", facecolor=color, edgecolor="#111111" if box.leaves else "#555555",
                          linewidth=2.0 if box.leaves else 0.8))
    legend = [Patch(facecolor=COLORS["input"], edgecolor="#555555", label="input (X, dY, base output)"),
              Patch(facecolor=COLORS["parameter"], edgecolor="#555555", label="parameter (W, A, B, bias, m)"),
              Patch(facecolor=op_color, edgecolor="#555555",
                    label="runlora's products" if stage == "after" else "PEFT's products and autograd's backward"),
              Patch(facecolor="white", edgecolor="#111111", linewidth=2.0, label="leaves the site (Y, dA, dB, dX, dm)")]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(title + "\nᵀ: transposed   s: the LoRA scale   views and casts are folded into their readers",
                 fontsize=8.5)
    xs, ys = [x for x, _ in positions.values()], [y for _, y in positions.values()]
    pad_x = (max(xs) - min(xs)) / max(1, columns - 1) * 0.6 if len(set(xs)) > 1 else 1.0
    pad_y = (max(ys) - min(ys)) / max(1, rows - 1) * 0.8 if len(set(ys)) > 1 else 1.0
    ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.08)
    written = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)
    return written
