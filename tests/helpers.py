"""Shared builders and measurements for the tests: tiny PEFT models, steps, references, FLOP counts."""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import subprocess
import sys

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from lora_rewrite import compat


class OneLinear(nn.Module):
    def __init__(self, i: int, o: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(i, o, bias=bias)

    def forward(self, x):
        return self.proj(x)


def peft_linear(i: int, o: int, r: int, *, alpha: float | None = None, bias: bool = True,
                bias_trainable: bool = False, dropout: float = 0.0, rslora: bool = False,
                dtype=torch.float32, seed: int = 0, **config):
    """A PEFT LoRA linear (get_peft_model on one nn.Linear), with B non-zero so every path counts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(OneLinear(i, o, bias), LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=["proj"],
        lora_dropout=dropout, use_rslora=rslora, **config))
    randomize_adapters(model)
    if bias and bias_trainable:
        model.base_model.model.proj.base_layer.bias.requires_grad_(True)
    return model.to(dtype)


def randomize_adapters(model, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def step(model, x: torch.Tensor, grad_out: torch.Tensor | None = None, **kwargs):
    """One forward + backward; returns (output, input grad, {trainable parameter name: grad})."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = model(x, **kwargs)
    if grad_out is None:
        y.float().square().sum().backward()
    else:
        y.backward(grad_out)
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), (x.grad.detach().clone() if x.grad is not None else None), grads


def float64_reference(model, x: torch.Tensor, grad_out: torch.Tensor):
    ref = copy.deepcopy(model).double()
    return step(ref, x.double().requires_grad_(x.requires_grad), grad_out.double())


def assert_close_to(reference, actual, *, rtol: float, what: str = "") -> None:
    """‖actual − reference‖∞ ≤ rtol·‖reference‖∞ (per tensor), in float64."""
    reference, actual = reference.double(), actual.double()
    scale = reference.abs().max().clamp_min(1e-12)
    err = (actual - reference).abs().max() / scale
    assert err <= rtol, f"{what}: relative error {float(err):.3g} > {rtol}"


def assert_same_step(reference, actual, *, rtol: float, trained: int = 2) -> None:
    """Two steps `step` returned, (Y, dX, {name: grad}), agree: Y, dX and the gradient of every trained
    parameter, at least `trained` of them (A and B: a check that leaves dA and dB out sees nothing the
    backward variants do to them)."""
    (y, dx, grads), (y2, dx2, grads2) = reference, actual
    assert_close_to(y, y2, rtol=rtol, what="Y")
    if dx is not None or dx2 is not None:
        assert_close_to(dx, dx2, rtol=rtol, what="dX")
    assert grads.keys() == grads2.keys() and len(grads) >= trained, (sorted(grads), sorted(grads2))
    for name in grads:
        assert_close_to(grads[name], grads2[name], rtol=rtol, what=name)


def runlora(model, **options):
    """Compile with runlora through Inductor's passes and partitioner, without code generation."""
    return torch.compile(model, backend="runlora", options={"codegen": False, **options})


@contextlib.contextmanager
def count_compiled_flops():
    """Count the matmul FLOPs of every compiled forward and backward graph run inside the block.

    The partitioned graphs (as Inductor would compile them) run node by node under
    torch.utils.flop_counter.FlopCounterMode. Works with `codegen=False`."""
    flops = collections.Counter()
    original = compat.eager_inner_compile

    def counting_inner_compile(gm, example_inputs, **kwargs):
        kind = "backward" if kwargs.get("is_backward") else "forward"

        def run(args):
            with FlopCounterMode(display=False) as counter:
                out = torch.fx.Interpreter(gm).run(*args)
            flops[kind] += counter.get_total_flops()
            return out

        run._boxed_call = True
        return run

    compat.eager_inner_compile = counting_inner_compile
    try:
        yield flops
    finally:
        compat.eager_inner_compile = original


def compiled_graphs(monkeypatch) -> list[torch.fx.Graph]:
    """Every partitioned graph runlora hands to Inductor's inner compile (codegen=False), as recorded."""
    graphs = []
    real = compat.eager_inner_compile

    def recording(gm, example_inputs, **kwargs):
        graphs.append(gm.graph)
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compat, "eager_inner_compile", recording)
    return graphs


def activation_bytes_saved_for_backward(model, fn) -> int:
    """Bytes of distinct storages autograd saves for backward while `fn()` runs, parameters excluded
    (a parameter saved for backward costs no memory: it is alive anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()
    return sum(storages.values())


def joint_graph(forward, *primals: torch.Tensor) -> torch.fx.GraphModule:
    """The graph Inductor's `joint_custom_post_pass` (the runlora pass) would get for `forward(*primals)`:
    AOTAutograd's joint forward+backward graph with Inductor's decompositions, after Inductor's joint
    passes. Without a primal that requires grad, the forward-only (inference) graph. Each node carries
    its fake value; there is no module metadata (a plain function has no modules)."""
    from functorch.compile import aot_function, default_partition, make_boxed_func
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.joint_graph import joint_graph_passes
    from torch._inductor.virtualized import V

    captured = []

    def capture_joint(joint, joint_inputs, **kwargs):
        captured.append(joint)
        return default_partition(joint, joint_inputs, **kwargs)

    def capture_inference(gm, example_inputs):
        captured.append(gm)  # called for the joint's partitions too, after the joint: only the first counts
        return make_boxed_func(gm.forward)

    aot_function(forward, fw_compiler=capture_inference, bw_compiler=make_boxed_func, partition_fn=capture_joint,
                 decompositions=select_decomp_table())(*primals)
    gm = captured[0]
    fake_mode = compat.detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    with V.set_fake_mode(fake_mode):
        joint_graph_passes(gm)
    return gm


def run_joint(gm: torch.fx.GraphModule, primals, tangents) -> list[torch.Tensor]:
    """Run a graph from `joint_graph` on real tensors: every output (the forward's, then the gradients)."""
    def leaves(value):
        if isinstance(value, (list, tuple)):
            return [leaf for item in value for leaf in leaves(item)]
        return [value] if value is not None else []

    return leaves(gm([t.detach() for t in primals], list(tangents)))


def runlora_counters() -> dict:
    return dict(torch._dynamo.utils.counters["runlora"])


class Autocast(nn.Module):
    """Runs the wrapped model under torch.autocast on the CPU: bfloat16 (Trainer(bf16=True)) by default,
    float16 for Trainer(fp16=True)."""

    def __init__(self, inner, dtype=torch.bfloat16):
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(x)


# The start of every fresh-interpreter script: a one-linear PEFT model, built without importing lora_rewrite.
FRESH_PRELUDE = """
import json, sys
import torch, torch.nn as nn
from peft import LoraConfig, get_peft_model

class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 24)

    def forward(self, x):
        return self.proj(x)

def peft_model(**config):
    torch.manual_seed(0)
    return get_peft_model(OneLinear(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], **config))
"""


def run_fresh_python(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run FRESH_PRELUDE + code in a new interpreter (compile caches off unless `env` says otherwise)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "RUNLORA_DEBUG", "RUNLORA_DUMP_DIR")}
    full_env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", FRESH_PRELUDE + code], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def result_line(proc: subprocess.CompletedProcess) -> dict:
    import json

    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
