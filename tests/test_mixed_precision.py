"""The precisions people train LoRA in, end to end through runlora: fp16 autocast with a GradScaler (the T4
recipe, `Trainer(fp16=True)`), whose skipped steps must still be skipped, and an fp16 model with PEFT's
default fp32 adapters at scales where fp16's range (±65504) matters.

Each test compares runlora with eager PEFT (and float64 where the claim is about error), rewriting without
Inductor code generation (tests/helpers.runlora); which sites were rewritten is read from the reports.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lora_rewrite import debug
from tests.helpers import Autocast, assert_close_to, float64_reference, peft_linear, runlora, step

pytestmark = pytest.mark.filterwarnings("ignore:.*GradScaler.*:UserWarning")


def _trainable(model):
    return {n.removeprefix("_orig_mod.").removeprefix("inner."): p for n, p in model.named_parameters() if p.requires_grad}


def _scaled_sgd_steps(model, x, probe, *, init_scale, steps):
    """`steps` GradScaler steps of SGD (not AdamW: SGD's update is proportional to the gradient, so a gradient
    off by a constant factor shows). Returns the trained parameters, the scale after the last step and the
    unscaled gradients of the last step."""
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x).float() * probe).sum()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = {n: p.grad.detach().clone() for n, p in _trainable(model).items()}
        scaler.step(optimizer)
        scaler.update()
    return {n: p.detach().clone() for n, p in _trainable(model).items()}, scaler.get_scale(), grads


@pytest.mark.parametrize("overflow", [False, True], ids=["finite", "overflow"])
def test_fp16_autocast_with_grad_scaler(overflow):
    """fp32 model and adapters under torch.autocast(float16) with a GradScaler: every site is rewritten (in
    fp16, the merged variants illegal there), and runlora trains exactly the steps eager PEFT trains. With a
    scale of 2¹⁰⁰ the fp16 gradients overflow: the scaler finds the inf in runlora's rewritten backward as
    in eager's, skips the step (every parameter unchanged, bit for bit) and halves the scale. With a scale
    of 2⁸ three steps are taken, each parameter moved and equal to eager's within fp16's rounding."""
    model = peft_linear(32, 48, 4, alpha=16, bias_trainable=True)
    x = torch.randn(4, 8, 32)
    probe = torch.randn(4, 8, 48)
    initial = {n: p.detach().clone() for n, p in _trainable(model).items()}
    init_scale, steps = (2.0 ** 100, 1) if overflow else (2.0 ** 8, 3)

    eager_model = Autocast(copy.deepcopy(model), torch.float16)
    want, want_scale, want_grads = _scaled_sgd_steps(eager_model, x, probe, init_scale=init_scale, steps=steps)
    with debug.collect_reports() as reports:
        compiled = runlora(Autocast(copy.deepcopy(model), torch.float16))
        got, got_scale, got_grads = _scaled_sgd_steps(compiled, x, probe, init_scale=init_scale, steps=steps)

    site_reports = [s for r in reports for s in r.sites]
    assert len(site_reports) == 1 and site_reports[0].backward is not None
    assert site_reports[0].dtype == "float16" and site_reports[0].forward == "forward1"
    assert got_scale == want_scale
    assert len(got) == len(initial) == 3   # A, B and the trainable bias
    if overflow:
        assert want_scale == init_scale / 2
        assert any(not torch.isfinite(g).all() for g in got_grads.values())
        for name, value in got.items():
            assert torch.equal(value, initial[name]) and torch.equal(want[name], initial[name]), name
    else:
        assert want_scale == init_scale
        for name in want:
            assert torch.isfinite(got_grads[name]).all(), name
            assert_close_to(want_grads[name], got_grads[name], rtol=1e-2, what=f"last step's grad {name}")
            assert_close_to(want[name], got[name], rtol=1e-2, what=name)
            assert not torch.equal(got[name], initial[name]), f"{name} did not move"


@pytest.mark.parametrize("alpha,adapter_std,x_std", [(8192, 20.0, 1e-4), (4e-3, 0.3, 1.0), (8, 1e3, 1e-3)],
                         ids=["large-scale", "tiny-scale", "large-factors"])
def test_fp16_model_with_fp32_adapters_at_range_edges(alpha, adapter_std, x_std):
    """An fp16 model with PEFT's default fp32 adapters, at scales where fp16's range matters: s = 2048 with
    large factors and tiny inputs (s·B·A far past 65504, the adapter's output not), s = 10⁻³, and factors of
    10³. runlora keeps the adapter in fp32 (no merged weight: a dtype split), and its output and every
    gradient are finite wherever eager's are, and at eager's error against float64 or better."""
    model = peft_linear(16, 24, 4, alpha=alpha, bias_trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * adapter_std)
    model.base_model.model.proj.base_layer.half()   # the fp16 model, its adapters left in fp32 as PEFT's default
    x = (torch.randn(2, 16, 16) * x_std).half().requires_grad_()
    probe = torch.randn(2, 16, 24).half()

    reference = float64_reference(model, x, probe)
    eager = step(model, x, probe)
    with debug.collect_reports() as reports:
        ours = step(runlora(model), x, probe)
    (site,) = [s for r in reports for s in r.sites]
    assert site.backward is not None and (site.forward, site.backward) == ("forward1", "backward1")
    assert site.dtype == "float32"

    def error(ref, value):
        return float((value.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300))

    (y64, dx64, g64), (y_e, dx_e, g_e), (y_o, dx_o, g_o) = reference, eager, ours
    pairs = [("Y", y64, y_e, y_o), ("dX", dx64, dx_e, dx_o)] + [(n, g64[n], g_e[n], g_o[n]) for n in g64]
    assert len(pairs) == 5   # Y, dX, A, B, bias
    for what, ref, eager_value, our_value in pairs:
        assert torch.isfinite(ref).all(), what
        if torch.isfinite(eager_value).all():
            assert torch.isfinite(our_value).all(), what
            assert error(ref, our_value) <= error(ref, eager_value) * 1.5 + 1e-3, what
