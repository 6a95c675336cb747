"""Every bracketing of one LoRA linear, forward and backward (RunLoRA: Cherniuk et al., §2, Table 1).

Notation, in PEFT's layout (the paper writes the same with W, A, B transposed):

    X[N,i]   tokens × in-features: the adapter's input (after dropout, when there is dropout)
    W[o,i]   frozen base weight          A[r,i]  lora_A.weight        B[o,r]  lora_B.weight
    s        scale (lora_alpha / r, or lora_alpha / √r with use_rslora)
    dY[N,o]  gradient of the output Y = X·Wᵀ (+ bias) + s·(X·Aᵀ)·Bᵀ

The gradients every backward computes:  dA = s·Bᵀ·dYᵀ·X,  dB = s·dYᵀ·X·Aᵀ,  dX = dY·W + s·dY·B·A.

A variant is one function, the list of matrix products it performs, and a guard. The function computes
its bracketing through an `ops` object, so the same code runs on real tensors (`EagerOps`: tests, the
"time" criterion) and emits FX nodes into the joint graph (`lora_rewrite.passes.rewrite.GraphOps`); it
returns its result together with the intermediate products later passes reuse (`ForwardResult`,
`BackwardResult`). The guard reads the facts the matcher established about a site (`SiteFacts`) and
says why the variant would be wrong there, or None. The product list is the cost formula: FLOPs are
Σ 2·m·k·n (torch.utils.flop_counter's convention, matmuls only) and bytes are each product's operands
read once and result written once. The scale rides inside a product as addmm's alpha where it is a
Python number (`lora_rewrite.forms.scaled_mm`: no elementwise pass, no kernel of its own to compile);
a tensor scale goes on a rank-sized factor or result (s·B is o×r; with 16-bit adapters s·(dY·B), see
`_z1`), never on an [N,o] or [N,i] tensor; sums are accumulated inside the matmul (`addmm`) rather
than by a separate pass, except onto a base in another dtype (`factored_forward`).

Which physical form each product runs in (orientation, Z1 folded into the dX product) is a choice
apart from the bracketing, with the same FLOPs: every product with a choice is emitted through
`lora_rewrite.forms.product` / `ops.pick` under its role, and the ops object runs the planned form.

X·Aᵀ is never saved for backward: variants that need it in backward recompute it (`ops.recompute`
tags it so the partitioner does not keep the forward's copy alive), and so does the merged weight
W + s·B·A, which is o×i and would otherwise be held per layer.

FORWARDS and BACKWARDS below are the one explicit, ordered list of variants; ties in a cost
criterion go to the earlier (lower-numbered) entry, as in the paper.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lora_rewrite.forms import (FOLDED, GRAD_A, GRAD_B, SEPARATE, XA, Z1, Z1_IN_DX, Z2, ZT, FixedForms, FormPlan,
                                is_number, product, scaled_mm)

aten = torch.ops.aten


# --- the cost vocabulary ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Gemm:
    """One matrix product [m,k]·[k,n] → [m,n]; `accumulate` adds it onto an existing [m,n] (addmm)."""

    m: Any
    k: Any
    n: Any
    what: str
    accumulate: bool = False

    def flops(self):
        return 2 * self.m * self.k * self.n

    def bytes(self, element_size: int):
        result_passes = 2 if self.accumulate else 1  # addmm reads the accumulator it writes
        return element_size * (self.m * self.k + self.k * self.n + result_passes * self.m * self.n)


@dataclass(frozen=True)
class Dims:
    """The shape of one LoRA site. N may be a torch.SymInt (dynamic shapes) or a plain int."""

    N: Any
    i: int
    o: int
    r: int
    needs_dx: bool = True  # does the adapter's input need a gradient (False for the first layer)


@dataclass(frozen=True)
class SiteFacts:
    """What the matcher (passes/match.py) established about one site: all that a guard reads."""

    plain_linear_base: bool          # the base term is X_b·Wᵀ (+ bias) of a weight parameter
    adapter_dtype: torch.dtype       # the dtype X·Aᵀ·Bᵀ is computed in
    base_dtype: torch.dtype          # the dtype of the base result
    weight_dtype: torch.dtype | None  # W's dtype as the base product reads it (None: no plain linear base)
    dropout: bool                    # a random op (lora_dropout) lies between the model and the adapter's X
    adapter_reads_base_input: bool   # X is provably the base product's own input
    base_used_elsewhere: bool        # the base result feeds more than the site's sum
    needs_dx: bool                   # the adapter's input needs a gradient in this graph
    dx_sum_found: bool               # the base's dY·W is summed with the adapter's dX_a
    sum_dtype: torch.dtype | None = None   # a DoRA sum in a wider dtype than its products (torch.autocast)


@dataclass(frozen=True)
class Variant:
    name: str              # the paper's name: "forward1" … "backward5"
    title: str             # what it does, in words
    equation: str
    compute: Callable
    gemms: Callable[[Dims], list]
    merges_weight: bool    # builds W + s·B·A (from the base's Wᵀ operand and bias)
    guard: Callable[[SiteFacts], str | None]   # why it would be wrong at a site; None: legal there
    lora: "Variant | None" = None   # a DoRA variant: the LoRA variant whose products it runs (lora_rewrite/dora.py)

    @property
    def stage(self) -> str:
        return "forward" if "forward" in self.name else "backward"

    @property
    def products(self) -> "Variant":
        """The variant whose products are measured for this one's forms (itself, or its LoRA variant)."""
        return self.lora or self

    def illegal_reason(self, facts: SiteFacts) -> str | None:
        """Why this variant would be wrong at a site with these facts (None: it is legal there)."""
        return self.guard(facts)

    def flops(self, dims: Dims):
        return sum(g.flops() for g in self.gemms(dims))

    def bytes(self, dims: Dims, element_size: int):
        return sum(g.bytes(element_size) for g in self.gemms(dims))


