"""DoRA (`use_dora=True`) on real models under runlora: every DoRA linear rewritten forward and backward
(lora_rewrite/dora.py, passes/match_dora.py), the loss and every gradient (A, B, the magnitude m, X) equal
eager PEFT's, one graph where plain LoRA is one graph, no [i,i] identity left in the compiled graphs, and
the PEFT features a DoRA user has."""

import pytest
import torch

from helpers import activation_bytes_saved_for_backward, compiled_graphs, float64_reference, step
from model_builders import (base_model, batch, batches, dynamo_counts, lora_linears, loss_and_grads, max_rel_err,
                            peft_model, randomize_lora_b, rel_err, runlora, stock, train, trainable, twins)
from test_peft_features import RTOL, assert_all_rewritten, assert_step_equals_eager, sites, skipped
from lora_rewrite import debug

FAMILIES_TESTED = ["llama", "opt", "gpt2", "bert", "mistral", "qwen2", "roberta"]


def dora_model(family="llama", **config):
    return peft_model(family, use_dora=True, **config)


@pytest.mark.parametrize("family", FAMILIES_TESTED)
def test_every_dora_linear_is_rewritten_and_the_graphs_are_stock_inductor_s(family):
    """One step equals eager PEFT DoRA; every DoRA linear is a rewritten site with its backward; and
    Dynamo compiles the same graphs and breaks as stock Inductor's pipeline (with the stand-in both have:
    lora_rewrite/traceable_peft.py) on the same two steps. One decoder layer: every layer is the same
    graph, and the plain-LoRA family tests (tests/models/test_families.py) run two."""
    model = dora_model(family, layers=1)
    eager_model, compiled_model, stock_model = twins(model, 3)
    with debug.collect_reports() as reports:
        compiled = runlora(compiled_model)
        _, grads = assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch())
        loss_and_grads(compiled, compiled_model, batch(seed=1))
    assert any("lora_magnitude_vector" in name for name in grads)
    assert_all_rewritten(reports, model)
    assert all(s.forward.startswith("dora-") and s.backward.startswith("dora-") for s in sites(reports))
    runlora_counts = dynamo_counts()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = stock(stock_model)
    for seed in range(2):
        loss_and_grads(compiled, stock_model, batch(seed=seed))
    assert runlora_counts == dynamo_counts()


def test_a_dora_llama_is_one_graph_as_plain_lora_is():
    counts = {}
    for dora in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = peft_model("llama", use_dora=dora)
        loss_and_grads(runlora(model), model, batch())
        counts[dora] = dynamo_counts()
    assert counts[True] == counts[False] == {"unique_graphs": 1, "graph_breaks": 0}


def identities(graphs) -> list:
    """The nodes that build an identity matrix (eye, or eq(iota[:, None], iota) as decomposed)."""
    from lora_rewrite.passes.match_dora_norm import is_identity

    return [n for g in graphs for n in g.nodes if is_identity(n)]


