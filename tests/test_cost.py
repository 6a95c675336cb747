"""The "flops" criterion (the paper's): which variants win where, by Table 1, ties to the lower number."""

import pytest

from lora_rewrite.cost import choose
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims

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
