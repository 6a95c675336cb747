"""Choosing each matched site's variants: legality first, then a forced name or the cost criterion.

The token count N is a number when shapes are static. When it is symbolic (dynamic shapes), the
`dynamic_policy` option decides what the criterion sees:

- "hint" (default): the size hint — N of the example that triggered this compile. No guard is added,
  so no recompile is caused; every variant is correct for every N, only the optimum may move.
- "guard": the same choice, plus guards that N stays inside the interval where it remains the
  cheapest (flops criterion only; other criteria fall back to "hint"). A length outside the interval
  recompiles and chooses again: at most one extra compile per distinct regime.
- no hint at all (an unbacked, data-dependent N, e.g. the rows `x[mask]` selects), under either policy:
  the unmerged variants forward1 / backward1, and no guard.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lora_rewrite import compat
from lora_rewrite.cost import Choice, CostUnit, choose
from lora_rewrite.options import RunLoraOptions
from lora_rewrite.variants import BACKWARDS, BY_NAME, FORWARDS, Dims, SiteFacts, Variant
from lora_rewrite.passes.site import Site


@dataclass
class Plan:
    """The variants chosen for one site.

    Attributes:
        forward: the forward variant and the costs it was chosen by.
        backward: the backward variant; None where the site's backward is not rewritten.
        n_used: the token count the costs were computed for (the size hint when N is symbolic; None
            when N has none).
        notes: what the report says besides the choice: illegal variants and why, fallbacks, guards.
    """

    forward: Choice
    backward: Choice | None
    n_used: int | None
    notes: list = field(default_factory=list)


def plan_site(site: Site, options: RunLoraOptions) -> Plan:
    """Choose the site's forward and (when it has one) backward variant.

    Only variants whose guard finds them legal at the site are candidates. A forced variant (option
    `forward` / `backward`) is taken when legal; otherwise the criterion chooses among the legal ones.

    Args:
        site: a matched site (passes/match.py).
        options: the backend's options: `criterion`, `forward`, `backward`, `dynamic_policy`.

    Returns:
        the plan, with a note for each illegal group of variants and each fallback.
    """
    notes: list[str] = []
    n = site.dims.N
    n_used = n if isinstance(n, int) else compat.size_hint(n)
    dims = replace(site.dims, N=n_used if n_used is not None else 1)
    n_known = n_used is not None
    forward_legality = _legality(FORWARDS, site.facts)
    backward_legality = _legality(BACKWARDS, site.facts) if site.backward is not None else {}
    forward = _choose_stage("forward", forward_legality, options.forward, site, dims, options, notes, n_known)
    backward = None
    if site.backward is not None:
        backward = _choose_stage("backward", backward_legality, options.backward, site, dims, options, notes,
                                 n_known)
    elif site.backward_note:
        notes.append(f"backward not rewritten: {site.backward_note}")
    for stage, legality in (("forward", forward_legality), ("backward", backward_legality)):
        for reason in dict.fromkeys(r for r in legality.values() if r is not None):
            notes.append(f"merged {stage} variants illegal: {reason}")
    if isinstance(n, torch.SymInt) and n_known and options.dynamic_policy == "guard":
        if options.criterion == "flops":
            _guard_interval(site, n, n_used, [(forward, forward_legality), (backward, backward_legality)], notes)
        else:
            notes.append(f"dynamic_policy='guard' applies to the flops criterion; {options.criterion} used the hint")
    return Plan(forward, backward, n_used, notes)


def _legality(variants, facts: SiteFacts) -> dict[Variant, str | None]:
    """Each variant, in list order, with why it is illegal at the site (None: legal)."""
    return {v: v.illegal_reason(facts) for v in variants}


def _legal(legality: dict[Variant, str | None]) -> list[Variant]:
    return [v for v, reason in legality.items() if reason is None]


def _choose_stage(stage: str, legality: dict[Variant, str | None], forced: str | None, site: Site, dims: Dims,
                  options: RunLoraOptions, notes: list, n_known: bool) -> Choice:
    legal = _legal(legality)
    if forced is not None:
        variant = BY_NAME[forced]
        reason = legality[variant]
        if reason is None:
            return Choice(variant, forced=True, unit=CostUnit.FORCED)
        notes.append(f"forced {forced} is illegal here ({reason}); chose by {options.criterion} instead")
    if not n_known:
        notes.append(f"N has no size hint: {stage} falls back to {legal[0].name}")
        return Choice(legal[0], unit=CostUnit.FALLBACK)
    device = site.forward.x.meta["val"].device
    return choose(legal, dims, options.criterion, dtype=site.forward.dtype, device=device, stage=stage)


def _linear_in_n(variant: Variant, dims: Dims) -> tuple[int, int]:
    """flops(N) = slope·N + offset: every cost of Table 1 is affine in N."""
    f0 = variant.flops(replace(dims, N=0))
    f1 = variant.flops(replace(dims, N=1))
    return f1 - f0, f0


def stable_interval(dims: Dims, stages) -> tuple[int, int | None]:
    """[lo, hi]: the token counts N for which each stage's `chosen` variant stays the flops criterion's
    choice among its `legal` ones (hi None: unbounded). `stages` is a list of (chosen, legal)."""
    lo, hi = 1, None
    for chosen, legal in stages:
        ca, cb = _linear_in_n(chosen, dims)
        for v in legal:
            if v is chosen:
                continue
            va, vb = _linear_in_n(v, dims)
            slope, offset = va - ca, vb - cb              # cost(v) - cost(chosen) = slope·N + offset
            strict = legal.index(v) < legal.index(chosen)  # ties go to the earlier variant
            if slope > 0:     # chosen stays the cheaper for N above a threshold
                lo = max(lo, -offset // slope + 1 if strict else -(offset // slope))
            elif slope < 0:   # … below a threshold
                bound = (offset - 1) // (-slope) if strict else offset // (-slope)
                hi = bound if hi is None else min(hi, bound)
    return lo, hi


def _guard_interval(site: Site, n: Any, hint: int, choices: list[tuple[Choice | None, dict]], notes: list) -> None:
    """Guard that N stays where the chosen variants stay the cheapest (the interval contains `hint`).
    `choices` holds each stage's choice (None: not rewritten) with its legality."""
    stages = [(choice.variant, _legal(legality)) for choice, legality in choices
              if choice is not None and not choice.forced]
    lo, hi = stable_interval(site.dims, stages)
    if lo > 1:
        compat.guard_bool(n >= lo)
    if hi is not None:
        compat.guard_bool(n <= hi)
    notes.append(f"guarded {lo} <= N <= {hi if hi is not None else '∞'} (size hint {hint})")
