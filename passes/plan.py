"""Choosing each matched site's variants: legality first, then a forced name or the cost criterion.

The token count N is a number when shapes are static. When it is symbolic (dynamic shapes), the
`dynamic_policy` option decides what the criterion sees:

- "hint" (default): the size hint — N of the example that triggered this compile. No guard is added,
  so no recompile is caused; every variant is correct for every N, only the optimum may move.
- "guard": the same choice, plus a guard that N stays inside the regime where every site's choice
  remains the cheapest (flops criterion only; other criteria fall back to "hint"). A length outside
  it recompiles and chooses again. Sites of distinct shapes cut N into many regimes, some a token
  or two wide, so the guard is bounded (`guard_token_counts`, once per graph, on the intersection of
  its sites' regimes):
    * only a wide regime is guarded: one that reaches at least twice its lowest N
      (WIDE_REGIME_FACTOR), or has no upper end;
    * only a frame's first GUARDED_COMPILES (2) compiles carry guards; a later compile chooses at
      its hint and guards nothing, so it serves every length;
    * never the last compile Dynamo's recompile_limit allows, which must serve every length;
  and a warning is logged where a wide regime goes unguarded for the last two reasons. The bound: for
  each compiled frame, at most GUARDED_COMPILES compiles more than stock Inductor makes (each extra
  compile is one a guarded compile's guard caused), so Dynamo's recompile_limit is never reached on
  runlora's account.
- no hint at all (an unbacked, data-dependent N, e.g. the rows `x[mask]` selects), under either policy:
  the unmerged variants forward1 / backward1, and no guard.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lora_rewrite import compat
from lora_rewrite.containment import Stage, StageFailed, describe, free_device_memory, is_out_of_memory
from lora_rewrite.cost import Choice, CostUnit, choose
from lora_rewrite.debug import log
from lora_rewrite.options import RunLoraOptions
from lora_rewrite.variants import Dims, DxMode, SiteFacts, Variant
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
        regime: dynamic_policy "guard" with a symbolic N: [lo, hi], the N for which this site's choices
            stay the cheapest (hi None: unbounded); `guard_token_counts` guards it, or not.
    """

    forward: Choice
    backward: Choice | None
    n_used: int | None
    notes: list = field(default_factory=list)
    regime: tuple[int, int | None] | None = None
    forms: dict = field(default_factory=dict)          # {role: form} of both stages (lora_rewrite/forms.py)
    form_seconds: dict = field(default_factory=dict)   # {role: {form: measured seconds}} where measured
    forms_source: str = "direct"                       # how the forms were decided, for the report


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
    forwards, backwards = site_variants(site)
    forward_legality = _legality(forwards, site.facts)
    backward_legality = _legality(backwards, site.facts) if site.backward is not None else {}
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
    forms, form_seconds, forms_source = plan_forms(site, forward, backward, dims, options, n_known)
    regime = None
    if isinstance(n, torch.SymInt) and n_known and options.dynamic_policy == "guard":
        if options.criterion == "flops":
            stages = [(choice.variant, _legal(legality)) for choice, legality in
                      ((forward, forward_legality), (backward, backward_legality))
                      if choice is not None and not choice.forced]
            regime = stable_interval(site.dims, stages)
        else:
            notes.append(f"dynamic_policy='guard' applies to the flops criterion; {options.criterion} used the hint")
    return Plan(forward, backward, n_used, notes, regime, forms, form_seconds, forms_source)


def site_variants(site: Site) -> tuple[tuple[Variant, ...], tuple[Variant, ...]]:
    """The forward and backward variants of the site's kind (passes/kind.py)."""
    return site.kind.forwards, site.kind.backwards


def _stage_context(site: Site) -> dict:
    """What a measurement needs to know about the site besides its dims and dtype."""
    dx_mode = site.backward.dx_mode if site.backward is not None else None
    return {"dx": dx_mode, "weight_stored_as_io": site.forward.base_product.weight_stored_as_io(),
            "dx_in_rows": dx_mode is DxMode.TOTAL and site.backward.dx_sum.leaves_graph}


