"""Same-process A/B of forward1's sum onto a 16-bit base with fp32 adapters (docs/BENCHMARKS.md, QDoRA section).

    python scripts/ab_widened_base.py KIND ROUNDS I O R [kept]      e.g. qlora 31 512 1376 16 kept

KIND: lora, dora, qlora (4-bit base) or qdora; the layer in bf16 with PEFT's fp32 adapters, N = 4096 tokens: the
frozen layer, stock Inductor twice (the A/A noise), runlora as it is, and `runlora-old`: runlora with the behaviour
`add_narrow_base` disabled (forward1's former form: the base widened to the adapter's dtype, then addmm onto it).
The harness: lora_rewrite/bench/ab.py (each model compiled from scratch: before 2026-12-06 the compile caches were
on, and `runlora-old` may have been served runlora's graph).
"""

import sys

import torch

from lora_rewrite.bench.ab import contenders, layer_ab_settings, run_ab
from lora_rewrite.bench.layer import build_layer_models, make_layer_inputs


def main(argv) -> None:
    kind = argv[0]
    settings, _ = layer_ab_settings(argv[1:])
    shape, r, cpu = settings.shape, settings.r, torch.device("cpu")
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=torch.bfloat16, device=cpu,
                                      fp32_adapters=True, use_dora="dora" in kind, bits4=kind.startswith("q"))
    inputs = make_layer_inputs(shape, dtype=torch.bfloat16, device=cpu)
    models = contenders(peft, frozen, inputs, "runlora-old", {"disable": ["add_narrow_base"]})
    result = run_ab(models, settings.rounds)
    title = f"{kind} i={shape.i} o={shape.o} r={r} bf16 fp32 adapters, {settings.rounds} rounds" + \
        (", freed memory kept" if settings.kept else "")
    print("\n".join(result.summary(title, "runlora-old")))


if __name__ == "__main__":
    main(sys.argv[1:])
