"""Debug output: log lines under TORCH_LOGS, the debug option, counters."""

import os
import subprocess
import sys

import torch

from helpers import peft_linear, runlora_counters, step

SCRIPT = """
import torch, torch.nn as nn
from peft import LoraConfig, get_peft_model
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.plain = nn.Linear(24, 24)
    def forward(self, x):
        return self.plain(self.proj(x))
for lora_bias in (False, True):   # the second model's site is left untouched (lora_bias)
    torch._dynamo.reset()
    model = get_peft_model(M(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_bias=lora_bias))
    torch.compile(model, backend="runlora", options={options})(torch.randn(2, 3, 16)).sum().backward()
"""


def run(env_extra, options="{'codegen': False}"):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "RUNLORA_DEBUG")}
    env.update({"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", **env_extra})
    code = SCRIPT.format(options=options)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


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
