"""Writing a DoRA site's chosen variants into the graph (lora_rewrite/dora.py has the algebra).

What is replaced, besides what a LoRA site replaces (passes/rewrite.py):

    out  ← the DoRA forward's Y (the old sum, the eye-built norm and its [i,i] identity lose their users)
    dm   ← Σₙ dY ⊙ P / ‖W′‖
    dX   ← as LoRA's DxMode.TOTAL: without dropout the base's (mns ⊙ dY)·W summand becomes the whole dX;
           with dropout the second base product's ((mns − 1) ⊙ dY)·W summand becomes X̃'s whole part.
           With a 16-bit base under fp32 adapters (PEFT's default), DxMode.LORA: only the adapter's dX_a
           is replaced, and the base's 16-bit (mns ⊙ dY)·W stays as the model computes it
    mns  ← the new m / ‖W′‖ (what that remaining base gradient reads)

On a 4-bit base (QDoRA) the forward's base is the model's 4-bit product less its bias, the norm reads a
new dequantization of the packed weight (recomputed in the backward, never saved), and dX is as LoRA's
DxMode.TOTAL with the base's dequantized weight (`base_weight_io`).
"""

from __future__ import annotations

from torch.fx import Node

from lora_rewrite.dora import DoraBackwardOperands, DoraForwardOperands
from lora_rewrite.variants import DxMode, Variant
from lora_rewrite.passes.fx import CASTS, dtype, is_call, shape
from lora_rewrite.passes.rewrite import (GraphOps, base_weight_io, check_same, dx_in_rows, first_gradient,
                                         gradient_replacements, matrix_2d, output_gradient_2d)
from lora_rewrite.passes.site import Site


def build_dora(ops: GraphOps, site: Site, forward: Variant, backward: Variant | None):
    """(forward result, backward result or None, {old node: new node}) for one DoRA site."""
    forward_result, y = _build_forward(ops, site, forward)
    # mns too: with DxMode.LORA the base's own input gradient, (mns ⊙ dY)·W, stays and reads it
    replacements = {site.forward.out: y, site.dora.mns: forward_result.mns}
    backward_result = None
    if backward is not None:
        backward_result, backward_replacements = _build_backward(ops, site, backward, forward_result)
        replacements.update(backward_replacements)
    return forward_result, backward_result, replacements


def _build_forward(ops: GraphOps, site: Site, variant: Variant) -> tuple:
    """(the variant's DoraForwardResult, Y in the shape of the old sum)."""
    chain, dora = site.forward, site.dora
    lin = chain.linear
    with ops.like(chain.out):
        base_full = chain.base2d if chain.base2d is not None else matrix_2d(ops, chain.base, chain.n_arg, site.dims.o)
        base_product = None
        if lin is None and dora.dropout_product is None:   # a 4-bit base: its product reused, its bias taken out
            base_product = base_full if dora.base_bias is None else ops.sub(base_full, dora.base_bias)
        norm_weight = dora.norm_weight if chain.quantized is None else _recomputed_dequantization(ops, dora.norm_weight)
        operands = DoraForwardOperands(
            x=chain.x, a=chain.a, b=chain.b, s=chain.scale, m=dora.magnitude, norm_weight=norm_weight,
            norm_dtype=dtype(dora.norm_weight), norm_out_dtype=dora.norm_out_dtype,
            norm_reduce_dtype=dora.norm_reduce_dtype, w_io=lin.w_io if lin is not None else None,
            bias=lin.bias if lin is not None else dora.base_bias, base_full=base_full,
            dropout_product=dora.dropout_product, trains=site.backward is not None,
            base_x=lin.x if lin is not None and site.facts.base_dtype != site.facts.adapter_dtype else None,
            sum_dtype=site.facts.sum_dtype, base_product=base_product)
        result = variant.compute(ops, operands)
        y = result.y
        if chain.term_cast is not None:   # PEFT's bnb layer sums in the 16-bit base's dtype: Y rounded once
            y = ops.cast(y, chain.term_cast)
        if chain.out_shape_args is not None:
            y = ops.view(y, chain.out_shape_args)
    check_same(y, chain.out, "forward")
    return result, y


def _recomputed_dequantization(ops: GraphOps, weight: Node) -> Node:
    """The norm's W_deq [o,i] as a new dequantize_4bit of the same packed weight (and the same casts), tagged
    for recomputation. PEFT's dequantization for the norm and bitsandbytes' own for dX are one node after the
    partitioner's common-subexpression pass, and an untagged one is saved for backward: a dequantized
    weight per site, what 4-bit storage is meant to avoid (eager PEFT holds none without dropout)."""
    casts = []
    while is_call(weight, *CASTS):
        casts.append(weight)
        weight = weight.args[0]
    fresh = ops.recompute(ops.call(weight.target, *weight.args, **weight.kwargs))
    for cast in reversed(casts):
        fresh = ops.recompute(ops.call(cast.target, fresh, *cast.args[1:], **cast.kwargs))
    return fresh


def _build_backward(ops: GraphOps, site: Site, variant: Variant, forward) -> tuple:
    chain, grads, dora = site.forward, site.backward, site.dora
    mode = grads.dx_mode
    with ops.like(first_gradient(ops, site)):
        w_io = None
        if mode is DxMode.TOTAL and dora.dropout_product is not None:
            w_io = dora.dropout_weight_io
        elif mode is DxMode.TOTAL:
            w_io = base_weight_io(ops, site)   # the linear's Wᵀ, or a 4-bit base's dequantized weight transposed
        operands = DoraBackwardOperands(
            dy=output_gradient_2d(ops, site), x=chain.x, a=chain.a, b=chain.b, s=chain.scale, norm=forward.norm,
            mns=forward.mns, p=forward.p, p_scale=forward.p_scale, w_io=w_io, dx=mode, dx_in_rows=dx_in_rows(site),
            dropout=dora.dropout_product is not None, p_is_base=forward.p_is_base)
        result = variant.compute(ops, operands)
        replacements = gradient_replacements(ops, site, result.grad_a, result.grad_b, result.grad_x)
        if dora.grad_m is not None:
            grad_m = _as(ops, result.grad_m, dora.grad_m)
            check_same(grad_m, dora.grad_m, "backward (dm)")
            replacements[dora.grad_m] = grad_m
    return result, replacements


def _as(ops: GraphOps, new: Node, old: Node) -> Node:
    """new in old's dtype and shape (dm leaves as m's gradient: a cast where m is in another dtype)."""
    new = ops.cast(new, dtype(old))
    if len(shape(new)) != len(shape(old)):
        new = ops.view(new, list(shape(old)))
    return new
