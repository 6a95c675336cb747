"""The "time" criterion's measurement (lora_rewrite/timing.py): the whole stage of a layer at the site's
shape, each variant in its own fastest forms, real tensors even under fake mode, kept per shape."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_rewrite import timing, tuning
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims, DxMode, EagerOps


# A merged backward always returns the whole dX: the rewrite never asks it for the LoRA part alone.
CASES = [(v, dx) for v in FORWARDS + BACKWARDS for dx in (DxMode.TOTAL, DxMode.LORA, None)
         if not (v.merges_weight and v.stage == "backward" and dx is DxMode.LORA)]


@pytest.mark.parametrize("variant,dx", CASES, ids=lambda c: c.value if isinstance(c, DxMode) else
                         getattr(c, "name", "no-dx"))
def test_the_timed_stage_is_the_whole_stage_at_the_sites_shape(variant, dx):
    N, i, o, r = 10, 12, 20, 3
    shape = tuning.stage_shape(variant, Dims(N, i, o, r, dx is not None), dx, torch.float32, False)
    result = tuning._stage_runner(variant, shape, torch.device("cpu"))(EagerOps())
    if variant.stage == "forward":
        assert result.y.shape == (N, o)   # the base product included: Y, not only the adapter's term
    else:
        assert (result.grad_a.shape, result.grad_b.shape) == ((r, i), (o, r))
        assert (result.grad_x.shape == (N, i)) if dx else result.grad_x is None


def test_measurements_are_real_and_kept_per_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE", tuning.FormCache(tmp_path))
    tuning._measure_stage.cache_clear()
    d = Dims(16, 8, 12, 2, True)
    with FakeTensorMode():  # as inside the compiler
        first = timing.measured_seconds(BACKWARDS[0], d)
    assert first > 0
    assert timing.measured_seconds(BACKWARDS[0], d) == first          # kept
    assert tuning._measure_stage.cache_info().misses == 1
    timing.measured_seconds(BACKWARDS[0], Dims(16, 8, 12, 2, False))  # another shape: measured again
    assert tuning._measure_stage.cache_info().misses == 2
