"""The matcher (passes/match.py).

First `match_site` itself, on small joint graphs of plain functions (AOTAutograd's joint graph with
Inductor's decompositions and joint passes, as the pass receives it): what it finds, the facts it
records, and the reason it gives for each form it does not cover. Then real PEFT models: every ATen
form of a LoRA site is found and rewritten with gradients equal to eager PEFT; every case the pass must
not touch is left alone and still equals eager."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import (Autocast, OneLinear, assert_close_to, float64_reference, joint_graph, peft_linear,
                     randomize_adapters, runlora, step)
from lora_rewrite import debug
from lora_rewrite.passes.match import match_graph, match_site
from lora_rewrite.passes.provenance import UNKNOWN_MODULE
from lora_rewrite.passes.site import NoMatch
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims, DxMode, SiteFacts

I, O, R = 16, 24, 4


def lora_linear(x, w, bias, a, b, s=2.0):
    """PEFT's LoRA Linear forward: base_layer(x) + lora_B(lora_A(dropout(x))) * scaling (no dropout)."""
    return F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * s


def primals(*, lead=(2, 5), bias=True, x_grad=True, adapter_grad=True, dtype=torch.float32):
    """X, W, bias (or None), A, B for lora_linear."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=False, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_(grad)

    return [t(*lead, I, grad=x_grad), t(O, I), t(O) if bias else None,
            t(R, I, grad=adapter_grad, dt=torch.float32 if dtype == torch.bfloat16 else dtype),
            t(O, R, grad=adapter_grad, dt=torch.float32 if dtype == torch.bfloat16 else dtype)]


def the_site(forward, *inputs):
    """match_site on the one anchor of forward's joint graph."""
    gm = joint_graph(forward, *inputs)
    anchors, backward = match_graph(gm.graph)
    (anchor,) = anchors
    return match_site(anchor, backward)


def no_match_reason(forward, *inputs) -> str:
    with pytest.raises(NoMatch) as no_match:
        the_site(forward, *inputs)
    return str(no_match.value)


def illegal(site) -> dict:
    """{variant name: why it is illegal} at the site."""
    return {v.name: v.illegal_reason(site.facts) for v in FORWARDS + BACKWARDS if v.illegal_reason(site.facts)}


# --- match_site on joint graphs ---------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(10,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["addmm", "mm"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "first-layer"])
def test_a_lora_linear_and_its_gradients_are_one_site(lead, bias, x_grad):
    x, w, b0, a, b = primals(lead=lead, bias=bias, x_grad=x_grad)
    forward = (lambda x, w, b0, a, b: lora_linear(x, w, b0, a, b)) if bias else \
        (lambda x, w, a, b: lora_linear(x, w, None, a, b))
    site = the_site(forward, *([x, w, b0, a, b] if bias else [x, w, a, b]))

    assert site.dims == Dims(10, I, O, R, needs_dx=x_grad)
    assert site.forward.scale == 2.0 and site.forward.base_product.name == "linear"
    assert site.kind.name == "lora" and site.extra is None
    assert (site.forward.base_product.bias is not None) == bias
    assert site.backward is not None and site.backward_note == ""
    assert site.backward.dx_mode is (DxMode.TOTAL if x_grad else None)
    assert site.facts == SiteFacts(plain_linear_base=True, adapter_dtype=torch.float32, base_dtype=torch.float32,
                                   weight_dtype=torch.float32, dropout=False, adapter_reads_base_input=True,
                                   base_used_elsewhere=False, needs_dx=x_grad, dx_sum_found=x_grad)
    assert illegal(site) == {}
    assert site.provenance.path == UNKNOWN_MODULE  # a plain function: no module on the node
    assert site.anchor in site.nodes() and site.forward.out in site.nodes()


def test_an_inference_graph_gives_a_site_without_backward():
    site = the_site(lora_linear, *primals(x_grad=False, adapter_grad=False))
    assert site.backward is None and site.backward_note == ""
    assert not site.dims.needs_dx


