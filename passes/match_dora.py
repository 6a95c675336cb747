"""Finding PEFT DoRA sites (`use_dora=True`) in a joint or inference graph.

A DoRA layer adds to LoRA's chain (lora_rewrite/dora.py has the algebra; peft/tuners/lora/dora.py the source):

    forward                                                  backward
    L    = permute(mm(mm(eye(i), Aᵀ), Bᵀ))    [o,i] = B·A     g   = s·mns ⊙ dY                [N,o]
    norm = sqrt(Σ_rows (W + s·L)²)            [o]            dB, Z1, dA, dX_a from g as LoRA's
    mns  = m / norm                           [o]            dX_b = (mns ⊙ dY)·W (the base's; with dropout
    out  = base + (mns − 1)·(base − b) + mns·s·(X·Aᵀ)·Bᵀ            ((mns − 1) ⊙ dY)·W of the second product)
           (with dropout: (mns − 1)·(X̃·Wᵀ) instead)         dm  = d(mns) / norm

The sum `out` is established as a polynomial over its atoms (passes/poly.py), whatever order PEFT's
expression and Inductor's passes left it in: `mns·(X·Wᵀ) + b + s·mns·lora` without dropout,
`X·Wᵀ + b + mns·(X̃·Wᵀ) − X̃·Wᵀ + s·mns·lora` with. The norm is established node by node down to the
identity, the magnitude's gradient as the one backward division by that norm. What is not established
raises NoMatch(reason) and the site is left untouched. A DoRA site whose backward is not in the expected
form is left untouched as a whole: its forward alone cannot be rewritten without keeping the old one.
The norm is read in passes/match_dora_norm.py; the sum's dtypes in passes/match_dora_dtypes.py. What the
base is — a linear, a bitsandbytes 4-bit product (QDoRA) — is the base's to say (passes/base_product.py):
its terms in the sum, its weight as the norm reads it, its second product under dropout, its input gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.forms import is_number
from lora_rewrite.variants import Dims, SiteFacts
from lora_rewrite.passes import poly
from lora_rewrite.passes.bases import base_of_atom
from lora_rewrite.passes.fx import (CASTS, MM, MUL, VIEWS, depends_on, dtype, is_call, same_rows, same_shape,
                                    same_size, same_value, shape, strip_casts, strip_layout,
                                    transpose_source, weight_source)
from lora_rewrite.passes.match_adapter import (adapter_gradients, find_dropout, match_adapter_product, n_arg_of,
                                               read_anchor)
from lora_rewrite.passes.match_dora_dtypes import HALF, adapter_reads_base_input, check_dtypes, check_narrowed
from lora_rewrite.passes.match_dora_norm import is_identity, match_norm
from lora_rewrite.passes.provenance import provenance_of
from lora_rewrite.passes.site import ForwardChain, Gradients, NoMatch, Site

aten = torch.ops.aten

# How many single-user ops above (X·Aᵀ)·Bᵀ the DoRA sum may end: a view, mns·, ·s, the two adds, casts.
SUM_SEARCH_DEPTH = 8


@dataclass(frozen=True)
class DoraChain:
    """What a DoRA site adds to the LoRA chain (lora_rewrite/dora.py): Y = mns ⊙ P + b with
    mns = m / ‖W + s·B·A‖, and the magnitude's gradient: `Site.extra` of a DoRA site.

    The site's ForwardChain holds X̃ (the adapter's input), A, B, s, the sum `out` and the base product;
    `base2d` is the model's base result X·Wᵀ + b as [N,o]."""

    magnitude: Node              # m [o], as the division reads it
    mns: Node                    # m / ‖W′‖ [o] (the old division node)
    norm: Node                   # ‖W′‖ [o], as PEFT computed it (eye trick and all)
    norm_weight: Node            # W as the norm reads it: [o,i], in the norm's dtype
    norm_reduce_dtype: torch.dtype  # the dtype the squares are summed in (fp32 for a 16-bit weight)
    norm_out_dtype: torch.dtype  # the dtype the norm is cast to (PEFT's `.to(weight.dtype)`)
    dropout_product: Node | None  # with dropout: the model's second base product X̃·Wᵀ [N,o]
    grad_m: Node | None          # dm as autograd computes it (None: m needs no gradient, or inference)
    nodes: tuple[Node, ...]      # the old nodes of the norm and the sum


