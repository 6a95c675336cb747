"""Profile one layer-bench step (frozen, stock Inductor, runlora) with torch.profiler, shapes recorded: the
source of the per-product numbers quoted in docs/BENCHMARKS.md ("What the profile found", "What is left").

    python scripts/profile_layer_step.py I O N R DTYPE FP32_ADAPTERS [DROPOUT] [IMPLS] [KIND]
    e.g. python scripts/profile_layer_step.py 1024 1024 8192 16 fp32 0
         python scripts/profile_layer_step.py 1024 1024 4096 64 bf16 0 0.0 inductor,runlora
         python scripts/profile_layer_step.py 1024 1024 4096 16 bf16 1 0.0 inductor,runlora qdora

KIND: lora (default), dora, qlora (4-bit bases) or qdora (DoRA on 4-bit bases).

First 9 interleaved timed steps (medians, overhead over frozen), then a table per implementation of its
ops over 3 steps, grouped by input shape, by self CPU time. One process, 2 threads; nothing else running.
"""

import copy
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lora_rewrite.bench.layer import LayerShape, ProbeLoss, build_layer_models, layer_loss_step, make_layer_inputs


KINDS = ("lora", "dora", "qlora", "qdora")


def main(argv) -> None:
    torch.set_num_threads(2)
    i, o, n, r = (int(v) for v in argv[:4])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[argv[4]]
    fp32_adapters = argv[5] == "1"
    dropout = float(argv[6]) if len(argv) > 6 else 0.0
    profiled = argv[7].split(",") if len(argv) > 7 else ["frozen", "inductor", "runlora"]
    kind = argv[8] if len(argv) > 8 else "lora"
    if kind not in KINDS:
        raise SystemExit(f"KIND must be one of {', '.join(KINDS)}, got {kind!r}")
    shape = LayerShape(i=i, o=o, tokens=n, r=r, batch=32)
    cpu = torch.device("cpu")
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=dropout, bias=False, dtype=dtype, device=cpu,
                                      fp32_adapters=fp32_adapters, use_dora="dora" in kind, bits4=kind.startswith("q"))
    inputs = make_layer_inputs(shape, dtype=dtype, device=cpu)
    models = {"frozen": torch.compile(ProbeLoss(frozen, inputs.probe)),
              "inductor": torch.compile(ProbeLoss(copy.deepcopy(peft), inputs.probe)),
              "runlora": torch.compile(ProbeLoss(peft, inputs.probe), backend="runlora")}
    steps = {name: layer_loss_step(model, inputs) for name, model in models.items()}
    median = time_and_profile(steps, rounds=9, profiled=profiled, profile_steps=3)
    print("overhead over frozen: inductor %+.1f %%, runlora %+.1f %%"
          % ((median["inductor"] / median["frozen"] - 1) * 100, (median["runlora"] / median["frozen"] - 1) * 100))


def time_and_profile(steps: dict, rounds: int, profiled, profile_steps: int, row_limit: int = 16) -> dict:
    """Each step 3 times (compiles), `rounds` interleaved timed rounds (prints and returns the medians, ms),
    then a torch.profiler table of each `profiled` step over `profile_steps` steps, by input shape."""
    def run(name):
        steps[name]().backward()

    for name in steps:
        for _ in range(3):
            run(name)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name in steps:
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    print({name: round(ms, 2) for name, ms in median.items()})
    for name in profiled:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(profile_steps):
                run(name)
        print("=====", name, f"({profile_steps} steps)")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=row_limit,
                                                                   max_name_column_width=40,
                                                                   max_shapes_column_width=90))
    return median

if __name__ == "__main__":
    main(sys.argv[1:])
