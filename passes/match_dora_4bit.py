"""PEFT's DoRA on a bitsandbytes 4-bit base (QDoRA), as the DoRA matcher (passes/match_dora.py) reads it.

PEFT's `lora.bnb.Linear4bit` with `use_dora=True` sums (peft/tuners/lora/bnb.py, dora.py):

    out = Q + (mns − 1)·(Q − b) + s·mns·lora              Q = gemm_4bit(X, packed W, bias=b): the bias inside
    out = Q + (mns − 1)·(X̃·W_deqᵀ) + s·mns·lora           with lora_dropout: a plain product of the
                                                          dequantized weight (the same packed weight as Q's)

and with fp32 adapters on a 16-bit compute dtype (the QLoRA recipe) it rounds the fp32 DoRA term to the
16-bit dtype before adding Q (`check_narrowed`). The norm reads dequantize_4bit of Q's packed weight
(`match_quantized.is_dequantized_weight_of`).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from lora_rewrite.passes import poly
from lora_rewrite.passes.fx import MM, dtype, is_call, transpose_source
from lora_rewrite.passes.match_quantized import is_dequantized_weight_of, product_bias, quantized_base
from lora_rewrite.passes.site import NoMatch


ON_A_4BIT_BASE = ("on a 4-bit base (bitsandbytes) the sum is not PEFT's DoRA sum on a Linear4bit (mns scaling "
                  "the 4-bit product less its bias, or with lora_dropout a product of its dequantized weight)")
ON_A_4BIT_BASE_MIXED = ("on a 4-bit base (bitsandbytes) DoRA is rewritten where the base computes in the "
                        "adapter's dtype, or in 16 bits under fp32 adapters; not under torch.autocast (its sum in "
                        "fp32 from 16-bit products) or other mixes")


def has_4bit_term(p: poly.Poly) -> bool:
    """Is a bitsandbytes 4-bit product (through PEFT's clone and bitsandbytes' cast) an atom of the sum?"""
    return any(isinstance(f, Node) and quantized_base(f) is not None for mono in p for f in mono)


def read_4bit_terms(scaled: poly.Poly, plain: poly.Poly, mns: Node, casts: bool):
    """(the QuantizedBase, its bias or None, the second base product or None) when the sum is PEFT's DoRA sum
    on a bitsandbytes Linear4bit, else None:

    - without dropout, out = Q + (mns − 1)·(Q − b) + s·mns·lora = mns·Q − mns·b + b + …: the 4-bit product Q
      adds its bias inside itself, PEFT subtracts it before scaling;
    - with dropout, out = Q + (mns − 1)·(X̃·W_deqᵀ) + …: PEFT's second base product is a plain product of
      the dequantized weight (the same packed weight as Q's)."""
    candidates = {f for m in scaled for f in m if f is not mns and isinstance(f, Node) and quantized_base(f) is not None}
    if not candidates:
        return _read_dropout_terms(scaled, plain, mns)
    if len(candidates) != 1:
        return None
    (q,) = candidates
    quantized = quantized_base(q)
    bias = product_bias(quantized)
    expected_scaled, expected_plain = {poly.monomial(mns, q): 1.0}, {}
    if bias is not None:
        b = poly.atom(bias, casts)
        expected_scaled[poly.monomial(mns, b)] = -1.0
        expected_plain[poly.monomial(b)] = 1.0
    if poly.same_poly(scaled, expected_scaled) and poly.same_poly(plain, expected_plain):
        return quantized, bias, None
    return None


def _read_dropout_terms(scaled: poly.Poly, plain: poly.Poly, mns: Node):
    """(the QuantizedBase, None, X̃·W_deqᵀ) for out = Q + mns·(X̃·W_deqᵀ) − X̃·W_deqᵀ + …, else None."""
    if len(scaled) != 1 or len(plain) != 2:
        return None
    ((mono, c),) = scaled.items()
    second = [f for f in mono if f is not mns]
    if c != 1.0 or len(mono) != 2 or len(second) != 1 or not is_call(second[0], MM):
        return None
    second = second[0]
    bases = [m[0] for m, c in plain.items() if len(m) == 1 and c == 1.0 and isinstance(m[0], Node)]
    quantized = quantized_base(bases[0]) if len(bases) == 1 else None
    if quantized is None or not poly.same_poly(plain, {poly.monomial(bases[0]): 1.0, poly.monomial(second): -1.0}):
        return None
    w_io = second.args[1]
    if transpose_source(w_io) is None or not is_dequantized_weight_of(transpose_source(w_io), quantized):
        return None
    return quantized, None, second


def check_narrowed(xab: Node, base: Node, mns: Node, out: Node, dropout_product: Node | None) -> bool:
    """The dtypes of PEFT's DoRA sum on a bitsandbytes layer with fp32 adapters on a 16-bit compute dtype
    (the QLoRA recipe): the adapter, m, the norm and the DoRA term in fp32, the term cast to the 16-bit
    base's dtype and added to the 4-bit product there. Returns True (the base is upcast into P) or raises."""
    adapter, half = dtype(xab), (torch.float16, torch.bfloat16)
    if not (adapter == dtype(mns) == torch.float32 and dtype(base) in half and dtype(out) == dtype(base)
            and (dropout_product is None or dtype(dropout_product) == adapter)):
        raise NoMatch(f"DoRA: {ON_A_4BIT_BASE_MIXED}")
    return True