# --- operands and results --------------------------------------------------------------------------

@dataclass
class ForwardOperands:
    """What a forward variant reads. `base` is X·Wᵀ + bias as already computed by the model, in the model's
    dtype (forward1 adds onto it); `w_io` (Wᵀ, [i,o]) and `bias` are what the merged forward needs instead.
    `widen_base`: a base in a narrower dtype than the adapter's is widened and the adapter accumulated onto it
    with addmm (the form before 2026-12-06, kept for same-process A/B measurements: options `disable`)."""

    x: Any
    a: Any
    b: Any
    s: Any
    base: Any = None
    w_io: Any = None
    bias: Any = None
    widen_base: bool = False


class DxMode(enum.Enum):
    """Which input gradient a backward variant returns (None where X needs no gradient)."""

    TOTAL = "total"   # dY·W + s·dY·B·A: the rewrite replaces the base layer's input-gradient product too
    LORA = "lora"     # s·dY·B·A only: the model adds the base part itself (across a cast or a dropout mask)


@dataclass
class BackwardOperands:
    """What a backward variant reads: dY (unscaled, [N,o]), X, A, B, s, and Wᵀ as [i,o] (for
    `dx=DxMode.TOTAL`), and which input gradient to return. `dx_in_rows`: dX leaves the graph as it
    is (autograd, accumulating it into a leaf's .grad, copies anything not in rows), so a dX that is
    a column slice of a wider product is copied to rows inside the stage, where the choice of forms
    sees the copy."""

    dy: Any
    x: Any
    a: Any
    b: Any
    s: Any
    w_io: Any = None
    dx: DxMode | None = DxMode.TOTAL
    dx_in_rows: bool = False


@dataclass(frozen=True)
class ForwardResult:
    """A forward variant's Y, and X·Aᵀ when it computes that product (forward1)."""

    y: Any                 # [N,o]
    xa: Any = None         # X·Aᵀ [N,r]