def plan_forms(site: Site, forward: Choice, backward: Choice | None, dims: Dims, options: RunLoraOptions,
               n_known: bool) -> tuple[dict, dict, str]:
    """The product forms of the chosen variants: forced (option `forms`), or measured at the site's
    shapes (lora_rewrite/tuning.py). Returns (forms, measured seconds per role and form, source)."""
    forced = options.forced_forms()
    if forced is not None:
        return forced, {}, "direct" if not forced else "forced"
    if not n_known:
        return {}, {}, "direct (N has no size hint to measure at)"
    from lora_rewrite.tuning import measure_stage, stage_shape

    device = site.forward.x.meta["val"].device
    context = _stage_context(site)
    forms: dict = {}
    seconds: dict = {}
    from_disk = []   # per stage with something to choose (forward2 has nothing: it is never run)
    if dims.N == 0:
        return {}, {}, "direct (N = 0: nothing to measure)"
    for choice in (forward, backward):
        if choice is None:
            continue
        products = choice.variant.products   # a DoRA variant runs its LoRA variant's products
        shape = stage_shape(products, dims, context["dx"] if dims.needs_dx else None, site.forward.dtype,
                            context["weight_stored_as_io"], context["dx_in_rows"])
        try:
            measured = measure_stage(products, shape, device)
        except Exception as e:
            if is_out_of_memory(e):   # the site's activations once more did not fit: nothing is kept
                free_device_memory(device)
                log.warning("runlora: out of memory while measuring the product forms of %s (%s); it is "
                            "rewritten in its default forms, and nothing is written to the forms cache for it",
                            site.module_path, describe(e))
                return {}, {}, f"direct (out of memory while measuring: {describe(e)})"
            if options.strict:
                raise
            raise StageFailed(Stage.MEASURE, e) from e
        forms.update(measured.forms)
        seconds.update(measured.candidates)
        if measured.candidates:
            from_disk.append(measured.from_disk)
    if not from_disk:
        return forms, seconds, "measured: nothing to choose"
    return forms, seconds, "measured (kept on disk)" if all(from_disk) else "measured"


def _legality(variants, facts: SiteFacts) -> dict[Variant, str | None]:
    """Each variant, in list order, with why it is illegal at the site (None: legal)."""
    return {v: v.illegal_reason(facts) for v in variants}


def _legal(legality: dict[Variant, str | None]) -> list[Variant]:
    return [v for v, reason in legality.items() if reason is None]


def _choose_stage(stage: str, legality: dict[Variant, str | None], forced: str | None, site: Site, dims: Dims,
                  options: RunLoraOptions, notes: list, n_known: bool) -> Choice:
    legal = _legal(legality)
    if forced is not None:
        variant = site.kind.variant(forced)   # the paper's name as the site's kind runs it (dora-backward5)
        reason = legality[variant] if variant in legality else f"the {site.kind.name} kind has no such variant"
        if reason is None:
            return Choice(variant, forced=True, unit=CostUnit.FORCED)
        notes.append(f"forced {forced} is illegal here ({reason}); chose by {options.criterion} instead")
    if not n_known:
        notes.append(f"N has no size hint: {stage} falls back to {legal[0].name}")
        return Choice(legal[0], unit=CostUnit.FALLBACK)
    device = site.forward.x.meta["val"].device
    try:
        return choose(legal, dims, options.criterion, dtype=site.forward.dtype, device=device, stage=stage,
                      **_stage_context(site))
    except Exception as e:
        if options.criterion != "time":
            raise
        if not is_out_of_memory(e):
            if options.strict:
                raise
            raise StageFailed(Stage.MEASURE, e) from e
        free_device_memory(device)   # timing the variants did not fit: FLOPs need no memory
        log.warning("runlora: out of memory while timing the %s variants of %s (%s); chosen by FLOPs instead",
                    stage, site.module_path, describe(e))
        notes.append(f"out of memory while timing the {stage} variants: chosen by flops")
        return choose(legal, dims, "flops", dtype=site.forward.dtype, device=device, stage=stage)


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


