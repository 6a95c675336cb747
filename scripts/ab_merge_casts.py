"""Same-process A/B of merging the casts the rewrite repeats (passes/fx.py, `merge_duplicate_casts`; docs/BENCHMARKS.md,
"DoRA under autocast with dropout: dY cast once").

    python scripts/ab_merge_casts.py ROUNDS I O R DROPOUT [kept]      e.g. 31 1024 2816 16 0.1 kept

One DoRA linear (fp32 model, every forward under torch.autocast(bfloat16)), N = 4096 tokens, lora_dropout =
DROPOUT: the frozen layer, stock Inductor twice (the A/A noise), runlora as it is, and `runlora-unmerged`: runlora
with the behaviour `merge_casts` disabled (the model's product on X and the rewrite's products each cast dY to
bf16). The harness: lora_rewrite/bench/ab.py.
"""

import sys

import torch

from lora_rewrite.bench.ab import contenders, layer_ab_settings, run_ab
from lora_rewrite.bench.layer import build_layer_models, make_layer_inputs


def main(argv) -> None:
    settings, (dropout,) = layer_ab_settings(argv, extra=1)
    dropout = float(dropout)
    shape, r, cpu = settings.shape, settings.r, torch.device("cpu")
    peft, frozen = build_layer_models(shape, r=r, alpha=r, dropout=dropout, bias=False, dtype=torch.float32,
                                      device=cpu, fp32_adapters=False, use_dora=True, bits4=False)
    inputs = make_layer_inputs(shape, dtype=torch.float32, device=cpu)
    models = contenders(peft, frozen, inputs, "runlora-unmerged", {"disable": ["merge_casts"]}, autocast=True)
    result = run_ab(models, settings.rounds)
    print("casts merged:", {name: sum(r.casts_merged for r in reports) for name, reports in result.reports.items()
                            if name.startswith("runlora")})
    title = f"dora autocast i={shape.i} o={shape.o} r={r} dropout={dropout}, {settings.rounds} rounds" + \
        (", freed memory kept" if settings.kept else "")
    print("\n".join(result.summary(title, "runlora-unmerged")))


if __name__ == "__main__":
    main(sys.argv[1:])
