"""Sibling fusion (passes/fuse.py): adapters that read the same X (q/k/v) get one X·[A₁;…;Aₘ]ᵀ and one
[Z1₁,…,Z1ₘ]ᵀ·X instead of one product each — same values, same FLOPs, fewer products.

Through Inductor's passes and partitioner without code generation, so the compiled graphs run op by op
and every matrix product they perform can be counted."""

import collections
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import (activation_bytes_saved_for_backward, assert_close_to, assert_same_step, count_compiled_flops,
                     float64_reference, joint_graph, randomize_adapters, run_joint, runlora, runlora_counters, step)
from lora_rewrite import compat, debug
from lora_rewrite.forms import ROLES
from lora_rewrite.passes.fuse import ADAPTER_PRODUCT, ADAPTER_WEIGHT_GRAD, fuse_siblings
from lora_rewrite.passes.match import match_graph, match_site
from lora_rewrite.passes.rewrite import rewrite_site
from lora_rewrite.variants import BACKWARDS, FORWARDS

PAIRS = [(f, b) for f in FORWARDS for b in BACKWARDS]
PAIR_IDS = [f"{f.name}-{b.name}" for f, b in PAIRS]
RANKS = {"q": 4, "k": 2, "v": 8}
I, O = 24, 20


class Siblings(nn.Module):
    """Three projections of one input, as attention's q/k/v; k without bias."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(I, O)
        self.k = nn.Linear(I, O, bias=False)
        self.v = nn.Linear(I, O)

    def forward(self, x):
        return self.q(x) * torch.sigmoid(self.k(x)) + self.v(x)


def siblings_model(dtype=torch.float32, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Siblings(), LoraConfig(
        r=RANKS["q"], lora_alpha=8, rank_pattern={"k": RANKS["k"], "v": RANKS["v"]},
        alpha_pattern={"v": 4}, target_modules=["q", "k", "v"], **config))
    randomize_adapters(model)
    return model.to(dtype)


@contextlib.contextmanager
def count_compiled_matmuls():
    """The mm/addmm nodes of every partitioned graph compiled inside the block."""
    counts = collections.Counter()
    inner = compat.eager_inner_compile

    def counting_inner_compile(gm, example_inputs, **kwargs):
        kind = "backward" if kwargs.get("is_backward") else "forward"
        counts[kind] += sum(n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
                            for n in gm.graph.nodes)
        return inner(gm, example_inputs, **kwargs)

    compat.eager_inner_compile = counting_inner_compile
    try:
        yield counts
    finally:
        compat.eager_inner_compile = inner


def compiled_step(model, x, grad_out, **options):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with count_compiled_flops() as flops, count_compiled_matmuls() as matmuls:
        result = step(runlora(model, **options), x, grad_out)
    return result, sum(matmuls.values()), dict(flops), runlora_counters()


def siblings_function(x, wq, aq, bq, wk, ak, bk, wv, av, bv):
    """Siblings's forward as a plain function: three LoRA linears of one input."""
    def lora(w, a, b):
        return F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0

    return lora(wq, aq, bq) * torch.sigmoid(lora(wk, ak, bk)) + lora(wv, av, bv)


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda v: v.name)
def test_fuse_siblings_reads_the_products_each_rewrite_recorded(backward):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 5, I, generator=g).requires_grad_(True)]
    for name in ("q", "k", "v"):
        r = RANKS[name]
        inputs += [torch.randn(O, I, generator=g), torch.randn(r, I, generator=g).requires_grad_(True),
                   torch.randn(O, r, generator=g).requires_grad_(True)]
    gm = joint_graph(siblings_function, *inputs)
    run = lambda: run_joint(gm, inputs, [torch.ones(2, 5, O)])  # noqa: E731
    before = run()
    fake_mode = compat.detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    anchors, backward_region = match_graph(gm.graph)
    rewritten = [rewrite_site(gm.graph, fake_mode, match_site(anchor, backward_region), FORWARDS[0], backward)
                 for anchor in anchors]

    fusions = fuse_siblings(gm.graph, fake_mode, rewritten)
    compat.stable_topological_sort(gm.graph)
    gm.graph.lint()
    gm.recompile()

    has_z1 = rewritten[0].products.z1 is not None  # backward1/2/5: dA = Z1ᵀ·X
    assert [f.kind for f in fusions] == [ADAPTER_PRODUCT] + ([ADAPTER_WEIGHT_GRAD] if has_z1 else [])
    assert fusions[0].ranks == [RANKS["q"], RANKS["k"], RANKS["v"]]  # the forward's order
    alive = set(gm.graph.nodes)
    for done in rewritten:  # each recorded product that was fused is replaced by a slice of the fused one
        assert done.products.forward_xa not in alive
        assert not has_z1 or done.products.grad_a not in alive
    for want, got in zip(before, run()):
        assert_close_to(want, got, rtol=1e-5)


