"""Same-process A/B of merging the casts the rewrite repeats (passes/fx.py, `merge_duplicate_casts`; docs/BENCHMARKS.md,
"DoRA under autocast with dropout: dY cast once").

    python scripts/ab_merge_casts.py ROUNDS I O R DROPOUT [kept]      e.g. 31 1024 2816 16 0.1 kept

One DoRA linear (fp32 model, every forward under torch.autocast(bfloat16)), N = 4096 tokens, lora_dropout =
DROPOUT. Times, interleaved in one process (medians): the frozen layer, stock Inductor twice (the A/A noise),
runlora as it is, and `runlora-unmerged`: runlora with the merge disabled by a patch while that model compiles
(the model's product on X and the rewrite's products each cast dY to bf16). Compiled as
scripts/ab_autocast_dx_total.py compiles (a wrapper class per model, compile caches off). `kept`: glibc's
malloc keeps freed memory (runlora-bench --keep-freed-memory).
"""

import sys

import torch

import lora_rewrite.passes as runlora_pass
from ab_autocast_dx_total import autocast_steps
from lora_rewrite.bench import measure
from lora_rewrite.bench.layer import LayerShape, build_layer_models, make_layer_inputs
from lora_rewrite.compat import fresh_compile_caches


def main(argv) -> None:
    torch.set_num_threads(2)
    rounds, i, o, r, dropout = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    kept = argv[5:] == ["kept"]
    if kept:
        measure.keep_freed_memory()
    cpu = torch.device("cpu")
    shape = LayerShape(i=i, o=o, tokens=4096, r=r, batch=32)
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=dropout, bias=False, dtype=torch.float32,
                                      device=cpu, fp32_adapters=False, use_dora=True, bits4=False)
    inputs = make_layer_inputs(shape, dtype=torch.float32, device=cpu)
    steps = autocast_steps(peft, frozen, inputs, "runlora-unmerged")
    merge = runlora_pass.merge_duplicate_casts
    merged = {}

    def counting(graph):
        merged[name] = merge(graph)
        return merged[name]

    def run(name):
        steps[name]().backward()

    for name in steps:   # the first calls compile, each from scratch (a cache hit would serve the other graph)
        runlora_pass.merge_duplicate_casts = (lambda graph: 0) if name == "runlora-unmerged" else counting
        with fresh_compile_caches():
            run(name)
        for _ in range(2):
            run(name)
    runlora_pass.merge_duplicate_casts = merge
    print("casts merged:", merged)
    median = measure.alternating_medians(run, list(steps), rounds)
    title = f"dora autocast i={i} o={o} r={r} dropout={dropout}, {rounds} rounds" + (", freed memory kept" if kept else "")
    print("\n".join(measure.ab_summary(title, median, "runlora-unmerged")))


if __name__ == "__main__":
    main(sys.argv[1:])
