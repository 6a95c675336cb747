"""A real LoRA fine-tune that runs on any CPU machine in a few minutes, with nothing downloaded.

    python examples/finetune.py                       # runlora, about 2 minutes on 2 CPU cores
    python examples/finetune.py --compare             # eager, inductor (twice) and runlora, interleaved
    python examples/finetune.py --loraplus-ratio 16   # LoRA+ (peft.optimizers.create_loraplus_optimizer)

The model is a small Llama (hidden 256, 4 layers, random initial weights from a config) with PEFT
LoRA on every attention and MLP linear. Only the adapters train: the base stays random and frozen,
and the loss still falls well below ln 257 ≈ 5.55 nats per byte. The text is what every Python
has: the standard library's own source files, read as bytes (one token per byte, plus a separator
between files), packed into fixed-length sequences; 5 % is held out to evaluate on.

`torch.compile(model, backend="runlora")` is the only line that differs from a stock PEFT loop.
At the end it prints the median step time with its min–max spread, the memory autograd saves for
backward in one step (and the CUDA peak on a GPU), where the loss-curve PNG is, and what runlora
rewrote (`torch._dynamo.utils.counters["runlora"]`, also when the graph came from the compile cache).

--compare follows docs/BENCHMARKING.md at the scale of a fine-tune: every backend trains its own copy
from the same initial weights on the same batches, and the steps are interleaved (one step of each
backend per round), so a neighbour process slows them all alike. `inductor-again` is stock Inductor a
second time: its difference to `inductor` is the noise of this run, and a runlora difference smaller
than that is reported as noise. The loss curves are compared pairwise, eager vs inductor beside eager
vs runlora: float round-off grows chaotically over hundreds of steps, so two correct backends drift
apart by the same order; the tests hold runlora to eager PEFT at round-off step by step.
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

BACKENDS = ("eager", "inductor", "runlora")
COMPARED = ("eager", "inductor", "inductor-again", "runlora")   # --compare, in the order of each round
WARMUP_STEPS = 3          # untimed steps after the first (compile) step, as docs/BENCHMARKING.md asks
PROTOCOL_MIN_TIMED = 11
EARLY_STEPS = 10          # the loss curves are also compared over this many first steps, before drift grows
SEPARATOR = 256          # between files; bytes are 0..255
VOCAB_SIZE = 257
HELD_OUT_FRACTION = 0.05
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="runlora")
    p.add_argument("--compare", action="store_true",
                   help="train eager, inductor (twice: the A/A noise) and runlora from the same initial weights "
                        "on the same batches, steps interleaved; compare step times, memory and loss curves")
    p.add_argument("--loraplus-ratio", type=float, default=None,
                   help="LoRA+: B's learning rate is this many times A's (peft.optimizers.create_loraplus_optimizer)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--corpus-mb", type=float, default=4.0, help="how much of the standard library to read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
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
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: their mismatch, not this job's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
    return torch.compile(model)   # inductor and inductor-again


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean loss over the held-out windows, on the uncompiled model (no compile for inference)."""
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in windows.split(batch_size)]
    model.train()
    return statistics.fmean(losses)


# --- training -------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One backend's training: its own copy of the model, optimizer and compiled step."""

    backend: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: object
    losses: list = field(default_factory=list)
    step_seconds: list = field(default_factory=list)
    step_started: list = field(default_factory=list)   # perf_counter at each step's start (the interleaving)


def make_run(backend: str, initial_model, args, device) -> Run:
    model = copy.deepcopy(initial_model).to(device)
    return Run(backend, model, make_optimizer(model, args), compile_for(model, backend, args))


def train_step(run: Run, batch: torch.Tensor, device) -> None:
    """forward, backward, optimizer step: timed, the device synchronised on both sides."""
    from lora_rewrite.hardware import synchronize

    synchronize(device)
    start = time.perf_counter()
    run.step_started.append(start)
    loss = run.step_fn(input_ids=batch, labels=batch).loss
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    run.step_seconds.append(time.perf_counter() - start)
    run.losses.append(loss.item())


