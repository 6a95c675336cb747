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
The norm is read in passes/match_dora_norm.py; the sum's dtypes in passes/match_dora_dtypes.py; the sum on
a bitsandbytes 4-bit base (QDoRA) in passes/match_dora_4bit.py.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.forms import is_number
from lora_rewrite.variants import Dims, SiteFacts
from lora_rewrite.passes import poly
from lora_rewrite.passes.fx import (ADDMM, CASTS, MM, MUL, VIEWS, WEIGHT_OPS, dtype, is_call, is_weight, same_rows,
                                    same_shape, same_size, same_value, shape, strip_layout, transpose_source)
from lora_rewrite.passes.match_dora_4bit import (ON_A_4BIT_BASE, ON_A_4BIT_BASE_MIXED, check_narrowed, has_4bit_term,
                                                 read_4bit_terms)
from lora_rewrite.passes.match_dora_dtypes import adapter_reads_base_input, check_dtypes
from lora_rewrite.passes.match_dora_norm import is_identity, is_linear_weight, match_norm, strip_casts
from lora_rewrite.passes.match_quantized import dequantized_weight, is_dequantized_weight_of
from lora_rewrite.passes.provenance import provenance_of
from lora_rewrite.passes.site import DoraChain, ForwardChain, Gradients, LinearBase, NoMatch, Site

aten = torch.ops.aten

# How many single-user ops above (X·Aᵀ)·Bᵀ the DoRA sum may end: a view, mns·, ·s, the two adds, casts.
SUM_SEARCH_DEPTH = 8


def is_dora_norm_product(anchor: Node) -> bool:
    """Is this X·Aᵀ PEFT's eye(i)·Aᵀ, the first half of DoRA's B·A for the norm (not a site of its own)?"""
    return is_identity(strip_casts(anchor.args[0]))


def looks_like_dora(anchor: Node, backward: set[Node]) -> bool:
    """Does (X·Aᵀ)·Bᵀ reach its sum through a product with a [o]-vector (DoRA's magnitude scale)?"""
    xab = next((u for u in anchor.users if u not in backward and is_call(u, MM)), None)
    node = xab
    for _ in range(SUM_SEARCH_DEPTH):
        node = forward_user(node, backward) if node is not None else None
        if node is None:
            return False
        if is_call(node, MUL) and any(_is_column_vector(a) for a in node.args):
            return True
    return False


