"""A linear base: `base = X_b·Wᵀ (+ bias)` of a weight parameter, plain (mm / addmm) or batched (bmm).

    forward    base = mm(X_b, Wᵀ) | addmm(bias, X_b, Wᵀ) | bmm(X_b, Wᵀ expanded to [B,i,o]) (+ bias)
    backward   dX_b = mm(dY, (Wᵀ)ᵀ) | (Wᵀ·dYᵀ)ᵀ (autograd, for X in transposed layout) | bmm(dY, Wᵀ expanded, transposed)

The only base the adapter may be merged into (W′ = W + s·B·A), and whose product the rewrite may recompute
from W. Implements `BaseProduct` (passes/base_product.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.passes import poly
from lora_rewrite.passes.fx import (ADD, ADDMM, BMM, CASTS, EXPAND, MM, PERMUTE, VIEWS, WEIGHT_OPS, dtype, is_call,
                                    is_weight, same_shape, same_size, same_value, shape, single_user, strip_casts,
                                    transpose_source)
from lora_rewrite.passes.match_input_grad import input_grad_sum
from lora_rewrite.passes.site import InputGradSum


@dataclass(frozen=True)
class LinearBase:
    """base = X_b·w_io (+ bias): the base layer's product, with its weight as the [i,o] operand.

    Batched: for an input matmul cannot view as [N,i] (transposed, strided, expanded), the product is
    bmm(X_b [B,T,i], w_io broadcast to [B,i,o]) with the bias added after; X_b's rows are the N rows."""

    node: Node          # the mm/addmm, or the bmm of a batched base
    x: Node             # X_b [N,i], or [B,T,i] when batched
    w_io: Node          # Wᵀ [i,o] (nn.Linear: permute(W); transformers' Conv1D: its weight as stored)
    bias: Node | None

    name = "linear"
    reused = False

    def sum_term(self, term: Node) -> Node:
        return term

    def weight_dtype(self) -> torch.dtype | None:
        return dtype(self.w_io)

    def weight_stored_as_io(self) -> bool:
        return self.w_io.meta["val"].is_contiguous()

    def input_grad_sum(self, dxa: Node, is_base_gradient: Callable[[Node], bool], o: Any,
                       i: Any) -> InputGradSum | None:
        return input_grad_sum(dxa, _input_grad_products(self.w_io), is_base_gradient, o, w_io=self.w_io)

    def sum_terms(self, atom: Any, casts: bool):
        bias = {poly.monomial(poly.atom(self.bias, casts)): 1.0} if self.bias is not None else {}
        return {poly.monomial(atom): 1.0}, bias

    def is_weight(self, node: Any) -> bool:
        """W [o,i] (through a cast) of the product's Wᵀ operand: nn.Linear's W, or Conv1D's stored Wᵀ transposed."""
        source = strip_casts(node)
        w_io = strip_casts(self.w_io)
        if transpose_source(w_io) is not None and same_value(source, strip_casts(transpose_source(w_io))):
            return True
        inner = transpose_source(source)
        return inner is not None and same_value(strip_casts(inner), w_io)

    def second_product(self, node: Any) -> LinearBase | None:
        second = product_of_weight(node, None)
        if second is None or _weight_read(second.w_io) != _weight_read(self.w_io):
            return None
        return second

    def reused_product(self, ops, value: Any) -> Any:
        return None

    def weight_for_rewrite(self, ops, weight: Any) -> Any:
        return weight

    def unsupported_sum(self, widened: bool, narrowed: bool) -> str | None:
        if narrowed:
            return "the fp32 DoRA term is cast to a 16-bit sum that is not PEFT's on a 4-bit base"
        return None


def linear_base(base2d: Node, i: int, o: int) -> LinearBase | None:
    """The base product as X_b·Wᵀ (+ bias) of a weight parameter [i,o], or None."""
    if not is_call(base2d, MM, ADDMM) or base2d.kwargs:
        return None
    found = product_of_weight(base2d if is_call(base2d, MM) else ("mm", base2d), None)
    if found is None or not same_shape(shape(found.w_io), (i, o)):
        return None
    return found


def product_of_weight(atom: Any, bias: Node | None) -> LinearBase | None:
    """An mm node, or an addmm's product term ("mm", addmm) with its bias, as X [N,i]·Wᵀ of a weight
    parameter; None otherwise."""
    if isinstance(atom, tuple) and atom[0] == "mm" and is_call(atom[1], ADDMM):
        node = atom[1]
        bias, (x, w_io) = node.args[0], node.args[1:3]
    elif is_call(atom, MM):
        node = atom
        x, w_io = atom.args
    else:
        return None
    if not is_weight(w_io) or len(shape(w_io) or ()) != 2 or len(shape(x) or ()) != 2:
        return None
    if bias is not None and len(shape(bias) or ()) != 1:
        return None
    return LinearBase(node, x, w_io, bias)


def batched_linear_base(base: Node, i: int, o: int) -> LinearBase | None:
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


def _weight_read(w_io: Any) -> tuple:
    """How a product reads its weight, casts left out: the ops from the parameter (its node last), so
    that W·, and W cast to fp32 for PEFT's second product under fp32 adapters, read alike."""
    ops = []
    while is_call(w_io, *WEIGHT_OPS):
        if not is_call(w_io, *CASTS):
            ops.append((w_io.target, tuple(a for a in w_io.args[1:] if not isinstance(a, Node))))
        w_io = w_io.args[0]
    return tuple(ops) + (w_io,)


def _input_grad_products(w_io: Node):
    """The backward's products dY·W that read the base weight, each as (the product node, its dY
    operand, the node that holds dY·W):

    - mm(dY, (Wᵀ)ᵀ), the usual form;
    - (Wᵀ·dYᵀ)ᵀ = mm(w_io, dYᵀ) transposed back, autograd's form for an input in transposed layout;
    - bmm(dY, Wᵀ broadcast and transposed back to [B,o,i]), for a batched base (`batched_linear_base`).
    """
    for user in list(w_io.users):
        if transpose_source(user) is w_io:
            for mm in user.users:
                if is_call(mm, MM) and mm.args[1] is user:
                    yield mm, mm.args[0], mm
        elif is_call(user, MM) and user.args[0] is w_io and transpose_source(user.args[1]) is not None:
            back = single_user(user)
            if back is not None and transpose_source(back) is user:
                yield user, transpose_source(user.args[1]), back
        elif is_call(user, EXPAND):
            for w_batched in [user] + [v for v in user.users if is_call(v, *VIEWS)]:
                if len(shape(w_batched) or ()) != 3:
                    continue
                for w_t in w_batched.users:
                    if is_call(w_t, PERMUTE) and list(w_t.args[1]) == [0, 2, 1]:
                        yield from ((bmm, bmm.args[0], bmm) for bmm in w_t.users
                                    if is_call(bmm, BMM) and bmm.args[1] is w_t)
