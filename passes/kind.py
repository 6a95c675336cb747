"""A kind of site: everything the pass, the planner, the rewrite and the reports need to know about one kind
of adapter around a base product, in one record.

    kind    proven in the graph by                         module
    dora    the adapter's output scaled by m / ‖W + s·B·A‖  passes/kind_dora.py
    lora    (any other site: the last one tried)           passes/kind_lora.py

`passes/kinds.py` holds the ordered list the pass asks (`KINDS`, most specific first, as PEFT's dispatchers
are ordered). None of the pass's stages names a kind: they read the site's `kind`, the record below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.fx import Node

from lora_rewrite.variants import Dims, Gemm, SiteFacts, Variant


def never(*args) -> bool:
    return False


def no_nodes(site) -> tuple:
    return ()


def no_roles(site) -> tuple[dict, dict]:
    return {}, {}


def no_replacements(ops, site, forward_result, backward_result) -> dict:
    return {}


def no_labels(site) -> dict:
    return {}


@dataclass(frozen=True, repr=False)
class SiteKind:
    """One kind of site. Each callable reads (or builds) nothing but the site it is handed.

    Attributes:
        name: what the report calls the kind ("lora", "dora").
        proves: (anchor X·Aᵀ, the backward region, options) → is this kind what the graph holds there? Decided
            from what the graph proves (DoRA: a norm of this adapter's own weights scales its output), never
            from a look-alike; the first kind in `KINDS` that is proven matches the site.
        match: (anchor, the backward region, options) → a complete `Site` of this kind, or NoMatch(reason).
        forwards, backwards: the kind's variants, in tie-break order (lora_rewrite/variants.py's `Variant`).
        forward_operands: (ops, site, variant, options) → the operands its forward variants read.
        backward_operands: (ops, site, variant, the forward's result) → the operands its backward variants read.
        replacements: (ops, site, forward result, backward result or None) → {old node: new node} the kind
            replaces besides Y, dA, dB and dX (DoRA: mns, dm), each checked like those.
        before_gemms: (dims, facts, trains) → the products stock Inductor runs at such a site (the report's
            "FLOPs before").
        roles: site → ({node: role} of its inputs, {node: role} of the values it hands on) besides LoRA's
            (X, A, B, W, bias, dY; Y, dA, dB, dX), for the site pictures (DoRA: m; dm).
        own_nodes: site → the nodes of the graph only this kind's record names (DoRA: its norm, dm).
        labels: site → {node: what it is, in the notation of the record's equations}, for the site picture of
            the graph as matched (lora_rewrite/pictures.py).
        part_of_a_site: node mm(P, Aᵀ) → is it a product inside a site of this kind rather than a site's X·Aᵀ
            (DoRA's eye(i)·Aᵀ, the first half of its norm's B·A)?
    """

    name: str
    proves: Callable[[Node, set, Any], bool]
    match: Callable[[Node, set, Any], Any]
    forwards: tuple[Variant, ...]
    backwards: tuple[Variant, ...]
    forward_operands: Callable
    backward_operands: Callable
    before_gemms: Callable[[Dims, SiteFacts, bool], list[Gemm]]
    replacements: Callable = no_replacements
    roles: Callable[[Any], tuple[dict, dict]] = no_roles
    own_nodes: Callable[[Any], tuple] = no_nodes
    labels: Callable[[Any], dict] = no_labels
    part_of_a_site: Callable[[Node], bool] = never

    def __repr__(self) -> str:
        return f"SiteKind({self.name!r})"

    def variant(self, paper_name: str) -> Variant | None:
        """The variant of this kind that runs the paper's `paper_name` ("backward5"), or None."""
        return next((v for v in self.forwards + self.backwards if v.products.name == paper_name), None)
