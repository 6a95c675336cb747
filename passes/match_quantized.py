"""A LoRA site on a quantized base: QLoRA, PEFT's `lora.bnb.Linear4bit` on a bitsandbytes 4-bit weight.

What the graph holds (bitsandbytes 0.50, peft 0.21; `../shared/research/dora-qlora.md`):

    forward    base = clone(bitsandbytes::gemm_4bit(X, packed W, …))     an opaque product of X, then PEFT's
                                                                        "defensive clone"
    backward   dX_b = dY · dequantize_4bit(packed W, …)                  the dequantized weight [o,i] is an
                                                                        ordinary mm operand

The adapter's algebra does not depend on what the base is: Y = base + s·(X·Aᵀ)·Bᵀ, and dA, dB, dX_a are
functions of dY, X, A and B alone, so the unmerged variants are exact on any base; the merged ones are
never legal (nothing may be merged into a quantized weight: `SiteFacts.plain_linear_base` is False).
What the base adds: its dX product, dY·W_deq, which a backward variant takes over (Z1 folded into it as
r extra columns, `dY·[W_deq | s·B]`), and the clone, a copy of a value nothing writes in a functional
graph, which the rewrite reads through.

A DoRA site on a 4-bit base (QDoRA, passes/match_dora.py) reads the same product, with the bias it adds
inside itself (`product_bias`: PEFT's DoRA subtracts it before scaling), and the forward's
`dequantize_4bit` of the same packed weight that PEFT's norm reads (`is_dequantized_weight_of`).

Older bitsandbytes releases (0.46–0.49) dequantize in the forward and call a plain linear on the
dequantized weight: not matched here (not installed to test against), so such a site stays untouched.
8-bit bases (`Linear8bitLt`) have their own ops and are left untouched too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from lora_rewrite.passes.fx import CASTS, MM, is_call, same_shape, shape

aten = torch.ops.aten


@dataclass(frozen=True)
class QuantizedBase:
    """base = gemm_4bit(X_b, packed W): the product, its input, its packed weight, PEFT's clone of it."""

    product: Node        # bitsandbytes::gemm_4bit, or the cast of it back to its input's dtype
    x: Node              # X_b, the adapter's own input (maybe another view of it)
    packed: Node         # the packed 4-bit weight
    clone: Node | None   # PEFT's defensive clone of the product, when there is one


def _bnb_op(name: str):
    ns = getattr(torch.ops, "bitsandbytes", None)
    packet = getattr(ns, name, None) if ns is not None else None
    return getattr(packet, "default", None) if packet is not None else None


def quantized_base(base: Node) -> QuantizedBase | None:
    """The base term as a bitsandbytes 4-bit product (through PEFT's clone), or None. Its input need not be
    the adapter's: the unmerged variants never read the base's input (the adapter may read a cast of it)."""
    gemm = _bnb_op("gemm_4bit")
    if gemm is None:
        return None
    node, clone = base, None
    if is_call(node, aten.clone.default) and not node.kwargs.get("memory_format"):
        clone, node = node, node.args[0]
    product = node
    while is_call(product, *CASTS):   # bitsandbytes casts the result back to its input's dtype
        product = product.args[0]
    if not is_call(product, gemm):
        return None
    return QuantizedBase(product=node, x=product.args[0], packed=product.args[1], clone=clone)


def dequantized_weight(q: QuantizedBase, o, i) -> Node | None:
    """W_deq [o,i] as the base's dX product reads it: dequantize_4bit of the same packed weight (found among
    the packed weight's readers, through views; it depends on no gradient, so it may sit anywhere in the
    graph), maybe cast to dY's dtype; None when the graph has no such product."""
    dequantize = _bnb_op("dequantize_4bit")
    if dequantize is None:
        return None
    readers, frontier = [], [_packed_source(q.packed)]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if is_call(user, *VIEW_OPS):
                frontier.append(user)
            elif is_call(user, dequantize) and user.args[0] is node and same_shape(shape(user), (o, i)):
                readers.append(user)
    if len(readers) > 1:   # QDoRA dequantizes in the forward too, for its norm: the one a product reads
        readers = [w for w in readers if _read_by_a_product(w)]
    if len(readers) != 1:
        return None
    weight = readers[0]
    casts = [u for u in weight.users if is_call(u, *CASTS)]
    if len(casts) == 1 and not any(is_call(u, MM) for u in weight.users):
        return casts[0]   # bitsandbytes casts the dequantized weight to dY's dtype for the product
    return weight


def _read_by_a_product(weight: Node) -> bool:
    """Is the [o,i] weight (or its one cast) the right operand of an mm, as G·W_deq reads it?"""
    values = [weight] + [u for u in weight.users if is_call(u, *CASTS)]
    return any(is_call(u, MM) and u.args[1] is v for v in values for u in v.users)


VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.t.default,
            aten.permute.default)


def _packed_source(node):
    """The packed weight under the views bitsandbytes takes of it ([(N·K+1)//2, 1])."""
    while is_call(node, *VIEW_OPS):
        node = node.args[0]
    return node


def product_bias(q: QuantizedBase) -> Node | None:
    """The bias the 4-bit product adds inside itself (gemm_4bit's `bias`), or None."""
    gemm = q.product
    while is_call(gemm, *CASTS):
        gemm = gemm.args[0]
    bias = gemm.args[6] if len(gemm.args) > 6 else gemm.kwargs.get("bias")
    return bias if isinstance(bias, Node) else None


def is_dequantized_weight_of(node, q: QuantizedBase) -> bool:
    """Is node (through casts) dequantize_4bit of the packed weight the 4-bit product reads — the same
    packed bytes, block size, quant type and [o,i] shape — as PEFT's DoRA reads it (for its norm, and with
    dropout for its second base product)?"""
    dequantize = _bnb_op("dequantize_4bit")
    while is_call(node, *CASTS):
        node = node.args[0]
    if dequantize is None or not is_call(node, dequantize):
        return False
    gemm = q.product
    while is_call(gemm, *CASTS):
        gemm = gemm.args[0]
    _, _, block_size, quant_type, weight_shape, _ = node.args
    return _packed_source(node.args[0]) is _packed_source(q.packed) and block_size == gemm.args[4] \
        and quant_type == gemm.args[5] and list(weight_shape) == list(gemm.args[2])
