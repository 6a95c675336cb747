"""Fusing sibling adapters that share an input (q/k/v read one hidden state, gate/up another).

After every site of a graph is rewritten, the rank-sized products that read the shared input X are
done once per group of siblings instead of once per site (m siblings, ranks r₁…rₘ, R = Σ rₖ):

    X·Aₖᵀ   [N,rₖ] each  →  X·[A₁;…;Aₘ]ᵀ [N,R], then column slices     (forward1's product, the
                                                                          recomputed Z2 of backward1/5)
    Z1ₖᵀ·X  [rₖ,i] each  →  [Z1₁,…,Z1ₘ]ᵀ·X [R,i], then row slices       (dA of backward1/2/5)

The FLOPs are the same (2·N·i·R either way); what changes is memory traffic and launches: X (N×i)
is read once instead of m times per product kind, for the price of concatenating the A's ([R,i],
tiny) or the Z1's ([N,R], small). The input-gradient sum Σ Z1ₖ·Aₖ is not fused: it is summed across
the sites' dX in the model's own graph, and the variants already fold each term into an addmm.

Siblings are sites whose adapter inputs certainly hold the same value (`same_value`: the same node,
or the same views/casts of one node) in the same dtype: dropout gives each adapter its own input,
so sites with dropout never group. A fusion whose inputs depend on a product it replaces (which
would make the graph cyclic) is not done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Graph, Node

from lora_rewrite import debug
from lora_rewrite.passes.match import MM, Site, dtype, is_call, same_shape, same_value, shape
from lora_rewrite.passes.rewrite import GraphOps

aten = torch.ops.aten
PERMUTE = aten.permute.default


@dataclass
class Fusion:
    """One group of sibling products done as one."""

    kind: str                  # "X·Aᵀ" or "dA = Z1ᵀ·X"
    sites: list                # the sites, in graph order
    ranks: list
    fused: Node


def adapter_product(site: Site, new_nodes: list[Node]) -> Node | None:
    """The rewritten site's X·Aᵀ: mm(X, permute(A)) among its new nodes."""
    for n in new_nodes:
        if is_call(n, MM) and n.args[0] is site.x and _is_transpose_node(n.args[1], site.a):
            return n
    return None


def adapter_weight_grad(site: Site, new_nodes: list[Node]) -> Node | None:
    """The rewritten site's dA = Z1ᵀ·X with Z1 = dY·(s·B) a product of its own: mm(permute(Z1), X)."""
    created = set(new_nodes)
    for n in new_nodes:
        if not (is_call(n, MM) and n.args[1] is site.x and is_call(n.args[0], PERMUTE)
                and list(n.args[0].args[1]) == [1, 0]):
            continue
        z1 = n.args[0].args[0]
        if z1 in created and is_call(z1, MM) and same_shape(shape(n), (site.dims.r, site.dims.i)):
            return n
    return None


def _is_transpose_node(node, source) -> bool:
    return is_call(node, PERMUTE) and node.args[0] is source and list(node.args[1]) == [1, 0]


def sibling_groups(members: list[tuple[Site, Node]]) -> list[list[tuple[Site, Node]]]:
    """Group (site, product) pairs whose adapter inputs hold the same value in the same dtype."""
    groups: list[list[tuple[Site, Node]]] = []
    for site, product in members:
        for group in groups:
            first = group[0][0]
            if dtype(site.x) == dtype(first.x) and dtype(product) == dtype(group[0][1]) \
                    and same_shape(shape(site.x), shape(first.x)) and same_value(site.x, first.x):
                group.append((site, product))
                break
        else:
            groups.append([(site, product)])
    return [g for g in groups if len(g) > 1]


def _depends_on(roots: list, targets: set[Node]) -> bool:
    pending = [r for r in roots if isinstance(r, Node)]
    seen: set[Node] = set()
    while pending:
        node = pending.pop()
        if node in targets:
            return True
        if node in seen:
            continue
        seen.add(node)
        pending.extend(node.all_input_nodes)
    return False


