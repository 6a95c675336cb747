"""The backend as users meet it: the name "runlora" in a fresh interpreter, real Inductor code generation,
compile caches, a user's own joint pass, torch.compile's `mode`."""

import shutil

import pytest
import torch

from helpers import assert_close_to, peft_linear, result_line, run_fresh_python, runlora_counters, step
from lora_rewrite.options import RunLoraOptions

TRAIN_ONE_STEP = """
import copy
model = peft_model()
with torch.no_grad():   # PEFT starts B at 0, where dA is 0 whatever the rewrite does: a B that makes dA count
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
eager = copy.deepcopy(model)
x = torch.randn(4, 8, 16)
imported_before = "lora_rewrite" in sys.modules
{prelude}

def train_step(module, forward):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss = forward(x).square().mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    return loss, grads, [p.detach().clone() for p in params]

loss, grads, after = train_step(model, torch.compile(model, backend="runlora", options={options}))
eager_loss, eager_grads, eager_after = train_step(eager, eager)

def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

from torch._dynamo.utils import counters
print("RESULT", json.dumps({{"imported_before": imported_before,
                            "imported_after": "lora_rewrite" in sys.modules,
                            "counters": dict(counters["runlora"]),
                            "trained": len(grads),
                            "grad_err": max(rel_err(g, e) for g, e in zip(grads, eager_grads)),
                            "step_err": max(rel_err(p, e) for p, e in zip(after, eager_after)),
                            "loss": loss.item(), "eager_loss": eager_loss.item()}}))
"""


def run_fresh(prelude: str = "", options: str = "{}") -> dict:
    return result_line(run_fresh_python(TRAIN_ONE_STEP.format(prelude=prelude, options=options)))


def test_fresh_interpreter_trains_a_step_without_importing_lora_rewrite():
    """Real Inductor code generation, the name resolved through the installed entry point."""
    result = run_fresh()
    assert result["imported_before"] is False and result["imported_after"] is True
    assert result["counters"]["sites_rewritten"] == 1 and result["counters"]["backward_rewritten"] == 1
    assert_trained_as_eager(result)


def assert_trained_as_eager(result: dict) -> None:
    """The step's gradients of A and B, and the AdamW step they give, are eager PEFT's."""
    assert result["trained"] == 2
    assert result["grad_err"] <= 1e-5 and result["step_err"] <= 1e-5, result
    assert abs(result["loss"] - result["eager_loss"]) <= 1e-5 * abs(result["eager_loss"])


def test_explicit_import_first_does_not_register_twice():
    result = run_fresh(prelude="import lora_rewrite; lora_rewrite.register(); lora_rewrite.register()",
                       options='{"codegen": False}')
    assert result["counters"]["sites_rewritten"] == 1
    assert_trained_as_eager(result)


@pytest.mark.inductor
@pytest.mark.parametrize("forward,backward", [("forward1", "backward1"), ("forward2", "backward5")])
def test_real_inductor_code_generation_matches_eager(forward, backward):
    model = peft_linear(24, 40, 4)
    x = torch.randn(3, 16, 24, requires_grad=True)
    y_ref, dx_ref, g_ref = step(model, x)
    compiled = torch.compile(model, backend="runlora", options={"forward": forward, "backward": backward})
    y, dx, g = step(compiled, x)
    assert runlora_counters()[f"chose_{forward}"] == 1 and runlora_counters()[f"chose_{backward}"] == 1
    assert_close_to(y_ref, y, rtol=5e-6, what="output")
    assert_close_to(dx_ref, dx, rtol=5e-6, what="dX")
    for name in g_ref:
        assert_close_to(g_ref[name], g[name], rtol=5e-6, what=name)


CACHE_SCRIPT = """
import os
from torch._dynamo.utils import counters
from lora_rewrite.debug import collect_reports

model = peft_model()
x = torch.randn(4, 8, 16)
ref = model(x)
out = {{}}
for label, options in [("first", {{}}), ("again", {{}}), ("forced", {{"forward": "forward1"}})][:{runs}]:
    torch._dynamo.reset()
    counters.clear()
    with collect_reports() as reports:
        y = torch.compile(model, backend="runlora", options=options)(x)
    y.sum().backward()  # AOTAutograd saves its cache entry once the backward is compiled too
    out[label] = {{"counters": dict(counters["runlora"]),
                  "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
                  "reports": [r.to_dict() for r in reports], "text": [str(r) for r in reports],
                  "close": bool(torch.allclose(y, ref, atol=1e-5))}}
print("RESULT", json.dumps(out))
"""


def run_cached(cache_dir, runs: int = 3):
    proc = run_fresh_python(CACHE_SCRIPT.format(runs=runs), env={
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0",
        "TORCH_LOGS": "+lora_rewrite"})
    return result_line(proc), proc.stderr


def without_serving(report: dict) -> dict:
    """A report as it was compiled: the compile id and the served flag aside."""
    return {**report, "compile_id": None, "served_from_cache": None,
            "sites": [{**s, "module_key": None} for s in report["sites"]]}