def test_frozen_adapter_weights_give_no_backward_and_say_why():
    site = the_site(lora_linear, *primals(adapter_grad=False))
    assert site.backward is None
    assert site.backward_note == "no gradient for the adapter weights in this graph"


def test_a_tensor_scale_is_matched_as_a_graph_input():
    def scaled_by_tensor(x, w, b0, a, b, s):
        return lora_linear(x, w, b0, a, b, s=s)

    site = the_site(scaled_by_tensor, *primals(), torch.tensor(2.0))
    assert isinstance(site.forward.scale, torch.fx.Node) and site.backward is not None


def test_dropout_is_a_fact_and_makes_the_merged_variants_illegal():
    def with_dropout(x, w, b0, a, b):
        return F.linear(x, w, b0) + F.linear(F.linear(F.dropout(x, 0.3), a), b) * 2.0

    site = the_site(with_dropout, *primals())
    assert site.facts.dropout and not site.facts.adapter_reads_base_input
    assert site.backward.dx_mode is DxMode.LORA  # the mask sits between dX_a and the sum
    assert illegal(site).keys() == {"forward2", "backward4", "backward5"}
    assert all("lora_dropout" in reason for reason in illegal(site).values())


def test_fp32_adapter_on_a_bf16_base_keeps_the_dtypes_apart():
    """PEFT's default: the adapter casts X up to its own fp32 and the sum is fp32."""
    def fp32_adapter(x, w, b0, a, b):
        return F.linear(x, w, b0) + F.linear(F.linear(x.float(), a), b) * 2.0

    site = the_site(fp32_adapter, *primals(dtype=torch.bfloat16))
    assert (site.facts.adapter_dtype, site.facts.base_dtype) == (torch.float32, torch.bfloat16)
    assert illegal(site).keys() == {"forward2", "backward4", "backward5"}
    assert all("merging would round the adapter" in reason for reason in illegal(site).values())


def test_a_base_result_used_elsewhere_is_a_fact():
    def base_reused(x, w, b0, a, b):
        base = F.linear(x, w, b0)
        return base + F.linear(F.linear(x, a), b) * 2.0, base.relu()

    site = the_site(base_reused, *primals())
    assert site.facts.base_used_elsewhere
    assert "used elsewhere" in illegal(site)["forward2"]


def test_an_adapter_on_another_input_than_the_base():
    def other_input(x, x2, w, b0, a, b):
        return F.linear(x, w, b0) + F.linear(F.linear(x2, a), b) * 2.0

    x, w, b0, a, b = primals()
    site = the_site(other_input, x, x.detach().clone().requires_grad_(True), w, b0, a, b)
    assert not site.facts.adapter_reads_base_input and not site.facts.dx_sum_found
    assert site.backward.dx_mode is DxMode.LORA
    assert illegal(site) == {"forward2": "the adapter's input is not provably the base's input",
                             "backward4": "the base layer's input gradient dY·W was not found in the same sum "
                                          "as the adapter's",
                             "backward5": "the base layer's input gradient dY·W was not found in the same sum "
                                          "as the adapter's"}


# Inputs in a layout a matmul cannot view as [N,i] (with 16 features): (the shape before the view, the view).
# nD: the base (W needs no gradient) stays batched, bmm(X, Wᵀ broadcast), while the adapter (A needs one)
# reads a [N,i] copy or view of the same rows. 2-D: autograd computes dX in the input's transposed layout.
NON_CONTIGUOUS_INPUTS = {
    "transposed": ((4, 6, 16), lambda x: x.transpose(0, 1)),
    "transposed-4d": ((2, 3, 4, 16), lambda x: x.transpose(1, 2)),
    "transposed-2d": ((16, 6), lambda x: x.t()),
    "strided": ((4, 6, 16), lambda x: x[:, ::2]),
    "expanded": ((4, 6, 16), lambda x: x[:, :1].expand(-1, 5, -1)),
}


