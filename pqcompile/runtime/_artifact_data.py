"""Checks and byte layout behind :mod:`pqcompile.runtime.artifact`: tensor specs, raw array files,
JSON, the manifest's parts (layers, totals, reference sample, checksums) and the checks of run-time
inputs.

>>> blob, entries = pack_arrays([("a", np.ones(3, "int8")), ("b", np.zeros(2, "float32"))])
>>> [(e["name"], e["offset"], e["nbytes"]) for e in entries], len(blob)
([('a', 0, 3), ('b', 64, 8)], 72)
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import PQCompileError
from . import runner

__all__ = ["ALIGNMENT", "ArtifactError", "json_ready", "pack_arrays", "tensor_specs",
           "validate_params"]

SAMPLE = "sample.bin"  # the reference sample's file in an artifact
ALIGNMENT = 64  # bytes; a cache line, and enough for any SIMD load of the weights
_KINDS = "biuf"  # bool, signed and unsigned integers, floats


class ArtifactError(PQCompileError, ValueError):
    """An artifact cannot be loaded, saved or run as asked; the message names the file or the
    reason (a file modified or corrupted after saving, an unsupported format version, a library
    for another architecture)."""


def check_array(array: Any, where: str) -> np.ndarray:
    """``array`` if it is a numpy array of a plain numeric dtype, else ``TypeError``."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{where} must be a numpy array, got {type(array).__name__}")
    if array.dtype.kind not in _KINDS or array.dtype.fields is not None:
        raise TypeError(f"{where} has dtype {array.dtype}; artifacts store bool, integer and "
                        f"float arrays only")
    return array


def pack_arrays(named: Sequence[tuple[str, np.ndarray]]) -> tuple[bytes, list[dict[str, Any]]]:
    """Concatenate the arrays' C-order little-endian bytes, each at an :data:`ALIGNMENT`-byte
    offset (zero padding between); returns the bytes and one manifest entry per array."""
    out = bytearray()
    entries = []
    for name, array in named:
        check_array(array, f"array {name!r}")
        out.extend(bytes(-len(out) % ALIGNMENT))
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entries.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape),
                        "offset": len(out), "nbytes": len(data)})
        out.extend(data)
    return bytes(out), entries


def spec_from_type(name: str, ty: Any) -> dict[str, Any] | None:
    """``{"name", "shape", "dtype"}`` of a Relax tensor type; ``None`` if shape or dtype is
    unknown. Symbolic dimensions become their names."""
    shape, dtype = getattr(ty, "shape", None), str(getattr(ty, "dtype", "") or "")
    if shape is None or not hasattr(shape, "values") or dtype in ("", "void"):
        return None
    dims = [int(d.value) if hasattr(d, "value") else str(d) for d in shape.values]
    return {"name": name, "shape": dims, "dtype": dtype}


def _spec(given: Any, where: str) -> dict[str, Any]:
    if isinstance(given, Mapping):
        name, shape, dtype = given.get("name"), given.get("shape"), given.get("dtype")
    elif isinstance(given, (tuple, list)) and len(given) == 3:
        name, shape, dtype = given
    else:
        raise TypeError(f"{where} must be a dict with name, shape and dtype, or a "
                        f"(name, shape, dtype) tuple; got {given!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: the name must be a non-empty string, got {name!r}")
    try:
        if dtype is None:
            raise TypeError
        dims = [d if isinstance(d, str) else operator.index(d) for d in shape]
        return {"name": name, "shape": dims, "dtype": np.dtype(dtype).name}
    except TypeError:
        raise TypeError(f"{where} ({name!r}): shape must be ints (strings for symbolic "
                        f"dimensions) and dtype a numpy dtype name; got shape {shape!r} and "
                        f"dtype {dtype!r}") from None


def _fits(want: Sequence[Any], shape: Sequence[Any]) -> bool:
    return len(want) == len(shape) and all(
        isinstance(w, str) or isinstance(s, str) or w == s for w, s in zip(want, shape))


