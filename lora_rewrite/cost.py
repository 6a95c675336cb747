"""Choosing a site's forward and backward variant: the cost criteria.

- "flops" (default, the paper's): fewest matmul FLOPs by Table 1, forward and backward chosen
  independently, ties to the lower-numbered variant.
- "roofline": every product of the variant costs max(FLOPs / peak rate, bytes / memory bandwidth)
  on the site's device and dtype; the variant with the smallest sum wins. This counts what FLOPs
  miss: at LoRA ranks the rank-sized products are bandwidth-bound, so reading X or dY once more can
  cost more than a large product (see `lora_rewrite.hardware`).
- "time": each legal variant is run on random tensors of the site's exact shape, dtype and device
  and timed in its fastest product forms (`lora_rewrite.timing`, `lora_rewrite.tuning`); the fastest
  wins, unless a variant with fewer FLOPs is within MARGIN of it (3 %: measurement noise). Results
  are kept per shape in the process and on disk.

Costs are linear in the token count N. When N is symbolic (dynamic shapes) it is first turned into a
concrete number by the `dynamic_policy` option (see passes/plan.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lora_rewrite.variants import Dims, Variant

CRITERIA = ("flops", "roofline", "time")


class CostUnit(enum.Enum):
    """What a Choice's costs are counted in; the last two mean there are no costs."""

    FLOPS = "FLOPs"
    MODEL_SECONDS = "s (model)"
    MEASURED_SECONDS = "s (measured)"
    FORCED = "forced"        # the user forced the variant: nothing was compared
    FALLBACK = "fallback"    # N has no size hint: the first legal variant, nothing was compared


@dataclass(frozen=True)
class Choice:
    """The variant picked for one stage of one site, with every candidate's cost for the report."""

    variant: Variant
    costs: dict = field(default_factory=dict)   # variant name -> cost in the criterion's unit
    unit: CostUnit = CostUnit.FLOPS
    forced: bool = False


def flops_cost(variant: Variant, dims: Dims, **_) -> float:
    return float(variant.flops(dims))


def roofline_cost(variant: Variant, dims: Dims, *, dtype=None, device=None, **_) -> float:
    from lora_rewrite.hardware import roofline_seconds

    return roofline_seconds(variant.gemms(dims), dtype=dtype, device=device)


def time_cost(variant: Variant, dims: Dims, *, dtype=None, device=None, stage: str = "", **context) -> float:
    from lora_rewrite.timing import measured_seconds

    return measured_seconds(variant, dims, dtype=dtype, device=device, stage=stage, **context)


COST_FUNCTIONS: dict[str, Callable[..., float]] = {
    "flops": flops_cost,
    "roofline": roofline_cost,
    "time": time_cost,
}
UNITS = {"flops": CostUnit.FLOPS, "roofline": CostUnit.MODEL_SECONDS, "time": CostUnit.MEASURED_SECONDS}


# Under "time", a variant with fewer FLOPs within this fraction of the fastest wins: timing noise.
TIME_MARGIN = 0.03


def choose(candidates: Sequence[Variant], dims: Dims, criterion: str, *, dtype=None, device=None,
           stage: str = "", **context) -> Choice:
    """The cheapest of the legal `candidates` by `criterion`; ties go to the earlier one. `context`
    (the site's dX mode and weight layout) reaches the "time" criterion's measurement."""
    if not candidates:
        raise ValueError("no legal variant to choose from")
    cost_of = COST_FUNCTIONS[criterion]
    extra = context if criterion == "time" else {}
    costs = {v.name: cost_of(v, dims, dtype=dtype, device=device, stage=stage, **extra) for v in candidates}
    best = min(candidates, key=lambda v: (costs[v.name], candidates.index(v)))
    if criterion == "time":
        near = [v for v in candidates if costs[v.name] <= (1 + TIME_MARGIN) * costs[best.name]]
        best = min(near, key=lambda v: (v.flops(dims), candidates.index(v)))
    return Choice(best, costs, UNITS[criterion])
