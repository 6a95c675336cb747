"""Never worse than stock Inductor (lora_rewrite/containment.py): a failure inside runlora costs a
warning, never a training run.

Each test makes one stage of the pass raise (a stand-in for a bug, or an out-of-memory on a device) on
a two-layer PEFT model, with containment on (`strict=False`; the rest of the suite runs strict), and
checks what the user gets: the step runs, outputs and gradients equal eager PEFT's, the failing site
(or the whole graph) is left as stock Inductor compiles it and the others are still rewritten, one
WARNING names the site, the stage and the exception, and the counters and the report say so.
"""

import logging
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import (assert_close_to, joint_graph, randomize_adapters, run_joint, runlora_counters, step)
from lora_rewrite import compat, debug
from lora_rewrite.containment import GraphSnapshot, is_out_of_memory
from lora_rewrite.options import RunLoraOptions

I, O, R = 16, 24, 4


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(I, O)
        self.second = nn.Linear(O, I)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def two_layer_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(TwoLinears(), LoraConfig(r=R, lora_alpha=8, target_modules=["first", "second"]))
    randomize_adapters(model)
    return model


def run_contained(model, x, caplog, **options):
    """Eager PEFT and runlora (containment on) on the same input: equal outputs and gradients; returns
    the reports, the counters and runlora's WARNING lines."""
    y_ref, dx_ref, g_ref = step(model, x)
    with debug.collect_reports() as reports, caplog.at_level(logging.WARNING, logger="lora_rewrite"):
        compiled = torch.compile(model, backend="runlora", options={"codegen": False, "strict": False, **options})
        y, dx, g = step(compiled, x)
    assert_close_to(y_ref, y, rtol=2e-6, what="output")
    assert_close_to(dx_ref, dx, rtol=2e-6, what="input grad")
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_close_to(g_ref[name], g[name], rtol=2e-6, what=name)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lora_rewrite" and r.levelno == logging.WARNING]
    return reports, runlora_counters(), warnings


def failing_once(real, error, calls=(0,)):
    """`real`, except that its calls numbered in `calls` raise `error`."""
    count = [0]

    def wrapper(*args, **kwargs):
        k = count[0]
        count[0] += 1
        if k in calls:
            raise error
        return real(*args, **kwargs)

    return wrapper


X = lambda: torch.randn(3, 5, I, requires_grad=True)  # noqa: E731

