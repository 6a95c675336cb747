"""lora_rewrite/traceable_peft.py: the stand-ins for PEFT's `dequantize_module_weight`, `transpose` and
`DoraLinearLayer._cache_clear` that let Dynamo trace a DoRA layer as one graph. They must return (or
leave) exactly what PEFT's code does for every input it handles, and make a DoRA model one graph where
plain LoRA is — inside a checkpointed region too."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from helpers import result_line, run_fresh_python
from lora_rewrite import traceable_peft


def peft_function():
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight


def stand_in():
    return traceable_peft.make_stand_in(peft_function())


def test_plain_parameter_is_returned_as_it_is():
    layer = nn.Linear(8, 4)
    assert stand_in()(layer) is peft_function()(layer) is layer.weight


def test_fsdp_plain_tensor_is_returned_as_it_is():
    layer = nn.Linear(8, 4)
    plain = layer.weight.detach().clone()
    del layer.weight
    layer.weight = plain   # FSDP's unsharded views are plain tensors, not parameters
    assert stand_in()(layer) is peft_function()(layer) is plain


class HqqLike(nn.Module):
    """HQQ's layers hold W_q and dequantize themselves."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 8))
        self.W_q = torch.arange(32, dtype=torch.float32).view(4, 8)

    def dequantize(self):
        return self.W_q * 0.5


def test_hqq_weights_go_to_peft():
    layer = HqqLike()
    assert torch.equal(stand_in()(layer), peft_function()(layer))
    assert torch.equal(stand_in()(layer), layer.dequantize())


@pytest.mark.parametrize("kind", ["hqq", "torchao", "plain"])
def test_under_dynamo_every_weight_type_gives_peft_s_value(kind):
    """Traced by Dynamo, the stand-in runs in place of PEFT's function: a plain weight comes straight back
    (no graph break), any other goes to PEFT's own code — HQQ's branch traces, the torchao test breaks the
    graph, as before — never back into the stand-in (which would recurse without end)."""
    layer = HqqLike() if kind == "hqq" else nn.Linear(8, 4)
    if kind == "torchao":
        layer.weight = nn.Parameter(torch.ones(4, 8).as_subclass(TorchaoLikeTensor), requires_grad=False)
    expected, got, breaks = traced_through_peft_function(layer)
    assert torch.equal(got, expected)
    assert (breaks > 0) == (kind == "torchao")


def traced_through_peft_function(layer):
    """(eager value, value under Dynamo, graph breaks) of a function reading PEFT's dequantized weight."""
    x = torch.ones(3)
    expected = x * peft_function()(layer).sum()

    def reads_the_weight(x):
        return x * peft_function()(layer).sum()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = torch.compile(reads_the_weight, backend="eager")(x)
    return expected, got, sum(torch._dynamo.utils.counters["graph_break"].values())


class TorchaoLikeTensor(torch.Tensor):
    """A tensor subclass whose module is torchao's (what PEFT tests for)."""

    def dequantize(self):
        return self.as_subclass(torch.Tensor) * 2


TorchaoLikeTensor.__module__ = "torchao.quantization.fake"


def test_torchao_weights_go_to_peft():
    layer = nn.Linear(8, 4)
    layer.weight = nn.Parameter(torch.ones(4, 8).as_subclass(TorchaoLikeTensor), requires_grad=False)
    ours, theirs = stand_in()(layer), peft_function()(layer)
    assert torch.equal(ours, theirs) and torch.equal(ours, torch.full((4, 8), 2.0))
    assert traceable_peft.plain_weight(layer) is None


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_weights_go_to_peft(kind):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=False)
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    if kind == "4bit":
        layer(torch.randn(2, 64))   # quantises on first use on the CPU backend
    assert traceable_peft.plain_weight(layer) is None
    assert (traceable_peft.dequantized_4bit_weight(layer) is None) == (kind == "8bit")   # 8-bit: PEFT's own
    theirs = peft_function()(layer)
    ours = stand_in()(layer)
    assert ours.shape == (32, 64) and torch.equal(ours, theirs)


