"""`lora_rewrite.explain`: every site of a small Llama with module paths and variants; untouched layers
with their reasons; a plain-data form."""

import json
import re

import pytest
import torch

from helpers import peft_linear
from lora_rewrite import explain
from lora_rewrite.cost import choose
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 2, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **config))


def test_explain_lists_every_site_of_a_small_llama():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    report = explain(model, input_ids=ids, labels=ids, options={"codegen": False})
    expected = {f"base_model.model.model.layers.{k}.{part}.{name}"
                for k in range(2) for part, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:]))
                for name in names}
    assert {s.module for s in report.sites} == expected and len(report.sites) == 14
    assert report.untouched == [] and report.skipped == []
    for s in report.sites:
        assert (s.N, s.r, s.scale, s.dropout) == (32, 8, 2.0, False)
        d = Dims(s.N, s.i, s.o, s.r, s.needs_dx)
        assert s.forward == choose(FORWARDS, d, "flops").variant.name
        assert s.backward == choose(BACKWARDS, d, "flops").variant.name
        assert s.flops_after == FORWARDS[[v.name for v in FORWARDS].index(s.forward)].flops(d) + \
            BACKWARDS[[v.name for v in BACKWARDS].index(s.backward)].flops(d)
        assert s.saved_bytes_avoided == 32 * 8 * 4
    # The first layer's q/k/v read the (frozen) embeddings: no input gradient there.
    first_qkv = [s for s in report.sites if ".layers.0.self_attn." in s.module and s.module[-6:] != "o_proj"]
    assert first_qkv and all(not s.needs_dx for s in first_qkv)
    text = str(report)
    assert "base_model.model.model.layers.1.mlp.down_proj" in text and "why " in text


def test_explain_lists_dora_sites_and_dora_left_untouched_with_the_reason():
    """DoRA layers are rewritten sites (one graph: lora_rewrite/traceable_peft.py), with PEFT's default
    fp32 adapters on a bf16 model too, and with bf16 adapters under an fp32 magnitude (autocast's fp32 sum
    of bf16 products); with a sum in dtypes no rewrite knows (a float64 magnitude) they are left untouched,
    each named in the model with the reason."""
    model = tiny_llama(layers=1, use_dora=True)
    ids = torch.randint(0, 128, (2, 8))
    report = explain(model, input_ids=ids, options={"codegen": False})
    assert len(report.sites) == 7 and report.untouched == []
    assert {s.kind for s in report.sites} == {"dora"} and all(s.forward.startswith("dora-") for s in report.sites)

    torch.manual_seed(0)
    mixed = tiny_llama(layers=1, use_dora=True).to(torch.bfloat16)
    for name, p in mixed.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()   # PEFT's autocast_adapter_dtype: adapters and magnitude in fp32
    report = explain(mixed, input_ids=ids, options={"codegen": False})
    assert len(report.sites) == 7 and report.untouched == []
    assert {(s.kind, s.forward) for s in report.sites} == {("dora", "dora-forward1")}

    for name, p in mixed.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.data = p.data.to(torch.bfloat16)   # bf16 adapters, the magnitude left in fp32
    report = explain(mixed, input_ids=ids, options={"codegen": False})
    assert len(report.sites) == 7 and report.untouched == []
    assert {(s.kind, s.forward, s.dtype) for s in report.sites} == {("dora", "dora-forward1", "bfloat16")}

    for name, p in mixed.named_parameters():
        if "lora_magnitude_vector" in name:
            p.data = p.data.double()   # a float64 magnitude: a sum no rewrite knows
    report = explain(mixed, input_ids=ids, options={"codegen": False})
    assert report.sites == [] and len(report.untouched) == 7
    lora_layers = {u.module for u in report.untouched}
    assert all(u.module.startswith("base_model.model.model.layers.") for u in report.untouched)
    assert all("mixes dtypes" in u.reason for u in report.untouched)
    assert report.skipped and all(k.module in lora_layers for k in report.skipped)
    text = str(report)
    assert re.findall(r"^  untouched (\S+):", text, re.MULTILINE) == [k.module for k in report.skipped]
    # graphs without a LoRA site (how many depends on the torch release) are one line, not one table each
    assert "0 site(s) rewritten, 0 left untouched" not in text
    empty = [g for g in report.graphs if not (g.sites or g.skipped or g.fused)]
    assert text.count("without a PEFT LoRA site") == (1 if empty else 0)


