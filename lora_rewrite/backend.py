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
    with debug.collect_reports() as published:
        if not opts.dump_dir:
            compiled = compat.compile_fx(gm, example_inputs, config_patches=patches, inner_compile=inner)
        else:
            from lora_rewrite.dump import dumping_inner_compile

            with compat.eager_backward_compile():
                compiled = compat.compile_fx(gm, example_inputs, config_patches=patches,
                                             inner_compile=dumping_inner_compile(opts.dump_dir, inner))
    report_cache.after_compile(key, list(published), hits_before, debug_option=opts.debug)
    return compiled


def register() -> None:
    """Register "runlora" with Dynamo unless it is already known (entry point or an earlier call)."""
    if BACKEND_NAME not in compat.registered_backend_names():
        compat.register_backend(BACKEND_NAME, runlora)
