"""A real LoRA fine-tune that runs on any CPU machine in a few minutes, with nothing downloaded.

    python examples/finetune.py                       # runlora, ~2-4 minutes on 2 CPU cores
    python examples/finetune.py --compare             # eager, inductor, runlora from one start (~3× as long)
    python examples/finetune.py --loraplus-ratio 16   # LoRA+ (peft.optimizers.create_loraplus_optimizer)

The model is a small Llama (hidden 256, 4 layers, random initial weights from a config) with PEFT
LoRA on every attention and MLP linear. Only the adapters train: the base stays random and frozen,
and the loss still falls well below ln 257 ≈ 5.55 nats per byte. The text is what every Python
has: the standard library's own source files, read as bytes (one token per byte, plus a separator
between files), packed into fixed-length sequences; 5 % is held out to evaluate on.

`torch.compile(model, backend="runlora")` is the only line that differs from a stock PEFT loop.
At the end it prints median step times (and, with --compare, the speedups), where the loss-curve
PNG is, and what runlora rewrote (`torch._dynamo.utils.counters["runlora"]`). With --compare the
backends run one after another, not interleaved: the times are indicative; `runlora-bench` measures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

BACKENDS = ("eager", "inductor", "runlora")
SEPARATOR = 256          # between files; bytes are 0..255
VOCAB_SIZE = 257
HELD_OUT_FRACTION = 0.05
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="runlora")
    p.add_argument("--compare", action="store_true",
                   help="train with every backend from the same initial weights and batches; report step times")
    p.add_argument("--loraplus-ratio", type=float, default=None,
                   help="LoRA+: B's learning rate is this many times A's (peft.optimizers.create_loraplus_optimizer)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--corpus-mb", type=float, default=4.0, help="how much of the standard library to read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "finetune"), help="folder for the PNG and the summary")
    # tests: Inductor's passes without code generation (runlora's codegen=False), seconds instead of minutes
    p.add_argument("--no-codegen", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- data ---------------------------------------------------------------------------------------------

def standard_library_files() -> list[Path]:
    """Every .py file of this interpreter's standard library (not site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not ({"site-packages", "dist-packages"} & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(max_bytes: int, seed: int) -> torch.Tensor:
    """The bytes of standard-library files (a seeded shuffle of them, so every package contributes),
    with SEPARATOR between files, as one long int64 tensor of token ids."""
    files = standard_library_files()
    random.Random(seed).shuffle(files)
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data:   # empty __init__.py files
            continue
        chunks.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).long())
        chunks.append(torch.tensor([SEPARATOR]))
        total += len(data) + 1
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit("found no standard-library source files to train on")
    return torch.cat(chunks)


class Batches:
    """Random windows of seq_len tokens; the same seed gives every backend the same batches."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if len(tokens) <= seq_len:
            raise SystemExit(f"corpus of {len(tokens)} tokens is shorter than --seq-len {seq_len}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.generator)
        return torch.stack([self.tokens[s:s + self.seq_len] for s in starts.tolist()])


def held_out_windows(tokens: torch.Tensor, seq_len: int, count: int = 16) -> torch.Tensor:
    stride = max(1, (len(tokens) - seq_len) // count)
    starts = list(range(0, len(tokens) - seq_len, stride))[:count]
    return torch.stack([tokens[s:s + seq_len] for s in starts])


# --- model ----------------------------------------------------------------------------------------------

def build_model(args):
    """A Llama from a config, randomly initialised (seeded), with PEFT LoRA on all attention and MLP linears."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=args.hidden_size,
        intermediate_size=int(8 * args.hidden_size / 3 / 16 + 0.5) * 16,   # Llama's 8/3 ratio, a multiple of 16
        num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=args.seq_len,
        bos_token_id=SEPARATOR, eos_token_id=SEPARATOR, pad_token_id=None, tie_word_embeddings=False,
        use_cache=False)
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES)
    return get_peft_model(base, lora).train()


def make_optimizer(model, args):
    if args.loraplus_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=args.lr,
                                         loraplus_lr_ratio=args.loraplus_ratio)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)


