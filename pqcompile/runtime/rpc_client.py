"""Connecting to a board's TVM RPC server: addresses, sessions, the board's description, and
the errors :mod:`pqcompile.runtime.deploy` and :mod:`pqcompile.latency` raise about them.

>>> parse_address("192.168.1.20:9090")
ServerAddress(host='192.168.1.20', port=9090)
>>> str(parse_address("[::1]:9090"))
'[::1]:9090'
"""

from __future__ import annotations

import json
import socket
from typing import Any, NamedTuple

from . import rpc_server
from ..errors import PQCompileError
from ..targets.base import arch_from_triple

__all__ = ["AddressError", "DeployError", "RemoteLoadError", "RemoteUnreachableError",
           "ServerAddress", "parse_address"]

BOARD_SERVER_HINT = ("start one on the board with `python -m tvm.exec.rpc_server --host 0.0.0.0 "
                     "--port {port}` (or copy pqcompile/runtime/rpc_server.py there and run "
                     "`python rpc_server.py --port {port}`); without a board, `pqcompile board "
                     "--emulate aarch64 --port {port}` runs an emulated aarch64 one here "
                     "(qemu-user)")


class DeployError(PQCompileError, RuntimeError):
    """Deploying an artifact over RPC failed; the message names the step and what to do."""


class AddressError(DeployError, ValueError):
    """An RPC address is not ``HOST:PORT``."""


class RemoteUnreachableError(DeployError):
    """Nothing that speaks TVM RPC answers at the address."""


class RemoteLoadError(DeployError):
    """The board cannot load or run the artifact's library (most often: another architecture)."""


class ServerAddress(NamedTuple):
    """Where an RPC server listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"



def parse_address(text: str) -> ServerAddress:
    """``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) as a :class:`ServerAddress`.

    Raises :class:`AddressError` saying what is wrong.
    """
    if not isinstance(text, str):
        raise AddressError(f"an RPC address must be a 'HOST:PORT' string, got "
                           f"{type(text).__name__}")
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address needs brackets: [::1]:9090
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"--rpc {text!r}: expected HOST:PORT with a port in 1..65535, e.g. "
                           f"192.168.1.20:9090 or [fe80::1]:9090")
    return ServerAddress(host, int(port_text))


def _connect(address: ServerAddress, key: str, session_timeout: float,
             connect_timeout: float) -> Any:
    """An RPC session; :class:`RemoteUnreachableError` naming the address when there is none."""
    from tvm import rpc

    hint = BOARD_SERVER_HINT.format(port=address.port)
    try:  # a plain TCP probe first: it fails fast and says why (TVM's connect may hang)
        socket.create_connection(tuple(address), timeout=connect_timeout).close()
    except OSError as err:
        raise RemoteUnreachableError(
            f"no RPC server answers at {address} ({err.strerror or err}): {hint}, then check "
            f"the host name, the port and any firewall between here and the board") from None
    try:
        return rpc.connect(address.host, address.port, key=key, session_timeout=session_timeout)
    except Exception as err:  # noqa: BLE001 (TVM raises many types; reported, re-raised)
        raise RemoteUnreachableError(
            f"{address} accepts connections but no TVM RPC session starts there "
            f"({_first_line(err)}): is it a TVM RPC server, and does its --key match "
            f"{key!r}? Otherwise {hint}") from None


def _remote_info(remote: Any) -> dict[str, Any] | None:
    """The board's description from ``pqcompile.runtime.rpc_server``; ``None`` from other
    servers."""
    try:
        describe = remote.get_function(rpc_server.INFO_FUNCTION)
    except Exception:  # noqa: BLE001 (AttributeError: a server without the function)
        return None
    try:
        info = json.loads(str(describe()))
    except (ValueError, RuntimeError):
        return None
    return info if isinstance(info, dict) else None


def _check_arch(info: dict[str, Any], arch: str, target: str, address: ServerAddress) -> None:
    machine = str(info.get("machine", ""))
    try:
        remote_arch = arch_from_triple(machine)
    except ValueError:
        return  # an architecture pqcompile does not know; the library load will tell
    if remote_arch != arch:
        raise RemoteLoadError(
            f"the RPC server at {address} runs on {machine} and the artifact's library is for "
            f"{arch} (target {target!r}): it cannot load there. Compile for the board's "
            f"architecture (e.g. --target arm for a 64-bit Arm board) or deploy to a server on "
            f"an {arch} machine")


def _first_line(err: BaseException) -> str:
    """The gist of a (possibly multi-line, traceback-carrying) TVM error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("File ", "at ", "Traceback", "^", "~"))]
    return (useful or lines or [type(err).__name__])[-1][:500]
