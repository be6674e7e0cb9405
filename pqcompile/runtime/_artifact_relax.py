"""The Relax module as an artifact packages it: its named outputs, and the flat prepare
function a TVM RPC client can call (:mod:`pqcompile.runtime.deploy`)."""

from __future__ import annotations

from typing import Any

FLAT_SUFFIX = "_flat"  # the prepare function taking one argument per weight (see deploy)


def _with_flat_prepare(mod: Any, prepare: str) -> Any:
    """``mod`` plus ``{prepare}_flat``: ``prepare`` taking the weights as separate arguments.

    ``prepare`` (Relax's lifted transform) takes one tuple of weights, which a local caller
    passes as a Python list; a TVM RPC client cannot pass a tuple (nor get its items back), so
    a board is handed the weights one argument each (:mod:`pqcompile.runtime.deploy`)."""
    from tvm import relax

    tuple_type = mod[prepare].params[0].ty
    weights = [relax.Var(f"w{i}", ty) for i, ty in enumerate(tuple_type.fields)]
    builder = relax.BlockBuilder(mod)
    with builder.function(prepare + FLAT_SUFFIX, weights):
        made = builder.emit(relax.Call(builder.get().get_global_var(prepare),
                                       [relax.Tuple(weights)]))
        builder.emit_func_output(made)
    return builder.get()


def _flat_outputs(ty: Any) -> list[tuple[str, Any]]:
    """Named tensor types of a function's (possibly nested tuple) return, depth-first."""
    leaves: list[Any] = []
    pending = [ty]
    while pending:
        item = pending.pop()
        fields = getattr(item, "fields", None)
        if fields is not None:
            pending.extend(reversed(list(fields)))
        else:
            leaves.append(item)
    return [(f"output{i}" if len(leaves) > 1 else "output", leaf) for i, leaf in enumerate(leaves)]
