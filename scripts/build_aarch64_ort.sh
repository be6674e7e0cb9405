#!/usr/bin/env bash
# Install ONNX Runtime for the aarch64 sysroot, the peer pqcompile's aarch64 builds are counted
# against (pqcompile.targets.ort_insn_count, benchmarks/insn_count.py).
#
# Usage:  scripts/build_aarch64_ort.sh [DEST]
#         DEST defaults to ${PQCOMPILE_CACHE:-$HOME/.cache/pqcompile}/aarch64-ort
#
# Result (what pqcompile.targets.ort_insn_count.find_ort_site() expects):
#   DEST/site        aarch64 wheels unpacked: onnxruntime 1.18.1 and numpy 1.26.4
#   DEST/.complete   stamp written last; when it matches this recipe the script does nothing
#
# The wheels live apart from the sysroot's site/ because onnxruntime 1.18.1 is built against
# numpy 1.x while the TVM runtime there uses the host's numpy 2.x: a guest running ONNX Runtime
# puts DEST/site (alone) on PYTHONPATH and the sysroot's CPython 3.11 runs it. 1.18.1 is the
# newest release that runs under Debian bookworm's qemu-aarch64 7.2 (1.32 crashes at import
# with SIGSEGV). Only the two wheels are unpacked (no protobuf/sympy/flatbuffers: inference
# needs none of them; models are made and quantized on the host).
#
# Recipe (needs the aarch64 sysroot, scripts/build_aarch64_sysroot.sh, and the PyPI mirror):
#   1. pip download --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 (and older
#      manylinux tags) --python-version 3.11 onnxruntime==1.18.1 numpy==1.26.4 (~20 MB)
#   2. unzip both into DEST/site
#   3. smoke test under qemu-aarch64: import onnxruntime and run a one-node model (a Relu
#      written by the host's onnx package) on the CPU provider with one thread
# Built in DEST.partial and renamed at the end. Takes about 30 s.
#
# Environment overrides: PYTHON (host interpreter running pip and writing the smoke model,
# default python3), PQCOMPILE_AARCH64_SYSROOT (the sysroot, default
# ${PQCOMPILE_CACHE:-$HOME/.cache/pqcompile}/aarch64-sysroot).
set -euo pipefail

CACHE="${PQCOMPILE_CACHE:-$HOME/.cache/pqcompile}"
DEST="${1:-$CACHE/aarch64-ort}"
SYSROOT="${PQCOMPILE_AARCH64_SYSROOT:-$CACHE/aarch64-sysroot}"
PYTHON="${PYTHON:-python3}"
WHEELS=(onnxruntime==1.18.1 numpy==1.26.4)
STAMP="v1 ${WHEELS[*]}"

log() { printf '[aarch64-ort] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ -f "$DEST/.complete" ] && [ "$(cat "$DEST/.complete")" = "$STAMP" ]; then
    log "up to date: $DEST"
    exit 0
fi
command -v qemu-aarch64 >/dev/null 2>&1 || die "qemu-aarch64 missing: apt-get install qemu-user"
[ -f "$SYSROOT/.complete" ] || die "no aarch64 sysroot at $SYSROOT: run scripts/build_aarch64_sysroot.sh first"
GUEST_PYTHON="$(ls "$SYSROOT"/root/usr/bin/python3.[0-9]* 2>/dev/null | grep -E 'python3\.[0-9]+$' | head -n 1)"
[ -n "$GUEST_PYTHON" ] || die "no python3.X under $SYSROOT/root/usr/bin; rebuild the sysroot"

PARTIAL="$DEST.partial"
rm -rf "$PARTIAL"
mkdir -p "$PARTIAL/site" "$PARTIAL/wheels"

log "downloading aarch64 wheels: ${WHEELS[*]}"
platforms=()
for minor in 28 27 26 25 24 17; do
    platforms+=(--platform "manylinux_2_${minor}_aarch64")
done
platforms+=(--platform manylinux2014_aarch64)
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "${platforms[@]}" --python-version 3.11 --implementation cp \
    --dest "$PARTIAL/wheels" "${WHEELS[@]}"
for whl in "$PARTIAL"/wheels/*.whl; do
    "$PYTHON" -m zipfile -e "$whl" "$PARTIAL/site"
done
rm -rf "$PARTIAL/wheels"

log "smoke test: running a one-node model with onnxruntime under qemu-aarch64 (about 10 s)"
"$PYTHON" - "$PARTIAL/smoke.onnx" <<'EOF'
import sys
from onnx import TensorProto, helper, save
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "smoke", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8  # onnxruntime 1.18 reads IR versions up to 9
save(model, sys.argv[1])
EOF
env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8 PYTHONNOUSERSITE=1 \
    PYTHONPATH="$PARTIAL/site" \
    qemu-aarch64 -L "$SYSROOT/root" "$GUEST_PYTHON" -s - "$PARTIAL/smoke.onnx" <<'EOF' \
    || die "onnxruntime in $PARTIAL does not run under qemu-aarch64; see the error above"
import platform, sys
import numpy as np
import onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
y = session.run(None, {"x": np.array([-1, 0, 2, -3], np.float32)})[0]
assert y.tolist() == [0, 0, 2, 0], y
print("aarch64 python", platform.machine(), "onnxruntime", ort.__version__, "numpy",
      np.__version__, "relu ok")
EOF
rm -f "$PARTIAL/smoke.onnx"

printf '%s' "$STAMP" > "$PARTIAL/.complete"
rm -rf "$DEST"
mv "$PARTIAL" "$DEST"
log "done: $DEST"
