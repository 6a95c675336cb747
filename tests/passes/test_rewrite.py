"""The rewrite (passes/rewrite.py).

First `rewrite_site` itself on a joint graph: the same values, the products its record names, all or
nothing. Then in the compiled graph: every forced variant pair, numerics against float64, FLOPs of the
compiled forward and backward graphs against the formula, and X·Aᵀ no longer saved for backward.

The compiled tests go through Inductor's decompositions, joint passes and min-cut partitioner, without
code generation (`codegen=False`); tests/test_backend.py runs real Inductor code generation.
"""

import copy
import dataclasses
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from helpers import (activation_bytes_saved_for_backward, assert_close_to, count_compiled_flops,
                     float64_reference, joint_graph, peft_linear, run_joint, runlora, runlora_counters, step)
from lora_rewrite import compat
from lora_rewrite.forms import ROLES
from lora_rewrite.passes.match import match_graph, match_site
from lora_rewrite.passes.rewrite import RewriteError, rewrite_site
from lora_rewrite.variants import BACKWARDS, FORWARD1, FORWARDS, Dims, ForwardResult

PAIRS = [(f, b) for f in FORWARDS for b in BACKWARDS]
PAIR_IDS = [f"{f.name}-{b.name}" for f, b in PAIRS]

# Input layouts: (leading shape of X, base bias, bias trainable, X requires grad)
LAYOUTS = {
    "2d-bias-xgrad": ((13,), True, False, True),
    "3d-nobias-xgrad": ((3, 7), False, False, True),
    "3d-trainable-bias": ((2, 9), True, True, True),
    "3d-bias-noxgrad": ((4, 5), True, False, False),
}


def lora_linear(x, w, bias, a, b):
    return F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * 1.5


def lora_linear_inputs(i=12, o=20, r=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, i, generator=g).requires_grad_(True), torch.randn(o, i, generator=g),
            torch.randn(o, generator=g), torch.randn(r, i, generator=g).requires_grad_(True),
            torch.randn(o, r, generator=g).requires_grad_(True)]


def matched(gm):
    anchors, backward = match_graph(gm.graph)
    (anchor,) = anchors
    return match_site(anchor, backward)


def fake_mode(gm):
    return compat.detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])


@pytest.mark.parametrize("forward,backward", PAIRS, ids=PAIR_IDS)
def test_rewrite_site_keeps_the_values_and_names_its_products(forward, backward):
    inputs = lora_linear_inputs()
    gm = joint_graph(lora_linear, *inputs)
    tangent = torch.randn(2, 5, 20)
    before = run_joint(gm, inputs, [tangent])

    done = rewrite_site(gm.graph, fake_mode(gm), matched(gm), forward, backward)
    compat.stable_topological_sort(gm.graph)
    gm.graph.lint()
    gm.recompile()

    for want, got in zip(before, run_joint(gm, inputs, [tangent])):
        assert_close_to(want, got, rtol=1e-5)
    assert (done.forward, done.backward) == (forward, backward)
    products = done.products
    assert (products.forward_xa is not None) == (forward.name == "forward1")
    assert (products.backward_xa is not None) == (backward.name in ("backward1", "backward5"))
    assert (products.grad_a is not None) == (products.z1 is not None) == \
        (backward.name in ("backward1", "backward2", "backward5"))
    if products.forward_xa is not None and products.backward_xa is not None:
        assert products.forward_xa is products.backward_xa  # one X·Aᵀ node, recomputed in the backward
    alive = set(gm.graph.nodes)
    named = [n for n in (products.forward_xa, products.backward_xa, products.grad_a, products.z1) if n is not None]
    assert all(n in alive and n in done.new_nodes for n in named)
    if products.grad_a is not None:
        assert products.grad_a in gm.graph.output_node().all_input_nodes  # dA is the graph's output now


