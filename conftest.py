"""Loaded by pytest before anything imports torch: the suite's float code path is pinned.

Several tests assert measured numbers of short trainings and searches (a QAT gain, a gate
count, a reward curve). Single-threaded (tests/conftest.py) those runs are deterministic on one
machine, but torch, MKL and oneDNN pick their kernels by the CPU's instruction set, and AVX-512
and AVX2 kernels round differently: the same seed trained on another CPU ends elsewhere. Capped
at AVX2 (which every x86-64 CI machine here has) the suite computes the same floats on any of
them. Settings already in the environment win. Other architectures ignore these variables.
"""

import os

for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"),  # torch's own vectorized kernels
                      ("MKL_CBWR", "AVX2,STRICT"),  # MKL's conditional numerical reproducibility
                      ("ONEDNN_MAX_CPU_ISA", "AVX2")):  # oneDNN's convolutions
    os.environ.setdefault(_name, _value)

# Builds apply the tuning database of their target (pqcompile.tuning): the suite gets an empty
# one of its own, so schedules tuned on this machine before do not change what it builds.
if "PQCOMPILE_TUNING_DIR" not in os.environ:
    import tempfile

    os.environ["PQCOMPILE_TUNING_DIR"] = tempfile.mkdtemp(prefix="pqcompile-tuning-")