def tensor_specs(given: Sequence[Any] | None, derived: Sequence[tuple[str, Any]],
                 what: str) -> list[dict[str, Any]]:
    """The input or output specs: ``given`` checked against the function signature's
    ``(name, type)`` pairs, or those pairs themselves when ``given`` is ``None``."""
    from_types = [spec_from_type(name, ty) for name, ty in derived]
    if given is None:
        unknown = [name for (name, _), spec in zip(derived, from_types) if spec is None]
        if unknown:
            raise ValueError(f"the function signature does not give the shape and dtype of "
                             f"{what}s {unknown}; pass {what}_specs=[{{'name': ..., 'shape': "
                             f"[...], 'dtype': ...}}, ...]")
        return from_types
    if isinstance(given, (str, bytes, Mapping)) or not isinstance(given, Sequence):
        raise TypeError(f"{what}_specs must be a list of specs, got {type(given).__name__}")
    specs = [_spec(s, f"{what}_specs[{i}]") for i, s in enumerate(given)]
    if len(specs) != len(derived):
        raise ValueError(f"{what}_specs has {len(specs)} entries but the function has "
                         f"{len(derived)} {what}s ({[name for name, _ in derived]})")
    for spec, typed in zip(specs, from_types):
        if typed is not None and (spec["dtype"] != typed["dtype"]
                                  or not _fits(spec["shape"], typed["shape"])):
            raise ValueError(f"{what} {spec['name']!r}: {what}_specs says shape "
                             f"{tuple(spec['shape'])} and dtype {spec['dtype']}, the function "
                             f"signature shape {tuple(typed['shape'])} and dtype {typed['dtype']}")
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique, got {names}")
    return specs


def validate_params(params: Mapping[str, np.ndarray], fparams: Sequence[Any],
                    n_inputs: int) -> None:
    """Check that ``params`` match, in order, the function parameters after the inputs."""
    names = [p.name for p in fparams]
    for k, ((name, array), fparam) in enumerate(zip(params.items(), fparams)):
        if not isinstance(name, str):
            raise TypeError(f"params keys must be strings, got {name!r}")
        check_array(array, f"params[{name!r}]")
        typed = spec_from_type(fparam.name, fparam.ty)
        if typed is None or (typed["dtype"] == array.dtype.name
                             and _fits(typed["shape"], array.shape)):
            continue
        hint = ""
        if name in names and names.index(name) != k:
            hint = (f"; the function takes {name!r} as parameter #{n_inputs + names.index(name)}:"
                    f" give params in the function's parameter order")
        raise ValueError(f"params[{name!r}] is passed as parameter #{n_inputs + k} "
                         f"({fparam.name!r}), which has shape {tuple(typed['shape'])} and dtype "
                         f"{typed['dtype']}; got shape {array.shape} and dtype "
                         f"{array.dtype}{hint}")


def json_ready(value: Any, where: str) -> Any:
    """A copy of ``value`` that ``json.dumps`` writes the same way every time: numpy scalars
    and arrays become numbers and lists, tuples lists, dataclasses dicts; keys become strings."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v, f"{where}[{k!r}]") for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return json_ready({k: getattr(value, k) for k in value.__dataclass_fields__}, where)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}, which JSON cannot store; use null or a number")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where} is of type {type(value).__name__}, which the manifest cannot "
                    f"store; use numbers, strings, lists and dicts")


def _checked_inputs(specs: list[dict[str, Any]], inputs: Sequence[Any]) -> list[np.ndarray]:
    """The inputs as numpy arrays; :class:`ArtifactError` naming the first that does not match
    the manifest, with the shape and dtype it needs."""
    arrays = [np.asarray(a) for a in inputs]
    try:
        runner.check_inputs(specs, arrays)
    except ValueError as err:
        hint = ("pass one array per input, in that order" if len(arrays) != len(specs) else
                "convert the array to that dtype, or compile again with example inputs of "
                "the shape to run (shapes, batch size included, are fixed when compiling)")
        raise ArtifactError(f"{err}; {hint}") from None
    return arrays


def input_signature(specs: list[dict[str, Any]]) -> list[tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` of each input when every dimension is fixed, else ``[]``."""
    if not all(isinstance(d, int) for s in specs for d in s["shape"]):
        return []
    return [(tuple(s["shape"]), np.dtype(s["dtype"])) for s in specs]


