"""A bitsandbytes 4-bit base: QLoRA (PEFT's `lora.bnb.Linear4bit`) and QDoRA (the same with `use_dora=True`).

What the graph holds (bitsandbytes 0.50, peft 0.21; `../shared/research/dora-qlora.md`):

    forward    base = clone(bitsandbytes::gemm_4bit(X, packed W, …, bias))  an opaque product of X (its bias
                                                                           inside), then PEFT's "defensive clone"
    backward   dX_b = G · dequantize_4bit(packed W, …)                      the dequantized weight [o,i] is an
                                                                           ordinary mm operand

The adapter's algebra does not depend on what the base is, so the unmerged variants are exact on it; the
merged ones are never legal (nothing may be merged into a quantized weight: `w_io` is None). What the base
adds: its dX product G·W_deq, which a backward variant takes over (Z1 folded into it as r extra columns,
`dY·[W_deq | s·B]`), and the clone, a copy of a value nothing writes in a functional graph, read through.

PEFT's DoRA on this layer (lora_rewrite/dora.py has the algebra) sums

    out = Q + (mns − 1)·(Q − b) + s·mns·lora              Q = gemm_4bit(X, packed W, bias=b): the bias inside
    out = Q + (mns − 1)·(X̃·W_deqᵀ) + s·mns·lora           with lora_dropout: a plain product of the
                                                          dequantized weight (the same packed weight as Q's)

and with fp32 adapters on a 16-bit compute dtype (the QLoRA recipe) it rounds the fp32 DoRA term to the 16-bit
dtype before adding Q. Its norm reads dequantize_4bit of Q's packed weight (`is_weight`).

Older bitsandbytes releases (0.46–0.49) dequantize in the forward and call a plain linear on the
dequantized weight: not matched here (not installed to test against), so such a site stays untouched.
8-bit bases (`Linear8bitLt`) have their own ops and are left untouched too. Implements `BaseProduct`
(passes/base_product.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.passes import poly
from lora_rewrite.passes.base_linear import LinearBase
from lora_rewrite.passes.fx import (CASTS, MM, VIEWS_AND_TRANSPOSES, is_call, same_shape, shape, strip_casts,
                                    strip_views, transpose_source)
from lora_rewrite.passes.match_input_grad import input_grad_sum
from lora_rewrite.passes.site import InputGradSum

aten = torch.ops.aten

UNDER_AUTOCAST = ("on a 4-bit base (bitsandbytes) DoRA is rewritten where the base computes in the "
                  "adapter's dtype, or in 16 bits under fp32 adapters; not under torch.autocast (its sum in "
                  "fp32 from 16-bit products) or other mixes")


@dataclass(frozen=True)
class QuantizedBase:
    """base = gemm_4bit(X_b, packed W): the product (read through PEFT's clone of it), its input, its packed weight."""

    node: Node           # bitsandbytes::gemm_4bit, or the cast of it back to its input's dtype
    x: Node              # X_b, the adapter's own input (maybe another view of it)
    packed: Node         # the packed 4-bit weight

    name = "4-bit (bitsandbytes)"
    reused = True
    w_io = None

    @property
    def gemm(self) -> Node:
        return strip_casts(self.node)

    @property
    def bias(self) -> Node | None:
        """The bias the 4-bit product adds inside itself (gemm_4bit's `bias`), or None."""
        bias = self.gemm.args[6] if len(self.gemm.args) > 6 else self.gemm.kwargs.get("bias")
        return bias if isinstance(bias, Node) else None

    def sum_term(self, term: Node) -> Node:
        return self.node   # read through PEFT's defensive clone: a copy of a value nothing writes

    def weight_dtype(self) -> torch.dtype | None:
        return None

    def weight_stored_as_io(self) -> bool:
        return False

    def input_grad_sum(self, dxa: Node, is_base_gradient: Callable[[Node], bool], o: Any,
                       i: Any) -> InputGradSum | None:
        weight = dequantized_weight(self, o, i)
        if weight is None:
            return None
        products = [(mm, mm.args[0], mm) for mm in weight.users if is_call(mm, MM) and mm.args[1] is weight]
        return input_grad_sum(dxa, products, is_base_gradient, o, weight=weight)

    def sum_terms(self, atom: Any, casts: bool):
        if self.bias is None:
            return {poly.monomial(atom): 1.0}, {}
        b = poly.atom(self.bias, casts)
        return {poly.monomial(atom): 1.0, poly.monomial(b): -1.0}, {poly.monomial(b): 1.0}

    def is_weight(self, node: Any) -> bool:
        """Is node (through casts) dequantize_4bit of the packed weight this product reads — the same packed
        bytes, block size, quant type and [o,i] shape — as PEFT's DoRA reads it (for its norm, and with dropout
        for its second base product)?"""
        dequantize = _bnb_op("dequantize_4bit")
        node = strip_casts(node)
        if dequantize is None or not is_call(node, dequantize):
            return False
        gemm = self.gemm
        _, _, block_size, quant_type, weight_shape, _ = node.args
        return strip_views(node.args[0]) is strip_views(self.packed) and block_size == gemm.args[4] \
            and quant_type == gemm.args[5] and list(weight_shape) == list(gemm.args[2])

    def second_product(self, node: Any) -> LinearBase | None:
        if not is_call(node, MM):
            return None
        w_io = node.args[1]
        if transpose_source(w_io) is None or not self.is_weight(transpose_source(w_io)):
            return None
        return LinearBase(node, node.args[0], w_io, None)

    def reused_product(self, ops, value: Any) -> Any:
        return value if self.bias is None else ops.sub(value, self.bias)

    def weight_for_rewrite(self, ops, weight: Any) -> Any:
        """W_deq [o,i] as a new dequantize_4bit of the same packed weight (and the same casts), tagged for
        recomputation. PEFT's dequantization for DoRA's norm and bitsandbytes' own for dX are one node after
        the partitioner's common-subexpression pass, and an untagged one is saved for backward: a dequantized
        weight per site, what 4-bit storage is meant to avoid (eager PEFT holds none without dropout)."""
        casts = []
        while is_call(weight, *CASTS):
            casts.append(weight)
            weight = weight.args[0]
        fresh = ops.recompute(ops.call(weight.target, *weight.args, **weight.kwargs))
        for cast in reversed(casts):
            fresh = ops.recompute(ops.call(cast.target, fresh, *cast.args[1:], **cast.kwargs))
        return fresh

    def unsupported_sum(self, widened: bool, narrowed: bool) -> str | None:
        return UNDER_AUTOCAST if widened else None


def _bnb_op(name: str):
    ns = getattr(torch.ops, "bitsandbytes", None)
    packet = getattr(ns, name, None) if ns is not None else None
    return getattr(packet, "default", None) if packet is not None else None


def quantized_base(base: Any) -> QuantizedBase | None:
    """The base term as a bitsandbytes 4-bit product (through PEFT's clone), or None. Its input need not be
    the adapter's: the unmerged variants never read the base's input (the adapter may read a cast of it)."""
    gemm = _bnb_op("gemm_4bit")
    if gemm is None or not isinstance(base, Node):
        return None
    node = base
    if is_call(node, aten.clone.default) and not node.kwargs.get("memory_format"):
        node = node.args[0]   # PEFT's defensive clone: a copy of a value nothing writes
    product = strip_casts(node)   # bitsandbytes casts the result back to its input's dtype
    if not is_call(product, gemm):
        return None
    return QuantizedBase(node=node, x=product.args[0], packed=product.args[1])


def dequantized_weight(q: QuantizedBase, o, i) -> Node | None:
    """W_deq [o,i] as the base's dX product reads it: dequantize_4bit of the same packed weight (found among
    the packed weight's readers, through views; it depends on no gradient, so it may sit anywhere in the
    graph), maybe cast to dY's dtype; None when the graph has no such product."""
    dequantize = _bnb_op("dequantize_4bit")
    if dequantize is None:
        return None
    readers, frontier = [], [strip_views(q.packed)]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if is_call(user, *VIEWS_AND_TRANSPOSES):
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
