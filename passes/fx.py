"""FX vocabulary of the pass: the op sets it recognises, small structural helpers on `torch.fx.Node`s,
the tag on the nodes it creates, and the one dead-node eraser.

Nothing here knows what a LoRA site is; `match.py` builds on it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.fx import Graph, Node

from lora_rewrite import compat

aten = torch.ops.aten
prims = torch.ops.prims

MM = aten.mm.default
ADDMM = aten.addmm.default
BMM = aten.bmm.default
EXPAND = aten.expand.default
ADD = aten.add.Tensor
MUL = aten.mul.Tensor
PERMUTE = aten.permute.default
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
CASTS = (prims.convert_element_type.default, aten._to_copy.default)
TRANSPOSES = (PERMUTE, aten.t.default, aten.transpose.int)

# Ops whose result depends only on their arguments: two such nodes with equal arguments hold the same
# value, which is how "the adapter and the base see the same X" is established (Inductor's joint
# passes do not CSE, so X is often viewed or cast twice).
PURE_OPS = set(VIEWS) | set(CASTS) | {
    aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default, aten.clone.default,
    aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.contiguous.default,
}
# Ops that only change how the same elements are laid out or addressed.
LAYOUT_OPS = tuple(VIEWS) + (aten.clone.default, aten.contiguous.default)
# Views of a matrix, its transpose included: how a weight is read, or a packed weight reshaped.
VIEWS_AND_TRANSPOSES = tuple(VIEWS) + TRANSPOSES
# What stands between a parameter and the matmul that reads it.
WEIGHT_OPS = TRANSPOSES + tuple(VIEWS) + tuple(CASTS)
# Ops that change how a value is viewed, stored or typed, never what it is: what a picture of a site folds
# into the op that reads it (lora_rewrite/pictures.py).
REPRESENTATION_OPS = frozenset(PURE_OPS | {aten.detach.default, aten.lift_fresh_copy.default})

# Random ops as dropout appears after Inductor's decompositions (rand/bernoulli before its joint
# passes, prims.inductor_random after; the rng higher-order ops under activation checkpointing).
_RANDOM_ATEN_OPS = frozenset({
    aten.rand.default, aten.rand_like.default, aten.bernoulli.default, aten.bernoulli.p,
    aten.native_dropout.default,
})


def random_ops() -> frozenset:
    """Every random op the graph may hold. Inductor's prims exist once Inductor is imported, and the rng
    higher-order ops only in some releases, so they are looked up when asked for, not at import."""
    found = set(_RANDOM_ATEN_OPS)
    for name in ("inductor_random", "inductor_randint"):
        if hasattr(prims, name):
            found.add(getattr(prims, name).default)
    for name in ("run_and_save_rng_state", "run_with_rng_state"):
        hop = getattr(torch.ops.higher_order, name, None)
        if hop is not None:
            found.add(hop)
    return frozenset(found)


# How deep `same_value` follows two chains of pure ops. Between a module's input and a matmul operand
# PEFT and Inductor put a view, a cast and maybe a clone — three ops; past eight the answer is the safe
# "not provably the same", and comparing two unrelated nodes stays cheap.
SAME_VALUE_DEPTH = 8

# meta key set (True) on every node the runlora pass creates. The matcher reads it to accept another
# adapter's rewritten output as a base (several adapters on one layer), and the erasers to tell the
# pass's own nodes from the model's.
RUNLORA_NODE = "runlora"
# meta key on a node the pass creates for a product with a choice of form: the product's role
# (lora_rewrite/forms.py `Role.name`), which the site pictures label it by.
ROLE_META = "runlora_role"


# --- reading nodes -----------------------------------------------------------------------------------

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


def is_tangent(node: Any) -> bool:
    """A tangent input of a joint graph: the gradient of one of the forward's outputs."""
    return isinstance(node, Node) and node.op == "placeholder" and "tangents" in str(node.target)