def test_a_rewrite_that_does_not_check_out_leaves_the_graph_as_it_was():
    inputs = lora_linear_inputs()
    gm = joint_graph(lora_linear, *inputs)
    code = gm.graph.python_code("self").src

    def forward_in_float64(ops, p):  # the right product in the wrong dtype: fails the check before any use
        return ForwardResult(ops.cast(FORWARD1.compute(ops, p).y, torch.float64))

    wrong = dataclasses.replace(FORWARD1, compute=forward_in_float64)
    with pytest.raises(RewriteError, match="forward: rewritten value is torch.float64"):
        rewrite_site(gm.graph, fake_mode(gm), matched(gm), wrong, BACKWARDS[0])
    assert gm.graph.python_code("self").src == code


def shapes_for(seed: int):
    rng = random.Random(seed)
    i = rng.choice([12, 24, 33, 40])
    o = rng.choice([16, 20, 48])
    return i, o, rng.choice([2, 3, 4, 8])


# Every product in its default form, and every product in its other form (lora_rewrite/forms.py).
ALL_OTHER_FORMS = {role.name: role.forms[1] for role in ROLES}
FORMS = {"direct": "direct", "other-forms": ALL_OTHER_FORMS}


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("forward,backward", PAIRS, ids=PAIR_IDS)
def test_forced_pair_matches_float64(forward, backward, layout, forms):
    lead, bias, bias_trainable, x_grad = LAYOUTS[layout]
    i, o, r = shapes_for(zlib.crc32(f"{forward.name}{backward.name}{layout}".encode()))
    model = peft_linear(i, o, r, alpha=3.0 * r, bias=bias, bias_trainable=bias_trainable)
    x = torch.randn(*lead, i, requires_grad=x_grad)
    grad_out = torch.randn(*lead, o)
    y64, dx64, grads64 = float64_reference(model, x, grad_out)

    compiled = runlora(model, forward=forward.name, backward=backward.name, forms=forms)
    y, dx, grads = step(compiled, x, grad_out)

    assert runlora_counters().get(f"chose_{forward.name}") == 1
    assert runlora_counters().get(f"chose_{backward.name}") == 1
    assert_close_to(y64, y, rtol=2e-6, what="Y")
    if x_grad:
        assert_close_to(dx64, dx, rtol=2e-6, what="dX")
    else:
        assert dx is None
    expected = {"lora_A", "lora_B"} | ({"bias"} if bias_trainable else set())
    assert {n.split(".")[-1] if "bias" in n else n.split(".")[-3] for n in grads} == expected
    for name, g64 in grads64.items():
        assert_close_to(g64, grads[name], rtol=2e-6, what=name)


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "noxgrad"])
@pytest.mark.parametrize("forward,backward", PAIRS, ids=PAIR_IDS)
def test_compiled_graphs_do_the_formula_flops(forward, backward, x_grad, forms):
    """FlopCounterMode over the partitioned forward and backward graphs = the variant's formula, in every
    form: the bracketing is really the chosen one, and X·Aᵀ (or W + s·B·A) is recomputed where it says so."""
    b, t, i, o, r = 3, 7, 24, 40, 5
    model = peft_linear(i, o, r)
    with count_compiled_flops() as flops:
        compiled = runlora(model, forward=forward.name, backward=backward.name, forms=forms)
        step(compiled, torch.randn(b, t, i, requires_grad=x_grad))
    d = Dims(b * t, i, o, r, needs_dx=x_grad)
    assert flops["forward"] == forward.flops(d)
    assert flops["backward"] == backward.flops(d)


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("forward,backward", [("forward1", "backward1"), ("forward2", "backward5"),
                                              ("forward1", "backward3")])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "noxgrad"])
def test_x_a_is_not_saved_for_backward(forward, backward, x_grad, forms):
    """Activation bytes saved for backward drop by at least N·r·element_size against the same graph
    without the rewrite (rewrite=False: stock Inductor's decompositions, passes and partitioner)."""
    N_lead, i, o, r = (8, 16), 32, 48, 6
    model = peft_linear(i, o, r)
    x = torch.randn(*N_lead, i, requires_grad=x_grad)
    stock = runlora(model, rewrite=False)
    before = activation_bytes_saved_for_backward(model, lambda: stock(x))
    torch._dynamo.reset()
    ours = runlora(model, forward=forward, backward=backward, forms=forms)
    after = activation_bytes_saved_for_backward(model, lambda: ours(x))
    N = N_lead[0] * N_lead[1]
    assert before - after >= N * r * x.element_size(), (before, after)