@dataclass(frozen=True)
class BackwardResult:
    """A backward variant's gradients, and the products of them that other passes reuse."""

    grad_a: Any            # dA [r,i]
    grad_b: Any            # dB [o,r]
    grad_x: Any            # dX [N,i]; None where X needs no gradient
    z1: Any = None         # Z1 = dY·(s·B) [N,r] where dA = Z1ᵀ·X (backward1/2/5); None where dA = (s·B)ᵀ·Zt
    xa: Any = None         # Z2 = X·Aᵀ [N,r], where the variant recomputes it (backward1/5)


HALF_DTYPES = (torch.float16, torch.bfloat16)


class Ops(FixedForms):
    """The op vocabulary every variant computes through, written once: each op is one aten op, done by
    `call`, and what a value is (its shape, dtype, device) is read off `value`. `EagerOps` runs the ops on
    real tensors; `GraphOps` (passes/rewrite.py) appends them to the joint graph as FX nodes with fake values;
    both run each product in the forms they are given (`FixedForms`, lora_rewrite/forms.py)."""

    def __init__(self, forms: FormPlan | None = None):
        self.forms = dict(forms or {})

    def call(self, target, *args, **kwargs):
        raise NotImplementedError

    def value(self, a):
        """The tensor (or fake tensor) `a` holds."""
        raise NotImplementedError

    # products
    def mm(self, a, b):
        return self.call(aten.mm.default, a, b)

    def addmm(self, c, a, b, alpha=1, beta=1):
        if alpha == 1 and beta == 1:
            return self.call(aten.addmm.default, c, a, b)
        if beta == 1:
            return self.call(aten.addmm.default, c, a, b, alpha=alpha)
        return self.call(aten.addmm.default, c, a, b, beta=beta, alpha=alpha)

    def t(self, a):
        return self.call(aten.permute.default, a, [1, 0])

    def scale(self, a, s):
        if isinstance(s, (int, float)) and s == 1:
            return a
        return self.call(aten.mul.Tensor, a, s)

    # elementwise and reductions, for DoRA's magnitude (lora_rewrite/dora.py)
    def mul(self, a, b):
        return self.call(aten.mul.Tensor, a, b)

    def div(self, a, b):
        return self.call(aten.div.Tensor, a, b)

    def add(self, a, b):
        return self.call(aten.add.Tensor, a, b)

    def sub(self, a, b):
        return self.call(aten.sub.Tensor, a, b)

    def sqrt(self, a):
        return self.call(aten.sqrt.default, a)

    def eq(self, a, value):
        return self.call(aten.eq.Scalar, a, value)

    def where(self, condition, a, b):
        if isinstance(a, (int, float)):
            return self.call(aten.where.ScalarSelf, condition, a, b)
        if isinstance(b, (int, float)):
            return self.call(aten.where.ScalarOther, condition, a, b)
        return self.call(aten.where.self, condition, a, b)

    def sum_dim(self, a, dim):
        return self.call(aten.sum.dim_IntList, a, [dim])

    # shapes, layouts and dtypes
    def row(self, a, index):
        return self.call(aten.select.int, a, 0, index)

    def view(self, a, shape_args):
        return self.call(aten.view.default, a, shape_args)

    def reshape(self, a, shape_args):
        return self.call(aten.reshape.default, a, shape_args)

    def cat(self, tensors, dim):
        return self.call(aten.cat.default, list(tensors), dim)

    def narrow(self, a, dim, start, length):
        return self.call(aten.slice.Tensor, a, dim, start, start + length)

    def contiguous(self, a):
        return self.call(aten.clone.default, a, memory_format=torch.contiguous_format)

    def cast(self, a, to_dtype):
        if self.dtype_of(a) == to_dtype:
            return a
        return self.call(torch.ops.prims.convert_element_type.default, a, to_dtype)

    # what a value is
    def dtype_of(self, a):
        return self.value(a).dtype

    def size(self, a, dim):
        return self.value(a).shape[dim]

    def has_rows(self, a):
        """Certainly at least one row (a symbolic N is asked in GraphOps)."""
        return self.value(a).shape[0] > 0

    def device_type(self, a):
        return self.value(a).device.type

    def is_half(self, a):
        return self.dtype_of(a) in HALF_DTYPES

    def stored_as_io(self, w_io):
        """W is stored as its transpose [i,o] (transformers' Conv1D), not as nn.Linear's [o,i]."""
        return self.value(w_io).is_contiguous()

    # what the partitioner is told (GraphOps tags the nodes; on real tensors there is nothing to tell)
    def recompute(self, a):
        return a

    def save(self, a):
        return a