def train(runs: list[Run], train_tokens, args, device) -> None:
    """Round-robin: each round draws one batch and every backend takes one step on it."""
    from tqdm import tqdm

    batches = Batches(train_tokens, args.batch_size, args.seq_len, seed=args.seed + 1)
    tokens_per_step = args.batch_size * args.seq_len
    names = "+".join(r.backend for r in runs)
    bar = tqdm(range(args.steps), desc=names if len(names) < 40 else "compare", unit="round",
               dynamic_ncols=True, file=sys.stderr)
    for _ in bar:
        batch = batches.next().to(device)
        for run in runs:
            train_step(run, batch, device)
        last = runs[-1]
        bar.set_postfix(loss=f"{last.losses[-1]:.3f}", tok_s=f"{tokens_per_step / last.step_seconds[-1]:,.0f}")
    bar.close()


def timed_seconds(run: Run) -> list[float]:
    """The steps after the compile step and the warm-up (all but the first when there are few)."""
    if len(run.step_seconds) > 1 + WARMUP_STEPS:
        return run.step_seconds[1 + WARMUP_STEPS:]
    return run.step_seconds[1:] or run.step_seconds


def measure_memory(run: Run, batch: torch.Tensor, device) -> tuple[int, int | None]:
    """(bytes autograd saves for backward in one step, CUDA peak of that step or None), with
    lora_rewrite.bench's own measurements; the step's gradients are dropped, not applied."""
    from lora_rewrite.bench import measure

    impl = measure.Implementation(run.backend, lambda: run.step_fn(input_ids=batch, labels=batch).loss, run.model)
    peak = measure.cuda_peak_bytes(impl, device) if device.type == "cuda" else None
    saved = measure.saved_for_backward_bytes(impl)
    run.optimizer.zero_grad(set_to_none=True)
    return saved, peak


def measurements(runs: list[Run], memory: dict):
    """lora_rewrite.bench's Measurement per run (for its table arithmetic: medians, speedups, memory saved)."""
    from lora_rewrite.bench.measure import Measurement

    result = []
    for run in runs:
        saved, peak = memory[run.backend]
        result.append(Measurement(run.backend, runlora=run.backend == "runlora", samples_s=timed_seconds(run),
                                  first_step_s=run.step_seconds[0], peak_bytes=peak, saved_bytes=saved))
    return result


# --- reporting ------------------------------------------------------------------------------------------

def exponential_average(values: list[float], weight: float = 0.9) -> list[float]:
    smoothed, current = [], values[0]
    for v in values:
        current = weight * current + (1 - weight) * v
        smoothed.append(current)
    return smoothed


