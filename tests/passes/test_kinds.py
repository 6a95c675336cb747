"""The kinds of site (passes/kind.py, passes/kinds.py): a kind is what the graph proves, never a look-alike, and
a new kind plugs in from outside passes/ with no edit to any stage of the pass."""

import pytest
import torch
import torch.nn as nn

from helpers import assert_close_to, randomize_adapters, step
from lora_rewrite import debug
from lora_rewrite.forms import GRAD_B, Z2, product
from lora_rewrite.passes import kinds
from lora_rewrite.passes.fx import is_call, transpose_source, weight_source
from lora_rewrite.passes.kind import SiteKind
from lora_rewrite.passes.kind_lora import (lora_backward_operands, lora_facts, lora_forward_operands,
                                           match_forward, match_lora_backward, peft_lora_gemms)
from lora_rewrite.passes.provenance import provenance_of
from lora_rewrite.passes.site import NoMatch, Site
from lora_rewrite.variants import FORWARDS, BackwardResult, Dims, DxMode, Gemm, Variant, always_legal

I, O, R = 16, 24, 4


def peft(module: nn.Module, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(module, LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], **config))
    randomize_adapters(model)
    return model


def compiled_step(model, x, **options):
    """(eager PEFT's step, runlora's step, the reports of its graphs): each step is (Y, dX, {name: grad})."""
    eager = step(model, x)
    with debug.collect_reports() as reports:
        rewritten = step(torch.compile(model, backend="runlora", options={"codegen": False, **options}), x)
    return eager, rewritten, reports


def assert_same_step(eager, rewritten, rtol=2e-6, trained=2):
    """Y, dX and the gradient of every trained parameter (at least `trained` of them) equal eager's."""
    (y, dx, grads), (y2, dx2, grads2) = eager, rewritten
    assert_close_to(y, y2, rtol=rtol, what="Y")
    assert_close_to(dx, dx2, rtol=rtol, what="dX")
    assert grads.keys() == grads2.keys() and len(grads) >= trained
    for name in grads:
        assert_close_to(grads[name], grads2[name], rtol=rtol, what=name)


# --- a kind is proven, never guessed ----------------------------------------------------------------------

class LayerScaled(nn.Module):
    """ConvNeXt's second pointwise linear: a learned per-channel layer scale on the linear's output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(I, O)
        self.gamma = nn.Parameter(torch.rand(O) + 0.5)

    def forward(self, x):
        return self.proj(x) * self.gamma


class Gated(nn.Module):
    """A gated linear unit: the linear's output times a gate computed from the input."""

    def __init__(self):
        super().__init__()
        self.proj, self.gate = nn.Linear(I, O), nn.Linear(I, O)

    def forward(self, x):
        return self.proj(x) * torch.sigmoid(self.gate(x))


