"""Fusing sibling adapters that share an input (q/k/v read one hidden state, gate/up another).

After every site of a graph is rewritten, the rank-sized products that read the shared input X are
done once per group of siblings instead of once per site (m siblings, ranks r₁…rₘ, R = Σ rₖ):

    X·Aₖᵀ   [N,rₖ] each  →  X·[A₁;…;Aₘ]ᵀ [N,R], then column slices     (forward1's product, the
                                                                          recomputed Z2 of backward1/5)
    Z1ₖᵀ·X  [rₖ,i] each  →  [Z1₁,…,Z1ₘ]ᵀ·X [R,i], then row slices       (dA of backward1/2/5)

Each rewritten site's record (`RewrittenSite.products`) names its X·Aᵀ and its dA = Z1ᵀ·X with that
Z1; `FusionKind` says how each kind is stacked and where the fused product goes.

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

from lora_rewrite import compat, debug
from lora_rewrite.forms import GRAD_A, XA, product
from lora_rewrite.passes.fx import (PERMUTE, depends_on, dtype, erase_unused, is_call, made_by_runlora, same_shape,
                                    same_value, shape)
from lora_rewrite.passes.rewrite import GraphOps, RewrittenSite, SiteProducts
from lora_rewrite.passes.site import Site

aten = torch.ops.aten

# One sibling's share of a fusion: its rewritten site and its product of the kind being fused.
Member = tuple[RewrittenSite, Node]


@dataclass(frozen=True)
class FusionKind:
    """One kind of product that siblings can do as one."""

    name: str                                         # as the report names it
    product_of: Callable[[SiteProducts], Node | None]  # a rewritten site's product of this kind
    build: Callable[[GraphOps, list[Member]], Node]    # the fused product, from the group's members
    stacked_dim: int        # the siblings' results lie side by side along this dim of the fused product
    before_last: bool       # insert before the group's last product (False: before its first)


@dataclass
class Fusion:
    """One group of sibling products done as one."""

    kind: FusionKind
    sites: list                # the sites, in graph order
    ranks: list
    fused: Node


def _adapter_product(products: SiteProducts) -> Node | None:
    # Forward1's X·Aᵀ and backward1/5's recomputed Z2 are one node when both exist (GraphOps emits a
    # product once); a site with either has one X·Aᵀ to fuse.
    return products.forward_xa if products.forward_xa is not None else products.backward_xa


def _fused_adapter_product(ops: GraphOps, group: list[Member]) -> Node:
    """X·[A₁;…;Aₘ]ᵀ [N,R]: one read of X for every sibling's X·Aₖᵀ, in the form the first sibling's
    X·Aᵀ was measured fastest in."""  # 2·N·i·R FLOPs
    a_stacked = ops.call(aten.cat.default, [member.site.forward.a for member, _ in group], 0)
    return product(ops, XA, group[0][0].site.forward.x, ops.t(a_stacked))


def _fused_adapter_weight_grad(ops: GraphOps, group: list[Member]) -> Node:
    """[Z1₁,…,Z1ₘ]ᵀ·X [R,i]: one read of X for every sibling's dA, in the first sibling's dA form."""  # 2·R·N·i FLOPs
    z1_side_by_side = ops.call(aten.cat.default, [member.products.z1 for member, _ in group], 1)
    return product(ops, GRAD_A, ops.t(z1_side_by_side), group[0][0].site.forward.x)


# In the order they are fused. Forward products go before the group's first (X and the A's exist
# there); dA before the last (every Z1 exists only there).
ADAPTER_PRODUCT = FusionKind("X·Aᵀ", _adapter_product, _fused_adapter_product, stacked_dim=1, before_last=False)
ADAPTER_WEIGHT_GRAD = FusionKind("dA = Z1ᵀ·X", lambda products: products.grad_a, _fused_adapter_weight_grad,
                                 stacked_dim=0, before_last=True)
FUSION_KINDS = (ADAPTER_PRODUCT, ADAPTER_WEIGHT_GRAD)


def sibling_groups(members: list[Member]) -> list[list[Member]]:
    """Group (site, product) pairs whose adapter inputs hold the same value in the same dtype."""
    groups: list[list[Member]] = []
    for member, product in members:
        x = member.site.forward.x
        for group in groups:
            first_x = group[0][0].site.forward.x
            if dtype(x) == dtype(first_x) and dtype(product) == dtype(group[0][1]) \
                    and same_shape(shape(x), shape(first_x)) and same_value(x, first_x):
                group.append((member, product))
                break
        else:
            groups.append([(member, product)])
    return [g for g in groups if len(g) > 1]


def _fuse(graph: Graph, fake_mode, group: list[Member], order: dict, kind: FusionKind) -> Fusion | None:
    group = sorted(group, key=lambda member: order[member[1]])
    olds = [product for _, product in group]
    sites: list[Site] = [member.site for member, _ in group]
    names = ", ".join(site.module_path for site in sites)
    if depends_on([arg for product in olds for arg in product.all_input_nodes], set(olds)):
        debug.log.debug("runlora did not fuse %s of %s: an input depends on a product it replaces", kind.name, names)
        return None
    ops = GraphOps(graph, fake_mode, group[0][0].forms)
    with ops.like(olds[-1] if kind.before_last else olds[0]):
        fused = kind.build(ops, group)
        slices, offset = [], 0
        for site in sites:
            r = site.dims.r
            slices.append(ops.call(aten.slice.Tensor, fused, kind.stacked_dim, offset, offset + r))
            offset += r
        # A product in its transposed form is a view of the product it transposes, and a later product
        # may read that one directly ((Pᵀ)ᵀ is P: dB = (Z2ᵀ·dY)ᵀ reads the mm under Z2 = (A·Xᵀ)ᵀ).
        # Those readers get the slice's transpose, so the per-site product goes entirely.
        inner_readers = {}
        for old, new in zip(olds, slices):
            inner = old.args[0] if is_call(old, PERMUTE) and made_by_runlora(old.args[0]) else None
            if inner is not None and any(user is not old for user in inner.users):
                inner_readers[inner] = ops.t(new)
    for old, new in zip(olds, slices):
        if not same_shape(shape(new), shape(old)) or dtype(new) != dtype(old):
            ops.erase_created()
            debug.log.debug("runlora did not fuse %s of %s: a slice of the fused product is %s%s, not %s%s",
                            kind.name, names, dtype(new), list(shape(new) or ()), dtype(old), list(shape(old) or ()))
            return None
    if any(compat.tagged_for_recomputation(old) for old in olds):  # never saved, as the products it replaces
        for node in ops.created:
            ops.recompute(node)
    for inner, transposed_slice in inner_readers.items():
        inner.replace_all_uses_with(transposed_slice, delete_user_cb=lambda user: not (
            is_call(user, PERMUTE) and user in olds))
    for old, new in zip(olds, slices):
        old.replace_all_uses_with(new)
        # The replaced product goes, with what runlora built only for it (the transposes of A or Z1).
        erase_unused(graph, [old], erasable=made_by_runlora)
    return Fusion(kind, sites, [site.dims.r for site in sites], fused)


def fuse_siblings(graph: Graph, fake_mode, rewritten: list[RewrittenSite]) -> list[Fusion]:
    """Fuse the shared-input products of sibling sites in place; returns what was fused. New nodes may
    sit before some of their inputs: the caller sorts the graph topologically, as after rewrite_site."""
    fusions: list[Fusion] = []
    for kind in FUSION_KINDS:
        alive = set(graph.nodes)  # an earlier fusion may have replaced a product a record names
        members = [(member, product) for member in rewritten
                   if (product := kind.product_of(member.products)) is not None and product in alive]
        groups = sibling_groups(members)
        if not groups:
            continue
        order = {n: k for k, n in enumerate(graph.nodes)}
        for group in groups:
            fusion = _fuse(graph, fake_mode, group, order, kind)
            if fusion is not None:
                fusions.append(fusion)
    return fusions
