"""Plain LoRA: `Y = base + s·(X·Aᵀ)·Bᵀ` on any base product, with its backward — the kind every other
kind of site refines, and the one tried last (`passes/kinds.py`).

    forward                                   backward (dY: gradient of Y)
    xa   = mm(X, Aᵀ)            [N,r]         g    = s·dY                 [N,o]
    xab  = mm(xa, Bᵀ)           [N,o]         dB   = mm(gᵀ, xa)           [o,r]
    term = s·view(xab)                        z1   = mm(g, B)             [N,r]
    out  = base + term                        dA   = mm(z1ᵀ, X)           [r,i]
                                              dX_a = mm(z1, A)            [N,i]   (if X needs a gradient)
                                              dX   = … + view(dX_a) + view(G·W) + …

Matching is on graph structure and shapes, never on names; what the base is, is the base's to say
(passes/bases.py). A forward chain the matcher cannot establish raises `NoMatch(reason)` (the site is left
untouched); a backward it cannot establish leaves `site.backward = None` and the reason in
`site.backward_note` (only the forward is rewritten). The facts it records (`SiteFacts`) decide nothing:
each variant's guard in lora_rewrite/variants.py does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.fx import Node

from lora_rewrite.variants import (BACKWARDS, FORWARD1, FORWARDS, BackwardOperands, Dims, DxMode, ForwardOperands,
                                   SiteFacts, autograd_backward_gemms)
from lora_rewrite.passes.bases import UNKNOWN_BASE, find_base
from lora_rewrite.passes.fx import (ADD, MUL, VIEWS, dtype, is_call, prims, same_rows, same_scale, same_shape,
                                    same_size, same_value, shape, single_user, split_scale, strip_layout)
from lora_rewrite.passes.kind import SiteKind
from lora_rewrite.passes.match_adapter import adapter_gradients, find_dropout, match_adapter_product, read_anchor
from lora_rewrite.passes.provenance import provenance_of
from lora_rewrite.passes.rewrite import base_weight_io, dx_in_rows, matrix_2d, output_gradient_2d
from lora_rewrite.passes.site import ForwardChain, Gradients, NoMatch, Site


def match_lora(anchor: Node, backward: set[Node], options: Any = None) -> Site:
    """The complete LoRA site that starts at `anchor` (X·Aᵀ), or NoMatch with the reason it is left untouched.

    Returns the site, with its backward when the graph has it in the expected form (otherwise
    `site.backward` is None and `site.backward_note` says why), its dims and its facts."""
    forward = match_forward(anchor, backward)
    gradients, backward_note = None, ""
    if backward:  # an inference graph has no backward to match
        try:
            gradients = match_lora_backward(anchor, forward, backward)
        except NoMatch as e:
            backward_note = str(e)
    needs_dx = gradients is not None and gradients.grad_x_lora is not None
    return Site(anchor=anchor, provenance=provenance_of(anchor), forward=forward, backward=gradients,
                backward_note=backward_note, dims=Dims(*forward.sizes, needs_dx=needs_dx),
                facts=lora_facts(forward, gradients, needs_dx), kind=LORA)


def match_forward(anchor: Node, backward: set[Node]) -> ForwardChain:
    """out = base + s·(X·Aᵀ)·Bᵀ from the anchor, node by node, or NoMatch."""
    x, a, (n, i, r) = read_anchor(anchor)
    xab, b, o = match_adapter_product(anchor, backward, r)
    out, term, scale, out_shape_args, chain, term_cast = _scaled_sum(xab)
    base = out.args[1] if out.args[0] is term else out.args[0]
    if base is term or not isinstance(base, Node):
        raise NoMatch("the adapter output is added to itself or to a constant")

    out_shape, base_shape = shape(out), shape(base)
    if not same_shape(out_shape, base_shape) or not same_size(out_shape[-1], o):
        raise NoMatch("the base result and the adapter output have different shapes (broadcasting)")
    lora_dtype = dtype(anchor)
    summed = term.args[0] if term_cast is not None else term   # the adapter's term before PEFT's cast
    if dtype(xab) != lora_dtype or dtype(summed) != lora_dtype or dtype(term) != dtype(out) or \
            (term_cast is None and lora_dtype != dtype(out)):
        raise NoMatch(f"the adapter computes in {lora_dtype} but the sum is {dtype(out)}")
    if len(out_shape) != 2 and out_shape_args is None:
        raise NoMatch("the adapter output reaches the sum without a view")

    base_product = find_base(base, i, o)
    if base_product is None:
        raise NoMatch(UNKNOWN_BASE)
    base = base_product.sum_term(base)
    base2d = base if len(shape(base)) == 2 else None
    if base2d is None and is_call(base, *VIEWS) and len(shape(base.args[0]) or ()) == 2:
        base2d = base.args[0]
    n_arg = None
    if is_call(x, *VIEWS):
        n_arg = x.args[1][0]
    elif len(out_shape) == 2:
        n_arg = n
    if n_arg is None:
        raise NoMatch("the token count N could not be read from the graph's views")
    return ForwardChain(x=x, a=a, b=b, scale=scale, out=out, base=base, base2d=base2d, base_product=base_product,
                        term_cast=term_cast, out_shape_args=out_shape_args, n_arg=n_arg, sizes=(n, i, o, r),
                        dtype=lora_dtype, base_dtype=dtype(base), nodes=(anchor, *chain, out))


def _scaled_sum(xab: Node) -> tuple[Node, Node, Any, Any, list[Node], Any]:
    """From xab through an optional view, an optional scaling and an optional cast (PEFT's bnb layers cast
    the adapter's term to the base's dtype) to the add with the base result: (out, the summand that
    reaches it, s, the view's args, xab and the nodes up to that summand, the cast's dtype or None)."""
    chain = [xab]
    term = xab
    out_shape_args = None
    nxt = single_user(term)
    if nxt is None:
        raise NoMatch("(X·Aᵀ)·Bᵀ is used by more than one op")
    if is_call(nxt, *VIEWS):
        out_shape_args = nxt.args[1]
        term = nxt
        chain.append(term)
        nxt = single_user(term)
        if nxt is None:
            raise NoMatch("the adapter output is used by more than one op")
    scale: Any = 1.0
    if is_call(nxt, MUL):
        split = split_scale(nxt)
        if split is None or split[0] is not term:
            raise NoMatch("the adapter output is multiplied by a tensor that is not a scalar before its sum "
                          "(and it is not DoRA's magnitude m / ‖W + s·B·A‖)")
        scale = split[1]
        term = nxt
        chain.append(term)
        nxt = single_user(term)
        if nxt is None:
            raise NoMatch("the scaled adapter output is used by more than one op")
    term_cast = None
    if is_call(nxt, prims.convert_element_type.default):
        term_cast, term = nxt.args[1], nxt
        chain.append(term)
        nxt = single_user(term)
        if nxt is None:
            raise NoMatch("the cast adapter output is used by more than one op")
    if not is_call(nxt, ADD) or nxt.kwargs.get("alpha", 1) != 1 or len(nxt.args) != 2:
        raise NoMatch(f"the adapter output is not added to a base result (it goes to {getattr(nxt, 'target', nxt)})")
    return nxt, term, scale, out_shape_args, chain, term_cast


def match_lora_backward(anchor: Node, forward: ForwardChain, backward: set[Node], frozen_a: bool = False) -> Gradients:
    """dB, Z1, dA (none where A is frozen: `frozen_a`) and dX_a from g = s·dY, and where dX_a meets the
    base's input gradient; NoMatch where they are not in that form."""
    gradients = adapter_gradients(anchor, forward, backward, lambda g_source: _unscaled(g_source, forward),
                                  frozen_a=frozen_a)
    if gradients.grad_x_lora is None:
        return gradients
    dy = gradients.dy
    is_dy = lambda gb: same_value(strip_layout(gb), strip_layout(dy))  # noqa: E731
    n, i, o, r = forward.sizes
    dx_sum = forward.base_product.input_grad_sum(gradients.grad_x_lora, is_dy, o, i)
    return dataclasses.replace(gradients, dx_sum=dx_sum)


