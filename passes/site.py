"""What a kind's matcher produces: one `Site` per adapter chain it understands, built from the forward chain
it matched and, when the graph has them, the gradients autograd derived from it — node by node as the
equations of plain LoRA name them (passes/kind_lora.py), plus the kind's own record (`Site.extra`).

Every record is frozen: a site is matched once, completely, and never patched afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from lora_rewrite.variants import Dims, DxMode, SiteFacts
from lora_rewrite.passes.provenance import Provenance


class NoMatch(Exception):
    """The chain (or its backward) is not in a form the rewrite covers; the message says why."""


@dataclass(frozen=True)
class ForwardChain:
    """out = base + s·(X·Aᵀ)·Bᵀ, node by node."""

    x: Node                      # the adapter's input [N,i]
    a: Node                      # A [r,i] as the adapter computes with it (maybe a cast of the parameter)
    b: Node                      # B [o,r]
    scale: Any                   # s: a Python number or a 0-d tensor node
    out: Node                    # base + s·(X·Aᵀ)·Bᵀ
    base: Node                   # the base term of that sum
    base2d: Node | None          # the same as [N,o], when it already exists in the graph
    out_shape_args: Any          # view args [N,o] -> out's shape; None when out is 2-D
    n_arg: Any                   # N as view args spell it (an int or a SymInt node)
    base_product: Any            # what the base term is: a BaseProduct (passes/base_product.py)
    sizes: tuple                 # (N, i, o, r) as read off X, A and B; N may be a SymInt
    dtype: torch.dtype           # the adapter's compute dtype (the sum's, unless `term_cast`)
    base_dtype: torch.dtype
    nodes: tuple[Node, ...]      # xa, xab, the view and the scaling between them, out
    term_cast: Any = None        # the dtype s·(X·Aᵀ)·Bᵀ is cast to before the sum (PEFT's bnb layers), or None


@dataclass(frozen=True)
class InputGradSum:
    """dX = … + dX_a_end + dX_b_end + …: where the adapter's and the base's input gradients meet."""

    lora_end: Node      # dX_a, or its view to X's shape
    lora_add: Node      # the add that takes lora_end
    base_mm: Node       # mm(dY, W)
    base_end: Node      # base_mm, or its view, or the cast of that, as it enters the sum
    view_args: Any      # view args from [N,i] back to X's shape, None if X is 2-D
    cast_to: Any        # the dtype both summands are cast to before the sum (autocast), or None
    w_io: Node | None = None     # Wᵀ [i,o] as the base's forward product reads it (base_mm reads its transpose)
    weight: Node | None = None   # or the [o,i] weight base_mm reads directly (a 4-bit base's dequantized weight)

    @property
    def leaves_graph(self) -> bool:
        """Does the whole dX go straight out of the graph (to autograd) once the adapter's summand is
        gone? Then it must come back in rows: autograd copies a strided gradient into a leaf's .grad."""
        users = [user for user in self.base_end.users if user is not self.lora_add]
        if self.base_end in self.lora_add.args:   # the sum was base + adapter: its users get dX itself
            users += list(self.lora_add.users)
        return any(user.op == "output" for user in users)


@dataclass(frozen=True)
class Gradients:
    """The site's backward: dA, dB and, when X needs a gradient, the adapter's dX_a."""

    dy: Node                     # unscaled dY, in the adapter's dtype
    dy_shape_args2d: Any         # view args of dY as [N,o] when the graph reshapes it; None when it is 2-D
    g: Node                      # the gradient reaching B (s·dY for LoRA), before any view
    z1: Node                     # z1 = g·B
    grad_a: Node | None          # dA = z1ᵀ·X; None where A needs no gradient (a kind with a frozen A)
    grad_b: Node                 # dB = gᵀ·xa
    grad_x_lora: Node | None     # dX_a = z1·A; None where X needs no gradient
    dx_sum: InputGradSum | None  # where dX_a meets the base's dY·W, when found
    nodes: tuple[Node, ...]      # g's source, g, dB, z1, dA, dX_a

    @property
    def dx_mode(self) -> DxMode | None:
        """What a backward variant's dX replaces: the whole sum, the adapter's part, or nothing."""
        if self.grad_x_lora is None:
            return None
        return DxMode.TOTAL if self.dx_sum is not None else DxMode.LORA


@dataclass(frozen=True)
class Site:
    """One PEFT LoRA site `Y = X·Wᵀ (+ bias) + s·(X·Aᵀ)·Bᵀ` and its backward, as matched in the graph.

    Attributes:
        anchor: xa = mm(X, Aᵀ), the node the match started from.
        provenance: the PEFT module and adapter it belongs to.
        forward: the forward chain, node by node.
        backward: its gradients; None in an inference graph or when they are not in the expected form.
        backward_note: why `backward` is None in a graph that has a backward ("" otherwise).
        dims: N, i, o, r and whether X needs a gradient: what the cost criteria read.
        facts: what the variants' guards read (lora_rewrite.variants.SiteFacts).
        kind: the kind of site (passes/kind.py `SiteKind`: plain LoRA, DoRA, …), which matched it.
        extra: what the kind adds to the LoRA chain, in its own record (DoRA: its magnitude, norm and their
            gradient); None for plain LoRA.
    """

    anchor: Node
    provenance: Provenance
    forward: ForwardChain
    backward: Gradients | None
    backward_note: str
    dims: Dims
    facts: SiteFacts
    kind: Any
    extra: Any = None

    @property
    def module_path(self) -> str:
        return self.provenance.path

    def nodes(self) -> list[Node]:
        """Every node of the graph the site consists of, forward and backward."""
        members = list(self.forward.nodes)
        if self.backward is not None:
            g = self.backward
            members += list(g.nodes) + [self.forward.out, g.grad_a, g.grad_b, g.grad_x_lora]
            if g.dx_sum is not None:
                d = g.dx_sum
                members += [d.lora_end, d.lora_add, d.base_mm, d.base_end]
        members += list(self.kind.own_nodes(self))
        seen, result = set(), []
        for n in members:
            if isinstance(n, Node) and n not in seen:
                seen.add(n)
                result.append(n)
        return result
