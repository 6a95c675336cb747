"""Profile runlora's plain LoRA and its DoRA on one layer in one process, freed memory kept (docs/BENCHMARKS.md,
"The same table with freed memory kept": what DoRA costs runlora by kernel).

    python scripts/profile_dora_vs_lora.py I O N R      e.g. 1024 1024 4096 64

fp32, no dropout, alpha = r. First 15 interleaved timed steps of runlora on plain LoRA, runlora on DoRA and the
frozen layer (medians, overhead over frozen), then per implementation a table of its ops over 5 steps, grouped
by input shape, by self CPU time, Inductor's kernels named (cpp.enable_kernel_profile). 2 threads.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lora_rewrite.bench import measure
from lora_rewrite.bench.layer import LayerShape, ProbeLoss, build_layer_models, layer_loss_step, make_layer_inputs

measure.keep_freed_memory()
torch._inductor.config.cpp.enable_kernel_profile = True
torch.set_num_threads(2)
i, o, n, r = (int(v) for v in sys.argv[1:5])
shape = LayerShape(i=i, o=o, tokens=n, r=r, batch=32)
cpu = torch.device("cpu")
inputs = make_layer_inputs(shape, dtype=torch.float32, device=cpu)
models = {}
for kind in ("lora", "dora"):
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=torch.float32, device=cpu,
                                      fp32_adapters=False, use_dora=kind == "dora", bits4=False)
    models[kind] = torch.compile(ProbeLoss(peft, inputs.probe), backend="runlora")
models["frozen"] = torch.compile(ProbeLoss(frozen, inputs.probe))
steps = {name: layer_loss_step(model, inputs) for name, model in models.items()}
def run(name):
    steps[name]().backward()
for name in steps:
    for _ in range(3):
        run(name)
times = {name: [] for name in steps}
for _ in range(15):
    for name in steps:
        t = time.perf_counter(); run(name); times[name].append(time.perf_counter() - t)
med = {k: sorted(v)[len(v)//2]*1e3 for k, v in times.items()}
print({k: round(v, 2) for k, v in med.items()}, "lora %+.3f dora %+.3f" % (med["lora"]/med["frozen"]-1, med["dora"]/med["frozen"]-1))
for name in ("lora", "dora"):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(5):
            run(name)
    print("=====", name, "(5 steps)")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=22,
                                                               max_name_column_width=40, max_shapes_column_width=80))