# dynamic_policy="guard", bounded. A regime is worth a guard when it reaches at least this many times its
# lowest N: narrower ones (a token or two, where sites of distinct shapes cross over) would cost a
# recompile every few lengths and save almost nothing.
WIDE_REGIME_FACTOR = 2
# Only a frame's first compiles (Dynamo's compile numbers 0 … GUARDED_COMPILES - 1) may carry guards:
# every extra compile is caused by a guarded compile's guard, so this is also how many compiles at most
# runlora adds to stock Inductor's for one frame.
GUARDED_COMPILES = 2


def guard_token_counts(plans: list[tuple[Site, Plan]], options: RunLoraOptions) -> list[str]:
    """dynamic_policy="guard", once per graph after every site is planned: guard that each symbolic N
    stays in the intersection of its sites' regimes, within the bound in this module's docstring.

    Args:
        plans: every rewritten site of the graph with its plan.
        options: the backend's options (`dynamic_policy`).

    Returns:
        one report note per site, in order ("" where there is nothing to say).
    """
    notes = [""] * len(plans)
    by_symbol: dict[str, list[int]] = {}
    for k, (site, plan) in enumerate(plans):
        if plan.regime is not None:
            by_symbol.setdefault(compat.sym_expr(site.dims.N), []).append(k)
    for members in by_symbol.values():
        site, plan = plans[members[0]]
        lo = max(plans[k][1].regime[0] for k in members)
        upper = [plans[k][1].regime[1] for k in members if plans[k][1].regime[1] is not None]
        hi = min(upper) if upper else None
        note = _guard_regime(site.dims.N, lo, hi, plan.n_used)
        for k in members:
            notes[k] = note
    return notes


def _guard_regime(n: Any, lo: int, hi: int | None, hint: int) -> str:
    """Guard lo <= n <= hi (it holds at `hint`) where the bound allows; the report's note."""
    regime = f"{lo} <= N <= {hi if hi is not None else '∞'}"
    if lo <= 1 and hi is None:
        return "no guard needed: the choices are the cheapest for every N"
    at_hint = f"chosen at the size hint {hint} for every N"
    if hi is not None and hi < WIDE_REGIME_FACTOR * lo:
        return (f"no guard: the regime {regime} where this graph's choices stay the cheapest is narrower "
                f"than a doubling of N; {at_hint}")
    refusal = _guard_refusal()
    if refusal is not None:
        log.warning("runlora: dynamic_policy='guard' adds no guard for %s (size hint %s): %s. This compile "
                    "serves every length, so Dynamo's recompile_limit is not reached on runlora's account.",
                    regime, hint, refusal)
        return f"no guard: {refusal}; {at_hint}"
    if lo > 1:
        compat.guard_bool(n >= lo)
    if hi is not None:
        compat.guard_bool(n <= hi)
    return f"guarded {regime} (size hint {hint})"


def _guard_refusal() -> str | None:
    """Why this compile may carry no guard (the bound), or None."""
    number = compat.frame_compile_number()
    if number is None:  # not a Dynamo frame compile: nothing to recompile
        return None
    if number >= GUARDED_COMPILES:
        return (f"this frame's compile {number} is past the {GUARDED_COMPILES} that may carry guards "
                f"(at most {GUARDED_COMPILES} compiles more than stock Inductor)")
    limit = compat.dynamo_recompile_limit()
    if number + 1 >= limit:
        return (f"this is the frame's last compile Dynamo's recompile_limit ({limit}) allows, and it must "
                f"serve every length")
    return None
