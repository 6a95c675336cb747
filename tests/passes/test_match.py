"""Matching on real PEFT models: every ATen form of a LoRA site is found and rewritten with gradients
equal to eager PEFT; every case the pass must not touch is left alone and still equals eager."""

import pytest
import torch
import torch.nn as nn

from helpers import Autocast, OneLinear, assert_close_to, peft_linear, randomize_adapters, runlora, runlora_counters, step
from lora_rewrite import debug


def compare_with_eager(model, x, *, rtol=2e-6, compile_kwargs=None, call_kwargs=None, **options):
    """Run eager PEFT and runlora on the same input; assert equal outputs and gradients; return the
    reports of the compiled graphs."""
    torch.manual_seed(7)
    y_ref, dx_ref, g_ref = step(model, x, **(call_kwargs or {}))
    with debug.collect_reports() as reports:
        compiled = torch.compile(model, backend="runlora", options={"codegen": False, **options},
                                 **(compile_kwargs or {}))
        torch.manual_seed(7)
        y, dx, g = step(compiled, x, **(call_kwargs or {}))
    assert_close_to(y_ref, y, rtol=rtol, what="output")
    if dx_ref is not None:
        assert_close_to(dx_ref, dx, rtol=rtol, what="input grad")
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_close_to(g_ref[name], g[name], rtol=rtol, what=name)
    return reports


def sites(reports):
    return [s for r in reports for s in r.sites]


def skipped(reports):
    return [s for r in reports for s in r.skipped]


# --- forms that must be rewritten ------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(11,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["addmm", "mm"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "first-layer"])
def test_layouts_bias_and_input_grad(lead, bias, x_grad):
    model = peft_linear(20, 28, 4, bias=bias)
    reports = compare_with_eager(model, torch.randn(*lead, 20, requires_grad=x_grad))
    (site,) = sites(reports)
    assert site.backward is not None and site.needs_dx == x_grad
    assert site.module == "base_model.model.proj"


@pytest.mark.parametrize("alpha,rslora,expected_scale", [(8, False, 2.0), (4, False, 1.0), (2.9, False, 0.725),
                                                         (8, True, 4.0)])
def test_any_scale_and_rslora(alpha, rslora, expected_scale):
    model = peft_linear(16, 24, 4, alpha=alpha, rslora=rslora)
    reports = compare_with_eager(model, torch.randn(2, 3, 16, requires_grad=True))
    (site,) = sites(reports)
    assert site.scale == pytest.approx(expected_scale)
    assert site.backward is not None


def test_lora_dropout_is_rewritten_without_merging():
    model = peft_linear(16, 24, 4, dropout=0.3)
    # fallback_random: Inductor draws dropout masks with eager's RNG, so eager and compiled agree.
    reports = compare_with_eager(model, torch.randn(2, 6, 16, requires_grad=True), fallback_random=True,
                                 forward="forward2", backward="backward5")
    (site,) = sites(reports)
    assert site.dropout and (site.forward, site.backward) == ("forward1", "backward1")
    assert site.dx_mode == "lora"


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_model_with_peft_default_fp32_adapters(half):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(OneLinear(16, 24).to(half), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    randomize_adapters(model)
    assert model.base_model.model.proj.lora_A["default"].weight.dtype == torch.float32  # PEFT's upcast
    reports = compare_with_eager(model, torch.randn(2, 5, 16, dtype=half, requires_grad=True),
                                 rtol=1e-2, forward="forward2", backward="backward5")
    (site,) = sites(reports)
    assert site.dtype == "float32" and (site.forward, site.backward) == ("forward1", "backward1")
    assert any("merging would round the adapter" in n for n in site.notes)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_adapters(half):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(OneLinear(16, 24).to(half), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]),
                           autocast_adapter_dtype=False)
    randomize_adapters(model)
    model.to(half)
    x = torch.randn(2, 5, 16, dtype=half, requires_grad=True)
    for forward, backward in (("forward1", "backward1"), ("forward2", "backward5")):
        torch._dynamo.reset()
        reports = compare_with_eager(model, x, rtol=2e-2, forward=forward, backward=backward)
        (site,) = sites(reports)
        assert site.dtype == str(half).replace("torch.", "") and (site.forward, site.backward) == (forward, backward)


def test_autocast_on_an_fp32_model():
    model = peft_linear(16, 24, 4)
    x = torch.randn(2, 5, 16, requires_grad=True)

    for forward, backward in (("forward1", "backward1"), ("forward2", "backward5")):
        torch._dynamo.reset()
        reports = compare_with_eager(Autocast(model), x, rtol=2e-2, forward=forward, backward=backward)
        (site,) = sites(reports)
        assert site.dtype == "bfloat16" and (site.forward, site.backward) == (forward, backward)


