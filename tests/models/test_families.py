"""Real model families (random weights, no download) with LoRA on every attention and MLP linear: every
LoRA layer the step runs through is rewritten, forward and backward, the loss and every adapter
gradient equal eager PEFT's, and runlora compiles exactly the graphs stock Inductor compiles (no extra
graph break, no extra recompile)."""

import pytest
import torch

from model_builders import (FAMILIES, batch, dynamo_counts, executed_lora_linears, lora_linears, loss_and_grads,
                            max_rel_err, peft_model, rel_err, runlora, site_owner, stock, twins)
from lora_rewrite import debug

# fp32 gradients of one step: runlora and stock Inductor both differ from eager PEFT by ≤ 2.5e-6
# (relative, per tensor, ∞-norm) on these models; summation order alone moves them that much.
GRAD_RTOL = 2e-5

# Sibling groups fused (passes/fuse.py), two kinds of product (X·Aᵀ, dA) per group of adapters that read
# one input, in two layers: q/k/v and gate/up (Llama-like), q/k/v (OPT), query/key/value (encoders);
# GPT-2's attention is one fused c_attn already, so no two of its adapters share an input.
SIBLING_GROUPS_FUSED = {"llama": 8, "mistral": 8, "qwen2": 8, "opt": 4, "roberta": 4, "bert": 4, "gpt2": 0}


def optimizer_step(model, lr=1e-2):
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_lora_linear_is_rewritten_and_nothing_else_changes(family):
    """One training step equals eager PEFT with every LoRA linear it runs through rewritten; a second
    step after an update, on a new batch of the same shape, compiles nothing new; and Dynamo records the
    same graphs (recompiles included) and graph breaks as stock Inductor's pipeline on the same two steps."""
    model = peft_model(family)
    eager_model, compiled_model, stock_model = twins(model, 3)
    inputs = batch(seq=12)

    with executed_lora_linears(eager_model) as ran:
        loss_ref, grads_ref = loss_and_grads(eager_model, eager_model, inputs)
    assert len(ran) == len(set(ran)) == len(lora_linears(model))  # these models run every adapted linear once

    with debug.collect_reports() as reports:
        compiled = runlora(compiled_model)
        loss, grads = loss_and_grads(compiled, compiled_model, inputs)
    assert rel_err(loss_ref, loss) <= GRAD_RTOL
    assert grads.keys() == grads_ref.keys()
    assert max_rel_err(grads_ref, grads) <= GRAD_RTOL

    sites = [s for r in reports for s in r.sites]
    skipped = [s for r in reports for s in r.skipped]
    assert skipped == [], [s.line() for s in skipped]
    assert sorted(site_owner(s.module, ran) for s in sites) == sorted(ran), "one site per LoRA linear run"
    assert all(s.backward is not None for s in sites), [s.line() for s in sites if s.backward is None]
    counters = torch._dynamo.utils.counters["runlora"]
    assert counters["sites_rewritten"] == counters["backward_rewritten"] == len(ran)
    assert counters["sibling_groups_fused"] == SIBLING_GROUPS_FUSED[family]

    optimizer_step(compiled_model)
    loss_and_grads(compiled, compiled_model, batch(seq=12, seed=1))
    runlora_counts = dynamo_counts()
    assert counters["graphs"] == len(reports)  # nothing recompiled on the second step

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = stock(stock_model)
    loss_and_grads(compiled, stock_model, inputs)
    optimizer_step(stock_model)
    loss_and_grads(compiled, stock_model, batch(seq=12, seed=1))
    assert runlora_counts == dynamo_counts()


@pytest.mark.inductor
def test_same_graphs_as_real_inductor_on_llama():
    """The same comparison against backend="inductor" itself, with real code generation on both sides;
    and, against it, the activation bytes saved for backward drop by at least N·r·element_size a site."""
    from helpers import activation_bytes_saved_for_backward

    model = peft_model("llama", layers=1, target_modules=["q_proj", "v_proj", "down_proj"])
    counts, results, saved = {}, {}, {}
    for backend, options in (("inductor", None), ("runlora", {})):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        (m,) = twins(model, 1)
        compiled = torch.compile(m, backend=backend, options=options)
        results[backend] = [loss_and_grads(compiled, m, batch(seq=10, seed=seed)) for seed in (0, 1)]
        counts[backend] = dynamo_counts()
        saved[backend] = activation_bytes_saved_for_backward(m, lambda: compiled(**batch(seq=10, seed=2)).loss)
        if backend == "runlora":
            assert torch._dynamo.utils.counters["runlora"]["sites_rewritten"] == 3
    assert counts["runlora"] == counts["inductor"]
    n_tokens, r, element_size = 2 * 10, 4, 4
    assert saved["inductor"] - saved["runlora"] >= 3 * n_tokens * r * element_size, saved
    for (loss_ref, grads_ref), (loss, grads) in zip(results["inductor"], results["runlora"]):
        assert rel_err(loss_ref, loss) <= GRAD_RTOL and max_rel_err(grads_ref, grads) <= GRAD_RTOL
