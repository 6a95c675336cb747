"""Packaging beyond pyproject.toml: install lora_rewrite-startup.pth into site-packages.

That one line lets Hugging Face accelerate accept torch_compile_backend="runlora" without an import
of lora_rewrite (see _lora_rewrite_startup.py). A wheel (`pip install .`) carries the .pth at its
root, which pip installs into site-packages. An editable install (`pip install -e .`) is a wheel
of links to this tree that setuptools assembles itself, so the .pth is added to that wheel too.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lora_rewrite-startup.pth"


def _pth_text() -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)) as f:
        return f.read()


class BuildPyWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class _StrategyWithStartupHook:
    """Wraps setuptools' editable strategy (what writes the links into the editable wheel): adds the .pth."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH, _pth_text())


cmdclass = {"build_py": BuildPyWithStartupHook}
try:  # setuptools >= 64 (PEP 660); `_select_strategy` has been its one seam for the editable wheel's content
    from setuptools.command.editable_wheel import editable_wheel

    if hasattr(editable_wheel, "_select_strategy"):
        class EditableWheelWithStartupHook(editable_wheel):
            def _select_strategy(self, *args, **kwargs):
                return _StrategyWithStartupHook(super()._select_strategy(*args, **kwargs))

        cmdclass["editable_wheel"] = EditableWheelWithStartupHook
except ImportError:  # without it, `import lora_rewrite` or `python -m _lora_rewrite_startup` still install the hook
    pass

setup(cmdclass=cmdclass)
