"""Elementwise expressions as polynomials: how a matcher establishes the algebra of a sum it did not write.

PEFT's DoRA output is `base + (mns − 1)·(base − b) + mns·s·lora`, which after Inductor's decompositions
and joint passes is a tree of add, sub and mul nodes in whatever order the source and the passes left
them. Expanding that tree into a sum of monomials over its leaves ("atoms") and comparing it with the
expected one — `mns·(X·Wᵀ) + b + s·mns·lora` — is independent of that order:

    expand(add(view(addmm(b, X, Wᵀ)), add(mul(sub(mns, 1), sub(view(addmm(…)), b)), mul(mul(mns, lora), 2.0))))
        = {(mns, X·Wᵀ): 1, (b,): 1, (mns, lora): 2.0}

A `Poly` maps each monomial — a sorted tuple of atom keys — to its coefficient. An atom is a node that is
not one of the ops expanded here, seen through the views that keep its last dimension (so `mns` as [o]
and as its [1,o] view, or a product as [N,o] and as its [B,T,o] view, are one atom: they broadcast alike
against a [.., o] result). `addmm(c, P, Q)` expands to `c + ("mm", that addmm)`, its product term.
Expansion gives up (None) past MAX_TERMS monomials or MAX_DEPTH ops: a chain that large is not a
LoRA variant's sum.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx import Node

from lora_rewrite.passes.fx import ADD, ADDMM, CASTS, LAYOUT_OPS, MUL, is_call, same_size, shape

aten = torch.ops.aten

SUB = aten.sub.Tensor
DIV = aten.div.Tensor
NEG = aten.neg.default

MAX_TERMS = 16
MAX_DEPTH = 16

Atom = Any                      # a Node, or ("mm", addmm node): the product term of an addmm
Monomial = tuple                # atoms, sorted by `_order`
Poly = dict                     # {Monomial: float}


def atom(node: Any, casts: bool = False) -> Any:
    """The node `node` stands for as a factor: through views (and copies) that keep its last dimension,
    and with `casts` through dtype casts too (a value and its 16-bit copy as one atom: under autocast
    PEFT subtracts the fp32 bias from a product that added its bf16 copy)."""
    ops = LAYOUT_OPS + CASTS if casts else LAYOUT_OPS
    while is_call(node, *ops):
        inner = node.args[0]
        outer_shape, inner_shape = shape(node), shape(inner)
        if not outer_shape or not inner_shape or not same_size(outer_shape[-1], inner_shape[-1]):
            break
        node = inner
    return node


def product_term(addmm: Node) -> tuple:
    """The atom for addmm's P·Q (its accumulator c is a term of its own)."""
    return ("mm", addmm)


def _order(key: Any) -> tuple:
    if isinstance(key, tuple):
        return (1, id(key[1]))
    return (0, id(key))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _add(p: Poly, q: Poly, scale: float = 1.0) -> Poly:
    out = dict(p)
    for mono, c in q.items():
        out[mono] = out.get(mono, 0.0) + scale * c
        if out[mono] == 0.0:
            del out[mono]
    return out


def _mul(p: Poly, q: Poly) -> Poly | None:
    out: Poly = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            mono = tuple(sorted(m1 + m2, key=_order))
            out[mono] = out.get(mono, 0.0) + c1 * c2
            if out[mono] == 0.0:
                del out[mono]
    return out if len(out) <= MAX_TERMS else None


def expand(node: Any, is_leaf: Callable[[Node], bool] = lambda n: False, depth: int = MAX_DEPTH,
           casts: bool = False) -> Poly | None:
    """`node`'s value as a polynomial over its atoms; None when it is too large to be a site's sum.
    `is_leaf(n)` stops the expansion at n (an atom even if it is an add or a mul); `casts`: atoms are
    taken through dtype casts (`atom`), so the polynomial holds up to the casts' rounding."""
    if _number(node):
        return {(): float(node)} if node != 0 else {}
    if not isinstance(node, Node):
        return None
    node = atom(node, casts)
    if depth == 0 or is_leaf(node) or node.op != "call_function":
        return {(node,): 1.0}
    args, kwargs = node.args, node.kwargs
    sub = lambda x: expand(x, is_leaf, depth - 1, casts)  # noqa: E731
    if node.target in (ADD, SUB) and len(args) == 2 and set(kwargs) <= {"alpha"}:
        p, q = sub(args[0]), sub(args[1])
        if p is None or q is None:
            return None
        sign = 1.0 if node.target is ADD else -1.0
        result = _add(p, q, sign * float(kwargs.get("alpha", 1)))
        return result if len(result) <= MAX_TERMS else None
    if node.target is MUL and len(args) == 2 and not kwargs:
        p, q = sub(args[0]), sub(args[1])
        return None if p is None or q is None else _mul(p, q)
    if node.target is DIV and len(args) == 2 and not kwargs and _number(args[1]) and args[1] != 0:
        p = sub(args[0])
        return None if p is None else {m: c / float(args[1]) for m, c in p.items()}
    if node.target is NEG and len(args) == 1:
        p = sub(args[0])
        return None if p is None else {m: -c for m, c in p.items()}
    if node.target is ADDMM and len(args) == 3 and not kwargs:
        p = sub(args[0])
        return None if p is None else _add(p, {(product_term(node),): 1.0})
    return {(node,): 1.0}


def add(p: Poly, q: Poly, scale: float = 1.0) -> Poly:
    """p + scale·q, terms that cancel dropped."""
    return _add(p, q, scale)


def monomial(*atoms: Any) -> Monomial:
    return tuple(sorted(atoms, key=_order))


def same_poly(p: Poly | None, q: Poly, rel: float = 1e-12) -> bool:
    """p == q term by term, coefficients equal up to rounding (a scale split or joined by a pass)."""
    if p is None or set(p) != set(q):
        return False
    return all(abs(p[m] - q[m]) <= rel * max(abs(p[m]), abs(q[m])) for m in q)