def plot_losses(runs: list[Run], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for run in runs:
        steps = range(1, len(run.losses) + 1)
        line, = ax.plot(steps, run.losses, linewidth=0.8, alpha=0.35)
        ax.plot(steps, exponential_average(run.losses), color=line.get_color(), linewidth=1.8,
                label=f"{run.backend} (moving average)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    optimizer = f"LoRA+ ratio {args.loraplus_ratio:g}" if args.loraplus_ratio is not None else "AdamW"
    ax.set_title(f"LoRA r={args.rank} on a {args.layers}-layer Llama ({args.hidden_size} hidden), "
                 f"Python standard library bytes, {optimizer}")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MB = 2**20


def size(n_bytes: int) -> str:
    return f"{n_bytes / MB:.2f} MB" if n_bytes >= MB else f"{n_bytes / 1024:.1f} kB"


def step_table(rows, runs: list[Run], held_out: dict, cuda: bool) -> list[str]:
    """Per backend: median step and spread, compile step, memory, losses (rows: lora_rewrite.bench.report.Row)."""
    by_name = {r.backend: r for r in runs}
    head = (f"{'backend':>14} | {'median step, ms':>15} | {'min–max, ms':>15} | {'first step, s':>13} | "
            f"{'saved for bwd, MB':>17} | " + (f"{'CUDA peak, MB':>13} | " if cuda else "") +
            f"{'train loss':>10} | {'held-out loss':>13}")
    lines = [head, "-" * len(head)]
    for row in rows:
        run = by_name[row.implementation]
        peak = f"{row.cuda_peak_mb:>13.2f} | " if cuda else ""
        lines.append(f"{row.implementation:>14} | {row.median_ms:>15.1f} | {row.min_ms:>7.1f}–{row.max_ms:<7.1f} | "
                     f"{row.first_step_s:>13.1f} | {row.saved_for_backward_mb:>17.2f} | {peak}"
                     f"{statistics.fmean(run.losses[-10:]):>10.3f} | {held_out[run.backend]:>13.3f}")
    return lines


def time_change(speedup_pct: float) -> str:
    """bench.report's speedup, (t_ref − t) / t_ref on medians, in words."""
    return f"{speedup_pct:.1f} % less time per step" if speedup_pct >= 0 else f"{-speedup_pct:.1f} % more time per step"


def speed_verdicts(rows, timed: int) -> list[str]:
    """runlora against stock Inductor and eager, beside the A/A noise of the same rounds."""
    by_name = {r.implementation: r for r in rows}
    noise = abs(by_name["inductor-again"].speedup_vs_inductor_pct)
    lines = [f"A/A noise, stock Inductor timed twice in the same rounds: inductor-again "
             f"{time_change(by_name['inductor-again'].speedup_vs_inductor_pct)} than inductor"]
    for reference in ("inductor", "eager"):
        change = getattr(by_name["runlora"], f"speedup_vs_{reference}_pct")
        if timed < PROTOCOL_MIN_TIMED:
            verdict = "too few timed steps to tell"
        elif abs(change) <= noise:
            verdict = "within the A/A noise of this run"
        else:
            verdict = ("faster" if change > 0 else "slower") + " by more than the A/A noise"
        lines.append(f"runlora vs {reference}: {time_change(change)} (medians): {verdict}")
    lines.append(f"inductor vs eager: {time_change(by_name['inductor'].speedup_vs_eager_pct)}")
    return lines


def memory_verdict(rows, cuda: bool) -> str:
    by_name = {r.implementation: r for r in rows}
    run = by_name["runlora"]
    parts = [f"runlora {run.saved_for_backward_mb:.2f} MB"]
    for reference in ("inductor", "eager"):
        if reference in by_name:
            other = by_name[reference].saved_for_backward_mb
            parts.append(f"{reference} {other:.2f} MB ({run.saved_for_backward_mb - other:+.2f} MB)")
    text = "memory saved for backward in one step: " + ", ".join(parts)
    if cuda:
        text += "; CUDA peak of one step: " + ", ".join(f"{r.implementation} {r.cuda_peak_mb:.1f} MB" for r in rows)
    return text


def loss_gaps(runs: list[Run]) -> list[str]:
    """Largest |difference| between loss curves, pairwise: eager vs inductor is the yardstick for eager
    vs runlora (the same order means the same chaotic drift of round-off, not a bug)."""
    by_name = {r.backend: r.losses for r in runs}
    pairs = [("eager", "inductor"), ("eager", "runlora"), ("inductor", "runlora"), ("inductor", "inductor-again")]
    lines = [f"loss curves, largest |difference| over all {len(runs[0].losses)} steps (over the first "
             f"{min(EARLY_STEPS, len(runs[0].losses))}):"]
    for a, b in pairs:
        gaps = [abs(x - y) for x, y in zip(by_name[a], by_name[b])]
        lines.append(f"  {a + ' vs ' + b:<27} {max(gaps):.2e} ({max(gaps[:EARLY_STEPS]):.2e})")
    lines.append("  Round-off differs between any two backends and grows chaotically over many steps: a gap "
                 "between eager and runlora of the order of eager vs inductor is that drift, not an error.")
    return lines


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
    failed = ""
    if counters.get("sites_failed") or counters.get("graphs_failed"):
        failed = (f"; {counters.get('sites_failed', 0)} site(s) left as stock Inductor compiles them after a "
                  f"failure inside runlora, {counters.get('graphs_failed', 0)} whole graph(s) (see the warnings)")
    summary = (f"runlora: rewrote {counters.get('sites_rewritten', 0)} of {counters.get('sites_found', 0)} LoRA "
               f"sites in {graphs} graph(s) (backward rewritten at {counters.get('backward_rewritten', 0)}); "
               f"chose {chosen or 'nothing'}{served}{failed}")
    from lora_rewrite import compat
    from lora_rewrite.explain import dynamo_break_reasons, graph_break_summary

    breaks = graph_break_summary(dynamo_break_reasons(compat.dynamo_counters()))
    if breaks:   # a LoRA layer in a function Dynamo skipped is in no graph: where, lora_rewrite.explain says
        summary += ("\nDynamo broke the graph (a LoRA layer in a function it skips is in no graph; "
                    "lora_rewrite.explain(model, batch) says where):\n  " + "\n  ".join(breaks))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    import lora_rewrite  # noqa: F401  (registers "runlora" when run from a source checkout)
    from lora_rewrite.bench import measure, report

    corpus = load_corpus(int(args.corpus_mb * 2**20), args.seed)
    split = int(len(corpus) * (1 - HELD_OUT_FRACTION))
    train_tokens, eval_windows = corpus[:split], held_out_windows(corpus[split:], args.seq_len)
    initial_model = build_model(args)
    trainable = sum(p.numel() for p in initial_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in initial_model.parameters())
    backends = list(COMPARED) if args.compare else [args.backend]
    print(f"corpus: {len(corpus):,} bytes of the Python {sys.version.split()[0]} standard library "
          f"({len(train_tokens):,} to train on); model: {total / 1e6:.2f}M parameters, {trainable:,} trainable "
          f"(LoRA r={args.rank}); {args.steps} steps of {args.batch_size}×{args.seq_len} tokens"
          f"{' per backend, interleaved' if args.compare else ''}; {device}, {torch.get_num_threads()} threads")
    start_loss = held_out_loss(initial_model, eval_windows, args.batch_size)

    from lora_rewrite import compat
    from lora_rewrite.debug import collect_reports

    compat.reset_dynamo()
    compat.dynamo_counters().clear()
    # room for every backend's compile of the same code objects, so none falls back to eager
    with compat.dynamo_compile_limits_at_least(64), collect_reports() as reports:
        runs = [make_run(backend, initial_model, args, device) for backend in backends]
        train(runs, train_tokens, args, device)
        memory_batch = Batches(train_tokens, args.batch_size, args.seq_len, seed=args.seed + 2).next().to(device)
        memory = {run.backend: measure_memory(run, memory_batch, device) for run in runs}
    counters = dict(compat.dynamo_counters()["runlora"])
    held_out = {run.backend: held_out_loss(run.model, eval_windows.to(device), args.batch_size) for run in runs}
    rows = report.build_rows(measurements(runs, memory), cuda=device.type == "cuda")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "loss.png"
    plot_losses(runs, png, args)
    (out / "summary.json").write_text(json.dumps({
        "args": vars(args), "device": str(device), "held_out_loss_at_start": start_loss,
        "memory_method": measure.memory_method(device), "warmup_steps": WARMUP_STEPS,
        "results": [{"backend": run.backend, "losses": run.losses, "step_seconds": run.step_seconds,
                     "step_started": run.step_started,
                     "timed_seconds": timed_seconds(run), "held_out_loss": held_out[run.backend],
                     "saved_for_backward_bytes": memory[run.backend][0], "cuda_peak_bytes": memory[run.backend][1],
                     **{k: getattr(row, k) for k in ("median_ms", "min_ms", "max_ms", "speedup_vs_eager_pct",
                                                     "speedup_vs_inductor_pct")},
                     "runlora": counters if run.backend == "runlora" else None}
                    for run, row in zip(runs, rows)]}, indent=2, default=str) + "\n")

    timed = len(timed_seconds(runs[0]))
    print(f"\nheld-out loss before training: {start_loss:.3f}")
    print(f"step = forward + backward + AdamW step; median and min–max of the {timed} steps after the first "
          f"(the compile) and {WARMUP_STEPS} warm-up steps" + (", interleaved round-robin" if args.compare else ""))
    if timed < PROTOCOL_MIN_TIMED:
        print(f"(only {timed} timed steps, fewer than the {PROTOCOL_MIN_TIMED} docs/BENCHMARKING.md asks for: "
              f"indicative)")
    for line in step_table(rows, runs, held_out, device.type == "cuda"):
        print(line)
    if args.compare:
        for line in speed_verdicts(rows, timed) + [memory_verdict(rows, device.type == "cuda")] + loss_gaps(runs):
            print(line)
    unsaved = sum(site.saved_bytes_avoided or 0 for r in reports for site in r.sites)
    if "runlora" in backends and unsaved:
        print(f"runlora does not save X·Aᵀ for backward, which stock Inductor saves: {size(unsaved)} per step "
              f"at {sum(len(r.sites) for r in reports)} site(s)" + ("" if args.compare else
                                                                     " (--compare measures stock Inductor)"))
    print(f"memory: {measure.memory_method(device)}")
    print(f"loss curve: {png}")
    if "runlora" in backends:
        print(runlora_summary(counters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
