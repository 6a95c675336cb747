"""Lets Hugging Face accelerate accept `torch_compile_backend="runlora"` with no import of lora_rewrite.

`TrainingArguments(torch_compile=True, torch_compile_backend="runlora")` reaches accelerate's
`TorchDynamoPlugin`, which checks the name against its own fixed enum `DynamoBackend` before torch
ever looks the backend up (where our entry point would load). This module adds RUNLORA to that enum.

`pip install .` installs `lora_rewrite-startup.pth` beside it, one line that Python's `site` module
runs at start-up: it imports this module, which only puts a small finder on `sys.meta_path` that waits
for `accelerate.utils.dataclasses` to be imported and extends the enum right after. Nothing else is
imported at start-up (no torch, no accelerate). `import lora_rewrite` does the same, for environments
without the .pth (an editable install: `python -m _lora_rewrite_startup` writes it there).
"""

from __future__ import annotations

import sys

ACCELERATE_MODULE = "accelerate.utils.dataclasses"
MEMBER = "RUNLORA"
PTH_NAME = "lora_rewrite-startup.pth"
PTH_LINE = "import _lora_rewrite_startup; _lora_rewrite_startup.install()\n"


def extend_dynamo_backend(module) -> None:
    """Add RUNLORA to accelerate's DynamoBackend (a str Enum), if it is not there already."""
    enum_cls = getattr(module, "DynamoBackend", None)
    if enum_cls is None or MEMBER in getattr(enum_cls, "_member_map_", {MEMBER: None}):
        return
    member = str.__new__(enum_cls, MEMBER)
    member._name_ = MEMBER
    member._value_ = MEMBER
    type.__setattr__(enum_cls, MEMBER, member)
    enum_cls._member_map_[MEMBER] = member
    enum_cls._value2member_map_[MEMBER] = member
    enum_cls._member_names_.append(MEMBER)


class _AccelerateFinder:
    """On sys.meta_path: extends accelerate's enum as soon as its module has been executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ACCELERATE_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # find the real module without finding ourselves again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_extend(module):
            exec_module(module)
            try:
                extend_dynamo_backend(module)
            except Exception:  # never break accelerate: at worst it rejects the name, as it would have
                pass

        spec.loader.exec_module = exec_and_extend
        return spec


def install() -> None:
    try:
        if ACCELERATE_MODULE in sys.modules:
            extend_dynamo_backend(sys.modules[ACCELERATE_MODULE])
        elif not any(isinstance(f, _AccelerateFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _AccelerateFinder())
    except Exception:
        pass


def write_pth(site_packages: str | None = None) -> str:
    """Write the start-up line into site-packages (for installs that did not: `pip install -e .`)."""
    import os
    import sysconfig

    folder = site_packages or sysconfig.get_paths()["purelib"]
    path = os.path.join(folder, PTH_NAME)
    with open(path, "w") as f:
        f.write(PTH_LINE)
    return path


if __name__ == "__main__":
    print(f"wrote {write_pth()}")
