"""Faster TVMScript parsing of the hand-scheduled kernels: the macro call's parser lookup.

Every ``T.macro`` call met while parsing a kernel (:mod:`pqcompile.lower.tir_macros`: row
copies, epilogues, dot products) looks for the active parser in the globals of its callers.
TVM's ``ScriptMacro._find_parser_def`` does that with ``inspect.getouterframes``, which builds
a ``FrameInfo`` for every frame of the stack -- reading source lines and scanning
``sys.modules`` for each frame's module -- before it looks at the first one. In a large
program (DenseNet-201: ~100 distinct 1x1 conv kernels, ~10 macro calls each) this was ~70% of
the parse time. :func:`install` replaces it with the same search over ``frame.f_back``:
the same frames, in the same order, the same result, none of the frame records.
"""

from __future__ import annotations

import inspect

_installed = False


def _find_parser_def(self):
    from tvm.script.parser.core.parser import ScriptMacro

    name = ScriptMacro.parser_object_name
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{name} not available")


def install() -> None:
    """Use :func:`_find_parser_def` for TVMScript macros (idempotent; a TVM without the
    method keeps its own)."""
    global _installed
    if _installed:
        return
    from tvm.script.parser.core.parser import ScriptMacro

    if callable(getattr(ScriptMacro, "_find_parser_def", None)) and \
            isinstance(getattr(ScriptMacro, "parser_object_name", None), str):
        ScriptMacro._find_parser_def = _find_parser_def
    _installed = True