def made_by_runlora(node: Any) -> bool:
    return isinstance(node, Node) and bool(node.meta.get(RUNLORA_NODE))


def strip_casts(node: Any) -> Any:
    """The node under a chain of dtype casts."""
    while is_call(node, *CASTS):
        node = node.args[0]
    return node


def weight_source(node: Any) -> Any:
    """The parameter (or node) a weight is read from, under the transposes, views and casts between."""
    while is_call(node, *WEIGHT_OPS):
        node = node.args[0]
    return node


def strip_views(node: Any) -> Any:
    """The node under a chain of views and transposes."""
    while is_call(node, *VIEWS_AND_TRANSPOSES):
        node = node.args[0]
    return node


def single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


# --- sizes and shapes ----------------------------------------------------------------------------------

def same_size(a: Any, b: Any) -> bool:
    """Two sizes (ints or SymInts) that are certainly equal, without adding a guard."""
    if a is b:
        return True
    try:
        return compat.statically_known_true(a == b)
    except Exception:
        return False


def same_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


# --- values --------------------------------------------------------------------------------------------

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


def same_value(a: Any, b: Any, depth: int = SAME_VALUE_DEPTH) -> bool:
    """True when a and b certainly hold the same value: the same node, or the same pure op on
    arguments that hold the same values (followed `depth` ops deep)."""
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


def strip_layout(node: Any) -> Any:
    """Through views, reshapes, clones and expands that change nothing: the node whose elements, in
    (row-major) order, these hold."""
    while True:
        if is_call(node, *LAYOUT_OPS):
            node = node.args[0]
        elif is_call(node, EXPAND) and same_shape(shape(node), shape(node.args[0])):
            node = node.args[0]  # matmul's decomposition expands its operands to the shape they have
        else:
            return node


def same_rows(a: Any, b: Any) -> bool:
    """a and b hold the same rows in the same order, whatever their leading dims: X as [B,T,i] and as
    the [B·T,i] copy or view of it that a matmul reads (row-major order is what views, reshapes and
    clones keep)."""
    sa, sb = shape(a), shape(b)
    if sa is None or sb is None or not sa or not sb or not same_size(sa[-1], sb[-1]):
        return False
    return same_value(a, b) or same_value(strip_layout(a), strip_layout(b))


def matmul_operands(node: Any) -> tuple[Node, Node] | None:
    """(P, Q) when node computes the matrix product P·Q: an mm, or the broadcast product P[m,1]·Q[1,n]
    Inductor's decomposition writes for an mm whose inner size is 1 (on CPU for small operands, on
    GPU always; e.g. dA = Z1ᵀ·X and dB = gᵀ·(X·Aᵀ) when N = 1)."""
    if is_call(node, MM):
        return node.args[0], node.args[1]
    if not is_call(node, MUL) or len(node.args) != 2 or node.kwargs:
        return None
    p, q = node.args
    sp, sq = shape(p), shape(q)
    if sp is None or sq is None or len(sp) != 2 or len(sq) != 2:
        return None
    if same_size(sp[1], 1) and same_size(sq[0], 1):
        return p, q
    if same_size(sq[1], 1) and same_size(sp[0], 1):
        return q, p  # the product commutes; the [m,1] factor is the left one
    return None


def is_weight(node: Any) -> bool:
    """A parameter as the graph reads it (through transposes, views and casts), or a merged weight
    W + s·B·A that runlora itself built for another adapter on the same layer."""
    node = weight_source(node)
    return isinstance(node, Node) and (node.op == "placeholder" or made_by_runlora(node))


# --- scalars -------------------------------------------------------------------------------------------

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


# --- regions of a graph --------------------------------------------------------------------------------

def backward_region(graph: Graph) -> set[Node]:
    """Nodes that depend on a tangent: the backward half of a joint graph (empty for inference)."""
    region: set[Node] = set()
    for node in graph.nodes:
        if is_tangent(node):
            region.add(node)
        elif any(isinstance(a, Node) and a in region for a in node.all_input_nodes):
            region.add(node)
    return region