@pytest.mark.parametrize("shape,view", NON_CONTIGUOUS_INPUTS.values(), ids=NON_CONTIGUOUS_INPUTS.keys())
def test_a_linear_on_a_non_contiguous_input_is_one_site(shape, view):
    def on_view(x, w, b0, a, b):
        return lora_linear(view(x), w, b0, a, b)

    _, w, b0, a, b = primals()
    site = the_site(on_view, torch.randn(shape, requires_grad=True), w, b0, a, b)
    batched = len(shape) > 2
    base = site.forward.base_product
    assert base.name == "linear" and base.bias is not None
    assert (base.node.target is torch.ops.aten.bmm.default) == batched
    assert site.facts.adapter_reads_base_input and not site.facts.base_used_elsewhere
    assert site.backward is not None and site.backward.dx_mode is DxMode.TOTAL
    assert illegal(site) == {}


def test_a_batched_product_of_a_computed_weight_is_no_linear_base():
    def computed_weight(x, w, b0, a, b):
        x = x.transpose(0, 1)
        return x @ (2 * w).t() + b0 + F.linear(F.linear(x, a), b) * 2.0

    _, w, b0, a, b = primals()
    assert "not a plain linear" in no_match_reason(computed_weight, torch.randn(4, 6, I, requires_grad=True),
                                                   w, b0, a, b)


def test_a_single_token_backward_is_matched_through_broadcast_products():
    """N = 1: Inductor writes dB = gᵀ·(X·Aᵀ) and dA = Z1ᵀ·X, products over N, as P[m,1]·Q[1,n] broadcasts."""
    site = the_site(lora_linear, *primals(lead=(1, 1)))
    assert site.dims.N == 1 and site.backward is not None and site.backward_note == ""
    assert {site.backward.grad_a.target, site.backward.grad_b.target} == {torch.ops.aten.mul.Tensor}
    assert site.backward.dx_mode is DxMode.TOTAL


def test_lora_b_with_a_bias_is_no_match():
    def lora_bias(x, w, b0, a, b, b_bias):
        return F.linear(x, w, b0) + F.linear(F.linear(x, a), b, b_bias) * 2.0

    assert "lora_bias" in no_match_reason(lora_bias, *primals(), torch.randn(O, requires_grad=True))


def test_a_tensor_that_rescales_the_adapter_output_before_its_sum_is_no_match():
    """DoRA's shape (the adapter's output times an [o] vector before the sum) but not DoRA's algebra: the
    vector is no norm of this adapter's weights, so the graph proves no DoRA site (passes/kinds.py), and as
    plain LoRA the scaled term is not s·(X·Aᵀ)·Bᵀ: left untouched, and the reason says so."""
    def rescaled(x, w, b0, a, b, magnitude):
        return F.linear(x, w, b0) + F.linear(F.linear(x, a), b) * magnitude

    gm = joint_graph(rescaled, *primals(), torch.randn(O))
    (anchor,), backward = match_graph(gm.graph)
    from lora_rewrite.passes.kinds import kind_at

    assert kind_at(anchor, backward).name == "lora"
    reason = no_match_reason(rescaled, *primals(), torch.randn(O))
    assert "multiplied by a tensor that is not a scalar" in reason and "not DoRA's magnitude" in reason


def test_an_adapter_output_not_added_to_a_base_is_no_match():
    def not_added(x, w, b0, a, b):
        return F.linear(x, w, b0) + F.linear(F.linear(x, a), b).relu()

    assert "not added to a base result" in no_match_reason(not_added, *primals())


# --- real PEFT models ---------------------------------------------------------------------------


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
        assert site.dtype == str(half).replace("torch.", "")
        if half == torch.float16 and forward == "forward2":   # fp16's range cannot hold every W + s·B·A
            assert (site.forward, site.backward) == ("forward1", "backward1")
            assert any("fp16" in n and "forced forward2 is illegal" in n for n in site.notes)
        else:
            assert (site.forward, site.backward) == (forward, backward)


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


