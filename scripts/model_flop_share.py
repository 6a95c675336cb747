"""The adapters' FLOP share of a model step, for docs/BENCHMARKS.md's model overhead table.

    python scripts/model_flop_share.py RESULT.json [--impl runlora-flops]

For each model case of a runlora-bench JSON: the frozen step's matmul FLOPs (torch.utils.flop_counter
over one forward + backward of the frozen model as the benchmark runs it: inputs_embeds requiring grad),
and the chosen variants' FLOPs over the frozen layers' (Σ sites variant FLOPs − 4·N·i·o, from the report's
choices). The share is their ratio: runlora/frozen − 1 could reach it if every extra product ran at the
frozen step's average rate. Counts one sequence on the CPU (about a second for Llama-60m).
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_rewrite.bench import models
from lora_rewrite.variants import BY_NAME, Dims

CHOICE = re.compile(r"(forward\d)/(backward\d) \(i=(\d+) o=(\d+) r=(\d+) N=(\d+)")


def frozen_step_flops(config: str, batch: int, seq_len: int) -> int:
    """One sequence counted on the CPU, times the batch: every matmul of the step, attention included,
    is linear in the number of sequences."""
    spec = models.load_spec(config)
    model = models.build_base_model(spec, dtype=torch.float32, device=torch.device("cpu")).requires_grad_(False)
    embeds = torch.randn(1, seq_len, spec.config.hidden_size, requires_grad=True)
    labels = torch.randint(4, spec.config.vocab_size, (1, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds, labels=labels).loss.backward()
    return batch * counter.get_total_flops()


def extra_adapter_flops(choices: dict) -> int:
    extra = 0
    for key, count in choices.items():
        m = CHOICE.match(key)
        if m is None:
            raise ValueError(f"cannot read the choice {key!r}")
        i, o, r, n = (int(g) for g in m.groups()[2:])
        d = Dims(n, i, o, r, True)
        extra += count * (BY_NAME[m.group(1)].flops(d) + BY_NAME[m.group(2)].flops(d) - 4 * n * i * o)
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("--impl", default="runlora-flops")
    parser.add_argument("--config", default=None, help="the model config (default: the case's settings)")
    args = parser.parse_args()
    for case in json.load(open(args.result))["cases"]:
        settings = case["settings"]
        row = next(r for r in case["rows"] if r["implementation"] == args.impl)
        frozen = frozen_step_flops(args.config or settings["model"], settings["batch"], settings["seq_len"])
        extra = extra_adapter_flops(row["variants"]["choices"])
        print(f"{case['title']}: frozen step {frozen:,} FLOPs, adapters' extra {extra:,} -> share {extra / frozen:.2%}")


if __name__ == "__main__":
    main()