class EagerOps(Ops):
    """`ops` on real tensors, through the same aten ops the graph rewrite emits, each product in the
    given forms (lora_rewrite.forms; default: every role in its default form)."""

    def call(self, target, *args, **kwargs):
        return target(*args, **kwargs)

    def value(self, a):
        return a


def _scaled_b(ops, p):
    """s·B [o,r]: the scale rides on the rank-sized factor. Rebuilt in the backward, never saved."""
    return ops.recompute(ops.scale(p.b, p.s))


def _linear(ops, x, w_io, bias):
    return ops.mm(x, w_io) if bias is None else ops.addmm(bias, x, w_io)


def _merged_weight(ops, p):
    """W′ = W + s·B·A [o,i], built in W's stored layout: addmm(W, B, A, alpha=s) for nn.Linear's [o,i];
    for a weight stored as [i,o] (Conv1D) built as that [i,o] and returned as a transposed view. Never a
    strided copy of W, never saved for backward."""  # 2·o·r·i FLOPs
    alpha, b = (p.s, p.b) if is_number(p.s) else (1, _scaled_b(ops, p))
    if ops.stored_as_io(p.w_io):
        return ops.recompute(ops.t(ops.addmm(p.w_io, ops.t(p.a), ops.t(b), alpha=alpha)))
    return ops.recompute(ops.addmm(ops.t(p.w_io), b, p.a, alpha=alpha))


# --- forward ----------------------------------------------------------------------------------------

def factored_forward(ops, p: ForwardOperands) -> ForwardResult:
    """forward1: Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ — the adapter product accumulated onto the base result, s as addmm's alpha.
    A base in another dtype than the adapter's (PEFT's fp32 adapters on a 16-bit layer) is added as it is,
    in the wider of the two dtypes, as PEFT's type promotion adds it."""
    xa = ops.recompute(product(ops, XA, p.x, ops.t(p.a)))
    base = p.base
    if ops.dtype_of(base) != ops.dtype_of(xa):
        if not p.widen_base:
            # addmm would accumulate onto a widened copy of the base, which it copies once more into its
            # result on the CPU: two [N,o] passes more than one sum Inductor fuses with the casts around it.
            return ForwardResult(ops.add(base, scaled_mm(ops, xa, ops.t(p.b), p.s)), xa=xa)
        base = ops.cast(base, ops.dtype_of(xa))
    if is_number(p.s):
        return ForwardResult(ops.addmm(base, xa, ops.t(p.b), alpha=p.s), xa=xa)
    return ForwardResult(ops.addmm(base, xa, ops.t(_scaled_b(ops, p))), xa=xa)


def factored_forward_gemms(d: Dims):  # 2N·(i·o + r·i + o·r)
    return [Gemm(d.N, d.i, d.o, "X·Wᵀ (base)"),
            Gemm(d.N, d.i, d.r, "X·Aᵀ"),
            Gemm(d.N, d.r, d.o, "+ (X·Aᵀ)·(s·B)ᵀ", accumulate=True)]


def always_legal(facts: SiteFacts) -> None:
    """The factored variants compute exactly PEFT's sum, at every site the matcher accepts."""
    return None


def merged_weight_forward(ops, p: ForwardOperands) -> ForwardResult:
    """forward2: Y = X·(W + s·B·A)ᵀ — fold the adapter into the weight, then one product."""
    return ForwardResult(_linear(ops, p.x, ops.t(_merged_weight(ops, p)), p.bias))