# stage -> (what to patch in lora_rewrite.passes, the exception), as the table tried them
SITE_FAILURES = {
    "matching": ("match_site", AttributeError("'NoneType' object has no attribute 'meta'")),
    "planning": ("plan_site", RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    "rewriting": ("rewrite_site", KeyError("a node the rewrite expected")),
}


@pytest.mark.parametrize("stage", SITE_FAILURES)
def test_a_site_stage_that_raises_leaves_that_site_and_rewrites_the_other(stage, monkeypatch, caplog):
    import lora_rewrite.passes as passes

    name, error = SITE_FAILURES[stage]
    monkeypatch.setattr(passes, name, failing_once(getattr(passes, name), error))
    reports, counters, warnings = run_contained(two_layer_peft(), X(), caplog)
    (report,) = reports
    assert counters["sites_failed"] == 1 and counters["sites_rewritten"] == 1
    assert counters.get("graphs_failed", 0) == 0
    (failure,) = report.failures
    assert failure.stage == stage and type(error).__name__ in failure.error
    assert failure.module == "base_model.model.first"
    assert [s.module for s in report.sites] == ["base_model.model.second"]
    (warning,) = [w for w in warnings if "failed" in w]
    assert "base_model.model.first" in warning and stage in warning and type(error).__name__ in warning
    assert "FAILED base_model.model.first" in str(report)


def test_a_rewrite_that_fails_halfway_restores_the_graph_and_rewrites_the_other_sites(monkeypatch, caplog):
    """Redirecting the first site's uses raises after they were redirected: the graph is restored from
    its snapshot and the pass runs again without that site."""
    import lora_rewrite.passes.rewrite as rewrite

    real = rewrite._redirect_uses

    def redirect_then_raise(graph, site, *args):
        real(graph, site, *args)
        if site.module_path.endswith("first"):
            raise RuntimeError("a stand-in for a bug after the uses were redirected")

    monkeypatch.setattr(rewrite, "_redirect_uses", redirect_then_raise)
    reports, counters, warnings = run_contained(two_layer_peft(), X(), caplog)
    (report,) = reports
    assert counters["sites_failed"] == 1 and counters["sites_rewritten"] == 1
    (failure,) = report.failures
    assert failure.module == "base_model.model.first" and "restored" in failure.note
    assert [s.module for s in report.sites] == ["base_model.model.second"]
    assert len([w for w in warnings if "failed" in w]) == 1


GRAPH_FAILURES = {
    "sibling fusion": ("lora_rewrite.passes", "fuse_siblings", IndexError("list index out of range")),
    "topological sort": ("lora_rewrite.compat", "stable_topological_sort", RuntimeError("cycle")),
    "merging duplicate casts": ("lora_rewrite.passes", "merge_duplicate_casts", KeyError("a node")),
}


@pytest.mark.parametrize("stage", GRAPH_FAILURES)
def test_a_whole_graph_stage_that_raises_leaves_the_whole_graph_as_stock_inductor(stage, monkeypatch, caplog):
    import importlib

    module, name, error = GRAPH_FAILURES[stage]
    monkeypatch.setattr(importlib.import_module(module), name, failing_once(lambda *a: [], error))
    # Siblings (one input, two adapters) so that fusion has something to do.
    from peft import LoraConfig, get_peft_model

    class Siblings(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(I, O), nn.Linear(I, O)

        def forward(self, x):
            return self.q(x) * self.k(x)

    torch.manual_seed(0)
    model = get_peft_model(Siblings(), LoraConfig(r=R, lora_alpha=8, target_modules=["q", "k"]))
    randomize_adapters(model)
    reports, counters, warnings = run_contained(model, X(), caplog)
    (report,) = reports
    assert counters["graphs_failed"] == 1 and counters["sites_rewritten"] == 0
    assert report.graph_failed and report.failures[-1].stage == stage and not report.sites
    assert any("the whole graph" in w and stage in w and type(error).__name__ in w for w in warnings)


def graph_signature(graph: torch.fx.Graph) -> list:
    """Each node's op, target and arguments (other nodes by position): equal for equal graphs, whatever
    the nodes are named."""
    position = {node: k for k, node in enumerate(graph.nodes)}
    rows = []
    for node in graph.nodes:
        args = torch.fx.map_arg((node.args, node.kwargs), lambda n: ("node", position[n]))
        rows.append((node.op, str(node.target), repr(args)))
    return rows


def lora_pair(x, w1, a1, b1, w2, a2, b2):
    h = F.linear(x, w1) + F.linear(F.linear(x, a1), b1) * 2.0
    return F.linear(h, w2) + F.linear(F.linear(h, a2), b2) * 2.0


def test_the_graph_is_restored_exactly_after_a_whole_graph_failure(monkeypatch):
    """The joint graph after a failed lint is the joint graph before the pass, node for node, and it
    computes the same values."""
    import lora_rewrite.passes as passes

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    inputs = [rand(2, 5, I).requires_grad_(True), rand(O, I), rand(R, I).requires_grad_(True),
              rand(O, R).requires_grad_(True), rand(I, O), rand(R, O).requires_grad_(True),
              rand(I, R).requires_grad_(True)]
    gm = joint_graph(lora_pair, *inputs)
    tangent = rand(2, 5, I)
    before, expected = graph_signature(gm.graph), run_joint(gm, inputs, [tangent])

    real_lint = torch.fx.Graph.lint
    monkeypatch.setattr(torch.fx.Graph, "lint", failing_once(real_lint, RuntimeError("lint")))
    report = passes.rewrite_graph(gm.graph, RunLoraOptions(forms="direct"))
    assert report.graph_failed and report.failures[-1].stage == "graph lint"
    assert graph_signature(gm.graph) == before
    real_lint(gm.graph)
    gm.recompile()
    for want, got in zip(expected, run_joint(gm, inputs, [tangent])):
        assert torch.equal(want, got)


def test_a_snapshot_restores_a_graph_that_was_changed_out_of_order():
    gm = joint_graph(lora_pair, *[torch.randn(2, 3, I, requires_grad=True), torch.randn(O, I),
                                  torch.randn(R, I, requires_grad=True), torch.randn(O, R, requires_grad=True),
                                  torch.randn(I, O), torch.randn(R, O, requires_grad=True),
                                  torch.randn(I, R, requires_grad=True)])
    before = graph_signature(gm.graph)
    snapshot = GraphSnapshot(gm.graph)
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):   # before its inputs: out of order
        stray = gm.graph.call_function(torch.ops.aten.neg.default, (mm,))
    mm.replace_all_uses_with(stray, delete_user_cb=lambda user: user is not stray)
    assert graph_signature(gm.graph) != before
    snapshot.restore()
    assert graph_signature(gm.graph) == before
    gm.graph.lint()


def test_out_of_memory_while_measuring_forms_keeps_default_forms_and_caches_nothing(monkeypatch, tmp_path, caplog):
    import lora_rewrite.tuning as tuning

    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "CACHE", tuning.FormCache())
    tuning._measure_stage.cache_clear()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    monkeypatch.setattr(tuning, "time_call", out_of_memory)
    reports, counters, warnings = run_contained(two_layer_peft(), X(), caplog, forms="measured")
    tuning._measure_stage.cache_clear()
    (report,) = reports
    assert counters["sites_rewritten"] == 2 and counters.get("sites_failed", 0) == 0
    for site in report.sites:
        assert site.forms == {} and "out of memory while measuring" in site.forms_source
    assert not (tmp_path / tuning.CACHE_FILE).exists()
    assert any("out of memory while measuring" in w for w in warnings)