def test_explain_folds_graphs_without_a_site_into_one_line():
    from lora_rewrite.debug import GraphReport, SkipReport
    from lora_rewrite.explain import ExplainReport, UntouchedLayer

    graphs = [GraphReport(f"{k}/0", "joint", "flops") for k in range(15)]
    graphs[3].skipped.append(SkipReport("m.proj", "DoRA"))
    text = str(ExplainReport(graphs, [UntouchedLayer("m.proj", "DoRA: …")]))
    assert text.splitlines() == [
        "runlora graph 3/0 (joint): 0 site(s) rewritten, 1 left untouched, criterion=flops",
        "  untouched m.proj: DoRA",
        "14 more graph(s) without a PEFT LoRA site: 0/0, 1/0, 2/0, 4/0, 5/0, 6/0, 7/0, 8/0, 9/0, 10/0, 11/0, 12/0, "
        "… (2 more)",
        "LoRA layers with no rewritten site:",
        "  m.proj: DoRA: …"]


def test_explain_on_a_model_without_lora_says_so():
    from helpers import OneLinear

    report = explain(OneLinear(16, 24), torch.randn(2, 3, 16), options={"codegen": False})
    assert report.sites == [] and report.skipped == [] and report.untouched == []
    assert str(report) == ("no PEFT LoRA layer found in this model: runlora had nothing to rewrite "
                           "(1 graph(s) compiled: 0/0)")


def test_explain_under_disable_adapter_says_the_adapters_are_disabled():
    model = peft_linear(16, 24, 4)
    with model.disable_adapter():
        report = explain(model, torch.randn(2, 3, 16), options={"codegen": False})
    assert report.sites == []
    (layer,) = report.untouched
    assert layer.module == "base_model.model.proj" and "disable_adapter" in layer.reason


def test_explain_on_a_merged_adapter():
    model = peft_linear(16, 24, 4)
    model.merge_adapter()
    report = explain(model, torch.randn(2, 3, 16), options={"codegen": False})
    (layer,) = report.untouched
    assert "merged" in layer.reason


