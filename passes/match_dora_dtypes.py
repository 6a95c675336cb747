"""The dtypes of a DoRA sum, and whether the adapter reads the base's input, as the DoRA matcher
(passes/match_dora.py) establishes them.

PEFT's DoRA sum comes in four dtype layouts; each is rewritten or refused with its reason:

    one dtype                      everything in the model's dtype                       (False, None)
    fp32 adapters on a 16-bit base X cast up for the adapter, the 16-bit base result     (True, None)
                                   upcast into the fp32 sum, W cast up for the norm
    torch.autocast                 every product 16-bit, m and the norm fp32: an fp32    (False, fp32)
                                   sum of 16-bit products by type promotion
    the QLoRA recipe (4-bit base)  the fp32 DoRA term cast down to the 16-bit sum        (False, None): check_narrowed

Across those casts the adapter's X and the base's input are the same rows (`adapter_reads_base_input`).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from lora_rewrite.passes.fx import CASTS, dtype, is_call, same_rows, same_size, shape, strip_layout
from lora_rewrite.passes.site import NoMatch

HALF = (torch.float16, torch.bfloat16)


def check_dtypes(xab: Node, base: Node, mns: Node, out: Node,
                 dropout_product: Node | None) -> tuple[bool, torch.dtype | None]:
    """(is the base result upcast into the adapter's sum, the sum's dtype where wider than the products'),
    one of the first three layouts of the module's table, else NoMatch with the reason."""
    adapter = dtype(xab)
    if dtype(mns) == dtype(out) == torch.float32 and adapter in HALF \
            and dtype(base) == adapter and (dropout_product is None or dtype(dropout_product) == adapter):
        return False, torch.float32
    if dtype(mns) != adapter or dtype(out) != adapter:
        raise NoMatch(f"DoRA: the sum mixes dtypes (adapter {adapter}, magnitude {dtype(mns)}, sum "
                      f"{dtype(out)}): only a sum in the adapter's dtype, or an fp32 sum of 16-bit products "
                      "(torch.autocast), is rewritten")
    base = dtype(base)
    if base == adapter:
        return False, None
    if not (adapter == torch.float32 and base in HALF):
        raise NoMatch(f"DoRA: the base computes in {base}, the adapter in {adapter}: only a 16-bit base "
                      "upcast into an fp32 adapter's sum is rewritten")
    if dropout_product is not None and dtype(dropout_product) != adapter:
        raise NoMatch("DoRA: the second base product is not in the adapter's dtype")
    return True, None


def check_narrowed(xab: Node, base: Node, mns: Node, out: Node, dropout_product: Node | None) -> bool:
    """The dtypes of PEFT's DoRA sum on a bitsandbytes layer with fp32 adapters on a 16-bit compute dtype
    (the QLoRA recipe): the adapter, m, the norm and the DoRA term in fp32, the term cast to the 16-bit
    base's dtype and added to the base's product there. Returns True (the base is upcast into P) or raises."""
    adapter = dtype(xab)
    if not (adapter == dtype(mns) == torch.float32 and dtype(base) in HALF and dtype(out) == dtype(base)
            and (dropout_product is None or dtype(dropout_product) == adapter)):
        raise NoMatch(f"DoRA: the fp32 adapter term is cast to a {dtype(out)} sum, but the sum's dtypes are not "
                      f"PEFT's (adapter {adapter}, magnitude {dtype(mns)}, base {dtype(base)})")
    return True


def adapter_reads_base_input(x: Node, base_x: Node, upcast_base: bool, sum_dtype: torch.dtype | None,
                             reused: bool) -> bool:
    """Is the adapter's X [N,i] provably the base's input, in the site's dtype layout? Where the model's own
    base product is reused (`BaseProduct.reused`: a 4-bit base), never recomputed from X, its input need only
    be X's rows through casts (the QLoRA recipe's fp32 norms feed the fp32 adapter X, bitsandbytes casts it
    to bf16)."""
    return (same_rows(base_x, x) or upcast_base and _is_upcast_of(x, base_x)
            or sum_dtype is not None and _same_values_through_casts(x, base_x)
            or reused and _same_rows_through_casts(x, base_x))


def _is_upcast_of(x: Node, base_x: Node) -> bool:
    """X [N,i] is the base's input, cast to the adapter's dtype (through views of the same rows)."""
    source = strip_layout(x)
    return is_call(source, *CASTS) and dtype(source.args[0]) == dtype(base_x) and same_rows(source.args[0], base_x)


def _same_values_through_casts(x: Node, base_x: Node) -> bool:
    """X [N,i] holds the base's input rows, through casts that give back the same values (under autocast
    PEFT casts a 16-bit X up to the adapter's fp32 and autocast casts it back down; Inductor's joint
    passes may leave one cast from a dtype to itself) and casts that commute with views (transformers'
    Conv1D views X to rows before autocast casts it; the adapter casts X before viewing it)."""
    source_x, casts_x = _cast_free(x)
    source_b, casts_b = _cast_free(base_x)
    return source_x is source_b and casts_x == casts_b and same_size(shape(x)[-1], shape(base_x)[-1])


def _same_rows_through_casts(x: Node, base_x: Node) -> bool:
    """X [N,i] and the base's input are the same rows up to casts in either direction (and views)."""
    return _cast_free(x)[0] is _cast_free(base_x)[0] and same_size(shape(x)[-1], shape(base_x)[-1])


def _cast_free(value: Node) -> tuple[Node, tuple]:
    """(the node under value's views and casts, the dtypes it goes through from there: casts to the same
    dtype left out, 16 → 32 → 16 bits round trips (exact) folded)."""
    node, casts = value, []
    while is_call(strip_layout(node), *CASTS):
        node = strip_layout(node)
        casts.append(dtype(node))
        node = node.args[0]
    node = strip_layout(node)
    path = [dtype(node)]
    for cast in reversed(casts):
        if cast == path[-1]:
            continue
        if len(path) >= 2 and path[-1] == torch.float32 and cast == path[-2] and cast in HALF:
            path.pop()
            continue
        path.append(cast)
    return node, tuple(path)
