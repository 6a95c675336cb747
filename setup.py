"""Packaging beyond pyproject.toml: install lora_rewrite-startup.pth into site-packages.

That one line lets Hugging Face accelerate accept torch_compile_backend="runlora" without an import
of lora_rewrite (see _lora_rewrite_startup.py). Wheels built from this tree carry the .pth at their
root, which pip installs into site-packages; editable installs do not, so setup.sh writes it.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lora_rewrite-startup.pth"


class BuildPyWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