def test_no_identity_in_the_compiled_graphs(monkeypatch):
    """PEFT builds B·A for the norm from an [i,i] identity every step; stock Inductor compiles it, runlora
    does not: no identity in any compiled forward or backward graph, and no [i,i] tensor at all on a layer
    whose i differs from o and from every other size."""
    from helpers import OneLinear
    from peft import LoraConfig, get_peft_model

    graphs = compiled_graphs(monkeypatch)
    model = dora_model("llama")
    loss_and_grads(runlora(model), model, batch())
    assert graphs and identities(graphs) == []

    graphs.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = get_peft_model(OneLinear(40, 24), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    step(runlora(layer), torch.randn(3, 5, 40, requires_grad=True))
    shapes = [tuple(n.meta["val"].shape) for g in graphs for n in g.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert shapes and (40, 40) not in shapes
    graphs.clear()
    torch._dynamo.reset()
    step(stock(layer), torch.randn(3, 5, 40, requires_grad=True))   # the check can fail: stock has it
    assert identities(graphs)


def one_dora_linear(i=20, o=28, r=4, bias=True, dropout=0.0, dtype=torch.float32, alpha=None):
    from helpers import OneLinear, randomize_adapters
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    alpha = 3.0 * r if alpha is None else alpha
    model = get_peft_model(OneLinear(i, o, bias), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                             use_dora=True, lora_dropout=dropout))
    randomize_adapters(model)
    return model.to(dtype)


PAIRS = [(f, b) for f in ("forward1", "forward2") for b in ("backward1", "backward2", "backward3", "backward4",
                                                            "backward5")]


@pytest.mark.parametrize("forms", ["direct", "other"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("forward,backward", PAIRS, ids=[f"{f}-{b}" for f, b in PAIRS])
def test_every_forced_pair_matches_float64(forward, backward, bias, forms):
    """Every forced pair runs as forced (the merged forward keeps P ⊙ mns for dm: lora_rewrite/dora.py);
    Y, dX, dA, dB, dm and the trainable bias against float64."""
    from lora_rewrite.forms import ROLES

    model = one_dora_linear(bias=bias)
    if bias:
        model.base_model.model.proj.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 7, 20, requires_grad=True)
    grad_out = torch.randn(3, 7, 28)
    y64, dx64, grads64 = float64_reference(model, x, grad_out)
    chosen = {role.name: role.forms[1] for role in ROLES} if forms == "other" else "direct"
    with debug.collect_reports() as reports:
        y, dx, grads = step(runlora(model, forward=forward, backward=backward, forms=chosen), x, grad_out)
    (site,) = sites(reports)
    assert (site.forward, site.backward) == (f"dora-{forward}", f"dora-{backward}")
    for what, ref, ours in [("Y", y64, y), ("dX", dx64, dx)] + [(n, grads64[n], grads[n]) for n in grads64]:
        assert rel_err(ref, ours) <= 2e-6, what
    assert any("lora_magnitude_vector" in n for n in grads) and (not bias or any(n.endswith("bias") for n in grads))


@pytest.mark.parametrize("backward,dropout", [("backward1", 0.0), ("backward5", 0.0), ("backward3", 0.25)],
                         ids=["backward1", "backward5", "backward3-dropout"])
def test_a_unit_scale_lora_alpha_equal_to_r_is_rewritten(backward, dropout):
    """s = 1 (lora_alpha = r, a common choice): autograd still multiplies dY by 1.0, and the base's input
    gradient reads the dY beneath that product; the site is rewritten, not left untouched (it was, until
    the matcher looked through the unit factor), and equals eager PEFT with the same masks."""
    site = assert_forced_backward_equals_eager(one_dora_linear(r=4, alpha=4, dropout=dropout), backward)
    assert site.backward == f"dora-{backward}" and site.dropout == bool(dropout)


def assert_forced_backward_equals_eager(model, backward, i=20, o=28):
    """One step of `model` (one adapted linear, i → o) compiled with `backward` forced equals eager PEFT's
    (Y, dX, every gradient), with the same dropout masks; the one site's report."""
    x = torch.randn(3, 7, i, requires_grad=True)
    grad_out = torch.randn(3, 7, o)
    torch.manual_seed(11)
    y_ref, dx_ref, g_ref = step(model, x, grad_out)
    with debug.collect_reports() as reports:
        compiled = runlora(model, backward=backward, fallback_random=True)
        torch.manual_seed(11)
        y, dx, grads = step(compiled, x, grad_out)
    (site,) = sites(reports)
    for what, ref, ours in [("Y", y_ref, y), ("dX", dx_ref, dx)] + [(n, g_ref[n], grads[n]) for n in g_ref]:
        assert rel_err(ref, ours) <= 2e-6, what
    return site


@pytest.mark.parametrize("backward", ["backward1", "backward2", "backward3"])
def test_dropout_with_the_same_masks_equals_eager_and_is_never_merged(backward):
    site = assert_forced_backward_equals_eager(one_dora_linear(dropout=0.25), backward)
    assert site.dropout and (site.forward, site.backward) == ("dora-forward1", f"dora-{backward}")


def test_bf16_adapters_are_as_close_to_float64_as_eager():
    model = one_dora_linear(dtype=torch.bfloat16)
    x = torch.randn(3, 7, 20, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(3, 7, 28, dtype=torch.bfloat16)
    y64, dx64, g64 = float64_reference(model, x, grad_out)
    y_eager, dx_eager, g_eager = step(model, x, grad_out)
    with debug.collect_reports() as reports:
        y, dx, grads = step(runlora(model), x, grad_out)
    assert len(sites(reports)) == 1
    eps = torch.finfo(torch.bfloat16).eps
    for what, ref, eager, ours in [("Y", y64, y_eager, y), ("dX", dx64, dx_eager, dx)] + \
            [(n, g64[n], g_eager[n], grads[n]) for n in g64]:
        assert rel_err(ref, ours) <= 1.5 * rel_err(ref, eager) + 4 * eps, what


def mixed_dora_linear(bias=True, dropout=0.0, i=20, o=28, r=4):
    """PEFT's default on a bf16 model (autocast_adapter_dtype): A, B and m in fp32 on a bf16 base."""
    from helpers import OneLinear, randomize_adapters
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = OneLinear(i, o, bias).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=3.0 * r, target_modules=["proj"], use_dora=True,
                                            lora_dropout=dropout))
    randomize_adapters(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    return model


MIXED = [(b, bias, dropout) for b in ("backward1", "backward2", "backward3") for bias in (True, False)
         for dropout in (0.0, 0.25)]


@pytest.mark.parametrize("backward,bias,dropout", MIXED,
                         ids=[f"{b}-{'bias' if bias else 'no-bias'}-{'dropout' if d else 'no-dropout'}"
                              for b, bias, d in MIXED])
def test_fp32_adapters_on_a_bf16_base_are_as_close_to_float64_as_eager(backward, bias, dropout):
    """X is cast up for the adapter and the bf16 base result enters the fp32 sum: rewritten with the
    factored forward (merging would round the fp32 adapter into the bf16 weight), the base's own bf16
    input gradient kept as the model computes it. Y, dX, dA, dB, dm (and the bias) as close to float64 as
    eager PEFT's; with dropout, the same masks (fallback_random) as eager and the float64 run."""
    model = mixed_dora_linear(bias=bias, dropout=dropout)
    if bias:
        model.base_model.model.proj.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 7, 20, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(3, 7, 28, dtype=torch.bfloat16)
    site = assert_as_close_to_float64_as_eager(model, x, grad_out, backward)
    assert (site.forward, site.backward, site.dtype) == ("dora-forward1", f"dora-{backward}", "float32")
    assert site.dropout == bool(dropout)


def assert_as_close_to_float64_as_eager(model, x, grad_out, backward, wrap=lambda m: m, float64_model=None):
    """One step of wrap(model) compiled with `backward` forced: Y, dX and every gradient (dm among them)
    within 1.5× eager PEFT's error against the float64 model (model in float64, or `float64_model`) + 4 bf16
    eps, with the same dropout masks; the one site's report."""
    torch.manual_seed(5)
    if float64_model is None:
        y64, dx64, g64 = float64_reference(model, x, grad_out)
    else:
        y64, dx64, g64 = step(float64_model, x.double().detach().requires_grad_(), grad_out.double())
    torch.manual_seed(5)
    y_eager, dx_eager, g_eager = step(wrap(model), x, grad_out)
    assert rel_err(y64, y_eager) <= 1e-2   # the float64 run dropped the same entries
    with debug.collect_reports() as reports:
        compiled = runlora(wrap(model), backward=backward, fallback_random=True)
        torch.manual_seed(5)
        y, dx, grads = step(compiled, x, grad_out)
    (site,) = sites(reports)
    unwrapped = lambda g: {k.removeprefix("inner."): v for k, v in g.items()}  # noqa: E731
    g64, g_eager, grads = unwrapped(g64), unwrapped(g_eager), unwrapped(grads)
    eps = torch.finfo(torch.bfloat16).eps
    assert g64.keys() == grads.keys() == g_eager.keys() and any("lora_magnitude_vector" in n for n in grads)
    for what, ref, eager, ours in [("Y", y64, y_eager, y), ("dX", dx64, dx_eager, dx)] + \
            [(n, g64[n], g_eager[n], grads[n]) for n in g64]:
        assert ours.dtype == eager.dtype, what
        assert rel_err(ref, ours) <= 1.5 * rel_err(ref, eager) + 4 * eps, what
    return site


AUTOCAST = [(b, bias, dropout, "fp32") for b in ("backward1", "backward2", "backward3") for bias in (True, False)
            for dropout in (0.0, 0.25)] + [("backward1", True, 0.0, "bf16"), ("backward3", False, 0.25, "bf16")]


@pytest.mark.parametrize("backward,bias,dropout,model_dtype", AUTOCAST,
                         ids=[f"{b}-{'bias' if bias else 'no-bias'}-{'dropout' if d else 'no-dropout'}-{m}-model"
                              for b, bias, d, m in AUTOCAST])
def test_autocast_is_rewritten_and_as_close_to_float64_as_eager(backward, bias, dropout, model_dtype):
    """torch.autocast(bf16), as Trainer(bf16=True) runs a model: every product in bf16, m and the norm in
    fp32, so PEFT's DoRA sum is fp32. Rewritten with the factored forward, P summed in fp32 from the bf16
    products (never rounded to bf16), dP = bf16(mns ⊙ dY) as autograd casts it, the base's own bf16 input
    gradient kept; the merged variants are illegal (they would round the fp32 sum into a bf16 weight). On
    an fp32 model and on a bf16 one (PEFT's fp32 adapters): Y, dX, dA, dB, dm (and the bias) as close to
    float64 as eager PEFT's, with the same dropout masks."""
    from helpers import Autocast

    if model_dtype == "fp32":
        model = one_dora_linear(bias=bias, dropout=dropout)
    else:
        model = mixed_dora_linear(bias=bias, dropout=dropout)
    if bias:
        model.base_model.model.proj.base_layer.bias.requires_grad_(True)
    dtype = torch.float32 if model_dtype == "fp32" else torch.bfloat16
    x = torch.randn(3, 8, 20, dtype=dtype, requires_grad=True)   # N = 24: dm's blocked token_sum
    grad_out = torch.randn(3, 8, 28, dtype=torch.bfloat16)
    site = assert_as_close_to_float64_as_eager(model, x, grad_out, backward, wrap=Autocast)
    assert (site.forward, site.backward, site.dtype) == ("dora-forward1", f"dora-{backward}", "bfloat16")
    assert site.dropout == bool(dropout)


@pytest.mark.parametrize("case", ["autocast", "bf16-base-fp32-adapters"])
def test_a_16_bit_base_under_a_32_bit_sum_keeps_only_the_base_for_dm(monkeypatch, case):
    """dm = Σₙ dY ⊙ P / ‖W′‖ with P = X·Wᵀ + s·(X·Aᵀ)·Bᵀ summed in fp32 from a bf16 base product (torch.autocast;
    PEFT's fp32 adapters on a bf16 model): the forward keeps the bf16 X·Wᵀ alone (2 bytes an element, not
    an fp32 P's 4 or the two bf16 products) and the backward takes the adapter's part from dB°:
    rowsum(dB° ⊙ B). The gradients are checked against float64 by the tests above."""
    from helpers import Autocast, compiled_graphs

    if case == "autocast":
        model, wrap, dtype = one_dora_linear(), Autocast, torch.float32
    else:
        model, wrap, dtype = mixed_dora_linear(), lambda m: m, torch.bfloat16
    x = torch.randn(3, 8, 20, dtype=dtype, requires_grad=True)
    graphs = compiled_graphs(monkeypatch)
    with debug.collect_reports() as reports:
        step(runlora(wrap(model)), x, torch.randn(3, 8, 28, dtype=dtype))
    assert sites(reports)[0].forward == "dora-forward1"
    forward = graphs[0]
    (output,) = [n for n in forward.nodes if n.op == "output"]
    saved = output.args[0][1:]   # after the model's one output: what the backward reads
    n_by_o = sorted(str(a.meta["val"].dtype) for a in saved if isinstance(a, torch.fx.Node)
                    and a.meta["val"].numel() == 24 * 28)
    assert n_by_o == ["torch.bfloat16"], n_by_o


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_autocast_takes_over_the_whole_input_gradient_from_one_bf16_dy(monkeypatch, dropout):
    """Under autocast the base's own input gradient is the bf16 cast of (mns ⊙ dY) — of ((mns − 1) ⊙ dY)
    onto X̃ with dropout — times the bf16 W, summed with the adapter's: the rewrite takes that sum over
    (DxMode.TOTAL) with mns folded into W, so the backward casts one fp32 [N,o] down to bf16 (dY, for every
    product) instead of two (the adapter's and the base's); with dropout the model's own product on X casts
    dY too, and the rewrite's cast is merged with it (passes/fx.py, `merge_duplicate_casts`): one instead of
    three. Numerics: the autocast tests above."""
    from helpers import Autocast, compiled_graphs

    model = one_dora_linear(dropout=dropout)
    x = torch.randn(3, 8, 20, requires_grad=True)
    graphs = compiled_graphs(monkeypatch)
    with debug.collect_reports() as reports:
        step(runlora(Autocast(model)), x, torch.randn(3, 8, 28))
    (site,) = sites(reports)
    assert site.dx_mode == "total"
    assert reports[0].casts_merged >= (1 if dropout else 0)   # (and mns's [o] cast to bf16, in both)
    backward = graphs[1]
    casts_down = [n for n in backward.nodes if n.target is torch.ops.prims.convert_element_type.default
                  and n.args[1] == torch.bfloat16 and n.meta["val"].numel() == 24 * 28]
    assert len(casts_down) == 1, casts_down


@pytest.mark.parametrize("disable", [["dx_through_casts"], ["merge_casts"]])
def test_autocast_with_a_behaviour_disabled_is_still_eager_s_step(monkeypatch, disable):
    """Option `disable` (what scripts/ab_autocast_dx_total.py and ab_merge_casts.py measure): without
    `dx_through_casts` only the adapter's dX_a is replaced (DxMode.LORA) and the model's bf16 base gradient stays;
    without `merge_casts` the rewrite's cast of dY to bf16 is not merged with the model's own (two casts down).
    Either way the step's gradients are eager PEFT's."""
    from helpers import Autocast, assert_close_to, compiled_graphs

    model = one_dora_linear(dropout=0.25)
    x, grad_out = torch.randn(3, 8, 20, requires_grad=True), torch.randn(3, 8, 28)
    torch.manual_seed(3)
    y_ref, dx_ref, g_ref = step(Autocast(model), x, grad_out)
    graphs = compiled_graphs(monkeypatch)
    with debug.collect_reports() as reports:
        torch.manual_seed(3)
        y, dx, g = step(runlora(Autocast(model), disable=disable, fallback_random=True), x, grad_out)
    for what, ref, got in [("Y", y_ref, y), ("dX", dx_ref, dx)] + [(n, g_ref[n], g[n]) for n in g_ref]:
        assert_close_to(ref, got, rtol=2e-2, what=what)
    assert g.keys() == g_ref.keys() and len(g) == 3   # A, B and m
    (site,) = sites(reports)
    casts_down = [n for n in graphs[1].nodes if n.target is torch.ops.prims.convert_element_type.default
                  and n.args[1] == torch.bfloat16 and n.meta["val"].numel() == 24 * 28]
    if disable == ["dx_through_casts"]:
        assert site.dx_mode == "lora"
    else:
        assert site.dx_mode == "total" and reports[0].casts_merged == 0 and len(casts_down) >= 2, casts_down


def test_autocast_never_takes_a_merged_variant():
    """Forcing forward2 / backward5 under autocast falls back to a factored variant, with the reason."""
    from helpers import Autocast

    model = one_dora_linear()
    x = torch.randn(3, 8, 20, requires_grad=True)
    with debug.collect_reports() as reports:
        step(runlora(Autocast(model), forward="forward2", backward="backward5"), x, torch.randn(3, 8, 28))
    (site,) = sites(reports)
    assert site.forward == "dora-forward1" and site.backward not in ("dora-backward4", "dora-backward5")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_fp32_adapters_on_bf16_families_are_rewritten_and_as_close_to_float64_as_eager(family):
    """PEFT's default on a bf16 model, on the families: every DoRA linear rewritten (the factored forward),
    the loss and every gradient (A, B, m) as close to the float64 model's as eager PEFT's."""
    model = dora_model(family, dtype=torch.bfloat16)
    assert {p.dtype for p in trainable(model).values()} == {torch.float32}
    assert_model_as_close_to_float64_as_eager(model, lambda m: m, "float32")


def assert_model_as_close_to_float64_as_eager(model, wrap, compute_dtype: str):
    """wrap(model) under runlora: every DoRA linear rewritten with the factored forward, computing in
    `compute_dtype`; the loss and every gradient (A, B, m) as close to the float64 model's as eager PEFT's."""
    eager_model, compiled_model = twins(model)
    (model64,) = twins(model, 1)
    model64 = model64.double()
    loss64, grads64 = loss_and_grads(model64, model64, batch())
    loss_ref, grads_ref = loss_and_grads(wrap(eager_model), eager_model, batch())
    wrapped = wrap(compiled_model)
    with debug.collect_reports() as reports:
        loss, grads = loss_and_grads(runlora(wrapped), compiled_model, batch())
    assert_all_rewritten(reports, wrapped)   # under a wrapper its sites are named inner.…
    assert {(s.forward, s.dtype) for s in sites(reports)} == {("dora-forward1", compute_dtype)}
    eps = torch.finfo(torch.bfloat16).eps
    assert rel_err(loss64, loss) <= 1.5 * rel_err(loss64, loss_ref) + eps
    assert grads.keys() == grads_ref.keys() == grads64.keys()
    for name in grads64:
        assert rel_err(grads64[name], grads[name]) <= 1.5 * rel_err(grads64[name], grads_ref[name]) + 4 * eps, name


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_autocast_on_families_is_rewritten_and_as_close_to_float64_as_eager(family):
    """An fp32 model under torch.autocast(bf16) (Trainer(bf16=True)): every DoRA linear rewritten with the
    factored forward, the loss and every gradient (A, B, m) as close to the float64 model's as eager PEFT's."""
    from model_builders import Autocast

    assert_model_as_close_to_float64_as_eager(dora_model(family), Autocast, "bfloat16")


@pytest.mark.parametrize("magnitude_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_magnitude_in_another_dtype_is_a_widened_sum_or_left_untouched(magnitude_dtype):
    """bf16 adapters on a bf16 model with the magnitude in another dtype (not what PEFT builds). An fp32
    m makes the sum fp32 over bf16 products, autocast's algebra: rewritten as that. A float64 m is not a
    sum the rewrite knows: left untouched with the reason. Either way the loss and every gradient (A, B, m) are
    as close to the float64 model's as eager PEFT's."""
    model = dora_model("llama", layers=1, dtype=torch.bfloat16, autocast_adapter_dtype=False)
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.data = p.data.to(magnitude_dtype)
    eager_model, compiled_model = twins(model)
    (model64,) = twins(model, 1)
    model64 = model64.double()
    loss64, grads64 = loss_and_grads(model64, model64, batch())
    with debug.collect_reports() as reports:
        loss_ref, grads_ref = loss_and_grads(eager_model, eager_model, batch())
        loss, grads = loss_and_grads(runlora(compiled_model), compiled_model, batch())
    eps = torch.finfo(torch.bfloat16).eps
    assert rel_err(loss64, loss) <= 1.5 * rel_err(loss64, loss_ref) + eps
    assert grads.keys() == grads_ref.keys() == grads64.keys() and len(grads) == 3 * len(lora_linears(model))
    for name in grads64:
        assert rel_err(grads64[name], grads[name]) <= 1.5 * rel_err(grads64[name], grads_ref[name]) + 4 * eps, name
    if magnitude_dtype == torch.float32:
        assert_all_rewritten(reports, model)
        assert {(s.forward, s.dtype) for s in sites(reports)} == {("dora-forward1", "bfloat16")}
    else:
        assert sites(reports) == [] and skipped(reports)
        assert all("mixes dtypes" in s.reason for s in skipped(reports))


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base-fp32-adapters"])
def test_saved_for_backward_is_at_most_plain_lora_s_plus_one_n_by_o(base_dtype):
    """Bytes autograd saves on a DoRA layer: at most stock Inductor's on plain LoRA of the same shapes plus
    P, one [N,o] per site in the adapter's dtype (fp32 under PEFT's default on a bf16 model); stock
    Inductor on DoRA saves more than that."""
    from helpers import OneLinear
    from peft import LoraConfig, get_peft_model

    n_lead, i, o, r = (8, 16), 48, 64, 4
    x = torch.randn(*n_lead, i, dtype=base_dtype)

    def saved(use_dora, backend):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = get_peft_model(OneLinear(i, o, bias=False).to(base_dtype),
                               LoraConfig(r=r, lora_alpha=8, target_modules=["proj"], use_dora=use_dora))
        compiled = runlora(model) if backend == "runlora" else stock(model)
        return activation_bytes_saved_for_backward(model, lambda: compiled(x.clone().requires_grad_()))

    n = n_lead[0] * n_lead[1]
    bound = saved(False, "stock") + n * o * torch.finfo(torch.float32).bits // 8
    assert saved(True, "runlora") <= bound < saved(True, "stock")


# --- PEFT features ----------------------------------------------------------------------------------

def test_two_dora_adapters_active_at_once_the_second_is_left_untouched_with_the_reason():
    """Two DoRA adapters active on one layer: PEFT sums the second's DoRA output onto the first's, a sum that is
    no DoRA sum on a base product. The first is rewritten, the second left as stock Inductor compiles it with the
    reason; the step (Y, dX, A, B, m of both) equals eager PEFT's."""
    from helpers import assert_same_step, randomize_adapters
    from peft import LoraConfig

    model = one_dora_linear()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], use_dora=True))
    model.base_model.set_adapter(["default", "second"])
    randomize_adapters(model)
    x, grad_out = torch.randn(2, 5, 20, requires_grad=True), torch.randn(2, 5, 28)
    eager = step(model, x, grad_out)
    with debug.collect_reports() as reports:
        rewritten = step(runlora(model), x, grad_out)
    assert_same_step(eager, rewritten, rtol=1e-5, trained=6)
    assert [(s.adapter, s.kind) for s in sites(reports)] == [("default", "dora")]
    (untouched,) = skipped(reports)
    assert untouched.module == "base_model.model.proj" and untouched.reason.startswith("DoRA: ")


