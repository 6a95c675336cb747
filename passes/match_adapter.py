"""The adapter's own products, as every kind of site holds them: the shared matcher of `passes/kind_lora.py`
and `passes/kind_dora.py`.

    forward                                   backward (g: the gradient reaching B)
    xa   = mm(X, Aᵀ)            [N,r]         dB   = mm(gᵀ, xa)           [o,r]
    xab  = mm(xa, Bᵀ)           [N,o]         z1   = mm(g, B)             [N,r]
                                              dA   = mm(z1ᵀ, X)           [r,i]
                                              dX_a = mm(z1, A)            [N,i]   (if X needs a gradient)

What g is — s·dY for LoRA, s·mns ⊙ dY for DoRA — is the kind's to say (`dy_of`). Also here: whether a
dropout lies between the model and the adapter's input (`find_dropout`), which every kind records.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.passes.fx import (ADDMM, MM, MUL, VIEWS, ancestors, dtype, is_call, is_matrix, matmul_operands,
                                    random_ops, same_shape, same_size, same_value, shape, single_user, strip_layout,
                                    transpose_source)
from lora_rewrite.passes.site import ForwardChain, Gradients, NoMatch


def read_anchor(anchor: Node, what: str = "") -> tuple[Node, Node, tuple]:
    """(X [N,i], A [r,i], (N, i, r)) of an anchor xa = mm(X, Aᵀ); NoMatch where A's shape does not match X's
    features statically. `what` prefixes the reason ("DoRA: ")."""
    x, at = anchor.args
    a = transpose_source(at)
    n, i = shape(x)
    r, i_a = shape(a)
    if not same_size(i, i_a) or isinstance(r, torch.SymInt) or isinstance(i, torch.SymInt):
        raise NoMatch(f"{what}A's shape does not match X's features statically")
    return x, a, (n, i, r)


def n_arg_of(x: Node, n: Any) -> Any:
    """N as the graph's views spell it (an int or a SymInt node), read off X's view, or None."""
    if is_call(x, *VIEWS):
        return x.args[1][0]
    return n if isinstance(n, int) else None


def match_adapter_product(anchor: Node, backward: set[Node], r: Any) -> tuple[Node, Node, Any]:
    """(xab, B, o): the forward's only use of X·Aᵀ, xab = (X·Aᵀ)·Bᵀ."""
    fwd_users = [u for u in anchor.users if u not in backward]
    if len(fwd_users) != 1:
        raise NoMatch("X·Aᵀ feeds more than one forward op")
    xab = fwd_users[0]
    if is_call(xab, ADDMM):
        raise NoMatch("lora_B has a bias (lora_bias=True), which the rewrite does not cover")
    if is_call(xab, MUL):
        raise NoMatch("rank 1: Inductor turned (X·Aᵀ)·Bᵀ into an elementwise product, which the rewrite "
                      "does not cover")
    if not (is_call(xab, MM) and xab.args[0] is anchor):
        raise NoMatch("X·Aᵀ is not multiplied by Bᵀ")
    b = transpose_source(xab.args[1])
    o, r_b = shape(b)
    if not same_size(r, r_b) or isinstance(o, torch.SymInt):
        raise NoMatch("B's shape does not match A's rank statically")
    return xab, b, o


