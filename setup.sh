#!/usr/bin/env bash
# Set up .venv for lora_rewrite on a fresh machine (idempotent): the pinned CPU torch first, so pip
# never resolves a newer torch with gigabytes of CUDA packages, then this package and its dev extras.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# The pinned torch (the local CPU wheel on this project's machines); override to use another release.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "${TORCH_SPEC}"
# Editable: the wheel of links setuptools builds also carries lora_rewrite-startup.pth (setup.py). Its
# generic "Editable installation … folders with the same name" notice is silenced: passes/ is mapped.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, peft, transformers; print(f'lora_rewrite env ready: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}')"