def test_compile_caches_stay_on_and_a_cache_hit_still_reports_what_it_serves(tmp_path):
    """Two fresh processes on one compile-cache dir: the second compiles nothing (AOTAutograd serves
    every graph) and still shows the same counters, report and log lines, marked served from the cache."""
    first, first_log = run_cached(tmp_path)
    assert first["first"]["counters"]["sites_rewritten"] == 1 and first["first"]["autograd_cache_hit"] == 0
    # Same options in the same process: served from the cache, the pass does not run, the report does.
    assert first["again"]["autograd_cache_hit"] == 1 and first["again"]["counters"]["graphs_from_cache"] == 1
    # Different options: a different key, so the pass runs again.
    assert first["forced"]["autograd_cache_hit"] == 0 and first["forced"]["counters"]["chose_forward1"] == 1
    assert "graphs_from_cache" not in first["forced"]["counters"]

    second, second_log = run_cached(tmp_path)
    for label in ("first", "again", "forced"):
        assert second[label]["autograd_cache_hit"] == 1 and second[label]["close"]
        served = dict(second[label]["counters"])
        assert served.pop("graphs_from_cache") == 1
        assert served == {k: v for k, v in first["first" if label != "forced" else "forced"]["counters"].items()
                          if k != "graphs_from_cache"}
        (report,) = second[label]["reports"]
        assert report["served_from_cache"] is True and report["compile_id"] == "0/0"
        assert without_serving(report) == without_serving(first[label if label != "again" else "first"]["reports"][0])
    assert second["first"]["text"][0].startswith("runlora graph 0/0 (joint, served from the compile cache): "
                                                 "1 site(s) rewritten, 0 left untouched")
    rewrote = [l.split("] ", 1)[1] for l in first_log.splitlines() if "rewrote base_model.model.proj" in l]
    served_lines = [l.split("] ", 1)[1] for l in second_log.splitlines() if "rewrote base_model.model.proj" in l]
    assert served_lines == [f"{line} [served from the compile cache]" for line in rewrote[:1] * 2 + rewrote[2:]]
    assert second_log.count("served from the compile cache: 1 site(s) rewritten, 0 left untouched when it was "
                            "compiled") == 3

    # A hit with no stored report (another lora_rewrite version stored none, or the folder was removed) says so.
    shutil.rmtree(tmp_path / "runlora_reports")
    third, third_log = run_cached(tmp_path, runs=1)
    assert third["first"]["autograd_cache_hit"] == 1 and third["first"]["counters"] == {}
    assert "[0/0] runlora graph 0/0 was served from the compile cache without a stored report" in third_log


def test_a_users_own_joint_pass_is_chained_not_overwritten():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            seen.append(sum(1 for n in graph.nodes if n.op == "call_function"))

        def uuid(self):
            return "user-pass-v1"

    model = peft_linear(16, 24, 4)
    with torch._inductor.config.patch(joint_custom_post_pass=UserPass()):
        step(torch.compile(model, backend="runlora", options={"codegen": False}),
             torch.randn(2, 3, 16, requires_grad=True))
    assert len(seen) == 1 and runlora_counters()["sites_rewritten"] == 1


def test_cache_key_covers_sources_options_and_chained_passes():
    from lora_rewrite.passes import RunLoraPass, source_hash

    class Keyed:
        def __call__(self, graph):
            pass

        def uuid(self):
            return "k1"

    plain = RunLoraPass(RunLoraOptions())
    assert source_hash() in plain.uuid()
    assert plain.uuid() != RunLoraPass(RunLoraOptions(forward="forward2")).uuid()
    assert "k1" in RunLoraPass(RunLoraOptions(), chained=(Keyed(),)).uuid()
    # A chained pass Inductor cannot key makes the whole pass uncacheable, as it would be on its own.
    assert RunLoraPass(RunLoraOptions(), chained=(lambda graph: None,)).uuid() is None


def test_mode_reaches_inductor():
    """torch.compile takes `mode` or `options`, not both; the backend applies `mode` as Inductor would."""
    from lora_rewrite import runlora
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = {}

    class Probe(CustomGraphPass):
        def __call__(self, graph):
            seen["max_autotune"] = torch._inductor.config.max_autotune

        def uuid(self):
            return "probe"

    def backend(gm, example_inputs):
        return runlora(gm, example_inputs, mode="max-autotune-no-cudagraphs", options={"codegen": False})

    model = peft_linear(16, 24, 4)
    with torch._inductor.config.patch(joint_custom_post_pass=Probe()):
        step(torch.compile(model, backend=backend), torch.randn(2, 3, 16, requires_grad=True))
    assert seen == {"max_autotune": True} and runlora_counters()["sites_rewritten"] == 1


def test_compiled_autograd_runs_the_rewritten_backward_with_eager_s_gradients():
    """Compiled autograd (torch._dynamo.config.compiled_autograd, which FSDP2 users turn on) traces the backward
    at run time, around the compiled forward's own backward: the site is rewritten forward and backward, and a
    training step's output and gradients (X's, A's, B's) equal eager PEFT's."""
    from lora_rewrite import debug

    model = peft_linear(16, 24, 4)
    x = torch.randn(4, 8, 16, requires_grad=True)
    eager = step(model, x)

    def train_step(x):
        y = model(x)
        y.square().sum().backward()
        return y.detach()

    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(compiled_autograd=True), debug.collect_reports() as reports:
        compiled = torch.compile(train_step, backend="runlora", options={"codegen": False})
        for p in model.parameters():
            p.grad = None
        leaf = x.detach().clone().requires_grad_()
        y = compiled(leaf)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_close_to(eager[0], y, rtol=1e-5, what="Y")
    assert_close_to(eager[1], leaf.grad, rtol=1e-5, what="dX")
    assert grads.keys() == eager[2].keys() and len(grads) == 2
    for name in grads:
        assert_close_to(eager[2][name], grads[name], rtol=1e-5, what=name)
    assert torch._dynamo.utils.counters["compiled_autograd"]["captures"] == 1
    assert [(s.forward, s.backward) for r in reports for s in r.sites] == [("forward2", "backward5")]
