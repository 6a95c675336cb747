"""Profile runlora's plain LoRA and its DoRA on one layer in one process, freed memory kept (docs/BENCHMARKS.md,
"The same table with freed memory kept": what DoRA costs runlora by kernel).

    python scripts/profile_dora_vs_lora.py I O N R      e.g. 1024 1024 4096 64

fp32, no dropout, alpha = r. First 15 interleaved timed steps of runlora on plain LoRA, runlora on DoRA and the
frozen layer (medians, overhead over frozen), then per implementation a table of its ops over 5 steps, grouped
by input shape, by self CPU time, Inductor's kernels named (cpp.enable_kernel_profile). 2 threads.
"""

import sys

import torch

from lora_rewrite.bench import measure
from lora_rewrite.bench.layer import LayerShape, ProbeLoss, build_layer_models, layer_loss_step, make_layer_inputs
from profile_layer_step import time_and_profile


def main(argv) -> None:
    measure.keep_freed_memory()
    torch._inductor.config.cpp.enable_kernel_profile = True
    torch.set_num_threads(2)
    i, o, n, r = (int(v) for v in argv[:4])
    shape = LayerShape(i=i, o=o, tokens=n, r=r, batch=32)
    cpu = torch.device("cpu")
    inputs = make_layer_inputs(shape, dtype=torch.float32, device=cpu)
    models = {}
    for kind in ("lora", "dora"):
        peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=torch.float32,
                                          device=cpu, fp32_adapters=False, use_dora=kind == "dora", bits4=False)
        models[kind] = torch.compile(ProbeLoss(peft, inputs.probe), backend="runlora")
    models["frozen"] = torch.compile(ProbeLoss(frozen, inputs.probe))
    steps = {name: layer_loss_step(model, inputs) for name, model in models.items()}
    median = time_and_profile(steps, rounds=15, profiled=("lora", "dora"), profile_steps=5, row_limit=22)
    print("overhead over frozen: lora %+.3f dora %+.3f"
          % (median["lora"] / median["frozen"] - 1, median["dora"] / median["frozen"] - 1))


if __name__ == "__main__":
    main(sys.argv[1:])
