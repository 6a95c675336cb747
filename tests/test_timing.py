"""The "time" criterion's measurements (lora_rewrite/timing.py): the whole stage of a layer at the site's
shape, real tensors even under fake mode, cached per shape, RUNLORA_TIME_REPEATS timed runs."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_rewrite import timing
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims


@pytest.mark.parametrize("needs_dx", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("variant", FORWARDS + BACKWARDS, ids=lambda v: v.name)
def test_the_timed_stage_is_the_whole_stage_at_the_sites_shape(variant, needs_dx):
    N, i, o, r = 10, 12, 20, 3
    result = timing._stage_fn(variant, Dims(N, i, o, r, needs_dx), torch.float32, torch.device("cpu"))()
    if variant.stage == "forward":
        assert result.y.shape == (N, o)   # the base product included: Y, not only the adapter's term
    else:
        assert (result.grad_a.shape, result.grad_b.shape) == ((r, i), (o, r))
        assert (result.grad_x.shape == (N, i)) if needs_dx else result.grad_x is None


def test_measurements_are_real_cached_per_shape_and_repeat_as_configured(monkeypatch):
    timing._measure.cache_clear()
    monkeypatch.setenv("RUNLORA_TIME_REPEATS", "3")
    d = Dims(16, 8, 12, 2, True)
    with FakeTensorMode():  # as inside the compiler
        first = timing.measured_seconds(BACKWARDS[0], d)
    assert first > 0
    assert timing.measured_seconds(BACKWARDS[0], d) == first          # cached
    assert timing._measure.cache_info().misses == 1
    monkeypatch.setenv("RUNLORA_TIME_REPEATS", "5")
    timing.measured_seconds(BACKWARDS[0], d)                          # another number of runs: measured again
    assert timing._measure.cache_info().misses == 2
