"""Compiled models as a directory of files: library, weights and a JSON manifest for one target.

An artifact directory holds

- ``manifest.json``: inputs, outputs, weight layout, target, per-layer bits and costs, totals and
  the sha256 of every other file; it carries a checksum of its own (``integrity``);
- ``lib.so``: the Relax VM executable exported for the target (cross-linked for aarch64/riscv64);
- ``weights.bin``: every weight's raw little-endian bytes at a 64-byte aligned offset; the
  manifest's ``params`` give name, dtype, shape, offset and nbytes (nothing is pickled);
- ``sample.bin``: optional reference inputs and outputs, laid out the same way;
- ``runner.py``: the standalone runner (numpy and TVM only) to run the artifact on the device.

The entry function takes the inputs, then the weights in manifest order
(``calling_convention: inputs_then_params``).

Artifacts are reproducible: building the same module with the same toolchain gives byte-identical
files. The manifest holds no timestamps or paths, and ``export_library`` output was checked to be
byte-identical across exports, processes and output directories for x86_64, aarch64 and riscv64:
TVM writes its objects under fixed names (``lib0.o``, ``devc.o``) in a scratch directory, LLVM
code generation is deterministic, the link embeds no paths or dates, and the GNU build-id is a
hash of the contents. Other versions of TVM, LLVM or gcc do give other bytes (gcc records its
version in ``.comment``), hence ``created_with`` in the manifest.

>>> import tempfile
>>> import numpy as np
>>> from tvm import relax
>>> bb = relax.BlockBuilder()
>>> x = relax.Var("x", relax.TensorType((4,), "int32"))
>>> w = relax.Var("w", relax.TensorType((4,), "int32"))
>>> with bb.function("main", [x, w]):
...     _ = bb.emit_func_output(bb.emit(relax.op.add(x, w)))
>>> art = Artifact.build(bb.get(), {"w": np.arange(4, dtype="int32")}, "host")
>>> art(np.ones(4, dtype="int32"))
array([1, 2, 3, 4], dtype=int32)
>>> with tempfile.TemporaryDirectory() as tmp:
...     Artifact.load(art.save(tmp + "/a")).manifest["params"][0]["shape"]
[4]
"""

from __future__ import annotations

import copy
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..targets import TargetSpec, get_target, host_arch, run_python
from . import runner
from ._artifact_data import (
    SAMPLE,
    ArtifactError,
    _checked_inputs,
    _dump,
    _layer_list,
    _pack_sample,
    _refuse_nan,
    _sealed,
    _totals,
    exact_inputs,
    input_signature,
    json_ready,
    pack_arrays,
    tensor_specs,
    validate_params,
)
from ._artifact_relax import FLAT_SUFFIX, _flat_outputs, _with_flat_prepare
from .threads import ThreadPolicy, thread_pool_defaults

__all__ = ["CALLING_CONVENTION", "FORMAT_VERSION", "Artifact", "ArtifactError"]

FORMAT_VERSION = runner.FORMAT
CALLING_CONVENTION = "inputs_then_params"
LIBRARY, WEIGHTS, RUNNER = "lib.so", "weights.bin", "runner.py"
_RUNNER_SOURCE = Path(runner.__file__)


