"""DoRA (PEFT's `use_dora=True`) as a kind of site: proven where the adapter's output is scaled by
m / ‖W + s·B·A‖, matched by passes/match_dora.py, rewritten with lora_rewrite/dora.py's variants.

What is replaced, besides what a LoRA site replaces (passes/rewrite.py):

    out  ← the DoRA forward's Y (the old sum, the eye-built norm and its [i,i] identity lose their users)
    dm   ← Σₙ dY ⊙ P / ‖W′‖
    dX   ← as LoRA's DxMode.TOTAL: without dropout the base's (mns ⊙ dY)·W summand becomes the whole dX;
           with dropout the second base product's ((mns − 1) ⊙ dY)·W summand becomes X̃'s whole part.
           With a 16-bit base under fp32 adapters (PEFT's default), DxMode.LORA: only the adapter's dX_a
           is replaced, and the base's 16-bit (mns ⊙ dY)·W stays as the model computes it
    mns  ← the new m / ‖W′‖ (what that remaining base gradient reads)

On a base whose product is reused (a 4-bit base: QDoRA) the forward's base is the model's product less its
bias (`BaseProduct.reused_product`), and the norm reads the weight as the base hands it to the rewrite
(`BaseProduct.weight_for_rewrite`: a 4-bit base's dequantization, recomputed in the backward, never saved).
"""

from __future__ import annotations

from torch.fx import Node

from lora_rewrite.dora import (DORA_BACKWARDS, DORA_FORWARDS, DoraBackwardOperands, DoraForwardOperands,
                               peft_dora_gemms)
from lora_rewrite.variants import Dims, DxMode, SiteFacts
from lora_rewrite.passes.fx import dtype, shape
from lora_rewrite.passes.kind import SiteKind
from lora_rewrite.passes.kind_lora import lora_labels
from lora_rewrite.passes.match_dora import is_dora_norm_product, match_dora_site, proves_dora
from lora_rewrite.passes.rewrite import base_weight_io, dx_in_rows, matrix_2d, output_gradient_2d
from lora_rewrite.passes.site import Site


def match_dora(anchor: Node, backward: set[Node], options=None) -> Site:
    return match_dora_site(anchor, backward, options, DORA)


def dora_forward_operands(ops, site: Site, variant, options) -> DoraForwardOperands:
    chain, dora, base = site.forward, site.extra, site.forward.base_product
    base_full = chain.base2d if chain.base2d is not None else matrix_2d(ops, chain.base, chain.n_arg, site.dims.o)
    return DoraForwardOperands(
        x=chain.x, a=chain.a, b=chain.b, s=chain.scale, m=dora.magnitude,
        norm_weight=base.weight_for_rewrite(ops, dora.norm_weight), norm_dtype=dtype(dora.norm_weight),
        norm_out_dtype=dora.norm_out_dtype, norm_reduce_dtype=dora.norm_reduce_dtype, w_io=base.w_io,
        bias=base.bias, base_full=base_full, dropout_product=dora.dropout_product, trains=site.backward is not None,
        base_x=base.x if site.facts.base_dtype != site.facts.adapter_dtype else None, sum_dtype=site.facts.sum_dtype,
        reused_base=base.reused_product(ops, base_full) if dora.dropout_product is None else None,
        widen_base=not options.enabled("add_narrow_base"))


def dora_backward_operands(ops, site: Site, variant, forward) -> DoraBackwardOperands:
    chain, grads, dora = site.forward, site.backward, site.extra
    mode = grads.dx_mode
    # Wᵀ of the product whose input gradient was found: the base's, or with dropout the second product's
    w_io = base_weight_io(ops, site) if mode is DxMode.TOTAL else None
    return DoraBackwardOperands(
        dy=output_gradient_2d(ops, site), x=chain.x, a=chain.a, b=chain.b, s=chain.scale, norm=forward.norm,
        mns=forward.mns, p=forward.p, p_scale=forward.p_scale, w_io=w_io, dx=mode, dx_in_rows=dx_in_rows(site),
        dropout=dora.dropout_product is not None, p_is_base=forward.p_is_base)


def dora_replacements(ops, site: Site, forward, backward) -> dict:
    """mns, which the base's own input gradient reads where it stays (DxMode.LORA), and dm, in m's dtype."""
    dora = site.extra
    replaced = {dora.mns: forward.mns}
    if backward is not None and dora.grad_m is not None:
        grad_m = ops.cast(backward.grad_m, dtype(dora.grad_m))
        if len(shape(grad_m)) != len(shape(dora.grad_m)):
            grad_m = ops.view(grad_m, list(shape(dora.grad_m)))
        replaced[dora.grad_m] = grad_m
    return replaced


def dora_before_gemms(dims: Dims, facts: SiteFacts, trains: bool) -> list:
    return peft_dora_gemms(dims, facts.dropout, trains)


def dora_roles(site: Site) -> tuple[dict, dict]:
    dora = site.extra
    return {dora.magnitude: "m"}, ({dora.grad_m: "dm"} if dora.grad_m is not None and site.backward else {})


def dora_labels(site: Site) -> dict:
    """LoRA's labels of the adapter's products, with DoRA's sum, norm and magnitude gradient."""
    dora, grads = site.extra, site.backward
    labels = lora_labels(site)
    labels[site.forward.out] = "Y = mns ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) + b"
    norm, root, radicand, squares, merged = dora.nodes
    labels.update({norm: "‖W′‖", root: "√", radicand: "Σ rows", squares: "W′ ⊙ W′", merged: "W′ = W + s·B·A",
                   dora.mns: "mns = m / ‖W′‖"})
    if grads is not None:
        labels[grads.g] = "s·mns ⊙ dY"
        if grads.dx_sum is not None:
            labels[grads.dx_sum.base_mm] = "(mns ⊙ dY)·W"
            labels[grads.dx_sum.lora_add] = "dX = (mns ⊙ dY)·W + Z1·A"
    if dora.grad_m is not None:
        labels[dora.grad_m] = "dm"
    return labels


def dora_nodes(site: Site) -> tuple:
    return tuple(site.extra.nodes) + (site.extra.mns, site.extra.grad_m)


DORA = SiteKind(
    name="dora",
    proves=proves_dora,
    match=match_dora,
    forwards=DORA_FORWARDS,
    backwards=DORA_BACKWARDS,
    forward_operands=dora_forward_operands,
    backward_operands=dora_backward_operands,
    before_gemms=dora_before_gemms,
    replacements=dora_replacements,
    roles=dora_roles,
    own_nodes=dora_nodes,
    labels=dora_labels,
    part_of_a_site=is_dora_norm_product,
)