def is_dora_norm_product(anchor: Node) -> bool:
    """Is this X·Aᵀ PEFT's eye(i)·Aᵀ, the first half of DoRA's B·A for the norm (not a site of its own)?"""
    return is_identity(strip_casts(anchor.args[0]))


def proves_dora(anchor: Node, backward: set[Node]) -> bool:
    """Does the graph prove a DoRA site at this X·Aᵀ: (X·Aᵀ)·Bᵀ reaches its sum through a product with an
    [o]-vector m / n whose n is computed from this adapter's own A and B (PEFT's norm ‖W + s·B·A‖)? A scale
    that is not such a norm — a layer scale, a gate, a residual mix — is no DoRA: the site is plain LoRA."""
    xab = next((u for u in anchor.users if u not in backward and is_call(u, MM)), None)
    if xab is None:
        return False
    adapter = {weight_source(transpose_source(anchor.args[1])), weight_source(transpose_source(xab.args[1]))}
    node = xab
    for _ in range(SUM_SEARCH_DEPTH):
        node = forward_user(node, backward)
        if node is None:
            return False
        if not is_call(node, MUL):
            continue
        for vector in node.args:
            scale = poly.atom(vector) if isinstance(vector, Node) else None
            if _is_column_vector(vector) and is_call(scale, aten.div.Tensor) \
                    and depends_on([scale.args[1]], adapter):
                return True
    return False


def match_dora_site(anchor: Node, backward: set[Node], options: Any, kind: Any) -> Site:
    """The complete DoRA site that starts at `anchor` (X·Aᵀ), of `kind` (passes/kind_dora.py's), or NoMatch
    with the reason."""
    x, a, (n, i, r) = read_anchor(anchor, "DoRA: ")
    xab, b, o = match_adapter_product(anchor, backward, r)
    out, (mns, scale, base, second) = _dora_sum(xab, backward, i, o)
    magnitude, norm = mns.args
    norm_weight, (norm_reduce_dtype, norm_out_dtype), norm_nodes = match_norm(norm, base.is_weight, a, b, scale,
                                                                               o, i)
    base_node = base.node
    if dtype(out) != dtype(xab) and dtype(xab) == torch.float32:   # the fp32 adapter term cast to a 16-bit sum
        upcast_base, sum_dtype = check_narrowed(xab, base_node, mns, out, second.node if second else None), None
    else:
        upcast_base, sum_dtype = check_dtypes(xab, base_node, mns, out, second.node if second else None)
    if second is None and not adapter_reads_base_input(x, base.x, upcast_base, sum_dtype, base.reused):
        raise NoMatch("DoRA: the adapter's input is not provably the base's input")
    if second is not None and not same_rows(second.x, x):
        raise NoMatch("DoRA: the second base product does not read the adapter's input")
    n_arg = n_arg_of(x, n)
    if n_arg is None:
        raise NoMatch("DoRA: the token count N could not be read from the graph's views")
    out_shape_args = None
    if len(shape(out)) != 2:   # the view of (X·Aᵀ)·Bᵀ to the output's shape spells its sizes (SymInt nodes and all)
        view = forward_user(xab, backward)
        if not (is_call(view, *VIEWS) and same_shape(shape(view), shape(out))):
            raise NoMatch("DoRA: the output's shape could not be read from the graph's views")
        out_shape_args = view.args[1]
    narrowed = dtype(out) != dtype(xab) and sum_dtype is None
    forward = ForwardChain(x=x, a=a, b=b, scale=scale, out=out, base=base_node,
                           base2d=base_node if len(shape(base_node)) == 2 else None, out_shape_args=out_shape_args,
                           n_arg=n_arg, base_product=base, sizes=(n, i, o, r), dtype=dtype(xab),
                           base_dtype=dtype(base_node), nodes=(anchor, xab, out),
                           term_cast=dtype(out) if narrowed else None)
    gradients, grad_m = None, None
    if backward:
        g_of = _scaled_output_gradient(mns, scale, cast_from=sum_dtype)
        gradients = adapter_gradients(anchor, forward, backward, g_of, dy_dtype=sum_dtype)
        if gradients.grad_x_lora is not None:
            gradients = _with_input_grad_sum(gradients, base, second, mns, sum_dtype, upcast_base, o, i, options)
        grad_m = _magnitude_gradient(norm, backward)
        if grad_m is None and _needs_gradient(magnitude):
            raise NoMatch("DoRA: the magnitude's gradient (a division by the norm) was not found")
    dora = DoraChain(magnitude=magnitude, mns=mns, norm=norm, norm_weight=norm_weight,
                     norm_reduce_dtype=norm_reduce_dtype, norm_out_dtype=norm_out_dtype,
                     dropout_product=second.node if second is not None else None, grad_m=grad_m,
                     nodes=tuple(norm_nodes))
    needs_dx = gradients is not None and gradients.grad_x_lora is not None
    facts = SiteFacts(
        plain_linear_base=base.w_io is not None, adapter_dtype=dtype(xab), base_dtype=dtype(base_node),
        weight_dtype=base.weight_dtype(), dropout=second is not None or find_dropout(x, base_node),
        adapter_reads_base_input=second is None, base_used_elsewhere=False, needs_dx=needs_dx,
        dx_sum_found=gradients is not None and gradients.dx_sum is not None, sum_dtype=sum_dtype)
    return Site(anchor=anchor, provenance=provenance_of(anchor), forward=forward, backward=gradients,
                backward_note="", dims=Dims(n, i, o, r, needs_dx=needs_dx), facts=facts, kind=kind, extra=dora)


