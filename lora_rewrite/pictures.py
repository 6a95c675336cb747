"""Site pictures for `dump_dir`: one rewritten site's dataflow before and after the rewrite, by role.

Every value is labelled with what it is in the README's notation, not with its aten node name:

    X [N,i], W [o,i], A [r,i], B [o,r], bias, dY [N,o]       the site's inputs
    X·Aᵀ, (X·Aᵀ)·(s·B)ᵀ, …                                  each product as the graph brackets it
    Z1 = s·dY·B, W′ = W + s·B·A                             named wherever they appear
    Y, dA, dB, dX (and DoRA's dm)                            the values that leave the site

The roles are not guessed from the graph: they are the matcher's (`Site`, passes/site.py), read once
before the rewrite and kept for the after-picture, where each value that leaves the site is whatever
now stands where the old one was read (`RewrittenSite`, passes/rewrite.py, replaced every use).
What is guessed is only the algebra in between, the label of each product.

Views, reshapes, transposes and casts are not drawn: a transpose shows as ᵀ on its operand, a cast as the
dtype under the label. The drawing is layered left to right (longest path), edges that skip a layer
run through reserved empty slots, and every slanted stretch of an edge lies in the gap between two
columns, so no edge crosses a node. matplotlib draws; networkx orders the layers.

Labelling is best effort: a value it cannot express in roles keeps its FX node name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.fx import Node

# Ops that change how a value is viewed or stored, not what it is.
VIEW_OPS = {"view", "reshape", "_unsafe_view", "expand", "clone", "_to_copy", "convert_element_type", "alias",
            "contiguous", "squeeze", "unsqueeze", "detach", "lift_fresh_copy"}
PARAMETER_ROLES = ("W", "A", "B", "bias", "m")
OUTSIDE_DEPTH = 3     # how many ops above the site an input's expression may reach (the base's X·Wᵀ + bias)


# --- the algebra of labels ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sym:
    """A named matrix (X, W, A, B, dY, bias, Z1, W′, s), possibly transposed."""
    name: str
    t: bool = False


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Prod:
    left: Any
    right: Any


@dataclass(frozen=True)
class Sum:
    terms: tuple


@dataclass(frozen=True)
class Scaled:
    scale: Any        # Num or Sym("s")
    inner: Any


@dataclass(frozen=True)
class Cols:
    """Matrices side by side, [P | Q] (a product folded into another as extra columns)."""
    parts: tuple


@dataclass(frozen=True)
class Opaque:
    """A value the labels cannot express: shown by its FX node name."""
    name: str
    t: bool = False


def transpose(e):
    if isinstance(e, (Sym, Opaque)):
        return type(e)(e.name, not e.t)
    if isinstance(e, Prod):
        return Prod(transpose(e.right), transpose(e.left))
    if isinstance(e, Sum):
        return Sum(tuple(transpose(t) for t in e.terms))
    if isinstance(e, Scaled):
        return Scaled(e.scale, transpose(e.inner))
    return e


def plus(*terms) -> Sum:
    flat = []
    for term in terms:
        flat += list(term.terms) if isinstance(term, Sum) else [term]
    return Sum(tuple(flat))


def contains(e, kind: type, name: str | None = None) -> bool:
    if isinstance(e, kind) and (name is None or getattr(e, "name", None) == name):
        return True
    if isinstance(e, Prod):
        return contains(e.left, kind, name) or contains(e.right, kind, name)
    if isinstance(e, Sum):
        return any(contains(t, kind, name) for t in e.terms)
    if isinstance(e, Cols):
        return any(contains(t, kind, name) for t in e.parts)
    if isinstance(e, Scaled):
        return contains(e.scale, kind, name) or contains(e.inner, kind, name)
    return False


def normal_form(e):
    """Equal for expressions equal up to associativity of products, where scalars stand and the order of
    sums; the bracketing, which the picture shows, is ignored. Used to recognise Z1 and W′."""
    if isinstance(e, Sum):
        return ("sum", frozenset(normal_form(t) for t in e.terms))
    scalars, factors = [], []

    def walk(x):
        if isinstance(x, Prod):
            walk(x.left)
            walk(x.right)
        elif isinstance(x, Scaled):
            scalars.append(_scalar_key(x.scale))
            walk(x.inner)
        elif isinstance(x, Sum):
            factors.append(normal_form(x))
        else:
            factors.append(x)

    walk(e)
    return ("term", tuple(sorted(scalars)), tuple(factors))


def _scalar_key(s) -> str:
    return s.name if isinstance(s, Sym) else f"{s.value:g}"


S = Sym("s")
NAMED = {   # name -> its definition; each is also recognised transposed
    "Z1": Scaled(S, Prod(Sym("dY"), Sym("B"))),
    "W′": plus(Sym("W"), Scaled(S, Prod(Sym("B"), Sym("A")))),
}
_NAMED_FORMS = {}
for _name, _definition in NAMED.items():
    _NAMED_FORMS[normal_form(_definition)] = Sym(_name)
    _NAMED_FORMS[normal_form(transpose(_definition))] = Sym(_name, True)


def name_known(e, scale: Any):
    """Replace the number equal to the site's scale by s, and Z1 / W′ by their names, bottom up."""
    if isinstance(e, Num):
        return S if isinstance(scale, (int, float)) and math.isclose(e.value, scale, rel_tol=1e-6) else e
    if isinstance(e, Prod):
        e = Prod(name_known(e.left, scale), name_known(e.right, scale))
    elif isinstance(e, Sum):
        e = Sum(tuple(name_known(t, scale) for t in e.terms))
    elif isinstance(e, Scaled):
        e = Scaled(name_known(e.scale, scale), name_known(e.inner, scale))
    elif isinstance(e, Cols):
        return Cols(tuple(name_known(p, scale) for p in e.parts))
    return _NAMED_FORMS.get(normal_form(e), e)


