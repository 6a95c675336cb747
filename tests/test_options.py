"""Options: validation with errors that name the valid choices, and what each option changes."""

import pytest
import torch

from helpers import assert_same_step, peft_linear, runlora_counters, step
from lora_rewrite.options import RunLoraOptions


@pytest.mark.parametrize("options,message", [
    ({"critrion": "flops"}, "unknown runlora option(s) ['critrion']; valid runlora options are"),
    ({"criterion": "speed"}, "'criterion' must be one of ['flops', 'roofline', 'time']"),
    ({"forward": "forward3"}, "'forward' must be one of ['forward1', 'forward2']"),
    ({"forward": "backward1"}, "'forward' must be one of ['forward1', 'forward2']"),
    ({"backward": "backward6"}, "'backward' must be one of ['backward1', 'backward2', 'backward3', 'backward4', 'backward5']"),
    ({"dynamic_policy": "always"}, "'dynamic_policy' must be one of ['hint', 'guard']"),
    ({"codegen": "no"}, "'codegen' must be True or False"),
    ({"fuse_siblings": "yes"}, "'fuse_siblings' must be True or False"),
    ({"inductor": {"not_a_config_key": 1}}, "unknown Inductor config key(s) ['not_a_config_key']"),
    ({"inductor": 3}, "'inductor' must be a dict"),
    ({"forms": "fastest"}, "'forms' must be one of ['measured', 'direct'] or a dict {role: form}"),
    ({"forms": 1}, "'forms' must be one of ['measured', 'direct'] or a dict {role: form}"),
    ({"forms": {"dQ": "transposed"}}, "unknown product role 'dQ' in runlora option 'forms'; valid roles are"),
    ({"forms": {"dB": "folded"}}, "role 'dB' has forms ['direct', 'transposed'], got 'folded'"),
])
def test_bad_options_name_the_valid_choices(options, message):
    with pytest.raises(ValueError) as info:
        RunLoraOptions.from_user(options)
    assert message in str(info.value)


def test_unknown_option_error_lists_every_valid_key():
    with pytest.raises(ValueError) as info:
        RunLoraOptions.from_user({"bogus": 1})
    for key in VALID_KEYS:
        assert repr(key) in str(info.value)


VALID_KEYS = ("criterion", "forward", "backward", "dynamic_policy", "fuse_siblings", "codegen", "rewrite", "debug",
              "dump_dir", "inductor")


@pytest.mark.parametrize("options", [False, True, 3, "criterion", ["criterion"], ("criterion", "flops")])
def test_options_that_are_not_a_dict_are_the_unknown_key_error(options):
    with pytest.raises(ValueError) as info:
        RunLoraOptions.from_user(options)
    message = str(info.value)
    assert message.startswith("runlora options must be a dict of option names to values, got")
    assert all(repr(key) in message for key in VALID_KEYS)


@pytest.mark.parametrize("options", [3, "criterion", True, ["criterion"]])
def test_options_that_are_not_a_dict_fail_through_torch_compile(options):
    compiled = torch.compile(peft_linear(8, 8, 2), backend="runlora", options=options)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 8))
    assert "runlora options must be a dict of option names to values" in str(info.value)
    assert "valid runlora options are" in str(info.value)
    assert runlora_counters() == {}


def test_falsy_options_never_reach_the_backend_through_torch_compile():
    """torch.compile drops a falsy `options` (False, {}, 0) before calling any backend, stock Inductor
    included, so the backend cannot tell it from no options; called directly it raises as above."""
    from lora_rewrite import runlora

    received = []

    def probe(gm, example_inputs, **kwargs):
        received.append(kwargs)
        return gm.forward

    torch.compile(torch.nn.Linear(2, 2), backend=probe, options=False)(torch.randn(1, 2))
    assert received == [{}]
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="runlora options must be a dict"):
        runlora(gm, [torch.randn(1, 2)], options=False)


