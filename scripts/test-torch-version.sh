#!/usr/bin/env bash
# Run the core tests against another torch release, in its own venv (.venv-torch<version>).
#   bash scripts/test-torch-version.sh 2.11.0      # or 2.15.0, …
# Note: torch other than the local 2.13.0 CPU wheel comes from PyPI as a CUDA build (several GB with
# its nvidia-* packages); it runs on the CPU all the same.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/test-torch-version.sh <torch version>}
venv=".venv-torch${version}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==${version}"
# peft and transformers bounded as in pyproject.toml's dev extra
"$venv/bin/python" -m pip install -q "peft>=0.21.2,<0.22" "transformers>=5.23,<5.25" accelerate pytest numpy \
    matplotlib tqdm
"$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" -m pytest -q tests/passes tests/test_variants.py tests/test_cost.py tests/test_options.py \
    tests/test_explain.py tests/test_backend.py tests/test_debug.py tests/test_dump.py
