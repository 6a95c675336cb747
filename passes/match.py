"""Finding PEFT LoRA sites in an Inductor joint (or inference) graph, after Inductor's joint passes.

A site is `Y = base + s·(X·Aᵀ)·Bᵀ` where `base = X_b·Wᵀ (+ bias)` is usually the base linear, together
with the backward nodes autograd derived from it (the node-by-node equations are in passes/site.py).

Matching is on graph structure and shapes, never on names. The rewrite that follows only replaces the
values of `out`, dA, dB and dX by algebraically equal expressions in the same inputs, so what the
matcher must establish is that algebra, node by node: which node is A, B, X, s and dY, and that each
product really is the one the equation says. A chain it cannot establish raises `NoMatch(reason)`:

- the forward chain                  → the site is left untouched, with the reason in the report
- the backward (dA and dB)           → only the forward is rewritten; the reason is the site's
                                       `backward_note`

Besides the nodes, the matcher records facts (`SiteFacts`: dropout, dtypes, whether the adapter reads
the base's own input, …). It decides nothing with them: each variant's guard in lora_rewrite/variants.py
says which facts make it illegal.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
from torch.fx import Graph, Node

from lora_rewrite.variants import Dims, SiteFacts
from lora_rewrite.passes.fx import (ADD, ADDMM, BMM, EXPAND, MM, MUL, VIEWS, ancestors, backward_region, dtype,
                                    is_call, is_matrix, is_weight, made_by_runlora, matmul_operands, prims, random_ops,
                                    same_rows, same_scale, same_shape, same_size, same_value, shape, single_user,
                                    split_scale, strip_layout, transpose_source)
from lora_rewrite.passes.match_dora import is_dora_norm_product, looks_like_dora, match_dora_site
from lora_rewrite.passes.match_input_grad import input_grad_sum
from lora_rewrite.passes.match_quantized import dequantized_weight, quantized_base
from lora_rewrite.passes.provenance import provenance_of
from lora_rewrite.passes.site import ForwardChain, Gradients, LinearBase, NoMatch, Site


def match_site(anchor: Node, backward: set[Node]) -> Site:
    """The complete site that starts at `anchor`, or NoMatch with the reason it is left untouched.

    Args:
        anchor: a forward node xa = mm(X, Aᵀ) that `find_anchors` returned.
        backward: the graph's backward region (`backward_region`; empty for an inference graph).

    Returns:
        the site, with its backward when the graph has it in the expected form (otherwise
        `site.backward` is None and `site.backward_note` says why), its dims and its facts.

    Raises:
        NoMatch: the forward chain is not a LoRA site the rewrite covers.
    """
    if looks_like_dora(anchor, backward):
        return match_dora_site(anchor, backward)
    forward = _match_forward(anchor, backward)
    gradients, backward_note = None, ""
    if backward:  # an inference graph has no backward to match
        try:
            gradients = _match_backward(anchor, forward, backward)
        except NoMatch as e:
            backward_note = str(e)
    needs_dx = gradients is not None and gradients.grad_x_lora is not None
    return Site(
        anchor=anchor,
        provenance=provenance_of(anchor),
        forward=forward,
        backward=gradients,
        backward_note=backward_note,
        dims=Dims(*forward.sizes, needs_dx=needs_dx),
        facts=_facts(forward, gradients, needs_dx),
    )


def match_graph(graph: Graph) -> tuple[list[Node], set[Node]]:
    """Every anchor of the graph, in graph order, and the graph's backward region."""
    backward = backward_region(graph)
    return find_anchors(graph, backward), backward


def find_anchors(graph: Graph, backward: set[Node]) -> list[Node]:
    """Forward nodes xa = mm(X, Aᵀ) whose result is multiplied by Bᵀ: the start of every LoRA chain."""
    anchors = []
    for node in graph.nodes:
        if node in backward or not is_call(node, MM):
            continue
        x, at = node.args
        a = transpose_source(at)
        if is_dora_norm_product(node):
            continue   # eye(i)·Aᵀ: the first half of a DoRA norm's B·A, part of that site
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

