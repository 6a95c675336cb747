"""examples/finetune.py, the main job, as a user runs it: a subprocess, at toy sizes, without Inductor
code generation (its hidden --no-codegen flag) so it finishes in seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--hidden-size", "32", "--layers", "1",
        "--heads", "2", "--rank", "4", "--corpus-mb", "0.05", "--no-codegen"]


def run_example(tmp_path, *extra):
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}   # the pass must run: no cache hit
    result = subprocess.run([sys.executable, str(EXAMPLE), *TINY, "--out", str(tmp_path), *extra],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads((tmp_path / "summary.json").read_text())


def test_finetune_compare_interleaves_backends_and_reports_noise_memory_and_loss_drift(tmp_path):
    out, summary = run_example(tmp_path, "--compare", "--loraplus-ratio", "16")

    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curve: {png}" in out
    rewritten = re.search(r"runlora: rewrote (\d+) of (\d+) LoRA sites", out)
    assert rewritten and int(rewritten.group(1)) == int(rewritten.group(2)) == 7   # 1 layer × 7 linears
    for backend in ("eager", "inductor", "inductor-again", "runlora"):
        assert re.search(rf"^\s*{backend} \|\s+[\d.]+ \|\s+[\d.]+–[\d.]+\s+\|", out, re.MULTILINE), out
    assert "A/A noise, stock Inductor timed twice in the same rounds: inductor-again" in out
    assert re.search(r"^runlora vs inductor: [\d.]+ % (less|more) time per step \(medians\): too few timed steps",
                     out, re.MULTILINE), out
    assert re.search(r"^runlora vs eager: [\d.]+ % (less|more) time per step", out, re.MULTILINE)
    for pair in ("eager vs inductor", "eager vs runlora", "inductor vs inductor-again"):
        assert re.search(rf"^  {pair} +\d\.\d\de[-+]\d\d \(", out, re.MULTILINE), pair

    results = {r["backend"]: r for r in summary["results"]}
    # interleaved: every round runs each backend once, in the same order
    starts = sorted((t, name) for name, r in results.items() for t in r["step_started"])
    assert [name for _, name in starts] == ["eager", "inductor", "inductor-again", "runlora"] * 3
    losses = {name: r["losses"] for name, r in results.items()}
    assert all(len(curve) == 3 for curve in losses.values())
    # same initial weights, same batches: the same training run, up to rounding
    assert max(abs(a - b) for a, b in zip(losses["eager"], losses["runlora"])) < 1e-3
    assert losses["inductor"] == losses["inductor-again"]
    # memory: X·Aᵀ (7 sites × N·r fp32) is what runlora does not keep and stock Inductor's pipeline does
    saved = {name: r["saved_for_backward_bytes"] for name, r in results.items()}
    assert saved["inductor"] - saved["runlora"] == 7 * 2 * 32 * 4 * 4
    assert re.search(r"^memory saved for backward in one step: runlora [\d.]+ MB, inductor [\d.]+ MB "
                     r"\(-[\d.]+ MB\), eager", out, re.MULTILINE)


def test_finetune_main_job_reports_step_spread_and_memory(tmp_path):
    out, summary = run_example(tmp_path)
    (result,) = summary["results"]
    assert result["backend"] == "runlora" and result["saved_for_backward_bytes"] > 0
    assert re.search(r"^\s*runlora \|\s+[\d.]+ \|\s+[\d.]+–[\d.]+\s+\|\s+[\d.]+ \|\s+[\d.]+ \|", out, re.MULTILINE)
    assert "runlora does not save X·Aᵀ for backward, which stock Inductor saves: 7.0 kB per step at 7 site(s)" in out
    assert "memory: bytes saved for backward" in out


def test_plain_adamw_trains_only_the_adapters():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example   # its dataclasses look their module up there
    spec.loader.exec_module(example)
    args = example.parse_args(TINY)
    model = example.build_model(args)
    optimizer = example.make_optimizer(model, args)
    assert isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert group["params"] and all("lora_" in names[id(p)] for p in group["params"])
