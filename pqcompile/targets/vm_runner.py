"""Run one function of an exported Relax library on .npy inputs; write its outputs as .npy.

Runs on the target machine or under qemu-user, so it imports only numpy, tvm and the standard
library (never pqcompile)::

    python vm_runner.py LIB.so FUNCTION IN_DIR OUT_DIR

reads ``IN_DIR/in0.npy``, ``in1.npy``, ... in order, calls ``FUNCTION`` on the CPU, flattens
nested tuple outputs depth-first and writes ``OUT_DIR/out0.npy``, ``out1.npy``, ...
It prints the number of outputs written.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _flatten(value, out):
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    elif isinstance(value, (int, float, bool)):
        import numpy as np

        out.append(np.asarray(value))
    else:  # a tuple (tvm_ffi Array) of outputs
        for item in value:
            _flatten(item, out)
    return out


def main(argv: list[str]) -> int:
    """Entry point; ``argv`` excludes the program name."""
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    import numpy as np
    import tvm
    from tvm import relax

    lib, function, in_dir, out_dir = argv
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    count = len(list(in_dir.glob("in*.npy")))
    inputs = [tvm.runtime.tensor(np.load(in_dir / f"in{i}.npy")) for i in range(count)]
    vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
    outputs = _flatten(vm[function](*inputs), [])
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(outputs):
        np.save(out_dir / f"out{i}.npy", array)
    print(len(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
