"""Run a saved pqcompile artifact on the device; imports only the standard library, numpy and tvm.

``Artifact.save`` puts this file in every artifact directory. It checks each file against the
sha256 in ``manifest.json``, loads ``lib.so`` into a Relax VM, calls the entry function with the
inputs followed by the weights from ``weights.bin`` (``calling_convention``:
``inputs_then_params``) and saves the outputs with ``np.save``; without ``--input`` it runs the
stored reference sample. Exit status: 0 success, 1 a failed check, 2 bad usage. Example::

    python runner.py ARTIFACT_DIR --check-sample --repeat 50
    python runner.py ARTIFACT_DIR --input x.npy --output logits.npy
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tvm

FORMAT = 1  # the manifest format this runner reads
MANIFEST = "manifest.json"


class ArtifactFormatError(ValueError):
    """The artifact is incomplete, was modified after saving, or has another format version."""


def manifest_sha256(manifest):
    """sha256 of the manifest without its ``integrity`` field, over canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(directory):
    """Read ``manifest.json``, checking its format version, then its own checksum."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not UTF-8 or not JSON
        raise ArtifactFormatError(f"cannot read {MANIFEST} in {directory}: it is missing, "
                                  f"modified or corrupted ({err})") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if version != FORMAT:
        hint = "update pqcompile" if isinstance(version, int) and version > FORMAT \
            else "rebuild the artifact with this pqcompile"
        raise ArtifactFormatError(f"{MANIFEST} has format version {version!r} but this reader "
                                  f"supports format version {FORMAT}: {hint}")
    if manifest.get("integrity") != manifest_sha256(manifest):
        raise ArtifactFormatError(f"{MANIFEST} does not match its integrity checksum: the "
                                  f"manifest was modified or corrupted after it was saved")
    return manifest


def read_files(directory, manifest):
    """Return ``{name: bytes}`` of every file in the manifest, each checked against its sha256."""
    contents = {}
    for name, info in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            raise ArtifactFormatError(f"{name} is missing from {directory}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise ArtifactFormatError(f"{name} does not match the sha256 in {MANIFEST}: the file "
                                      f"was modified or corrupted after it was saved")
        contents[name] = data
    return contents


def read_arrays(blob, entries):
    """Read-only arrays at the offsets ``entries`` (name, dtype, shape, offset, nbytes) give."""
    arrays = []
    for e in entries:
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        flat = np.frombuffer(blob, dtype=dtype, count=e["nbytes"] // dtype.itemsize,
                             offset=e["offset"])
        arrays.append(flat.reshape(e["shape"]).astype(dtype.newbyteorder("="), copy=False))
    return arrays


def check_inputs(specs, arrays, what="input"):
    """Raise ``ValueError`` naming the first input whose count, dtype or shape is wrong.

    String dimensions are symbolic: any size, the same wherever the name recurs.

    >>> check_inputs([{"name": "x", "shape": ["n", 3], "dtype": "int8"}], [np.zeros((2, 3), "i1")])
    """
    if len(arrays) != len(specs):
        raise ValueError(f"expected the {what}s {[s['name'] for s in specs]}, got {len(arrays)}")
    sizes = {}
    for spec, array in zip(specs, arrays):
        shape = list(getattr(array, "shape", ()))
        dtype = str(getattr(array, "dtype", type(array).__name__))
        want = tuple(spec["shape"])
        fits = len(shape) == len(want) and all(
            sizes.setdefault(w, s) == s if isinstance(w, str) else w == s
            for w, s in zip(want, shape))
        if dtype != spec["dtype"] or not fits:
            raise ValueError(f"{what} {spec['name']!r} must have shape {want} and dtype "
                             f"{spec['dtype']}, got shape {tuple(shape)} and dtype {dtype}")


def nan_input(specs, arrays):
    """Name of the first float input holding NaN, or ``None``. A sum is the fast test (NaN
    propagates; an overflow gives inf, not NaN); only a NaN sum is checked element-wise."""
    for spec, array in zip(specs, arrays):
        array = np.asarray(array)
        if array.dtype.kind == "f" and np.isnan(array.sum()) and np.isnan(array).any():
            return spec["name"]
    return None


def to_tensors(arrays):
    """numpy arrays as TVM CPU tensors (copies)."""
    return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]


def prepare(vm, manifest, params):
    """The weight tensors the entry function takes: ``params`` themselves, or, when the manifest
    names a ``prepare`` function (weights stored packed, e.g. 4 bits), what that function makes
    of them, computed once here (load time) instead of in every call."""
    name = manifest.get("prepare")
    if not name:
        return list(params)
    out = vm[name](list(params))
    return [out[i] for i in range(len(out))]


def run(vm, entry, args):
    """Call ``entry`` on TVM tensors; outputs come back as numpy, nested tuples flattened."""
    outputs, pending = [], [vm[entry](*args)]
    while pending:  # depth-first, left to right
        value = pending.pop()
        if hasattr(value, "numpy"):
            view = host_view(value)  # a copy through a view: ~1 us, .numpy() ~6-12 us
            outputs.append(view.copy() if view is not None else value.numpy())
        else:
            pending.extend(reversed(list(value)))
    return outputs


def host_view(tensor):
    """A numpy array sharing ``tensor``'s memory (DLPack), or ``None`` where numpy cannot
    take it (then callers copy with the tensor's own methods)."""
    try:
        return np.from_dlpack(tensor)
    except (AttributeError, BufferError, TypeError, RuntimeError):
        return None


def compare(outputs, expected, specs, rtol, atol):
    """Messages for outputs that differ: exact for integers, ``rtol``/``atol`` for floats."""
    problems = []
    for spec, got, want in zip(specs, outputs, expected):
        floating = np.issubdtype(want.dtype, np.floating)
        if got.shape != want.shape:
            problems.append(f"output {spec['name']!r} has shape {got.shape}, not {want.shape}")
        elif not (np.allclose(got, want, rtol=rtol, atol=atol) if floating
                  else np.array_equal(got, want)):
            diff = np.abs(got.astype(np.float64) - want).max()
            rule = f"rtol {rtol}, atol {atol}" if floating else "exact"
            problems.append(f"output {spec['name']!r} differs from the reference sample by up "
                            f"to {diff:.6g} (allowed: {rule})")
    return problems


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("artifact", nargs="?", default=str(Path(__file__).resolve().parent),
        help="artifact directory (default: the one holding this script)")
    add("--input", action="append", default=[], metavar="IN.npy", help="once per model input")
    add("--output", action="append", default=[], metavar="OUT.npy", help="once per output")
    add("--check-sample", action="store_true", help="check the outputs on the stored sample")
    add("--repeat", type=int, default=0, metavar="N", help="time N runs, print the median")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.artifact)
        files = read_files(args.artifact, manifest)
        params_np = read_arrays(files[manifest["weights_file"]], manifest["params"])
        sample = manifest["reference_sample"]
        if sample is None and (args.check_sample or not args.input):
            raise ValueError("this artifact stores no reference sample: pass --input files")
        if sample is not None:
            sample_in = read_arrays(files[sample["file"]], sample["inputs"])
            sample_out = read_arrays(files[sample["file"]], sample["outputs"])
        inputs = [np.load(p, allow_pickle=False) for p in args.input] if args.input else sample_in
        check_inputs(manifest["inputs"], inputs)
        bad = nan_input(manifest["inputs"], inputs)
        if bad is not None:
            raise ValueError(f"input {bad!r} holds NaN, which has no quantized value; replace "
                             f"or drop the NaN values")
        if args.output and len(args.output) != len(manifest["outputs"]):
            raise ValueError(f"give --output once per model output: the model has "
                             f"{len(manifest['outputs'])}, got {len(args.output)}")
    except (ArtifactFormatError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    # TVM's workers unpinned unless the environment says otherwise: pinned, a worker whose
    # core another process is using waits for that core at every parallel region (the
    # default of pqcompile.runtime.artifact.thread_pool_defaults, repeated: this file runs without
    # pqcompile)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    library = tvm.runtime.load_module(str(Path(args.artifact) / manifest["library"]))
    vm = tvm.relax.VirtualMachine(library, tvm.cpu())
    params, entry = prepare(vm, manifest, to_tensors(params_np)), manifest["entry"]
    call_args = to_tensors(inputs) + params  # the calling convention: inputs_then_params
    outputs = run(vm, entry, call_args)
    for spec, array in zip(manifest["outputs"], outputs):
        print(f"output {spec['name']}: shape {array.shape} dtype {array.dtype}")
    for path, array in zip(args.output, outputs):
        np.save(path, array, allow_pickle=False)
    if args.check_sample:
        got = run(vm, entry, to_tensors(sample_in) + params)
        problems = compare(got, sample_out, manifest["outputs"], sample["rtol"], sample["atol"])
        if problems:
            print("error: reference sample check failed:\n  " + "\n  ".join(problems),
                  file=sys.stderr)
            return 1
        print(f"reference sample check passed: {len(got)} output(s) match")
    if args.repeat > 0:  # the run above was the warm-up
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            vm[entry](*call_args)
            times.append(time.perf_counter() - start)
        print(f"median latency: {statistics.median(times) * 1e3:.3f} ms over {args.repeat} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
