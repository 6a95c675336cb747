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


def test_finetune_compare_runs_every_backend_writes_the_curve_and_reports_rewrites(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}   # the pass must run: no cache hit
    result = subprocess.run([sys.executable, str(EXAMPLE), *TINY, "--out", str(tmp_path), "--compare",
                             "--loraplus-ratio", "16"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curve: {png}" in out
    rewritten = re.search(r"runlora: rewrote (\d+) of (\d+) LoRA sites", out)
    assert rewritten and int(rewritten.group(1)) == int(rewritten.group(2)) == 7   # 1 layer × 7 linears
    for backend in ("eager", "inductor", "runlora"):
        assert re.search(rf"^\s*{backend} \|", out, re.MULTILINE), out
    assert "runlora vs eager:" in out and "runlora vs inductor:" in out

    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = {r["backend"]: r["losses"] for r in summary["results"]}
    assert all(len(curve) == 3 for curve in losses.values())
    # same initial weights, same batches: the same training run, up to rounding
    assert max(abs(a - b) for a, b in zip(losses["eager"], losses["runlora"])) < 1e-3


def test_plain_adamw_trains_only_the_adapters():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(TINY)
    model = example.build_model(args)
    optimizer = example.make_optimizer(model, args)
    assert isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert group["params"] and all("lora_" in names[id(p)] for p in group["params"])