def _with_input_grad_sum(gradients: Gradients, base, second, mns: Node, sum_dtype, upcast_base: bool, o, i,
                         options) -> Gradients:
    """The gradients with where the adapter's dX_a meets the base's input gradient (mns ⊙ dY)·W — with dropout
    the second product's ((mns − 1) ⊙ dY)·W — when found (DxMode.TOTAL), else as they are (DxMode.LORA), or
    NoMatch where the base's part cannot be left as the model computes it.

    With the base in a narrower dtype than the adapter, autograd sums its (mns ⊙ dY)·W, in the base's dtype,
    with the adapter's dX_a across a cast: only dX_a is replaced (DxMode.LORA), the base's part stays as it
    is. Under autocast both are 16-bit, the base's gradient 16-bit casts of dY and (mns − 1) ⊙ dY: their sum is
    taken over (DxMode.TOTAL) where found, unless the `dx_through_casts` behaviour is disabled. A base whose
    product is reused (a 4-bit base) keeps its own input gradient where its sum is not found: bitsandbytes
    computes it, reading the new mns."""
    product = second if second is not None else base
    through_casts = sum_dtype is not None
    dx_sum = None
    if not (through_casts and options is not None and not options.enabled("dx_through_casts")):
        scale_of_base = _base_output_gradient(mns, minus_one=second is not None, casts=through_casts)
        dx_sum = product.input_grad_sum(gradients.grad_x_lora, lambda gb: scale_of_base(gb, gradients.dy), o, i)
    if dx_sum is None and not (upcast_base or through_casts or (second is None and base.reused)):
        raise NoMatch("DoRA: the base's input gradient was not found in the same sum as the adapter's")
    return dataclasses.replace(gradients, dx_sum=dx_sum)


# --- the forward sum -------------------------------------------------------------------------------------

def forward_user(node: Node, backward: set[Node]) -> Node | None:
    """The one forward op that reads node (its backward readers, autograd's, are not counted)."""
    users = [u for u in node.users if u not in backward]
    return users[0] if len(users) == 1 else None


def _is_column_vector(node: Any) -> bool:
    """An [o] vector, or a view of one as [1,o] / [1,1,o]: broadcast over the tokens, one value per column."""
    s = shape(node)
    return s is not None and len(s) >= 1 and all(same_size(d, 1) for d in s[:-1]) and len(shape(poly.atom(node))) == 1


def _dora_sum(xab: Node, backward: set[Node], i: Any, o: Any):
    """(out, (mns, s, the base product, its second product X̃·Wᵀ under dropout or None)): the first node above
    xab whose value is DoRA's sum, or NoMatch with the reason found where the sum came closest to it."""
    node, why = xab, Unread(0, "the adapter output does not reach a DoRA sum")
    for _ in range(SUM_SEARCH_DEPTH):
        node = forward_user(node, backward)
        if node is None:
            break
        # Under autocast the 16-bit products are summed in fp32, and PEFT subtracts the fp32 bias from a
        # product that added its bf16 copy: read that sum with casts looked through (the dtypes are
        # checked after, `match_dora_dtypes.check_dtypes`: only such a widened sum is read this way).
        widened = dtype(xab) in HALF and dtype(node) == torch.float32
        # PEFT's bitsandbytes layer casts an fp32 DoRA term to the 16-bit base's dtype before its sum
        # (fp32 adapters on a 16-bit compute dtype, the QLoRA recipe): read through casts as well, where the
        # base reads such a sum (`BaseProduct.unsupported_sum`), the dtypes checked after (`check_narrowed`).
        narrowed = dtype(xab) == torch.float32 and dtype(node) in HALF
        expanded = poly.expand(node, casts=widened or narrowed)
        if expanded is None:
            break
        terms = _read_sum(expanded, xab, i, o, widened, narrowed)
        if isinstance(terms, Unread):
            why = max(why, terms, key=lambda unread: unread.stage)
            continue
        return node, terms
    raise NoMatch(f"DoRA: {why.reason}")


