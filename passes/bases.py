"""The base products the pass knows, in the order they are tried (`BASES`), and the one way to find one.

Each entry recognises its base from the graph alone and returns a `BaseProduct` (passes/base_product.py);
none names a module, a class or a node. A new kind of base (an 8-bit product, say) is one module with its
record and recogniser, and one row here: the matchers, the rewrite and the reports ask the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.passes.base_4bit import quantized_base
from lora_rewrite.passes.base_linear import batched_linear_base, linear_base, product_of_weight
from lora_rewrite.passes.fx import VIEWS, is_call, made_by_runlora, same_shape, shape, strip_layout
from lora_rewrite.passes.site import InputGradSum


@dataclass(frozen=True)
class AdapterOutputBase:
    """base = another adapter's output on the same layer, as runlora rewrote it (several adapters active on one
    layer): its value is reused, nothing merges into it, and its input gradient is that adapter's own."""

    node: Node
    x = None
    bias = None
    w_io = None
    name = "another adapter's output"
    reused = True

    def sum_term(self, term: Node) -> Node:
        return term

    def weight_dtype(self) -> torch.dtype | None:
        return None

    def weight_stored_as_io(self) -> bool:
        return False

    def input_grad_sum(self, dxa, is_base_gradient, o, i) -> InputGradSum | None:
        return None

    def sum_terms(self, atom: Any, casts: bool):
        return None

    def is_weight(self, node: Any) -> bool:
        return False

    def second_product(self, node: Any):
        return None

    def reused_product(self, ops, value: Any) -> Any:
        return value

    def weight_for_rewrite(self, ops, weight: Any) -> Any:
        return weight

    def unsupported_sum(self, widened: bool, narrowed: bool) -> str | None:
        return "DoRA on top of another adapter's output is not read"


def _as_2d(term: Node) -> Node | None:
    """The base term as [N,o]: itself, or the 2-D node it views."""
    if len(shape(term) or ()) == 2:
        return term
    if is_call(term, *VIEWS) and len(shape(term.args[0]) or ()) == 2:
        return term.args[0]
    return None


def _linear(term: Node, i: int, o: int):
    term2d = _as_2d(term)
    return linear_base(term2d, i, o) if term2d is not None else None


def _batched(term: Node, i: int, o: int):
    return batched_linear_base(term, i, o) if _as_2d(term) is None else None


def _four_bit(term: Node, i: int, o: int):
    return quantized_base(term)


def _adapter_output(term: Node, i: int, o: int):
    return AdapterOutputBase(term) if made_by_runlora(strip_layout(term)) else None


# (what it is, its recogniser: the sum's base term, i, o -> a BaseProduct or None), tried in this order.
BASES: tuple[tuple[str, Callable[[Node, Any, Any], Any]], ...] = (
    ("linear", _linear),
    ("batched linear", _batched),
    ("4-bit (bitsandbytes)", _four_bit),
    ("another adapter's output", _adapter_output),
)

UNKNOWN_BASE = ("the base layer is not a plain linear of a weight parameter nor a bitsandbytes 4-bit product "
                "(another quantized or custom base layer, or an adapter whose own site was left untouched)")


def find_base(term: Node, i: Any, o: Any):
    """The base product the sum's base term is, or None (the site is left untouched: UNKNOWN_BASE)."""
    for _, recognise in BASES:
        found = recognise(term, i, o)
        if found is not None:
            return found
    return None


def base_of_atom(atom: Any, i: Any, o: Any):
    """A polynomial atom of a sum (passes/poly.py) as a base product of an [i,o] weight — an mm, an addmm's
    product term, a 4-bit product — or None: how DoRA finds the base among its sum's terms."""
    linear = product_of_weight(atom, None)
    if linear is not None:
        return linear if same_shape(shape(linear.w_io), (i, o)) else None
    return quantized_base(atom)