def _match_forward(anchor: Node, backward: set[Node]) -> ForwardChain:
    x, at = anchor.args
    a = transpose_source(at)
    n, i = shape(x)
    r, i_a = shape(a)
    if not same_size(i, i_a) or isinstance(r, torch.SymInt) or isinstance(i, torch.SymInt):
        raise NoMatch("A's shape does not match X's features statically")

    xab, b, o = match_adapter_product(anchor, backward, r)
    out, term, scale, out_shape_args, chain, term_cast = _scaled_sum(xab)
    base = out.args[1] if out.args[0] is term else out.args[0]
    if base is term or not isinstance(base, Node):
        raise NoMatch("the adapter output is added to itself or to a constant")

    out_shape, base_shape = shape(out), shape(base)
    if not same_shape(out_shape, base_shape) or not same_size(out_shape[-1], o):
        raise NoMatch("the base result and the adapter output have different shapes (broadcasting)")
    lora_dtype = dtype(anchor)
    summed = term.args[0] if term_cast is not None else term   # the adapter's term before PEFT's cast
    if dtype(xab) != lora_dtype or dtype(summed) != lora_dtype or dtype(term) != dtype(out) or \
            (term_cast is None and lora_dtype != dtype(out)):
        raise NoMatch(f"the adapter computes in {lora_dtype} but the sum is {dtype(out)}")
    if len(out_shape) != 2 and out_shape_args is None:
        raise NoMatch("the adapter output reaches the sum without a view")

    base2d = None
    if len(base_shape) == 2:
        base2d = base
    elif is_call(base, *VIEWS) and shape(base.args[0]) is not None and len(shape(base.args[0])) == 2:
        base2d = base.args[0]
    linear = _linear_base(base2d, i, o) if base2d is not None else _batched_linear_base(base, i, o)
    quantized = quantized_base(base) if linear is None else None
    if quantized is not None:   # read through PEFT's defensive clone: a copy of a value nothing writes
        base = quantized.product
        base2d = base if len(shape(base)) == 2 else None
    elif linear is None and not made_by_runlora(strip_layout(base)):
        raise NoMatch("the base layer is not a plain linear of a weight parameter nor a bitsandbytes 4-bit "
                      "product (another quantized or custom base layer, or an adapter whose own site was left "
                      "untouched)")
    n_arg = None
    if is_call(x, *VIEWS):
        n_arg = x.args[1][0]
    elif len(out_shape) == 2:
        n_arg = n
    if n_arg is None:
        raise NoMatch("the token count N could not be read from the graph's views")
    return ForwardChain(x=x, a=a, b=b, scale=scale, out=out, base=base, base2d=base2d, quantized=quantized,
                        term_cast=term_cast, out_shape_args=out_shape_args, n_arg=n_arg, linear=linear,
                        sizes=(n, i, o, r),
                        dtype=lora_dtype, base_dtype=dtype(base), nodes=(anchor, *chain, out))


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


def _scaled_sum(xab: Node) -> tuple[Node, Node, Any, Any, list[Node], Any]:
    """From xab through an optional view, an optional scaling and an optional cast (PEFT's bnb layers cast
    the adapter's term to the base's dtype) to the add with the base result: (out, the summand that
    reaches it, s, the view's args, xab and the nodes up to that summand, the cast's dtype or None)."""
    chain = [xab]
    term = xab
    out_shape_args = None
    nxt = single_user(term)
    if nxt is None:
        raise NoMatch("(X·Aᵀ)·Bᵀ is used by more than one op")
    if is_call(nxt, *VIEWS):
        out_shape_args = nxt.args[1]
        term = nxt
        chain.append(term)
        nxt = single_user(term)
        if nxt is None:
            raise NoMatch("the adapter output is used by more than one op")
    scale: Any = 1.0
    if is_call(nxt, MUL):
        split = split_scale(nxt)
        if split is None or split[0] is not term:
            raise NoMatch("the adapter output is multiplied by a tensor that is not a scalar "
                          "(DoRA's magnitude, or another LoRA variant)")
        scale = split[1]
        term = nxt
        chain.append(term)
        nxt = single_user(term)
        if nxt is None:
            raise NoMatch("the scaled adapter output is used by more than one op")
    term_cast = None
    if is_call(nxt, prims.convert_element_type.default):
        term_cast, term = nxt.args[1], nxt
        chain.append(term)
        nxt = single_user(term)
        if nxt is None:
            raise NoMatch("the cast adapter output is used by more than one op")
    if not is_call(nxt, ADD) or nxt.kwargs.get("alpha", 1) != 1 or len(nxt.args) != 2:
        raise NoMatch(f"the adapter output is not added to a base result (it goes to {getattr(nxt, 'target', nxt)})")
    return nxt, term, scale, out_shape_args, chain, term_cast


def _linear_base(base2d: Node, i: int, o: int) -> LinearBase | None:
    """The base product as X_b·Wᵀ (+ bias) of a weight parameter, or None."""
    if not is_call(base2d, MM, ADDMM):
        return None
    mm_args = base2d.args if is_call(base2d, MM) else base2d.args[1:]
    bias = None if is_call(base2d, MM) else base2d.args[0]
    xb, w_io = mm_args
    if (same_shape(shape(w_io), (i, o)) and not base2d.kwargs and is_weight(w_io)
            and (bias is None or len(shape(bias) or ()) == 1)):
        return LinearBase(base2d, xb, w_io, bias)
    return None