def render(e, top: bool = True) -> str:
    if isinstance(e, (Sym, Opaque)):
        return e.name + ("ᵀ" if e.t else "")
    if isinstance(e, Num):
        return f"{e.value:g}"
    if isinstance(e, Cols):
        return "[" + " | ".join(render(p) for p in e.parts) + "]"
    if isinstance(e, Prod):
        return f"{_operand(e.left)}·{_operand(e.right)}"
    if isinstance(e, Scaled):
        inner = render(e.inner, False)
        return f"{render(e.scale, False)}·({inner})" if isinstance(e.inner, Prod) else f"{render(e.scale, False)}·{inner}"
    if isinstance(e, Sum):
        known = [t for t in e.terms if not contains(t, Opaque)]
        others = len(e.terms) - len(known)
        if known and others > 1:   # a gradient sum other layers also add to: name only the site's terms
            text = " + ".join(render(t, False) for t in known) + f" + {others} other terms"
        else:
            text = " + ".join(render(t, False) for t in e.terms)
        return text if top else f"({text})"
    return str(e)


def _operand(e) -> str:
    text = render(e, False)
    return f"({text})" if isinstance(e, (Prod, Scaled)) else text   # the bracketing is the point


# --- reading a site off the graph ----------------------------------------------------------------------

def op_name(node: Node) -> str:
    if node.op != "call_function":
        return node.op
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))


def _value(node: Any):
    return node.meta.get("val") if isinstance(node, Node) else None


def _shape(node: Any) -> tuple | None:
    v = _value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def is_transpose(node: Node) -> bool:
    op = op_name(node)
    if op == "t":
        return True
    v = _value(node)
    if not isinstance(v, torch.Tensor) or v.dim() != 2:
        return False
    if op == "permute":
        return list(node.args[1]) == [1, 0]
    return op == "transpose"