class ResidualMix(nn.Module):
    """A learned per-channel mix of the linear's output with its input (ReZero / highway style)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(I, I)
        self.alpha = nn.Parameter(torch.rand(I))

    def forward(self, x):
        return self.proj(x) * self.alpha + x * (1 - self.alpha)


@pytest.mark.parametrize("module", [LayerScaled, Gated, ResidualMix], ids=lambda m: m.__name__)
def test_plain_lora_followed_by_a_scale_a_gate_or_a_mix_is_rewritten_as_plain_lora(module):
    """An [o] vector multiplying the layer's output is no DoRA magnitude unless it is m / ‖W + s·B·A‖ of the
    adapter's own weights: these sites are plain LoRA, rewritten, with eager's gradients (the trained scale's too)."""
    model = peft(module())
    eager, rewritten, reports = compiled_step(model, torch.randn(2, 6, I, requires_grad=True))
    assert_same_step(eager, rewritten)
    sites = [s for r in reports for s in r.sites]
    assert [(s.module, s.kind) for s in sites] == [("base_model.model.proj", "lora")]
    assert sites[0].backward is not None and not [k for r in reports for k in r.skipped]


def test_dora_is_still_proven_by_its_norm():
    model = peft(LayerScaled(), use_dora=True)
    eager, rewritten, reports = compiled_step(model, torch.randn(2, 6, I, requires_grad=True))
    assert_same_step(eager, rewritten, rtol=1e-5)
    assert [s.kind for r in reports for s in r.sites] == ["dora"]


# --- a new kind, registered from this file alone --------------------------------------------------------------
# LoRA-FA (Zhang et al., 2023): A frozen at its initialisation, only B trained. Plain LoRA finds no dA in its
# graph and leaves the backward as autograd wrote it; this kind rewrites it without one.

def frozen_a_backward(ops, p) -> BackwardResult:
    """fa-backward: dB = s·dYᵀ·(X·Aᵀ), dX = dY·W + Z1·A — no dA (A is frozen), X·Aᵀ recomputed."""
    z2 = ops.recompute(product(ops, Z2, p.x, ops.t(p.a)))
    grad_b = product(ops, GRAD_B, ops.t(p.dy), z2, p.s)
    grad_x = None
    if p.dx is not None:
        z1 = ops.mm(p.dy, ops.scale(p.b, p.s))
        grad_x = ops.mm(z1, p.a) if p.dx is DxMode.LORA else ops.addmm(ops.mm(p.dy, ops.t(p.w_io)), z1, p.a)
    return BackwardResult(None, grad_b, grad_x, xa=z2)


def frozen_a_backward_gemms(d: Dims):  # 2N·(i·r + o·r) + 2N·(o·r + r·i + o·i) with dX
    dx = [Gemm(d.N, d.o, d.r, "Z1"), Gemm(d.N, d.o, d.i, "dY·W"), Gemm(d.N, d.r, d.i, "+ Z1·A", accumulate=True)]
    return [Gemm(d.N, d.i, d.r, "Z2 = X·Aᵀ"), Gemm(d.o, d.N, d.r, "dB = dYᵀ·Z2")] + (dx if d.needs_dx else [])


FA_BACKWARD = Variant("fa-backward", "LoRA-FA: no dA", "dB = s·dYᵀ(XAᵀ), dX = dY·W + Z1·A", frozen_a_backward,
                      frozen_a_backward_gemms, merges_weight=False, guard=always_legal)


def a_is_frozen(anchor, backward) -> bool:
    """The graph proves it: A is an input of a joint graph whose gradient output is None. (A joint graph
    returns its forward's outputs, then one gradient per primal input: None for one that needs none.)"""
    graph = anchor.graph
    primals = [n for n in graph.nodes if n.op == "placeholder" and "tangents" not in n.name]
    (outputs,) = graph.output_node().args
    a = weight_source(transpose_source(anchor.args[1]))
    return bool(backward) and a in primals and outputs[len(outputs) - len(primals) + primals.index(a)] is None


def match_frozen_a(anchor, backward, options=None) -> Site:
    forward = match_forward(anchor, backward)
    gradients = match_lora_backward(anchor, forward, backward, frozen_a=True)
    needs_dx = gradients.grad_x_lora is not None
    return Site(anchor=anchor, provenance=provenance_of(anchor), forward=forward, backward=gradients,
                backward_note="", dims=Dims(*forward.sizes, needs_dx=needs_dx),
                facts=lora_facts(forward, gradients, needs_dx), kind=LORA_FA)


LORA_FA = SiteKind(name="lora-fa", proves=a_is_frozen, match=match_frozen_a, forwards=FORWARDS,
                   backwards=(FA_BACKWARD,), forward_operands=lora_forward_operands,
                   backward_operands=lora_backward_operands, before_gemms=peft_lora_gemms)


@pytest.fixture
def lora_fa_registered():
    kinds.register_kind(LORA_FA)
    yield
    kinds.unregister_kind(LORA_FA.name)
    assert [k.name for k in kinds.KINDS] == ["dora", "lora"]


def frozen_a_model():
    from helpers import peft_linear

    model = peft_linear(I, O, R)
    model.base_model.model.proj.lora_A["default"].weight.requires_grad_(False)
    return model


def test_a_kind_registered_from_outside_the_pass_is_matched_planned_rewritten_and_reported(lora_fa_registered):
    x = torch.randn(4, 8, I, requires_grad=True)
    eager, rewritten, reports = compiled_step(frozen_a_model(), x, backward="backward1")
    assert_same_step(eager, rewritten, trained=1)
    assert list(eager[2]) == ["base_model.model.proj.lora_B.default.weight"]   # B alone trains
    (report,) = reports
    (site,) = report.sites
    assert (site.kind, site.backward, site.dx_mode) == ("lora-fa", "fa-backward", "total")
    # the forced backward1 has no LoRA-FA variant: the report says so, and the kind's own variant is chosen
    assert any("forced backward1" in note and "lora-fa kind has no such variant" in note for note in site.notes)
    assert site.flops_before == sum(g.flops() for g in peft_lora_gemms(Dims(32, I, O, R), None, True))
    assert "lora-fa" in str(report) or "fa-backward" in str(report)


def test_without_the_kind_plain_lora_rewrites_only_the_forward_of_a_frozen_a(lora_fa_registered):
    kinds.unregister_kind(LORA_FA.name)
    x = torch.randn(4, 8, I, requires_grad=True)
    eager, rewritten, reports = compiled_step(frozen_a_model(), x)
    assert_same_step(eager, rewritten, trained=1)
    ((report,),) = [reports]
    (site,) = report.sites
    assert (site.kind, site.backward) == ("lora", None)
    assert any("dA = (g·B)ᵀ·X was not found" in note for note in site.notes)
    kinds.register_kind(LORA_FA)   # the fixture takes it out again


def test_a_frozen_a_matcher_refuses_a_graph_with_da():
    """The kind's matcher establishes what it claims: a trained A has a dA, which a frozen-A site must not have."""
    from helpers import joint_graph
    import torch.nn.functional as F

    from lora_rewrite.passes.match import match_graph

    def lora(x, w, a, b):
        return F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0

    gm = joint_graph(lora, torch.randn(10, I, requires_grad=True), torch.randn(O, I),
                     torch.randn(R, I, requires_grad=True), torch.randn(O, R, requires_grad=True))
    (anchor,), backward = match_graph(gm.graph)
    assert not a_is_frozen(anchor, backward)
    with pytest.raises(NoMatch, match="taken to be frozen"):
        match_frozen_a(anchor, backward)
    assert is_call(anchor, torch.ops.aten.mm.default)
