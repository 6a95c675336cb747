"""The `runlora` torch.compile backend: Dynamo graph → AOTAutograd → our pass → Inductor.

    torch.compile(peft_model, backend="runlora", options={...})

`pip install` registers the name through the `torch_dynamo_backends` entry point (see pyproject.toml),
so no import of lora_rewrite is needed. The backend is Inductor's own `compile_fx` with the rewrite
installed as its `joint_custom_post_pass` (a CustomGraphPass whose uuid covers our sources and the
options, so Inductor's and AOTAutograd's compile caches stay on and never serve a stale rewrite).
Everything else — decompositions, the min-cut partitioner, cudagraphs, `mode`, caches — is Inductor's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lora_rewrite import compat
from lora_rewrite.options import RunLoraOptions

BACKEND_NAME = "runlora"


def runlora(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
            options: Mapping[str, Any] | None = None):
    """The backend. `options` are described in lora_rewrite.options; `mode` is torch.compile's."""
    opts = RunLoraOptions.from_user(options)
    from lora_rewrite.passes import RunLoraPass  # the only import of the passes package

    config = compat.inductor_config()
    user_passes = compat.existing_passes(config.joint_custom_post_pass)
    patches = {**compat.mode_config_patches(mode), **dict(opts.inductor),
               "joint_custom_post_pass": RunLoraPass(opts, chained=user_passes)}
    inner = None if opts.codegen else compat.eager_inner_compile
    if not opts.dump_dir:
        return compat.compile_fx(gm, example_inputs, config_patches=patches, inner_compile=inner)
    from lora_rewrite.dump import dumping_inner_compile

    with compat.eager_backward_compile():
        return compat.compile_fx(gm, example_inputs, config_patches=patches,
                                 inner_compile=dumping_inner_compile(opts.dump_dir, inner))


def register() -> None:
    """Register "runlora" with Dynamo unless it is already known (entry point or an earlier call)."""
    if BACKEND_NAME not in compat.registered_backend_names():
        compat.register_backend(BACKEND_NAME, runlora)
