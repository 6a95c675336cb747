"""The base product under an adapter: what the pass needs from it, whatever layer computes it.

A site is `Y = base + s·(X·Aᵀ)·Bᵀ`. The adapter's algebra does not depend on what `base` is — dA, dB and
the adapter's dX_a are functions of dY, X, A and B alone — but what the rewrite may do around it does:
merge the adapter into the base's weight, take over the base's input-gradient product, recompute the base
product or reuse the model's. Each kind of base answers those questions through this protocol, so that
neither the matchers nor the rewrite branch on what the base is:

    base                                   module                    merges   its input gradient, found as
    X_b·Wᵀ (+ bias): mm / addmm            passes/base_linear.py     yes      dY·W (or autograd's transposed form)
    bmm(X_b, Wᵀ broadcast) (+ bias)        passes/base_linear.py     yes      bmm(dY, the broadcast W)
    bitsandbytes 4-bit gemm_4bit (QLoRA)   passes/base_4bit.py       no       dY·dequantize_4bit(packed W)
    another adapter's rewritten output     passes/bases.py           no       (not taken over)

`passes/bases.py` lists them in the order they are tried (`BASES`); a base none of them recognises leaves
the site untouched, with the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch.fx import Node

from lora_rewrite.passes.site import InputGradSum


class BaseProduct(Protocol):
    """One base product, as a recogniser in `passes/bases.py` found it in the graph."""

    name: str                  # what the report calls it: "linear", "4-bit (bitsandbytes)", …
    node: Node                 # the product node (mm, addmm, bmm, gemm_4bit or its cast)
    x: Node | None             # its input X_b (for a linear: [N,i], or [B,T,i] when batched)
    bias: Node | None          # the bias it adds (addmm's, a batched product's add, or inside a 4-bit product)
    w_io: Node | None          # Wᵀ [i,o] of a weight parameter the adapter may be merged into; None: nothing merges
    reused: bool               # the rewrite reuses the model's product (it cannot be recomputed from a weight)

    def sum_term(self, term: Node) -> Node:
        """The node to read as the base's value where the sum reads `term` (PEFT's defensive clone of a
        4-bit product read through; a linear's term as it is)."""

    def weight_dtype(self) -> torch.dtype | None:
        """W's dtype as the product reads it (None where it reads no plain weight)."""

    def weight_stored_as_io(self) -> bool:
        """W is stored as its transpose [i,o] (transformers' Conv1D), not as nn.Linear's [o,i]."""

    def input_grad_sum(self, dxa: Node, is_base_gradient: Callable[[Node], bool], o: Any,
                       i: Any) -> InputGradSum | None:
        """Where the adapter's dX_a and this product's input gradient G·W are summed (`is_base_gradient(G)`
        says whether G is the gradient of the base's result), or None."""

    def sum_terms(self, atom: Any, casts: bool):
        """(X·Wᵀ without the bias, the bias) as polynomials (passes/poly.py) over the atoms of a sum in which
        this product is the atom `atom`: their sum is the base's value. DoRA reads its sum through them."""

    def is_weight(self, node: Any) -> bool:
        """Is node W [o,i] (through casts) as PEFT's DoRA norm reads it: the weight this product computes with?"""

    def second_product(self, node: Any):
        """`node` as a plain product X̃·Wᵀ of this base's weight (a `LinearBase`: PEFT's DoRA computes one under
        lora_dropout), or None."""

    def reused_product(self, ops, value: Any) -> Any:
        """X·Wᵀ without its bias from the model's base value [N,o], where it cannot be recomputed from a weight
        (`reused`); None: the rewrite recomputes it from `w_io`."""

    def weight_for_rewrite(self, ops, weight: Any) -> Any:
        """W [o,i] as the rewrite may read it once more in the forward (DoRA's norm): the matched node itself,
        or where the graph would otherwise keep it for backward, a copy tagged to be recomputed."""

    def unsupported_sum(self, widened: bool, narrowed: bool) -> str | None:
        """Why DoRA's sum in that dtype layout is not read on this base (`widened`: 16-bit products in an fp32
        sum, torch.autocast; `narrowed`: the fp32 adapter term cast to the 16-bit base's dtype), or None."""