def merged_weight_forward_gemms(d: Dims):  # 2·(i·o·r + N·o·i)
    return [Gemm(d.o, d.r, d.i, "W + s·B·A", accumulate=True),
            Gemm(d.N, d.i, d.o, "X·(W + s·B·A)ᵀ")]


# Reasons shared by the forward and the backward merged-weight guards.
NO_PLAIN_LINEAR = "the base result is not a plain linear of the input (another adapter, or a quantized base)"
DTYPE_SPLIT = ("the adapter computes in {} but the base in {}: merging would round the adapter "
               "into the base weight's precision")


# fp16 has 5 exponent bits (largest finite value 65504); bf16 has fp32's 8. docs/BENCHMARKS.md "fp16 and
# the merged weight" has the error and the speed that decided this (scripts/fp16_merged_weight.py).
FP16_RANGE = ("fp16: W + s·B·A would be formed in fp16, whose range (±65504) s·B·A can exceed where "
              "eager PEFT's s·(X·Aᵀ)·Bᵀ stays finite")


def _fp16_range(facts: SiteFacts) -> str | None:
    if torch.float16 in (facts.adapter_dtype, facts.base_dtype, facts.weight_dtype):
        return FP16_RANGE
    return None


def merged_weight_forward_guard(facts: SiteFacts) -> str | None:
    """forward2 replaces the base product: it needs that product to be X·Wᵀ (+ bias) of the adapter's own
    X, in the adapter's dtype, and used by nothing else, in a dtype whose range holds W + s·B·A."""
    if not facts.plain_linear_base:
        return NO_PLAIN_LINEAR
    if facts.base_dtype != facts.adapter_dtype or facts.weight_dtype != facts.adapter_dtype:
        return DTYPE_SPLIT.format(facts.adapter_dtype, facts.base_dtype)
    if _fp16_range(facts):
        return FP16_RANGE
    if facts.dropout:
        return "lora_dropout: the adapter's input differs from the base's, X·(W + s·B·A)ᵀ would be wrong"
    if not facts.adapter_reads_base_input:
        return "the adapter's input is not provably the base's input"
    if facts.base_used_elsewhere:
        return "the base result is used elsewhere too, so it would still have to be computed"
    return None


FORWARD1 = Variant("forward1", "factored: (X·Aᵀ)·Bᵀ added onto X·Wᵀ", "Y = X·Wᵀ + (X·Aᵀ)·(s·B)ᵀ",
                   factored_forward, factored_forward_gemms, merges_weight=False, guard=always_legal)
FORWARD2 = Variant("forward2", "merged weight: X·(W + s·B·A)ᵀ", "Y = X·(W + s·B·A)ᵀ",
                   merged_weight_forward, merged_weight_forward_gemms, merges_weight=True,
                   guard=merged_weight_forward_guard)


# --- backward ---------------------------------------------------------------------------------------
# Shared pieces, named as in the paper's Algorithms 1-5:
#   Z1 = s·dY·B [N,r]    Z2 = X·Aᵀ [N,r]    Zt = dYᵀ·X [o,i]    W + s·B·A [o,i] (built as its [i,o] transpose)

def _z1(ops, p: BackwardOperands):
    """Z1 = s·dY·B [N,r], the scale as the product's alpha. A tensor scale goes on B (s·B, o×r), or
    with 16-bit adapters on the product's result: a small s would round s·B to a few bits (or to zero)
    in 16-bit, where eager PEFT scales dY itself."""
    if is_number(p.s):
        return product(ops, Z1, p.dy, p.b, p.s)
    if ops.is_half(p.b):
        return ops.scale(product(ops, Z1, p.dy, p.b), p.s)
    return product(ops, Z1, p.dy, _scaled_b(ops, p))


