"""Choosing per site: the dynamic-shape policies, and what they cost in compiles."""

import logging

import pytest
import torch
import torch.nn as nn

from helpers import (assert_close_to, assert_same_step, float64_reference, peft_linear, randomize_adapters,
                     runlora_counters, step)
from lora_rewrite import debug
from lora_rewrite.backend import runlora as runlora_backend
from lora_rewrite.cost import choose
from lora_rewrite.passes import plan
from lora_rewrite.passes.plan import GUARDED_COMPILES, stable_interval
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
    i = model.base_model.model.proj.in_features
    with debug.collect_reports() as reports:
        for s in lengths:
            x = torch.randn(1, s, i, requires_grad=True)
            assert_same_step(step(model, x), step(compiled, x), rtol=1e-5)
    return reports


def guard_notes(reports) -> list[str]:
    return [n for r in reports for n in r.sites[0].notes if "guard" in n]


def test_hint_policy_adds_no_compile():
    # i = o = 6, r = 2: forward2 is cheaper once N > i·o/(i+o) = 3.
    model = peft_linear(6, 6, 2)
    reports = _compile_and_run(model, [2, 3, 9, 40], "hint")
    assert len(reports) == 1 and runlora_counters()["graphs"] == 1
    (site,) = reports[0].sites
    assert site.N_used == 2 and site.forward == "forward1"


def test_guard_policy_recompiles_once_per_wide_regime_and_chooses_again():
    # i = 16, o = 24, r = 4 has three regimes, each at least a doubling of N wide: N ≤ 9 (forward1/backward1),
    # 10 ≤ N ≤ 24 (forward2/backward1), N ≥ 25 (forward2/backward5). Lengths 2, 5 | 12, 20 | 40, 90: one
    # compile per regime met. The third compile is past the guarded ones (GUARDED_COMPILES = 2), so it
    # adds no guard; it is the last compile, and it chose for its own regime all the same.
    model = peft_linear(16, 24, 4)
    reports = _compile_and_run(model, [2, 5, 12, 20, 40, 90], "guard")
    chosen = [(r.sites[0].N_used, r.sites[0].forward, r.sites[0].backward) for r in reports]
    assert chosen == [(2, "forward1", "backward1"), (12, "forward2", "backward1"), (40, "forward2", "backward5")]
    notes = guard_notes(reports)
    assert notes[:2] == ["guarded 1 <= N <= 9 (size hint 2)", "guarded 10 <= N <= 24 (size hint 12)"]
    assert notes[2].startswith("no guard: this frame's compile 2 is past the 2 that may carry guards")


def test_guard_policy_adds_no_guard_for_a_narrow_regime():
    # i = o = 6, r = 2: N = 9 lies in 7 ≤ N ≤ 11 (forward2/backward5), narrower than a doubling of N. A
    # guard would buy a recompile for every few tokens; the choice at the hint serves every N instead.
    model = peft_linear(6, 6, 2)
    reports = _compile_and_run(model, [9, 40], "guard")
    assert len(reports) == 1
    assert guard_notes(reports) == ["no guard: the regime 7 <= N <= 11 where this graph's choices stay the "
                                    "cheapest is narrower than a doubling of N; chosen at the size hint 9 for "
                                    "every N"]


# --- the cost in compiles, against stock Inductor --------------------------------------------------

WIDTHS = [16, 40, 24, 56, 12, 48, 20, 64]  # seven LoRA linears of distinct shapes
LENGTHS = range(2, 201)


class LoraStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(WIDTHS, WIDTHS[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def lora_stack():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(LoraStack(), LoraConfig(r=4, lora_alpha=8,
                                                   target_modules=[f"layers.{k}" for k in range(len(WIDTHS) - 1)]))
    randomize_adapters(model)
    return model


class CountingBackend:
    """The runlora backend with `options`, counting its compiles and the calls that ran a compiled forward
    (a call Dynamo runs eagerly, e.g. past its recompile_limit, reaches none)."""

    def __init__(self, **options):
        self.options = {"codegen": False, **options}
        self.compiles = self.compiled_calls = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        compiled = runlora_backend(gm, example_inputs, options=self.options)

        def run(*args):
            self.compiled_calls += 1
            return compiled(*args)

        return run


def run_lengths(model, backend, lengths=LENGTHS, dynamic=None):
    """A training step per length, compared with eager PEFT."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with debug.collect_reports() as reports:
        for n in lengths:
            x = torch.randn(1, n, WIDTHS[0], requires_grad=True)
            y_ref, dx_ref, g_ref = step(model, x)
            y, dx, g = step(compiled, x)
            assert_close_to(y_ref, y, rtol=1e-5, what=f"Y at N={n}")
            assert_close_to(dx_ref, dx, rtol=1e-5, what=f"dX at N={n}")
    return reports


def test_guard_policy_compiles_at_most_the_bound_more_than_stock_inductor():
    """The cliff: the seven sites' regimes intersect into a dozen, several 1 or 2 tokens wide. Guarding
    each one ran into Dynamo's recompile_limit (8) by N = 17, and every later call ran eager PEFT."""
    model = lora_stack()
    stock, guard = CountingBackend(rewrite=False), CountingBackend(dynamic_policy="guard")
    run_lengths(model, stock)
    reports = run_lengths(model, guard)

    assert stock.compiles == 2  # static for N = 2, then a symbolic N serves every other length
    assert guard.compiles <= stock.compiles + GUARDED_COMPILES
    assert guard.compiled_calls == stock.compiled_calls == len(LENGTHS)  # every call ran compiled
    assert all(len(r.sites) == len(WIDTHS) - 1 for r in reports)


def test_guard_policy_stops_guarding_after_its_compiles_and_warns(monkeypatch, caplog):
    """Even where every regime is wide enough to guard: guards only on a frame's first GUARDED_COMPILES
    compiles; the next compile serves every length, and a warning says so."""
    monkeypatch.setattr(plan, "WIDE_REGIME_FACTOR", 0)  # every regime counts as wide
    model = lora_stack()
    stock, guard = CountingBackend(rewrite=False), CountingBackend(dynamic_policy="guard")
    lengths = [2, 5, 10, 12, 13, 15, 16, 17, 30, 100, 200]  # one in each of nine regimes
    run_lengths(model, stock, lengths, dynamic=True)
    with caplog.at_level(logging.WARNING, logger="lora_rewrite"):
        reports = run_lengths(model, guard, lengths, dynamic=True)

    assert stock.compiles == 1 and guard.compiles == 1 + GUARDED_COMPILES
    assert guard.compiled_calls == len(lengths)
    assert [r.sites[0].N_used for r in reports] == [2, 10, 12]
    assert ["guarded" in n for n in guard_notes(reports)] == [True, True, False]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "dynamic_policy='guard' adds no guard" in warning and "compile 2" in warning


def test_guard_policy_leaves_the_last_compile_dynamo_allows_unguarded(monkeypatch, caplog):
    """With recompile_limit = 2 the frame's second compile is its last: it must serve every length."""
    monkeypatch.setattr(plan, "WIDE_REGIME_FACTOR", 0)
    model = lora_stack()
    guard = CountingBackend(dynamic_policy="guard")
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, logger="lora_rewrite"):
        reports = run_lengths(model, guard, [2, 3, 10, 12, 30, 100])
    assert guard.compiles == 2 and guard.compiled_calls == 6
    assert not any("guarded" in n for n in guard_notes(reports))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "recompile_limit (2)" in warning


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
