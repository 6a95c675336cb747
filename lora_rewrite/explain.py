"""`explain(model, *args, **kwargs)`: compile a fresh copy of one call with runlora and report."""

from __future__ import annotations

from typing import Any

import torch

from lora_rewrite import compat, debug


def explain(model, *args, options: dict | None = None, **kwargs) -> "debug.GraphReport | list":
    """Run `model(*args, **kwargs)` compiled with runlora, with compile caches off; return the reports."""
    from lora_rewrite.backend import runlora

    opts = dict(options or {})
    torch._dynamo.reset()
    with compat.fresh_compile_caches(), debug.collect_reports() as reports:
        compiled = torch.compile(model, backend=runlora, options=opts)
        compiled(*args, **kwargs)
    torch._dynamo.reset()
    return reports