def _unscaled(g_source: Node, forward: ForwardChain) -> Node | None:
    """dY where the gradient reaching B is g = s·dY (LoRA), else None."""
    split = split_scale(g_source)
    if split is not None and same_scale(split[1], forward.scale):
        return split[0]
    if isinstance(forward.scale, (int, float)) and forward.scale == 1:
        return g_source
    return None


def lora_facts(forward: ForwardChain, gradients: Gradients | None, needs_dx: bool) -> SiteFacts:
    """What the variants' guards read about a site on this forward chain and these gradients."""
    base = forward.base_product
    merges = base.w_io is not None
    return SiteFacts(
        plain_linear_base=merges,
        adapter_dtype=forward.dtype,
        base_dtype=forward.base_dtype,
        weight_dtype=base.weight_dtype(),
        dropout=find_dropout(forward.x, forward.base),
        adapter_reads_base_input=merges and same_rows(base.x, forward.x),
        base_used_elsewhere=merges and _base_used_elsewhere(base.node, forward),
        needs_dx=needs_dx,
        dx_sum_found=gradients is not None and gradients.dx_sum is not None,
    )


# Ops between the base product and the base term of the sum: a view, the bias add of a batched base.
BASE_PATH_LENGTH = 3


def _base_used_elsewhere(product: Node, forward: ForwardChain) -> bool:
    """Does anything but the sum read the base product or a node on its way to the base term?"""
    node = product
    for _ in range(BASE_PATH_LENGTH):
        if node is forward.base:
            return set(node.users) != {forward.out}
        node = single_user(node)
        if node is None:
            return True
    return True