def match_dora_site(anchor: Node, backward: set[Node]) -> Site:
    """The complete DoRA site that starts at `anchor` (X·Aᵀ), or NoMatch with the reason."""
    from lora_rewrite.passes.match import adapter_gradients, find_dropout, input_grad_sum, match_adapter_product

    x, at = anchor.args
    a = transpose_source(at)
    n, i = shape(x)
    r, i_a = shape(a)
    if not same_size(i, i_a) or isinstance(r, torch.SymInt) or isinstance(i, torch.SymInt):
        raise NoMatch("DoRA: A's shape does not match X's features statically")
    xab, b, o = match_adapter_product(anchor, backward, r)
    out, terms = _dora_sum(xab, backward)
    mns, scale, linear, bias, dropout_product, quantized = terms
    magnitude, norm = mns.args
    if quantized is None:
        base, base_x = linear.node, linear.x
        is_base_weight = lambda node: is_linear_weight(node, linear)  # noqa: E731
    else:
        base, base_x = quantized.product, quantized.x
        is_base_weight = lambda node: is_dequantized_weight_of(node, quantized)  # noqa: E731
    norm_weight, (norm_reduce_dtype, norm_out_dtype), norm_nodes = match_norm(norm, is_base_weight, a, b, scale,
                                                                               o, i)
    narrowed = quantized is not None and dtype(out) != dtype(xab)
    if narrowed:
        upcast_base, sum_dtype = check_narrowed(xab, base, mns, out, dropout_product), None
    else:
        upcast_base, sum_dtype = check_dtypes(xab, base, mns, out, dropout_product)
    if quantized is not None and sum_dtype is not None:
        raise NoMatch(f"DoRA: {ON_A_4BIT_BASE_MIXED}")
    if dropout_product is None and not adapter_reads_base_input(x, base_x, upcast_base, sum_dtype,
                                                                quantized is not None):
        raise NoMatch("DoRA: the adapter's input is not provably the base's input")
    if dropout_product is not None and not same_rows(dropout_product.args[0], x):
        raise NoMatch("DoRA: the second base product does not read the adapter's input")
    n_arg = x.args[1][0] if is_call(x, *VIEWS) else n if isinstance(n, int) else None
    if n_arg is None:
        raise NoMatch("DoRA: the token count N could not be read from the graph's views")
    out_shape_args = None
    if len(shape(out)) != 2:   # the view of (X·Aᵀ)·Bᵀ to the output's shape spells its sizes (SymInt nodes and all)
        view = forward_user(xab, backward)
        if not (is_call(view, *VIEWS) and same_shape(shape(view), shape(out))):
            raise NoMatch("DoRA: the output's shape could not be read from the graph's views")
        out_shape_args = view.args[1]
    base2d = base if len(shape(base)) == 2 else None
    forward = ForwardChain(x=x, a=a, b=b, scale=scale, out=out, base=base, base2d=base2d,
                           out_shape_args=out_shape_args, n_arg=n_arg, linear=linear, sizes=(n, i, o, r),
                           dtype=dtype(xab), base_dtype=dtype(base), nodes=(anchor, xab, out), quantized=quantized,
                           term_cast=dtype(out) if narrowed else None)
    gradients, grad_m = None, None
    if backward:
        g_of = _scaled_output_gradient(mns, scale, cast_from=sum_dtype)
        gradients = adapter_gradients(anchor, forward, backward, g_of, dy_dtype=sum_dtype)
        if gradients.grad_x_lora is not None and quantized is not None and dropout_product is None:
            # the 4-bit base's dX product, (mns ⊙ dY)·dequantize_4bit(W), read as QLoRA's (DxMode.TOTAL); where
            # it is not found, it stays as bitsandbytes computes it (reading the new mns) and only the
            # adapter's dX_a is replaced (DxMode.LORA)
            weight = dequantized_weight(quantized, o, i)
            scale_of_base = _base_output_gradient(mns, minus_one=False)
            dx_sum = None if weight is None else input_grad_sum(
                gradients.grad_x_lora, None, lambda gb: scale_of_base(gb, gradients.dy), o, weight=weight)
            gradients = _with_dx_sum(gradients, dx_sum)
        elif gradients.grad_x_lora is not None:
            gradient_product = dropout_product if dropout_product is not None else linear.node
            scale_of_base = _base_output_gradient(mns, minus_one=dropout_product is not None,
                                                  casts=sum_dtype is not None)
            dx_sum = input_grad_sum(gradients.grad_x_lora, _as_linear(gradient_product, linear, quantized),
                                    lambda gb: scale_of_base(gb, gradients.dy), o)
            if dx_sum is None and not (upcast_base or sum_dtype is not None):
                raise NoMatch("DoRA: the base's input gradient was not found in the same sum as the adapter's")
            # With the base in a narrower dtype than the adapter, autograd sums its (mns ⊙ dY)·W, in the
            # base's dtype, with the adapter's dX_a across a cast: only dX_a is replaced (DxMode.LORA), the
            # base's part stays as it is. Under autocast both are 16-bit, the base's gradient 16-bit casts of
            # dY and (mns − 1) ⊙ dY: their sum is taken over (DxMode.TOTAL) where found.
            gradients = _with_dx_sum(gradients, dx_sum)
        grad_m = _magnitude_gradient(norm, backward)
        if grad_m is None and _needs_gradient(magnitude):
            raise NoMatch("DoRA: the magnitude's gradient (a division by the norm) was not found")
    dora = DoraChain(magnitude=magnitude, mns=mns, norm=norm, norm_weight=norm_weight,
                     norm_reduce_dtype=norm_reduce_dtype, norm_out_dtype=norm_out_dtype,
                     dropout_product=dropout_product,
                     dropout_weight_io=_as_linear(dropout_product, linear, quantized).w_io
                     if dropout_product is not None else None,
                     grad_m=grad_m, nodes=tuple(norm_nodes), base_bias=bias if quantized is not None else None)
    needs_dx = gradients is not None and gradients.grad_x_lora is not None
    facts = SiteFacts(
        plain_linear_base=quantized is None, adapter_dtype=dtype(xab), base_dtype=dtype(base),
        weight_dtype=dtype(linear.w_io) if linear is not None else None,
        dropout=dropout_product is not None or find_dropout(x, base),
        adapter_reads_base_input=dropout_product is None, base_used_elsewhere=False, needs_dx=needs_dx,
        dx_sum_found=gradients is not None and gradients.dx_sum is not None, dora=True, trains=bool(backward),
        sum_dtype=sum_dtype)
    return Site(anchor=anchor, provenance=provenance_of(anchor), forward=forward, backward=gradients,
                backward_note="", dims=Dims(n, i, o, r, needs_dx=needs_dx), facts=facts, dora=dora)


