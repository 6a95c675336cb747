"""passes/poly.py: elementwise expressions as polynomials over their atoms, on aten graphs as Inductor's
decompositions leave them."""

import torch

from helpers import joint_graph
from lora_rewrite.passes import poly


def expanded_output(fn, *inputs):
    """fn's (inference) aten graph, its placeholders, and the polynomial of its one output."""
    gm = joint_graph(fn, *inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    (out,) = gm.graph.output_node().args[0]
    return placeholders, poly.expand(out)


def by_input(placeholders, p):
    """A polynomial with each atom named by its input's position: comparable across graphs."""
    index = {n: k for k, n in enumerate(placeholders)}
    return {tuple(sorted(index[f] for f in mono)): c for mono, c in p.items()}


def test_the_order_of_a_sum_does_not_matter():
    t = [torch.randn(3, 4) for _ in range(3)]
    (a, b, c), p = expanded_output(lambda a, b, c: (a - 1) * (b - c) + a * c, *t)
    assert p == {poly.monomial(a, b): 1.0, (b,): -1.0, (c,): 1.0}
    placeholders, q = expanded_output(lambda a, b, c: a * c + (b - c) * (a - 1), *t)
    assert by_input(placeholders, q) == by_input([a, b, c], p)


def test_peft_s_dora_sum_reduces_to_its_algebra():
    """base + (mns − 1)·(base − b) + mns·lora·s = mns·(X·Wᵀ) + b + s·mns·lora, with base = addmm(b, X, Wᵀ)."""
    x, w, bias, mns, lora = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4), torch.rand(4), torch.randn(5, 4)

    def dora(x, w, bias, mns, lora):
        base = torch.nn.functional.linear(x, w, bias)
        return base + (mns.view(1, -1) - 1) * (base - bias) + mns.view(1, -1) * lora * 2.0

    gm = joint_graph(dora, x, w, bias, mns, lora)
    (_, _, bias_node, mns_node, lora_node) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    (out,) = gm.graph.output_node().args[0]
    addmm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.addmm.default)
    assert poly.expand(out) == {poly.monomial(mns_node, poly.product_term(addmm)): 1.0, (bias_node,): 1.0,
                                poly.monomial(mns_node, lora_node): 2.0}


def test_views_that_keep_the_last_dimension_are_the_same_atom():
    v = torch.randn(6)
    (node,), p = expanded_output(lambda v: v.view(1, 6) * 3.0 - v.view(1, 1, 6), v)
    assert p == {(node,): 2.0}
    (node,), p = expanded_output(lambda v: v.view(2, 3) * 1.0, v)   # the last dimension changes: an atom of its own
    assert list(p) != [(node,)]


def test_cancelled_terms_vanish_and_constants_stay():
    t = torch.randn(3)
    (a,), p = expanded_output(lambda a: (a + 1) * 2.0 - a * 2.0, t)
    assert p == {(): 2.0}
    assert poly.same_poly({(a,): 2.0 * (1 + 1e-14)}, {(a,): 2.0}) and not poly.same_poly({(a,): 2.001}, {(a,): 2.0})


def test_an_expansion_too_large_to_be_a_sum_of_a_site_gives_up():
    t = [torch.randn(3) for _ in range(5)]
    _, p = expanded_output(lambda a, b, c, d, e: (a + b + 1) * (c + d + 1) * (e + a + 1) * (b + c + 1), *t)
    assert p is None
