"""The command line's device-farm parts: ``pqcompile tracker`` and the board's tracker flags.

``pqcompile tracker --port 9190`` runs a TVM RPC tracker; ``pqcompile board --tracker
HOST:9190 --key NAME [--name BOARD]`` registers a board (this machine's server, or an emulated
one) with it; ``deploy`` and ``compile`` reach the boards with ``--tracker HOST:PORT --key
NAME`` (:mod:`pqcompile.runtime.tracker`). Imports nothing heavy: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_board_flags", "add_tracker_parser", "board_flags"]


def add_board_flags(parser: argparse.ArgumentParser) -> None:
    """``board``'s ``--tracker``, ``--key`` and ``--name``."""
    parser.add_argument("--tracker", metavar="HOST:PORT", help="register with this TVM RPC "
                        "tracker (pqcompile tracker) under --key")
    parser.add_argument("--key", default="", help="the key clients ask the tracker for (one "
                        "per kind of board, e.g. rpi4)")
    parser.add_argument("--name", help="this board's name in its description (default "
                        "NODE:PORT)")


def board_flags(args: argparse.Namespace) -> list[str]:
    """``board``'s tracker flags as ``rpc_server.py`` takes them."""
    if args.tracker and not args.key:
        raise ValueError("--tracker needs --key NAME: the key clients ask the tracker for")
    flags = ["--tracker", args.tracker] if args.tracker else []
    flags += ["--key", args.key] if args.key else []
    return flags + (["--name", args.name] if args.name else [])


def _tracker(args: argparse.Namespace) -> int:
    from .runtime.tracker import serve

    serve(args.host, args.port)
    return 0


def add_tracker_parser(sub: Any) -> None:
    """The ``tracker`` subcommand."""
    t = sub.add_parser("tracker", help="a TVM RPC tracker: boards register under a key, "
                       "deploy and latency tables ask it for free ones")
    t.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every "
                   "interface, for boards on the network)")
    t.add_argument("--port", type=int, default=9190, help="port (default 9190)")
    t.set_defaults(func=_tracker)
