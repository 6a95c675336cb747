"""The pieces of runlora-bench: size lists, implementation rows, the table's arithmetic, memory
counting, shipped configs, and the variant map against lora_rewrite.cost.choose."""

from __future__ import annotations

import pytest
import torch

from lora_rewrite.bench import layer, measure, models, plots, report
from lora_rewrite.bench.__main__ import implementation_names, main
from lora_rewrite.cost import choose
from lora_rewrite.variants import BACKWARDS, FORWARDS, Dims


def test_parse_sizes_lists_and_ranges():
    assert layer.parse_sizes(["1024"]) == [1024]
    assert layer.parse_sizes(["4096", "512"]) == [512, 4096]
    assert layer.parse_sizes(["256:4096"]) == [256, 512, 1024, 2048, 4096]
    assert layer.parse_sizes(["8:32:8"]) == [8, 16, 24, 32]
    assert layer.parse_sizes(["16:1024:x4", "64"]) == [16, 64, 256, 1024]
    assert layer.parse_sizes(["8,16"]) == [8, 16]
    for bad in (["0"], ["64:8"], ["8:64:x1"], ["1:2:3:4"]):
        with pytest.raises(ValueError):
            layer.parse_sizes(bad)


def test_runlora_expands_to_one_row_per_criterion():
    assert implementation_names(["eager", "inductor", "runlora", "frozen"], ["flops", "roofline"]) == \
        ["eager", "inductor", "runlora-flops", "runlora-roofline", "frozen"]
    assert implementation_names(["runlora-time", "runlora"], ["time"]) == ["runlora-time"]
    for bad in ("runlora-fast", "inductor-flops", "triton", "runlora-unfused", "inductor-unfused"):
        with pytest.raises(SystemExit):
            main(["-m", "tiny-llama", "--impls", bad])


def _measurement(name, ms, saved_mb):
    m = measure.Measurement(name, runlora=name.startswith("runlora"))
    m.samples_s = [ms / 1e3 * f for f in (0.9, 1.0, 1.2)]
    m.saved_bytes = int(saved_mb * report.MB)
    m.first_step_s = 1.0
    return m


def test_table_arithmetic_speedups_ratio_and_memory_saved():
    rows = report.build_rows([_measurement("eager", 100, 10), _measurement("inductor", 80, 9),
                              _measurement("runlora-flops", 60, 7), _measurement("frozen", 50, 4)], cuda=False)
    by = {r.implementation: r for r in rows}
    runlora = by["runlora-flops"]
    assert runlora.median_ms == pytest.approx(60)
    assert (runlora.min_ms, runlora.max_ms) == pytest.approx((54, 72))
    assert runlora.speedup_vs_eager_pct == pytest.approx(40)        # the paper's (t_ref - t) / t_ref
    assert runlora.speedup_vs_inductor_pct == pytest.approx(25)
    assert runlora.ratio_to_frozen == pytest.approx(1.2)
    assert runlora.memory_saved_vs_eager_mb == pytest.approx(3)
    assert runlora.memory_saved_vs_inductor_mb == pytest.approx(2)
    assert by["eager"].speedup_vs_eager_pct is None and by["inductor"].speedup_vs_inductor_pct is None
    table = report.markdown_table(report.Case("toy", {}, rows))
    assert "| runlora-flops | 60.00 | 54.00–72.00 | 7.000 | 40.00 | 25.00 | 3.000 | 2.000 | 1.200 | 1.00 |" in table


def test_saved_for_backward_counts_x_and_xa_once_and_no_parameters():
    """PEFT eager saves X (for the base product and for lora_A: one storage) and X·Aᵀ [N,r];
    the frozen linear with X requiring grad saves nothing (dX = dY·W needs only the parameter W)."""
    shape = layer.LayerShape(i=32, o=48, tokens=64, r=4, batch=4)
    peft_model, frozen = layer.build_layer_models(shape, r=4, alpha=8, dropout=0.0, bias=True, dtype=torch.float32,
                                                  device=torch.device("cpu"), fp32_adapters=False)
    inputs = layer.make_layer_inputs(shape, dtype=torch.float32, device=torch.device("cpu"))

    def impl(module):
        loss_module = layer.ProbeLoss(module, inputs.probe)
        return measure.Implementation("x", layer.layer_loss_step(loss_module, inputs), loss_module)

    assert measure.saved_for_backward_bytes(impl(peft_model)) == 4 * (64 * 32 + 64 * 4)
    assert measure.saved_for_backward_bytes(impl(frozen)) == 0


@pytest.mark.parametrize("i,o", [(1024, 1024), (1024, 4096), (4096, 11008)])
def test_variant_map_is_cost_choose_at_every_point(i, o):
    tokens, ranks = [16, 600, 2048, 20480], [1, 8, 128, 1024]
    vmap = plots.variant_map(i, o, tokens, ranks)
    for a, r in enumerate(ranks):
        for b, n in enumerate(tokens):
            dims = Dims(n, i, o, r, True)
            assert vmap.forward[a][b] == choose(FORWARDS, dims, "flops").variant.name
            assert vmap.backward[a][b] == choose(BACKWARDS, dims, "flops").variant.name