def test_explain_resolves_paths_across_graph_breaks():
    """GPT-2's LM head breaks the graph; the compiled frame is then the inner model, and the report
    still names modules by their path in the model that was passed in."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = get_peft_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)),
                           LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    ids = torch.randint(0, 64, (2, 8))
    report = explain(model, input_ids=ids, labels=ids, options={"codegen": False})
    assert [s.module for s in report.sites] == ["base_model.model.transformer.h.0.attn.c_attn"]


def test_report_converts_to_plain_data():
    model = peft_linear(16, 24, 4)
    report = explain(model, torch.randn(2, 3, 16, requires_grad=True), options={"codegen": False})
    data = json.loads(report.to_json())
    (site,) = data["graphs"][0]["sites"]
    for key in ("module", "N", "i", "o", "r", "scale", "dropout", "forward", "backward", "flops_before",
                "flops_after", "saved_bytes_avoided", "forward_costs", "backward_costs", "notes"):
        assert key in site
    assert (site["i"], site["o"], site["r"], site["N"]) == (16, 24, 4, 6)
    assert data == report.to_dict() | {}


def test_explain_compiles_afresh_every_time():
    model = peft_linear(16, 24, 4)
    x = torch.randn(2, 3, 16, requires_grad=True)
    first = explain(model, x, options={"codegen": False})
    again = explain(model, x, options={"codegen": False, "forward": "forward2"})
    assert first.sites[0].forward == "forward1" and again.sites[0].forward == "forward2"
    assert len(explain(model, x, options={"codegen": False}).sites) == 1


def test_explain_passes_bad_options_errors_through():
    with pytest.raises(Exception, match="must be one of"):
        explain(peft_linear(8, 8, 2), torch.randn(2, 8), options={"criterion": "fastest"})


def test_explain_warns_about_nothing_it_asked_for():
    """explain() turns the compile caches off (and with them Dynamo's profile-guided dynamic shapes):
    Dynamo's "dynamo_pgo force disabled" UserWarning is not shown for that, on any call."""
    import warnings

    model = peft_linear(16, 24, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            explain(model, torch.randn(2, 3, 16), options={"codegen": False})
    assert [str(w.message) for w in caught if "dynamo_pgo" in str(w.message)] == []


# --- LoRA layers that never reached runlora: the graph breaks that kept them out --------------------------------

class _Flag:
    value = None


FLAG = _Flag()


class MutatingBlock(torch.nn.Module):
    """A layer whose forward changes a global object: a side effect Dynamo refuses inside a checkpointed region
    (transformers ≥ 5.25's kernels did one in every attention layer)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        FLAG.value = 1
        return self.proj(x)


class Checkpointed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = MutatingBlock()

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def peft_on(module):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(module, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))


def test_a_layer_a_skipped_checkpoint_kept_out_is_named_with_the_break_and_its_fix():
    report = explain(peft_on(Checkpointed()), torch.randn(2, 3, 16, requires_grad=True), options={"codegen": False})
    assert report.sites == []
    (layer,) = report.untouched
    assert layer.module == "base_model.model.block.proj"
    assert "Dynamo broke the graph" in layer.reason and "known fix" in layer.reason
    (side_effect,) = [b for b in report.graph_breaks if "side effect" in b.reason.lower()]
    # torch 2.13 names the checkpoint call, torch 2.12 the mutation inside the checkpointed block
    lines = {Checkpointed.forward.__code__.co_firstlineno + 1, MutatingBlock.forward.__code__.co_firstlineno + 1}
    assert side_effect.where.rpartition(":")[0].endswith("test_explain.py") and \
        int(side_effect.where.rpartition(":")[2]) in lines, side_effect.where
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint" in side_effect.fix
    text = str(report)
    assert "Dynamo broke the graph in" in text and side_effect.line() in text
    assert report.to_dict()["graph_breaks"][0].keys() == {"where", "reason", "fix"}


class LoggingBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        import logging

        logging.getLogger("a user's model").warning("a warning in the forward")
        return self.proj(x)


def test_a_break_dynamo_resumes_after_is_listed_and_the_layer_is_still_rewritten():
    """A logging call breaks the graph, Dynamo resumes after it: the LoRA layer is in the next graph, rewritten;
    the break is listed with its known fix all the same."""
    report = explain(peft_on(LoggingBlock()), torch.randn(2, 3, 16, requires_grad=True), options={"codegen": False})
    assert [s.module for s in report.sites] == ["base_model.model.proj"] and report.untouched == []
    line = LoggingBlock.forward.__code__.co_firstlineno + 3
    (logging_break,) = [b for b in report.graph_breaks if b.where.endswith(f"test_explain.py:{line}")]
    assert "logging.Logger" in logging_break.reason and "ignore_logging_functions" in logging_break.fix


def test_a_break_inside_the_adapter_splits_its_products_and_is_named_where_it_happened():
    """A user's hook that breaks the graph between A and B: X·Aᵀ and (X·Aᵀ)·Bᵀ are in two graphs, no site holds
    the chain; the layer is listed untouched, the break where the hook called it (no known fix: it is the user's)."""
    from helpers import OneLinear

    model = peft_on(OneLinear(16, 16))
    lora_a = model.base_model.model.proj.lora_A["default"]

    def break_here(module, inputs, output):
        torch._dynamo.graph_break()
        return output

    lora_a.register_forward_hook(break_here)
    report = explain(model, torch.randn(2, 3, 16, requires_grad=True), options={"codegen": False})
    assert report.sites == []
    (layer,) = report.untouched
    assert layer.module == "base_model.model.proj" and "Dynamo broke the graph" in layer.reason
    (user_break,) = [b for b in report.graph_breaks if b.where.endswith(
        f"test_explain.py:{break_here.__code__.co_firstlineno + 1}")]
    assert user_break.fix is None


def test_no_graph_break_no_break_listed():
    report = explain(peft_linear(16, 24, 4), torch.randn(2, 3, 16, requires_grad=True), options={"codegen": False})
    assert len(report.sites) == 1 and report.graph_breaks == [] and "Dynamo broke" not in str(report)


def test_the_debug_log_and_the_run_summary_name_the_graph_breaks_with_their_fixes(caplog, monkeypatch):
    """Outside explain() the breaks' places are not known, their reasons are (Dynamo's counters): with debug on,
    each report is followed by the breaks Dynamo met since the last one, and the main job's summary lists them."""
    import importlib.util
    import logging
    from pathlib import Path

    torch._dynamo.utils.counters.clear()
    model = peft_on(LoggingBlock())
    with caplog.at_level(logging.INFO, logger="lora_rewrite"):
        compiled = torch.compile(model, backend="runlora", options={"codegen": False, "debug": True})
        compiled(torch.randn(2, 3, 16, requires_grad=True)).sum().backward()
    (logged,) = [r.getMessage() for r in caplog.records if "Dynamo broke the graph before this report" in r.getMessage()]
    assert "logging.Logger method not supported" in logged and "ignore_logging_functions" in logged
    import sys

    spec = importlib.util.spec_from_file_location("finetune_example", Path(__file__).parents[1] / "examples" /
                                                  "finetune.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)   # its dataclasses look their module up there
    spec.loader.exec_module(example)
    summary = example.runlora_summary(dict(torch._dynamo.utils.counters["runlora"]))
    assert summary.startswith("runlora: rewrote 1 of 1 LoRA sites")
    assert "Dynamo broke the graph" in summary and "ignore_logging_functions" in summary


@pytest.mark.parametrize("reason,fix_says", [
    ("HOP: Non-nullified side effect\\n  Explanation: Attribute 'value' on an outer-scope object was changed",
     "skip_fwd_side_effects_in_bwd_under_checkpoint"),
    ("Mutating a variable from outside the scope of this HOP is not supported. Attempted to mutate "
     "UserDefinedObjectVariable(CompileableContextVar)", "kernels"),
    ("Unsupported: ... peft/utils/integrations.py dequantize_module_weight ... torchao", "stand-in"),
    ("torch._dynamo hit config.recompile_limit (8)", "recompile_limit"),
    ("logging.Logger method not supported for non-export cases", "ignore_logging_functions"),
    ("Missing tp_iternext: Dynamo does not support next() on dict_itemiterator", "PeftModel.forward"),
    ("Unsupported Tensor.requires_grad_() call", "enable_input_require_grads"),
])
def test_each_known_cause_has_its_fix(reason, fix_says):
    from lora_rewrite.explain import known_fix

    assert fix_says in known_fix(reason)


def test_an_unknown_cause_has_no_fix():
    from lora_rewrite.explain import known_fix

    assert known_fix("Call to a C extension Dynamo cannot trace") is None


def test_the_recompile_limit_is_in_the_run_summary_with_its_fix():
    """Past Dynamo's recompile limit a frame runs eagerly for good, its LoRA layers with it: no report of runlora's
    can say so (nothing is compiled any more), the run's summary does, from Dynamo's counters."""
    from lora_rewrite.explain import dynamo_break_reasons, graph_break_summary

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(peft_linear(16, 24, 4), backend="runlora", dynamic=False, options={"codegen": False})
    with torch._dynamo.config.patch(recompile_limit=1):
        for tokens in (3, 4, 5):
            compiled(torch.randn(2, tokens, 16, requires_grad=True)).sum().backward()
    lines = graph_break_summary(dynamo_break_reasons(torch._dynamo.utils.counters))
    (limit,) = [line for line in lines if "recompile limit" in line.lower()]
    assert limit.startswith("Dynamo skipped a whole frame") and "torch._dynamo.config.recompile_limit" in limit