# Every product in its default form, and every product in its other form (the fused products follow
# the first sibling's form).
FORMS = {"direct": "direct", "other-forms": {role.name: role.forms[1] for role in ROLES}}


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("forward,backward", PAIRS, ids=PAIR_IDS)
def test_fused_siblings_match_float64_with_the_same_flops_and_fewer_products(forward, backward, forms):
    model = siblings_model()
    x = torch.randn(3, 7, I, requires_grad=True)
    grad_out = torch.randn(3, 7, O)
    y64, dx64, grads64 = float64_reference(model, x, grad_out)
    forced = {"forward": forward.name, "backward": backward.name, "forms": forms}

    (y, dx, grads), fused_matmuls, fused_flops, counters = compiled_step(model, x, grad_out, **forced)
    _, matmuls, flops, unfused_counters = compiled_step(model, x, grad_out, fuse_siblings=False, **forced)

    assert_close_to(y64, y, rtol=2e-6, what="Y")
    assert_close_to(dx64, dx, rtol=2e-6, what="dX")
    assert grads.keys() == grads64.keys() and len(grads) == 6
    for name, g64 in grads64.items():
        assert_close_to(g64, grads[name], rtol=2e-6, what=name)

    # Which products exist to fuse: X·Aᵀ in forward1 and in backward1/5's recomputed Z2; dA = Z1ᵀ·X in
    # backward1/2/5 (backward3/4 build dA from dYᵀ·X, which is per site).
    has_xa = forward.name == "forward1" or backward.name in ("backward1", "backward5")
    has_z1x = backward.name in ("backward1", "backward2", "backward5")
    groups = has_xa + has_z1x
    assert counters.get("sibling_groups_fused", 0) == groups
    assert counters.get("sibling_products_fused", 0) == 3 * groups
    assert "sibling_groups_fused" not in unfused_counters
    assert fused_flops == flops and fused_flops["forward"] > 0 and fused_flops["backward"] > 0
    # Each fused group does one product for three (in the forward, and again where the backward
    # recomputes X·Aᵀ).
    forward_xa_recomputed = has_xa and forward.name == "forward1" and backward.name in ("backward1", "backward5")
    assert matmuls - fused_matmuls == 2 * groups + 2 * forward_xa_recomputed


def test_dropout_gives_each_sibling_its_own_input_and_nothing_is_fused():
    """Each adapter's dropout mask makes its own input: no fusion, and with eager's masks eager's step."""
    model = siblings_model(lora_dropout=0.1)
    x, grad_out = torch.randn(2, 5, I, requires_grad=True), torch.randn(2, 5, O)
    torch.manual_seed(5)
    eager = step(model, x, grad_out)
    torch.manual_seed(5)
    rewritten = step(runlora(model, fallback_random=True), x, grad_out)
    counters = runlora_counters()
    assert counters["sites_rewritten"] == 3
    assert "sibling_groups_fused" not in counters
    assert_same_step(eager, rewritten, rtol=2e-6, trained=6)


def test_bf16_model_with_peft_default_fp32_adapters_fuses_across_the_casts():
    """Each adapter casts X up to fp32 by itself: three casts of one X hold the same value. The fp32
    adapter gradients equal stock Inductor's pipeline's to fp32 round-off, and eager's to bf16 round-off
    (the model's own bf16 ops — k's sigmoid backward — are rounded differently by Inductor's
    decompositions on some torch versions: 2e-3 on torch 2.11, for stock Inductor too)."""
    model = siblings_model(dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    x = torch.randn(4, 6, I, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(4, 6, O, dtype=torch.bfloat16)
    y_eager, dx_eager, grads_eager = step(model, x, grad_out)
    y_stock, dx_stock, grads_stock = step(runlora(model, rewrite=False), x, grad_out)
    torch._dynamo.reset()

    y, dx, grads = step(runlora(model), x, grad_out)

    assert runlora_counters()["sibling_groups_fused"] >= 1
    assert_close_to(y_stock, y, rtol=1e-2, what="Y")     # bf16 outputs: one rounding apart at most
    assert_close_to(dx_stock, dx, rtol=1e-2, what="dX")
    for name, g in grads_stock.items():
        assert g.dtype == grads[name].dtype == torch.float32
        assert_close_to(g, grads[name], rtol=1e-5, what=name)
        assert_close_to(grads_eager[name], grads[name], rtol=1e-2, what=f"{name} vs eager")
    assert_close_to(y_eager, y, rtol=1e-2, what="Y vs eager")


@pytest.mark.parametrize("backward", ["backward1", "backward5"])
def test_fusion_saves_no_more_for_backward(backward):
    model = siblings_model()
    x = torch.randn(4, 32, I, requires_grad=True)
    saved = {}
    for fuse in (True, False):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = runlora(model, forward="forward1", backward=backward, fuse_siblings=fuse)
        compiled(x)  # compile first: only the second call's saved tensors are counted
        saved[fuse] = activation_bytes_saved_for_backward(model, lambda: compiled(x))
        assert_same_step(step(model, x), step(compiled, x), rtol=2e-6, trained=6)
        assert (runlora_counters().get("sibling_groups_fused", 0) >= 2) == fuse
    assert saved[True] <= saved[False]


def test_the_report_names_the_fused_siblings():
    model = siblings_model()
    x, grad_out = torch.randn(5, I, requires_grad=True), torch.randn(5, O)
    with debug.collect_reports() as reports:
        rewritten = step(runlora(model, forward="forward1", backward="backward1"), x, grad_out)
    assert_same_step(step(model, x, grad_out), rewritten, rtol=2e-6, trained=6)
    (report,) = reports
    kinds = {f.kind: f for f in report.fused}
    assert set(kinds) == {"X·Aᵀ", "dA = Z1ᵀ·X"}
    for fusion in kinds.values():
        assert dict(zip([m.rsplit(".", 1)[-1] for m in fusion.modules], fusion.ranks)) == RANKS
    # In graph order: the forward runs q, k, v; the backward reaches them in reverse.
    assert [m.rsplit(".", 1)[-1] for m in kinds["X·Aᵀ"].modules] == ["q", "k", "v"]
    text = str(report)
    assert "fused X·Aᵀ of" in text and "(r 4+2+8)" in text and "(r 8+2+4)" in text
    assert [f["ranks"] for f in report.to_dict()["fused"]] == [[4, 2, 8], [8, 2, 4]]

