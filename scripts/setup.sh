#!/usr/bin/env bash
# Set up a fresh machine for sparsetrain: Debian's Fashion-MNIST package, a virtual
# environment in .venv with the CPU build of torch, and the package itself with its test tools
# and its integrations (Hugging Face, Lightning, TensorBoard, ONNX export and onnxruntime).
# Safe to run again: each step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "setup: installing torch (CPU build) and sparsetrain into .venv"
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test,integrations]'
echo "setup: building the compiled CSR kernels (g++, OpenMP; torch's own ops are used if this fails)"
.venv/bin/python -c "from sparsetrain.backends.csr import compiled_kernels; print('setup: CSR kernels', 'built' if compiled_kernels() else 'not available')" || true
.venv/bin/python -c "import sparsetrain, torch; print('setup: sparsetrain', sparsetrain.__version__, 'with torch', torch.__version__)"