def test_a_bad_option_fails_the_compile_and_leaves_the_model_alone():
    model = peft_linear(8, 8, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled = torch.compile(model, backend="runlora", options={"criterion": "speed"})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 8))
    assert "'criterion' must be one of ['flops', 'roofline', 'time']" in str(info.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert runlora_counters() == {}


def test_inductor_keys_pass_through_as_stock_torch_compile_accepts_them():
    opts = RunLoraOptions.from_user({"max_autotune": False, "inductor": {"fallback_random": True}})
    assert dict(opts.inductor) == {"max_autotune": False, "fallback_random": True}


def test_env_variables_fill_debug_and_dump_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNLORA_DEBUG", "1")
    monkeypatch.setenv("RUNLORA_DUMP_DIR", str(tmp_path))
    opts = RunLoraOptions.from_user(None)
    assert opts.debug is True and opts.dump_dir == str(tmp_path)
    assert RunLoraOptions.from_user({"debug": False}).debug is False  # an explicit option wins


def test_options_that_change_the_rewrite_change_the_cache_key():
    base = RunLoraOptions()
    keys = {base.rewrite_key()}
    for change in ({"criterion": "roofline"}, {"forward": "forward2"}, {"backward": "backward3"},
                   {"dynamic_policy": "guard"}, {"rewrite": False}, {"forms": "direct"},
                   {"forms": {"dB": "transposed"}}, {"forms": {"dB": "direct"}}):
        keys.add(RunLoraOptions(**change).rewrite_key())
    assert len(keys) == 9


@pytest.mark.parametrize("criterion", ["flops", "roofline", "time"])
def test_every_criterion_compiles_and_is_correct(criterion):
    model = peft_linear(16, 24, 4)
    x = torch.randn(2, 8, 16, requires_grad=True)
    eager = step(model, x)
    rewritten = step(torch.compile(model, backend="runlora", options={"codegen": False, "criterion": criterion}), x)
    assert_same_step(eager, rewritten, rtol=1e-5)
    assert runlora_counters()["sites_rewritten"] == 1 and runlora_counters()["backward_rewritten"] == 1


# --- option `disable`: each behaviour of the pass can be switched off, for a same-process A/B -------------------

@pytest.mark.parametrize("disable,message", [
    (["merge_cast"], "'disable' must be a list of behaviour names from ['add_narrow_base', 'dx_through_casts', "
                     "'merge_casts', 'recompute_upcasts']"),
    (3, "'disable' must be a list of behaviour names"),
    ([None], "'disable' must be a list of behaviour names"),
])
def test_a_bad_behaviour_names_the_valid_ones(disable, message):
    with pytest.raises(ValueError) as info:
        RunLoraOptions.from_user({"disable": disable})
    assert message in str(info.value)


def test_disabled_behaviours_are_in_the_cache_key_in_any_order():
    keys = {RunLoraOptions(disable=d).rewrite_key() for d in ((), ["merge_casts"], ["recompute_upcasts"],
                                                              ["merge_casts", "recompute_upcasts"])}
    assert len(keys) == 4
    one, other = RunLoraOptions(disable=["merge_casts", "add_narrow_base"]), RunLoraOptions(
        disable=("add_narrow_base", "merge_casts", "merge_casts"))
    assert one.rewrite_key() == other.rewrite_key() and one.disable == ("add_narrow_base", "merge_casts")
    assert not one.enabled("merge_casts") and one.enabled("dx_through_casts")
    with pytest.raises(KeyError, match="the behaviours are"):
        one.enabled("merge_cast")


def bf16_base_fp32_adapters():
    """PEFT's default on a bf16 model: the adapters upcast to fp32 (autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    from helpers import OneLinear, randomize_adapters

    torch.manual_seed(0)
    model = get_peft_model(OneLinear(16, 24).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8,
                                                                             target_modules=["proj"]))
    randomize_adapters(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    return model


def test_disabling_recompute_upcasts_keeps_the_fp32_input_for_backward():
    """Off, the partitioner keeps X cast to fp32 for the backward (4 bytes an element) instead of the bf16 X (2):
    what scripts/ab_save_cast_input.py measures. The gradients are the same either way."""
    from helpers import activation_bytes_saved_for_backward

    model = bf16_base_fp32_adapters()
    x = torch.randn(4, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    eager = step(model, x)
    saved = {}
    for disable in ([], ["recompute_upcasts"]):
        compiled = torch.compile(model, backend="runlora", options={"codegen": False, "disable": disable})
        assert_same_step(eager, step(compiled, x), rtol=1e-2)
        saved[tuple(disable)] = activation_bytes_saved_for_backward(compiled, lambda: compiled(x.detach().requires_grad_()))
        torch._dynamo.reset()
    assert saved[("recompute_upcasts",)] - saved[()] >= 128 * 16 * 2, saved   # X [N,i] at 4 bytes, not 2


def test_disabling_add_narrow_base_widens_the_base_and_accumulates_onto_it(monkeypatch):
    """Off, forward1 casts the bf16 base to fp32 and accumulates the adapter onto it with addmm (the form before
    2026-12-06: scripts/ab_widened_base.py); on, it adds the base as it is. Same values either way."""
    from helpers import compiled_graphs

    model = bf16_base_fp32_adapters()
    x = torch.randn(4, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    eager = step(model, x)
    accumulates_onto_cast = {}
    for disable in ([], ["add_narrow_base"]):
        graphs = compiled_graphs(monkeypatch)
        compiled = torch.compile(model, backend="runlora", options={"codegen": False, "disable": disable,
                                                                    "forward": "forward1"})
        assert_same_step(eager, step(compiled, x), rtol=1e-2)
        forward = graphs[0]
        accumulates_onto_cast[tuple(disable)] = any(
            n.target is torch.ops.aten.addmm.default and n.args[0].target is torch.ops.prims.convert_element_type.default
            for n in forward.nodes if n.op == "call_function")
        torch._dynamo.reset()
    assert accumulates_onto_cast == {(): False, ("add_narrow_base",): True}


# --- environment variables: the options a Trainer user reaches without code ---------------------------------

@pytest.mark.parametrize("variable,value,option,expected", [
    ("RUNLORA_REWRITE", "0", "rewrite", False), ("RUNLORA_REWRITE", "off", "rewrite", False),
    ("RUNLORA_REWRITE", "1", "rewrite", True), ("RUNLORA_CRITERION", "roofline", "criterion", "roofline"),
    ("RUNLORA_FORMS", "direct", "forms", "direct"), ("RUNLORA_DUMP_DIR", "/tmp/runlora-dumps", "dump_dir",
                                                     "/tmp/runlora-dumps"),
])
def test_an_environment_variable_sets_its_option_and_an_explicit_option_wins(monkeypatch, variable, value, option,
                                                                            expected):
    monkeypatch.setenv(variable, value)
    assert getattr(RunLoraOptions.from_user(None), option) == expected
    explicit = {"rewrite": True, "criterion": "flops", "forms": "measured", "dump_dir": "/elsewhere"}[option]
    assert getattr(RunLoraOptions.from_user({option: explicit}), option) == explicit


@pytest.mark.parametrize("variable,value,valid", [
    ("RUNLORA_REWRITE", "maybe", "['1', 'true', 'yes', 'on', '0', 'false', 'no', 'off']"),
    ("RUNLORA_CRITERION", "fastest", "['flops', 'roofline', 'time']"),
    ("RUNLORA_FORMS", "transposed", "['measured', 'direct']"),
])
def test_a_bad_environment_value_is_an_error_naming_the_valid_ones(monkeypatch, variable, value, valid):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as info:
        RunLoraOptions.from_user({})
    assert f"{variable}={value!r}" in str(info.value) and valid in str(info.value)


def test_runlora_rewrite_0_compiles_exactly_like_stock_inductor(monkeypatch):
    monkeypatch.setenv("RUNLORA_REWRITE", "0")
    model = peft_linear(16, 24, 4)
    x = torch.randn(2, 8, 16, requires_grad=True)
    eager = step(model, x)
    assert_same_step(eager, step(torch.compile(model, backend="runlora", options={"codegen": False}), x), rtol=1e-5)
    assert runlora_counters().get("sites_rewritten", 0) == 0