def test_several_adapters_with_set_adapter():
    from peft import LoraConfig

    model = dora_model("llama", layers=1)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, use_dora=True, target_modules=["q_proj", "down_proj"]))
    randomize_lora_b(model, seed=5)
    eager_model, compiled_model = twins(model)
    compiled = runlora(compiled_model)
    for adapter in ("default", "other", "default"):
        eager_model.set_adapter(adapter)
        compiled_model.set_adapter(adapter)
        with debug.collect_reports() as reports:
            _, grads = assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch())
        assert grads and all(f".{adapter}." in name for name in grads)
        if reports:
            assert_all_rewritten(reports, compiled_model)
            assert {s.adapter for s in sites(reports)} == {adapter}


def test_disable_adapter_and_merge_unmerge():
    model = dora_model("llama", layers=1)
    eager_model, compiled_model = twins(model)
    plain = base_model("llama", layers=1)
    compiled = runlora(compiled_model)
    inputs = batch()
    with debug.collect_reports() as reports:
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, inputs)
        with compiled_model.disable_adapter(), eager_model.disable_adapter(), torch.no_grad():
            got = compiled(**inputs).logits
            assert rel_err(plain(**inputs).logits, got) <= RTOL
        for m in (eager_model, compiled_model):
            m.merge_adapter()
        with torch.no_grad():
            assert rel_err(eager_model(**inputs).logits, compiled(**inputs).logits) <= RTOL
        for m in (eager_model, compiled_model):
            m.unmerge_adapter()
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, inputs)
    assert_all_rewritten([reports[0]], model)


