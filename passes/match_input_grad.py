"""Where the backward sums the adapter's input gradient with the base's: dX = dX_a + dY·W.

Autograd writes the gradient of X, when the adapter reads the base's own input, as two products
summed: dX_a = z1·A (z1 = s·dY·B) from the adapter and dY·W from the base linear. The merged backward
variants (lora_rewrite/variants.py) replace that sum by one product, dX = dY·(W + s·B·A), so the
matcher must find where the two meet: `input_grad_sum` returns that meeting point as an
`InputGradSum`, or None when the products are not summed in a form the rewrite covers.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.fx import Node

from lora_rewrite.passes.fx import (ADD, BMM, EXPAND, MM, PERMUTE, VIEWS, dtype, is_call, prims, same_shape,
                                    same_size, shape, single_user, transpose_source)
from lora_rewrite.passes.site import InputGradSum, LinearBase


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


def input_grad_sum(dxa: Node, linear: LinearBase | None, is_base_gradient: Callable[[Node], bool],
                   o: int, weight: Node | None = None) -> InputGradSum | None:
    """Where dX_a (= z1·A) and the base's input gradient G·W are summed, if they are: both products in
    the adapter's dtype, reaching the same sum through the same view and cast. `is_base_gradient(G)`
    says whether G is the base result's gradient (dY for LoRA). `weight`: instead of the linear's Wᵀ, the
    [o,i] weight the base's product G·W reads directly (a quantized base's dequantized weight)."""
    lora_end, lora_view_args, lora_cast, lora_add = _summand(dxa)
    if lora_add is None or not is_call(lora_add, ADD) or lora_add.kwargs:
        return None
    products = _input_grad_products(linear.w_io) if weight is None else \
        [(mm, mm.args[0], mm) for mm in weight.users if is_call(mm, MM) and mm.args[1] is weight]
    for product, gb, value in products:
        batched = is_call(product, BMM)
        rows_match = same_size(shape(gb)[-1], o) if batched else same_shape(shape(gb), shape(dxa)[:1] + (o,))
        if not (dtype(value) == dtype(dxa) and rows_match and is_base_gradient(gb)):
            continue
        base_end, view_args, base_cast, base_user = _summand(value)
        if batched and view_args is None:
            view_args = lora_view_args  # the bmm is in X's shape already: dX [N,i] is viewed to it as dX_a is
        if base_user is None or base_cast != lora_cast or not same_shape(shape(base_end), shape(lora_end)):
            continue
        root = _add_root(lora_end)
        if root is lora_end or _add_root(base_end) is not root:
            continue
        return InputGradSum(lora_end, lora_add, product, base_end, view_args, base_cast, weight)
    return None


def _input_grad_products(w_io: Node):
    """The backward's products dY·W that read the base weight, each as (the product node, its dY
    operand, the node that holds dY·W):

    - mm(dY, (Wᵀ)ᵀ), the usual form;
    - (Wᵀ·dYᵀ)ᵀ = mm(w_io, dYᵀ) transposed back, autograd's form for an input in transposed layout;
    - bmm(dY, Wᵀ broadcast and transposed back to [B,o,i]), for a batched base (`_batched_linear_base`).
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
