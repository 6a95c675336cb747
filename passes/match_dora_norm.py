"""DoRA's norm as PEFT computes it: ‖W + s·B·A‖ per row, with B·A built from an [i,i] identity.

    L    = permute(mm(mm(eye(i), Aᵀ), Bᵀ))    [o,i] = B·A (or B·A directly)
    norm = sqrt(Σ_rows (W + s·L)²)            [o]     W: the base's weight, through casts (or, on a 4-bit
                                                     base, dequantize_4bit of its packed weight)

Established node by node (`match_norm`); what is not raises NoMatch(reason).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.passes import poly
from lora_rewrite.passes.fx import (MM, MUL, dtype, is_call, is_matrix, prims, same_shape, same_value, shape,
                                    strip_casts, transpose_source)
from lora_rewrite.passes.site import NoMatch

aten = torch.ops.aten


def is_identity(node: Any) -> bool:
    """An [n,n] identity built in the graph: eye(n), or eq(iota(n)[:, None], iota(n)) as decomposed."""
    if is_call(node, aten.eye.default):
        return True
    if not is_call(node, aten.eq.Tensor):
        return False
    column, row = node.args
    if is_call(column, aten.unsqueeze.default) and list(column.args[1:]) in ([-1], [1]):
        column = column.args[0]
    else:
        return False
    return _is_arange(column) and _is_arange(row) and same_shape(shape(column), shape(row))


def _is_arange(node: Any) -> bool:
    if not is_call(node, prims.iota.default):
        return False
    return node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1


def match_norm(norm: Node, is_base_weight: Callable[[Any], bool], a: Node, b: Node, scale: Any, o: int, i: int):
    """(W as the norm reads it, (the dtype its squares are summed in, the norm's output dtype), the nodes
    of PEFT's norm): norm must be
    sqrt(Σ_rows (W + s·B·A)²) with W the base's weight (`is_base_weight`: the linear's weight, or a 4-bit
    base's dequantized weight) and B·A built from this site's A and B."""
    out_dtype = dtype(norm)
    root = strip_casts(norm)
    radicand = None
    if is_call(root, aten.pow.Tensor_Scalar) and root.args[1] == 0.5:
        radicand = root.args[0]
    elif is_call(root, aten.sqrt.default):
        radicand = root.args[0]
    squares = radicand.args[0] if is_call(radicand, aten.sum.dim_IntList) and list(radicand.args[1]) in ([1], [-1]) \
        and not radicand.kwargs.get("keepdim", False) and len(radicand.args) == 2 else None
    merged = None
    if is_call(squares, aten.pow.Tensor_Scalar) and squares.args[1] == 2:
        merged = squares.args[0]
    elif is_call(squares, MUL) and squares.args[0] is squares.args[1]:
        merged = squares.args[0]
    reduce_dtype = dtype(merged)   # a 16-bit norm is decomposed with its squares summed in fp32
    merged = strip_casts(merged)
    if merged is None or not same_shape(shape(merged), (o, i)):
        raise NoMatch("DoRA: the magnitude is not divided by the row norms of an [o,i] weight")
    p = poly.expand(merged)
    if p is None or len(p) != 2:
        raise NoMatch("DoRA: the norm's weight is not W + s·B·A")
    weight_term = [m[0] for m, c in p.items() if len(m) == 1 and c == 1.0 and is_base_weight(m[0])]
    if len(weight_term) != 1:
        raise NoMatch("DoRA: the norm does not read the base layer's weight")
    lora_terms = [(m, c) for m, c in p.items() if m != (weight_term[0],)]
    (lora_mono, c), = lora_terms
    factors = [f for f in lora_mono if not (isinstance(f, Node) and shape(f) == ())]
    tensor_scale = [f for f in lora_mono if isinstance(f, Node) and shape(f) == ()]
    scale_ok = (not tensor_scale and isinstance(scale, (int, float)) and c == float(scale)) or \
        (tensor_scale and c == 1.0 and same_value(tensor_scale[0], scale))
    if len(factors) != 1 or not scale_ok or not _is_lora_weight(factors[0], a, b):
        raise NoMatch("DoRA: the norm's weight is not W + s·B·A of this site's A and B")
    return weight_term[0], (reduce_dtype, out_dtype), [norm, root, radicand, squares, merged]


def _is_lora_weight(node: Any, a: Node, b: Node) -> bool:
    """B·A [o,i] as PEFT builds it: (B(A(eye)))ᵀ = permute(mm(mm(eye, Aᵀ), Bᵀ)), through casts, or B·A."""
    node = strip_casts(node)
    product = transpose_source(node)
    if is_call(product, MM):
        left, bt = product.args
        if is_call(left, MM) and is_identity(strip_casts(left.args[0])):
            at = left.args[1]
            return _same_param(transpose_source(at), a) and _same_param(transpose_source(bt), b)
    if is_call(node, MM):
        return _same_param(node.args[0], b) and _same_param(node.args[1], a)
    return False


def _same_param(node: Any, param: Node) -> bool:
    return node is not None and (is_matrix(node, param) or same_value(strip_casts(node), strip_casts(param)))
