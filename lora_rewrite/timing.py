"""The "time" criterion: each legal variant run at the site's exact shape, dtype and device, timed.

What is timed is the whole stage of the layer, as the rewritten graph computes it: the forward
variants include the base product X·Wᵀ (forward1 accumulates onto it, forward2 replaces it), the
backward variants compute dA, dB and the site's input gradient. Each variant is timed in its own
fastest product forms (lora_rewrite/tuning.py), so the criterion compares variants as they would run;
the measurement is kept per shape in the process and on disk, so a model with many identical layers,
and every later process on the same machine, measures each shape once.
"""

from __future__ import annotations

import torch

from lora_rewrite.tuning import measure_stage, stage_shape
from lora_rewrite.variants import Dims, DxMode, Variant


def measured_seconds(variant: Variant, dims: Dims, *, dtype=None, device=None, dx: DxMode | None = DxMode.TOTAL,
                     weight_stored_as_io: bool = False, dx_in_rows: bool = False, **_) -> float:
    """Seconds of one call of `variant`'s stage at `dims` (dX as `dx` says, when dims.needs_dx; in rows
    where it leaves the graph, `dx_in_rows`)."""
    products = variant.products   # a DoRA variant is timed as the LoRA variant whose products it runs
    shape = stage_shape(products, dims, dx if dims.needs_dx else None, dtype or torch.float32, weight_stored_as_io,
                        dx_in_rows)
    return measure_stage(products, shape, torch.device(device if device is not None else "cpu"), stage_time=True).seconds