def _z1_and_input_grad(ops, p: BackwardOperands, merged_weight=None):
    """(Z1, dX): Z1 = s·dY·B, and dX = dY·W + Z1·A (factored), dY·W′ (`merged_weight` W′ given), Z1·A
    (DxMode.LORA) or None. Where dX reads dY·W anyway, Z1 is separate or folded into that product as r
    extra columns, `dY·[W | s·B]` (role Z1_in_dX): the same FLOPs, one pass over dY instead of two."""
    if p.dx is None:
        return _z1(ops, p), None
    if p.dx is DxMode.LORA:
        z1 = _z1(ops, p)
        return z1, ops.mm(z1, p.a)
    weight = merged_weight if merged_weight is not None else ops.t(p.w_io)   # [o,i]
    i, r = ops.size(p.a, 1), ops.size(p.a, 0)

    def separate():
        return _z1(ops, p), ops.mm(p.dy, weight)

    def folded():  # 2N·o·(i + r) FLOPs, as dY·W and Z1 apart (+ N·i copied where dX leaves in rows)
        half = ops.is_half(p.b)
        wide = ops.mm(p.dy, ops.cat([weight, p.b if half else _scaled_b(ops, p)], 1))   # [N, i+r]
        z1 = ops.narrow(wide, 1, i, r)
        dy_w = ops.narrow(wide, 1, 0, i)
        if merged_weight is not None and p.dx_in_rows:
            dy_w = ops.contiguous(dy_w)   # this slice is dX itself: a column slice autograd would copy
        return (ops.scale(z1, p.s) if half else z1), dy_w

    z1, dy_w = ops.pick(Z1_IN_DX, {SEPARATE: separate, FOLDED: folded})
    if merged_weight is not None:
        return z1, dy_w
    return z1, ops.addmm(dy_w, z1, p.a)


def _grad_a_through_zt(ops, p: BackwardOperands, zt):
    """dA = s·Bᵀ·Zt [r,i], the scale as alpha; a tensor scale as `_z1` places it."""
    if is_number(p.s) or ops.is_half(p.b):
        return scaled_mm(ops, ops.t(p.b), zt, p.s)
    return ops.mm(ops.t(_scaled_b(ops, p)), zt)


def _dx_gemms_factored(d: Dims):
    if not d.needs_dx:
        return []
    return [Gemm(d.N, d.o, d.i, "dY·W (base)"), Gemm(d.N, d.r, d.i, "+ Z1·A", accumulate=True)]


def _dx_gemms_merged(d: Dims):
    if not d.needs_dx:
        return []
    return [Gemm(d.o, d.r, d.i, "W + s·B·A", accumulate=True), Gemm(d.N, d.o, d.i, "dY·(W + s·B·A)")]


def merged_weight_backward_guard(facts: SiteFacts) -> str | None:
    """backward4/5 build dX = dY·(W + s·B·A) in place of the whole sum dY·W + Z1·A: they need the base's
    dY·W in the same sum as the adapter's dX_a. Without dX they merge nothing (they compute what 3/1 do)
    but stay illegal wherever a merge would be, so no report shows a merged variant under dropout or a
    dtype split."""
    if not facts.plain_linear_base:
        return NO_PLAIN_LINEAR
    if facts.adapter_dtype != facts.base_dtype:
        return DTYPE_SPLIT.format(facts.adapter_dtype, facts.base_dtype)
    if _fp16_range(facts):
        return FP16_RANGE
    if facts.dropout:
        return "lora_dropout: the adapter's input differs from the base's"
    if facts.needs_dx and not facts.dx_sum_found:
        return "the base layer's input gradient dY·W was not found in the same sum as the adapter's"
    return None


def backward1(ops, p: BackwardOperands) -> BackwardResult:
    """backward1 (Algorithm 1): dA = Z1ᵀ·X, dB = s·dYᵀ·Z2, dX = dY·W + Z1·A, with Z1 = s·dY·B, Z2 = X·Aᵀ recomputed."""
    z1, grad_x = _z1_and_input_grad(ops, p)
    z2 = ops.recompute(product(ops, Z2, p.x, ops.t(p.a)))
    grad_a = product(ops, GRAD_A, ops.t(z1), p.x)
    grad_b = product(ops, GRAD_B, ops.t(p.dy), z2, p.s)
    return BackwardResult(grad_a, grad_b, grad_x, z1=z1, xa=z2)


