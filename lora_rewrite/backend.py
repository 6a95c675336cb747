"""The `runlora` torch.compile backend: Dynamo graph → AOTAutograd → our pass → Inductor.

    torch.compile(peft_model, backend="runlora", options={...})

`pip install` registers the name through the `torch_dynamo_backends` entry point (see pyproject.toml),
so no import of lora_rewrite is needed. The backend is Inductor's own `compile_fx` with the rewrite
installed as its `joint_custom_post_pass` (a CustomGraphPass whose uuid covers our sources and the
options, so Inductor's and AOTAutograd's compile caches stay on and never serve a stale rewrite).
Everything else — decompositions, the min-cut partitioner, cudagraphs, `mode`, caches — is Inductor's.
A graph served from those caches is reported as the pass reported it when it compiled the graph
(lora_rewrite/report_cache.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch

from lora_rewrite import compat, debug, report_cache
from lora_rewrite.options import RunLoraOptions

BACKEND_NAME = "runlora"


def runlora(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
            options: Mapping[str, Any] | None = None):
    """The backend. `options` are described in lora_rewrite.options; `mode` is torch.compile's."""
    opts = RunLoraOptions.from_user(options)
    from lora_rewrite.passes import RunLoraPass  # the only import of the passes package

    config = compat.inductor_config()
    user_passes = compat.existing_passes(config.joint_custom_post_pass)
    joint_pass = RunLoraPass(opts, chained=user_passes)
    patches = {**compat.mode_config_patches(mode), **dict(opts.inductor), "joint_custom_post_pass": joint_pass}
    inner = None if opts.codegen else compat.eager_inner_compile
    # A compile-cache hit does not run the pass: report_cache republishes what it published when it ran.
    key = None
    if opts.rewrite:
        with debug.never_raise("keying runlora's report for the compile cache"):
            key = report_cache.report_key(gm, example_inputs, joint_pass.uuid(),
                                          (mode, sorted(dict(opts.inductor).items(), key=repr), opts.codegen))
    hits_before = compat.autograd_cache_hits()
    if opts.dump_dir:
        from lora_rewrite.dump import dumping_inner_compile

        inner = dumping_inner_compile(opts.dump_dir, inner)
    guarded = GuardedInnerCompile(inner, opts)
    try:
        with debug.collect_reports() as published, \
                (compat.eager_backward_compile() if opts.dump_dir else contextlib.nullcontext()):
            compiled = compat.compile_fx(gm, example_inputs, config_patches=patches, inner_compile=guarded)
    except Exception as error:
        if opts.strict or not opts.rewrite or not (joint_pass.raised or _rewrote_something(published)):
            raise   # not runlora's doing (stock Inductor fails the same way), or strict: as it is
        return _compile_without_runlora(gm, example_inputs, patches, user_passes, inner, error, list(published))
    finally:
        guarded.compiling = False
    report_cache.after_compile(key, list(published), hits_before, debug_option=opts.debug)
    guarded.reports = [r for r in published if r.sites or r.fused]
    return compiled


def _rewrote_something(reports) -> bool:
    return any(r.sites or r.fused for r in reports)


def _compile_without_runlora(gm, example_inputs, patches: dict, user_passes: tuple, inner, error: BaseException,
                             published: list):
    """The never-worse fallback (lora_rewrite/containment.py): compiling the rewritten graph failed,
    so the graph is compiled again exactly as stock Inductor compiles it, with one warning."""
    from lora_rewrite.containment import Stage, describe

    failure = debug.FailureReport(debug.GRAPH, Stage.COMPILE.value, describe(error),
                                  note="compiled again as stock Inductor compiles it, without runlora")
    debug.record_late_failure(published, failure, error, rewrite_undone=True)
    stock = {**patches, "joint_custom_post_pass": user_passes[0] if len(user_passes) == 1 else
             (list(user_passes) if user_passes else None)}
    return compat.compile_fx(gm, example_inputs, config_patches=stock,
                             inner_compile=inner or compat.compile_fx_inner)


class GuardedInnerCompile:
    """Inductor's inner compile, for one runlora compile. AOTAutograd compiles the backward graph
    lazily, at the first backward, after the backend has returned: if compiling a rewritten backward
    then fails, that graph runs op by op (the aten graph the rewrite produced, correct, uncompiled)
    with one warning, rather than failing the step. Failures while the backend is still compiling
    reach the backend, which compiles the whole graph again without runlora."""

    def __init__(self, inner, options: RunLoraOptions):
        self.inner = inner
        self.options = options
        self.compiling = True     # inside the backend's compile_fx call
        self.reports: list = []   # the reports of rewritten graphs (known once the backend returns)

    def __call__(self, gm, example_inputs, **kwargs):
        try:
            return (self.inner or compat.compile_fx_inner)(gm, example_inputs, **kwargs)
        except Exception as error:
            if self.compiling or self.options.strict or not self.reports:
                raise
            from lora_rewrite.containment import Stage, describe

            failure = debug.FailureReport(debug.GRAPH, Stage.COMPILE.value, describe(error),
                                          note="the rewritten backward graph runs op by op, uncompiled")
            debug.record_late_failure(self.reports, failure, error, rewrite_undone=False)
            return compat.run_op_by_op(gm)


def register() -> None:
    """Register "runlora" with Dynamo unless it is already known (entry point or an earlier call)."""
    if BACKEND_NAME not in compat.registered_backend_names():
        compat.register_backend(BACKEND_NAME, runlora)