# --- the forward sum -------------------------------------------------------------------------------------

def forward_user(node: Node, backward: set[Node]) -> Node | None:
    """The one forward op that reads node (its backward readers, autograd's, are not counted)."""
    users = [u for u in node.users if u not in backward]
    return users[0] if len(users) == 1 else None


def _is_column_vector(node: Any) -> bool:
    """An [o] vector, or a view of one as [1,o] / [1,1,o]: broadcast over the tokens, one value per column."""
    s = shape(node)
    return s is not None and len(s) >= 1 and all(same_size(d, 1) for d in s[:-1]) and len(shape(poly.atom(node))) == 1


def _dora_sum(xab: Node, backward: set[Node]):
    """(out, (mns, s, the base LinearBase or None, its bias, the second base product or None, the
    QuantizedBase or None)): the first node above xab whose value is DoRA's sum."""
    node, why = xab, "the adapter output does not reach a DoRA sum"
    for _ in range(SUM_SEARCH_DEPTH):
        node = forward_user(node, backward)
        if node is None:
            break
        # Under autocast the 16-bit products are summed in fp32, and PEFT subtracts the fp32 bias from a
        # product that added its bf16 copy: read that sum with casts looked through (the dtypes are
        # checked after, `match_dora_dtypes.check_dtypes`: only such a widened sum is read this way).
        widened = dtype(xab) in (torch.float16, torch.bfloat16) and dtype(node) == torch.float32
        # PEFT's bitsandbytes layer casts an fp32 DoRA term to the 16-bit base's dtype before its sum
        # (fp32 adapters on a 16-bit compute dtype, the QLoRA recipe): read through casts as well, on a
        # 4-bit base only (`_read_sum`), the dtypes checked after (`check_narrowed`).
        narrowed = dtype(xab) == torch.float32 and dtype(node) in (torch.float16, torch.bfloat16)
        expanded = poly.expand(node, casts=widened or narrowed)
        if expanded is None:
            break
        terms = _read_sum(expanded, xab, widened or narrowed, narrowed)
        if isinstance(terms, str):
            why = ON_A_4BIT_BASE if why == ON_A_4BIT_BASE or has_4bit_term(expanded) else terms
            continue
        return node, terms
    raise NoMatch(f"DoRA: {why}")


