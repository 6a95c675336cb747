"""PEFT features on a real model (a tiny Llama, or RoBERTa where the feature needs an encoder head) keep
working under runlora: each is compared with eager PEFT on the same state and inputs, and the reports say
which LoRA sites were rewritten and which were left alone."""

import pytest
import torch

from model_builders import (ENCODER_MODULES, base_model, batch, dynamo_counts, lora_linears, loss_and_grads,
                            max_rel_err, peft_model, randomize_lora_b, rel_err, runlora, site_owner, stock, twins)
from lora_rewrite import debug

# One fp32 training step on these models: runlora vs eager PEFT ≤ 2.5e-6 measured (see test_families).
RTOL = 2e-5


def sites(reports):
    return [s for r in reports for s in r.sites]


def skipped(reports):
    return [s for r in reports for s in r.skipped]


def assert_step_equals_eager(eager_fn, eager_model, compiled_fn, compiled_model, inputs, *, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    loss_ref, grads_ref = loss_and_grads(eager_fn, eager_model, inputs)
    if seed is not None:
        torch.manual_seed(seed)
    loss, grads = loss_and_grads(compiled_fn, compiled_model, inputs)
    assert rel_err(loss_ref, loss) <= RTOL, f"loss {loss_ref} vs {loss}"
    assert grads.keys() == grads_ref.keys()
    assert max_rel_err(grads_ref, grads) <= RTOL
    return loss, grads


def assert_all_rewritten(reports, model, *, backward=True):
    names = list(lora_linears(model))
    assert skipped(reports) == [], [s.line() for s in skipped(reports)]
    assert sorted(site_owner(s.module, names) for s in sites(reports)) == sorted(names)
    if backward:
        assert all(s.backward is not None for s in sites(reports))


# --- lora_dropout ---------------------------------------------------------------------------------------

MERGED_FORWARD = {"forward2"}
MERGED_BACKWARD = {"backward4", "backward5"}


@pytest.mark.parametrize("force", [False, True], ids=["criterion", "forced-merged"])
def test_lora_dropout_trains_like_eager_and_is_never_merged(force):
    """fallback_random: Inductor draws the dropout masks with eager's generator, so with the same seed
    eager and compiled drop the same entries and the steps can be compared exactly."""
    model = peft_model("llama", lora_dropout=0.25)
    eager_model, compiled_model = twins(model)
    options = {"fallback_random": True, **({"forward": "forward2", "backward": "backward5"} if force else {})}
    with debug.collect_reports() as reports:
        compiled = runlora(compiled_model, **options)
        for seed in range(3):
            assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch(seq=12, seed=seed),
                                     seed=100 + seed)
    assert_all_rewritten(reports, model)
    assert all(s.dropout for s in sites(reports))
    assert not {s.forward for s in sites(reports)} & MERGED_FORWARD
    # backward4/5 merge W + s·B·A for dX only; where the input needs no gradient (layer 0's q/k/v read the
    # frozen embedding) there is nothing to merge and a forced backward5 is backward1.
    assert not {s.backward for s in sites(reports) if s.needs_dx} & MERGED_BACKWARD


def test_lora_dropout_model_in_eval_mode_equals_eager():
    model = peft_model("llama", lora_dropout=0.25).eval()
    eager_model, compiled_model = twins(model)
    with debug.collect_reports() as reports:
        compiled = runlora(compiled_model)
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch(seq=12))
        with torch.no_grad():
            assert rel_err(eager_model(**batch(seq=12)).logits, compiled(**batch(seq=12)).logits) <= RTOL
    assert [r.kind for r in reports] == ["joint", "inference"]
    for report in reports:
        assert_all_rewritten([report], model, backward=report.kind == "joint")
    assert not any(s.dropout for s in sites(reports))  # eval: PEFT's dropout is the identity


# --- scale, bias, adapters --------------------------------------------------------------------------------

