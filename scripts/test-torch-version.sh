#!/usr/bin/env bash
# Run the tests against another torch release, in its own venv (.venv-torch<version>).
#   bash scripts/test-torch-version.sh 2.11.0            # the core tests
#   bash scripts/test-torch-version.sh 2.14.1 all        # the whole suite
#   bash scripts/test-torch-version.sh 2.11.0 tests/test_dora.py …   # any pytest arguments
# Note: torch other than the local 2.13.0 CPU wheel comes from PyPI as a CUDA build (several GB with
# its nvidia-* packages); it runs on the CPU all the same. Where pip is capped at an older torch
# (/etc/xdg/pip), run it as `PIP_CONFIG_FILE=/dev/null bash scripts/test-torch-version.sh 2.15.0 all`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/test-torch-version.sh <torch version> [all | pytest arguments]}
shift
venv=".venv-torch${version}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# a venv's own setuptools can be too old to build this package's wheel in-process (tests/test_packaging.py)
"$venv/bin/python" -m pip install -q --upgrade pip "setuptools>=70.1,<82"   # torch 2.11 asks for <82
"$venv/bin/python" -m pip install -q "torch==${version}"
# the dev extra (peft, transformers, bitsandbytes, … bounded as in pyproject.toml), torch already pinned
PYTHONWARNINGS="ignore:Editable installation" "$venv/bin/python" -m pip install -q -e ".[dev]"
core=(tests/passes tests/test_variants.py tests/test_cost.py tests/test_options.py tests/test_explain.py
      tests/test_backend.py tests/test_debug.py tests/test_dump.py)
if [ "${1:-}" = all ]; then
  shift
  set -- "$@"
elif [ $# -eq 0 ]; then
  set -- "${core[@]}"
fi
"$venv/bin/python" -c "import torch, peft, transformers; print(f'torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}')"
"$venv/bin/python" -m pytest -q "$@"
