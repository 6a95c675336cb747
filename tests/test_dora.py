"""DoRA's variants (lora_rewrite/dora.py) on real tensors: every forward and backward, in every product
form, with and without dropout, against a float64 autograd run of PEFT's DoRA equations; their matmul
FLOPs against torch.utils.flop_counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_rewrite.dora import (DORA_BACKWARDS, DORA_FORWARD1, DORA_FORWARD2, DORA_FORWARDS, DoraBackwardOperands,
                               DoraForwardOperands, peft_dora_gemms)
from lora_rewrite.forms import ROLES
from lora_rewrite.variants import Dims, DxMode, EagerOps, SiteFacts

N, I, O, R, S = 24, 10, 14, 3, 1.75   # N = 3 blocks of 8 rows: dm by the CPU blocked token_sum
ALL_OTHER_FORMS = {role.name: role.forms[1] for role in ROLES}
FORMS = {"direct": {}, "other-forms": ALL_OTHER_FORMS}


def tensors(seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    t = {"x": rand(N, I), "w": rand(O, I) / I ** 0.5, "a": rand(R, I) / I ** 0.5, "b": rand(O, R) * 0.3,
         "m": rand(O).abs() + 0.5, "bias": rand(O) if bias else None, "dy": rand(N, O),
         "mask": (rand(N, I) > 0).to(dtype) * 2.0}
    return t


def peft_dora(t, dropout):
    """PEFT's DoRA forward, as peft/tuners/lora/dora.py writes it, under float64 autograd: Y, and the
    gradients of X, A, B and m for dY."""
    x = t["x"].clone().requires_grad_()
    a, b, m = (t[k].clone().requires_grad_() for k in ("a", "b", "m"))
    w, bias = t["w"], t["bias"]
    lora_weight = (b @ a).detach()
    norm = torch.linalg.norm(w + S * lora_weight, dim=1).detach()
    mns = (m / norm).view(1, -1)
    base = torch.nn.functional.linear(x, w, bias)
    x_lora = x * t["mask"] if dropout else x
    base_result = torch.nn.functional.linear(x_lora, w) if dropout else (base - bias if bias is not None else base)
    y = base + (mns - 1) * base_result + mns * ((x_lora @ a.T) @ b.T) * S
    y.backward(t["dy"])
    return y.detach(), x.grad, a.grad, b.grad, m.grad


def run_dora(forward, backward, t, dropout, forms, trains=True):
    """Our variants on the same tensors: Y, dX (X's whole gradient), dA, dB, dm."""
    ops = EagerOps(forms)
    x_lora = t["x"] * t["mask"] if dropout else t["x"]
    w_io = t["w"].t()
    base_full = torch.nn.functional.linear(t["x"], t["w"], t["bias"])
    dropout_product = x_lora @ w_io if dropout else None
    fwd = forward.compute(ops, DoraForwardOperands(
        x=x_lora, a=t["a"], b=t["b"], s=S, m=t["m"], norm_weight=t["w"], norm_dtype=t["w"].dtype,
        norm_out_dtype=t["w"].dtype, norm_reduce_dtype=t["w"].dtype, w_io=w_io, bias=t["bias"], base_full=base_full,
        dropout_product=dropout_product, trains=trains))
    if backward is None:
        return fwd, None
    bwd = backward.compute(ops, DoraBackwardOperands(
        dy=t["dy"], x=x_lora, a=t["a"], b=t["b"], s=S, norm=fwd.norm, mns=fwd.mns, p=fwd.p, p_scale=fwd.p_scale,
        w_io=w_io,
        dx=DxMode.TOTAL, dropout=dropout))
    grad_x = bwd.grad_x
    if dropout:   # the variant returns X̃'s part; the model adds the base's own dY·W to the masked sum
        grad_x = grad_x * t["mask"] + t["dy"] @ t["w"]
    return fwd, (grad_x, bwd.grad_a, bwd.grad_b, bwd.grad_m)


def close(reference, actual, rtol=1e-10):
    err = (actual - reference).abs().max() / reference.abs().max()
    return float(err) <= rtol


# Merged variants are illegal under dropout (their guards, in test_guards): not paired with it.
CASES = [(f, v, dropout) for f in DORA_FORWARDS for v in DORA_BACKWARDS for dropout in (False, True)
         if not (dropout and (v.merges_weight or f.merges_weight))]


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("forward,backward,dropout", CASES,
                         ids=[f"{f.name}-{v.name}-{'dropout' if d else 'no-dropout'}" for f, v, d in CASES])
def test_every_dora_pair_equals_peft_in_float64(forward, backward, dropout, forms):
    t = tensors()
    y_ref, *grads_ref = peft_dora(t, dropout)
    fwd, grads = run_dora(forward, backward, t, dropout, forms)
    assert close(y_ref, fwd.y)
    for what, ref, ours in zip(("dX", "dA", "dB", "dm"), grads_ref, grads):
        assert close(ref, ours), what


@pytest.mark.parametrize("backward", [DORA_BACKWARDS[0], DORA_BACKWARDS[4]], ids=lambda v: v.name)
def test_the_merged_training_forward_is_exact_where_a_magnitude_is_zero(backward):
    """mns ⊙ P holds nothing of P where m is 0; the merged forward keeps P itself there (k = 1), so Y, dm and
    every other gradient are PEFT's at every row, the zero rows included."""
    t = tensors()
    t["m"][[1, 5]] = 0.0
    y_ref, *grads_ref = peft_dora(t, dropout=False)
    fwd, grads = run_dora(DORA_FORWARD2, backward, t, False, {})
    assert close(y_ref, fwd.y)
    for what, ref, ours in zip(("dX", "dA", "dB", "dm"), grads_ref, grads):
        assert torch.isfinite(ours).all() and close(ref, ours), what
    assert grads_ref[3][[1, 5]].abs().min() > 0   # the zero rows do have a gradient


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_merged_forward_equals_peft_in_float64(bias):
    t = tensors(bias=bias)
    y_ref = peft_dora(t, dropout=False)[0]
    for trains in (False, True):
        fwd, _ = run_dora(DORA_FORWARD2, None, t, False, {}, trains=trains)
        assert close(y_ref, fwd.y)


def test_the_norm_is_peft_s_and_built_without_an_identity():
    t = tensors()
    ops = EagerOps()
    with FlopCounterMode(display=False) as counter:
        fwd = DORA_FORWARD2.compute(ops, DoraForwardOperands(
            x=t["x"], a=t["a"], b=t["b"], s=S, m=t["m"], norm_weight=t["w"], norm_dtype=t["w"].dtype,
            norm_out_dtype=t["w"].dtype, norm_reduce_dtype=t["w"].dtype, w_io=t["w"].t(), bias=t["bias"]))   # inference
    expected = torch.linalg.norm(t["w"] + S * t["b"] @ t["a"], dim=1)
    assert close(expected, fwd.norm)
    assert counter.get_total_flops() == DORA_FORWARD2.flops(Dims(N, I, O, R, needs_dx=False))


def merged_facts(**changes):
    import dataclasses

    facts = SiteFacts(plain_linear_base=True, adapter_dtype=torch.float32, base_dtype=torch.float32,
                      weight_dtype=torch.float32, dropout=False, adapter_reads_base_input=True,
                      base_used_elsewhere=False, needs_dx=True, dx_sum_found=True)
    return dataclasses.replace(facts, **changes)


def test_guards():
    assert DORA_FORWARD1.illegal_reason(merged_facts(dropout=True)) is None
    assert DORA_FORWARD2.illegal_reason(merged_facts()) is None
    assert "lora_dropout" in DORA_FORWARD2.illegal_reason(merged_facts(dropout=True, adapter_reads_base_input=False))
    assert "fp16" in DORA_FORWARD2.illegal_reason(merged_facts(adapter_dtype=torch.float16, base_dtype=torch.float16,
                                                                weight_dtype=torch.float16))
    for variant in DORA_FORWARDS + DORA_BACKWARDS:
        reason = variant.illegal_reason(merged_facts(dropout=True))
        assert (reason is not None) == variant.merges_weight, variant.name


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("variant", DORA_FORWARDS + DORA_BACKWARDS, ids=lambda v: v.name)
def test_flop_formulas_match_flop_counter(variant, forms):
    t = tensors(dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        if variant.stage == "forward":
            run_dora(variant, None, t, False, forms)
        else:
            run_dora(DORA_FORWARD1, variant, t, False, forms)
    dims = Dims(N, I, O, R, needs_dx=True)
    expected = variant.flops(dims) if variant.stage == "forward" else DORA_FORWARD1.flops(dims) + variant.flops(dims)
    base_for_reference = 2 * N * I * O   # run_dora builds the model's own base result (base_full) too
    assert counter.get_total_flops() == expected + base_for_reference


def test_peft_s_own_products_are_what_the_report_counts_before():
    """The report's "before" for a DoRA site (PEFT under autograd, eye trick included) counted against
    flop_counter on PEFT's real DoRA layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(I, O)),
                           LoraConfig(r=R, lora_alpha=2 * R, target_modules=["0"], use_dora=True))
    x = torch.randn(N, I, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert counter.get_total_flops() == sum(g.flops() for g in peft_dora_gemms(Dims(N, I, O, R), False, True))


@pytest.mark.parametrize("n,blocks", [(96, [3, 32]), (40, [5, 8]), (12, None), (1, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_sum_sums_in_row_blocks_on_a_cpu_accumulating_in_fp32(n, blocks, dtype):
    """dm's Σₙ (lora_rewrite/dora.py token_sum): in blocks of the first of 32/16/8 rows that divides N,
    else the plain sum; equal to the float64 sum within one rounding of the result's dtype (a 16-bit
    e is summed in fp32 and rounded once); and on another device (meta: shapes only) the plain sum."""
    from lora_rewrite.dora import token_sum

    class Recording(EagerOps):
        def __init__(self):
            super().__init__()
            self.reshapes = []

        def reshape(self, a, shape_args):
            self.reshapes.append(list(shape_args[:2]))
            return super().reshape(a, shape_args)

    e = torch.randn(n, 37, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ops = Recording()
    total = token_sum(ops, e.to(dtype))
    assert total.dtype == dtype and total.shape == (37,)
    assert ops.reshapes == ([blocks] if blocks else [])
    exact = e.to(dtype).double().sum(0)
    rounding_once = torch.finfo(dtype).eps / 2 * exact.abs() + 1e-6 * e.to(dtype).double().abs().sum(0)
    assert bool(((total.double() - exact).abs() <= rounding_once).all())
    meta = Recording()
    assert token_sum(meta, torch.empty(96, 37, device="meta")).shape == (37,) and meta.reshapes == []


BASE_ONLY_CASES = [(v, dropout) for v in DORA_BACKWARDS if not v.merges_weight for dropout in (False, True)]


@pytest.mark.parametrize("backward,dropout", BASE_ONLY_CASES,
                         ids=[f"{v.name}-{'dropout' if d else 'no-dropout'}" for v, d in BASE_ONLY_CASES])
def test_dm_from_the_base_alone_and_db_equals_peft_in_float64(backward, dropout):
    """p_is_base (a 16-bit base under a wider sum keeps only X̃·Wᵀ):
    dm = (Σₙ dY ⊙ X̃·Wᵀ + rowsum(dB° ⊙ B)) / ‖W′‖ equals PEFT's Σₙ dY ⊙ P / ‖W′‖, in every unmerged
    backward, with and without dropout."""
    t = tensors()
    *_, dm_ref = peft_dora(t, dropout)
    fwd, _ = run_dora(DORA_FORWARDS[0], None, t, dropout, FORMS["direct"])
    x_lora = t["x"] * t["mask"] if dropout else t["x"]
    base = x_lora @ t["w"].t()
    bwd = backward.compute(EagerOps(FORMS["direct"]), DoraBackwardOperands(
        dy=t["dy"], x=x_lora, a=t["a"], b=t["b"], s=S, norm=fwd.norm, mns=fwd.mns, p=base, w_io=t["w"].t(),
        dx=DxMode.TOTAL, dropout=dropout, p_is_base=True))
    assert close(dm_ref, bwd.grad_m)
    without = backward.compute(EagerOps(FORMS["direct"]), DoraBackwardOperands(
        dy=t["dy"], x=x_lora, a=t["a"], b=t["b"], s=S, norm=fwd.norm, mns=fwd.mns, p=base, w_io=t["w"].t(),
        dx=DxMode.TOTAL, dropout=dropout))
    assert not close(dm_ref, without.grad_m)   # the adapter's part is really there
