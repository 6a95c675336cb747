#!/usr/bin/env bash
# Run the tests against the newest releases on the registry of what the dev extra bounds (peft, transformers,
# accelerate, bitsandbytes), in their own venv (.venv-newest), on the pinned torch: what a user who runs
# `pip install torch peft transformers` gets today, before the dev extra is widened to it.
#   bash scripts/test-newest-releases.sh            # the whole suite
#   bash scripts/test-newest-releases.sh tests/models/test_peft_features.py …   # any pytest arguments
# The versions it ran with are printed first; docs/guide.md ("Versions") records each green run.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
venv=".venv-newest"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip "setuptools>=70.1,<82"
"$venv/bin/python" -m pip install -q "${TORCH_SPEC}"
torch_version=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
echo "torch==${torch_version}" > "$constraints"   # the newest of the others, never another torch
PYTHONWARNINGS="ignore:Editable installation" "$venv/bin/python" -m pip install -q -c "$constraints" -e .
"$venv/bin/python" -m pip install -q -c "$constraints" --upgrade pytest numpy matplotlib tqdm peft transformers \
  accelerate bitsandbytes
rm -f "$constraints"
"$venv/bin/python" -c "import torch, peft, transformers, accelerate, bitsandbytes as b; print(f'torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, bitsandbytes {b.__version__}')"
"$venv/bin/python" -m pytest -q "$@"