class ViewedInput(nn.Module):
    """The PEFT model called on a view of the compiled module's input."""

    def __init__(self, inner, view):
        super().__init__()
        self.inner, self.view = inner, view

    def forward(self, x):
        return self.inner(self.view(x))


def compare_with_float64(model, x, **options):
    """runlora's output and gradients against float64 eager (to float32 round-off); the reports."""
    y_like = model(x)
    grad_out = torch.randn(y_like.shape)
    y64, dx64, g64 = float64_reference(model, x, grad_out)
    with debug.collect_reports() as reports:
        y, dx, g = step(runlora(model, **options), x, grad_out)
    assert_close_to(y64, y, rtol=2e-6, what="Y")
    assert_close_to(dx64, dx, rtol=2e-6, what="dX")
    assert g.keys() == g64.keys()
    for name in g64:
        assert_close_to(g64[name], g[name], rtol=2e-6, what=name)
    return reports


@pytest.mark.parametrize("forward,backward", [("forward1", "backward1"), ("forward2", "backward5")])
@pytest.mark.parametrize("shape,view", NON_CONTIGUOUS_INPUTS.values(), ids=NON_CONTIGUOUS_INPUTS.keys())
def test_a_non_contiguous_input_is_rewritten(shape, view, forward, backward):
    model = ViewedInput(peft_linear(16, 24, 4), view)
    reports = compare_with_float64(model, torch.randn(shape, requires_grad=True), forward=forward,
                                   backward=backward)
    (site,) = sites(reports)
    assert skipped(reports) == [] and (site.forward, site.backward) == (forward, backward)
    assert site.dx_mode == "total"


def test_a_transposed_tensor_passed_in_is_rewritten():
    model = peft_linear(16, 24, 4)
    x = torch.randn(6, 4, 16).transpose(0, 1).requires_grad_(True)
    reports = compare_with_float64(model, x, forward="forward2", backward="backward5")
    (site,) = sites(reports)
    assert (site.forward, site.backward, site.dx_mode) == ("forward2", "backward5", "total")


@pytest.mark.parametrize("forward,backward", [("forward1", "backward1"), ("forward2", "backward5")])
@pytest.mark.parametrize("lead", [(1,), (1, 1)], ids=["2d", "3d"])
def test_a_single_token_gets_the_backward_rewrite(lead, forward, backward):
    reports = compare_with_float64(peft_linear(16, 24, 4), torch.randn(*lead, 16, requires_grad=True),
                                   forward=forward, backward=backward)
    (site,) = sites(reports)
    assert site.N == 1 and (site.forward, site.backward) == (forward, backward) and site.notes == []


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


def test_a_4bit_base_is_matched_with_its_facts_and_rewritten_unmerged():
    """A bitsandbytes 4-bit base (passes/base_4bit.py): matched, no plain linear in its facts (so
    the merged variants are illegal, said in the notes), rewritten forward and backward, = eager."""
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
    (site,) = sites(reports)
    assert skipped(reports) == [] and site.forward == "forward1" and site.backward in ("backward1", "backward2",
                                                                                         "backward3")
    assert any("merged forward variants illegal" in n and "quantized base" in n for n in site.notes)


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
    (chain,) = skipped(reports)   # the chain is found, and left untouched with the reason
    assert "not added to a base result" in chain.reason


def test_the_module_is_never_changed():
    """The rewrite changes graphs, never the module: PEFT's parameters, names and flags stay as they are
    (so LoRA+ optimizers, state dicts and adapter saving keep working)."""
    model = peft_linear(16, 24, 4)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    compare_with_eager(model, torch.randn(2, 3, 16, requires_grad=True))
    after = {n: (p.detach(), p.requires_grad) for n, p in model.named_parameters()}
    assert before.keys() == after.keys() and len(before) == 4   # W, its bias, A and B
    assert all(torch.equal(before[n][0], after[n][0]) and before[n][1] == after[n][1] for n in before)
    assert modules_before == [(n, type(m)) for n, m in model.named_modules()]