def is_view(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and (op_name(node) in VIEW_OPS or is_transpose(node))


def root(node: Any) -> Any:
    """The value a chain of views, transposes and casts starts from."""
    while is_view(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _ignores_first_input(node: Any) -> bool:
    """addmm(c, a, b, beta=0): c is never read (runlora's s·(a·b) as one BLAS call)."""
    return isinstance(node, Node) and op_name(node) == "addmm" and node.kwargs.get("beta", 1) == 0


def _read_inputs(node: Node) -> list[Node]:
    """The inputs whose values `node` reads."""
    if _ignores_first_input(node):
        return [a for a in node.args[1:3] if isinstance(a, Node)]
    return node.all_input_nodes


def _read_only_as_ignored_input(node: Node) -> bool:
    """A value only ever passed where it is not read (a beta = 0 addmm's first argument)."""
    return bool(node.users) and all(_ignores_first_input(u) and node not in u.args[1:3] for u in node.users)


def root_any(node: Any) -> Any:
    """As `root`, through permutes of any rank too: the op that produced the storage."""
    while isinstance(node, Node) and node.op == "call_function" and node.args and isinstance(node.args[0], Node) \
            and (op_name(node) in VIEW_OPS or op_name(node) in ("permute", "transpose", "t")):
        node = node.args[0]
    return node


@dataclass
class SiteRoles:
    """What the matcher's `Site` record says each value of the site is, kept from before the rewrite
    to label the after-picture alike.

    The inputs (X, A, B, W, bias, dY) are nodes the rewrite leaves in place. The values that leave
    the site (Y, dA, dB, dX) are replaced, every reader pointed at the new value
    (passes/rewrite.py): so each is kept as where it is read, and is, after, whatever is read there.
    """
    inputs: dict            # Node -> role
    results: dict           # Node -> Y | dA | dB | dX, the site's own nodes
    readers: list           # (role, a node outside the site that reads it, the position it reads it at)


def site_roles(site) -> SiteRoles:
    """The roles of a matched site (passes/site.py `Site`), from its record."""
    core = site.nodes()
    results = _result_roles(site)
    inside = set(core)
    readers = [(role, user, k) for node, role in results.items() for user in node.users if user not in inside
               for k, read in enumerate(_inputs_in_order(user)) if read is node]
    return SiteRoles(_input_roles(site, core), results, readers)


def _input_roles(site, core: list[Node]) -> dict[Node, str]:
    """X, A and B from the forward chain; W and bias from its base linear; dY from its gradients.
    Under the adapter's own dropout (`SiteFacts.dropout`) the adapter reads drop(X) and the base X."""
    fwd, roles = site.forward, {}
    base = fwd.base_product
    if base.w_io is not None:
        roles[root(base.w_io)] = "W"
    if base.bias is not None:
        roles[root(base.bias)] = "bias"
    if base.x is not None and (site.facts.dropout or site.facts.adapter_reads_base_input):
        roles[root(base.x)] = "X"
    roles[root(fwd.x)] = "drop(X)" if site.facts.dropout else "X"
    roles[root(fwd.a)], roles[root(fwd.b)] = "A", "B"
    for node, role in site.kind.roles(site)[0].items():   # the kind's own inputs (DoRA's magnitude m)
        roles[root(node)] = role
    if site.backward is not None:
        roles.update(_output_gradient_views(root_any(site.backward.dy), core, site.dims.o, roles))
    return roles


def _output_gradient_views(gradient: Node, core: list[Node], o: Any, roles: dict) -> dict[Node, str]:
    """dY for the output gradient and each [.., o] view of it the site reads it through: named one by
    one because a permute of any rank, which `expression` does not see through, may be among them."""
    core_set, found = set(core), {}
    for n in core:
        for arg in n.all_input_nodes:
            d = arg
            while d not in core_set and root_any(d) is gradient:
                if (_shape(d) or (0,))[-1:] == (o,) and d not in roles:
                    found[d] = "dY"
                if d is gradient or not isinstance(d.args[0], Node):
                    break
                d = d.args[0]
    return found


def _result_roles(site) -> dict[Node, str]:
    """Y, dA, dB and dX as the record names them. dX is the sum the adapter's dX_a joins when the
    matcher found it (`InputGradSum`), else dX_a itself; the base's summand is listed too, because a
    rewritten total dX takes its place in the sum (passes/rewrite.py, DxMode.TOTAL)."""
    results = {site.forward.out: "Y"}
    grads = site.backward
    if grads is None:
        return results
    results[grads.grad_b] = "dB"
    if grads.grad_a is not None:
        results[grads.grad_a] = "dA"
    results.update(site.kind.roles(site)[1])   # the kind's own results (DoRA's dm)
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
    """Y, dA, dB and dX after the rewrite: what each old value's readers read now, where runlora made it."""
    results = {}
    for role, user, k in roles.readers:
        read = _inputs_in_order(user)
        if k < len(read) and read[k] in new_nodes:
            results[read[k]] = role
    return results


def expression(node: Any, roles: dict, core: set, depth: int = 64, memo: dict | None = None):
    """What `node` computes, in roles; beyond the core at most OUTSIDE_DEPTH ops are followed."""
    memo = {} if memo is None else memo
    if isinstance(node, (int, float)):
        return Num(float(node))
    if not isinstance(node, Node):
        return Opaque(str(node))
    if node in roles:
        role = roles[node]
        return role if isinstance(role, Opaque) else Sym(role)
    if node not in core:
        depth = min(depth, OUTSIDE_DEPTH)
    key = (node, depth)
    if key in memo:
        return memo[key]
    e = _expression(node, roles, core, depth, memo)
    memo[key] = e
    return e


def _expression(node, roles, core, depth, memo):
    def sub(n, cost=1):
        return expression(n, roles, core, depth - cost, memo)

    op, args = op_name(node), node.args
    if depth <= 0 or node.op != "call_function":
        return Opaque(node.name)
    if is_transpose(node):
        return transpose(sub(args[0], 0))
    if op in VIEW_OPS:
        return sub(args[0], 0)
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    if beta not in (0, 1) or not isinstance(alpha, (int, float)) or (alpha != 1 and op != "addmm"):
        return Opaque(node.name)
    if op == "mm":
        return Prod(sub(args[0]), sub(args[1]))
    if op == "addmm":   # beta·c + alpha·(a·b): runlora passes the scale as alpha; beta = 0 ignores c
        product = Prod(sub(args[1]), sub(args[2]))
        product = product if alpha == 1 else Scaled(Num(float(alpha)), product)
        return product if beta == 0 else plus(sub(args[0]), product)
    if op == "cat" and (list(args) + [0])[1] in (1, -1) and isinstance(args[0], (list, tuple)):
        return Cols(tuple(sub(piece) for piece in args[0]))
    if op == "slice":
        folded = _slice_of_folded_product(node)
        if folded is not None:
            return Prod(sub(folded[0]), sub(folded[1]))
    if op == "add" and all(isinstance(a, Node) for a in args[:2]):
        return plus(sub(args[0]), sub(args[1]))
    if op in ("mul", "div") and len(args) == 2:
        number = next((a for a in args if isinstance(a, (int, float))), None)
        tensors = [a for a in args if isinstance(a, Node)]
        if number is not None and len(tensors) == 1:
            value = float(number) if op == "mul" else 1.0 / float(number)
            return sub(tensors[0]) if value == 1.0 else Scaled(Num(value), sub(tensors[0]))
        zero_d = [a for a in tensors if _shape(a) == ()]
        if op == "mul" and len(tensors) == 2 and len(zero_d) == 1:   # a tensor scale
            other = tensors[1] if tensors[0] is zero_d[0] else tensors[0]
            return Scaled(S, sub(other))
    return Opaque(node.name)


def _slice_of_folded_product(node: Node):
    """(P, Qₖ) where node is the column slice P·Qₖ of P·[Q₁ | Q₂] (a product folded into another, as
    runlora's [dY·W′ | Z1] = dY·[W′ | s·B]); None otherwise."""
    source, dim, start, end = (list(node.args) + [None] * 4)[:4]
    if not (isinstance(source, Node) and op_name(source) == "mm" and dim in (1, -1)):
        return None
    p, cat = source.args
    if not (isinstance(cat, Node) and op_name(cat) == "cat" and (list(cat.args) + [0])[1] in (1, -1)):
        return None
    offset = 0
    for piece in cat.args[0]:
        width = (_shape(piece) or (None, None))[1]
        if not isinstance(width, int):
            return None
        if (start, end) == (offset, offset + width):
            return p, piece
        offset += width
    return None


# --- what a picture holds --------------------------------------------------------------------------------

@dataclass
class PictureNode:
    kind: str            # "input" | "parameter" | "op"
    expr: Any
    shape: tuple | None
    dtype: str
    names: list          # FX node names it stands for
    leaves: bool = False  # its value is used outside the site
    result: str | None = None   # Y, dA, dB or dX, where it is one of the values the site hands on


@dataclass
class SitePicture:
    """A drawable summary of one site's subgraph, taken before the graph changes further."""
    roles: SiteRoles | None                       # the before-picture's, kept to label the after-picture alike
    scale: Any                                    # s, when a Python number (a tensor scale is drawn as s)
    nodes: dict = field(default_factory=dict)     # key -> PictureNode
    edges: list = field(default_factory=list)     # (key, key)


def _dtype(node: Any) -> str:
    v = _value(node)
    return str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else ""


def capture_site(site) -> SitePicture:
    """A matched site (passes/site.py `Site`) as PEFT and autograd computed it."""
    roles = site_roles(site)
    scale = site.forward.scale if isinstance(site.forward.scale, (int, float)) else None
    picture = capture(site.nodes(), roles.inputs, roles.results, scale)
    picture.roles = roles
    return picture


def capture_rewritten(done, before: SitePicture) -> SitePicture:
    """The same site after the rewrite (passes/rewrite.py `RewrittenSite`): the nodes runlora added."""
    new_nodes = list(done.new_nodes)
    return capture(new_nodes, before.roles.inputs, replacement_roles(before.roles, set(new_nodes)), before.scale)


def capture(core_nodes: Iterable[Any], roles: dict, results: dict, scale: Any = None) -> SitePicture:
    """The site's computing nodes (views folded into their users), its inputs by role, and edges;
    `results` names the values among `core_nodes` that the site hands on (Y, dA, dB, dX)."""
    core = [n for n in core_nodes if isinstance(n, Node)]
    core_set = set(core)
    picture = SitePicture(roles=None, scale=scale)
    drawn = [n for n in core if not is_view(n) and not _read_only_as_ignored_input(n)]
    drawn_set = set(drawn)
    known = dict(roles)   # and each input no role expresses, by its own name, as its box is labelled
    for n in drawn:
        for a in _read_inputs(n):
            while a not in drawn_set and a not in known and is_view(a):
                a = a.args[0]
            if a not in drawn_set and a not in known and contains(expression(a, roles, core_set), Opaque):
                known[a] = Opaque(a.name)
    memo: dict = {}

    def source_key(arg: Node) -> str:
        """The drawn node an argument comes from: a computing node of the site, or an input."""
        a = arg
        while a not in drawn_set and a not in known and is_view(a):
            a = a.args[0]
        if a in drawn_set:
            return a.name
        e = expression(a, known, core_set, memo=memo)
        label_key = render(_untransposed(e))
        key = f"in:{label_key}"
        if key not in picture.nodes:
            kind = "parameter" if isinstance(e, Sym) and e.name in PARAMETER_ROLES else "input"
            picture.nodes[key] = PictureNode(kind, _untransposed(e), _shape(a), _dtype(a), [a.name])
        elif a.name not in picture.nodes[key].names:
            picture.nodes[key].names.append(a.name)
        return key

    for n in drawn:
        picture.nodes[n.name] = PictureNode("op", expression(n, known, core_set, memo=memo), _shape(n), _dtype(n),
                                            [n.name])
    for n in drawn:
        for a in _read_inputs(n):
            edge = (source_key(a), n.name)
            if edge not in picture.edges:
                picture.edges.append(edge)
    for n in core:   # a value leaves the site when anything outside it (the output included) reads it
        if any(_read_outside(u, core_set) for u in n.users):
            _mark_leaving(picture, n, drawn_set, results.get(n), lambda m: expression(m, known, core_set, memo=memo))
    return picture


def _mark_leaving(picture: SitePicture, n: Node, drawn_set: set, result: str | None, expression_of) -> None:
    """Mark the drawn node `n` is (or views) as leaving the site, named `result` where it is one."""
    src = n
    while src not in drawn_set and is_view(src):
        src = src.args[0]
    if src.name not in picture.nodes:
        return
    drawn_node = picture.nodes[src.name]
    drawn_node.leaves = True
    drawn_node.result = result or drawn_node.result
    if src is not n and len(src.users) == 1 and _shape(n) is not None and _shape(src) is not None \
            and len(_shape(n)) == 2 and tuple(_shape(n)) == tuple(reversed(_shape(src))):
        # A product in its transposed form leaves as its transposed view: drawn as what leaves
        # (dB = s·(dYᵀ·Z2), not s·(Z2ᵀ·dY)).
        drawn_node.expr = expression_of(n)
        drawn_node.shape = _shape(n)


def _read_outside(user: Node, core: set) -> bool:
    """`user` is outside the site, and is not merely a view that only the site reads."""
    if user in core:
        return False
    if is_view(user):
        return any(_read_outside(u, core) for u in user.users)
    return True


def _untransposed(e):
    return type(e)(e.name, False) if isinstance(e, (Sym, Opaque)) else e


# --- labels -------------------------------------------------------------------------------------------------

def node_label(node: PictureNode, scale: Any) -> tuple[str, str]:
    """(the main line: what the value is, in roles; the shape and dtype line)."""
    named = name_known(node.expr, scale)
    if node.kind == "op" and isinstance(named, Sym):   # the value is Z1 or W′ itself: say what it is made of
        text = f"{render(named)} = {render(_operands_named(node.expr, scale))}"
    else:
        text = render(named)
    if node.kind == "op" and node.result:
        text = f"{node.result} = {text}"
    shape = f"{list(node.shape) if node.shape is not None else '?'} {node.dtype}".strip()
    return text, shape


def _operands_named(e, scale):
    if isinstance(e, Prod):
        return Prod(name_known(e.left, scale), name_known(e.right, scale))
    if isinstance(e, Sum):
        return Sum(tuple(name_known(t, scale) for t in e.terms))
    if isinstance(e, Scaled):
        return Scaled(name_known(e.scale, scale), name_known(e.inner, scale))
    return e


# --- layout: layered left to right, long edges through reserved slots ------------------------------------

@dataclass
class Layout:
    layer: dict                                     # key -> column
    columns: list                                   # per column: keys top to bottom (dummies included)
    chains: dict = field(default_factory=dict)      # edge -> [u, dummy…, v]


def layered(keys: list, edges: list) -> Layout:
    """Longest-path columns (each input pulled right next to its first reader), one reserved dummy slot
    per column an edge skips, then barycentre sweeps to cut crossings."""
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(keys)
    dag.add_edges_from(edges)
    layer: dict = {}
    for k in nx.topological_sort(dag):
        layer[k] = max((layer[p] + 1 for p in dag.predecessors(k)), default=0)
    for k in keys:
        if not dag.in_degree(k) and dag.out_degree(k):
            layer[k] = min(layer[c] for c in dag.successors(k)) - 1
    used = sorted(set(layer.values()))
    compact = {c: n for n, c in enumerate(used)}
    layer = {k: compact[c] for k, c in layer.items()}
    columns: list = [[] for _ in used]
    for k in keys:
        columns[layer[k]].append(k)
    out = Layout(layer, columns)
    links = []   # (left key, right key) between adjacent columns
    for u, v in edges:
        chain = [u]
        for c in range(layer[u] + 1, layer[v]):
            dummy = ("dummy", u, v, c)
            layer[dummy] = c
            columns[c].append(dummy)
            chain.append(dummy)
        chain.append(v)
        out.chains[(u, v)] = chain
        links += list(zip(chain, chain[1:]))
    left = {}
    right = {}
    for a, b in links:
        right.setdefault(a, []).append(b)
        left.setdefault(b, []).append(a)
    for _ in range(6):
        for c in range(1, len(columns)):
            _sort_by_barycentre(columns[c], columns[c - 1], left)
        for c in range(len(columns) - 2, -1, -1):
            _sort_by_barycentre(columns[c], columns[c + 1], right)
    return out


def _sort_by_barycentre(column: list, neighbour_column: list, neighbours: dict) -> None:
    position = {k: n for n, k in enumerate(neighbour_column)}
    current = {k: n for n, k in enumerate(column)}

    def key(k):
        ps = [position[p] for p in neighbours.get(k, []) if p in position]
        return (sum(ps) / len(ps), current[k]) if ps else (current[k], current[k])

    column.sort(key=key)


# --- drawing --------------------------------------------------------------------------------------------------

COLORS = {"input": "#e3e3e3", "parameter": "#fff0a8", "before": "#f4a582", "after": "#92c5de"}
MAIN_PT, SMALL_PT = 9.0, 7.0
PAD_X, PAD_Y, MARGIN_X = 0.14, 0.09, 0.12     # inches: inside a box; between a box and its column's edge
GAP_X, GAP_Y, DUMMY_H = 0.75, 0.22, 0.16      # between columns (where edges bend); between boxes; a skip slot


def _text_width(text: str, size: float) -> float:
    from matplotlib.textpath import TextPath

    return TextPath((0, 0), text, size=size).get_extents().width / 72.0


@dataclass
class Geometry:
    """Where everything goes, in inches: boxes by centre and size, edges as polylines (the last
    segment is the arrow's)."""
    boxes: dict                                   # key -> (x, y, w, h)
    edges: dict                                   # (u, v) -> (xs, ys)
    width: float
    height: float


def geometry(picture: SitePicture, labels: dict) -> Geometry:
    keys = list(picture.nodes)
    layout = layered(keys, picture.edges)
    size = {}
    for k, (main, sub) in labels.items():
        w = max(_text_width(main, MAIN_PT), _text_width(sub, SMALL_PT)) + 2 * PAD_X
        size[k] = (w, (MAIN_PT + SMALL_PT) / 72.0 * 1.35 + 2 * PAD_Y)
    col_w = [max([size[k][0] for k in col if k in size] + [0.3]) + 2 * MARGIN_X for col in layout.columns]
    col_x, x = [], 0.0
    for w in col_w:
        col_x.append(x + w / 2)
        x += w + GAP_X
    width = x - GAP_X
    pos: dict = {}
    height = 0.0
    for c, col in enumerate(layout.columns):
        heights = [size[k][1] if k in size else DUMMY_H for k in col]
        total = sum(heights) + GAP_Y * (len(col) - 1)
        height = max(height, total)
        y = total / 2
        for k, h in zip(col, heights):
            pos[k] = (col_x[c], y - h / 2)
            y -= h + GAP_Y

    def ports(k, side_edges):
        """y of each edge's end on one side of a box, spread over its height in the order of the other end."""
        ordered = sorted(side_edges, key=lambda e: -pos[e[1]][1])
        step = min(0.1, (size[k][1] - 2 * PAD_Y) / max(1, len(ordered)))
        return {e[0]: pos[k][1] + ((len(ordered) - 1) / 2 - n) * step for n, e in enumerate(ordered)}

    out_ports, in_ports = {}, {}
    for k in keys:
        out_ports.update(ports(k, [((u, v), layout.chains[(u, v)][1]) for u, v in picture.edges if u == k]))
        in_ports.update(ports(k, [((u, v), layout.chains[(u, v)][-2]) for u, v in picture.edges if v == k]))
    edges = {}
    for edge, chain in layout.chains.items():
        u, v = edge
        cu, cv = layout.layer[u], layout.layer[v]
        y0, y1 = out_ports[edge], in_ports[edge]
        xs = [pos[u][0] + size[u][0] / 2, col_x[cu] + col_w[cu] / 2]
        ys = [y0, y0]
        for d in chain[1:-1]:   # through the column's reserved slot, level
            c = layout.layer[d]
            xs += [col_x[c] - col_w[c] / 2, col_x[c] + col_w[c] / 2]
            ys += [pos[d][1], pos[d][1]]
        xs += [col_x[cv] - col_w[cv] / 2, pos[v][0] - size[v][0] / 2]
        ys += [y1, y1]
        edges[edge] = (xs, ys)
    boxes = {k: (*pos[k], *size[k]) for k in keys}
    return Geometry(boxes, edges, width, height)


def draw(picture: SitePicture, stem: Path, *, stage: str, title: str) -> list[Path]:
    """Write `stem`.png and `stem`.svg. `stage` is "before" (PEFT as traced) or "after" (runlora)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Patch

    keys = list(picture.nodes)
    labels = {k: node_label(picture.nodes[k], picture.scale) for k in keys}
    geo = geometry(picture, labels)
    width, height = geo.width, geo.height
    header, footer, side = 0.75, 0.55, 0.25
    title_w = max(_text_width(line, 9.5) for line in title.splitlines()) + 0.4
    fig_w, fig_h = max(width + 2 * side, title_w, 7.5), height + header + footer
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0, footer / fig_h, 1, height / fig_h))
    ax.set_xlim(-(fig_w - width) / 2, width + (fig_w - width) / 2)
    ax.set_ylim(-height / 2, height / 2)
    ax.axis("off")
    for xs, ys in geo.edges.values():
        ax.plot(xs[:-1], ys[:-1], color="#666666", linewidth=0.9, solid_capstyle="round", zorder=1)
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]), zorder=2,
                    arrowprops=dict(arrowstyle="-|>", color="#666666", linewidth=0.9, shrinkA=0, shrinkB=0,
                                    mutation_scale=9))
    op_color = COLORS["after" if stage == "after" else "before"]
    for k in keys:
        node = picture.nodes[k]
        x, y, w, h = geo.boxes[k]
        color = op_color if node.kind == "op" else COLORS[node.kind]
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                                    facecolor=color, edgecolor="#111111" if node.leaves else "#555555",
                                    linewidth=2.2 if node.leaves else 0.8, zorder=3))
        main, sub = labels[k]
        ax.text(x, y + h / 2 - PAD_Y, main, ha="center", va="top", fontsize=MAIN_PT, zorder=4)
        ax.text(x, y - h / 2 + PAD_Y, sub, ha="center", va="bottom", fontsize=SMALL_PT, color="#444444", zorder=4)
    fig.text(0.5, 1 - 0.12 / fig_h, title, ha="center", va="top", fontsize=9.5)
    legend = [Patch(facecolor=COLORS["input"], edgecolor="#555555", label="input (X, dY, base output)"),
              Patch(facecolor=COLORS["parameter"], edgecolor="#555555", label="parameter (W, A, B, bias)"),
              Patch(facecolor=op_color, edgecolor="#555555",
                    label="runlora's products" if stage == "after" else "PEFT's products and autograd's backward"),
              Patch(facecolor="white", edgecolor="#111111", linewidth=2.2, label="leaves the site (Y, dA, dB, dX, dm)")]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.5, 0.02 / fig_h))
    fig.text(0.5, (footer - 0.08) / fig_h, "ᵀ: transposed   s: the LoRA scale   Z1 = s·dY·B   W′ = W + s·B·A   "
             "views and casts are folded into their users", ha="center", va="top", fontsize=7, color="#444444")
    written = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        fig.savefig(path, dpi=120)
        written.append(path)
    plt.close(fig)
    return written
