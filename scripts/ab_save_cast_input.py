"""Same-process A/B: where PEFT's fp32 adapters sit on a 16-bit base, save the adapters' fp32 input (X cast to
fp32) for the backward instead of casting the 16-bit X again there (docs/BENCHMARKS.md, "The bf16 cases with
freed memory kept").

    python scripts/ab_save_cast_input.py ROUNDS I O R [kept]      e.g. 41 1024 1024 16 kept

One LoRA linear, bf16 base, PEFT's fp32 adapters, N = 4096 tokens. Times, interleaved in one process (medians):
the frozen layer, stock Inductor twice (the A/A noise), runlora as it is (`_upcasts_worth_recomputing` in
passes/rewrite.py tags the cast must-recompute: the bf16 X is kept and cast again in the backward), and
`runlora-saved-cast`: runlora with that tagging disabled by a patch while that model compiles (the partitioner
then keeps the fp32 cast; X·Aᵀ is recomputed either way). Bytes saved for backward per model (parameters and
buffers excluded). Each model is compiled through a wrapper class of its own, with the compile caches off.
`kept`: glibc's malloc keeps freed memory (runlora-bench --keep-freed-memory).
"""

import copy
import sys

import torch

from ab_autocast_dx_total import layer_ab_settings, wrapper
from lora_rewrite.bench import measure
from lora_rewrite.bench.layer import build_layer_models, layer_loss_step, make_layer_inputs
from lora_rewrite.compat import fresh_compile_caches
from lora_rewrite.passes import rewrite


def main(argv) -> None:
    rounds, shape, r, kept = layer_ab_settings(argv)
    i, o = shape.i, shape.o
    cpu = torch.device("cpu")
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=torch.bfloat16,
                                      device=cpu, fp32_adapters=True)
    inputs = make_layer_inputs(shape, dtype=torch.bfloat16, device=cpu)
    models = {"frozen": torch.compile(wrapper("frozen")(frozen, inputs.probe)),
              "inductor": torch.compile(wrapper("inductor")(copy.deepcopy(peft), inputs.probe)),
              "inductor-again": torch.compile(wrapper("inductor-again")(copy.deepcopy(peft), inputs.probe)),
              "runlora": torch.compile(wrapper("runlora")(copy.deepcopy(peft), inputs.probe), backend="runlora"),
              "runlora-saved-cast": torch.compile(wrapper("runlora-saved-cast")(peft, inputs.probe),
                                                  backend="runlora")}
    steps = {name: layer_loss_step(model, inputs) for name, model in models.items()}
    upcasts = rewrite._upcasts_worth_recomputing

    def run(name):
        steps[name]().backward()

    saved = {}
    for name in steps:   # the first calls compile, each from scratch
        rewrite._upcasts_worth_recomputing = (lambda site: []) if name == "runlora-saved-cast" else upcasts
        with fresh_compile_caches():
            run(name)
        saved[name] = measure.saved_for_backward_bytes(measure.Implementation(name, steps[name], models[name]))
        for _ in range(2):
            run(name)
    rewrite._upcasts_worth_recomputing = upcasts
    print("saved for backward, MB:", {name: round(b / 2**20, 3) for name, b in saved.items()})
    median = measure.alternating_medians(run, list(steps), rounds)
    title = f"bf16 base, fp32 adapters i={i} o={o} r={r}, {rounds} rounds" + (", freed memory kept" if kept else "")
    print("\n".join(measure.ab_summary(title, median, "runlora-saved-cast")))


if __name__ == "__main__":
    main(sys.argv[1:])
