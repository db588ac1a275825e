#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: Fashion-MNIST from Debian, a virtual environment with
# vitq and its test dependencies. Safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: Fashion-MNIST (the reference data) and, for the test extra, Chromium (the report
# test renders vitq report's HTML headless)
DEB=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || DEB+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || DEB+=(chromium)
if [ ${#DEB[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${DEB[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch and torchvision pinned to the builds this project is tested with
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
# transformers and the ONNX stack pinned to the releases the adapters and the export are tested with
# (the hf / deploy extras allow ranges); onnxruntime's graph fusions decide which integer kernels run
.venv/bin/python -m pip install -q --disable-pip-version-check "transformers==5.24.0" "onnx==1.23.2" \
  "onnxruntime==1.32.0" "onnxscript==0.7.2" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[hf,deploy,report,test,bench,openvino]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import vitq, torch, timm, transformers; print('vitq', vitq.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| transformers', transformers.__version__)"
