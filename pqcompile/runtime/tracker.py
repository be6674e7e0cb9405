"""Device farms through TVM's RPC tracker: many boards of one kind under one key.

A tracker (``pqcompile tracker --port 9190``, :mod:`tvm.rpc.tracker`) keeps a queue of boards
per key; each board's server registers itself (``pqcompile board --tracker HOST:9190 --key
rpi4`` here, emulated, or ``python rpc_server.py --tracker HOST:9190 --key rpi4`` on the
board), and a client asks the tracker for a free board of a key and gets a session on it.
:func:`pqcompile.runtime.deploy.deploy` takes ``tracker=``/``key=`` instead of a board's address,
and :func:`pqcompile.latency.measure_latency` times its one-layer programs on every free board
of the key at once (one session per board, the programs shared out as boards become free).

>>> parse_tracker("10.0.0.5:9190")
ServerAddress(host='10.0.0.5', port=9190)
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .rpc_client import (
    AddressError,
    DeployError,
    RemoteUnreachableError,
    ServerAddress,
    _first_line,
    parse_address,
)

__all__ = ["TrackerError", "boards", "local_tracker", "parse_tracker", "request", "serve",
           "wait_for_boards"]

TRACKER_HINT = "start one with `pqcompile tracker --port {port}`"


class TrackerError(DeployError):
    """The tracker cannot be reached, or has no board under the key asked for."""


def parse_tracker(tracker: Any) -> ServerAddress:
    """``tracker`` (``"HOST:PORT"``, ``(host, port)`` or a :class:`ServerAddress`) checked."""
    if isinstance(tracker, ServerAddress):
        return tracker
    if isinstance(tracker, tuple) and len(tracker) == 2:
        return ServerAddress(str(tracker[0]), int(tracker[1]))
    try:
        return parse_address(tracker)
    except AddressError as err:
        raise AddressError(str(err).replace("--rpc", "--tracker", 1).replace(
            ":9090", ":9190")) from None


def _session(tracker: ServerAddress, connect_timeout: float = 10.0) -> Any:
    """A connection to the tracker itself (not to a board)."""
    from tvm import rpc

    try:
        socket.create_connection(tuple(tracker), timeout=connect_timeout).close()
    except OSError as err:
        raise TrackerError(f"no RPC tracker answers at {tracker} ({err.strerror or err}): "
                           f"{TRACKER_HINT.format(port=tracker.port)}, then check the host "
                           "and port") from None
    try:
        return rpc.connect_tracker(tracker.host, tracker.port)
    except Exception as err:  # noqa: BLE001 (TVM raises many types; reported, re-raised)
        raise TrackerError(f"{tracker} accepts connections but is no TVM RPC tracker "
                           f"({_first_line(err)}): {TRACKER_HINT.format(port=tracker.port)}"
                           ) from None


def boards(tracker: Any, key: str | None = None) -> dict[str, int]:
    """``{key: boards registered and free}`` on the tracker (one key's entry with ``key``)."""
    address = parse_tracker(tracker)
    summary = _session(address).summary()
    queue = summary.get("queue_info", {})
    counts = {k: int(v.get("free", 0)) for k, v in queue.items()}
    return counts if key is None else {key: counts.get(key, 0)}


def wait_for_boards(tracker: Any, key: str, count: int, timeout: float = 60.0) -> int:
    """Wait until ``count`` boards of ``key`` are free on the tracker; how many are."""
    deadline = time.monotonic() + timeout
    while True:
        free = boards(tracker, key)[key]
        if free >= count or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def request(tracker: Any, key: str, session_timeout: float = 600.0,
            connect_timeout: float = 10.0) -> Any:
    """A session on a free board of ``key`` (waits while all of them are busy); a
    :class:`TrackerError` naming the keys there when none is registered under ``key``."""
    address = parse_tracker(tracker)
    if not key:
        raise TrackerError("a tracker serves boards by key: give key='NAME' (--key NAME), the "
                           "key the boards registered with")
    session = _session(address, connect_timeout)
    queue = session.summary().get("queue_info", {})
    if key not in queue:
        known = ", ".join(sorted(queue)) or "none"
        raise TrackerError(f"the tracker at {address} has no board under key {key!r} (keys "
                           f"there: {known}): register one with `pqcompile board --tracker "
                           f"{address} --key {key}` (or rpc_server.py --tracker ... on a board)")
    try:
        return session.request(key, priority=1, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 (as above)
        raise RemoteUnreachableError(f"the tracker at {address} gave a board of key {key!r} "
                                     f"but no session started there: {_first_line(err)}"
                                     ) from None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def local_tracker(host: str = "127.0.0.1", port: int = 0) -> Iterator[ServerAddress]:
    """A TVM RPC tracker here while the ``with`` block runs (``port=0``: a free one)."""
    from tvm.rpc.tracker import Tracker

    port = port or _free_port(host)
    tracker = Tracker(host, port=port, port_end=port + 1, silent=True)
    try:
        address = ServerAddress(host, tracker.port)
        deadline = time.monotonic() + 30.0
        while True:  # listening once its summary answers
            try:
                boards(address)
                break
            except TrackerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield address
    finally:
        tracker.terminate()


def serve(host: str = "0.0.0.0", port: int = 9190) -> None:
    """Run a tracker on ``host:port`` until interrupted (``pqcompile tracker``)."""
    with local_tracker(host, port) as address:
        print(f"RPC tracker listening on {address}; boards register with `pqcompile board "
              f"--tracker HOST:{address.port} --key NAME`; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("tracker stopped", file=sys.stderr)
