"""The roofline's ceilings (lora_rewrite/hardware.py): measured once per device and dtype, with real
tensors even while the compiler's fake tensors are active; a product costs its binding ceiling."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_rewrite import hardware
from lora_rewrite.hardware import Ceilings, ceilings_for, roofline_seconds
from lora_rewrite.variants import Gemm


def test_ceilings_are_measured_once_per_device_and_dtype_with_real_tensors():
    hardware.measure_ceilings.cache_clear()
    with FakeTensorMode():  # as inside the compiler: the measurement must still time real tensors
        first = ceilings_for(torch.device("cpu"), torch.float32)
    assert all(math.isfinite(v) and v > 0 for v in (first.flops_per_s, first.bytes_per_s, first.launch_s))
    assert ceilings_for(None, None) is first    # the CPU and fp32 by default, and cached
    assert hardware.measure_ceilings.cache_info().misses == 1


def test_a_product_costs_its_binding_ceiling_plus_a_launch(monkeypatch):
    monkeypatch.setattr(hardware, "ceilings_for", lambda device, dtype: Ceilings(1e9, 1e8, 1e-6))
    compute_bound = Gemm(1000, 1000, 1000, "square")     # 2e9 FLOPs: 2 s; 1.2e7 bytes: 0.12 s
    memory_bound = Gemm(1000, 1000, 4, "rank-sized")     # 8e6 FLOPs: 0.008 s; 4.032e6 bytes: 0.04032 s
    assert roofline_seconds([compute_bound]) == pytest.approx(2.0 + 1e-6)
    assert roofline_seconds([memory_bound]) == pytest.approx(0.04032 + 1e-6)
    assert roofline_seconds([compute_bound, memory_bound]) == pytest.approx(2.04032 + 2e-6)
    assert roofline_seconds([memory_bound], dtype=torch.bfloat16) == pytest.approx(0.02016 + 1e-6)


def test_synchronize_returns_at_once_on_the_cpu():
    assert hardware.synchronize(torch.device("cpu")) is None
