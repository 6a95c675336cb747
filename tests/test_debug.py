"""Debug output: log lines under TORCH_LOGS, the debug option, counters."""

import torch

from helpers import peft_linear, run_fresh_python, runlora_counters, step

SCRIPT = """
for lora_bias in (False, True):   # the second model's site is left untouched (lora_bias)
    torch._dynamo.reset()
    model = peft_model(lora_bias=lora_bias)
    torch.compile(model, backend="runlora", options={options})(torch.randn(2, 3, 16)).sum().backward()
"""


def run(env_extra, options="{'codegen': False}"):
    return run_fresh_python(SCRIPT.format(options=options), env=env_extra).stderr


def test_torch_logs_shows_each_site_and_each_untouched_one_with_the_compile_id():
    lines = run({"TORCH_LOGS": "+lora_rewrite"}).splitlines()
    line = next(l for l in lines if "rewrote base_model.model.proj" in l)
    assert "[0/0]" in line and "N=6 i=16 o=24 r=4" in line and "forward" in line
    skip = next(l for l in lines if "base_model.model.proj: not rewritten: lora_B has a bias" in l)
    assert "[0/0]" in skip


def test_debug_option_prints_the_report_table_without_torch_logs():
    err = run({}, options="{'codegen': False, 'debug': True}")
    assert "runlora graph 0/0 (joint): 1 site(s) rewritten" in err
    assert "base_model.model.proj" in err


def test_environment_variable_turns_debug_on_and_nothing_is_printed_without_it():
    assert "runlora graph 0/0 (joint)" in run({"RUNLORA_DEBUG": "1"})
    quiet = run({})
    assert "runlora graph" not in quiet and "rewrote" not in quiet


def test_counters_count_found_rewritten_and_skipped_sites():
    model = peft_linear(16, 24, 4)
    step(torch.compile(model, backend="runlora", options={"codegen": False}), torch.randn(2, 3, 16, requires_grad=True))
    c = runlora_counters()
    assert c["graphs"] == 1 and c["sites_found"] == 1 and c["sites_rewritten"] == 1
    assert c["sites_skipped"] == 0 and c["backward_rewritten"] == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = peft_linear(16, 24, 4, lora_bias=True)
    step(torch.compile(model, backend="runlora", options={"codegen": False}), torch.randn(2, 3, 16, requires_grad=True))
    c = runlora_counters()
    assert c["sites_found"] == 1 and c["sites_rewritten"] == 0 and c["sites_skipped"] == 1


def test_a_graph_without_lora_says_so_in_one_info_line(caplog):
    import logging

    from helpers import OneLinear

    with caplog.at_level(logging.INFO, logger="lora_rewrite"):
        step(torch.compile(OneLinear(16, 24), backend="runlora", options={"codegen": False}),
             torch.randn(2, 3, 16, requires_grad=True))
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lora_rewrite"]
    assert said == [("INFO", "runlora graph 0/0 (joint): no PEFT LoRA layer found in this graph")]
    assert runlora_counters()["graphs"] == 1 and runlora_counters()["sites_found"] == 0


def test_a_graph_with_lora_left_untouched_says_why_in_one_info_line(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lora_rewrite"):
        step(torch.compile(peft_linear(16, 24, 4, lora_bias=True), backend="runlora", options={"codegen": False}),
             torch.randn(2, 3, 16, requires_grad=True))
    said = [r.getMessage() for r in caplog.records if r.name == "lora_rewrite" and r.levelname == "INFO"]
    assert said == ["runlora graph 0/0 (joint): 1 PEFT LoRA chain(s) found, none rewritten (lora_B has a bias "
                    "(lora_bias=True), which the rewrite does not cover)"]
