#!/usr/bin/env bash
# Build the IPEX environment: a separate venv with torch 2.8.0 + intel-extension-for-pytorch
# 2.8.0 (IPEX is discontinued after 2.8 and refuses any other torch), plus accelcore itself.
#
#   scripts/make_ipex_env.sh [VENV_DIR]        (default: .venv-ipex in the repo root)
#   VENV_DIR/bin/python -m pytest -m ipex tests/test_backend_ipex.py
#
# Our pyproject pins torch==2.13.*, so accelcore is installed --no-deps and its other runtime
# dependencies are installed explicitly under constraints/ipex.txt. PyPI's torch 2.8.0 wheel is a
# CUDA build (~4 GB with its nvidia-* wheels); set TORCH_INDEX_URL to a CPU-only wheel index to
# avoid that where one is reachable. PYTHON picks the interpreter (default: python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-ipex}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/constraints/ipex.txt"

echo "[ipex-env] creating $VENV with $("$PYTHON" -V 2>&1)"
"$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }

echo "[ipex-env] torch 2.8.0 + intel-extension-for-pytorch 2.8.0"
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    pip_install --index-url "$TORCH_INDEX_URL" torch==2.8.0
fi
pip_install torch==2.8.0 intel-extension-for-pytorch==2.8.0

echo "[ipex-env] accelcore runtime dependencies (all but torch) + test tools"
# Read the dependency list from pyproject so this stays in sync; drop torch (pinned above).
mapfile -t DEPS < <("$VPY" - "$ROOT/pyproject.toml" <<'PYEOF'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as fh:
    deps = tomllib.load(fh)["project"]["dependencies"]
for dep in deps:
    if re.split(r"[\s<>=!~\[;]", dep, maxsplit=1)[0].lower() != "torch":
        print(dep)
PYEOF
)
pip_install "${DEPS[@]}" "pytest>=8" "pytest-timeout>=2.3"

echo "[ipex-env] accelcore (editable, --no-deps)"
"$VPY" -m pip install --disable-pip-version-check --no-deps -e "$ROOT"

echo "[ipex-env] checking that IPEX imports"
"$VPY" - <<'PYEOF'
import torch
import intel_extension_for_pytorch as ipex

print(f"[ipex-env] ok: torch {torch.__version__}, ipex {ipex.__version__}, "
      f"threads {torch.get_num_threads()}")
PYEOF
