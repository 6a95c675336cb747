"""Packaging: both install forms carry the accelerate start-up hook, and building is quiet.

The wheels are built with setuptools' PEP 517/660 hooks (what `pip install .` and `pip install -e .`
call) from a copy of the files a build reads, so nothing is written into the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import _lora_rewrite_startup

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "lora_rewrite-startup.pth", "_lora_rewrite_startup.py",
                "lora_rewrite", "passes"]

BUILD = """
import sys, warnings
warnings.simplefilter("always")
from setuptools import build_meta
print("WHEEL", getattr(build_meta, sys.argv[1])(sys.argv[2]))
"""


def can_build_wheels_here() -> bool:
    """setuptools builds wheels by itself from 70.1 on; older ones need the `wheel` package (pip's
    isolated build environment has both, an environment made by `python -m venv` may have neither)."""
    import importlib.util

    import setuptools

    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    if not can_build_wheels_here():
        pytest.skip("this environment's setuptools cannot build a wheel in-process (needs >= 70.1 or `wheel`)")
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    out = tmp_path_factory.mktemp("wheels")
    built = {}
    for hook in ("build_wheel", "build_editable"):
        proc = subprocess.run([sys.executable, "-c", BUILD, hook, str(out)], cwd=source, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        name = next(l for l in proc.stdout.splitlines() if l.startswith("WHEEL ")).split()[1]
        built[hook] = (out / name, proc.stdout + proc.stderr)
    return built


@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_both_install_forms_carry_the_start_up_hook(wheels, hook):
    """`pip install -e .` used to leave the .pth out, and HF Trainer then rejected "runlora"."""
    wheel, _ = wheels[hook]
    with zipfile.ZipFile(wheel) as z:
        assert z.read(_lora_rewrite_startup.PTH_NAME).decode() == _lora_rewrite_startup.PTH_LINE
        record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
    assert f"{_lora_rewrite_startup.PTH_NAME}," in record   # pip uninstall removes it again


def test_the_wheel_ships_the_benchmark_configs(wheels):
    wheel, _ = wheels["build_wheel"]
    with zipfile.ZipFile(wheel) as z:
        configs = [n for n in z.namelist() if n.startswith("lora_rewrite/bench/configs/")]
    assert "lora_rewrite/bench/configs/llama_60m.json" in configs and len(configs) == 10


@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_building_warns_nothing_about_the_configs_folder(wheels, hook):
    _, output = wheels[hook]
    assert "lora_rewrite.bench.configs" not in output
