"""Same-process A/B of DoRA's whole input gradient under torch.autocast (docs/BENCHMARKS.md, "DoRA with a 16-bit
base under a 32-bit sum").

    python scripts/ab_autocast_dx_total.py ROUNDS I O R [kept]      e.g. 31 1024 1024 64 kept

One DoRA linear (fp32 model, every forward under torch.autocast(bfloat16)), N = 4096 tokens. Times, interleaved
in one process (order reversed every other round; medians): the frozen layer, stock Inductor twice (the A/A
noise), runlora as it is (DxMode.TOTAL: the whole input gradient from one bf16 dY), and `runlora-lora-dx`:
runlora with the matcher's autocast input-gradient sum disabled by a patch while that model compiles (only the
adapter's dX_a replaced, the model's own bf16 base gradient kept, as before `411ab3a`). Each model is compiled
through a wrapper class of its own (Dynamo's frame cache is shared across backends), with the compile caches
off. `kept`: glibc's malloc keeps freed memory (runlora-bench --keep-freed-memory).
"""

import copy
import sys

import torch

from lora_rewrite.bench import measure
from lora_rewrite.compat import fresh_compile_caches
from lora_rewrite.bench.layer import LayerShape, ProbeLoss, build_layer_models, layer_loss_step, make_layer_inputs
from lora_rewrite.passes import match_dora


def wrapper(name):
    return type("Probe_" + name.replace("-", "_"), (ProbeLoss,),
                {"forward": lambda self, *a, **k: ProbeLoss.forward(self, *a, **k)})


def autocast_steps(peft, frozen, inputs, variant: str) -> dict:
    """The A/B's steps under torch.autocast(bfloat16), by name: frozen, stock Inductor twice, runlora, and
    runlora again as `variant` (each model through a wrapper class of its own; `peft` itself is variant's)."""
    models = {"frozen": torch.compile(wrapper("frozen")(frozen, inputs.probe)),
              "inductor": torch.compile(wrapper("inductor")(copy.deepcopy(peft), inputs.probe)),
              "inductor-again": torch.compile(wrapper("inductor-again")(copy.deepcopy(peft), inputs.probe)),
              "runlora": torch.compile(wrapper("runlora")(copy.deepcopy(peft), inputs.probe), backend="runlora"),
              variant: torch.compile(wrapper(variant)(peft, inputs.probe), backend="runlora")}
    cpu = torch.device("cpu")
    return {name: measure.under_autocast(layer_loss_step(model, inputs), cpu) for name, model in models.items()}


def layer_ab_settings(argv):
    """(rounds, LayerShape, r, kept) from `ROUNDS I O R [kept]`, N = 4096; 2 threads, and glibc keeping freed
    memory where `kept` is given (runlora-bench --keep-freed-memory)."""
    torch.set_num_threads(2)
    rounds, i, o, r = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    kept = argv[4:] == ["kept"]
    if kept:
        measure.keep_freed_memory()
    return rounds, LayerShape(i=i, o=o, tokens=4096, r=r, batch=32), r, kept


def main(argv) -> None:
    rounds, shape, r, kept = layer_ab_settings(argv)
    i, o = shape.i, shape.o
    cpu = torch.device("cpu")
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=torch.float32, device=cpu,
                                      fp32_adapters=False, use_dora=True, bits4=False)
    inputs = make_layer_inputs(shape, dtype=torch.float32, device=cpu)
    steps = autocast_steps(peft, frozen, inputs, "runlora-lora-dx")
    current = match_dora._base_output_gradient

    def not_through_casts(mns, minus_one, casts=False):
        return (lambda gb, dy: False) if casts else current(mns, minus_one)

    def run(name):
        steps[name]().backward()

    for name in steps:   # the first calls compile, each from scratch (a cache hit would serve the other graph)
        match_dora._base_output_gradient = not_through_casts if name == "runlora-lora-dx" else current
        with fresh_compile_caches():
            run(name)
        for _ in range(2):
            run(name)
    match_dora._base_output_gradient = current
    median = measure.alternating_medians(run, list(steps), rounds)
    title = f"dora autocast i={i} o={o} r={r}, {rounds} rounds" + (", freed memory kept" if kept else "")
    print("\n".join(measure.ab_summary(title, median, "runlora-lora-dx")))


if __name__ == "__main__":
    main(sys.argv[1:])