def _fuse(graph: Graph, fake_mode, group, order, kind: str,
          build: Callable[[GraphOps, list[tuple[Site, Node]]], Node], slice_dim: int) -> Fusion | None:
    group = sorted(group, key=lambda member: order[member[1]])
    olds = [product for _, product in group]
    names = ", ".join(site.module_path for site, _ in group)
    if _depends_on([arg for product in olds for arg in product.all_input_nodes], set(olds)):
        debug.log.debug("runlora did not fuse %s of %s: an input depends on a product it replaces", kind, names)
        return None
    ops = GraphOps(graph, fake_mode)
    # forward products go before the first (X and the A's exist there); dA before the last (every Z1 does)
    with ops.like(olds[0] if slice_dim == 1 else olds[-1]):
        fused = build(ops, group)
        slices, offset = [], 0
        for site, product in group:
            r = site.dims.r
            slices.append(ops.call(aten.slice.Tensor, fused, slice_dim, offset, offset + r))
            offset += r
    for old, new in zip(olds, slices):
        if not same_shape(shape(new), shape(old)) or dtype(new) != dtype(old):
            ops.erase_created()
            debug.log.debug("runlora did not fuse %s of %s: a slice of the fused product is %s%s, not %s%s",
                            kind, names, dtype(new), list(shape(new) or ()), dtype(old), list(shape(old) or ()))
            return None
    if any("recompute" in old.meta for old in olds):  # never saved, as the products it replaces
        for node in ops.created:
            ops.recompute(node)
    for old, new in zip(olds, slices):
        old.replace_all_uses_with(new)
        inputs_of_old = list(old.all_input_nodes)
        graph.erase_node(old)
        for node in inputs_of_old:
            if node.op == "call_function" and not node.users and node.meta.get("runlora"):
                graph.erase_node(node)
    return Fusion(kind, [site for site, _ in group], [site.dims.r for site, _ in group], fused)


def _fused_adapter_product(ops: GraphOps, group) -> Node:
    """X·[A₁;…;Aₘ]ᵀ [N,R]: one read of X for every sibling's X·Aₖᵀ."""  # 2·N·i·R FLOPs
    a_stacked = ops.call(aten.cat.default, [site.a for site, _ in group], 0)
    return ops.mm(group[0][0].x, ops.t(a_stacked))


def _fused_adapter_weight_grad(ops: GraphOps, group) -> Node:
    """[Z1₁,…,Z1ₘ]ᵀ·X [R,i]: one read of X for every sibling's dA."""  # 2·R·N·i FLOPs
    z1s = [product.args[0].args[0] for _, product in group]
    z1_side_by_side = ops.call(aten.cat.default, z1s, 1)
    return ops.mm(ops.t(z1_side_by_side), group[0][0].x)


def fuse_siblings(graph: Graph, fake_mode, rewritten: list[tuple[Site, list[Node]]]) -> list[Fusion]:
    """Fuse the shared-input products of sibling sites in place; returns what was fused. New nodes may
    sit before some of their inputs: the caller sorts the graph topologically, as after rewrite_site."""
    fusions: list[Fusion] = []
    for kind, find, build, slice_dim in (
            ("X·Aᵀ", adapter_product, _fused_adapter_product, 1),
            ("dA = Z1ᵀ·X", adapter_weight_grad, _fused_adapter_weight_grad, 0)):
        alive = set(graph.nodes)
        members = [(site, p) for site, nodes in rewritten
                   if (p := find(site, [n for n in nodes if n in alive])) is not None]
        groups = sibling_groups(members)
        if not groups:
            continue
        order = {n: k for k, n in enumerate(graph.nodes)}
        for group in groups:
            fusion = _fuse(graph, fake_mode, group, order, kind, build, slice_dim)
            if fusion is not None:
                fusions.append(fusion)
    return fusions
