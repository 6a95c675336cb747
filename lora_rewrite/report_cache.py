"""Reports for graphs served from the compile cache.

Inductor's and AOTAutograd's compile caches stay on with runlora (the pass's uuid keys them), and a
hit serves the rewritten graph without running the pass: no log line, counter or report would say
what the graph contains. So the backend keeps a small side cache of its own:

- after every compile in which the pass ran, the reports it published are stored as JSON under
  `<Inductor cache dir>/runlora_reports/<key>.json`;
- after a compile in which it did not run (a cache hit), the reports stored under the same key are
  published again, marked `served_from_cache`: the same counters, collectors and log lines, plus one
  INFO line "served from the compile cache: N site(s) rewritten … when it was compiled".

The key is computed by the backend from what it receives, before compiling: the Dynamo graph's code,
the symbolic shapes, dtypes, strides and devices of its inputs, grad mode and autocast, runlora's
Inductor patches and `mode`, and the pass's uuid (which covers lora_rewrite's sources, the options that
change the rewrite and torch's version). Everything AOTAutograd's key depends on that can change our
pass's result is in it, so a hit finds the report of the compile that produced the served graph; a
miss only means the report is not shown (said so at INFO when AOTAutograd counted a hit). Nothing is
stored while the caches are disabled, and nothing here ever fails a compile.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from lora_rewrite import compat, debug

FOLDER = "runlora_reports"
FORMAT = 2   # 2: reports carry failures


def report_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], pass_uuid: str | None,
               extra: Any) -> str | None:
    """A key for the reports of compiling `gm`, or None when the compile cannot be served from a cache."""
    if pass_uuid is None or compat.compile_caches_disabled():
        return None
    h = hashlib.sha256()
    for part in (FORMAT, pass_uuid, repr(extra), torch.is_grad_enabled(), compat.autocast_state(), gm.code):
        h.update(repr(part).encode())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            h.update(_input_signature(node).encode())
    if not any(n.op == "placeholder" for n in gm.graph.nodes):
        for value in example_inputs:
            h.update(_value_signature(value).encode())
    return h.hexdigest()[:40]


def _input_signature(node: torch.fx.Node) -> str:
    value = node.meta.get("example_value", node.meta.get("val"))
    return f"{node.name}:{_value_signature(value)};"


def _value_signature(value: Any) -> str:
    if isinstance(value, torch.Tensor):   # symbolic sizes print as their expressions (s0, 2*s1, …)
        return (f"T({tuple(str(d) for d in value.shape)},{tuple(str(d) for d in value.stride())},{value.dtype},"
                f"{value.device.type},{value.requires_grad},{isinstance(value, torch.nn.Parameter)})")
    return f"{type(value).__name__}({value})"


def _path(key: str) -> Path:
    return Path(compat.compile_cache_dir()) / FOLDER / f"{key}.json"


def store(key: str, reports: list) -> None:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"format": FORMAT, "reports": [r.to_dict() for r in reports]}, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")   # atomic: a concurrent reader sees old or new
    with os.fdopen(fd, "w") as f:
        f.write(payload)
    os.replace(tmp, path)


def load(key: str) -> list | None:
    path = _path(key)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        return None
    return [debug.GraphReport.from_dict(r) for r in data["reports"]]


def after_compile(key: str | None, published: list, hits_before: int, *, debug_option: bool) -> None:
    """Store what the pass published during the compile, or, if it did not run, publish what it stored."""
    if key is None:
        return
    with debug.never_raise("storing or loading runlora's report for the compile cache"):
        if published:
            store(key, published)
            return
        stored = load(key)
        cid = compat.compile_id()
        if stored is None:
            if compat.autograd_cache_hits() > hits_before:
                debug.log.info("runlora graph %s was served from the compile cache without a stored report (it was "
                               "compiled by another lora_rewrite version, or the report cache was cleared): "
                               "TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 or lora_rewrite.explain() shows it",
                               cid or "?")
            return
        for report in stored:
            report.compile_id = cid
            report.served_from_cache = True
            for entry in list(report.sites) + list(report.skipped):
                entry.module_key = None   # an id() from the process that compiled it
            debug.publish(report, debug=debug_option)