def test_variant_map_matches_the_papers_boundaries():
    """forward2 wins exactly when N > i·o/(i+o) (Table 1); below the parameter-reduction line
    r < i·o/(i+o), backward2 and backward3 are never the cheapest (the paper's §2 proof)."""
    i, o = 1024, 4096
    tokens, ranks = plots.default_map_axes(i, o)
    vmap = plots.variant_map(i, o, tokens, ranks)
    threshold = i * o / (i + o)
    assert vmap.parameter_reduction_rank == pytest.approx(threshold)
    for a, r in enumerate(ranks):
        for b, n in enumerate(tokens):
            assert vmap.forward[a][b] == ("forward2" if n > threshold else "forward1")
            if r < threshold:
                assert vmap.backward[a][b] not in ("backward2", "backward3")
    unmerged = plots.variant_map(i, o, tokens, ranks, allow_merged=False)
    assert {v for row in unmerged.forward for v in row} == {"forward1"}
    assert {v for row in unmerged.backward for v in row} <= {"backward1", "backward2", "backward3"}
    with pytest.raises(ValueError):
        plots.variant_map(i, o, tokens, ranks, criterion="time")


# name → parameters in millions, as the names (or, for RoBERTa, the model cards) say
EXPECTED_MILLIONS = {"llama_60m": 60, "llama_130m": 130, "llama_250m": 250, "llama_350m": 350, "llama_1.3b": 1300,
                     "opt_125m": 125, "opt_350m": 350, "opt_1.3b": 1300, "roberta_base": 125, "roberta_large": 355}


def test_shipped_configs_build_with_the_sizes_their_names_say():
    assert models.shipped_config_names() == sorted(EXPECTED_MILLIONS)
    for name, millions in EXPECTED_MILLIONS.items():
        spec = models.load_spec(name)
        model = models.build_base_model(spec, dtype=torch.float32, device=torch.device("meta"))
        params = sum(p.numel() for p in model.parameters())
        assert abs(params / 1e6 - millions) / millions < 0.1, (name, params)
    llama = models.load_spec("llama-60m").config        # the paper's spelling works too
    assert (llama.hidden_size, llama.intermediate_size, llama.num_attention_heads, llama.num_hidden_layers,
            llama.vocab_size, llama.max_position_embeddings) == (512, 1376, 8, 8, 32000, 1024)
    assert models.load_spec("roberta_base").max_tokens_per_sequence == 512
    assert models.load_spec("facebook/opt-125m").max_tokens_per_sequence == 2048
    with pytest.raises(ValueError):
        models.load_spec("gpt-17")


def test_default_targets_cover_attention_and_mlp_linears():
    spec = models.load_spec("roberta_base")
    base = models.build_base_model(spec, dtype=torch.float32, device=torch.device("meta"))
    peft_model = models.add_lora(base, r=8, alpha=8, dropout=0.0, target_modules=models.default_target_modules("roberta"),
                                 fp32_adapters=False)
    assert models.count_lora_sites(peft_model) == 12 * 6   # query key value + 3 dense per layer, not the LM head
    assert models.lora_layer_shapes(peft_model) == [(768, 768), (768, 3072), (3072, 768)]


def test_dora_impls_need_dora_and_expand_per_criterion():
    assert implementation_names(["runlora", "runlora-lora"], ["flops", "time"]) == \
        ["runlora-flops", "runlora-time", "runlora-flops-lora", "runlora-time-lora"]
    for impl in ("inductor-breaks", "inductor-lora", "runlora-lora"):
        with pytest.raises(SystemExit):
            main(["--layer", "--in", "64", "--impls", impl, "--smoke"])


def test_dora_verdicts_read_the_targets_off_the_rows():
    """runlora's DoRA overhead (× frozen − 1) against stock plain LoRA's, half of stock DoRA's and runlora's
    plain LoRA's + 0.05; bytes against stock plain LoRA's + one [N,o] per site."""
    rows = report.build_rows([_measurement("inductor", 160, 9), _measurement("runlora-flops", 120, 7),
                              _measurement("inductor-lora", 125, 5), _measurement("runlora-flops-lora", 105, 4),
                              _measurement("frozen", 100, 2)], cuda=False)
    lines = report.dora_verdicts(rows, tokens=256, out_features=[1024], element_size=4)   # one [N,o]: 1 MB
    assert lines[0].endswith("+0.200")
    assert "plain-LoRA overhead: limit +0.250 -> met" in lines[1]
    assert "DoRA overhead (one graph): limit +0.300 -> met" in lines[2]
    assert "+ 0.05: limit +0.100 -> MISSED" in lines[3]
    assert "limit 6.0 MB" in lines[4] and lines[4].endswith("-> MISSED")


