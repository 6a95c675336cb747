"""Where the backward sums the adapter's input gradient with the base's: dX = dX_a + G·W.

Autograd writes the gradient of X, when the adapter reads the base's own input, as two products
summed: dX_a = z1·A (z1 = s·dY·B) from the adapter and G·W from the base product (G = dY for LoRA). The
merged backward variants (lora_rewrite/variants.py) replace that sum by one product, dX = dY·(W + s·B·A),
so the matcher must find where the two meet: `input_grad_sum` returns that meeting point as an
`InputGradSum`, or None when the products are not summed in a form the rewrite covers. Which products
are the base's input gradient is the base's to say (`BaseProduct.input_grad_sum`, passes/base_product.py).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch.fx import Node

from lora_rewrite.passes.fx import ADD, BMM, VIEWS, dtype, is_call, prims, same_shape, same_size, shape, single_user
from lora_rewrite.passes.site import InputGradSum

# One candidate product of the base's input gradient: (the product node, its G operand, the node holding G·W).
GradientProduct = tuple[Node, Node, Node]


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


def input_grad_sum(dxa: Node, products: Iterable[GradientProduct], is_base_gradient: Callable[[Node], bool],
                   o: int, *, w_io: Node | None = None, weight: Node | None = None) -> InputGradSum | None:
    """Where dX_a (= z1·A) and one of the base's input-gradient `products` G·W are summed, if they are: both
    in the adapter's dtype, reaching the same sum through the same view and cast. `is_base_gradient(G)`
    says whether G is the base result's gradient. The weight those products read is recorded for the
    rewrite: `w_io`, Wᵀ [i,o] as the base's forward product reads it, or `weight`, the [o,i] weight the
    products read directly (a 4-bit base's dequantized weight)."""
    lora_end, lora_view_args, lora_cast, lora_add = _summand(dxa)
    if lora_add is None or not is_call(lora_add, ADD) or lora_add.kwargs:
        return None
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
        return InputGradSum(lora_end, lora_add, product, base_end, view_args, base_cast, w_io=w_io, weight=weight)
    return None
