"""Finding PEFT LoRA sites in an Inductor joint (or inference) graph, after Inductor's joint passes.

A site is `Y = base + s·(X·Aᵀ)·Bᵀ` where `base = X_b·Wᵀ (+ bias)` is usually the base linear, together
with the backward nodes autograd derived from it:

    forward                                   backward (dY: gradient of Y)
    xa   = mm(X, Aᵀ)            [N,r]         g    = s·dY                 [N,o]
    xab  = mm(xa, Bᵀ)           [N,o]         dB   = mm(gᵀ, xa)           [o,r]
    term = s·view(xab)                        z1   = mm(g, B)             [N,r]
    out  = base + term                        dA   = mm(z1ᵀ, X)           [r,i]
                                              dX_a = mm(z1, A)            [N,i]   (if X needs a gradient)
                                              dX   = … + view(dX_a) + view(mm(dY, W)) + …

Matching is on graph structure and shapes, never on names. Every check that fails gives the reason
the site is left untouched. The rewrite that follows only replaces the values of `out`, dA, dB and
dX by algebraically equal expressions in the same inputs, so what the matcher must establish is the
algebra above, node by node: which node is A, B, X, s and dY, and that each product really is the one
the equation says. Where it cannot establish something, the dependent rewrite is not done:

- no complete backward (dA and dB)  → only the forward is rewritten
- X_b is not X (dropout), or the adapter computes in another dtype than the base
                                     → the merged-weight variants are illegal
- the base input-gradient product cannot be found in the same sum as the adapter's
                                     → dX keeps its sum; only the adapter's part is rewritten
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node

from lora_rewrite.variants import Dims

aten = torch.ops.aten
prims = torch.ops.prims

MM = aten.mm.default
ADDMM = aten.addmm.default
ADD = aten.add.Tensor
MUL = aten.mul.Tensor
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
CASTS = (prims.convert_element_type.default, aten._to_copy.default)

# Ops whose result depends only on their arguments: two such nodes with equal arguments hold the same
# value, which is how "the adapter and the base see the same X" is established (Inductor's joint
# passes do not CSE, so X is often viewed or cast twice).
PURE_OPS = set(VIEWS) | set(CASTS) | {
    aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default, aten.clone.default,
    aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.contiguous.default,
}
RANDOM_OPS = {
    aten.rand.default, aten.rand_like.default, aten.bernoulli.default, aten.bernoulli.p,
    aten.native_dropout.default,
}
for _name in ("inductor_random", "inductor_randint"):
    if hasattr(prims, _name):
        RANDOM_OPS.add(getattr(prims, _name).default)
for _name in ("run_and_save_rng_state", "run_with_rng_state"):
    _hop = getattr(torch.ops.higher_order, _name, None)
    if _hop is not None:
        RANDOM_OPS.add(_hop)


# --- what a match produces ---------------------------------------------------------------------------

@dataclass
class LinearBase:
    """base = X_b·w_io (+ bias): the base layer's product, with its weight as the [i,o] operand."""

    node: Node          # the mm/addmm
    x: Node             # X_b [N,i]
    w_io: Node          # Wᵀ [i,o] (nn.Linear: permute(W); transformers' Conv1D: its weight as stored)
    bias: Node | None


@dataclass
class InputGradSum:
    """dX = … + dX_a_end + dX_b_end + …: where the adapter's and the base's input gradients meet."""

    lora_end: Node      # dX_a, or its view to X's shape
    lora_add: Node      # the add that takes lora_end
    base_mm: Node       # mm(dY, W)
    base_end: Node      # base_mm, or its view, or the cast of that, as it enters the sum
    view_args: Any      # view args from [N,i] back to X's shape, None if X is 2-D
    cast_to: Any        # the dtype both summands are cast to before the sum (autocast), or None


