"""Choosing each matched site's variants: legality first, then a forced name or the cost criterion.

The token count N is a number when shapes are static. When it is symbolic (dynamic shapes), the
`dynamic_policy` option decides what the criterion sees:

- "hint" (default): the size hint — N of the example that triggered this compile. No guard is added,
  so no recompile is caused; every variant is correct for every N, only the optimum may move.
- "guard": the same choice, plus guards that N stays inside the interval where it remains the
  cheapest (flops criterion only; other criteria fall back to "hint"). A length outside the interval
  recompiles and chooses again: at most one extra compile per distinct regime.
- no hint at all (unbacked sizes): the unmerged variants forward1 / backward1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lora_rewrite import compat
from lora_rewrite.cost import Choice, choose
from lora_rewrite.options import RunLoraOptions
from lora_rewrite.variants import BACKWARDS, BY_NAME, FORWARDS, Dims, Variant
from lora_rewrite.passes.match import Site


@dataclass
class Plan:
    forward: Choice
    backward: Choice | None
    n_used: int | None
    notes: list = field(default_factory=list)


def _legal(variants, site: Site) -> list[Variant]:
    return [v for v in variants if v.illegal_reason(site) is None]


def _choose_stage(stage: str, variants, forced: str | None, site: Site, dims: Dims, options: RunLoraOptions,
                  notes: list, n_known: bool) -> Choice:
    legal = _legal(variants, site)
    if forced is not None:
        variant = BY_NAME[forced]
        reason = variant.illegal_reason(site)
        if reason is None:
            return Choice(variant, forced=True, unit="forced")
        notes.append(f"forced {forced} is illegal here ({reason}); chose by {options.criterion} instead")
    if not n_known:
        notes.append(f"N has no size hint: {stage} falls back to {legal[0].name}")
        return Choice(legal[0], unit="fallback")
    dtype = site.dtype
    device = site.x.meta["val"].device
    return choose(legal, dims, options.criterion, dtype=dtype, device=device, stage=stage)


def plan_site(site: Site, options: RunLoraOptions) -> Plan:
    notes: list[str] = []
    n = site.dims.N
    n_used = n if isinstance(n, int) else compat.size_hint(n)
    dims = replace(site.dims, N=n_used if n_used is not None else 1)
    n_known = n_used is not None
    forward = _choose_stage("forward", FORWARDS, options.forward, site, dims, options, notes, n_known)
    backward = None
    if site.has_backward:
        backward = _choose_stage("backward", BACKWARDS, options.backward, site, dims, options, notes, n_known)
    elif site.backward_note:
        notes.append(f"backward not rewritten: {site.backward_note}")
    for stage, block in (("forward", site.merge_forward_block), ("backward", site.merge_backward_block)):
        if block and (stage == "forward" or site.has_backward):
            notes.append(f"merged {stage} variants illegal: {block}")
    if isinstance(n, torch.SymInt) and n_known and options.dynamic_policy == "guard":
        if options.criterion == "flops":
            _guard_interval(site, n, n_used, forward, FORWARDS, backward, BACKWARDS, notes)
        else:
            notes.append(f"dynamic_policy='guard' applies to the flops criterion; {options.criterion} used the hint")
    return Plan(forward, backward, n_used, notes)


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


def _guard_interval(site: Site, n: Any, hint: int, forward: Choice, forwards, backward: Choice | None,
                    backwards, notes: list) -> None:
    """Guard that N stays where the chosen variants stay the cheapest (the interval contains `hint`)."""
    stages = [(c.variant, _legal(variants, site)) for c, variants in ((forward, forwards), (backward, backwards))
              if c is not None and not c.forced]
    lo, hi = stable_interval(site.dims, stages)
    if lo > 1:
        compat.guard_bool(n >= lo)
    if hi is not None:
        compat.guard_bool(n <= hi)
    notes.append(f"guarded {lo} <= N <= {hi if hi is not None else '∞'} (size hint {hint})")
