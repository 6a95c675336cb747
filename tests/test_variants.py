"""Every variant, on real tensors: numerics against float64, FLOPs against Table 1 and FlopCounterMode.

Notation: X[N,i], W[o,i], A[r,i], B[o,r], dY[N,o]; Y = X·Wᵀ + bias + s·X·Aᵀ·Bᵀ.
"""

import dataclasses
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_rewrite.forms import ROLES
from lora_rewrite.variants import (BACKWARDS, BY_NAME, FORWARDS, BackwardOperands, Dims, DxMode, EagerOps,
                                   ForwardOperands, SiteFacts, autograd_backward_gemms)

# The paper's Table 1 (b·s = N), with X needing a gradient.
TABLE1 = {
    "forward1": lambda N, i, o, r: 2 * N * (i * o + r * i + o * r),
    "forward2": lambda N, i, o, r: 2 * (i * o * r + N * o * i),
    "backward1": lambda N, i, o, r: 2 * N * (2 * o * r + 3 * i * r + o * i),
    "backward2": lambda N, i, o, r: 2 * N * (o * r + 2 * i * r + 2 * i * o) + 2 * i * o * r,
    "backward3": lambda N, i, o, r: 2 * N * (2 * i * o + o * r + i * r) + 4 * i * r * o,
    "backward4": lambda N, i, o, r: 2 * (2 * N * i * o + 3 * i * o * r),
    "backward5": lambda N, i, o, r: 2 * N * (2 * o * r + 2 * i * r + o * i) + 2 * i * o * r,
}
# Without dX (the adapter's input needs no gradient, e.g. the first layer): our own derivation, the
# products each backward still needs for dA and dB.
NO_DX = {
    "backward1": lambda N, i, o, r: 2 * N * (2 * o * r + 2 * i * r),
    "backward2": lambda N, i, o, r: 2 * N * (o * r + i * o + i * r) + 2 * i * o * r,
    "backward3": lambda N, i, o, r: 2 * N * i * o + 4 * i * o * r,
    "backward4": lambda N, i, o, r: 2 * N * i * o + 4 * i * o * r,
    "backward5": lambda N, i, o, r: 2 * N * (2 * o * r + 2 * i * r),
}

VARIANT_NAMES = [v.name for v in FORWARDS + BACKWARDS]


def random_dims(seed: int) -> tuple[int, int, int, int]:
    rng = random.Random(seed)
    i, o = rng.randint(5, 40), rng.randint(5, 40)
    while o == i:
        o = rng.randint(5, 40)
    return rng.randint(3, 50), i, o, rng.choice([1, 2, 3, 8])


def tensors(N, i, o, r, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=t(N, i), w=t(o, i), bias=t(o), a=t(r, i), b=t(o, r), dy=t(N, o))


def test_the_lists_hold_every_paper_variant_once():
    assert set(TABLE1) == set(VARIANT_NAMES)
    assert len(VARIANT_NAMES) == len(set(VARIANT_NAMES))
    assert [v.stage for v in FORWARDS] == ["forward"] * len(FORWARDS)
    assert [v.stage for v in BACKWARDS] == ["backward"] * len(BACKWARDS)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("variant", FORWARDS, ids=lambda v: v.name)
