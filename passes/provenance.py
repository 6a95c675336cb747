"""Which PEFT module a node of the graph comes from, read off Dynamo's `nn_module_stack` metadata.

The report names each site by its LoRA module's path (relative to the compiled frame's `self`) and
adapter, and keeps Dynamo's key of the module (the `id` of the module object) so that
`lora_rewrite.explain` can name it by its path in the model the user passed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch.fx import Node

UNKNOWN_MODULE = "<unknown>"

# One step of a Dynamo module path: `.__dict__['_modules']['name']`, `._modules['name']` or `['name']`.
_MODULE_KEY = re.compile(r"\.__dict__\['_modules'\]\['([^']*)'\]|\._modules\['([^']*)'\]|\['([^']*)'\]")
# What Dynamo calls the compiled frame's own module; the report's paths start below it.
_FRAME_PREFIXES = ("L.self", "L__self__", "self", "L.fn", "L.model", "L.mod", "L")


@dataclass(frozen=True)
class Provenance:
    """The PEFT LoRA module a site belongs to."""

    path: str                # e.g. "base_model.model.layers.0.self_attn.q_proj"
    adapter: str | None      # the adapter's name, e.g. "default"
    key: str | None          # Dynamo's key of the module (its id), for explain() to resolve


def clean_module_path(raw: str) -> str:
    """"L['self'].__dict__['_modules']['base_model']…layers.0.proj" -> "base_model….layers.0.proj"."""
    path = _MODULE_KEY.sub(lambda m: "." + next(g for g in m.groups() if g is not None), raw)
    path = path.strip(".")
    for prefix in _FRAME_PREFIXES:
        if path == prefix or path.startswith(prefix + "."):
            path = path[len(prefix):]
            break
    path = re.sub(r"^L__self___", "", path)
    return path.strip(".")


def provenance_of(node: Node) -> Provenance:
    """The LoRA module (the owner of the innermost `lora_A`/`lora_B` on the node's module stack) that
    produced `node`; without one, the innermost module, or UNKNOWN_MODULE."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    entries = [(key, clean_module_path(entry[0])) for key, entry in stack.items() if isinstance(entry, tuple)]
    by_path = {path: key for key, path in entries}
    for _, path in reversed(entries):
        parts = path.split(".")
        for marker in ("lora_A", "lora_B"):
            if marker in parts:
                k = parts.index(marker)
                adapter = parts[k + 1] if k + 1 < len(parts) else None
                owner = ".".join(parts[:k])
                key = by_path.get(owner)
                return Provenance(owner, adapter, str(key).split("@")[0] if key is not None else None)
    return Provenance(entries[-1][1] if entries else UNKNOWN_MODULE, None, None)
