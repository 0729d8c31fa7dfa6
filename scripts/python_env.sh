#!/usr/bin/env bash
# A Python environment with torch, transformers and peft, for the tests that
# compare beft with Hugging Face (the PEFT adapter round trip) and for the
# fixture and benchmark scripts. Idempotent; prints the interpreter's path.
#
#   export BEFT_PYTHON="$(scripts/python_env.sh)"
#
# The environment lives in ${BEFT_CACHE:-$HOME/.cache/beft}/pyenv.
set -euo pipefail
ENV_DIR="${BEFT_CACHE:-$HOME/.cache/beft}/pyenv"
PY="$ENV_DIR/bin/python"
if ! "$PY" -c "import torch, transformers, peft, safetensors" >/dev/null 2>&1; then
    python3 -m venv "$ENV_DIR" >&2
    "$PY" -m pip install --quiet --upgrade pip >&2
    "$PY" -m pip install --quiet "torch>=2.2" "transformers>=5.0,<6" "peft>=0.21" "safetensors>=0.4" numpy >&2
fi
echo "$PY"