def test_forward_variant_matches_float64(variant, seed):
    N, i, o, r = random_dims(seed)
    s = 0.37 + seed
    t64 = tensors(N, i, o, r, seed=seed)
    expected = t64["x"] @ t64["w"].T + t64["bias"] + s * (t64["x"] @ t64["a"].T) @ t64["b"].T
    t = {k: v.float() for k, v in t64.items()}
    ops = EagerOps()
    if variant.merges_weight:
        p = ForwardOperands(x=t["x"], a=t["a"], b=t["b"], s=s, w_io=t["w"].T, bias=t["bias"])
    else:
        p = ForwardOperands(x=t["x"], a=t["a"], b=t["b"], s=s, base=torch.addmm(t["bias"], t["x"], t["w"].T))
    got = variant.compute(ops, p).y
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# A merged backward builds the whole dX, so the rewrite never asks it for the adapter's part alone.
BACKWARD_CASES = [(v, dx) for v in BACKWARDS for dx in (DxMode.TOTAL, DxMode.LORA, None)
                  if not (v.merges_weight and dx is DxMode.LORA)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("variant,dx", BACKWARD_CASES,
                         ids=lambda c: c.value if isinstance(c, DxMode) else getattr(c, "name", str(c)))
def test_backward_variant_matches_float64_autograd(variant, dx, seed):
    N, i, o, r = random_dims(seed + 10)
    s = 1.5 + seed
    t64 = tensors(N, i, o, r, seed=seed)
    x = t64["x"].clone().requires_grad_(True)
    a = t64["a"].clone().requires_grad_(True)
    b = t64["b"].clone().requires_grad_(True)
    lora = s * (x @ a.T) @ b.T
    y = (x @ t64["w"].T + lora) if dx is DxMode.TOTAL else lora
    y.backward(t64["dy"])
    t = {k: v.float() for k, v in t64.items()}
    p = BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=s, w_io=t["w"].T, dx=dx)
    result = variant.compute(EagerOps(), p)
    grad_a, grad_b, grad_x = result.grad_a, result.grad_b, result.grad_x
    for name, got, want in (("dA", grad_a, a.grad), ("dB", grad_b, b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
    if dx is None:
        assert grad_x is None
    else:
        torch.testing.assert_close(grad_x.double(), x.grad, rtol=1e-5, atol=1e-5 * x.grad.abs().max().item())


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_product_list_is_table1(name):
    for seed in range(5):
        N, i, o, r = random_dims(seed)
        assert BY_NAME[name].flops(Dims(N, i, o, r, needs_dx=True)) == TABLE1[name](N, i, o, r)
        if name in NO_DX:
            assert BY_NAME[name].flops(Dims(N, i, o, r, needs_dx=False)) == NO_DX[name](N, i, o, r)


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# Every product in its default form, and every product in its other form (lora_rewrite/forms.py): a
# form changes orientation and folding, never the FLOPs.
FORMS = {"default": {}, "all-other": {role.name: role.forms[1] for role in ROLES}}


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("variant", FORWARDS + BACKWARDS, ids=lambda v: v.name)
def test_flop_counter_agrees_with_the_product_list(variant, forms):
    """The function computes exactly the products its list declares (the base X·Wᵀ, which forward1
    accumulates onto, is computed outside it), in every form."""
    N, i, o, r = 37, 24, 40, 6
    t = {k: v.float() for k, v in tensors(N, i, o, r).items()}
    ops = EagerOps(forms)
    for needs_dx in (True, False) if variant.stage == "backward" else (True,):
        d = Dims(N, i, o, r, needs_dx)
        if variant.stage == "forward":
            base = torch.addmm(t["bias"], t["x"], t["w"].T)
            p = ForwardOperands(x=t["x"], a=t["a"], b=t["b"], s=2.0, w_io=t["w"].T, bias=t["bias"], base=base)
            expected = variant.flops(d) - (0 if variant.merges_weight else 2 * N * i * o)
        else:
            p = BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=2.0, w_io=t["w"].T,
                                 dx=DxMode.TOTAL if needs_dx else None)
            expected = variant.flops(d)
        assert _counted_flops(lambda: variant.compute(ops, p)) == expected


def test_autograd_reference_products_are_what_peft_runs():
    """The report's "before": PEFT's forward (= forward1's products) and autograd's backward."""
    N, i, o, r = 37, 24, 40, 6
    t = {k: v.float().requires_grad_(k in ("x", "a", "b")) for k, v in tensors(N, i, o, r).items()}
    with FlopCounterMode(display=False) as fwd:
        y = torch.nn.functional.linear(t["x"], t["w"], t["bias"]) + (t["x"] @ t["a"].T) @ t["b"].T * 2.0
    with FlopCounterMode(display=False) as bwd:
        y.backward(t["dy"])
    d = Dims(N, i, o, r, needs_dx=True)
    assert fwd.get_total_flops() == BY_NAME["forward1"].flops(d)
    assert bwd.get_total_flops() == sum(g.flops() for g in autograd_backward_gemms(d))


# --- the products a variant names ---------------------------------------------------------------------

# Which variants compute (and return) X·Aᵀ, and which compute dA as Z1ᵀ·X (returning that Z1).
NAMES_XA = {"forward1", "backward1", "backward5"}
NAMES_Z1 = {"backward1", "backward2", "backward5"}


@pytest.mark.parametrize("variant", FORWARDS + BACKWARDS, ids=lambda v: v.name)
def test_named_products_hold_their_equations(variant):
    """The products a variant returns beside its result (what sibling fusion reuses) are what their
    names say: X·Aᵀ, and Z1 = s·dY·B with dA = Z1ᵀ·X."""
    N, i, o, r = 11, 9, 13, 3
    t = tensors(N, i, o, r)
    s = 1.5
    if variant.stage == "forward":
        base = torch.addmm(t["bias"], t["x"], t["w"].T)
        result = variant.compute(EagerOps(), ForwardOperands(x=t["x"], a=t["a"], b=t["b"], s=s, base=base,
                                                             w_io=t["w"].T, bias=t["bias"]))
    else:
        result = variant.compute(EagerOps(), BackwardOperands(dy=t["dy"], x=t["x"], a=t["a"], b=t["b"], s=s,
                                                              w_io=t["w"].T))
        assert (result.z1 is not None) == (variant.name in NAMES_Z1)
        if result.z1 is not None:
            torch.testing.assert_close(result.z1, s * t["dy"] @ t["b"])
            torch.testing.assert_close(result.grad_a, result.z1.T @ t["x"])
    assert (result.xa is not None) == (variant.name in NAMES_XA)
    if result.xa is not None:
        torch.testing.assert_close(result.xa, t["x"] @ t["a"].T)


# --- the guards ----------------------------------------------------------------------------------------

# A site where every variant is legal; each case below changes some facts.
MERGEABLE = SiteFacts(plain_linear_base=True, adapter_dtype=torch.float32, base_dtype=torch.float32,
                      weight_dtype=torch.float32, dropout=False, adapter_reads_base_input=True,
                      base_used_elsewhere=False, needs_dx=True, dx_sum_found=True)
# changed facts -> (why forward2 is illegal, why backward4/5 are), None: legal
GUARD_CASES = {
    "mergeable": ({}, None, None),
    "base is not a plain linear": ({"plain_linear_base": False, "weight_dtype": None,
                                    "adapter_reads_base_input": False, "dx_sum_found": False},
                                   "not a plain linear", "not a plain linear"),
    "bf16 base, fp32 adapter": ({"base_dtype": torch.bfloat16, "weight_dtype": torch.bfloat16,
                                 "adapter_reads_base_input": False},
                                "merging would round the adapter", "merging would round the adapter"),
    "weight in another dtype": ({"weight_dtype": torch.bfloat16}, "merging would round the adapter", None),
    "fp16": ({"adapter_dtype": torch.float16, "base_dtype": torch.float16, "weight_dtype": torch.float16},
             "fp16", "fp16"),
    "bf16 (fp32's range)": ({"adapter_dtype": torch.bfloat16, "base_dtype": torch.bfloat16,
                              "weight_dtype": torch.bfloat16}, None, None),
    "dropout": ({"dropout": True, "adapter_reads_base_input": False, "dx_sum_found": False},
                "lora_dropout", "lora_dropout"),
    "dropout, no dX": ({"dropout": True, "adapter_reads_base_input": False, "needs_dx": False,
                        "dx_sum_found": False}, "lora_dropout", "lora_dropout"),
    "another input": ({"adapter_reads_base_input": False, "dx_sum_found": False},
                      "not provably the base's input", "dY·W was not found"),
    "base used elsewhere": ({"base_used_elsewhere": True}, "used elsewhere", None),
    "no dX sum": ({"dx_sum_found": False}, None, "dY·W was not found"),
    "no dX": ({"needs_dx": False, "dx_sum_found": False}, None, None),
}


@pytest.mark.parametrize("case", GUARD_CASES)
def test_each_guard_says_where_its_variant_is_illegal(case):
    changes, forward_reason, backward_reason = GUARD_CASES[case]
    facts = dataclasses.replace(MERGEABLE, **changes)
    for variant in FORWARDS + BACKWARDS:
        reason = variant.illegal_reason(facts)
        expected = None if not variant.merges_weight else forward_reason if variant.stage == "forward" \
            else backward_reason
        if expected is None:
            assert reason is None, (variant.name, reason)
        else:
            assert reason is not None and expected in reason, (variant.name, reason)