def test_a_4bit_weight_is_dequantized_in_the_graph_with_no_break():
    """PEFT's function tests a 4-bit weight's class name and, on a CPU, re-wraps the weight: Dynamo breaks
    the graph at both. The stand-in dequantizes it as PEFT does, traced: PEFT's value, no break."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=False)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    layer(torch.randn(2, 64))
    expected, got, breaks = traced_through_peft_function(layer)
    assert torch.equal(got, expected) and breaks == 0


def test_the_stand_ins_are_registered_once_and_peft_modules_are_untouched():
    from peft.utils import integrations, other

    from peft.tuners.lora.dora import DoraLinearLayer

    import importlib
    import importlib.util
    import sys

    if importlib.util.find_spec("kernels") is not None:   # transformers 5.25 and later bring it
        importlib.import_module("kernels._internals.layer.layer")
    assert traceable_peft.install() is True and traceable_peft.install() is True
    pefts_cache_clear = DoraLinearLayer._cache_clear.runlora_stand_in_for
    assert traceable_peft.is_pefts_cache_clear(pefts_cache_clear)
    pefts = {integrations.dequantize_module_weight, other.transpose, pefts_cache_clear}
    kernels_methods = set()
    if "kernels._internals.layer.layer" in sys.modules:
        context_var = sys.modules["kernels._internals.layer.layer"].CompileableContextVar
        kernels_methods = {context_var.set.runlora_stand_in_for, context_var.reset.runlora_stand_in_for}
        assert all(traceable_peft.is_kernels_context_var_method(m) for m in kernels_methods)
    assert len(traceable_peft._installed) == len(pefts) + len(kernels_methods)   # each once
    assert set(traceable_peft._installed) == pefts | kernels_methods


@pytest.mark.parametrize("kind", ["parameter", "tensor", "no fan_in_fan_out"])
def test_transpose_gives_peft_s_values_and_input_gradients(kind):
    """PEFT wraps a parameter's transpose in a new leaf parameter; the stand-in gives the same values,
    and the same gradients everywhere but on that throwaway leaf (the weight gets none either way)."""
    from peft.utils.other import transpose

    ours = traceable_peft.make_transpose_stand_in(transpose)
    weight = nn.Parameter(torch.randn(6, 4)) if kind == "parameter" else torch.randn(6, 4, requires_grad=True)
    fan_in_fan_out = kind != "no fan_in_fan_out"
    x = torch.randn(3, 6 if fan_in_fan_out else 4, requires_grad=True)
    results = []
    for fn in (transpose, ours):
        x.grad = weight.grad = None
        y = x @ fn(weight, fan_in_fan_out).T
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), None if weight.grad is None else weight.grad.clone()))
    (y_peft, dx_peft, dw_peft), (y_ours, dx_ours, dw_ours) = results
    assert torch.equal(y_peft, y_ours) and torch.equal(dx_peft, dx_ours)
    assert (dw_peft is None) == (dw_ours is None)
    if dw_peft is not None:
        assert torch.equal(dw_peft, dw_ours)


def test_a_dora_model_is_one_graph_with_no_break_through_the_backend_name_alone():
    """A fresh interpreter, no import of lora_rewrite: `backend="runlora"` loads the backend through its
    entry point, which installs the stand-in before Dynamo traces. 4 Llama layers, DoRA on all 7 linears."""
    proc = run_fresh_python("""
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, use_dora=True, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
ids = torch.randint(0, 128, (2, 16))
compiled = torch.compile(model, backend="runlora", options={"codegen": False})
compiled(input_ids=ids, labels=ids).loss.backward()
from torch._dynamo.utils import counters
print("RESULT " + json.dumps({"breaks": sum(counters["graph_break"].values()),
                              "graphs": counters["stats"]["unique_graphs"]}))
