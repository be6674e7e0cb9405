"""The cache of measured one-layer latencies (:mod:`pqcompile.latency`): ``latency.json`` per
target, keyed by the device that ran a program, a fingerprint of the code and tuning records
that built it, and its shape."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..targets import TargetSpec

__all__ = ["CACHE_FILE", "FORMAT_VERSION", "cache_path"]

FORMAT_VERSION = 1
CACHE_FILE = "latency.json"
_ROOT = Path(__file__).resolve().parents[1]  # the pqcompile package


def cache_path(target: Any, directory: str | os.PathLike | None = None) -> Path:
    """Where ``target``'s figures are cached: ``latency.json`` in ``directory``, by default its
    tuning database folder (:func:`pqcompile.tuning.database_dir`)."""
    from ..tuning import database_dir

    return database_dir(target, directory) / CACHE_FILE


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """The lowering and quantization code and TVM's version, read once per process: the code
    this process builds with (an edit made after it started applies to the next one)."""
    import tvm

    digest = hashlib.sha256(f"tvm {tvm.__version__}".encode())
    for sub in ("lower", "quant"):
        for path in sorted((_ROOT / sub).glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _fingerprint(spec: TargetSpec) -> str:
    """What the figures depend on besides the shape: the code (:func:`_code_fingerprint`) and
    the tuning records the build applies (the target's database)."""
    from ..tuning import database_dir

    digest = hashlib.sha256(_code_fingerprint().encode())
    records = database_dir(spec) / "records.json"
    if records.exists():
        st = records.stat()
        digest.update(f"records {st.st_size} {st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, new: Mapping[str, Any]) -> None:
    """Merge ``new`` into the file (re-read first: another process may have added some)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {**_read_cache(path), **new}
    fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": FORMAT_VERSION, "entries": entries}, f, indent=0, sort_keys=True)
    os.replace(tmp, path)