# --- the rewrite's operands -------------------------------------------------------------------------------

def lora_forward_operands(ops, site: Site, variant, options) -> ForwardOperands:
    """forward1 adds onto the model's base result; the merged forward2 reads the base's weight and bias."""
    chain = site.forward
    if variant.merges_weight:
        base = chain.base_product
        return ForwardOperands(x=chain.x, a=chain.a, b=chain.b, s=chain.scale, w_io=base.w_io, bias=base.bias)
    base = chain.base2d if chain.base2d is not None else matrix_2d(ops, chain.base, chain.n_arg, site.dims.o)
    return ForwardOperands(x=chain.x, a=chain.a, b=chain.b, s=chain.scale, base=base,
                           widen_base=not options.enabled("add_narrow_base"))


def lora_backward_operands(ops, site: Site, variant, forward_result) -> BackwardOperands:
    """dY as [N,o], X, A, B, s, and Wᵀ where the variant takes over the whole input gradient."""
    chain, grads = site.forward, site.backward
    mode = grads.dx_mode
    return BackwardOperands(dy=output_gradient_2d(ops, site), x=chain.x, a=chain.a, b=chain.b, s=chain.scale,
                            w_io=base_weight_io(ops, site) if mode is DxMode.TOTAL else None, dx=mode,
                            dx_in_rows=dx_in_rows(site))


def peft_lora_gemms(dims: Dims, facts: SiteFacts, trains: bool) -> list:
    """PEFT's forward (forward1's products) and, in training, autograd's backward: what stock Inductor runs."""
    return FORWARD1.gemms(dims) + (autograd_backward_gemms(dims) if trains else [])


def lora_labels(site: Site) -> dict:
    """The matched nodes, each as the equations at the top of this module name it (the site picture)."""
    forward, grads = site.forward, site.backward
    x = "drop(X)" if site.facts.dropout else "X"   # the adapter's input under PEFT's lora_dropout
    labels = {forward.nodes[0]: f"{x}·Aᵀ", forward.nodes[1]: f"({x}·Aᵀ)·Bᵀ", forward.out: f"Y = base + s·({x}·Aᵀ)·Bᵀ"}
    labels.update({n: f"s·({x}·Aᵀ)·Bᵀ" for n in forward.nodes[2:-1] if is_call(n, MUL)})
    if grads is None:
        return labels
    labels.update({grads.g: "s·dY", grads.grad_b: f"dB = (s·dY)ᵀ·({x}·Aᵀ)", grads.z1: "Z1 = (s·dY)·B"})
    if grads.grad_a is not None:
        labels[grads.grad_a] = f"dA = Z1ᵀ·{x}"
    if grads.grad_x_lora is not None:
        labels[grads.grad_x_lora] = "Z1·A" if grads.dx_sum is not None else "dX = Z1·A"
    if grads.dx_sum is not None:
        labels[grads.dx_sum.base_mm] = "dY·W"
        labels[grads.dx_sum.lora_add] = "dX = dY·W + Z1·A"
    return labels


def always(anchor: Node, backward: set[Node]) -> bool:
    return True


LORA = SiteKind(
    name="lora",
    proves=always,
    match=match_lora,
    forwards=FORWARDS,
    backwards=BACKWARDS,
    forward_operands=lora_forward_operands,
    backward_operands=lora_backward_operands,
    before_gemms=peft_lora_gemms,
    labels=lora_labels,
)