def test_modules_to_save():
    model = dora_model("llama", modules_to_save=["lm_head"])
    eager_model, compiled_model = twins(model)
    with debug.collect_reports() as reports:
        _, grads = assert_step_equals_eager(eager_model, eager_model, runlora(compiled_model), compiled_model,
                                            batch())
    assert any("lm_head.modules_to_save" in name for name in grads)
    assert_all_rewritten(reports, model)


def test_gradient_checkpointing_rewrites_every_checkpointed_dora_layer():
    """PEFT's DoRA layer clears its cache dict on every training forward, a side effect Dynamo refuses
    inside a checkpointed region; the cache-clear stand-in (lora_rewrite/traceable_peft.py) reads the
    empty dict instead, so the checkpointed decoder layers are traced and every DoRA site is rewritten,
    forward and backward. The graphs and breaks are plain LoRA's under checkpointing (PEFT's input-gradient
    hook) and stock Inductor's on the same model; the steps equal eager PEFT's."""
    model = dora_model("llama", layers=1)
    eager_model, compiled_model, stock_model = twins(model, 3)
    lora_twin = peft_model("llama", layers=1)
    for m in (eager_model, compiled_model, stock_model, lora_twin):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    with debug.collect_reports() as reports:
        compiled = runlora(compiled_model)
        for seed in range(2):
            assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch(seed=seed))
    assert_all_rewritten(reports, model)
    counts = []
    for backend, m in ((stock, stock_model), (runlora, lora_twin)):
        counts.append(dynamo_counts())
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = backend(m)
        for seed in range(2):
            loss_and_grads(compiled, m, batch(seed=seed))
    counts.append(dynamo_counts())
    runlora_dora, stock_dora, runlora_lora = counts
    assert runlora_dora == stock_dora == runlora_lora