def compile_for(model, backend: str, args):
    if backend == "eager":
        return model
    if backend == "runlora":
        return torch.compile(model, backend="runlora", options={"codegen": False} if args.no_codegen else None)
    if args.no_codegen:   # stock Inductor's passes without code generation, to match runlora's --no-codegen
        return torch.compile(model, backend="runlora", options={"rewrite": False, "codegen": False})
    return torch.compile(model)


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean loss over the held-out windows, on the uncompiled model (no compile for inference)."""
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in windows.split(batch_size)]
    model.train()
    return statistics.fmean(losses)


# --- training -------------------------------------------------------------------------------------------

def train(backend: str, initial_model, train_tokens, eval_windows, args) -> dict:
    from tqdm import tqdm

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = copy.deepcopy(initial_model)
    optimizer = make_optimizer(model, args)
    step_fn = compile_for(model, backend, args)
    batches = Batches(train_tokens, args.batch_size, args.seq_len, seed=args.seed + 1)
    tokens_per_step = args.batch_size * args.seq_len
    losses, step_seconds = [], []
    bar = tqdm(range(args.steps), desc=f"{backend:>8}", unit="step", dynamic_ncols=True, file=sys.stderr)
    for _ in bar:
        batch = batches.next()
        start = time.perf_counter()
        loss = step_fn(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_step / step_seconds[-1]:,.0f}")
    bar.close()
    steady = step_seconds[1:] or step_seconds      # the first step compiles
    counters = dict(torch._dynamo.utils.counters["runlora"])
    return {
        "backend": backend,
        "losses": losses,
        "first_step_s": step_seconds[0],
        "median_step_s": statistics.median(steady),
        "tokens_per_s": tokens_per_step / statistics.median(steady),
        "final_train_loss": statistics.fmean(losses[-10:]),
        "held_out_loss": held_out_loss(model, eval_windows, args.batch_size),
        "runlora": counters if backend == "runlora" else None,
    }


def exponential_average(values: list[float], weight: float = 0.9) -> list[float]:
    smoothed, current = [], values[0]
    for v in values:
        current = weight * current + (1 - weight) * v
        smoothed.append(current)
    return smoothed


def plot_losses(results: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for result in results:
        steps = range(1, len(result["losses"]) + 1)
        line, = ax.plot(steps, result["losses"], linewidth=0.8, alpha=0.35)
        ax.plot(steps, exponential_average(result["losses"]), color=line.get_color(), linewidth=1.8,
                label=f"{result['backend']} (moving average)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    optimizer = f"LoRA+ ratio {args.loraplus_ratio:g}" if args.loraplus_ratio is not None else "AdamW"
    ax.set_title(f"LoRA r={args.rank} on a {args.layers}-layer Llama ({args.hidden_size} hidden), "
                 f"Python standard library bytes, {optimizer}")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runlora_summary(counters: dict | None) -> str:
    if not counters:
        return ("runlora: no graph was compiled (served from the compile cache with no stored report, or "
                "nothing to do)")
    chosen = ", ".join(f"{k.removeprefix('chose_')} ×{v}" for k, v in sorted(counters.items()) if k.startswith("chose_"))
    graphs, cached = counters.get("graphs", 0), counters.get("graphs_from_cache", 0)
    served = ""
    if cached:
        served = (f"; {'all' if cached == graphs else cached} of these graphs served from the compile cache "
                  f"(counted as rewritten when they were compiled)")
    return (f"runlora: rewrote {counters.get('sites_rewritten', 0)} of {counters.get('sites_found', 0)} LoRA "
            f"sites in {graphs} graph(s) (backward rewritten at {counters.get('backward_rewritten', 0)}); "
            f"chose {chosen or 'nothing'}{served}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    import lora_rewrite  # noqa: F401  (registers "runlora" when run from a source checkout)

    corpus = load_corpus(int(args.corpus_mb * 2**20), args.seed)
    split = int(len(corpus) * (1 - HELD_OUT_FRACTION))
    train_tokens, eval_windows = corpus[:split], held_out_windows(corpus[split:], args.seq_len)
    initial_model = build_model(args)
    trainable = sum(p.numel() for p in initial_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in initial_model.parameters())
    print(f"corpus: {len(corpus):,} bytes of the Python {sys.version.split()[0]} standard library "
          f"({len(train_tokens):,} to train on); model: {total / 1e6:.2f}M parameters, {trainable:,} trainable "
          f"(LoRA r={args.rank}); {args.steps} steps of {args.batch_size}×{args.seq_len} tokens; "
          f"{torch.get_num_threads()} threads")
    start_loss = held_out_loss(initial_model, eval_windows, args.batch_size)

    backends = list(BACKENDS) if args.compare else [args.backend]
    results = [train(backend, initial_model, train_tokens, eval_windows, args) for backend in backends]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "loss.png"
    plot_losses(results, png, args)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "held_out_loss_at_start": start_loss,
                                                  "results": results}, indent=2) + "\n")

    print(f"\nheld-out loss before training: {start_loss:.3f}")
    print(f"{'backend':>9} | {'median step, ms':>15} | {'tokens/s':>9} | {'first step, s':>13} | "
          f"{'train loss':>10} | {'held-out loss':>13}")
    for r in results:
        print(f"{r['backend']:>9} | {r['median_step_s'] * 1e3:>15.1f} | {r['tokens_per_s']:>9,.0f} | "
              f"{r['first_step_s']:>13.1f} | {r['final_train_loss']:>10.3f} | {r['held_out_loss']:>13.3f}")
    if args.compare:
        by = {r["backend"]: r for r in results}
        for reference in ("eager", "inductor"):
            ratio = by[reference]["median_step_s"] / by["runlora"]["median_step_s"]
            print(f"runlora vs {reference}: {ratio:.2f}× the speed (time per step {(1 / ratio - 1) * 100:+.1f} %)")
        gap = max(abs(a - b) for a, b in zip(by["eager"]["losses"], by["runlora"]["losses"]))
        print(f"largest difference between the eager and runlora loss curves: {gap:.2e}")
        print("(backends ran one after another, not interleaved: indicative; runlora-bench measures)")
    print(f"loss curve: {png}")
    for r in results:
        if r["runlora"] is not None:
            print(runlora_summary(r["runlora"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
