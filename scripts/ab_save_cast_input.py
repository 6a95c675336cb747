"""Same-process A/B: where PEFT's fp32 adapters sit on a 16-bit base, save the adapters' fp32 input (X cast to
fp32) for the backward instead of casting the 16-bit X again there (docs/BENCHMARKS.md, "The bf16 cases with
freed memory kept").

    python scripts/ab_save_cast_input.py ROUNDS I O R [kept]      e.g. 41 1024 1024 16 kept

One LoRA linear, bf16 base, PEFT's fp32 adapters, N = 4096 tokens: the frozen layer, stock Inductor twice (the A/A
noise), runlora as it is (the behaviour `recompute_upcasts`: the cast is tagged must-recompute, the bf16 X kept and
cast again in the backward), and `runlora-saved-cast`: runlora with `recompute_upcasts` disabled (the partitioner
then keeps the fp32 cast; X·Aᵀ is recomputed either way). Bytes saved for backward per model (parameters and
buffers excluded). The harness: lora_rewrite/bench/ab.py.
"""

import sys

import torch

from lora_rewrite.bench.ab import contenders, layer_ab_settings, run_ab
from lora_rewrite.bench.layer import build_layer_models, make_layer_inputs


def main(argv) -> None:
    settings, _ = layer_ab_settings(argv)
    shape, r, cpu = settings.shape, settings.r, torch.device("cpu")
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=torch.bfloat16,
                                      device=cpu, fp32_adapters=True)
    inputs = make_layer_inputs(shape, dtype=torch.bfloat16, device=cpu)
    models = contenders(peft, frozen, inputs, "runlora-saved-cast", {"disable": ["recompute_upcasts"]})
    result = run_ab(models, settings.rounds, saved_bytes=True)
    print("saved for backward, MB:", {name: round(b / 2**20, 3) for name, b in result.saved_bytes.items()})
    title = f"bf16 base, fp32 adapters i={shape.i} o={shape.o} r={r}, {settings.rounds} rounds" + \
        (", freed memory kept" if settings.kept else "")
    print("\n".join(result.summary(title, "runlora-saved-cast")))


if __name__ == "__main__":
    main(sys.argv[1:])