def ancestors(node: Node, depth: int) -> set[Node]:
    """node and every node it reads, up to `depth` ops up."""
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


def depends_on(roots: Iterable[Any], targets: set[Node]) -> bool:
    """Does any of `roots` read, directly or not, one of `targets`?"""
    pending = [r for r in roots if isinstance(r, Node)]
    seen: set[Node] = set()
    while pending:
        node = pending.pop()
        if node in targets:
            return True
        if node in seen:
            continue
        seen.add(node)
        pending.extend(node.all_input_nodes)
    return False


# --- erasing -------------------------------------------------------------------------------------------

def erase_unused(graph: Graph, candidates: Iterable[Node], erasable: Callable[[Node], bool]) -> None:
    """Erase each candidate that has no users and that `erasable` allows, then the inputs that leaves
    unused (as far as `erasable` allows), last candidate first. Placeholders, the output and ops with
    side effects are never erased."""
    pending = list(candidates)
    erased: set[Node] = set()
    while pending:
        node = pending.pop()
        if node in erased or node.graph is not graph:
            continue
        if node.op in ("placeholder", "output") or node.users or not erasable(node):
            continue
        if node.op == "call_function" and compat.mutates_inputs(node.target):
            continue
        erased.add(node)
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        pending.extend(i for i in inputs if i.op == "call_function")


# --- merging -------------------------------------------------------------------------------------------

# The tags that decide how the partitioner treats a node (checkpointed regions): casts merge only when
# theirs are equal, so merging never changes what is saved or recomputed.
PARTITION_META = ("recompute", "ac_graph_id", "partitioner_tag")


def merge_duplicate_casts(graph: Graph) -> int:
    """Merge each cast the pass added with an identical cast already in the graph (the same value to the same
    dtype: under torch.autocast with lora_dropout the model's own base product and the adapter's products
    each cast dY to 16 bits), keeping the first in graph order; a cast of the pass's view of a value, where
    the graph casts the value itself, becomes that view of the graph's cast (a cast commutes with a view).
    Returns how many casts were erased."""
    order = {node: k for k, node in enumerate(graph.nodes)}
    erased: set[Node] = set()
    for node in list(graph.nodes):
        if node in erased or not (made_by_runlora(node) and is_call(node, *CASTS)) or not isinstance(node.args[0], Node):
            continue
        same = _same_casts(node, node.args[0])
        if len(same) > 1:
            keep = min(same, key=order.__getitem__)
            for duplicate in same:
                if duplicate is not keep:
                    duplicate.replace_all_uses_with(keep)
                    graph.erase_node(duplicate)
                    erased.add(duplicate)
            continue
        view = node.args[0]
        if not (made_by_runlora(view) and is_call(view, *VIEWS) and isinstance(view.args[0], Node)):
            continue
        existing = [c for c in _same_casts(node, view.args[0]) if c is not node]
        if not existing:
            continue
        cast = min(existing, key=order.__getitem__)
        with graph.inserting_before(node):
            moved = graph.call_function(view.target, (cast,) + tuple(view.args[1:]), dict(view.kwargs))
        moved.meta.update(node.meta)
        node.replace_all_uses_with(moved)
        graph.erase_node(node)
        erased.add(node)
    return len(erased)


def _same_casts(cast: Node, source: Node) -> list[Node]:
    """The casts of `source` to cast's dtype (cast's own args past the first), under the same partition tags."""
    tags = tuple(cast.meta.get(k) for k in PARTITION_META)
    return [u for u in source.users if u.target is cast.target and tuple(u.args[1:]) == tuple(cast.args[1:])
            and u.kwargs == cast.kwargs and tuple(u.meta.get(k) for k in PARTITION_META) == tags]