def test_symbolic_token_count_and_tensor_scale():
    model = peft_linear(16, 24, 4)
    reports = compare_with_eager(model, torch.randn(3, 7, 16, requires_grad=True), compile_kwargs={"dynamic": True},
                                 forward="forward2", backward="backward5")
    (site,) = sites(reports)
    assert not isinstance(site.N, int) and site.N_used == 21
    assert str(site.scale).startswith("tensor")  # dynamic=True makes the float scale a graph input
    assert (site.forward, site.backward) == ("forward2", "backward5")


def test_inference_graph_gets_the_forward_rewrite():
    model = peft_linear(16, 24, 4)
    x = torch.randn(4, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with debug.collect_reports() as reports:
            got = runlora(model)(x)
    assert_close_to(ref, got, rtol=2e-6)
    (report,) = reports
    assert report.kind == "inference"
    (site,) = report.sites
    assert site.forward == "forward2" and site.backward is None  # N = 64 > i·o/(i+o) = 9.6


def test_several_active_adapters():
    from peft import LoraConfig

    model = peft_linear(16, 24, 4)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["proj"]))
    model.base_model.set_adapter(["default", "second"])
    randomize_adapters(model)
    reports = compare_with_eager(model, torch.randn(2, 5, 16, requires_grad=True))
    assert sorted(s.adapter for s in sites(reports)) == ["default", "second"]


def test_gpt2_conv1d_base_layer():
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(36, 12)  # weight stored (in, out)

        def forward(self, x):
            return self.c_attn(x)

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize_adapters(model)
    for forward, backward in (("forward1", "backward1"), ("forward2", "backward5")):
        torch._dynamo.reset()
        reports = compare_with_eager(model, torch.randn(2, 5, 12, requires_grad=True), forward=forward, backward=backward)
        (site,) = sites(reports)
        assert (site.i, site.o) == (12, 36) and (site.forward, site.backward) == (forward, backward)


# --- cases that must be left untouched ----------------------------------------------------------------

def test_dora_is_left_untouched():
    model = peft_linear(16, 24, 4, use_dora=True)
    reports = compare_with_eager(model, torch.randn(2, 5, 16, requires_grad=True))
    assert sites(reports) == []
    assert runlora_counters()["sites_rewritten"] == 0


def test_merged_adapter_is_left_untouched():
    model = peft_linear(16, 24, 4)
    model.merge_adapter()
    reports = compare_with_eager(model, torch.randn(2, 5, 16, requires_grad=True))
    assert sites(reports) == [] and skipped(reports) == []


def test_disabled_adapter_is_left_untouched():
    model = peft_linear(16, 24, 4)

    class Disabled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with self.inner.disable_adapter():
                return self.inner(x)

    reports = compare_with_eager(Disabled(model), torch.randn(2, 5, 16, requires_grad=True))
    assert sites(reports) == []


def test_mixed_batch_adapter_names_are_left_untouched():
    from peft import LoraConfig

    model = peft_linear(16, 24, 4)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    randomize_adapters(model)
    model.eval()
    x = torch.randn(3, 5, 16)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        ref = model(x, adapter_names=names)
        with debug.collect_reports() as reports:
            got = runlora(model)(x, adapter_names=names)
    assert_close_to(ref, got, rtol=2e-6)
    assert sites(reports) == []


def test_lora_bias_is_left_untouched_with_its_reason():
    model = peft_linear(16, 24, 4, lora_bias=True)
    reports = compare_with_eager(model, torch.randn(2, 5, 16, requires_grad=True))
    assert sites(reports) == []
    (skip,) = skipped(reports)
    assert "lora_bias" in skip.reason


def test_quantized_base_is_left_untouched():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(32, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")

    class Quantized(nn.Module):
        is_loaded_in_4bit = True  # what transformers sets on a model loaded in 4 bit; PEFT dispatches on it

        def __init__(self):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Quantized(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    assert type(model.base_model.model.proj).__module__ == "peft.tuners.lora.bnb"
    randomize_adapters(model)
    reports = compare_with_eager(model, torch.randn(2, 5, 32, requires_grad=True))
    assert sites(reports) == []
    (skip,) = skipped(reports)
    assert "not a plain linear" in skip.reason


def test_plain_linears_without_lora_are_left_untouched():
    class TwoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Linear(16, 4, bias=False)   # a low-rank chain that is not an adapter
            self.up = nn.Linear(4, 16, bias=False)
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x) + self.up(self.down(x)).relu()

    model = TwoLinears()
    reports = compare_with_eager(model, torch.randn(2, 5, 16, requires_grad=True))
    assert sites(reports) == []
    assert all("not added to a base result" in s.reason for s in skipped(reports))


def test_the_module_is_never_changed():
    """The rewrite changes graphs, never the module: PEFT's parameters, names and flags stay as they are
    (so LoRA+ optimizers, state dicts and adapter saving keep working)."""
    model = peft_linear(16, 24, 4)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    compare_with_eager(model, torch.randn(2, 3, 16, requires_grad=True))
    after = {n: (p.detach(), p.requires_grad) for n, p in model.named_parameters()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n][0], after[n][0]) and before[n][1] == after[n][1] for n in before)
    assert modules_before == [(n, type(m)) for n, m in model.named_modules()]