def test_use_rslora():
    model = peft_model("llama", layers=1, r=4, alpha=8, use_rslora=True)
    eager_model, compiled_model = twins(model)
    with debug.collect_reports() as reports:
        assert_step_equals_eager(eager_model, eager_model, runlora(compiled_model), compiled_model, batch())
    assert_all_rewritten(reports, model)
    assert {float(s.scale) for s in sites(reports)} == {8 / 4 ** 0.5}  # alpha/√r, not alpha/r


def test_lora_bias_is_left_untouched_and_still_correct():
    model = peft_model("llama", layers=1, lora_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
    eager_model, compiled_model = twins(model)
    with debug.collect_reports() as reports:
        _, grads = assert_step_equals_eager(eager_model, eager_model, runlora(compiled_model), compiled_model,
                                            batch())
    assert any(name.endswith("lora_B.default.bias") for name in grads)
    assert sites(reports) == []
    assert len(skipped(reports)) == len(lora_linears(model))
    assert all("lora_bias" in s.reason for s in skipped(reports))


def test_rank_one_adapters():
    """r = 1: X·Aᵀ is [N,1]. Rewritten here; where Inductor turns the rank-1 products into elementwise
    ops the site is left untouched instead (passes/match.py says why). Either way, eager's gradients."""
    model = peft_model("llama", layers=1, r=1)
    eager_model, compiled_model = twins(model)
    with debug.collect_reports() as reports:
        assert_step_equals_eager(eager_model, eager_model, runlora(compiled_model), compiled_model, batch())
    names = list(lora_linears(model))
    assert len(sites(reports)) + len(skipped(reports)) == len(names)
    assert all("rank 1" in s.reason for s in skipped(reports))
    assert all(s.r == 1 for s in sites(reports))


def test_several_adapters_with_set_adapter():
    """Switching the active adapter recompiles (PEFT's active adapter is guarded); every switch gives
    eager's result, including switching back to a graph compiled before."""
    from peft import LoraConfig

    model = peft_model("llama", layers=1)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora_b(model, seed=5)
    eager_model, compiled_model = twins(model)
    compiled = runlora(compiled_model)
    for adapter in ("default", "other", "default", "other"):
        eager_model.set_adapter(adapter)
        compiled_model.set_adapter(adapter)
        with debug.collect_reports() as reports:
            _, grads = assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch())
        assert grads and all(f".{adapter}." in name for name in grads)
        if reports:  # a cached graph is reused silently when switching back
            assert_all_rewritten(reports, compiled_model)
            assert {s.adapter for s in sites(reports)} == {adapter}
    assert torch._dynamo.utils.counters["runlora"]["graphs"] == 2


def test_disable_adapter_context_manager():
    model = peft_model("llama", layers=1)
    eager_model, compiled_model = twins(model)
    plain = base_model("llama", layers=1)  # the same weights, no PEFT
    compiled = runlora(compiled_model)
    inputs = batch()
    with debug.collect_reports() as reports:
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, inputs)
        with compiled_model.disable_adapter(), eager_model.disable_adapter():
            with torch.no_grad():
                got = compiled(**inputs).logits
                assert rel_err(eager_model(**inputs).logits, got) <= RTOL
                assert rel_err(plain(**inputs).logits, got) <= RTOL
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, inputs)
    assert len(reports) == 2
    assert_all_rewritten([reports[0]], model)
    assert reports[1].kind == "inference" and reports[1].sites == [] and reports[1].skipped == []


def test_merge_and_unmerge_adapter():
    model = peft_model("llama", layers=1)
    eager_model, compiled_model = twins(model)
    compiled = runlora(compiled_model)
    inputs = batch()
    with debug.collect_reports() as reports:
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, inputs)
        for m in (eager_model, compiled_model):
            m.merge_adapter()
        with torch.no_grad():
            assert rel_err(eager_model(**inputs).logits, compiled(**inputs).logits) <= RTOL
        for m in (eager_model, compiled_model):
            m.unmerge_adapter()
        assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, inputs)
    assert_all_rewritten([reports[0]], model)
    merged = [r for r in reports[1:] if r.kind == "inference"]
    assert merged and all(r.sites == [] for r in merged)