def test_rewrite_false_leaves_the_graph_alone():
    model = peft_linear(16, 24, 4)
    step(runlora(model, rewrite=False), torch.randn(2, 3, 16, requires_grad=True))
    assert runlora_counters() == {}


@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "noxgrad"])
def test_a_forced_merged_variant_that_is_illegal_falls_back_and_says_so(x_grad):
    """Under dropout a merged variant is never chosen, even where X needs no gradient (backward5 would
    then merge nothing, but the counters and report must never show a merged variant under dropout)."""
    from lora_rewrite import debug

    model = peft_linear(16, 24, 4, dropout=0.2)
    x = torch.randn(2, 3, 16, requires_grad=x_grad)
    with debug.collect_reports() as reports:
        step(runlora(model, forward="forward2", backward="backward5", fallback_random=True), x)
    (site,) = reports[0].sites
    assert (site.forward, site.backward) == ("forward1", "backward1")
    assert any("forced forward2 is illegal here" in n and "lora_dropout" in n for n in site.notes)
    assert any("forced backward5 is illegal here" in n for n in site.notes)


def test_widened_copies_of_x_and_narrowed_weight_copies_are_not_saved():
    """PEFT's default fp32 adapters on a bf16 model: stock Inductor keeps an fp32 copy of X for the
    adapter; runlora keeps the bf16 X and redoes the cast. Under autocast: stock keeps bf16 copies of the
    fp32 weights; runlora recomputes them from the parameters."""
    from peft import LoraConfig, get_peft_model

    from helpers import Autocast, OneLinear

    lead, i, o, r = (4, 32), 64, 96, 8
    N = lead[0] * lead[1]
    torch.manual_seed(0)
    bf16_model = get_peft_model(OneLinear(i, o).to(torch.bfloat16), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    x = torch.randn(*lead, i, dtype=torch.bfloat16, requires_grad=True)

    fp32_model = peft_linear(i, o, r)
    autocast_model = Autocast(fp32_model)
    x32 = torch.randn(*lead, i, requires_grad=True)
    cases = [
        # model, input, at least this many bytes fewer: X·Aᵀ (fp32) + the fp32 copy of X beyond bf16 X
        (bf16_model, x, N * r * 4 + N * i * 2),
        # X·Aᵀ (bf16) + the bf16 copy of W
        (autocast_model, x32, N * r * 2 + o * i * 2),
    ]
    for model, inp, fewer in cases:
        torch._dynamo.reset()
        stock = runlora(model, rewrite=False)
        before = activation_bytes_saved_for_backward(model, lambda: stock(inp))
        torch._dynamo.reset()
        ours = runlora(model)
        after = activation_bytes_saved_for_backward(model, lambda: ours(inp))
        assert before - after >= fewer, (type(model).__name__, before, after)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_16_bit_base_is_summed_with_fp32_adapters_as_it_is_never_widened_first(monkeypatch, use_dora):
    """PEFT's fp32 adapters on a bf16 layer: forward1 adds the bf16 base result to the fp32 adapter term as
    PEFT's type promotion does (one elementwise pass, which Inductor fuses with the casts around it), and no
    fp32 copy of the base [N,o] is made for addmm to accumulate onto (which the CPU's addmm copies once
    more into its result). Y stays as close to float64 as eager PEFT's."""
    from peft import LoraConfig, get_peft_model

    from helpers import OneLinear, compiled_graphs

    lead, i, o, r = (4, 32), 48, 80, 8
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(i, o).to(torch.bfloat16),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], use_dora=use_dora))
    x = torch.randn(*lead, i, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(*lead, o, dtype=torch.bfloat16)
    y64 = float64_reference(model, x, grad_out)[0]
    y_eager = step(model, x, grad_out)[0]
    graphs = compiled_graphs(monkeypatch)
    y = step(runlora(model), x, grad_out)[0]
    assert runlora_counters().get("chose_forward1" if not use_dora else "chose_dora-forward1") == 1
    forward = graphs[0]   # the partitioned forward, then the backward (which widens dY, as eager PEFT does)
    widened_results = [n for n in forward.nodes
                       if n.target is torch.ops.prims.convert_element_type.default and n.args[1] == torch.float32
                       and n.args[0].meta["val"].numel() == x.numel() // i * o]
    assert widened_results == []
    assert _relative_error(y64, y) <= _relative_error(y64, y_eager) + torch.finfo(torch.bfloat16).eps


def _relative_error(reference, actual) -> float:
    reference, actual = reference.double(), actual.double()
    return float((actual - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("forward,backward", [("forward1", "backward1"), ("forward2", "backward5"),
                                              ("forward1", "backward3"), ("forward2", "backward4")])
def test_a_tiny_scale_on_16_bit_adapters_costs_no_more_precision_than_eager(forward, backward, dtype):
    """lora_alpha far below r (s = 2e-6): folding s into a 16-bit s·B would round it to a few bits (fp16
    subnormals). The scale rides as addmm's alpha or on the [N,r] / [r,i] result instead: every
    gradient is at least as close to float64 as eager PEFT's (within 1.5× plus a little rounding)."""
    lead, i, o, r = (4, 16), 48, 40, 8
    model = peft_linear(i, o, r, alpha=1.6e-5, dtype=dtype)
    x = torch.randn(*lead, i, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(*lead, o, dtype=dtype)
    y64, dx64, grads64 = float64_reference(model, x, grad_out)
    y_eager, dx_eager, grads_eager = step(model, x, grad_out)
    compiled = runlora(model, forward=forward, backward=backward)
    y, dx, grads = step(compiled, x, grad_out)
    merged_illegal = dtype == torch.float16 and backward in ("backward4", "backward5")   # variants.FP16_RANGE
    assert runlora_counters().get(f"chose_{backward}") == (None if merged_illegal else 1)
    eps = torch.finfo(dtype).eps
    for what, ref, eager, ours in [("Y", y64, y_eager, y), ("dX", dx64, dx_eager, dx)] + \
            [(name, grads64[name], grads_eager[name], grads[name]) for name in grads64]:
        assert _relative_error(ref, ours) <= 1.5 * _relative_error(ref, eager) + 4 * eps, what


def two_lora_linears(x, w1, a1, b1, w2, a2, b2):
    return lora_linear(lora_linear(x, w1, None, a1, b1), w2, None, a2, b2)


def test_a_folded_dx_that_leaves_the_graph_is_copied_to_rows_and_one_that_stays_is_not():
    """dX folded with Z1 is a column slice of [dY·W′ | Z1]. Where it is the graph's output autograd
    would copy it into the leaf's .grad anyway, so the variant copies it in rows itself (where the
    measured choice of forms sees the copy); where the next layer's backward reads it, it stays a view."""
    g = torch.Generator().manual_seed(0)
    i, o, r = 12, 20, 3
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    inputs = [rand(2, 5, i).requires_grad_(True), rand(o, i), rand(r, i).requires_grad_(True),
              rand(o, r).requires_grad_(True), rand(i, o), rand(r, o).requires_grad_(True),
              rand(i, r).requires_grad_(True)]
    gm = joint_graph(two_lora_linears, *inputs)
    tangent = rand(2, 5, i)
    before = run_joint(gm, inputs, [tangent])
    anchors, backward = match_graph(gm.graph)
    sites = [match_site(anchor, backward) for anchor in anchors]
    leaving = [site.backward.dx_sum.leaves_graph for site in sites]
    assert sorted(leaving) == [False, True]   # the first layer's dX is the output; the second's is not
    for site in sites:
        rewrite_site(gm.graph, fake_mode(gm), site, FORWARDS[1], BACKWARDS[4], {"Z1_in_dX": "folded"})
    compat.stable_topological_sort(gm.graph)
    gm.graph.lint()
    gm.recompile()
    for want, got in zip(before, run_joint(gm, inputs, [tangent])):
        assert_close_to(want, got, rtol=1e-5)
    clones = [n for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert len(clones) == 1
    (slice_node,) = clones[0].all_input_nodes
    assert slice_node.target is torch.ops.aten.slice.Tensor
    dx_out = gm.graph.output_node().all_input_nodes
    out_vals = [n.meta["val"] for n in dx_out if tuple(n.meta["val"].shape) == (2, 5, i)]
    assert out_vals and all(v.is_contiguous() for v in out_vals)


# Shapes stock Inductor runs (lora_rewrite/containment.py's promise): no tokens (MoE routing, packed or
# filtered batches), one token, a rank as large as the features, as many tokens as the rank.
EDGE_SHAPES = {   # leading shape of X, i, o, r
    "no-tokens": ((0,), 16, 24, 4),
    "no-tokens-3d": ((2, 0), 16, 24, 4),
    "one-token": ((1,), 16, 24, 4),
    "rank-equals-in": ((6,), 8, 24, 8),
    "rank-above-in-and-out": ((6,), 8, 6, 12),
    "tokens-equal-rank": ((4,), 16, 24, 4),
}


def assert_same_or_empty(reference, actual, what):
    assert actual.shape == reference.shape, what
    if reference.numel():
        assert_close_to(reference, actual, rtol=2e-6, what=what)


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("edge", EDGE_SHAPES)
@pytest.mark.parametrize("forward,backward", PAIRS, ids=PAIR_IDS)
def test_edge_shapes_in_every_forced_pair_match_float64(forward, backward, edge, forms):
    lead, i, o, r = EDGE_SHAPES[edge]
    model = peft_linear(i, o, r, alpha=2.0 * r)
    x = torch.randn(*lead, i, requires_grad=True)
    grad_out = torch.randn(*lead, o)
    y64, dx64, grads64 = float64_reference(model, x, grad_out)
    y, dx, grads = step(runlora(model, forward=forward.name, backward=backward.name, forms=forms), x, grad_out)
    assert runlora_counters().get("sites_rewritten") == 1
    assert_same_or_empty(y64, y, "Y")
    assert_same_or_empty(dx64, dx, "dX")
    assert grads.keys() == grads64.keys()
    for name in grads64:
        assert_same_or_empty(grads64[name], grads[name], name)


@pytest.mark.parametrize("codegen", [False, pytest.param(True, marks=pytest.mark.inductor)],
                         ids=["no-codegen", "inductor"])
@pytest.mark.parametrize("shapes", ["static", "dynamic", "unbacked"])
def test_no_tokens_runs_as_stock_inductor_does(shapes, codegen):
    """x of shape (0, i): static, after a dynamic compile (Dynamo specialises N = 0 and compiles again), and
    as an unbacked, data-dependent N that is 0 when it runs (dB = dYᵀ·Z2 then has no row to take beta = 0's
    first operand from). The same empty output and zero gradients as eager PEFT and stock Inductor."""
    model = peft_linear(16, 24, 4)
    x = torch.randn(0, 16, requires_grad=True)
    want = step(torch.compile(model, backend="runlora", options={"rewrite": False, "codegen": codegen}), x,
                torch.zeros(0, 24))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="runlora", options={"codegen": codegen},
                             dynamic=True if shapes == "dynamic" else None)
    if shapes == "dynamic":
        step(compiled, torch.randn(8, 16, requires_grad=True))
    x = x.detach().clone().requires_grad_(True)
    if shapes == "unbacked":
        torch._dynamo.decorators.mark_unbacked(x, 0)
    y, dx, grads = step(compiled, x, torch.zeros(0, 24))
    assert runlora_counters()["sites_rewritten"] >= 1
    assert y.shape == want[0].shape == (0, 24) and dx.shape == want[1].shape == (0, 16)
    assert grads.keys() == want[2].keys()
    for name, g in grads.items():
        assert torch.equal(g, want[2][name]) and not g.any(), name


def test_fp16_output_is_finite_wherever_eager_peft_is():
    """An fp16 model with fp16 adapters, lora_alpha 8192 at r = 4 (s = 2048), adapter weights of scale 20,
    small inputs: eager PEFT's (X·Aᵀ)·Bᵀ·s stays finite, but W + s·B·A overflows fp16's range. The merged
    variants are illegal in fp16 (variants.FP16_RANGE): runlora's output is finite, at eager's error or
    better against float64, and the merged forward it would otherwise run is not."""
    from lora_rewrite.variants import FORWARD2, EagerOps, ForwardOperands

    model = peft_linear(16, 24, 4, alpha=8192, dtype=torch.float16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 20)
    x = (torch.randn(64, 16) * 1e-4).half()
    proj = model.base_model.model.proj
    with torch.no_grad():
        y64 = copy.deepcopy(model).double()(x.double())
        eager = model(x)
        merged = FORWARD2.compute(EagerOps(), ForwardOperands(
            x=x, a=proj.lora_A["default"].weight, b=proj.lora_B["default"].weight, s=proj.scaling["default"],
            w_io=proj.base_layer.weight.t(), bias=proj.base_layer.bias)).y
        ours = runlora(model, forward="forward2")(x)   # inference: the forward alone
    assert torch.isfinite(eager).all() and not torch.isfinite(merged).all()
    assert torch.isfinite(ours).all()
    assert runlora_counters().get("chose_forward1") == 1
    err = lambda y: float((y.double() - y64).abs().max() / y64.abs().max())  # noqa: E731
    assert err(ours) <= err(eager) * 1.5 + 1e-3


# Every forward × backward pair once through Inductor's own lowering and code generation (the tests above run
# the rewritten graphs op by op, `codegen=False`), the forms alternating so that every form of every role is
# generated too; and the dropout sites' unmerged backwards, whose masks Inductor's RNG draws.
CODEGEN_CASES = [(f, b, "direct" if k % 2 == 0 else "other-forms", False) for k, (f, b) in enumerate(PAIRS)] + \
    [(PAIRS[0][0], b, forms, True) for b in BACKWARDS[1:3] for forms in FORMS]


@pytest.mark.inductor
@pytest.mark.parametrize("forward,backward,forms,dropout", CODEGEN_CASES,
                         ids=[f"{f.name}-{b.name}-{forms}{'-dropout' if d else ''}" for f, b, forms, d in CODEGEN_CASES])
def test_every_pair_and_form_through_real_code_generation(forward, backward, forms, dropout):
    model = peft_linear(24, 40, 4, alpha=12.0, dropout=0.25 if dropout else 0.0, bias_trainable=True)
    x, grad_out = torch.randn(3, 16, 24, requires_grad=True), torch.randn(3, 16, 40)
    if dropout:   # eager PEFT with Inductor's masks (fallback_random: eager's RNG), fp32
        torch.manual_seed(3)
        reference = step(model, x, grad_out)
        options = {"fallback_random": True}
        torch.manual_seed(3)
    else:
        reference, options = float64_reference(model, x, grad_out), {}
    compiled = torch.compile(model, backend="runlora", options={"forward": forward.name, "backward": backward.name,
                                                                "forms": FORMS[forms], **options})
    y, dx, grads = step(compiled, x, grad_out)
    assert runlora_counters().get(f"chose_{forward.name}") == 1 and runlora_counters().get(f"chose_{backward.name}") == 1
    y64, dx64, grads64 = reference
    assert_close_to(y64, y, rtol=5e-6, what="Y")
    assert_close_to(dx64, dx, rtol=5e-6, what="dX")
    assert grads.keys() == grads64.keys() and len(grads) == 3   # A, B and the base's bias
    for name, g64 in grads64.items():
        assert_close_to(g64, grads[name], rtol=5e-6, what=name)
