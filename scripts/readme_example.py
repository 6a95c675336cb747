"""The README's explain() example, run as printed, and its down_proj site pictures for docs/figures/.

    .venv/bin/python scripts/readme_example.py [--figures docs/figures]

Prints the report the README shows. With --figures, compiles the same call once more with a dump dir
and copies the down_proj site's before/after pictures to <figures>/site_{before,after}_<fwd>_<bwd>.png.
The forms a site runs in are measured on this machine, so they (and the picture's products) may differ
elsewhere; the variants and FLOPs do not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lora_rewrite


def readme_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=256))
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", default=None, help="copy the down_proj site pictures into this folder")
    args = parser.parse_args()
    model = readme_model()
    ids = torch.randint(0, 256, (4, 512))
    print(lora_rewrite.explain(model, input_ids=ids, labels=ids))
    if args.figures is None:
        return
    dump = Path(tempfile.mkdtemp(prefix="runlora-readme-"))
    lora_rewrite.explain(model, input_ids=ids, labels=ids, options={"dump_dir": str(dump)})
    (folder,) = [p for p in dump.iterdir() if (p / "report.json").exists()]
    sites = json.loads((folder / "report.json").read_text())["sites"]
    k = next(k for k, s in enumerate(sites) if s["module"].endswith("down_proj"))
    site = sites[k]
    for when in ("before", "after"):
        target = Path(args.figures) / f"site_{when}_{site['forward']}_{site['backward']}.png"
        shutil.copy(folder / f"site{k}_{when}.png", target)
        print("wrote", target)


if __name__ == "__main__":
    main()
