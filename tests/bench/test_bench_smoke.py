"""The runlora-bench command end to end, at toy sizes: layer mode and model mode (tiny-llama).

Compiled without Inductor code generation (--no-codegen) and with one round (--smoke): these tests
check what the command produces (table, CSV, JSON, PNGs, rows and columns), not speed.
"""

from __future__ import annotations

import csv
import json

import pytest

from lora_rewrite.bench import report
from lora_rewrite.bench.__main__ import PROTOCOL_MIN_ROUNDS, PROTOCOL_MIN_WARMUP, build_parser, main

SMOKE = ["--smoke", "--rounds", "1", "--warmup", "1", "--no-codegen", "--no-progress", "--plot"]
ROWS = ["eager", "inductor", "runlora-flops", "frozen"]


def _read_outputs(prefix):
    with open(f"{prefix}.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    with open(f"{prefix}.json") as f:
        data = json.load(f)
    return csv_rows, data


def _check_table(markdown: str, titles):
    for _, header in report.COLUMNS:
        assert header in markdown
    for title in titles:
        assert f"**{title}**" in markdown
    for name in ROWS:
        assert f"| {name} |" in markdown


def test_layer_mode(tmp_path, capsys):
    prefix = tmp_path / "layer"
    assert main(["--layer", "--in", "32", "--out-features", "32", "48", "--tokens", "64", "--rank", "4",
                 "-o", str(prefix), *SMOKE]) == 0
    printed = capsys.readouterr().out
    titles = ["i=32 o=32 N=64 (b=32) r=4 fp32", "i=32 o=48 N=64 (b=32) r=4 fp32"]
    _check_table(printed, titles)
    assert (tmp_path / "layer.md").read_text() in printed

    csv_rows, data = _read_outputs(prefix)
    assert list(csv_rows[0]) == report.CSV_FIELDS
    assert [(r["case"], r["implementation"]) for r in csv_rows] == [(t, n) for t in titles for n in ROWS]
    assert [c["title"] for c in data["cases"]] == titles
    assert data["command"].startswith("runlora-bench --layer --in 32")
    assert {"cpu", "torch", "date", "device"} <= set(data["machine"])
    for case in data["cases"]:
        rows = {r["implementation"]: r for r in case["rows"]}
        assert rows["frozen"]["ratio_to_frozen"] == pytest.approx(1.0)
        assert rows["eager"]["speedup_vs_eager_pct"] is None
        assert rows["runlora-flops"]["sites_rewritten"] == 1
        assert rows["inductor"]["sites_rewritten"] is None
        # the frozen linear saves nothing for backward: its dX needs only W, a parameter
        assert rows["frozen"]["saved_for_backward_mb"] == 0
        assert all(r["page_faults_per_step"] >= 0 for r in case["rows"])   # counted on every timed step
        assert rows["eager"]["saved_for_backward_mb"] > 0
        assert all(r["samples"] == 1 and r["first_step_s"] > 0 for r in rows.values())
    for png in ("layer_speedup.png", "layer_map_i32_o32.png", "layer_map_i32_o48.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_mode_tiny_llama(tmp_path, capsys):
    prefix = tmp_path / "tiny"
    assert main(["-m", "tiny-llama", "--n_batch", "1", "--seq_len", "8", "-r", "4", "-o", str(prefix), *SMOKE]) == 0
    title = "tiny-llama b=1 s=8 r=4 fp32"
    _check_table(capsys.readouterr().out, [title])

    csv_rows, data = _read_outputs(prefix)
    assert [r["implementation"] for r in csv_rows] == ROWS
    (case,) = data["cases"]
    assert case["settings"]["lora_sites"] == 14          # 2 layers × 7 linears
    rows = {r["implementation"]: r for r in case["rows"]}
    assert rows["runlora-flops"]["sites_rewritten"] == 14
    assert sum(rows["runlora-flops"]["variants"]["choices"].values()) == 14
    assert data["memory_method"].startswith("bytes saved for backward")
    shapes = [tuple(s) for s in case["settings"]["lora_shapes"]]
    assert shapes == [(64, 64), (64, 172), (172, 64)]
    for i, o in shapes:
        assert (tmp_path / f"tiny_map_i{i}_o{o}.png").is_file()
    assert (tmp_path / "tiny_speedup.png").is_file()


def test_autocast_runs_every_forward_under_bf16_autocast(tmp_path, capsys):
    """--autocast: the case is marked, its settings say so, and runlora rewrites the DoRA site under
    autocast (an fp32 sum of bf16 products) — which it does only when the forward really ran under it."""
    prefix = tmp_path / "autocast"
    assert main(["--layer", "--in", "32", "--tokens", "64", "--rank", "4", "--dora", "--autocast",
                 "--impls", "inductor", "runlora-flops", "frozen", "-o", str(prefix), *SMOKE]) == 0
    assert "**i=32 o=32 N=64 (b=32) r=4 fp32 autocast(bf16)**" in capsys.readouterr().out
    _, data = _read_outputs(prefix)
    (case,) = data["cases"]
    assert case["settings"]["autocast"] is True
    rows = {r["implementation"]: r for r in case["rows"]}
    assert rows["runlora-flops"]["sites_rewritten"] == 1
    assert all(k.startswith("dora-forward1/") for k in rows["runlora-flops"]["variants"]["choices"])


def test_fp32_adapters_are_timed_beside_the_same_model_with_adapters_in_its_dtype(tmp_path, capsys):
    """--fp32-adapters on a bf16 model: by default the same run also times stock Inductor and runlora on a twin
    whose adapters are in bf16 (PEFT's autocast_adapter_dtype=False), and the notes give each one's overhead
    over the frozen floor both ways. The twin really has bf16 adapters: runlora merges there (forced forward2 is
    legal), which a dtype split forbids on the fp32-adapter model. Without --fp32-adapters the twin rows are refused."""
    prefix = tmp_path / "fp32_adapters"
    assert main(["--layer", "--in", "32", "--tokens", "64", "--rank", "4", "--dtype", "bf16", "--fp32-adapters",
                 "--runlora-options", '{"forward": "forward2", "backward": "backward5"}',
                 "-o", str(prefix), *SMOKE]) == 0
    capsys.readouterr()
    csv_rows, data = _read_outputs(prefix)
    assert [r["implementation"] for r in csv_rows] == ["eager", "inductor", "runlora-flops", "inductor-base-dtype",
                                                       "runlora-flops-base-dtype", "frozen"]
    (case,) = data["cases"]
    rows = {r["implementation"]: r for r in case["rows"]}
    assert rows["runlora-flops"]["sites_rewritten"] == rows["runlora-flops-base-dtype"]["sites_rewritten"] == 1
    assert all(k.startswith("forward1/") for k in rows["runlora-flops"]["variants"]["choices"])
    assert all(k.startswith("forward2/") for k in rows["runlora-flops-base-dtype"]["variants"]["choices"])
    notes = "\n".join(case["notes"])
    for who in ("stock Inductor", "runlora"):
        assert f"fp32 adapters: {who} overhead over frozen" in notes
    assert "within 0.05 of its base-dtype overhead: " in notes
    with pytest.raises(SystemExit):
        main(["--layer", "--in", "32", "--tokens", "64", "--rank", "4", "--impls", "runlora-base-dtype", *SMOKE])
    assert "give --fp32-adapters on a 16-bit model" in capsys.readouterr().err


def test_gradient_checkpointing_checkpoints_every_model_and_dora_is_rewritten_inside(tmp_path, capsys):
    """--gradient-checkpointing: the case is marked, its settings say so, and runlora rewrites every DoRA
    site of the checkpointed decoder layers — which it can only when they are traced (PEFT's cache clear
    has its stand-in) and only finds there when checkpointing is really on (a tag_activation_checkpoint
    region). A single layer has no decoder layers to checkpoint, and inductor-breaks would change how
    Dynamo traces the implementations after it: both refused."""
    prefix = tmp_path / "checkpointed"
    assert main(["-m", "tiny-llama", "--n_batch", "1", "--seq_len", "8", "-r", "4", "--dora",
                 "--gradient-checkpointing", "--impls", "runlora-flops", "frozen",
                 "-o", str(prefix), *SMOKE]) == 0
    assert "**tiny-llama b=1 s=8 r=4 fp32 checkpointed**" in capsys.readouterr().out
    _, data = _read_outputs(prefix)
    (case,) = data["cases"]
    assert case["settings"]["gradient_checkpointing"] is True
    rows = {r["implementation"]: r for r in case["rows"]}
    assert rows["runlora-flops"]["sites_rewritten"] == case["settings"]["lora_sites"] > 0
    with pytest.raises(SystemExit):
        main(["--layer", "--in", "32", "--tokens", "64", "--rank", "4", "--gradient-checkpointing", *SMOKE])
    assert "--gradient-checkpointing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-m", "tiny-llama", "--dora", "--gradient-checkpointing", "--impls", "inductor-breaks", *SMOKE])
    assert "inductor-breaks cannot run with --gradient-checkpointing" in capsys.readouterr().err


