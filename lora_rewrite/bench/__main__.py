"""`runlora-bench` / `python -m lora_rewrite.bench`: the paper's model_exp.py, measured per the protocol.

Model mode (the paper's flags):
    runlora-bench -m llama_60m --n_batch 10 -r 8 --dtype bf16 --criterions flops
Layer mode:
    runlora-bench --layer --in 1024 --out-features 1024 4096 --tokens 512 4096 --rank 8 64

Every implementation runs in this one process, interleaved round-robin (see measure.py); the table
is printed as markdown and written with CSV and JSON beside it (`<out>.md`, `<out>.csv`,
`<out>.json`); `--plot` adds `<out>_speedup.png` and one `<out>_map_i<i>_o<o>.png` per layer shape.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shlex
import sys
from pathlib import Path

PROG = "runlora-bench"
PROTOCOL_MIN_ROUNDS = 11
PROTOCOL_MIN_WARMUP = 3
DEFAULT_IMPLS = ("eager", "inductor", "runlora", "frozen")
# inductor-again: stock Inductor timed a second time in the same rounds, so its difference to
# `inductor` is this machine's noise (the protocol: a difference smaller than that is noise).
KNOWN_IMPLS = ("eager", "inductor", "inductor-again", "runlora", "frozen", "inductor-breaks", "inductor-lora",
               "runlora-lora", "inductor-base-dtype", "runlora-base-dtype")
# --dora: PEFT DoRA adapters. inductor-breaks: stock Inductor on DoRA as users get it without lora_rewrite's
# stand-in (a graph break in every DoRA layer); inductor: stock Inductor with the stand-in (one graph, the
# fair baseline); inductor-lora / runlora-<criterion>-lora: plain LoRA of the same shapes, the price DoRA
# should cost.
DORA_DEFAULT_IMPLS = ("eager", "inductor-breaks", "inductor", "runlora", "inductor-lora", "runlora-lora", "frozen")
# --fp32-adapters: inductor-base-dtype / runlora-<criterion>-base-dtype run on a twin of the model whose adapters
# are in the model's dtype (PEFT's autocast_adapter_dtype=False), the price the fp32 adapters should cost.
FP32_ADAPTERS_EXTRA_IMPLS = ("inductor-base-dtype", "runlora-base-dtype")
AUTOCAST_SUFFIX = " autocast(bf16)"   # a case title's mark for --autocast
CHECKPOINTING_SUFFIX = " checkpointed"   # a case title's mark for --gradient-checkpointing
LORA_SUFFIX = "-lora"   # an implementation run on the plain-LoRA twin of a --dora model
BASE_DTYPE_SUFFIX = "-base-dtype"   # an implementation run on the twin with adapters in the model's dtype
TWIN_SUFFIXES = (LORA_SUFFIX, BASE_DTYPE_SUFFIX)
# runlora-<criterion>-unfused: runlora with fuse_siblings off, to time the sibling fusion by itself.
UNFUSED_SUFFIX = "-unfused"
# runlora-<criterion>-direct: every product in its default form (options forms="direct"), to time the
# measured product forms (lora_rewrite/forms.py) by themselves.
DIRECT_SUFFIX = "-direct"
SUFFIXES = (UNFUSED_SUFFIX, DIRECT_SUFFIX, LORA_SUFFIX, BASE_DTYPE_SUFFIX)


def twin_suffix(name: str) -> str | None:
    """Which twin model an implementation runs on (`-lora`, `-base-dtype`), or None: the model itself."""
    return next((suffix for suffix in TWIN_SUFFIXES if name.endswith(suffix)), None)


def _criterion_of(name: str) -> str:
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name.partition("-")[2]
CPU_DEFAULT_MAX_SEQ_LEN = 256


def build_parser() -> argparse.ArgumentParser:
    from lora_rewrite.cost import CRITERIA

    p = argparse.ArgumentParser(
        prog=PROG, description="Time PEFT LoRA forward+backward: eager, stock Inductor, runlora (per criterion) "
        "and the frozen base model, interleaved in one process.")
    what = p.add_argument_group("what to run (model mode, the paper's model_exp.py flags)")
    what.add_argument("-m", "--model_name_or_config", help="a config JSON path, a shipped config "
                      "(llama_60m, llama_130m, llama_250m, llama_350m, llama_1.3b, opt_125m, opt_350m, opt_1.3b, "
                      "roberta_base, roberta_large) or tiny-llama / tiny-opt / tiny-roberta")
    what.add_argument("--n_batch", type=int, default=None, help="batch size (model mode default 10, as model_exp.py; "
                      "layer mode: X is [b, N/b, i] with b = gcd(N, 32) unless given)")
    what.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the config's maximum "
                      f"on CUDA, as the paper; capped at {CPU_DEFAULT_MAX_SEQ_LEN} on CPU)")
    what.add_argument("--head", choices=("causal-lm", "masked-lm"), default=None,
                      help="default: causal-lm for Llama and OPT, masked-lm for RoBERTa")
    what.add_argument("--target_modules", nargs="+", default=None,
                      help="modules to adapt (default: every attention and MLP linear of the family); "
                      "one argument with regex characters is a PEFT regex")
    lora = p.add_argument_group("adapters")
    lora.add_argument("-r", "--lora_r", type=int, default=8, help="LoRA rank (layer mode: --rank); default %(default)s")
    lora.add_argument("-a", "--lora_alpha", type=float, default=8, help="LoRA alpha, s = alpha / r; default %(default)s")
    lora.add_argument("-d", "--lora_dropout", type=float, default=0.0, help="dropout on the adapter input; default %(default)s")
    lora.add_argument("--dora", action="store_true", help="PEFT DoRA adapters (use_dora=True); default impls "
                      "then: " + " ".join(DORA_DEFAULT_IMPLS))
    lora.add_argument("--4bit", dest="bits4", action="store_true", help="QLoRA: the adapted linears' bases "
                      "quantized to bitsandbytes 4-bit (nf4, double quantisation) from their random weights; the "
                      "frozen floor is the same 4-bit model")
    lora.add_argument("--fp32-adapters", action="store_true", help="keep adapters in fp32 on a bf16 model "
                      "(PEFT's autocast_adapter_dtype default; makes the merged variants illegal). Default: "
                      "adapters in the model's dtype, as the paper")
    layer = p.add_argument_group("layer mode: one PEFT LoRA linear X[b, N/b, i] → [.., o] (lists and ranges: "
                                 "'512 4096', '256:4096' doubles, '8:64:8' steps by 8, '16:1024:x4' multiplies)")
    layer.add_argument("--layer", action="store_true", help="benchmark single LoRA linears instead of a model")
    layer.add_argument("--in", "--in-features", dest="in_features", nargs="+", default=["1024"],
                       help="in-features i; default 1024")
    layer.add_argument("--out-features", dest="out_features", nargs="+", default=None,
                       help="default: the same as --in (square layers); -o/--out is the output prefix")
    layer.add_argument("--tokens", nargs="+", default=["4096"], help="N = batch × sequence; default 4096")
    layer.add_argument("--rank", nargs="+", default=None, help="ranks r; default: -r")
    layer.add_argument("--stack", type=int, default=1, help="k LoRA linears in a row, alternating i→o and o→i; default 1")
    layer.add_argument("--siblings", type=int, default=1,
                       help="k LoRA linears reading the same X, outputs concatenated (as q/k/v); default 1")
    layer.add_argument("--bias", action="store_true", help="base linears with bias (Llama's have none)")
    how = p.add_argument_group("how to measure")
    how.add_argument("--impls", nargs="+", default=None,
                     help="eager, inductor, runlora (one row per criterion), frozen; runlora-<criterion> also works; "
                          "inductor-again times stock Inductor a second time: its difference to inductor is noise; "
                          "runlora-<criterion>-unfused runs without the sibling fusion, "
                          "runlora-<criterion>-direct with every product in its default form; with --fp32-adapters "
                          "on a bf16 model the default adds inductor-base-dtype and runlora-base-dtype, the same "
                          "model with its adapters in bf16 (the price the fp32 adapters should cost)")
    how.add_argument("--criterions", nargs="+", default=["flops"], choices=CRITERIA,
                     help="runlora criteria, one row each; default flops")
    how.add_argument("--runlora-options", default=None, help="extra runlora options as JSON, e.g. "
                     "'{\"forward\": \"forward1\"}'")
    how.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="default fp32")
    how.add_argument("--autocast", action="store_true", help="every implementation's forward under "
                     "torch.autocast(bfloat16), as Trainer(bf16=True) runs it (the frozen floor's too)")
    how.add_argument("--gradient-checkpointing", action="store_true",
                     help="model mode: transformers' gradient checkpointing (use_reentrant=False) on every "
                     "implementation's model, the frozen floor's too")
    how.add_argument("--keep-freed-memory", action="store_true",
                     help="CPU: glibc's malloc keeps freed memory for reuse (no mmap, no trim), so no step "
                     "page-faults its buffers in afresh; lowers the noise between implementations, but no "
                     "longer measures what a default process pays for its fresh buffers (docs/BENCHMARKS.md)")
    how.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    how.add_argument("--threads", type=int, default=None, help="CPU threads (default: every available core)")
    how.add_argument("--rounds", type=int, default=PROTOCOL_MIN_ROUNDS,
                     help=f"timed round-robin rounds; default and protocol minimum {PROTOCOL_MIN_ROUNDS}")
    how.add_argument("--warmup", type=int, default=PROTOCOL_MIN_WARMUP,
                     help=f"untimed rounds after the first (compile) step; default and protocol minimum "
                     f"{PROTOCOL_MIN_WARMUP}")
    how.add_argument("--min_run_time", type=float, default=0.0,
                     help="keep adding rounds until each implementation has this many seconds of samples; "
                     "default 0")
    how.add_argument("--seed", type=int, default=0, help="weights and inputs; default 0")
    how.add_argument("--smoke", action="store_true",
                     help="allow fewer rounds / warm-up than the protocol (tests, trying the command out)")
    how.add_argument("--no-codegen", action="store_true",
                     help="compile without Inductor code generation (runlora's codegen=False; 'inductor' and "
                     "'frozen' become runlora with rewrite=False): fast, for tests; timings are not representative")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--out", default=None, help="output prefix (default runs/bench/<case>)")
    out.add_argument("--plot", action="store_true", help="write the speedup bars and the variant maps (PNG)")
    out.add_argument("--map-criterion", choices=("flops", "roofline"), default="flops",
                     help="criterion of the variant maps; default flops")
    out.add_argument("--map-only", action="store_true", help="only draw the variant maps (no timing)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    if args.impls is None:
        args.impls = list(DORA_DEFAULT_IMPLS if args.dora else DEFAULT_IMPLS)
        if args.fp32_adapters and args.dtype != "fp32":
            args.impls[-1:-1] = FP32_ADAPTERS_EXTRA_IMPLS   # before the frozen floor
    base_dtype = [n for n in args.impls if n.endswith(BASE_DTYPE_SUFFIX)]
    if base_dtype and not (args.fp32_adapters and args.dtype != "fp32"):
        parser.error(f"{', '.join(base_dtype)} compare fp32 adapters with adapters in the model's dtype: give "
                     f"--fp32-adapters on a 16-bit model (--dtype bf16)")
    dora_only = [n for n in args.impls if n == "inductor-breaks" or n.endswith(LORA_SUFFIX)]
    if dora_only and not args.dora:
        parser.error(f"{', '.join(dora_only)} compare against DoRA: give --dora")
    if not args.layer and not args.model_name_or_config:
        parser.error("give -m/--model_name_or_config, or --layer")
    if args.layer and args.out and args.out.isdigit():
        parser.error(f"-o/--out is the output prefix; out-features are --out-features (got --out {args.out})")
    if args.gradient_checkpointing and args.layer:
        parser.error("--gradient-checkpointing checkpoints a model's decoder layers: give -m, not --layer")
    if args.gradient_checkpointing and "inductor-breaks" in args.impls:
        # Its graph breaks inside checkpointed regions make Dynamo give up frames that the implementations
        # after it then trace differently (measured: runlora then reported 7 of a tiny Llama's 14 sites).
        parser.error("inductor-breaks cannot run with --gradient-checkpointing (its breaks inside checkpointed "
                     "regions change how Dynamo traces every implementation after it); leave it out")
    if args.stack < 1 or args.siblings < 1:
        parser.error("--stack and --siblings must be >= 1")
    if args.stack > 1 and args.siblings > 1:
        parser.error("--stack and --siblings cannot be combined")
    if not args.smoke and not args.map_only:
        if args.rounds < PROTOCOL_MIN_ROUNDS:
            parser.error(f"--rounds {args.rounds}: the protocol asks for >= {PROTOCOL_MIN_ROUNDS} (use --smoke to try)")
        if args.warmup < PROTOCOL_MIN_WARMUP:
            parser.error(f"--warmup {args.warmup}: the protocol asks for >= {PROTOCOL_MIN_WARMUP} (use --smoke to try)")
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    from lora_rewrite.cost import CRITERIA

    for name in args.impls:
        if name not in KNOWN_IMPLS and (not name.startswith("runlora-") or _criterion_of(name) not in CRITERIA):
            parser.error(f"unknown implementation {name!r}; known: {', '.join(KNOWN_IMPLS)}, "
                         f"runlora-<criterion> with a criterion of {', '.join(CRITERIA)}, "
                         f"runlora-<criterion>{UNFUSED_SUFFIX}, runlora-<criterion>{DIRECT_SUFFIX}, "
                         f"runlora-<criterion>{LORA_SUFFIX}, runlora-<criterion>{BASE_DTYPE_SUFFIX}")


def implementation_names(impls, criterions) -> list[str]:
    """`runlora` expands to one runlora-<criterion> per criterion, in place; duplicates dropped."""
    names: list[str] = []
    for name in impls:
        expanded = [f"runlora-{c}" for c in criterions] if name == "runlora" else [name]
        for suffix in TWIN_SUFFIXES:
            if name == "runlora" + suffix:
                expanded = [f"runlora-{c}{suffix}" for c in criterions]
        names += [n for n in expanded if n not in names]
    return names


def runlora_options(name: str, args, extra: dict) -> dict:
    options = {"criterion": _criterion_of(name), **extra}
    if name.endswith(UNFUSED_SUFFIX):
        options["fuse_siblings"] = False
    if name.endswith(DIRECT_SUFFIX):
        options["forms"] = "direct"
    if args.no_codegen:
        options["codegen"] = False
    return options


def compile_for(name: str, module, args, extra_options: dict):
    """The callable an implementation runs: the module itself (eager) or a torch.compile of it."""
    import torch

    if name == "eager":
        return module
    if name.startswith("runlora"):
        return torch.compile(module, backend="runlora", options=runlora_options(name, args, extra_options))
    # inductor, inductor-again, inductor-breaks, inductor-lora: stock Inductor (again: the same compiled code,
    # timed as another row)
    if args.no_codegen:   # stock Inductor's passes and partitioner, without code generation
        return torch.compile(module, backend="runlora", options={"rewrite": False, "codegen": False})
    if name == "inductor-breaks":   # a backend of its own: Dynamo must not serve inductor's frames to it, or back
        return torch.compile(module, backend=stock_inductor_apart)
    return torch.compile(module)


def stock_inductor_apart(gm, example_inputs):
    """Stock Inductor (`compile_fx`, what backend="inductor" calls) as a backend object of its own, so that
    Dynamo's compiled frames for it are never shared with another implementation's on the same module."""
    from lora_rewrite import compat

    return compat.compile_fx(gm, example_inputs, config_patches={})


# --- the cases --------------------------------------------------------------------------------------

def model_case(args, device, dtype, extra_options, on_step):
    import copy

    import torch

    from lora_rewrite import compat
    from lora_rewrite.bench import measure, models, report

    spec = models.load_spec(args.model_name_or_config, head=args.head)
    batch = args.n_batch or 10
    seq_len = args.seq_len or (spec.max_tokens_per_sequence if device.type == "cuda"
                               else min(spec.max_tokens_per_sequence, CPU_DEFAULT_MAX_SEQ_LEN))
    if seq_len > spec.max_tokens_per_sequence and spec.family in models.LEARNED_POSITIONS:
        raise SystemExit(f"--seq_len {seq_len} exceeds {spec.name}'s {spec.max_tokens_per_sequence} learned positions")
    targets = args.target_modules or models.default_target_modules(spec.family)
    base = models.build_base_model(spec, dtype=dtype, device=device, seed=args.seed)
    if args.bits4:
        if not isinstance(targets, (list, tuple)) or any(re.search(r"[\\.*$^(|]", t) for t in targets):
            raise SystemExit("--4bit quantizes the linears named by --target_modules: give names, not a pattern")
        base = models.quantize_4bit(base, targets, dtype)
    frozen = copy.deepcopy(base).requires_grad_(False)
    names = implementation_names(args.impls, args.criterions)
    twin_bases = {suffix: copy.deepcopy(base) for suffix in TWIN_SUFFIXES if any(twin_suffix(n) == suffix for n in names)}
    peft_model = models.add_lora(base, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                 target_modules=targets, fp32_adapters=args.fp32_adapters, seed=args.seed,
                                 use_dora=args.dora)
    twins = {suffix: models.add_lora(twin, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                     target_modules=targets, seed=args.seed,
                                     fp32_adapters=args.fp32_adapters and suffix != BASE_DTYPE_SUFFIX,
                                     use_dora=args.dora and suffix != LORA_SUFFIX)
             for suffix, twin in twin_bases.items()}
    if args.gradient_checkpointing:
        for model in (frozen, peft_model, *twins.values()):
            if model is not None:
                models.enable_gradient_checkpointing(model)
    inputs = models.make_model_inputs(spec, batch, seq_len, device, seed=args.seed, frozen_model=frozen)
    impls = []
    for name in names:
        if name == "frozen":
            step = models.model_loss_step(compile_for(name, frozen, args, extra_options), inputs.frozen_step_kwargs)
            module, is_runlora = frozen, False
        else:
            module = twins.get(twin_suffix(name), peft_model)
            step = models.model_loss_step(compile_for(name, module, args, extra_options), inputs.lora_step_kwargs)
            if name == "inductor-breaks":
                step = models.with_dora_graph_breaks(step)
            is_runlora = name.startswith("runlora")
        step = measure.under_autocast(step, device) if args.autocast else step
        impls.append(measure.Implementation(name, step, module, runlora=is_runlora))
    title = (f"{spec.name} b={batch} s={seq_len} r={args.lora_r} {args.dtype}{AUTOCAST_SUFFIX if args.autocast else ''}"
             f"{CHECKPOINTING_SUFFIX if args.gradient_checkpointing else ''}")
    n_params = sum(p.numel() for p in frozen.parameters())
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    settings = {"mode": "model", "model": spec.name, "family": spec.family, "head": spec.head,
                "config_source": spec.source, "batch": batch, "seq_len": seq_len, "tokens": batch * seq_len,
                "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                "dtype": args.dtype, "fp32_adapters": args.fp32_adapters, "dora": args.dora, "4bit": args.bits4,
                "autocast": args.autocast, "gradient_checkpointing": args.gradient_checkpointing,
                "target_modules": targets,
                "lora_sites": models.count_lora_sites(peft_model), "parameters": n_params,
                "trainable_parameters": n_trainable,
                "attn_implementation": getattr(frozen.config, "_attn_implementation", None),
                "lora_shapes": models.lora_layer_shapes(peft_model)}
    notes = [f"{n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable in "
             f"{settings['lora_sites']} LoRA linears ({spec.source.split(' (')[0]})",
             "frozen: the same base model without adapters, fed inputs_embeds (the same tokens' embeddings, "
             "looked up once outside the step) as a fresh leaf requiring grad"]
    results = _measure(impls, device, args, on_step)
    rows = report.build_rows([results[i.name] for i in impls], cuda=device.type == "cuda")
    if args.dora:
        notes += report.dora_verdicts(rows, tokens=batch * seq_len, out_features=models.lora_out_features(peft_model),
                                      element_size=torch.empty((), dtype=dtype).element_size())
    if args.bits4:
        notes += report.qlora_verdicts(rows, tokens=batch * seq_len, adapters=models.lora_adapter_ranks(peft_model))
    notes += report.fp32_adapter_verdicts(rows)
    case = report.Case(title, settings, rows, notes)
    map_points = {shape: [(batch * seq_len, args.lora_r)] for shape in settings["lora_shapes"]}
    del impls, peft_model, frozen, base, twins, twin_bases
    compat.reset_dynamo()
    return case, map_points


def layer_shapes(args) -> list:
    from lora_rewrite.bench.layer import LayerShape, layer_batch, parse_sizes

    ins = parse_sizes(args.in_features)
    outs = parse_sizes(args.out_features) if args.out_features else None
    tokens = parse_sizes(args.tokens)
    ranks = parse_sizes(args.rank) if args.rank else [args.lora_r]
    shapes = []
    for i in ins:
        for o in (outs or [i]):
            for n, r in itertools.product(tokens, ranks):
                shapes.append(LayerShape(i, o, n, r, layer_batch(n, args.n_batch), args.stack, args.siblings))
    return shapes


def layer_case(shape, args, device, dtype, extra_options, on_step):
    import torch

    from lora_rewrite import compat
    from lora_rewrite.bench import layer, measure, report

    names = implementation_names(args.impls, args.criterions)
    build = dict(r=shape.r, alpha=args.lora_alpha, dropout=args.lora_dropout, bias=args.bias, dtype=dtype,
                 device=device, fp32_adapters=args.fp32_adapters, seed=args.seed, bits4=args.bits4)
    peft_model, frozen = layer.build_layer_models(shape, use_dora=args.dora, **build)
    inputs = layer.make_layer_inputs(shape, dtype=dtype, device=device, seed=args.seed)
    lora_loss = layer.ProbeLoss(peft_model, inputs.probe)
    frozen_loss = layer.ProbeLoss(frozen, inputs.probe)
    twin_builds = {LORA_SUFFIX: build, BASE_DTYPE_SUFFIX: {**build, "fp32_adapters": False, "use_dora": args.dora}}
    twin_losses = {suffix: layer.ProbeLoss(layer.build_layer_models(shape, **twin_builds[suffix])[0], inputs.probe)
                   for suffix in TWIN_SUFFIXES if any(twin_suffix(n) == suffix for n in names)}
    impls = []
    for name in names:
        module = frozen_loss if name == "frozen" else twin_losses.get(twin_suffix(name), lora_loss)
        step = layer.layer_loss_step(compile_for(name, module, args, extra_options), inputs)
        if name == "inductor-breaks":
            from lora_rewrite.bench.models import with_dora_graph_breaks

            step = with_dora_graph_breaks(step)
        step = measure.under_autocast(step, device) if args.autocast else step
        impls.append(measure.Implementation(name, step, module, runlora=name.startswith("runlora")))
    settings = {"mode": "layer", "i": shape.i, "o": shape.o, "tokens": shape.tokens, "batch": shape.batch,
                "seq_len": shape.tokens // shape.batch, "lora_r": shape.r, "lora_alpha": args.lora_alpha,
                "lora_dropout": args.lora_dropout, "stack": shape.stack, "siblings": shape.siblings, "bias": args.bias, "dtype": args.dtype,
                "fp32_adapters": args.fp32_adapters, "dora": args.dora, "4bit": args.bits4, "autocast": args.autocast}
    notes = ["step: loss = Σ Y ⊙ G (fixed random G, so dY = G) on X[b, N/b, i] requiring grad; "
             "frozen: the same linears without adapters"]
    results = _measure(impls, device, args, on_step)
    rows = report.build_rows([results[i.name] for i in impls], cuda=device.type == "cuda")
    if args.dora:
        from lora_rewrite.bench.models import lora_out_features

        notes += report.dora_verdicts(rows, tokens=shape.tokens, out_features=lora_out_features(peft_model),
                                      element_size=torch.empty((), dtype=dtype).element_size())
    if args.bits4:
        from lora_rewrite.bench.models import lora_adapter_ranks

        notes += report.qlora_verdicts(rows, tokens=shape.tokens, adapters=lora_adapter_ranks(peft_model))
    notes += report.fp32_adapter_verdicts(rows)
    case = report.Case(f"{shape.label} {args.dtype}{AUTOCAST_SUFFIX if args.autocast else ''}", settings, rows, notes)
    del impls, peft_model, frozen, lora_loss, frozen_loss, twin_losses
    compat.reset_dynamo()
    return case


def _measure(impls, device, args, on_step):
    from lora_rewrite.bench import measure

    results = {i.name: measure.Measurement(i.name, runlora=i.runlora) for i in impls}
    measure.first_steps(impls, device, results, on_step)
    measure.round_robin(impls, device, results, warmup=args.warmup, rounds=args.rounds,
                        min_run_time=args.min_run_time, on_step=on_step,
                        on_extra_round=lambda: on_step.extra_round(len(impls)) if on_step else None)
    measure.measure_memory(impls, device, results, on_step)
    return results


# --- progress ---------------------------------------------------------------------------------------

class Progress:
    """The tqdm bar; called once per step with the implementation's name."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)

    def set_case(self, title: str) -> None:
        self.bar.set_description(title[:60])

    def __call__(self, impl_name: str) -> None:
        self.bar.set_postfix_str(impl_name)
        self.bar.update(1)

    def extra_round(self, steps: int) -> None:
        self.bar.total += steps
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def steps_per_case(args) -> int:
    n_impls = len(implementation_names(args.impls, args.criterions))
    return n_impls * (1 + args.warmup + args.rounds + 1)


