"""The kinds of site the pass knows, in the order they are tried: the first whose `proves` holds at an
anchor matches the site (PEFT's dispatchers are ordered the same way: the most specific first, plain LoRA,
which every kind refines, last). A kind is a `SiteKind` record (passes/kind.py) in a module of its own.

    KINDS = [DORA, LORA]

`register_kind` adds one (a test, or a package that brings its own adapter kind) before the others, so a
new kind plugs in without an edit to any stage of the pass.
"""

from __future__ import annotations

from torch.fx import Node

from lora_rewrite.passes.kind import SiteKind
from lora_rewrite.passes.kind_dora import DORA
from lora_rewrite.passes.kind_lora import LORA

KINDS: list[SiteKind] = [DORA, LORA]


def register_kind(kind: SiteKind) -> None:
    """Try `kind` before every kind already known (a kind of the same name is replaced)."""
    unregister_kind(kind.name)
    KINDS.insert(0, kind)


def unregister_kind(name: str) -> None:
    KINDS[:] = [k for k in KINDS if k.name != name]


def kind_at(anchor: Node, backward: set[Node]) -> SiteKind:
    """The kind of site the graph proves at this anchor (plain LoRA when no other is proven)."""
    return next(kind for kind in KINDS if kind.proves(anchor, backward))


def inside_a_site(node: Node) -> bool:
    """Is this mm(P, Aᵀ) a product inside some kind's site rather than a site's own X·Aᵀ?"""
    return any(kind.part_of_a_site(node) for kind in KINDS)
