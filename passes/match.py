"""Finding the sites of a joint (or inference) graph, after Inductor's joint passes.

Every site starts at an anchor, xa = mm(X, Aᵀ) whose result is multiplied by Bᵀ (`find_anchors`). Which
kind of site it is — plain LoRA, DoRA, … — is what the graph proves there (`passes/kinds.py`, each kind's
`proves`), and that kind's matcher establishes the rest, node by node, or raises `NoMatch(reason)`:

- the forward chain                  → the site is left untouched, with the reason in the report
- the backward (dA and dB)           → (plain LoRA) only the forward is rewritten; the reason is the
                                       site's `backward_note`

Matching is on graph structure and shapes, never on names. The rewrite that follows only replaces the
values of `out`, dA, dB and dX by algebraically equal expressions in the same inputs, so what a matcher
must establish is that algebra. Besides the nodes it records facts (`SiteFacts`); it decides nothing with
them: each variant's guard in lora_rewrite/variants.py says which facts make it illegal.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Graph, Node

from lora_rewrite.passes.fx import ADDMM, MM, MUL, backward_region, is_call, shape, transpose_source
from lora_rewrite.passes.kinds import inside_a_site, kind_at
from lora_rewrite.passes.site import Site


def match_site(anchor: Node, backward: set[Node], options: Any = None) -> Site:
    """The complete site that starts at `anchor`, or NoMatch with the reason it is left untouched.

    Args:
        anchor: a forward node xa = mm(X, Aᵀ) that `find_anchors` returned.
        backward: the graph's backward region (`backward_region`; empty for an inference graph).
        options: the backend's options (RunLoraOptions), for the behaviours a matcher may be told to skip.

    Returns:
        the site, of the kind the graph proves at the anchor, with its backward when the graph has it in
        the expected form, its dims and its facts.

    Raises:
        NoMatch: the chain is not a site the rewrite covers.
    """
    return kind_at(anchor, backward).match(anchor, backward, options)


def match_graph(graph: Graph) -> tuple[list[Node], set[Node]]:
    """Every anchor of the graph, in graph order, and the graph's backward region."""
    backward = backward_region(graph)
    return find_anchors(graph, backward), backward


def find_anchors(graph: Graph, backward: set[Node]) -> list[Node]:
    """Forward nodes xa = mm(X, Aᵀ) whose result is multiplied by Bᵀ: the start of every adapter chain."""
    anchors = []
    for node in graph.nodes:
        if node in backward or not is_call(node, MM):
            continue
        x, at = node.args
        a = transpose_source(at)
        if inside_a_site(node):
            continue   # a product inside a site of some kind (DoRA's eye(i)·Aᵀ), not an adapter's X·Aᵀ
        if a is None or shape(a) is None or len(shape(a)) != 2 or shape(x) is None or len(shape(x)) != 2:
            continue
        for user in node.users:
            if user in backward:
                continue
            if is_call(user, MM) and user.args[0] is node and transpose_source(user.args[1]) is not None:
                anchors.append(node)
                break
            if is_call(user, ADDMM) and user.args[1] is node and transpose_source(user.args[2]) is not None:
                anchors.append(node)
                break
            if is_call(user, MUL) and shape(node)[-1] == 1 and transpose_source(user.args[-1]) is not None:
                anchors.append(node)  # rank 1: Inductor may turn (X·Aᵀ)·Bᵀ into a broadcast product
                break
    return anchors