class Artifact:
    """A model compiled for one target. Make one with :meth:`build` or :meth:`load`.

    See the module docstring for the files and an example.
    """

    def __init__(self, manifest: dict[str, Any], files: Mapping[str, bytes] | None = None
                 ) -> None:
        if isinstance(manifest, (str, os.PathLike)):
            raise ArtifactError(f"Artifact({str(manifest)!r}): to open a saved artifact use "
                                f"Artifact.load({str(manifest)!r}); to make one, "
                                f"pqcompile.compile(...) or Artifact.build(...)")
        if not isinstance(manifest, Mapping) or not isinstance(files, Mapping):
            raise ArtifactError("Artifact(manifest, files) is what Artifact.load and "
                                "Artifact.build return; open a saved artifact with "
                                "Artifact.load(directory)")
        self._manifest = manifest
        self._files = dict(files)
        self._vm: Any = None
        self._params: list[Any] = []
        self._inputs: list[Any] = []  # TVM tensors each call copies its inputs into
        self._input_views: list[np.ndarray | None] = []  # numpy views of them (or None)
        self._input_signature: list[tuple[tuple[int, ...], np.dtype]] | None = None
        self._lock = threading.Lock()
        self.thread_policy = ThreadPolicy()  # threads per host call (runtime/threads.py)

    # --- making one ---------------------------------------------------------------------------

    @classmethod
    def build(cls, mod: Any, params: Mapping[str, np.ndarray], target: str | TargetSpec, *,
              input_specs: Sequence[Any] | None = None,
              output_specs: Sequence[Any] | None = None,
              layers: Sequence[Mapping[str, Any]] = (), totals: Mapping[str, Any] | None = None,
              reference_sample: tuple[Sequence[np.ndarray], Any] | None = None,
              sample_tolerance: tuple[float, float] = (1e-5, 1e-6),
              extra: Mapping[str, Any] | None = None, entry: str = "main",
              tuned: bool = True, prepare_params: bool = False,
              output_keys: Sequence[str] | None = None) -> Artifact:
        """Compile ``mod`` for ``target`` and package it with its weights.

        ``mod["main"]`` takes the inputs, then ``params`` in dict order (the lowering's
        function-parameter order). ``input_specs``/``output_specs`` (dicts with name, shape,
        dtype, or ``(name, shape, dtype)`` tuples) default to the function's signature; string
        dimensions are symbolic. ``layers`` are per-layer records (name, weight_bits,
        activation_bits, kept_channels, total_channels, bops, weight_bytes, ...), ``totals``
        must hold ``macs``, ``bops`` and ``weight_bytes``. ``reference_sample`` is
        ``(inputs, outputs)``; float outputs are checked with ``sample_tolerance`` (rtol, atol).
        ``tuned``: schedule the kernels with the target's tuning database where it has records
        (:func:`pqcompile.tuning.apply`; the manifest's ``tuning`` says how many).
        ``prepare_params``: what the program computes from the weights alone (unpacking 2/4-bit
        weights) moves to a function run once at load (Relax's ``LiftTransformParams``; the
        manifest's ``prepare`` names it): ``weights.bin`` keeps the packed bytes, each call
        gets the unpacked weights. ``output_keys``: the model returned a dict with these keys,
        one per output; calls then return a dict with the same keys.
        """
        import tvm
        import tvm_ffi

        from .. import __version__  # here: pqcompile/__init__ may import this module first
        from ..lower.build import pipeline
        from ..lower.kernel_types import check_kernel_isa

        spec = get_target(target)
        if not isinstance(mod, tvm.IRModule):
            raise TypeError(f"Artifact.build takes a tvm.IRModule, got {type(mod).__name__}")
        names = [gv.name_hint for gv in mod.get_global_vars()]
        if entry not in names:
            raise ValueError(f"the module has no function {entry!r}; it has {sorted(names)}")
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of name -> numpy array, got "
                            f"{type(params).__name__}")
        func = mod[entry]
        n_inputs = len(func.params) - len(params)
        declared = func.attrs["num_input"] if func.attrs is not None and \
            "num_input" in func.attrs else n_inputs  # Relax's convention for "the rest are weights"
        if n_inputs < 0 or int(declared) != n_inputs:
            raise ValueError(f"{len(params)} params given, so {entry!r} with "
                             f"{len(func.params)} parameters would take {n_inputs} inputs; its "
                             f"num_input attribute says {declared}")
        inputs = tensor_specs(input_specs, [(p.name, p.ty) for p in func.params[:n_inputs]],
                              "input")
        outputs = tensor_specs(output_specs, _flat_outputs(func.ret_ty), "output")
        if output_keys is not None:
            output_keys = [str(k) for k in output_keys]
            if len(output_keys) != len(outputs) or len(set(output_keys)) != len(output_keys):
                raise ValueError(f"output_keys {output_keys} must name each of the "
                                 f"{len(outputs)} outputs once")
        validate_params(params, func.params[n_inputs:], n_inputs)

        tvm_target = spec.tvm_target()
        check_kernel_isa(mod, tvm_target, spec.name)
        prepare = None
        # "the rest are weights": the VM then checks only the inputs on each call (it checked
        # every weight's dtype and shape too: two runtime calls a tensor, ~11% of mobilenet_v2's
        # int8 call on the host); weights are checked here (validate_params), when they are
        # read (the manifest's sha256) and by every kernel's own argument checks
        gv = mod.get_global_var(entry)  # a new module: the caller's stays as it is
        mod = tvm.IRModule({g: (func.with_attr("num_input", n_inputs) if g.same_as(gv)
                                else f) for g, f in mod.functions.items()}, attrs=mod.attrs)
        if prepare_params:
            from tvm import relax

            mod = relax.transform.LiftTransformParams()(mod)
            prepare = f"{entry}_transform_params"
            mod = _with_flat_prepare(mod, prepare)
        scheduled = 0
        if tuned:
            from ..tuning import apply

            mod, scheduled = apply(mod, spec)
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline(tvm_target))
        with tempfile.TemporaryDirectory(prefix="pqcompile-export-") as tmp:
            library = spec.export(executable, Path(tmp) / LIBRARY).read_bytes()
        weights, param_entries = pack_arrays(list(params.items()))
        files = {LIBRARY: library, WEIGHTS: weights}
        sample_meta = None
        if reference_sample is not None:
            sample_meta, files[SAMPLE] = _pack_sample(reference_sample, inputs, outputs,
                                                      sample_tolerance)
        files[RUNNER] = _RUNNER_SOURCE.read_bytes()
        manifest = {
            "format": FORMAT_VERSION,
            "created_with": {
                "pqcompile": __version__, "tvm": tvm.__version__,
                "tvm_ffi": tvm_ffi.__version__, "numpy": np.__version__,
                "host_arch": host_arch(), "linker": spec.cross_compiler or "host default",
            },
            "target": {"name": spec.name, "arch": spec.arch, "tvm_target": str(tvm_target),
                       "spec": spec.to_dict()},
            "library": LIBRARY, "entry": entry, "calling_convention": CALLING_CONVENTION,
            "prepare": prepare,
            "prepare_flat": prepare + FLAT_SUFFIX if prepare else None,
            "inputs": inputs, "outputs": outputs, "output_keys": output_keys,
            "weights_file": WEIGHTS, "byte_order": "little", "params": param_entries,
            "reference_sample": sample_meta,
            "tuning": {"scheduled_kernels": scheduled},
            "layers": json_ready(_layer_list(layers), "layers"),
            "totals": json_ready(_totals(totals), "totals"),
            "extra": json_ready(dict(extra or {}), "extra"),
        }
        return cls(_sealed(manifest, files), files)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Artifact:
        """Read an artifact saved by :meth:`save`, verifying every file's sha256.

        Raises :class:`ArtifactError` naming the file that is missing, modified or corrupted,
        or both format versions when the manifest's is not the one this pqcompile reads.
        """
        try:
            manifest = runner.read_manifest(directory)
            files = runner.read_files(directory, manifest)
        except runner.ArtifactFormatError as err:
            # A version mismatch names its own remedy; damage is repaired from the source.
            hint = "" if "format version" in str(err) else (
                "; copy the artifact directory again from where it was saved, or rebuild it "
                "and save it again")
            raise ArtifactError(f"cannot load the artifact in {directory}: {err}{hint}") from None
        return cls(manifest, files)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the artifact's files into ``directory`` (created if needed); returns its path.

        An existing artifact there is replaced only with ``overwrite=True``; so is written
        into a directory holding other files (the artifact's own names, ``runner.py``
        included, would replace the user's files). The manifest is written last, so an
        interrupted save never looks complete.
        """
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"cannot save the artifact to {path}: it is a file, and an "
                                f"artifact is a directory; pass a new or empty directory path")
        if (path / runner.MANIFEST).exists() and not overwrite:
            raise ArtifactError(f"{path} already holds an artifact; pass overwrite=True to "
                                f"replace it")
        if path.is_dir() and not overwrite and any(path.iterdir()):
            clash = sorted(p.name for p in path.iterdir() if p.name in self._files)
            raise ArtifactError(
                f"{path} holds files and no artifact"
                + (f" (saving would replace {', '.join(clash)})" if clash else "")
                + ": save to a new or empty directory, or pass overwrite=True to write the "
                  "artifact's files there")
        path.mkdir(parents=True, exist_ok=True)
        (path / runner.MANIFEST).unlink(missing_ok=True)
        if SAMPLE not in self._files:
            (path / SAMPLE).unlink(missing_ok=True)  # left by an artifact saved here before
        for name, data in self._files.items():
            (path / name).write_bytes(data)
        (path / runner.MANIFEST).write_text(_dump(self._manifest), encoding="utf-8")
        return path

    # --- running it ---------------------------------------------------------------------------

    def __call__(self, *inputs: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run on this machine; only for an artifact built for this machine's architecture.

        Raises :class:`ArtifactError` (a ``ValueError``) naming the input whose shape or
        dtype is wrong. The inputs are copied into tensors made on the first call and reused
        (allocating fresh ones, page faults included, cost 4-8% of a 2 ms model); calls from
        several threads run one at a time, on the thread count :attr:`thread_policy` picks.
        """
        if self.arch != host_arch():
            raise ArtifactError(
                f"this artifact is for {self.arch} (target {self._manifest['target']['name']!r}) "
                f"and this machine is {host_arch()}: save it and run `python runner.py "
                f"ARTIFACT_DIR` on the device, or run it here under qemu with "
                f"artifact.run_emulated(...)")
        specs = self._manifest["inputs"]
        self._input_signature = self._input_signature or input_signature(specs)
        arrays = exact_inputs(self._input_signature, inputs)  # else checked, converted, refused
        arrays = _checked_inputs(specs, inputs) if arrays is None else arrays
        _refuse_nan(specs, arrays)
        with self._lock:
            vm, params = self._session()
            if not self._inputs:
                self._inputs = runner.to_tensors(arrays)
                self._input_views = [runner.host_view(t) for t in self._inputs]
            else:
                for tensor, view, array in zip(self._inputs, self._input_views, arrays):
                    if view is None:
                        tensor.copyfrom(np.ascontiguousarray(array))
                    else:  # a numpy view of the tensor: ~0.5 us where copyfrom takes ~8
                        np.copyto(view, array)
            entry, args = self._manifest["entry"], self._inputs + params
            outputs = self.thread_policy.run(lambda: runner.run(vm, entry, args))
        return self._shaped(outputs)

    def run_emulated(self, *inputs: np.ndarray, check_sample: bool = False,
                     timeout: float = 900.0) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run with the standalone runner for the artifact's architecture (qemu-user for
        aarch64, natively for this machine's); needs the sysroot of
        ``pqcompile.targets.find_sysroot``. ``check_sample=True`` also checks the reference
        sample there. Slow: importing TVM under qemu takes 10-15 s.

        Raises ``pqcompile.targets.EmulatorError`` with the runner's message when it fails.
        """
        arrays = _checked_inputs(self._manifest["inputs"], inputs)
        _refuse_nan(self._manifest["inputs"], arrays)
        with tempfile.TemporaryDirectory(prefix="pqcompile-emulate-") as tmp:
            root = Path(tmp)
            args = [str(self.save(root / "artifact"))]
            for i, array in enumerate(arrays):
                np.save(root / f"in{i}.npy", array, allow_pickle=False)
                args += ["--input", str(root / f"in{i}.npy")]
            for i in range(len(self._manifest["outputs"])):
                args += ["--output", str(root / f"out{i}.npy")]
            args += ["--check-sample"] if check_sample else []
            run_python(root / "artifact" / RUNNER, args, cwd=root, arch=self.arch,
                       timeout=timeout)
            outputs = [np.load(root / f"out{i}.npy", allow_pickle=False)
                       for i in range(len(self._manifest["outputs"]))]
        return self._shaped(outputs)

    def _shaped(self, outputs: list[np.ndarray]) -> Any:
        """The outputs as the model returned them: a dict with its keys, one array, a tuple."""
        keys = self._manifest.get("output_keys")
        if keys:
            return dict(zip(keys, outputs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _session(self) -> tuple[Any, list[Any]]:
        """The host VM and the weights as TVM tensors, made on first use."""
        if self._vm is None:
            import tvm

            thread_pool_defaults()
            with tempfile.TemporaryDirectory(prefix="pqcompile-lib-") as tmp:
                lib_path = Path(tmp) / LIBRARY
                lib_path.write_bytes(self._files[LIBRARY])
                library = tvm.runtime.load_module(str(lib_path))  # mapped: the file may go
            self._vm = tvm.relax.VirtualMachine(library, tvm.cpu())
            self._params = runner.prepare(self._vm, self._manifest,
                                          runner.to_tensors(self.params.values()))
        return self._vm, self._params

    # --- what it holds ------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest (the module docstring lists the files it describes)."""
        return copy.deepcopy(self._manifest)

    @property
    def arch(self) -> str:
        """CPU architecture the library was built for (``x86_64``, ``aarch64``, ...)."""
        return self._manifest["target"]["arch"]

    @property
    def target(self) -> TargetSpec:
        """The target the artifact was built for."""
        return TargetSpec.from_dict(self._manifest["target"]["spec"])

    @property
    def nbytes(self) -> int:
        """Bytes of the library plus the weights file: what the device must store."""
        return len(self._files[LIBRARY]) + len(self._files[WEIGHTS])

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The weights by name, in calling order (read-only arrays)."""
        entries = self._manifest["params"]
        arrays = runner.read_arrays(self._files[WEIGHTS], entries)
        return {e["name"]: a for e, a in zip(entries, arrays)}

    @property
    def reference_sample(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """``(inputs, outputs)`` stored at build time, or ``None``."""
        meta = self._manifest["reference_sample"]
        if meta is None:
            return None
        blob = self._files[meta["file"]]
        return runner.read_arrays(blob, meta["inputs"]), runner.read_arrays(blob, meta["outputs"])

    def __repr__(self) -> str:
        m = self._manifest
        return (f"Artifact(target={m['target']['name']!r}, arch={self.arch!r}, "
                f"inputs={[i['name'] for i in m['inputs']]}, params={len(m['params'])}, "
                f"nbytes={self.nbytes})")