# --- main -------------------------------------------------------------------------------------------

def default_out_prefix(args, first_title: str) -> str:
    stem = "layer_" + first_title if args.layer else first_title
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in stem)
    while "__" in safe:
        safe = safe.replace("__", "_")
    return str(Path("runs") / "bench" / safe.strip("_"))


def write_outputs(prefix: str, cases, meta: dict) -> list[str]:
    from lora_rewrite.bench import report

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    md, csv_path, json_path = f"{prefix}.md", f"{prefix}.csv", f"{prefix}.json"
    Path(md).write_text(report.markdown_report(cases, meta))
    report.write_csv(csv_path, cases)
    report.write_json(json_path, cases, meta)
    return [md, csv_path, json_path]


def draw_maps(prefix: str, map_points: dict, args, allow_merged: bool, dtype, device) -> list[str]:
    from lora_rewrite.bench import plots

    written = []
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    for (i, o), points in map_points.items():
        tokens, ranks = plots.default_map_axes(i, o, [n for n, _ in points], [r for _, r in points])
        vmap = plots.variant_map(i, o, tokens, ranks, criterion=args.map_criterion, allow_merged=allow_merged,
                                 dtype=dtype, device=device)
        path = f"{prefix}_map_i{i}_o{o}.png"
        legality = "" if allow_merged else " (merged variants illegal: dropout or fp32 adapters)"
        plots.plot_variant_map(vmap, path, points=points,
                               title=f"Chosen variant, i={i} o={o}, {args.map_criterion} criterion{legality}")
        written.append(path)
    return written