def backward1_gemms(d: Dims):  # 2N·(2o·r + 3i·r + o·i)
    return [Gemm(d.N, d.o, d.r, "Z1 = dY·(s·B)"), Gemm(d.N, d.i, d.r, "Z2 = X·Aᵀ"),
            Gemm(d.r, d.N, d.i, "dA = Z1ᵀ·X"), Gemm(d.o, d.N, d.r, "dB = dYᵀ·Z2")] + _dx_gemms_factored(d)


def backward2(ops, p: BackwardOperands) -> BackwardResult:
    """backward2 (Algorithm 2): dA = Z1ᵀ·X, dB = s·Zt·Aᵀ, dX = dY·W + Z1·A, with Zt = dYᵀ·X."""
    z1, grad_x = _z1_and_input_grad(ops, p)
    zt = product(ops, ZT, ops.t(p.dy), p.x)
    grad_a = product(ops, GRAD_A, ops.t(z1), p.x)
    grad_b = scaled_mm(ops, zt, ops.t(p.a), p.s)
    return BackwardResult(grad_a, grad_b, grad_x, z1=z1)


def backward2_gemms(d: Dims):  # 2N·(o·r + 2i·r + 2i·o) + 2i·o·r
    return [Gemm(d.N, d.o, d.r, "Z1 = dY·(s·B)"), Gemm(d.o, d.N, d.i, "Zt = dYᵀ·X"),
            Gemm(d.r, d.N, d.i, "dA = Z1ᵀ·X"), Gemm(d.o, d.i, d.r, "dB = Zt·Aᵀ")] + _dx_gemms_factored(d)


def backward3(ops, p: BackwardOperands) -> BackwardResult:
    """backward3 (Algorithm 3): dA = (s·B)ᵀ·Zt, dB = s·Zt·Aᵀ, dX = dY·W + Z1·A, with Zt = dYᵀ·X."""
    zt = product(ops, ZT, ops.t(p.dy), p.x)
    grad_a = _grad_a_through_zt(ops, p, zt)
    grad_b = scaled_mm(ops, zt, ops.t(p.a), p.s)
    grad_x = _z1_and_input_grad(ops, p)[1] if p.dx else None
    return BackwardResult(grad_a, grad_b, grad_x)


def backward3_gemms(d: Dims):  # 2N·(2i·o + o·r + i·r) + 4i·o·r
    dx = [Gemm(d.N, d.o, d.r, "Z1 = dY·(s·B)")] + _dx_gemms_factored(d) if d.needs_dx else []
    return [Gemm(d.o, d.N, d.i, "Zt = dYᵀ·X"), Gemm(d.r, d.o, d.i, "dA = (s·B)ᵀ·Zt"),
            Gemm(d.o, d.i, d.r, "dB = Zt·Aᵀ")] + dx


def backward4(ops, p: BackwardOperands) -> BackwardResult:
    """backward4 (Algorithm 4): dA = (s·B)ᵀ·Zt, dB = s·Zt·Aᵀ, dX = dY·(W + s·B·A)."""
    zt = product(ops, ZT, ops.t(p.dy), p.x)
    grad_a = _grad_a_through_zt(ops, p, zt)
    grad_b = scaled_mm(ops, zt, ops.t(p.a), p.s)
    grad_x = ops.mm(p.dy, _merged_weight(ops, p)) if p.dx else None
    return BackwardResult(grad_a, grad_b, grad_x)


def backward4_gemms(d: Dims):  # 2·(2N·i·o + 3i·o·r)
    return [Gemm(d.o, d.N, d.i, "Zt = dYᵀ·X"), Gemm(d.r, d.o, d.i, "dA = (s·B)ᵀ·Zt"),
            Gemm(d.o, d.i, d.r, "dB = Zt·Aᵀ")] + _dx_gemms_merged(d)