@dataclass
class Site:
    anchor: Node                 # xa = mm(X, Aᵀ)
    module_path: str
    adapter: str | None
    module_key: str | None
    x: Node                      # the adapter's input [N,i]
    a: Node                      # A [r,i] as the adapter computes with it (maybe a cast of the parameter)
    b: Node                      # B [o,r]
    scale: Any                   # a Python number or a 0-d tensor node
    out: Node                    # base + s·(X·Aᵀ)·Bᵀ
    base: Node                   # the base term of that sum
    base2d: Node | None          # the same as [N,o], when it already exists in the graph
    out_shape_args: Any          # view args [N,o] -> out's shape; None when out is 2-D
    n_arg: Any                   # N as view args spell it (an int or a SymInt node)
    linear: LinearBase | None
    dims: Dims
    dropout: bool
    dtype: torch.dtype           # the adapter's compute dtype
    out_dtype: torch.dtype
    base_dtype: torch.dtype
    forward_nodes: list = field(default_factory=list)
    # backward (None when the graph has none for this site)
    dy: Node | None = None       # unscaled dY, in the adapter's dtype
    dy_shape_args2d: Any = None
    grad_a: Node | None = None
    grad_b: Node | None = None
    grad_x_lora: Node | None = None
    dx_sum: InputGradSum | None = None
    backward_nodes: list = field(default_factory=list)
    backward_note: str = ""      # why the backward is not rewritten, when it is not
    merge_forward_block: str | None = None    # None: forward2 is legal here
    merge_backward_block: str | None = None   # None: backward4/5 are legal here

    def nodes(self) -> list[Node]:
        """Every node of the graph the site consists of, forward and backward."""
        extra = [self.out, self.grad_a, self.grad_b, self.grad_x_lora]
        if self.dx_sum is not None:
            d = self.dx_sum
            extra += [d.lora_end, d.lora_add, d.base_mm, d.base_end]
        seen, result = set(), []
        for n in list(self.forward_nodes) + list(self.backward_nodes) + extra:
            if isinstance(n, Node) and n not in seen:
                seen.add(n)
                result.append(n)
        return result

    @property
    def has_backward(self) -> bool:
        return self.grad_a is not None and self.grad_b is not None

    @property
    def dx_mode(self) -> str | None:
        if self.grad_x_lora is None:
            return None
        return "total" if self.dx_sum is not None else "lora"


@dataclass
class Skip:
    """A LoRA-looking chain X·Aᵀ·Bᵀ that is left exactly as it was, and why."""

    anchor: Node
    module_path: str
    reason: str
    module_key: str | None = None


class NoMatch(Exception):
    pass


# --- small structural helpers ------------------------------------------------------------------------