""")
    assert result_line(proc) == {"breaks": 0, "graphs": 1}


@pytest.mark.parametrize("order", ["peft first", "lora_rewrite first"])
def test_it_is_installed_whichever_is_imported_first(order):
    """peft first: installed on import of lora_rewrite. lora_rewrite first: peft is not imported for it
    (it costs seconds); a finder installs the stand-in as soon as peft.utils.integrations is imported."""
    imports = ["import peft", "import lora_rewrite"]
    if order == "lora_rewrite first":
        imports.reverse()
    code = "\n".join(["import json, sys", imports[0],
                      "early = 'lora_rewrite' in sys.modules and bool(sys.modules['lora_rewrite'].traceable_peft._installed)",
                      imports[1], "from lora_rewrite import traceable_peft",
                      "print('RESULT ' + json.dumps({'early': early, 'installed': bool(traceable_peft._installed)}))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):]) == {"early": False, "installed": True}


def dora_layer_with_cache(filled: bool):
    from peft.tuners.lora.dora import DoraLinearLayer

    layer = DoraLinearLayer(fan_in_fan_out=False)
    if filled:
        layer._cache_store("weight-norm-default", torch.ones(3))
    return layer


@pytest.mark.parametrize("filled", [False, True])
def test_cache_clear_leaves_the_cache_as_pefts_method_does(filled):
    """Outside torch.compile the stand-in is PEFT's method; traced, an empty cache stays empty with no
    mutation and a filled one is cleared (then the trace records the mutation, as before)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    stand_in = DoraLinearLayer._cache_clear
    pefts = stand_in.runlora_stand_in_for
    eager_layer, peft_layer, traced_layer = (dora_layer_with_cache(filled) for _ in range(3))
    stand_in(eager_layer)
    pefts(peft_layer)

    def clears(x):
        traced_layer._cache_clear()
        return x + 1

    torch._dynamo.reset()
    torch.compile(clears, backend="eager")(torch.ones(2))
    assert eager_layer._dora_cache == peft_layer._dora_cache == traced_layer._dora_cache == {}


@pytest.mark.parametrize("which", ["stand-in", "peft's"])
def test_an_empty_cache_clear_inside_a_checkpoint_does_not_break_the_graph(which):
    """PEFT's `_cache_clear` inside torch.utils.checkpoint breaks the graph (a side effect in a region
    the backward replays) and the region runs eagerly; the stand-in's traced form has no side effect."""
    from torch.utils.checkpoint import checkpoint

    layer = dora_layer_with_cache(filled=False)
    method = cache_clear_method(which)

    def region(x):
        method(layer)
        return (x * 2).sin()

    def fn(x):
        return checkpoint(region, x, use_reentrant=False)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randn(4, requires_grad=True)
    y = torch.compile(fn, backend="eager")(x)
    y.sum().backward()
    assert torch.allclose(x.grad, 2 * (2 * x.detach()).cos())
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert (breaks == 0) == (which == "stand-in"), dict(torch._dynamo.utils.counters["graph_break"])


def cache_clear_method(which):
    from peft.tuners.lora.dora import DoraLinearLayer

    stand_in = DoraLinearLayer._cache_clear
    return stand_in if which == "stand-in" else stand_in.runlora_stand_in_for


def test_a_changed_cache_clear_is_left_as_it_is():
    """A PEFT whose `_cache_clear` does more than clear the dict keeps its own method."""
    def _cache_clear(self):
        self._dora_cache.clear()
        self.cleared = True

    def _pefts(self):
        self._dora_cache.clear()

    assert not traceable_peft.is_pefts_cache_clear(_cache_clear)
    assert traceable_peft.is_pefts_cache_clear(_pefts)


def test_kernels_context_variable_records_nothing_while_traced_where_no_hub_kernel_is_selected():
    """transformers ≥ 5.25's kernels wraps attention forwards in a set/reset of a global variable, which Dynamo
    refuses inside a checkpointed region. The stand-ins record nothing while traced where every function runs
    its default forward (reading the variable changes nothing there); a selected hub kernel, and every call
    outside torch.compile, goes to kernels' methods. (With kernels installed the gradient checkpointing tests
    of tests/models/ run the real ones.)"""
    class Func(nn.Module):
        def forward(self, x):
            return x

    default, selected = (Func(), Func.forward), (Func(), lambda self, x: x)   # a hub kernel's forward
    assert traceable_peft.runs_default_forwards({1: default})
    assert not traceable_peft.runs_default_forwards({1: default, 2: selected})
    assert not traceable_peft.runs_default_forwards(None)

    recorded = []

    class ContextVar:   # kernels' CompileableContextVar, reduced to what the stand-ins call
        def set(self, value):
            recorded.append("set")
            return "token"

        def reset(self, token):
            recorded.append(f"reset {token}")

    var = ContextVar()
    set_ = traceable_peft.make_context_set_stand_in(ContextVar.set)
    reset_ = traceable_peft.make_context_reset_stand_in(ContextVar.reset)

    def step(x, value):
        token = set_(var, value)
        try:
            return x + 1
        finally:
            reset_(var, token)

    compiled = torch.compile(step, backend="eager")
    compiled(torch.ones(2), {1: default})
    assert recorded == []
    compiled(torch.ones(2), {1: default, 2: selected})
    assert recorded == ["set", "reset token"]
    step(torch.ones(2), {1: default})
    assert recorded == ["set", "reset token"] * 2
