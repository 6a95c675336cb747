"""DoRA (weight-decomposed LoRA, PEFT's `use_dora=True`): its variants, built on LoRA's.

PEFT computes, per step (peft/tuners/lora/dora.py; the notation of lora_rewrite/variants.py):

    W′  = W + s·B·A                         [o,i]   (PEFT gets B·A as B(A(eye(i)))ᵀ: an [i,i] identity)
    mns = m / ‖W′‖                          [o]     row norms, detached: no gradient through the norm
    Y   = mns ⊙ (X·W′ᵀ) + b                         without dropout
    Y   = X·Wᵀ + b + (mns − 1) ⊙ (X̃·Wᵀ) + mns ⊙ s·(X̃·Aᵀ)·Bᵀ       with lora_dropout, X̃ = drop(X)

With P = X̃·W′ᵀ (X̃ = X without dropout) the gradients are

    dm = Σₙ dY ⊙ P / ‖W′‖                   [o]
    dA, dB, dX̃ = LoRA's, with dY replaced by dP = mns ⊙ dY

and `diag(mns)` folds into the rank- and weight-sized factors instead of the [N,o] gradient:
Z1 = s·dY·(mns ⊙ B), dA = Z1ᵀ·X̃ or (s·mns ⊙ B)ᵀ·(dYᵀ·X̃), dB = mns ⊙ (LoRA's dB of dY),
dX̃ = dY·(k ⊙ W) + Z1·A with k = mns (without dropout: the whole dX) or k = mns − 1 (with dropout:
X̃'s part; the model's own dY·W reaches X unchanged). So every RunLoRA backward applies: DoRA's backward
K is LoRA's backward K on the operands (dY, X̃, A, mns ⊙ B, s, k ⊙ W), then the row scaling of dB and
the reduction for dm. Its products are LoRA backward K's products, so its product forms are measured
as LoRA backward K's (`Variant.lora`).

The norm is computed as PEFT computes it, in the dtype PEFT computes it in, but with B·A as one
product (`addmm(W, B, A, alpha=s)`, 2·o·r·i FLOPs) instead of the [i,i] identity (2·i·i·r + 2·i·r·o).
W′ is never saved for backward; P ([N,o], or P ⊙ mns) is, for dm — the one [N,o] tensor per site DoRA needs.
Where the base product is 16-bit and P is summed wider (PEFT's fp32 adapters on a 16-bit model, the
QLoRA recipe; torch.autocast), only the base is kept: with P = X̃·Wᵀ + s·(X̃·Aᵀ)·Bᵀ and LoRA's
dB° = s·dYᵀ·(X̃·Aᵀ) (before the mns scaling),

    Σₙ dY ⊙ P = Σₙ dY ⊙ (X̃·Wᵀ) + rowsum(dB° ⊙ B)

so the adapter's part of dm comes from a product the backward forms anyway: 2 bytes an element kept
instead of 4, and no P written in the forward besides Y.

Forward variants: dora-forward1 (factored, P kept) always; dora-forward2 (Y = X·(mns ⊙ W′)ᵀ + b, one
product; in training P ⊙ mns kept instead of P, see `dora_forward2`) where LoRA's merged forward is legal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_rewrite.forms import XA, is_number, product
from lora_rewrite.variants import (BACKWARDS, FORWARD1, FORWARD2, BackwardOperands, Dims, DxMode, ForwardOperands,
                                   Gemm, SiteFacts, Variant, always_legal, merged_weight_backward_guard,
                                   merged_weight_forward_guard)


FP32 = torch.float32


# --- operands and results --------------------------------------------------------------------------

@dataclass
class DoraForwardOperands:
    """What a DoRA forward variant reads.

    x, a, b, s: the adapter's input (X̃ under dropout), A, B, scale. m: the magnitude [o].
    norm_weight: W as PEFT's norm reads it, [o,i] in the norm's dtype (`norm_dtype`); its squares are
    summed in `norm_reduce_dtype` (fp32 for a 16-bit norm, as the decomposition does).
    w_io, bias: the base layer's Wᵀ [i,o] and bias (or None).
    base_x: the base product's input: x itself, or (PEFT's fp32 adapters on a 16-bit model) the 16-bit X
    that x is the upcast of — the base product stays in the base's dtype, as the model computes it.
    base_full: the model's base result X·Wᵀ + b as [N,o] (with dropout: Y adds onto it).
    sum_dtype: under torch.autocast PEFT's sum is fp32 (an fp32 magnitude times 16-bit products): P is
    summed from the 16-bit products in it, never rounded to their dtype; None: P in x's dtype.
    dropout_product: with dropout, the model's X̃·Wᵀ [N,o] (P accumulates onto it); None without.
    norm_out_dtype: the dtype PEFT's norm is cast to (`.to(weight.dtype)`).
    """

    x: Any
    a: Any
    b: Any
    s: Any
    m: Any
    norm_weight: Any
    norm_dtype: Any
    norm_out_dtype: Any
    norm_reduce_dtype: Any
    w_io: Any
    bias: Any = None
    base_full: Any = None
    dropout_product: Any = None
    trains: bool = False   # the graph has the site's backward: dm will need P
    base_x: Any = None
    sum_dtype: Any = None  # torch.autocast: the products in x's dtype, P and Y in this wider one (None: x's)
    reused_base: Any = None  # X·Wᵀ [N,o] as the model computed it, where it cannot be recomputed from w_io
                             # (a 4-bit base: w_io is None, its product's bias taken out)
    widen_base: bool = False  # forward1's sum onto a narrower base: widened first (ForwardOperands.widen_base)


@dataclass(frozen=True)
class DoraForwardResult:
    y: Any                 # [N,o]
    norm: Any              # ‖W′‖ [o] (detached)
    mns: Any               # m / ‖W′‖ [o]
    p: Any = None          # what dm reads: P = X̃·W′ᵀ (forward1), or P ⊙ k [N,o] (forward2 in training)
    p_scale: Any = None    # k [o] with p = P ⊙ k (None: p is P itself)
    xa: Any = None         # X̃·Aᵀ [N,r] (forward1)
    p_is_base: bool = False  # p is the 16-bit X̃·Wᵀ alone: dm's adapter part comes from dB (see the top)


@dataclass
class DoraBackwardOperands:
    """dY [N,o], X̃, A, B, s; the forward's ‖W′‖, mns and P; the base's Wᵀ [i,o] (for dX); which dX
    (`dx`, as LoRA's); `dropout`: dX̃ is X̃'s part (k = mns − 1) rather than the whole dX (k = mns)."""

    dy: Any
    x: Any
    a: Any
    b: Any
    s: Any
    norm: Any
    mns: Any
    p: Any
    p_scale: Any = None
    w_io: Any = None
    dx: DxMode | None = DxMode.TOTAL
    dx_in_rows: bool = False
    dropout: bool = False
    p_is_base: bool = False


@dataclass(frozen=True)
class DoraBackwardResult:
    grad_a: Any
    grad_b: Any
    grad_x: Any
    grad_m: Any            # dm [o]
    z1: Any = None
    xa: Any = None


# --- the shared pieces ----------------------------------------------------------------------------

def as_column(ops, v, size):
    """v [o] as [o,1]: scales the rows of an [o,·] factor."""
    return ops.view(v, [size, 1])


def scaled_weight_io(ops, w_io, k, o):
    """(k ⊙ W)ᵀ [i,o], k [o] scaling W's rows, in W's stored layout (nn.Linear's [o,i] stays [o,i], a
    Conv1D's [i,o] stays [i,o]): a later product reads it as stored, with no strided copy."""  # o·i multiplies
    if ops.stored_as_io(w_io):
        return ops.mul(w_io, ops.view(k, [1, o]))
    return ops.t(ops.mul(ops.t(w_io), as_column(ops, k, o)))


def row_norm(ops, p: DoraForwardOperands):
    """‖W + s·B·A‖ per row, in PEFT's dtype: W′ = addmm(W, B, A, alpha=s), never an [i,i] identity."""  # 2·o·r·i FLOPs
    b = ops.cast(p.b, p.norm_dtype)
    a = ops.cast(p.a, p.norm_dtype)
    if is_number(p.s):
        merged = ops.addmm(p.norm_weight, b, a, alpha=p.s)
    else:
        merged = ops.addmm(p.norm_weight, ops.scale(b, p.s), a)
    ops.recompute(merged)   # [o,i]: rebuilt where needed, never saved
    wide = ops.cast(merged, p.norm_reduce_dtype)
    norm = ops.sqrt(ops.sum_dim(ops.mul(wide, wide), 1))
    return ops.cast(norm, p.norm_out_dtype), merged


def magnitude_scale(ops, p: DoraForwardOperands):
    """(‖W′‖, mns = m / ‖W′‖, W′)."""
    norm, merged = row_norm(ops, p)
    return norm, ops.div(p.m, norm), merged


def dora_forward1(ops, p: DoraForwardOperands) -> DoraForwardResult:
    """dora-forward1: P = X̃·Wᵀ + s·(X̃·Aᵀ)·Bᵀ (LoRA's forward1), Y = mns ⊙ P + b, or with dropout
    Y = (X·Wᵀ + b) + mns ⊙ P − X̃·Wᵀ. P is kept for dm."""
    norm, mns, _ = magnitude_scale(ops, p)
    o = ops.size(p.b, 0)
    if p.reused_base is not None:            # a 4-bit base: its product as bitsandbytes computed it
        base = p.reused_base
    elif p.dropout_product is None:          # X·Wᵀ without the bias, in the base's dtype (forward1 widens the sum)
        base = ops.mm(p.x if p.base_x is None else p.base_x, p.w_io)
    else:
        base = p.dropout_product             # the model's X̃·Wᵀ
    if p.sum_dtype is None:
        lora = FORWARD1.compute(ops, ForwardOperands(x=p.x, a=p.a, b=p.b, s=p.s, base=base, widen_base=p.widen_base))
        summed, xa = lora.y, lora.xa
    else:
        summed, xa = widened_sum(ops, p, base)
    p_is_base = p.trains and ops.is_half(base) and not ops.is_half(summed)
    if p_is_base:
        ops.save(base)     # 16-bit X̃·Wᵀ for dm; its adapter part comes from dB
    elif p.trains:
        ops.save(summed)   # P itself for dm, not the two products it sums
    scaled = ops.mul(summed, ops.view(mns, [1, o]))
    wide = ops.dtype_of(scaled)
    if p.dropout_product is None:
        y = scaled if p.bias is None else ops.add(scaled, ops.cast(p.bias, wide))
    else:
        y = ops.sub(ops.add(ops.cast(p.base_full, wide), scaled), ops.cast(p.dropout_product, wide))
    return DoraForwardResult(y, norm, mns, p=base if p_is_base else summed, xa=xa, p_is_base=p_is_base)


def widened_sum(ops, p: DoraForwardOperands, base):
    """(P, X·Aᵀ) with P = float(X·Wᵀ) + s·float((X·Aᵀ)·Bᵀ) in p.sum_dtype: each product in x's dtype, as
    torch.autocast computes it, their sum in the wider dtype, as PEFT's type promotion sums them."""  # forward1's FLOPs
    xa = ops.recompute(product(ops, XA, p.x, ops.t(p.a)))
    term = ops.scale(ops.cast(ops.mm(xa, ops.t(p.b)), p.sum_dtype), p.s)
    return ops.add(ops.cast(base, p.sum_dtype), term), xa


def dora_forward1_gemms(d: Dims):  # 2·o·r·i + 2N·(i·o + r·i + o·r)
    return [Gemm(d.o, d.r, d.i, "‖W + s·B·A‖", accumulate=True)] + FORWARD1.gemms(d)


def dora_forward2(ops, p: DoraForwardOperands) -> DoraForwardResult:
    """dora-forward2: Y = X·(mns ⊙ W′)ᵀ + b — the magnitude and the adapter folded into the weight.

    In training dm needs P = X·W′ᵀ, which this product gives up to the column scale: Q = X·(k ⊙ W′)ᵀ with
    k = mns, so P = Q ⊘ k — except where m is 0, where mns ⊙ P holds nothing of P. There k is 1 instead,
    Q is P itself, and Y = Q ⊙ [mns ≠ 0] + b: exact for every m, one [N,o] pass (as forward1's), no
    rank-sized products and no accumulation onto the base. Q is kept for dm (one [N,o], as P)."""
    norm, mns, merged = magnitude_scale(ops, p)
    o = ops.size(p.b, 0)
    if not p.trains:   # nothing needs P: Y straight out of one product
        weight = ops.recompute(ops.mul(merged, as_column(ops, mns, o)))     # [o,i]
        y = ops.mm(p.x, ops.t(weight)) if p.bias is None else ops.addmm(p.bias, p.x, ops.t(weight))
        return DoraForwardResult(y, norm, mns)
    zero = ops.eq(mns, 0)
    k = ops.where(zero, 1.0, mns)
    weight = ops.recompute(ops.mul(merged, as_column(ops, k, o)))          # k ⊙ W′ [o,i]
    q = ops.mm(p.x, ops.t(weight))                                          # P ⊙ k [N,o]
    y = ops.where(ops.view(zero, [1, o]), 0.0, q)
    if p.bias is not None:
        y = ops.add(y, p.bias)
    return DoraForwardResult(y, norm, mns, p=q, p_scale=k)


def dora_forward2_gemms(d: Dims):  # 2·(o·r·i + N·o·i)
    return FORWARD2.gemms(d)


WIDENED_SUM = ("the products are summed in {} (torch.autocast): merging the adapter and the magnitude into the "
               "{} weight would round that sum to the weight's dtype")


def widened_sum_guard(facts: SiteFacts) -> str | None:
    if facts.sum_dtype is not None and facts.sum_dtype != facts.adapter_dtype:
        return WIDENED_SUM.format(facts.sum_dtype, facts.adapter_dtype)
    return None


def dora_forward2_guard(facts: SiteFacts) -> str | None:
    """As LoRA's forward2 (the base product is replaced by X·(k ⊙ W′)ᵀ), and never under a widened sum."""
    return widened_sum_guard(facts) or merged_weight_forward_guard(facts)


DORA_FORWARD1 = Variant("dora-forward1", "DoRA factored: P = X·Wᵀ + s·(X·Aᵀ)·Bᵀ kept, Y = mns ⊙ P + b",
                        "Y = mns ⊙ (X·Wᵀ + (X·Aᵀ)·(s·B)ᵀ) + b", dora_forward1, dora_forward1_gemms,
                        merges_weight=False, guard=always_legal, lora=FORWARD1)
DORA_FORWARD2 = Variant("dora-forward2", "DoRA merged: X·(mns ⊙ (W + s·B·A))ᵀ + b",
                        "Y = X·(mns ⊙ (W + s·B·A))ᵀ + b", dora_forward2, dora_forward2_gemms,
                        merges_weight=True, guard=dora_forward2_guard, lora=FORWARD2)


# --- backward ---------------------------------------------------------------------------------------

TOKEN_BLOCK_ROWS = (32, 16, 8)   # rows per block of token_sum on a CPU, the first that divides N


def token_sum(ops, e):
    """Σₙ e [N,o] → [o], in row blocks on a CPU: Σ_blocks (Σ_rows in block e), accumulated in fp32.

    Inductor's CPU kernel for the plain column sum walks each 16-column strip down all N rows, one
    cache line from each row's page: a TLB miss per load. Summing blocks of 32 rows first keeps 32 pages
    in use per strip, and the second sum walks only the [N/32, o] partial sums: 3.97 → 1.93 ms at
    4096 × 1024 (scripts/bench_token_sum.py; BENCHMARKS.md, "DoRA's dm reduction"). A GPU's
    column reduction, or a symbolic N (no view without a divisibility guard), keeps the plain sum."""
    n, o = ops.size(e, 0), ops.size(e, 1)
    rows = next((r for r in TOKEN_BLOCK_ROWS if isinstance(n, int) and n % r == 0 and n > r), None)
    if ops.device_type(e) != "cpu" or rows is None:
        return ops.sum_dim(e, 0)
    wide = ops.cast(e, FP32) if ops.is_half(e) else e   # the partial sums rounded once, at the end
    blocks = ops.sum_dim(ops.reshape(wide, [n // rows, rows, o]), 1)
    return ops.cast(ops.sum_dim(blocks, 0), ops.dtype_of(e))


def _dora_backward_compute(lora: Variant):
    def compute(ops, p: DoraBackwardOperands) -> DoraBackwardResult:
        o = ops.size(p.b, 0)
        column = as_column(ops, p.mns, o)
        dy = p.dy
        if ops.dtype_of(p.dy) != ops.dtype_of(p.b):
            # torch.autocast: LoRA's products in B's 16-bit dtype on dY cast down (an [N,o] pass autograd
            # makes anyway); with DxMode.TOTAL the model's 16-bit base gradient is that same cast, mns in W
            dy = ops.cast(p.dy, ops.dtype_of(p.b))
        scaled_b = ops.recompute(ops.mul(p.b, ops.cast(column, ops.dtype_of(p.b))))    # mns ⊙ B [o,r]
        w_io = None
        if p.dx is DxMode.TOTAL:
            k = ops.sub(p.mns, 1) if p.dropout else p.mns
            w_io = ops.recompute(scaled_weight_io(ops, p.w_io, ops.cast(k, ops.dtype_of(p.w_io)), o))
        result = lora.compute(ops, BackwardOperands(dy=dy, x=p.x, a=p.a, b=scaled_b, s=p.s, w_io=w_io,
                                                    dx=p.dx, dx_in_rows=p.dx_in_rows))
        grad_b = ops.mul(result.grad_b, ops.cast(column, ops.dtype_of(result.grad_b)))   # mns ⊙ dB°
        norm = p.norm if p.p_scale is None else ops.mul(p.norm, p.p_scale)    # p = P ⊙ k: divide k out
        dm_sum = token_sum(ops, ops.mul(p.dy, p.p))                                       # Σₙ dY ⊙ P
        if p.p_is_base:   # p = X̃·Wᵀ: the adapter's part is rowsum(dB° ⊙ B) (the top of this file)
            wide = ops.dtype_of(dm_sum)
            dm_sum = ops.add(dm_sum, ops.sum_dim(ops.mul(ops.cast(result.grad_b, wide), ops.cast(p.b, wide)), 1))
        grad_m = ops.div(dm_sum, norm)                                                    # / ‖W′‖
        return DoraBackwardResult(result.grad_a, grad_b, result.grad_x, grad_m, z1=result.z1, xa=result.xa)

    return compute


def _dora_backward_guard(lora: Variant):
    def guard(facts: SiteFacts) -> str | None:
        return (widened_sum_guard(facts) or merged_weight_backward_guard(facts)) if lora.merges_weight else None

    return guard


def dora_backward(lora: Variant) -> Variant:
    """DoRA's backward K: LoRA's backward K on (dY, X̃, A, mns ⊙ B, s, k ⊙ W), then dB ← mns ⊙ dB and
    dm = Σₙ dY ⊙ P / ‖W′‖. The same products as LoRA's (its FLOPs, its forms)."""
    return Variant(f"dora-{lora.name}", f"DoRA, {lora.title}", f"{lora.equation}; dP = mns ⊙ dY, dm = Σ dY⊙P/‖W′‖",
                   _dora_backward_compute(lora), lora.gemms, merges_weight=lora.merges_weight,
                   guard=_dora_backward_guard(lora), lora=lora)


DORA_FORWARDS: tuple[Variant, ...] = (DORA_FORWARD1, DORA_FORWARD2)
DORA_BACKWARDS: tuple[Variant, ...] = tuple(dora_backward(v) for v in BACKWARDS)
DORA_BY_LORA_NAME: dict[str, Variant] = {v.lora.name: v for v in DORA_FORWARDS + DORA_BACKWARDS}


# PEFT's DoRA as autograd runs it (what stock Inductor compiles): not a variant, the "before" of the report.
def peft_dora_gemms(d: Dims, dropout: bool, trains: bool):  # the eye trick, the products, their gradients
    forward = [Gemm(d.i, d.i, d.r, "eye·Aᵀ"), Gemm(d.i, d.r, d.o, "(eye·Aᵀ)·Bᵀ")] + FORWARD1.gemms(d)
    if dropout:
        forward.append(Gemm(d.N, d.i, d.o, "X̃·Wᵀ (the second base product)"))
    if not trains:
        return forward
    backward = [Gemm(d.o, d.N, d.r, "dB"), Gemm(d.N, d.o, d.r, "Z1"), Gemm(d.r, d.N, d.i, "dA")]
    if d.needs_dx:
        backward += [Gemm(d.N, d.r, d.i, "Z1·A"), Gemm(d.N, d.o, d.i, "dY·W")]
        if dropout:
            backward.append(Gemm(d.N, d.o, d.i, "the second base product's dX̃"))
    return forward + backward
