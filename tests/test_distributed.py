"""runlora under DistributedDataParallel: two CPU processes (gloo), eager DDP vs compiled DDP.

DDP's own graph splitting (DDPOptimizer: one subgraph per gradient bucket) hands our backend several
graphs; a site cut by a bucket boundary is left untouched, every other site is rewritten, and the
all-reduced gradients equal eager DDP's.
"""

import json

from helpers import run_fresh_python

SCRIPT = """
import os, tempfile
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

def worker(rank, world, init_file, bucket_mb, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Tiny buckets for tiny adapters (so the graph splits); DDPOptimizer wants the first no larger.
    dist._DEFAULT_FIRST_BUCKET_BYTES = int(bucket_mb * 2**20)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(rank))
    grads = {}
    for label in ("eager", "runlora"):
        torch._dynamo.reset()
        m = DDP(model, bucket_cap_mb=bucket_mb)
        if label == "runlora":
            m = torch.compile(m, backend="runlora", options={"codegen": False})
        model.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    err = max(float((grads["eager"][n] - grads["runlora"][n]).abs().max() / grads["eager"][n].abs().max())
              for n in grads["eager"])
    from torch._dynamo.utils import counters
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"err": err, "same_keys": grads["eager"].keys() == grads["runlora"].keys(),
                       "counters": dict(counters["runlora"])}, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    import sys
    bucket_mb, out_file = float(sys.argv[1]), sys.argv[2]
    init_file = tempfile.mktemp()
    mp.spawn(worker, args=(2, init_file, bucket_mb, out_file), nprocs=2, join=True)
    print("RESULT", open(out_file).read())
"""


def test_ddp_with_small_buckets_matches_eager_ddp(tmp_path):
    script = tmp_path / "ddp_runlora.py"
    from helpers import FRESH_PRELUDE

    script.write_text(FRESH_PRELUDE + SCRIPT)
    out = tmp_path / "result.json"
    # 0.005 MB buckets: DDPOptimizer splits the compiled frame into several graphs.
    run_fresh_python(f"import runpy, sys; sys.argv = ['x', '0.005', {str(out)!r}]; "
                     f"runpy.run_path({str(script)!r}, run_name='__main__')")
    result = json.loads(out.read_text())
    assert result["same_keys"] and result["err"] <= 1e-5
    counters = result["counters"]
    assert counters["graphs"] > 1, "DDPOptimizer split the graph"
    assert counters["sites_rewritten"] >= 1
    assert counters["sites_rewritten"] + counters["sites_skipped"] == counters["sites_found"]