@contextlib.contextmanager
def bench_environment(args, device):
    """Process-wide settings for the run, restored afterwards (main() is also called in-process)."""
    import warnings

    import torch

    from lora_rewrite import compat
    from lora_rewrite.bench import measure

    threads = torch.get_num_threads()
    try:
        if device.type == "cpu":
            torch.set_num_threads(args.threads or measure.available_cores())
            if args.keep_freed_memory:
                measure.keep_freed_memory()
        # Every implementation of a case shares one model's code objects: room for all their compiles,
        # so none silently falls back to eager.
        with compat.dynamo_compile_limits_at_least(64), warnings.catch_warnings():
            # compile caches are off on purpose for each first step (a cold compile; the pass always runs)
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
            yield
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.map_only and not args.layer:
        parser.error("--map-only draws layer shapes: use it with --layer")
    argv = list(sys.argv[1:] if argv is None else argv)

    import torch

    import lora_rewrite  # noqa: F401  (registers the backend when running from a source checkout)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with bench_environment(args, device):
        return run(args, argv, device)


def run(args, argv, device) -> int:
    import json

    import torch

    from lora_rewrite.bench import measure, report

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    extra_options = json.loads(args.runlora_options) if args.runlora_options else {}
    allow_merged = args.lora_dropout == 0 and not (args.fp32_adapters and args.dtype != "fp32")

    if args.map_only:
        shapes = layer_shapes(args)
        points: dict = {}
        for s in shapes:
            points.setdefault((s.i, s.o), []).append((s.tokens, s.r))
        prefix = args.out or default_out_prefix(args, f"i{shapes[0].i}_o{shapes[0].o}")
        for path in draw_maps(prefix, points, args, allow_merged, dtype, device):
            print(f"wrote {path}")
        return 0

    meta = {"command": shlex.join([PROG, *argv]), "machine": measure.machine_info(device),
            "memory_method": measure.memory_method(device), "rounds": args.rounds, "warmup": args.warmup,
            "min_run_time": args.min_run_time, "impls": implementation_names(args.impls, args.criterions),
            "notes": []}
    if args.no_codegen:
        meta["notes"].append("compiled WITHOUT Inductor code generation (--no-codegen): timings are not "
                             "representative")
    if args.smoke:
        meta["notes"].append("--smoke: rounds / warm-up may be below the protocol's minimum")
    if args.keep_freed_memory:
        meta["notes"].append("--keep-freed-memory: glibc's malloc kept freed memory (no mmap, no trim): fresh "
                             "buffers are not page-faulted in each step")

    cases, map_points = [], {}
    shapes = layer_shapes(args) if args.layer else [None]
    progress = Progress(steps_per_case(args) * len(shapes), enabled=not args.no_progress)
    prefix = args.out
    try:
        for shape in shapes:
            if shape is None:
                progress.set_case(args.model_name_or_config)
                case, points = model_case(args, device, dtype, extra_options, progress)
            else:
                progress.set_case(shape.label)
                case = layer_case(shape, args, device, dtype, extra_options, progress)
                points = {(shape.i, shape.o): [(shape.tokens, shape.r)]}
            cases.append(case)
            for key, value in points.items():
                map_points.setdefault(key, []).extend(value)
            prefix = prefix or default_out_prefix(args, case.title)
            written = write_outputs(prefix, cases, meta)   # after every case: a crash keeps what was measured
    finally:
        progress.close()

    print(report.markdown_report(cases, meta))
    if args.plot:
        from lora_rewrite.bench import plots

        speedup_png = f"{prefix}_speedup.png"
        plots.plot_speedups(cases, speedup_png)
        written += [speedup_png] + draw_maps(prefix, map_points, args, allow_merged, dtype, device)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
