"""Choosing per site: the dynamic-shape policies."""

import pytest
import torch
import torch.nn as nn

from helpers import assert_close_to, float64_reference, peft_linear, runlora_counters, step
from lora_rewrite import debug
from lora_rewrite.cost import choose
from lora_rewrite.passes.plan import stable_interval
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims


@pytest.mark.parametrize("i,o,r,needs_dx", [(4096, 4096, 16, True), (64, 96, 8, True), (1024, 4096, 64, False),
                                            (512, 512, 400, True)])
@pytest.mark.parametrize("hint", [1, 7, 300, 5000, 100000])
def test_stable_interval_is_exactly_where_the_choice_holds(i, o, r, needs_dx, hint):
    dims = lambda n: Dims(n, i, o, r, needs_dx)  # noqa: E731
    chosen_f = choose(FORWARDS, dims(hint), "flops").variant
    chosen_b = choose(BACKWARDS, dims(hint), "flops").variant
    lo, hi = stable_interval(dims(hint), [(chosen_f, list(FORWARDS)), (chosen_b, list(BACKWARDS))])
    assert lo <= hint and (hi is None or hint <= hi)
    probes = {1, 2, lo - 1, lo, lo + 1, hint, 2 * hint, 10**7} | ({hi - 1, hi, hi + 1} if hi is not None else set())
    for n in sorted(p for p in probes if p >= 1):
        same = (choose(FORWARDS, dims(n), "flops").variant is chosen_f
                and choose(BACKWARDS, dims(n), "flops").variant is chosen_b)
        inside = lo <= n and (hi is None or n <= hi)
        assert same == inside, (n, lo, hi)


def _compile_and_run(model, lengths, policy):
    compiled = torch.compile(model, backend="runlora", dynamic=True,
                             options={"codegen": False, "dynamic_policy": policy})
    with debug.collect_reports() as reports:
        for s in lengths:
            x = torch.randn(1, s, 6, requires_grad=True)
            y_ref, dx_ref, _ = step(model, x)
            y, dx, _ = step(compiled, x)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    return reports


def test_hint_policy_adds_no_compile():
    # i = o = 6, r = 2: forward2 is cheaper once N > i·o/(i+o) = 3.
    model = peft_linear(6, 6, 2)
    reports = _compile_and_run(model, [2, 3, 9, 40], "hint")
    assert len(reports) == 1 and runlora_counters()["graphs"] == 1
    (site,) = reports[0].sites
    assert site.N_used == 2 and site.forward == "forward1"


def test_guard_policy_recompiles_once_per_regime_and_chooses_again():
    model = peft_linear(6, 6, 2)
    reports = _compile_and_run(model, [2, 3, 9, 40], "guard")
    # i = o = 6, r = 2 has three regimes: N ≤ 3 (forward1/backward1), 7 ≤ N ≤ 11 (forward2/backward5),
    # N ≥ 12 (forward2/backward4). Lengths 2, 3 | 9 | 40: one compile per regime met, and no more.
    chosen = [(r.sites[0].N_used, r.sites[0].forward, r.sites[0].backward) for r in reports]
    assert chosen == [(2, "forward1", "backward1"), (9, "forward2", "backward5"), (40, "forward2", "backward4")]
    assert [n for r in reports for n in r.sites[0].notes if "guarded" in n] == [
        "guarded 1 <= N <= 3 (size hint 2)", "guarded 7 <= N <= 11 (size hint 9)", "guarded 12 <= N <= ∞ (size hint 40)"]


# --- sizes without a hint --------------------------------------------------------------------------

class MaskedRows(nn.Module):
    """The adapter sees only the rows a mask selects: N is data-dependent (an unbacked size)."""

    def __init__(self, inner, mask):
        super().__init__()
        self.inner = inner
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.inner(x[self.mask])


@pytest.mark.parametrize("policy", ["hint", "guard"])
def test_a_data_dependent_token_count_gets_the_unmerged_variants_and_no_guard(policy):
    mask = torch.arange(40) % 3 != 0
    model = MaskedRows(peft_linear(16, 24, 4), mask)
    x, grad_out = torch.randn(40, 16, requires_grad=True), torch.randn(int(mask.sum()), 24)
    y64, dx64, g64 = float64_reference(model, x, grad_out)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), debug.collect_reports() as reports:
        compiled = torch.compile(model, backend="runlora", options={"codegen": False, "dynamic_policy": policy})
        y, dx, g = step(compiled, x, grad_out)
    assert_close_to(y64, y, rtol=2e-6, what="Y")
    assert_close_to(dx64, dx, rtol=2e-6, what="dX")
    for name in g64:
        assert_close_to(g64[name], g[name], rtol=2e-6, what=name)
    (report,) = reports
    (site,) = report.sites
    assert site.N_used is None and (site.forward, site.backward) == ("forward1", "backward1")
    assert "N has no size hint: forward falls back to forward1" in site.notes
    assert not any("guard" in n for n in site.notes)