@pytest.mark.parametrize("seq", [4, 32])
def test_inference_takes_the_merged_forward(seq):
    """Without a backward nothing needs P, and Y = X·(mns ⊙ W′)ᵀ + b reuses the norm's W′ = W + s·B·A, which
    both forwards pay for: by FLOPs it wins at every N (forward1 adds 2N·r·(i + o)), one token or many."""
    model = dora_model("llama").eval()
    eager_model, compiled_model = twins(model)
    inputs = batch(size=1 if seq == 4 else 2, seq=seq)
    with torch.no_grad(), debug.collect_reports() as reports:
        ref = eager_model(**inputs)
        got = runlora(compiled_model)(**inputs)
    assert rel_err(ref.logits, got.logits) <= RTOL
    assert_all_rewritten(reports, model, backward=False)
    assert {s.forward for s in sites(reports)} == {"dora-forward2"}


def test_dynamic_sequence_lengths_compile_once_more_as_stock_does():
    model = dora_model("llama", layers=1)
    eager_model, compiled_model = twins(model)
    compiled = runlora(compiled_model)
    with debug.collect_reports() as reports:
        for seq in (8, 12, 20):
            assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch(seq=seq))
    assert len(reports) == 2   # the first length, then one dynamic graph for every other
    assert all(len(r.sites) == len(lora_linears(model)) and not r.skipped for r in reports)
    assert any(not isinstance(s.N, int) for s in reports[-1].sites)


def test_thirty_adamw_steps_train_like_eager_peft():
    model = dora_model("llama")
    eager_model, compiled_model = twins(model)
    data = batches(30, seq=12)
    losses_ref, weights_ref = train(eager_model, eager_model, data, lr=1e-3)
    with debug.collect_reports() as reports:
        losses, weights = train(runlora(compiled_model), compiled_model, data, lr=1e-3)
    initial = trainable(model)
    assert all(not torch.equal(initial[n], weights_ref[n]) for n in weights_ref)
    assert any("lora_magnitude_vector" in n for n in weights_ref)
    assert rel_err(losses_ref, losses) <= 1e-6 and max_rel_err(weights_ref, weights) <= 1e-5
    assert len(reports) == 1 and reports[0].sites and not reports[0].skipped


@pytest.mark.inductor
def test_real_inductor_code_generation_on_a_dora_llama():
    """The rewritten DoRA graphs through Inductor's code generation (the rest of this file runs them op
    by op): one training step equals eager PEFT's, every site rewritten."""
    model = dora_model("llama", layers=1)
    eager_model, compiled_model = twins(model)
    with debug.collect_reports() as reports:
        compiled = torch.compile(compiled_model, backend="runlora")
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch())
    assert_all_rewritten(reports, model)