def is_call(node: Any, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def val(node: Any):
    return node.meta.get("val") if isinstance(node, Node) else None


def shape(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: Any):
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        from lora_rewrite.compat import statically_known_true

        return statically_known_true(a == b)
    except Exception:
        return False


def same_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def transpose_source(node: Any) -> Node | None:
    """P when node is Pᵀ of a 2-D P (permute [1,0], t, or transpose of the two dims)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    if node.target is aten.permute.default and list(node.args[1]) == [1, 0]:
        return node.args[0]
    if node.target is aten.t.default:
        return node.args[0]
    if node.target is aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
        src = node.args[0]
        return src if shape(src) is not None and len(shape(src)) == 2 else None
    return None


def same_value(a: Any, b: Any, depth: int = 8) -> bool:
    """True when a and b certainly hold the same value: the same node, or the same pure op on
    arguments that hold the same values."""
    if a is b:
        return True
    if not isinstance(a, Node) or not isinstance(b, Node):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same_value(x, y, depth) for x, y in zip(a, b))
        if isinstance(a, Node) or isinstance(b, Node):
            return False
        return type(a) is type(b) and a == b
    if depth == 0 or a.op != "call_function" or b.op != "call_function":
        return False
    if a.target is not b.target or a.target not in PURE_OPS:
        return False
    if a.target in VIEWS:  # view(x, [-1, 64]) and view(x, [32, 64]) are the same view
        return same_shape(shape(a), shape(b)) and same_value(a.args[0], b.args[0], depth - 1)
    if set(a.kwargs) != set(b.kwargs) or any(not same_value(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs):
        return False
    return len(a.args) == len(b.args) and all(same_value(x, y, depth - 1) for x, y in zip(a.args, b.args))


def is_matrix(node: Any, source: Node) -> bool:
    """node holds `source` itself (possibly as a transpose of its transpose)."""
    if same_value(node, source):
        return True
    inner = transpose_source(node)
    return inner is not None and transpose_source(inner) is not None and same_value(transpose_source(inner), source)


def single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


LAYOUT_OPS = tuple(VIEWS) + (aten.clone.default, aten.contiguous.default)


def strip_layout(node: Any) -> Any:
    """Through views, reshapes and clones: the node whose elements, in order, these hold."""
    while is_call(node, *LAYOUT_OPS):
        node = node.args[0]
    return node


def is_scalar_operand(x: Any) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    v = val(x)
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point


def same_scale(a: Any, b: Any) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return same_value(a, b)
    return float(a) == float(b)


def split_scale(node: Node) -> tuple[Node, Any] | None:
    """(t, s) when node is t·s with s a scalar."""
    if not is_call(node, MUL) or len(node.args) != 2 or node.kwargs:
        return None
    x, y = node.args
    if isinstance(x, Node) and is_scalar_operand(y):
        return x, y
    if isinstance(y, Node) and is_scalar_operand(x):
        return y, x
    return None


WEIGHT_OPS = (aten.permute.default, aten.t.default, aten.transpose.int) + tuple(VIEWS) + tuple(CASTS)


def is_weight(node: Any) -> bool:
    """A parameter as the graph reads it (through transposes, views and casts), or a merged weight
    W + s·B·A that runlora itself built for another adapter on the same layer."""
    while is_call(node, *WEIGHT_OPS):
        node = node.args[0]
    return isinstance(node, Node) and (node.op == "placeholder" or bool(node.meta.get("runlora")))


def backward_region(graph: Graph) -> set[Node]:
    """Nodes that depend on a tangent: the backward half of a joint graph (empty for inference)."""
    region: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" and "tangents" in str(node.target):
            region.add(node)
        elif any(isinstance(a, Node) and a in region for a in node.all_input_nodes):
            region.add(node)
    return region


_MODULE_KEY = re.compile(r"\.__dict__\['_modules'\]\['([^']*)'\]|\._modules\['([^']*)'\]|\['([^']*)'\]")


def clean_module_path(raw: str) -> str:
    """"L['self'].__dict__['_modules']['base_model']…layers.0.proj" -> "base_model….layers.0.proj"."""
    path = _MODULE_KEY.sub(lambda m: "." + next(g for g in m.groups() if g is not None), raw)
    path = path.strip(".")
    for prefix in ("L.self", "L__self__", "self", "L.fn", "L.model", "L.mod", "L"):
        if path == prefix or path.startswith(prefix + "."):
            path = path[len(prefix):]
            break
    path = re.sub(r"^L__self___", "", path)
    return path.strip(".")


def module_path_of(node: Node) -> tuple[str, str | None, str | None]:
    """The PEFT LoRA module that produced `node`, its adapter name, and the module's Dynamo key (the
    `id` of the module object, which `explain` resolves to a name in the user's model), from the
    nn_module_stack metadata. The path is relative to the compiled frame's `self`."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    entries = [(key, clean_module_path(entry[0])) for key, entry in stack.items() if isinstance(entry, tuple)]
    by_path = {path: key for key, path in entries}
    for _, path in reversed(entries):
        parts = path.split(".")
        for marker in ("lora_A", "lora_B"):
            if marker in parts:
                k = parts.index(marker)
                adapter = parts[k + 1] if k + 1 < len(parts) else None
                owner = ".".join(parts[:k])
                key = by_path.get(owner)
                return owner, adapter, (str(key).split("@")[0] if key is not None else None)
    return (entries[-1][1] if entries else "<unknown>"), None, None


def _ancestors(node: Node, depth: int) -> set[Node]:
    seen: set[Node] = set()
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if isinstance(n, Node) and n not in seen:
                seen.add(n)
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return seen


def find_dropout(x: Node, base: Node, depth: int = 10) -> bool:
    """Is there a random op (PEFT's lora_dropout) between the model and the adapter's input X that the
    base result does not also depend on? The model's own dropouts upstream feed both, and do not count."""
    shared = _ancestors(base, 3 * depth)
    frontier, seen = [x], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen or n in shared:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target in RANDOM_OPS:
                return True
            if n.op == "call_function" and n.target is operator.getitem and is_call(n.args[0], *RANDOM_OPS):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


# --- anchors ---------------------------------------------------------------------------------------------

def find_anchors(graph: Graph, backward: set[Node]) -> list[Node]:
    """Forward nodes xa = mm(X, Aᵀ) whose result is multiplied by Bᵀ: the start of every LoRA chain."""
    anchors = []
    for node in graph.nodes:
        if node in backward or not is_call(node, MM):
            continue
        x, at = node.args
        a = transpose_source(at)
        if a is None or shape(a) is None or len(shape(a)) != 2 or shape(x) is None or len(shape(x)) != 2:
            continue
        for user in node.users:
            if user in backward:
                continue
            if is_call(user, MM) and user.args[0] is node and transpose_source(user.args[1]) is not None:
                anchors.append(node)
                break
            if is_call(user, ADDMM) and user.args[1] is node and transpose_source(user.args[2]) is not None:
                anchors.append(node)
                break
            if is_call(user, MUL) and shape(node)[-1] == 1 and transpose_source(user.args[-1]) is not None:
                anchors.append(node)  # rank 1: Inductor may turn (X·Aᵀ)·Bᵀ into a broadcast product
                break
    return anchors


# --- the forward ------------------------------------------------------------------------------------

def _fail(reason: str):
    raise NoMatch(reason)


def _match_forward(anchor: Node, backward: set[Node]) -> dict:
    x, at = anchor.args
    a = transpose_source(at)
    n, i = shape(x)
    r, i_a = shape(a)
    if not same_size(i, i_a) or isinstance(r, torch.SymInt) or isinstance(i, torch.SymInt):
        _fail("A's shape does not match X's features statically")

    fwd_users = [u for u in anchor.users if u not in backward]
    if len(fwd_users) != 1:
        _fail("X·Aᵀ feeds more than one forward op")
    xab = fwd_users[0]
    if is_call(xab, ADDMM):
        _fail("lora_B has a bias (lora_bias=True), which the rewrite does not cover")
    if is_call(xab, MUL):
        _fail("rank 1: Inductor turned (X·Aᵀ)·Bᵀ into an elementwise product, which the rewrite does not cover")
    if not (is_call(xab, MM) and xab.args[0] is anchor):
        _fail("X·Aᵀ is not multiplied by Bᵀ")
    b = transpose_source(xab.args[1])
    o, r_b = shape(b)
    if not same_size(r, r_b) or isinstance(o, torch.SymInt):
        _fail("B's shape does not match A's rank statically")

    chain = [xab]
    cur = xab
    out_shape_args = None
    nxt = single_user(cur)
    if nxt is None:
        _fail("(X·Aᵀ)·Bᵀ is used by more than one op")
    if is_call(nxt, *VIEWS):
        out_shape_args = nxt.args[1]
        cur = nxt
        chain.append(cur)
        nxt = single_user(cur)
        if nxt is None:
            _fail("the adapter output is used by more than one op")
    scale: Any = 1.0
    if is_call(nxt, MUL):
        split = split_scale(nxt)
        if split is None or split[0] is not cur:
            _fail("the adapter output is multiplied by a tensor that is not a scalar "
                  "(DoRA's magnitude, or another LoRA variant)")
        scale = split[1]
        cur = nxt
        chain.append(cur)
        nxt = single_user(cur)
        if nxt is None:
            _fail("the scaled adapter output is used by more than one op")
    if not is_call(nxt, ADD) or nxt.kwargs.get("alpha", 1) != 1 or len(nxt.args) != 2:
        _fail(f"the adapter output is not added to a base result (it goes to {getattr(nxt, 'target', nxt)})")
    out = nxt
    base = out.args[1] if out.args[0] is cur else out.args[0]
    if base is cur or not isinstance(base, Node):
        _fail("the adapter output is added to itself or to a constant")

    out_shape, base_shape = shape(out), shape(base)
    if not same_shape(out_shape, base_shape) or not same_size(out_shape[-1], o):
        _fail("the base result and the adapter output have different shapes (broadcasting)")
    lora_dtype, out_dtype, base_dtype = dtype(anchor), dtype(out), dtype(base)
    if dtype(xab) != lora_dtype or dtype(cur) != lora_dtype or lora_dtype != out_dtype:
        _fail(f"the adapter computes in {lora_dtype} but the sum is {out_dtype}")
    if len(out_shape) != 2 and out_shape_args is None:
        _fail("the adapter output reaches the sum without a view")

    base2d = None
    if len(base_shape) == 2:
        base2d = base
    elif is_call(base, *VIEWS) and shape(base.args[0]) is not None and len(shape(base.args[0])) == 2:
        base2d = base.args[0]
    n_arg = None
    if is_call(x, *VIEWS):
        n_arg = x.args[1][0]
    elif len(out_shape) == 2:
        n_arg = n
    linear = None
    if base2d is not None and is_call(base2d, MM, ADDMM):
        mm_args = base2d.args if is_call(base2d, MM) else base2d.args[1:]
        bias = None if is_call(base2d, MM) else base2d.args[0]
        xb, w_io = mm_args
        if (same_shape(shape(w_io), (i, o)) and not base2d.kwargs and is_weight(w_io)
                and (bias is None or len(shape(bias) or ()) == 1)):
            linear = LinearBase(base2d, xb, w_io, bias)
    if linear is None and not strip_layout(base).meta.get("runlora"):
        _fail("the base layer is not a plain linear of a weight parameter (a quantized or custom base "
              "layer, or an adapter whose own site was left untouched)")
    return dict(x=x, a=a, b=b, scale=scale, out=out, base=base, base2d=base2d, n_arg=n_arg,
                out_shape_args=out_shape_args, linear=linear, dims=(n, i, o, r),
                dtypes=(lora_dtype, out_dtype, base_dtype), forward_nodes=[anchor, *chain, out])


MERGE_DTYPE_BLOCK = ("the adapter computes in {} but the base in {}: merging would round the adapter "
                     "into the base weight's precision")


def _merge_forward_block(site: Site) -> str | None:
    lin = site.linear
    if lin is None:
        return "the base result is not a plain linear of the input (another adapter, or a quantized base)"
    if site.base_dtype != site.dtype or dtype(lin.w_io) != site.dtype:
        return MERGE_DTYPE_BLOCK.format(site.dtype, site.base_dtype)
    if site.dropout:
        return "lora_dropout: the adapter's input differs from the base's, X·(W + s·B·A)ᵀ would be wrong"
    if not same_value(lin.x, site.x):
        return "the adapter's input is not provably the base's input"
    base_users = set(site.base.users) | (set(lin.node.users) if lin.node is not site.base else set())
    if not base_users <= {site.out, site.base}:
        return "the base result is used elsewhere too, so it would still have to be computed"
    return None


# --- the backward -----------------------------------------------------------------------------------------

def _match_backward(site: Site, backward: set[Node]) -> None:
    anchor = site.anchor
    bw_users = [u for u in anchor.users if u in backward]
    grad_b = None
    g = None
    for u in bw_users:
        if is_call(u, MM) and u.args[1] is anchor and transpose_source(u.args[0]) is not None:
            grad_b, g = u, transpose_source(u.args[0])
        else:
            _fail_backward(site, "X·Aᵀ is used in the backward by an op other than dB = gᵀ·(X·Aᵀ)")
            return
    if grad_b is None:
        site.backward_note = "no gradient for the adapter weights in this graph"
        return
    n, i, o, r = site.dims.N, site.dims.i, site.dims.o, site.dims.r
    if not same_shape(shape(g), (n, o)):
        return _fail_backward(site, "dB's left factor is not [N,o]")

    # g = s·dY, as [N,o]: maybe a view (of a clone) of an nD product.
    g_source = strip_layout(g)
    dy_shape_args2d = g.args[1] if is_call(g, *VIEWS) else None
    split = split_scale(g_source)
    if split is not None and same_scale(split[1], site.scale):
        dy = split[0]
    elif isinstance(site.scale, (int, float)) and site.scale == 1:
        dy = g_source
    else:
        return _fail_backward(site, "the gradient reaching B is not the output gradient times the scale")
    if dtype(dy) != site.dtype:
        return _fail_backward(site, "the output gradient is in another dtype than the adapter")

    # z1 = g·B, then dA = z1ᵀ·X and dX_a = z1·A.
    z1 = None
    for u in g.users:
        if is_call(u, MM) and u.args[0] is g and is_matrix(u.args[1], site.b):
            z1 = u
    if z1 is None:
        return _fail_backward(site, "the product g·B was not found")
    grad_a = grad_x_lora = None
    for u in z1.users:
        if transpose_source(u) is z1:
            users = list(u.users)
            if len(users) == 1 and is_call(users[0], MM) and users[0].args[0] is u \
                    and same_value(users[0].args[1], site.x):
                grad_a = users[0]
                continue
        if is_call(u, MM) and u.args[0] is z1 and is_matrix(u.args[1], site.a) and grad_x_lora is None:
            grad_x_lora = u
            continue
        return _fail_backward(site, "g·B is used by an op other than dA and the adapter's dX")
    if grad_a is None:
        return _fail_backward(site, "dA = (g·B)ᵀ·X was not found")
    site.dy, site.dy_shape_args2d = dy, dy_shape_args2d
    site.grad_a, site.grad_b, site.grad_x_lora = grad_a, grad_b, grad_x_lora
    site.backward_nodes = [g_source, g, grad_b, z1, grad_a] + ([grad_x_lora] if grad_x_lora is not None else [])
    if grad_x_lora is not None:
        site.dx_sum = _find_input_grad_sum(site)


def _fail_backward(site: Site, reason: str) -> None:
    site.backward_note = reason
    site.grad_a = site.grad_b = site.grad_x_lora = None


def _add_root(node: Node) -> Node:
    """Climb from a summand through single-user adds of the same shape to the top of the sum."""
    cur = node
    while True:
        user = single_user(cur)
        if user is None or not is_call(user, ADD) or user.kwargs or not same_shape(shape(user), shape(cur)) \
                or dtype(user) != dtype(cur):
            return cur
        cur = user


def _summand(product: Node) -> tuple[Node, Any, Any, Node | None]:
    """From an [N,i] product through an optional view and an optional cast to where it is summed:
    (end, view args, cast dtype, the op that takes end)."""
    end, view_args, cast_to = product, None, None
    user = single_user(end)
    if user is not None and is_call(user, *VIEWS):
        end, view_args = user, user.args[1]
        user = single_user(user)
    if user is not None and is_call(user, prims.convert_element_type.default):
        end, cast_to = user, user.args[1]
        user = single_user(user)
    return end, view_args, cast_to, user


def _find_input_grad_sum(site: Site) -> InputGradSum | None:
    """Where dX_a (= z1·A) and the base's dY·W are summed, if they are: both products in the
    adapter's dtype, reaching the same sum through the same view and cast."""
    lin = site.linear
    if lin is None:
        return None
    dxa = site.grad_x_lora
    lora_end, _, lora_cast, lora_add = _summand(dxa)
    if lora_add is None or not is_call(lora_add, ADD) or lora_add.kwargs:
        return None
    for t in lin.w_io.users:
        if transpose_source(t) is not lin.w_io:
            continue
        for base_mm in t.users:
            if not (is_call(base_mm, MM) and base_mm.args[1] is t and dtype(base_mm) == dtype(dxa)):
                continue
            gb = base_mm.args[0]
            if not (same_value(strip_layout(gb), strip_layout(site.dy))
                    and same_shape(shape(gb), shape(dxa)[:1] + (site.dims.o,))):
                continue
            base_end, view_args, base_cast, base_user = _summand(base_mm)
            if base_user is None or base_cast != lora_cast or not same_shape(shape(base_end), shape(lora_end)):
                continue
            root = _add_root(lora_end)
            if root is lora_end or _add_root(base_end) is not root:
                continue
            return InputGradSum(lora_end, lora_add, base_mm, base_end, view_args, base_cast)
    return None


def _merge_backward_block(site: Site) -> str | None:
    # Without dX, backward4/5 merge nothing (they compute what 3/1 do); they stay illegal wherever a
    # merge would be, so no report ever shows a merged variant under dropout or a dtype split.
    if site.linear is None:
        return "the base result is not a plain linear of the input (another adapter, or a quantized base)"
    if site.dtype != site.base_dtype:
        return MERGE_DTYPE_BLOCK.format(site.dtype, site.base_dtype)
    if site.dropout:
        return "lora_dropout: the adapter's input differs from the base's"
    if site.grad_x_lora is None:
        return None
    if site.dx_sum is None:
        return "the base layer's input gradient dY·W was not found in the same sum as the adapter's"
    return None


# --- entry point -----------------------------------------------------------------------------------------

def match_site(anchor: Node, backward: set[Node]) -> Site | Skip:
    path, adapter, key = module_path_of(anchor)
    try:
        f = _match_forward(anchor, backward)
    except NoMatch as e:
        return Skip(anchor, path, str(e), key)
    n, i, o, r = f["dims"]
    lora_dtype, out_dtype, base_dtype = f["dtypes"]
    site = Site(
        anchor=anchor, module_path=path, adapter=adapter, module_key=key, x=f["x"], a=f["a"], b=f["b"], scale=f["scale"],
        out=f["out"], base=f["base"], base2d=f["base2d"], out_shape_args=f["out_shape_args"],
        n_arg=f["n_arg"], linear=f["linear"], dims=Dims(n, i, o, r, needs_dx=False),
        dropout=find_dropout(f["x"], f["base"]), dtype=lora_dtype, out_dtype=out_dtype, base_dtype=base_dtype,
        forward_nodes=f["forward_nodes"],
    )
    if site.n_arg is None and len(shape(site.out)) != 2:
        return Skip(anchor, path, "the token count N could not be read from the graph's views", key)
    site.merge_forward_block = _merge_forward_block(site)
    if backward:  # an inference graph has no backward to match
        _match_backward(site, backward)
    site.dims = Dims(n, i, o, r, needs_dx=site.grad_x_lora is not None)
    site.merge_backward_block = _merge_backward_block(site)
    return site


def match_graph(graph: Graph) -> tuple[list[Node], set[Node]]:
    backward = backward_region(graph)
    return find_anchors(graph, backward), backward
