"""A TVM RPC server for the board that runs ``pqcompile deploy``'s artifacts; needs only TVM.

It serves in this process (the session still forks per connection), unlike
``python -m tvm.exec.rpc_server``, which re-executes the interpreter: that fails under qemu-user
with ``Exec format error``, and fork is also what keeps a session that crashes from taking the
server down. It also answers ``pqcompile.rpc_server.device_info`` (machine, system, CPUs, Python,
TVM and numpy versions), which ``pqcompile deploy`` reports and checks the artifact's
architecture against before uploading. Imports only the standard library and ``tvm``, so the
file can be copied to a board that has TVM and numpy and nothing else::

    python rpc_server.py --host 0.0.0.0 --port 9090      # on the board
    pqcompile deploy ARTIFACT_DIR --rpc BOARD:9090       # on the build machine

Where pqcompile is installed, ``python -m pqcompile.runtime.rpc_server`` does the same (that form
imports the pqcompile package first, and with it torch). ``--port 0`` takes any free port. The line
``listening on HOST:PORT`` goes to stdout, flushed, once the socket accepts connections.

With ``--tracker HOST:PORT --key NAME`` the server registers with a TVM RPC tracker
(``pqcompile tracker --port 9190``) under that key, and clients reach it through the tracker:
a farm of boards of one kind under one key (``pqcompile deploy DIR --tracker HOST:9190 --key
NAME``); ``--name`` is what ``device_info`` calls this board (default ``NODE:PORT``).

Anyone who reaches the port can run code on the machine: serve on a trusted network only.
"""

import sys
from pathlib import Path

if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # run as a script: the package's own modules must not shadow installed ones

import argparse
import json
import multiprocessing
import os
import platform
import socket

# the name a board registers device_info under: a protocol name, not the module's path
INFO_FUNCTION = "pqcompile.rpc_server.device_info"
LISTENING = "listening on"
BOARD_ENV = "PQCOMPILE_BOARD_NAME"


def device_info():
    """What this machine is, as a JSON string: arch, system, CPUs and library versions."""
    import tvm

    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return json.dumps({"machine": platform.machine(), "system": platform.system(),
                       "release": platform.release(), "node": platform.node(),
                       "cpu_count": os.cpu_count(), "python": platform.python_version(),
                       "board": os.environ.get(BOARD_ENV, platform.node()),
                       "tvm": tvm.__version__, "numpy": numpy_version})


def parse_tracker(text):
    """``(host, port)`` of ``--tracker HOST:PORT``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"error: --tracker {text!r}: expected HOST:PORT, e.g. 10.0.0.5:9190")
    return host, int(port)


def serve(host="0.0.0.0", port=9090, key="", silent=False, tracker=None, name=None):
    """Listen on ``host:port`` (0: any free port) and serve RPC sessions until killed;
    with ``tracker`` (``(host, port)``) registered there under ``key``."""
    import tvm
    from tvm.rpc import server

    # Sessions fork from this process; spawning would re-execute the interpreter (see above).
    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    tvm.register_global_func(INFO_FUNCTION, device_info, override=True)
    if silent:
        server.logger.setLevel("ERROR")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {err}; pick another --port "
                         f"(0 takes any free one)") from None
    sock.listen(1)
    bound = sock.getsockname()[1]
    os.environ[BOARD_ENV] = name or f"{platform.node()}:{bound}"
    if tracker is not None and not key:
        raise SystemExit("error: --tracker needs --key: the name clients ask the tracker for")
    print(f"{LISTENING} {host}:{bound}", flush=True)
    # pylint: disable-next=protected-access
    server._listen_loop(sock, bound, key, tracker, None, None)


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on "
                        "(default 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=9090, help="0: any free port")
    parser.add_argument("--key", default="", help="only clients giving this key are served")
    parser.add_argument("--silent", action="store_true", help="log errors only")
    parser.add_argument("--tracker", metavar="HOST:PORT", help="register with this TVM RPC "
                        "tracker under --key")
    parser.add_argument("--name", help="this board's name in device_info (default NODE:PORT)")
    args = parser.parse_args(argv)
    tracker = parse_tracker(args.tracker) if args.tracker else None
    try:
        serve(args.host, args.port, args.key, args.silent, tracker, args.name)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