def test_out_of_memory_while_timing_variants_chooses_by_flops(monkeypatch, caplog):
    import lora_rewrite.timing as timing

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(timing, "measured_seconds", out_of_memory)
    reports, counters, _ = run_contained(two_layer_peft(), X(), caplog, criterion="time", forms="direct")
    assert counters["sites_rewritten"] == 2
    for site in reports[0].sites:
        assert any("out of memory while timing" in note for note in site.notes)


def test_out_of_memory_is_recognised_on_every_device():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def has_runlora_nodes(gm) -> bool:
    return any(n.meta.get("runlora") for n in gm.graph.nodes)


def test_inductor_failing_on_the_rewritten_graph_compiles_it_again_without_runlora(monkeypatch, caplog):
    real = compat.eager_inner_compile

    def fails_on_rewritten_graphs(gm, example_inputs, **kwargs):
        if has_runlora_nodes(gm):
            raise RuntimeError("a stand-in for an Inductor lowering failure on a GPU nobody here has run")
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compat, "eager_inner_compile", fails_on_rewritten_graphs)
    _, counters, warnings = run_contained(two_layer_peft(), X(), caplog)
    assert counters["graphs_failed"] == 1
    assert any("Inductor compiling the rewritten graph failed" in w and "without runlora" in w for w in warnings)


def test_a_lazily_compiled_rewritten_backward_that_fails_runs_op_by_op(monkeypatch, caplog):
    """AOTAutograd compiles the backward at the first backward, after the backend returned: a failure
    there runs the rewritten backward graph uncompiled (correct), with one warning."""
    real = compat.eager_inner_compile

    def fails_on_backward(gm, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            raise RuntimeError("a stand-in for a backward lowering failure")
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compat, "eager_inner_compile", fails_on_backward)
    _, counters, warnings = run_contained(two_layer_peft(), X(), caplog)
    assert counters["graphs_failed"] == 1 and counters["sites_rewritten"] == 2
    assert any("runs op by op" in w for w in warnings)


def test_strict_raises_instead(monkeypatch):
    import lora_rewrite.passes as passes

    monkeypatch.setattr(passes, "match_site", failing_once(passes.match_site, AttributeError("a bug")))
    compiled = torch.compile(two_layer_peft(), backend="runlora", options={"codegen": False, "strict": True})
    with pytest.raises(Exception) as raised:
        compiled(X())
    chain, error = [], raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, AttributeError) and "a bug" in str(e) for e in chain)


def test_the_test_suite_runs_strict(monkeypatch):
    assert RunLoraOptions.from_user({}).strict   # conftest sets RUNLORA_STRICT=1
    monkeypatch.setenv("RUNLORA_STRICT", "0")
    assert not RunLoraOptions.from_user({}).strict
    with pytest.raises(ValueError, match="'strict' must be True or False"):
        RunLoraOptions.from_user({"strict": "yes"})


def test_a_failure_is_in_explain_and_in_the_main_jobs_summary(monkeypatch):
    import importlib.util
    from pathlib import Path

    import lora_rewrite
    import lora_rewrite.passes as passes

    spec = importlib.util.spec_from_file_location(
        "finetune_example", Path(__file__).resolve().parents[1] / "examples" / "finetune.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)   # its dataclasses look their module up there
    spec.loader.exec_module(example)

    monkeypatch.setattr(passes, "plan_site", failing_once(passes.plan_site, RuntimeError("a bug in planning")))
    explained = lora_rewrite.explain(two_layer_peft(), X(), options={"codegen": False, "strict": False})
    text = str(explained)
    assert "FAILED base_model.model.first: planning failed (RuntimeError: a bug in planning)" in text
    assert "base_model.model.first: planning failed" in "\n".join(f"{u.module}: {u.reason}" for u in explained.untouched)
    summary = example.runlora_summary({"graphs": 1, "sites_found": 2, "sites_rewritten": 1, "sites_failed": 1,
                               "chose_forward1": 1})
    assert "1 site(s) left as stock Inductor compiles them after a failure inside runlora" in summary
