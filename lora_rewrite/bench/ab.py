"""Same-process A/B of one behaviour of the pass: what it buys, measured beside stock Inductor and the frozen floor.

    python scripts/ab_merge_casts.py ROUNDS I O R DROPOUT [kept]      (each scripts/ab_*.py is one such A/B)

One layer (lora_rewrite/bench/layer.py), N = 4096 tokens. Five models, each compiled through a wrapper class
of its own (Dynamo's frame cache is shared across backends) and from scratch (the compile caches off: a cache
hit would serve one runlora model the other's graph):

    frozen           the layer without adapters, stock Inductor: the floor
    inductor         the PEFT layer, stock Inductor
    inductor-again   the same once more: the A/A noise of this run
    runlora          runlora with its defaults
    <the variant>    runlora with `options` (the behaviour under test switched off: option `disable`,
                     lora_rewrite/options.py BEHAVIOURS, which the compile-cache key sees)

Timed interleaved (the order reversed every other round) with medians, per BENCHMARKING.md; `kept`: glibc's
malloc keeps freed memory (runlora-bench --keep-freed-memory).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from lora_rewrite import debug
from lora_rewrite.bench import measure
from lora_rewrite.bench.layer import LayerShape, ProbeLoss, layer_loss_step
from lora_rewrite.compat import fresh_compile_caches

TOKENS, BATCH = 4096, 32


@dataclass(frozen=True)
class Settings:
    rounds: int
    shape: LayerShape
    r: int
    kept: bool


def layer_ab_settings(argv: list[str], extra: int = 0) -> tuple[Settings, list[str]]:
    """(Settings, the script's own arguments) from `ROUNDS I O R [its own EXTRA arguments] [kept]`; 2 threads,
    and glibc keeping freed memory where `kept` is given."""
    torch.set_num_threads(2)
    rounds, i, o, r = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    own = argv[4:4 + extra]
    kept = argv[4 + extra:] == ["kept"]
    if kept:
        measure.keep_freed_memory()
    return Settings(rounds, LayerShape(i=i, o=o, tokens=TOKENS, r=r, batch=BATCH), r, kept), own


def probe_class(name: str) -> type:
    """A ProbeLoss subclass of its own per model: Dynamo caches compiled frames per code object, shared across
    backends, so each model needs its own `forward`."""
    return type("Probe_" + name.replace("-", "_"), (ProbeLoss,),
                {"forward": lambda self, *a, **k: ProbeLoss.forward(self, *a, **k)})


def contenders(peft: torch.nn.Module, frozen: torch.nn.Module, inputs, variant: str, options: dict,
               autocast: bool = False) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """{name: (the compiled loss module, one step's forward loss)}: the five models of this module's table, the
    variant compiled with runlora's `options`; under torch.autocast(bfloat16) where `autocast`."""
    compiled = {"frozen": torch.compile(probe_class("frozen")(frozen, inputs.probe)),
                "inductor": torch.compile(probe_class("inductor")(copy.deepcopy(peft), inputs.probe)),
                "inductor-again": torch.compile(probe_class("inductor-again")(copy.deepcopy(peft), inputs.probe)),
                "runlora": torch.compile(probe_class("runlora")(copy.deepcopy(peft), inputs.probe), backend="runlora"),
                variant: torch.compile(probe_class(variant)(peft, inputs.probe), backend="runlora",
                                       options=options)}
    device = inputs.x.device
    steps = {}
    for name, model in compiled.items():
        step = layer_loss_step(model, inputs)
        steps[name] = (model, measure.under_autocast(step, device) if autocast else step)
    return steps


@dataclass
class ABResult:
    median: dict                # name -> median seconds of a step
    reports: dict               # name -> the runlora reports of its compile (debug.GraphReport)
    saved_bytes: dict           # name -> bytes saved for backward (where asked for)

    def summary(self, title: str, variant: str) -> list[str]:
        return measure.ab_summary(title, self.median, variant)


def run_ab(models: dict[str, tuple[torch.nn.Module, Callable]], rounds: int, *, saved_bytes: bool = False,
           warmups: int = 2) -> ABResult:
    """Compile each model from scratch (its first step), warm it up, measure what is asked, then time every
    model's step interleaved over `rounds` rounds."""
    def run(name):
        models[name][1]().backward()

    reports, saved = {}, {}
    for name, (model, step) in models.items():
        with fresh_compile_caches(), debug.collect_reports() as compiled:
            run(name)
        reports[name] = list(compiled)
        if saved_bytes:
            saved[name] = measure.saved_for_backward_bytes(measure.Implementation(name, step, model))
        for _ in range(warmups):
            run(name)
    return ABResult(measure.alternating_medians(run, list(models), rounds), reports, saved)