def backward5(ops, p: BackwardOperands) -> BackwardResult:
    """backward5 (Algorithm 5): dA = Z1ᵀ·X, dB = s·dYᵀ·Z2, dX = dY·(W + s·B·A), Z2 = X·Aᵀ recomputed."""
    z1, grad_x = _z1_and_input_grad(ops, p, _merged_weight(ops, p) if p.dx else None)
    z2 = ops.recompute(product(ops, Z2, p.x, ops.t(p.a)))
    grad_a = product(ops, GRAD_A, ops.t(z1), p.x)
    grad_b = product(ops, GRAD_B, ops.t(p.dy), z2, p.s)
    return BackwardResult(grad_a, grad_b, grad_x, z1=z1, xa=z2)


def backward5_gemms(d: Dims):  # 2N·(2o·r + 2i·r + o·i) + 2i·o·r
    return [Gemm(d.N, d.o, d.r, "Z1 = dY·(s·B)"), Gemm(d.N, d.i, d.r, "Z2 = X·Aᵀ"),
            Gemm(d.r, d.N, d.i, "dA = Z1ᵀ·X"), Gemm(d.o, d.N, d.r, "dB = dYᵀ·Z2")] + _dx_gemms_merged(d)


BACKWARD1 = Variant("backward1", "factored, X·Aᵀ recomputed",
                    "dA = Z1ᵀX, dB = s·dYᵀ(XAᵀ), dX = dY·W + Z1·A",
                    backward1, backward1_gemms, merges_weight=False, guard=always_legal)
BACKWARD2 = Variant("backward2", "dB through dYᵀ·X", "dA = Z1ᵀX, dB = s·(dYᵀX)·Aᵀ, dX = dY·W + Z1·A",
                    backward2, backward2_gemms, merges_weight=False, guard=always_legal)
BACKWARD3 = Variant("backward3", "dA and dB through dYᵀ·X",
                    "dA = (sB)ᵀ(dYᵀX), dB = s·(dYᵀX)·Aᵀ, dX = dY·W + Z1·A",
                    backward3, backward3_gemms, merges_weight=False, guard=always_legal)
BACKWARD4 = Variant("backward4", "dA, dB through dYᵀ·X; dX through the merged weight",
                    "dA = (sB)ᵀ(dYᵀX), dB = s·(dYᵀX)·Aᵀ, dX = dY·(W + s·B·A)",
                    backward4, backward4_gemms, merges_weight=True, guard=merged_weight_backward_guard)
BACKWARD5 = Variant("backward5", "factored dA, dB; dX through the merged weight",
                    "dA = Z1ᵀX, dB = s·dYᵀ(XAᵀ), dX = dY·(W + s·B·A)",
                    backward5, backward5_gemms, merges_weight=True, guard=merged_weight_backward_guard)

# The gradients as autograd derives them from PEFT's forward (what stock Inductor runs): X·Aᵀ saved
# from the forward, the scale applied to the [N,o] gradient. Not a variant: the "before" of the report.
def autograd_backward_gemms(d: Dims):  # 2N·(2o·r + i·r + [i·r + o·i])
    dx = [Gemm(d.N, d.r, d.i, "dX_a = (s·dY·B)·A"), Gemm(d.N, d.o, d.i, "dY·W (base)")] if d.needs_dx else []
    return [Gemm(d.o, d.N, d.r, "dB = (s·dY)ᵀ·(X·Aᵀ)"), Gemm(d.N, d.o, d.r, "s·dY·B"),
            Gemm(d.r, d.N, d.i, "dA = (s·dY·B)ᵀ·X")] + dx


FORWARDS: tuple[Variant, ...] = (FORWARD1, FORWARD2)
BACKWARDS: tuple[Variant, ...] = (BACKWARD1, BACKWARD2, BACKWARD3, BACKWARD4, BACKWARD5)
BY_NAME: dict[str, Variant] = {v.name: v for v in FORWARDS + BACKWARDS}


def variant_names(variants: Sequence[Variant]) -> list[str]:
    return [v.name for v in variants]