@dataclass(frozen=True)
class Unread:
    """Why a node is not DoRA's sum, and how far reading it got (the furthest reason is the one reported)."""

    stage: int
    reason: str


def _read_sum(p: poly.Poly, xab: Node, i: Any, o: Any, widened: bool, narrowed: bool):
    """The sum's parts, or (how far it read, why `p` is not DoRA's sum); `widened` or `narrowed`: p's atoms
    were taken through casts (an autocast sum of 16-bit products; an fp32 adapter term cast to a 16-bit sum)."""
    casts = widened or narrowed
    lora_terms = [(m, c) for m, c in p.items() if xab in m]
    if len(lora_terms) != 1:
        return Unread(0, "the adapter output is not one term of the sum")
    mono, coefficient = lora_terms[0]
    others = [f for f in mono if f is not xab]
    vectors = [f for f in others if isinstance(f, Node) and is_call(f, aten.div.Tensor) and _is_column_vector(f)]
    if len(vectors) != 1:
        return Unread(1, "the adapter output is not scaled by m / ‖W′‖")
    mns = vectors[0]
    rest = [f for f in others if f is not mns]
    if rest == [] and coefficient != 0:
        scale: Any = coefficient
    elif len(rest) == 1 and coefficient == 1.0 and isinstance(rest[0], Node) and shape(rest[0]) == ():
        scale = rest[0]   # a tensor scale (PEFT's hot-swap preparation)
    else:
        return Unread(2, "the adapter term's scale is not a number or a 0-d tensor")
    scaled = {m: c for m, c in p.items() if mns in m and m != mono}
    plain = {m: c for m, c in p.items() if mns not in m}
    found = _base_without_dropout(scaled, plain, mns, casts, i, o) or _base_with_dropout(scaled, plain, casts,
                                                                                          mns, i, o)
    if isinstance(found, str):
        return Unread(3, found)
    if found is None:
        return Unread(3, ("the magnitude does not scale the base product (less its bias) once, nor with lora_dropout a "
                   "second product of the base's weight subtracted once"))
    base, second = found
    unsupported = base.unsupported_sum(widened, narrowed)
    if unsupported is not None:
        raise NoMatch(f"DoRA: {unsupported}")
    return mns, scale, base, second


def _atoms(p: poly.Poly) -> list:
    seen = []
    for mono in p:
        seen += [f for f in mono if f not in seen]
    return seen


def _base_without_dropout(scaled: poly.Poly, plain: poly.Poly, mns: Node, casts: bool, i, o):
    """(the base, None) where the sum is mns·(X·Wᵀ) + b: the magnitude scales the base product less its bias,
    the bias enters once, unscaled; None otherwise."""
    for atom in _atoms(scaled):
        base = base_of_atom(atom, i, o) if atom is not mns else None
        terms = base.sum_terms(atom, casts) if base is not None else None
        if terms is None:
            continue
        unbiased, bias = terms
        if poly.same_poly(scaled, {poly.monomial(mns, *m): c for m, c in unbiased.items()}) and \
                poly.same_poly(plain, bias):
            return base, None
    return None


