"""The criteria (lora_rewrite/cost.py). "flops" (the paper's): which variants win where, by Table 1, ties to
the lower number. "roofline": each product bound by compute or by memory on the device's ceilings.
"time": the measured fastest."""

import pytest
import torch

from lora_rewrite import hardware, timing
from lora_rewrite.cost import CostUnit, choose
from lora_rewrite.hardware import Ceilings
from lora_rewrite.variants import BACKWARDS, BY_NAME, FORWARDS, Dims, DxMode

# (N, i, o, r, X needs grad) -> (forward, backward). Forward2 wins once N > i·o/(i+o); backward5 beats
# backward1 once N·i·r > i·o·r, i.e. N > o; without dX, backward5 is backward1 (a tie, to the lower).
TABLE = [
    ((256, 4096, 4096, 8, True), ("forward1", "backward1")),        # few tokens, big layer
    ((2048, 4096, 4096, 8, True), ("forward1", "backward1")),       # N = i·o/(i+o): a tie, to forward1
    ((2049, 4096, 4096, 8, True), ("forward2", "backward1")),       # one token past the forward threshold
    ((8192, 4096, 4096, 16, True), ("forward2", "backward5")),      # the paper's regime
    ((116736, 1024, 1024, 128, True), ("forward2", "backward5")),   # llama-250m, b=58, s=2048, r=128
    ((4096, 4096, 11008, 128, True), ("forward2", "backward1")),    # LlamaMLP up: N < o
    ((16384, 4096, 11008, 128, True), ("forward2", "backward5")),   # LlamaMLP up: N > o
    ((200, 768, 3072, 8, True), ("forward1", "backward1")),         # Figure 2b: b=2, s=100
    ((8192, 4096, 4096, 16, False), ("forward2", "backward1")),     # no dX: 5 ties with 1
    ((512, 64, 64, 63, True), ("forward2", "backward4")),           # rank near the width: dYᵀ·X pays off
    ((512, 64, 64, 63, False), ("forward2", "backward3")),          # … and without dX, nothing to merge
]


@pytest.mark.parametrize("dims,expected", TABLE, ids=[str(t[0]) for t in TABLE])
def test_flops_criterion_table(dims, expected):
    N, i, o, r, needs_dx = dims
    d = Dims(N, i, o, r, needs_dx)
    assert choose(FORWARDS, d, "flops").variant.name == expected[0]
    assert choose(BACKWARDS, d, "flops").variant.name == expected[1]


def test_choice_is_the_minimum_of_the_costs_with_ties_to_the_lower_number():
    for N in (1, 7, 100, 2047, 2048, 2049, 10**5):
        for r in (1, 8, 64):
            d = Dims(N, 4096, 4096, r, True)
            for variants in (FORWARDS, BACKWARDS):
                choice = choose(variants, d, "flops")
                costs = [v.flops(d) for v in variants]
                assert choice.costs == {v.name: float(c) for v, c in zip(variants, costs)}
                assert choice.variant is variants[costs.index(min(costs))]


def test_parameter_reduction_makes_backward2_and_3_lose_to_backward5():
    """The paper's proof: under r·(i+o) < i·o neither backward2 nor backward3 has the fewest FLOPs."""
    for N in (1, 16, 512, 8192):
        for i, o in ((64, 64), (512, 2048), (4096, 11008)):
            for r in (1, 4, 16, 64):
                if r * (i + o) >= i * o:
                    continue
                d = Dims(N, i, o, r, True)
                assert choose(BACKWARDS, d, "flops").variant.name not in ("backward2", "backward3")


def test_only_legal_candidates_are_considered():
    d = Dims(10**5, 4096, 4096, 8, True)
    legal = [v for v in FORWARDS if not v.merges_weight]
    assert choose(legal, d, "flops").variant.name == "forward1"
    with pytest.raises(ValueError):
        choose([], d, "flops")


# --- roofline -----------------------------------------------------------------------------------------

def roofline_by_hand(variant, dims, c: Ceilings, element_size=4) -> float:
    return sum(max(2 * g.m * g.k * g.n / c.flops_per_s,
                   element_size * (g.m * g.k + g.k * g.n + (2 if g.accumulate else 1) * g.m * g.n) / c.bytes_per_s)
               + c.launch_s for g in variant.gemms(dims))


@pytest.fixture
def ceilings(monkeypatch):
    """Fixed ceilings instead of measured ones: 10 TFLOP/s, 100 GB/s, 5 µs a launch."""
    fixed = Ceilings(flops_per_s=1e13, bytes_per_s=1e11, launch_s=5e-6)
    monkeypatch.setattr(hardware, "ceilings_for", lambda device, dtype: fixed)
    return fixed


@pytest.mark.parametrize("variants", [FORWARDS, BACKWARDS], ids=["forward", "backward"])
def test_roofline_costs_each_product_by_its_binding_ceiling(variants, ceilings):
    d = Dims(4096, 1024, 4096, 16, True)
    choice = choose(variants, d, "roofline", dtype=torch.float32, device=torch.device("cpu"))
    assert choice.unit is CostUnit.MODEL_SECONDS
    assert choice.costs == pytest.approx({v.name: roofline_by_hand(v, d, ceilings) for v in variants})
    assert choice.variant.name == min(choice.costs, key=choice.costs.get)


def test_roofline_sees_the_bytes_that_flops_cannot(monkeypatch):
    """Where every product is bound by memory, the fewest bytes win, not the fewest FLOPs."""
    monkeypatch.setattr(hardware, "ceilings_for", lambda device, dtype: Ceilings(1e18, 1e11, 0.0))
    d = Dims(8192, 4096, 4096, 16, True)
    assert choose(BACKWARDS, d, "flops").variant.name == "backward5"
    assert choose(BACKWARDS, d, "roofline").variant.name == "backward4"
    assert min(BACKWARDS, key=lambda v: v.bytes(d, 4)).name == "backward4"


# --- time -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b4_seconds,expected", [(1.02, "backward4"), (1.2, "backward3")])
def test_time_chooses_the_fastest_measurement_and_fewer_flops_within_noise(monkeypatch, b4_seconds, expected):
    """backward3 is the fastest measured; backward4 (fewer FLOPs here) wins when it is within 3 %."""
    seconds = {"backward1": 3.0, "backward2": 2.0, "backward3": 1.0, "backward4": b4_seconds, "backward5": 4.0}
    asked = []

    def measured(variant, dims, *, dtype=None, device=None, stage="", **context):
        asked.append((variant.name, dims, stage, context["dx"]))
        return seconds[variant.name]

    monkeypatch.setattr(timing, "measured_seconds", measured)
    d = Dims(64, 32, 48, 4, True)
    assert BY_NAME["backward4"].flops(d) < BY_NAME["backward3"].flops(d)
    choice = choose(BACKWARDS, d, "time", stage="backward", dx=DxMode.TOTAL, weight_stored_as_io=False)
    assert choice.variant.name == expected
    assert choice.unit is CostUnit.MEASURED_SECONDS and choice.costs == seconds
    assert asked == [(v.name, d, "backward", DxMode.TOTAL) for v in BACKWARDS]


def test_time_measures_every_candidate_for_real():
    d = Dims(32, 16, 24, 4, True)
    choice = choose(BACKWARDS, d, "time", dtype=torch.float32, device=torch.device("cpu"), stage="backward")
    assert set(choice.costs) == {v.name for v in BACKWARDS} and all(c > 0 for c in choice.costs.values())
