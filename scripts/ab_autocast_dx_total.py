"""Same-process A/B of DoRA's whole input gradient under torch.autocast (docs/BENCHMARKS.md, "DoRA with a 16-bit
base under a 32-bit sum").

    python scripts/ab_autocast_dx_total.py ROUNDS I O R [kept]      e.g. 31 1024 1024 64 kept

One DoRA linear (fp32 model, every forward under torch.autocast(bfloat16)), N = 4096 tokens: the frozen layer,
stock Inductor twice (the A/A noise), runlora as it is (DxMode.TOTAL: the whole input gradient from one bf16 dY),
and `runlora-lora-dx`: runlora with the behaviour `dx_through_casts` disabled (only the adapter's dX_a replaced,
the model's own bf16 base gradient kept, as before `411ab3a`). The harness: lora_rewrite/bench/ab.py.
"""

import sys

import torch

from lora_rewrite.bench.ab import contenders, layer_ab_settings, run_ab
from lora_rewrite.bench.layer import build_layer_models, make_layer_inputs


def main(argv) -> None:
    settings, _ = layer_ab_settings(argv)
    shape, r, cpu = settings.shape, settings.r, torch.device("cpu")
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=0.0, bias=False, dtype=torch.float32, device=cpu,
                                      fp32_adapters=False, use_dora=True, bits4=False)
    inputs = make_layer_inputs(shape, dtype=torch.float32, device=cpu)
    models = contenders(peft, frozen, inputs, "runlora-lora-dx", {"disable": ["dx_through_casts"]}, autocast=True)
    result = run_ab(models, settings.rounds)
    title = f"dora autocast i={shape.i} o={shape.o} r={r}, {settings.rounds} rounds" + \
        (", freed memory kept" if settings.kept else "")
    print("\n".join(result.summary(title, "runlora-lora-dx")))


if __name__ == "__main__":
    main(sys.argv[1:])