def test_protocol_minimums_are_the_defaults_and_enforced(capsys):
    args = build_parser().parse_args(["-m", "tiny-llama"])
    assert args.rounds >= PROTOCOL_MIN_ROUNDS >= 11
    assert args.warmup >= PROTOCOL_MIN_WARMUP >= 3
    with pytest.raises(SystemExit):
        main(["-m", "tiny-llama", "--rounds", "3"])
    with pytest.raises(SystemExit):
        main(["-m", "tiny-llama", "--warmup", "1"])
    assert "protocol" in capsys.readouterr().err


def test_output_prefix_is_not_out_features(capsys):
    with pytest.raises(SystemExit):
        main(["--layer", "--out", "1024"])
    assert "--out-features" in capsys.readouterr().err


def test_layer_mode_siblings_fused_and_unfused(tmp_path, capsys):
    """--siblings k: k LoRA linears of one X; runlora-<criterion>-unfused is the same without the fusion."""
    prefix = tmp_path / "siblings"
    assert main(["--layer", "--in", "32", "--tokens", "64", "--rank", "4", "--siblings", "3",
                 "--impls", "inductor", "runlora-flops", "runlora-flops-unfused", "-o", str(prefix), *SMOKE]) == 0
    printed = capsys.readouterr().out
    assert "**i=32 o=32 N=64 (b=32) r=4 3 siblings fp32**" in printed
    _, data = _read_outputs(prefix)
    (case,) = data["cases"]
    rows = {r["implementation"]: r for r in case["rows"]}
    assert rows["runlora-flops"]["sites_rewritten"] == rows["runlora-flops-unfused"]["sites_rewritten"] == 3
    assert rows["runlora-flops"]["variants"]["fused"]["products"] >= 3
    assert rows["runlora-flops-unfused"]["variants"]["fused"] == {"groups": 0, "products": 0}
    assert "sibling fusion: " in printed


@pytest.mark.parametrize("argv", [["--siblings", "2", "--stack", "2"], ["--siblings", "0"]])
def test_siblings_argument_errors(argv, capsys):
    with pytest.raises(SystemExit):
        main(["--layer", "--in", "32", "--tokens", "64", *argv, *SMOKE])
    assert "--siblings" in capsys.readouterr().err