def test_qlora_verdicts_read_the_targets_off_the_rows():
    """runlora against stock Inductor beyond the A/A noise; bytes against stock Inductor's minus one
    [N,r] per site."""
    def lines_for(runlora_ms, runlora_mb):
        rows = report.build_rows([_measurement("inductor", 100, 9), _measurement("inductor-again", 102, 9),
                                  _measurement("runlora-flops", runlora_ms, runlora_mb),
                                  _measurement("frozen", 90, 2)], cuda=False)
        # two sites, r = 64 in fp32 at N = 2048: 2 · 2048 · 64 · 4 bytes = 1 MB below stock Inductor's 9 MB
        return report.qlora_verdicts(rows, tokens=2048, adapters=[(64, 4), (64, 4)])

    within_noise = lines_for(101.5, 8)
    assert within_noise[0].startswith("QLoRA: runlora-flops vs stock Inductor +1.5 %, A/A noise 2.0 %")
    assert within_noise[0].endswith("met") and "limit 8.0 MB" in within_noise[1]
    assert within_noise[1].endswith("-> met")
    beyond = lines_for(103, 8.5)
    assert beyond[0].endswith("MISSED") and beyond[1].endswith("-> MISSED")


def test_lora_adapter_ranks_count_4bit_sites_too():
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = models.quantize_4bit(layer.LinearStack(64, 64, 2, False), ["proj"], torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["proj"]))
    assert models.lora_adapter_ranks(model) == [(4, 4), (4, 4)]
    assert models.count_lora_sites(model) == 2


def test_dora_graph_breaks_restores_peft_s_function_and_breaks_only_inside():
    """The benchmark's `inductor-breaks` row: PEFT's own dequantize_module_weight under another identity,
    so Dynamo breaks the graph in each DoRA layer as without lora_rewrite — where this torch's Dynamo breaks
    at PEFT's torchao test at all (2.13 and 2.14 do; 2.11 and 2.15 trace it); PEFT's function is back after."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import dora

    def breaks_at_the_torchao_test(x):   # the test PEFT's dequantize_module_weight makes, alone
        return x * 2 if type(weight).__module__.startswith("torchao.") else x + 1

    weight = torch.nn.Parameter(torch.ones(2))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.compile(breaks_at_the_torchao_test, backend="eager")(torch.ones(2))
    dynamo_breaks_there = sum(torch._dynamo.utils.counters["graph_break"].values()) > 0

    original = dora.dequantize_module_weight
    torch.manual_seed(0)
    model = get_peft_model(layer.LinearStack(16, 16, 1, False), LoraConfig(r=2, target_modules=["proj"],
                                                                            use_dora=True))
    x = torch.randn(4, 16)
    counts = {}
    for name, context in (("stand-in", None), ("breaks", models.dora_graph_breaks)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend="eager")
        if context is None:
            compiled(x)
        else:
            with context():
                assert dora.dequantize_module_weight is not original
                compiled(x)
        counts[name] = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert dora.dequantize_module_weight is original
    assert counts["stand-in"] == 0
    assert (counts["breaks"] > 0) == dynamo_breaks_there, (counts, torch.__version__)


KEEP_FREED_MEMORY_PROBE = """
import sys, torch
from lora_rewrite.bench import measure
if sys.argv[1] == "kept":
    measure.keep_freed_memory()
faults = []
for _ in range(20):   # a 64 MiB buffer, written, freed: what a step does with its fresh [N,o] tensors
    before = measure.minor_page_faults()
    torch.empty(16 * 2**20).fill_(1.0)
    faults.append(measure.minor_page_faults() - before)
print(max(faults[-4:]), min(faults[-4:]))   # after 16 steps' warm-up: "kept" faults in up to 7 (2.13, 2.14)
"""


def test_keep_freed_memory_stops_fresh_buffers_page_faulting_in_again():
    """--keep-freed-memory: glibc's malloc keeps a freed 64 MiB buffer, so the next one is not faulted in
    page by page again (by default it is mmap-ed and given back each time: 16384 pages of 4 KiB)."""
    import subprocess
    import sys

    def faults(mode):
        done = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY_PROBE, mode], capture_output=True,
                              text=True, check=True)
        most, fewest = done.stdout.split()[-2:]
        return int(most), int(fewest)

    assert faults("default")[1] >= 16384 // 2   # every buffer faulted in again
    assert faults("kept")[0] < 1000             # none, once warm


def test_alternating_medians_reverse_the_order_every_other_round_and_ab_summary_reads_them():
    from lora_rewrite.bench import measure

    order = []
    median = measure.alternating_medians(order.append, ["frozen", "inductor", "inductor-again", "runlora", "old"], 3)
    assert order == ["frozen", "inductor", "inductor-again", "runlora", "old",
                     "old", "runlora", "inductor-again", "inductor", "frozen",
                     "frozen", "inductor", "inductor-again", "runlora", "old"]
    assert set(median) == set(order) and all(t >= 0 for t in median.values())
    lines = measure.ab_summary("case", {"frozen": 1.0, "inductor": 2.0, "inductor-again": 2.0, "runlora": 1.5,
                                        "old": 3.0}, "old")
    assert lines[0] == "case" and "overhead +0.500" in lines[4]
    assert lines[-1] == "  runlora vs old +50.0%, vs inductor +25.0%, A/A +0.0%"