def test_modules_to_save():
    """RoBERTa sequence classification: PEFT trains a copy of the classifier head (modules_to_save) next
    to the adapters; its gradients are eager's and every adapter is still rewritten."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tf.RobertaForSequenceClassification(tf.RobertaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ENCODER_MODULES,
                                            modules_to_save=["classifier"]))
    randomize_lora_b(model)
    inputs = {"input_ids": batch()["input_ids"], "labels": torch.tensor([0, 2])}
    eager_model, compiled_model = twins(model)
    with debug.collect_reports() as reports:
        _, grads = assert_step_equals_eager(eager_model, eager_model, runlora(compiled_model), compiled_model,
                                            inputs)
    assert any("classifier.modules_to_save.default" in name for name in grads)
    assert_all_rewritten(reports, model)


def test_gradient_checkpointing_non_reentrant():
    """Each decoder layer runs under torch.utils.checkpoint (a tag_activation_checkpoint region in the
    graph, recomputed in the backward). PEFT's enable_input_require_grads hook calls requires_grad_()
    on the embedding output, a graph break for any backend: the graphs and breaks equal stock's."""
    model = peft_model("llama")
    eager_model, compiled_model, stock_model = twins(model, 3)
    for m in (eager_model, compiled_model, stock_model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    with debug.collect_reports() as reports:
        compiled = runlora(compiled_model)
        for seed in range(2):
            assert_step_equals_eager(eager_model, eager_model, compiled, compiled_model, batch(seed=seed))
    assert_all_rewritten(reports, model)
    runlora_counts = dynamo_counts()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = stock(stock_model)
    for seed in range(2):
        loss_and_grads(compiled, stock_model, batch(seed=seed))
    assert runlora_counts == dynamo_counts()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gradient_checkpointing_saves_no_more_than_stock_inductor(use_dora):
    """Under checkpointing the partitioner recomputes each tagged region and saves only its inputs. The
    nodes the rewrite adds carry the region's tags (passes/rewrite.py, COPIED_META): without them they were
    saved like any others, and runlora held 3× stock Inductor's bytes for backward on this model."""
    from helpers import activation_bytes_saved_for_backward

    model = peft_model("llama", layers=1, use_dora=use_dora)
    saved = {}
    for name, backend, m in zip(("runlora", "stock"), (runlora, stock), twins(model, 2)):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        compiled = backend(m)
        inputs = batch(size=2, seq=32)
        with debug.collect_reports() as reports:
            compiled(**inputs).loss.backward()
        if name == "runlora":
            assert_all_rewritten(reports, model)
        saved[name] = activation_bytes_saved_for_backward(m, lambda: compiled(**inputs).loss)
    assert saved["runlora"] <= saved["stock"], saved


# --- inference ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq,expected", [(4, "forward1"), (32, "forward2")])
def test_inference_gets_the_forward_only_rewrite(seq, expected):
    """model.eval() under torch.no_grad(): an inference graph, every site rewritten forward-only. By
    FLOPs the merged X·(W + s·B·A)ᵀ pays off once N > i·o/(i+o), here 16 for 32→32 and 21.3 for 32↔64:
    1×4 tokens stay with forward1, 2×32 tokens take forward2 at every site."""
    model = peft_model("llama").eval()
    eager_model, compiled_model = twins(model)
    inputs = batch(size=1 if seq == 4 else 2, seq=seq)
    with torch.no_grad(), debug.collect_reports() as reports:
        ref = eager_model(**inputs)
        got = runlora(compiled_model)(**inputs)
    assert rel_err(ref.logits, got.logits) <= RTOL and rel_err(ref.loss, got.loss) <= RTOL
    (report,) = reports
    assert report.kind == "inference"
    assert_all_rewritten(reports, model, backward=False)
    assert all(s.backward is None for s in report.sites)
    assert {s.forward for s in report.sites} == {expected}