def exact_inputs(signature: list[tuple[tuple[int, ...], np.dtype]], inputs: Sequence[Any]
                 ) -> Sequence[np.ndarray] | None:
    """``inputs`` when they are numpy arrays of exactly ``signature``'s shapes and dtypes (every
    call of a serving loop), checked in ~0.3 us; ``None`` for anything else, which
    :func:`_checked_inputs` then converts or refuses with its message."""
    if not signature or len(inputs) != len(signature):
        return None
    for array, (shape, dtype) in zip(inputs, signature):
        if type(array) is not np.ndarray or array.shape != shape or array.dtype != dtype:
            return None
    return inputs


def _refuse_nan(specs: list[dict[str, Any]], arrays: Sequence[np.ndarray]) -> None:
    """:class:`ArtifactError` naming the first float input holding NaN: quantizing it gives an
    arbitrary integer (the same as +inf here), so the output would look valid and mean
    nothing."""
    bad = runner.nan_input(specs, arrays)
    if bad is not None:
        raise ArtifactError(f"input {bad!r} holds NaN, which has no quantized value (the "
                            f"program would give a finite, meaningless output); replace or "
                            f"drop the NaN values before calling (e.g. np.nan_to_num)")


def _pack_sample(sample: Any, inputs: list[dict], outputs: list[dict],
                 tolerance: tuple[float, float]) -> tuple[dict[str, Any], bytes]:
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise TypeError("reference_sample must be (inputs, outputs): sequences of numpy arrays")
    ins, outs = sample
    ins = [ins] if isinstance(ins, np.ndarray) else list(ins)
    outs = [outs] if isinstance(outs, np.ndarray) else list(outs)
    runner.check_inputs(inputs, ins, "reference_sample input")
    runner.check_inputs(outputs, outs, "reference_sample output")
    rtol, atol = (float(t) for t in tolerance)
    blob, entries = pack_arrays([(s["name"], a) for s, a in zip(inputs + outputs, ins + outs)])
    meta = {"file": SAMPLE, "inputs": entries[:len(ins)], "outputs": entries[len(ins):],
            "rtol": rtol, "atol": atol}
    return meta, blob


def _layer_list(layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of dicts, got {type(layers).__name__}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping) or not isinstance(layer.get("name"), str):
            raise TypeError(f"layers[{i}] must be a dict with a 'name' string, got {layer!r}")
    return [dict(layer) for layer in layers]


def _totals(totals: Any) -> dict[str, Any] | None:
    if totals is None:
        return None
    if hasattr(totals, "__dataclass_fields__"):  # e.g. pqcompile.meta.CostTotals
        totals = {name: getattr(totals, name) for name in totals.__dataclass_fields__}
    if not isinstance(totals, Mapping):
        raise TypeError(f"totals must be a dict or CostTotals, got {type(totals).__name__}")
    missing = [k for k in ("macs", "bops", "weight_bytes") if k not in totals]
    if missing:
        raise ValueError(f"totals lacks {missing}; give at least macs, bops and weight_bytes "
                         f"(pqcompile.meta.CostTotals has them)")
    return dict(totals)


def _dump(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=True) + "\n"


def _sealed(manifest: dict[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    """The manifest with the files' checksums and its own integrity checksum added."""
    manifest["files"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data)}
                         for name, data in files.items()}
    manifest["integrity"] = runner.manifest_sha256(manifest)
    return manifest