def adapter_gradients(anchor: Node, forward: ForwardChain, backward: set[Node],
                      dy_of: Callable[[Node], Node | None], dy_dtype: torch.dtype | None = None,
                      frozen_a: bool = False) -> Gradients:
    """dB, Z1, dA and dX_a of the adapter, from g (the gradient reaching B: `dy_of(g)` is the output
    gradient dY it scales, or None); `dx_sum` is left None for the caller to find. dY is in the adapter's
    dtype, or in `dy_dtype` (a DoRA sum under torch.autocast). `frozen_a`: A needs no gradient, so the
    graph holds no dA (LoRA-FA); `grad_a` is None."""
    grad_b = g = None
    for u in anchor.users:
        if u not in backward:
            continue
        product = matmul_operands(u)
        if not (product is not None and product[1] is anchor and transpose_source(product[0]) is not None):
            raise NoMatch("X·Aᵀ is used in the backward by an op other than dB = gᵀ·(X·Aᵀ)")
        grad_b, g = u, transpose_source(product[0])
    if grad_b is None:
        raise NoMatch("no gradient for the adapter weights in this graph")
    n, i, o, r = forward.sizes
    if not same_shape(shape(g), (n, o)):
        raise NoMatch("dB's left factor is not [N,o]")

    # g = s·dY, as [N,o]: maybe a view (of a clone) of an nD product.
    g_source = strip_layout(g)
    dy_shape_args2d = g.args[1] if is_call(g, *VIEWS) else None
    dy = dy_of(g_source)
    if dy is None:
        raise NoMatch("the gradient reaching B is not the output gradient times the scale")
    if dtype(dy) != (dy_dtype or forward.dtype):
        raise NoMatch("the output gradient is in another dtype than the adapter")

    # z1 = g·B, then dA = z1ᵀ·X and dX_a = z1·A.
    z1 = None
    for u in g.users:
        if is_call(u, MM) and u.args[0] is g and is_matrix(u.args[1], forward.b):
            z1 = u
    if z1 is None:
        raise NoMatch("the product g·B was not found")
    grad_a = grad_x_lora = None
    for u in z1.users:
        if transpose_source(u) is z1:
            users = list(u.users)
            product = matmul_operands(users[0]) if len(users) == 1 else None
            if product is not None and product[0] is u and same_value(product[1], forward.x):
                grad_a = users[0]
                continue
            dxa = _transposed_product(users[0], forward.a, u) if len(users) == 1 else None
            if dxa is not None and grad_x_lora is None:
                grad_x_lora = dxa
                continue
        product = matmul_operands(u)
        if product is not None and product[0] is z1 and is_matrix(product[1], forward.a) and grad_x_lora is None:
            grad_x_lora = u
            continue
        raise NoMatch("g·B is used by an op other than dA and the adapter's dX")
    if grad_a is None and not frozen_a:
        raise NoMatch("dA = (g·B)ᵀ·X was not found")
    if grad_a is not None and frozen_a:
        raise NoMatch("dA = (g·B)ᵀ·X is computed for an A taken to be frozen")
    return Gradients(dy=dy, dy_shape_args2d=dy_shape_args2d, g=g_source, z1=z1, grad_a=grad_a, grad_b=grad_b,
                     grad_x_lora=grad_x_lora, dx_sum=None,
                     nodes=tuple(n for n in (g_source, g, grad_b, z1, grad_a, grad_x_lora) if n is not None))


def _transposed_product(product: Node, right: Node, left_t: Node) -> Node | None:
    """(rightᵀ·left_t)ᵀ when `product` is mm(rightᵀ, left_t) and its one user transposes it back: how
    autograd writes an input gradient for an input in transposed layout (dX_a = z1·A as (Aᵀ·z1ᵀ)ᵀ, so
    the gradient comes out in the input's layout). Returns that transpose, the [N,i] value."""
    if not (is_call(product, MM) and product.args[1] is left_t):
        return None
    inner = transpose_source(product.args[0])
    back = single_user(product)
    if inner is None or not is_matrix(inner, right) or back is None or transpose_source(back) is not product:
        return None
    return back


# How far up from X `find_dropout` looks for PEFT's lora_dropout. After Inductor's decompositions the
# mask is four ops above X (X ← view ← mul(1/(1-p)) ← mul(mask) ← gt ← random), five with PEFT's cast
# to the adapter's dtype: ten leaves room without reaching far into the layers before.
DROPOUT_SEARCH_DEPTH = 10
# The base's own ancestry is searched this many times deeper: a dropout of the model's, upstream of
# both, reaches the base through a few more ops (its view, its matmul) than it reaches X, and must be
# recognised as shared, not as the adapter's.
SHARED_ANCESTRY_FACTOR = 3


def find_dropout(x: Node, base: Node, depth: int = DROPOUT_SEARCH_DEPTH) -> bool:
    """Is there a random op (PEFT's lora_dropout) between the model and the adapter's input X that the
    base result does not also depend on? The model's own dropouts upstream feed both, and do not count."""
    shared = ancestors(base, SHARED_ANCESTRY_FACTOR * depth)
    random = random_ops()
    frontier, seen = [x], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen or n in shared:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target in random:
                return True
            if n.op == "call_function" and n.target is operator.getitem and is_call(n.args[0], *random):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False