def _batched_linear_base(base: Node, i: int, o: int) -> LinearBase | None:
    """The base as bmm(X_b, Wᵀ broadcast over X_b's batch) (+ bias), or None.

    That is how matmul decomposes an nD input it cannot view as [N,i] (a transposed, strided or
    expanded X: `x.transpose(0, 1)`, `x[:, ::2]`, `x.expand(…)`) when W needs no gradient: rather than
    copy X to [N,i] it keeps X_b [B,T,i] and expands Wᵀ to [B,i,o] (for a 4-D X, expanded to 4-D and
    viewed as 3-D; the result is viewed back to 4-D), so base[b,t] = X_b[b,t]·Wᵀ: X_b's rows as
    [B·T,i] times Wᵀ. The adapter (A needs a gradient) copies X to [B·T,i] instead.
    """
    product, bias = base, None
    if is_call(base, ADD) and not base.kwargs and len(base.args) == 2:
        for p, q in (base.args, base.args[::-1]):
            if is_call(_through_view(p), BMM) and isinstance(q, Node) and same_shape(shape(q), (o,)):
                product, bias = p, q
                break
    product = _through_view(product)
    if not is_call(product, BMM):
        return None
    xb, w_batched = product.args
    w_expanded = _through_view(w_batched)
    if not (is_call(w_expanded, EXPAND) and len(shape(w_batched) or ()) == 3
            and same_shape(shape(w_batched)[1:], (i, o)) and same_shape(shape(w_expanded)[-2:], (i, o))):
        return None  # not Wᵀ [i,o] repeated over the batch
    w_io = w_expanded.args[0]
    if (same_shape(shape(w_io), (i, o)) and len(shape(xb) or ()) == 3 and same_size(shape(xb)[-1], i)
            and is_weight(w_io)):
        return LinearBase(product, xb, w_io, bias)
    return None


def _through_view(node: Any) -> Any:
    """The viewed node when node is a view (matmul views a 4-D X's batched product to 3-D and back)."""
    return node.args[0] if is_call(node, *VIEWS) else node


# --- the backward -----------------------------------------------------------------------------------------

def _match_backward(anchor: Node, forward: ForwardChain, backward: set[Node]) -> Gradients:
    gradients = adapter_gradients(anchor, forward, backward, lambda g_source: _unscaled(g_source, forward))
    dy = gradients.dy
    is_dy = lambda gb: same_value(strip_layout(gb), strip_layout(dy))  # noqa: E731
    if gradients.grad_x_lora is not None and forward.linear is not None:
        dx_sum = input_grad_sum(gradients.grad_x_lora, forward.linear, is_dy, forward.sizes[2])
        gradients = dataclasses.replace(gradients, dx_sum=dx_sum)
    elif gradients.grad_x_lora is not None and forward.quantized is not None:
        n, i, o, r = forward.sizes
        weight = dequantized_weight(forward.quantized, o, i)
        if weight is not None:
            dx_sum = input_grad_sum(gradients.grad_x_lora, None, is_dy, o, weight=weight)
            gradients = dataclasses.replace(gradients, dx_sum=dx_sum)
    return gradients


def _unscaled(g_source: Node, forward: ForwardChain) -> Node | None:
    """dY where the gradient reaching B is g = s·dY (LoRA), else None."""
    split = split_scale(g_source)
    if split is not None and same_scale(split[1], forward.scale):
        return split[0]
    if isinstance(forward.scale, (int, float)) and forward.scale == 1:
        return g_source
    return None


def adapter_gradients(anchor: Node, forward: ForwardChain, backward: set[Node],
                      dy_of: Callable[[Node], Node | None], dy_dtype: torch.dtype | None = None) -> Gradients:
    """dB, Z1, dA and dX_a of the adapter, from g (the gradient reaching B: `dy_of(g)` is the output
    gradient dY it scales, or None); `dx_sum` is left None for the caller to find. dY is in the adapter's
    dtype, or in `dy_dtype` (a DoRA sum under torch.autocast)."""
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
    if grad_a is None:
        raise NoMatch("dA = (g·B)ᵀ·X was not found")
    return Gradients(dy=dy, dy_shape_args2d=dy_shape_args2d, grad_a=grad_a, grad_b=grad_b,
                     grad_x_lora=grad_x_lora, dx_sum=None,
                     nodes=(g_source, g, grad_b, z1, grad_a) + ((grad_x_lora,) if grad_x_lora is not None else ()))


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


# --- facts for the guards ----------------------------------------------------------------------------

def _facts(forward: ForwardChain, gradients: Gradients | None, needs_dx: bool) -> SiteFacts:
    linear = forward.linear
    return SiteFacts(
        plain_linear_base=linear is not None,
        adapter_dtype=forward.dtype,
        base_dtype=forward.base_dtype,
        weight_dtype=dtype(linear.w_io) if linear is not None else None,
        dropout=find_dropout(forward.x, forward.base),
        adapter_reads_base_input=linear is not None and same_rows(linear.x, forward.x),
        base_used_elsewhere=linear is not None and _base_used_elsewhere(linear.node, forward),
        needs_dx=needs_dx,
        dx_sum_found=gradients is not None and gradients.dx_sum is not None,
    )


# Ops between the base product and the base term of the sum: a view, the bias add of a batched base.
BASE_PATH_LENGTH = 3


def _base_used_elsewhere(product: Node, forward: ForwardChain) -> bool:
    """Does anything but the sum read the base product or a node on its way to the base term?"""
    node = product
    for _ in range(BASE_PATH_LENGTH):
        if node is forward.base:
            return set(node.users) != {forward.out}
        node = single_user(node)
        if node is None:
            return True
    return True


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
