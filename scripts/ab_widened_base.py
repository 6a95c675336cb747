"""Same-process A/B of forward1's sum onto a 16-bit base with fp32 adapters (docs/BENCHMARKS.md, QDoRA section).

    python scripts/ab_widened_base.py KIND ROUNDS I O R [kept]      e.g. qlora 31 512 1376 16 kept

KIND: lora, dora, qlora (4-bit base) or qdora; the layer in bf16 with PEFT's fp32 adapters, N = 4096 tokens.
Times, interleaved in one process (order reversed every other round; medians): the frozen layer, stock
Inductor twice (the A/A noise), runlora as it is, and `runlora-old`: runlora with forward1's former form
restored by a patch while that model compiles (the base widened to the adapter's dtype, then addmm onto it).
Each model is compiled through a wrapper class of its own (Dynamo's frame cache is shared across backends), with
the compile caches off (before 2026-12-06 they were on: `runlora-old` may have been served runlora's graph).
`kept`: glibc's malloc keeps freed memory (runlora-bench --keep-freed-memory): no step page-faults its fresh
buffers in again, which otherwise moves these timings by more than the change measured.
"""

import copy
import dataclasses
import sys

import torch

from lora_rewrite import variants
from lora_rewrite.bench import measure
from lora_rewrite.compat import fresh_compile_caches
from lora_rewrite.bench.layer import LayerShape, ProbeLoss, build_layer_models, layer_loss_step, make_layer_inputs


def wrapper(name):
    return type("Probe_" + name.replace("-", "_"), (ProbeLoss,),
                {"forward": lambda self, *a, **k: ProbeLoss.forward(self, *a, **k)})


def main(argv) -> None:
    torch.set_num_threads(2)
    kind, rounds, i, o, r = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    kept = argv[5:] == ["kept"]
    if kept:
        measure.keep_freed_memory()
    dtype = torch.bfloat16
    shape = LayerShape(i=i, o=o, tokens=4096, r=r, batch=32)
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=dtype,
                                      device=torch.device("cpu"), fp32_adapters=True, use_dora="dora" in kind,
                                      bits4=kind.startswith("q"))
    inputs = make_layer_inputs(shape, dtype=dtype, device=torch.device("cpu"))
    models = {"frozen": torch.compile(wrapper("frozen")(frozen, inputs.probe)),
              "inductor": torch.compile(wrapper("inductor")(copy.deepcopy(peft), inputs.probe)),
              "inductor-again": torch.compile(wrapper("inductor-again")(copy.deepcopy(peft), inputs.probe)),
              "runlora": torch.compile(wrapper("runlora")(copy.deepcopy(peft), inputs.probe), backend="runlora"),
              "runlora-old": torch.compile(wrapper("runlora-old")(peft, inputs.probe), backend="runlora")}
    steps = {name: layer_loss_step(model, inputs) for name, model in models.items()}
    current = variants.factored_forward

    def widened_first(ops, p):
        if ops.dtype_of(p.base) != ops.dtype_of(p.x):
            p = dataclasses.replace(p, base=ops.cast(p.base, ops.dtype_of(p.x)))
        return current(ops, p)

    def run(name):
        steps[name]().backward()

    for name in steps:   # the first calls compile, each from scratch (a cache hit would serve the other graph)
        object.__setattr__(variants.FORWARD1, "compute", widened_first if name == "runlora-old" else current)
        with fresh_compile_caches():
            run(name)
        for _ in range(2):
            run(name)
    object.__setattr__(variants.FORWARD1, "compute", current)
    median = measure.alternating_medians(run, list(steps), rounds)
    title = f"{kind} i={i} o={o} r={r} bf16 fp32 adapters, {rounds} rounds" + (", freed memory kept" if kept else "")
    print("\n".join(measure.ab_summary(title, median, "runlora-old")))


if __name__ == "__main__":
    main(sys.argv[1:])