def _read_sum(p: poly.Poly, xab: Node, casts: bool = False, narrowed: bool = False):
    """The sum's parts, or why `p` is not DoRA's sum (a str); `casts`: p's atoms were taken through casts;
    `narrowed`: an fp32 adapter term reaches a 16-bit sum, read only as PEFT's sum on a 4-bit base."""
    lora_terms = [(m, c) for m, c in p.items() if xab in m]
    if len(lora_terms) != 1:
        return "the adapter output is not one term of the sum"
    mono, coefficient = lora_terms[0]
    others = [f for f in mono if f is not xab]
    vectors = [f for f in others if isinstance(f, Node) and is_call(f, aten.div.Tensor) and _is_column_vector(f)]
    if len(vectors) != 1:
        return "the adapter output is not scaled by m / ‖W′‖"
    mns = vectors[0]
    rest = [f for f in others if f is not mns]
    if rest == [] and coefficient != 0:
        scale: Any = coefficient
    elif len(rest) == 1 and coefficient == 1.0 and isinstance(rest[0], Node) and shape(rest[0]) == ():
        scale = rest[0]   # a tensor scale (PEFT's hot-swap preparation)
    else:
        return "the adapter term's scale is not a number or a 0-d tensor"
    scaled = {m: c for m, c in p.items() if mns in m and m != mono}
    plain = {m: c for m, c in p.items() if mns not in m}
    four_bit = read_4bit_terms(scaled, plain, mns, casts)
    if four_bit is not None:
        quantized, bias, second = four_bit
        return mns, scale, None, bias, second, quantized
    if narrowed:
        return "the fp32 DoRA term is cast to a 16-bit sum that is not PEFT's on a 4-bit base"
    if len(scaled) != 1:
        return "the magnitude scales more than the adapter and one base product"
    (scaled_mono, c1), = scaled.items()
    (product,) = [f for f in scaled_mono if f is not mns] or [None]
    if c1 != 1.0 or product is None or len(scaled_mono) != 2:
        return "the magnitude does not scale the base product once"
    product_node, product_bias = _product_parts(product)
    if product_node is None:
        return "the magnitude scales something that is not a linear product of a weight"
    if not plain or set(plain.values()) == {1.0} and len(plain) == 1:
        # no dropout: mns·(X·Wᵀ) [+ b]; the bias is the base addmm's own (it enters once, unscaled)
        if plain:
            ((b_mono, _),) = plain.items()
            if product_bias is None or b_mono != (poly.atom(product_bias, casts),):
                return "the term outside the magnitude is not the base's bias"
        elif product_bias is not None:
            return "the base's bias is scaled by the magnitude"
        return mns, scale, _linear_of(product_node, product_bias), product_bias, None, None
    # with dropout: X·Wᵀ + b + mns·(X̃·Wᵀ) − X̃·Wᵀ
    if product_bias is not None or plain.get((product,)) != -1.0:
        return "the second base product is not subtracted once"
    base_terms = {m: c for m, c in plain.items() if m != (product,)}
    base_parts = [(m, c) for m, c in base_terms.items() if c == 1.0 and len(m) == 1]
    if len(base_parts) != len(base_terms):
        return "the base result is not added once"
    base_product = [m[0] for m, _ in base_parts if _product_parts(m[0])[0] is not None]
    if len(base_product) != 1:
        return "the base product was not found"
    base_node, base_bias = _product_parts(base_product[0])
    expected_terms = 1 + (base_bias is not None)
    if len(base_parts) != expected_terms or \
            (base_bias is not None and (poly.atom(base_bias, casts),) not in base_terms):
        return "the base result is not the base product plus its bias"
    linear = _linear_of(base_node, base_bias)
    second = _linear_of(product_node, None)
    if linear is None or second is None or _weight_read(second.w_io) != _weight_read(linear.w_io):
        return "the second product does not read the base's weight"
    return mns, scale, linear, base_bias, product_node, None


def _weight_read(w_io: Any) -> tuple:
    """How a product reads its weight, casts left out: the ops from the parameter (its node last), so
    that W·, and W cast to fp32 for PEFT's second product under fp32 adapters, read alike."""
    ops = []
    while is_call(w_io, *WEIGHT_OPS):
        if not is_call(w_io, *CASTS):
            ops.append((w_io.target, tuple(a for a in w_io.args[1:] if not isinstance(a, Node))))
        w_io = w_io.args[0]
    return tuple(ops) + (w_io,)


def _product_parts(atom: Any) -> tuple[Node | None, Node | None]:
    """(the mm or addmm, its bias) when the atom is X·Wᵀ of a weight: an mm node or an addmm's product term."""
    if isinstance(atom, tuple) and atom[0] == "mm":
        node = atom[1]
        return (node, node.args[0]) if _linear_of(node, node.args[0]) is not None else (None, None)
    if is_call(atom, MM) and _linear_of(atom, None) is not None:
        return atom, None
    return None, None


def _linear_of(product: Node, bias: Node | None) -> LinearBase | None:
    """The product as LinearBase (X [N,i] · Wᵀ [i,o] of a weight parameter), or None."""
    x, w_io = (product.args[1], product.args[2]) if is_call(product, ADDMM) else product.args
    if not is_weight(w_io) or shape(w_io) is None or len(shape(w_io)) != 2 or len(shape(x) or ()) != 2:
        return None
    if bias is not None and len(shape(bias) or ()) != 1:
        return None
    return LinearBase(product, x, w_io, bias)


def _as_linear(product: Node, linear: LinearBase | None, quantized=None) -> LinearBase:
    """The product as LinearBase: the base's own, or the second base product (with dropout) — on a 4-bit
    base a product of the dequantized weight (established by `match_dora_4bit.read_4bit_terms`)."""
    if linear is not None and product is linear.node:
        return linear
    if quantized is not None:
        return LinearBase(product, product.args[0], product.args[1], None)
    return _linear_of(product, None)


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


def _with_dx_sum(gradients: Gradients, dx_sum) -> Gradients:
    import dataclasses

    return dataclasses.replace(gradients, dx_sum=dx_sum)