def _base_with_dropout(scaled: poly.Poly, plain: poly.Poly, casts: bool, mns: Node, i, o):
    """(the base, its second product) where the sum is X·Wᵀ + b + mns·(X̃·Wᵀ) − X̃·Wᵀ (PEFT under lora_dropout:
    a second product of the base's weight on the adapter's input); None otherwise, or why."""
    if len(scaled) != 1:
        return None
    ((mono, c),) = scaled.items()
    products = [f for f in mono if f is not mns]
    if c != 1.0 or len(mono) != 2 or len(products) != 1:
        return None
    (product,) = products
    for atom in _atoms(plain):
        base = base_of_atom(atom, i, o) if atom is not product else None
        terms = base.sum_terms(atom, casts) if base is not None else None
        if terms is None:
            continue
        expected = poly.add(poly.add(terms[0], terms[1]), {poly.monomial(product): 1.0}, -1.0)
        if poly.same_poly(plain, expected):
            second = base.second_product(product)
            return (base, second) if second is not None else "the second product does not read the base's weight"
    return None


# --- the backward ----------------------------------------------------------------------------------------

def _scaled_output_gradient(mns: Node, scale: Any,
                            cast_from: torch.dtype | None = None) -> Callable[[Node], Node | None]:
    """g ↦ dY where g = s·mns ⊙ dY (the gradient reaching the adapter's B), else None. The factors s and
    mns are peeled off the top of g's products — autograd multiplies them last — and what remains is dY,
    whatever product it is itself (a SiLU's backward, say). `cast_from`: under torch.autocast g is that
    product, in the sum's dtype, cast down to the adapter's."""
    def dy_of(g: Node) -> Node | None:
        if cast_from is not None:
            g = poly.atom(g)
            if not (is_call(g, *CASTS) and dtype(g.args[0]) == cast_from):
                return None
            g = g.args[0]
        node, found_mns, factor = g, False, 1.0
        found_tensor_scale = isinstance(scale, (int, float))
        for _ in range(8):
            if found_mns and found_tensor_scale and abs(factor - _number_part(scale)) <= 1e-12 * abs(factor):
                return _without_unit_factors(node) if isinstance(node, Node) else None
            node = poly.atom(node)
            if not (is_call(node, MUL) and len(node.args) == 2 and not node.kwargs):
                return None
            left, right = node.args
            for peeled, rest in ((right, left), (left, right)):
                if not found_mns and isinstance(peeled, Node) and poly.atom(peeled) is mns:
                    found_mns = True
                elif isinstance(peeled, (int, float)) and not isinstance(peeled, bool):
                    factor *= float(peeled)
                elif not found_tensor_scale and isinstance(peeled, Node) and same_value(peeled, scale):
                    found_tensor_scale = True
                else:
                    continue
                node = rest
                break
            else:
                return None
        return None

    return dy_of


def _without_unit_factors(node: Node) -> Node:
    """node through its multiplications by 1: with s = 1 (lora_alpha = r) autograd still multiplies by
    1.0, and the factors found match before that product is peeled — the dY the base's gradient reads is
    the one beneath it (the same values, bit for bit)."""
    while is_call(node, MUL) and len(node.args) == 2 and not node.kwargs:
        left, right = node.args
        if is_number(right) and float(right) == 1.0 and isinstance(left, Node):
            node = left
        elif is_number(left) and float(left) == 1.0 and isinstance(right, Node):
            node = right
        else:
            break
    return node


def _number_part(scale: Any) -> float:
    return float(scale) if isinstance(scale, (int, float)) else 1.0


def _base_output_gradient(mns: Node, minus_one: bool, casts: bool = False) -> Callable[[Node, Node], bool]:
    """(gb, dY) ↦ is gb = mns ⊙ dY (the base result's gradient), or (mns − 1) ⊙ dY with dropout; `casts`:
    up to dtype casts (torch.autocast sums 16-bit casts of dY and (mns − 1) ⊙ dY)."""
    def check(gb: Node, dy: Node) -> bool:
        target = poly.atom(dy, casts)
        p = poly.expand(gb, is_leaf=lambda n: n is target or n.op == "placeholder", casts=casts)
        expected = {poly.monomial(mns, target): 1.0}
        if minus_one:
            expected[(target,)] = -1.0
        return poly.same_poly(p, expected)

    return check


def _magnitude_gradient(norm: Node, backward: set[Node]) -> Node | None:
    """dm: the backward's one division by the norm (autograd's d(m / norm)/dm), or None."""
    found = [u for u in norm.users if u in backward and is_call(u, aten.div.Tensor) and u.args[1] is norm]
    return found[0] if len(found) == 1 else None


def _needs_gradient(magnitude: Node) -> bool:
    source = strip_casts(strip_layout(magnitude))
    value = source.meta.get("val") if isinstance(source, Node) else None
    return bool(getattr(value, "requires_grad", True))
