"""The checks ``pqcompile.compile`` runs on its arguments before the first stage, and the
data helpers the stages share (batches read, checked against the traced model).

Every check raises an error of :mod:`pqcompile.errors` (or a budget/target error) that names
the argument and what to pass instead, so nothing fails after minutes of search.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from numbers import Integral, Real
from typing import Any

import torch

from ..budget import Budget, UnsupportedBudgetError
from ..data import LABEL_KEYS, NamedBatches
from ..errors import DataError, ExampleInputError, NonFiniteWeightError, OptionError
from ..frontend.tracer import check_example_inputs
from ..latency import LatencyTable, check_where
from ..meta import EXAMPLE_INPUTS
from ..solvers import get_solver, list_solvers
from ..solvers.problem import DEFAULT_BIT_OPTIONS, DEFAULT_KEEP_FRACTIONS
from ..solvers.search import needs_context

FINETUNE_KEYS = {"epochs", "lr", "distill", "temperature", "max_batches", "optimizer",
                 "weight_decay", "momentum", "distill_weight", "learn_weight_clip",
                 "max_grad_norm"}
LOWERING_BITS = range(2, 9)  # the weight and activation widths the integer lowering takes
PINNED_BITS = (8, 8)  # the first and last layers' (weight, activation) bits


def read_batches(data: Iterable[Any] | None, n: int,
                 graph: torch.fx.GraphModule) -> list[Any] | None:
    """The first ``n`` batches of ``data`` (``None`` without data), checked against ``graph``."""
    if data is None:
        return None
    batches = list(islice(iter(data), n))
    if not batches:
        raise DataError("data is empty: pass a DataLoader (or iterable) of (inputs, target) "
                        "batches, or data=None for the data-free path")
    check_batches(graph, batches)
    return batches


def batch_inputs(batch: Any) -> torch.Tensor:
    """The input tensor of a one-input batch (a tensor, or the first item of a pair)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"a data batch must be a tensor or an (inputs, target) pair, got "
                    f"{type(batch).__name__}")


def example_from_data(data: Iterable[Any] | None) -> tuple[tuple[torch.Tensor], str]:
    """The first sample of ``data``'s first batch as the example input (batch size 1, the shape
    the compiled program takes), and the sentence the report gives about it."""
    if data is None:
        raise ExampleInputError("example_inputs is required without data: pass a tuple of "
                                "tensors, one per forward() argument (the shape, batch size "
                                "included, is the compiled program's), or data=... whose "
                                "first batch gives it")
    if iter(data) is data:
        raise DataError("data is a read-once iterator, and without example_inputs its first "
                        "batch would be used up: pass a list of batches or a DataLoader")
    batch = next(iter(data), None)
    if batch is None:
        raise DataError("data is empty: pass a DataLoader (or iterable) of (inputs, target) "
                        "batches, or example_inputs")
    if isinstance(data, NamedBatches) and isinstance(batch, tuple) and all(
            isinstance(t, torch.Tensor) and t.dim() for t in batch):
        raw = next(iter(data.data))  # a dict batch: every input it names, one sample each
        if isinstance(raw, Mapping):
            n = len([k for k in raw if k not in LABEL_KEYS])
            example = tuple(t[:1].detach().clone() for t in batch[:n])
            return example, (f"example inputs: the first sample of data's first batch, shapes "
                             f"{[tuple(t.shape) for t in example]}")
    first = batch_inputs(batch)
    if first.dim() == 0 or first.shape[0] == 0:
        raise DataError(f"data's first batch holds inputs of shape {tuple(first.shape)}, with "
                        f"no sample to take the example input from; pass example_inputs")
    example = first[:1].detach().clone()
    return (example,), (f"example input: the first sample of data's first batch, shape "
                        f"{tuple(example.shape)}")


def check_finite(model: torch.nn.Module) -> None:
    """The module's parameters and normalization statistics are all finite."""
    stats = [(name, buf) for name, buf in model.named_buffers()
             if name.rpartition(".")[2] in ("running_mean", "running_var")]
    for kind, named in (("parameter", model.named_parameters()), ("buffer", stats)):
        for name, tensor in named:
            if not tensor.is_floating_point() or tensor.is_meta:
                continue
            bad = ~torch.isfinite(tensor.detach())
            if bad.any():
                path = name.rpartition(".")[0]
                owner = type(model.get_submodule(path)).__name__
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise NonFiniteWeightError(
                    f"{kind} {name!r} ({owner} {path!r}) holds "
                    f"{int(torch.isnan(tensor).sum())} NaN and {int(torch.isinf(tensor).sum())} "
                    f"inf value(s), the first at index {where}: pqcompile needs finite weights; "
                    "load a checkpoint from before training diverged, or re-initialize or "
                    "retrain that layer")


def check_solver(solver: Any, options: Mapping | None) -> Any:
    """The solver object: a registered name built with ``options``, or ``solver`` itself."""
    if isinstance(solver, str):
        if solver not in list_solvers():
            close = difflib.get_close_matches(solver, list_solvers(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"unknown solver {solver!r}.{hint} Registered solvers: "
                              f"{', '.join(list_solvers())} (pqcompile.solvers.list_solvers(); "
                              "add one with pqcompile.solvers.register_solver)")
        return get_solver(solver, **dict(options or {}))
    if not callable(getattr(solver, "solve", None)):
        raise OptionError(f"solver must be a registered name such as 'ilp' or an object with a "
                          f"solve(problem, budget) method, got {type(solver).__name__}")
    return solver


def check_multiple(multiple: Any, spec: Any) -> int:
    """The channel granule: ``multiple``, or the target's when ``None``."""
    if multiple is None:
        return spec.capabilities.channel_multiple
    if isinstance(multiple, bool) or not isinstance(multiple, Integral) or multiple < 1:
        raise OptionError(f"multiple must be a positive int (kept channels are rounded up to a "
                          f"multiple of it) or None for the target's channel_multiple "
                          f"({spec.capabilities.channel_multiple} on {spec.name!r}), got "
                          f"{multiple!r}")
    return int(multiple)


def check_latency(budget: Budget, chosen: Any, solver: Any, spec: Any, table: Any,
                   rpc: Any) -> Any:
    """The latency table to use (loaded when given as a path), after checking that the solver
    bounds latency and that a table can be measured where it will be."""
    if budget.latency_ms is not None and not getattr(chosen, "bounds_latency", False):
        name = getattr(chosen, "name", solver)
        raise UnsupportedBudgetError(
            f"solver {name!r} cannot bound latency_ms: only 'ilp' and 'greedy' read the measured "
            "latency table; pass solver='ilp', or bound bops, weight_bytes or macs instead")
    if isinstance(table, (str, os.PathLike)):
        table = LatencyTable.load(table)
    if table is not None and not isinstance(table, LatencyTable):
        raise OptionError(f"latency_table must be a pqcompile.latency.LatencyTable, the path of "
                          f"one saved with .save(), or None (measured), got "
                          f"{type(table).__name__}")
    if table is not None and table.target != spec.name:
        raise OptionError(f"latency_table was measured for target {table.target!r}, the model "
                          f"is compiled for {spec.name!r}: measure one for {spec.name!r} (or "
                          "pass latency_table=None)")
    if rpc is not None and (budget.latency_ms is None or table is not None):
        raise OptionError("latency_rpc says where compile() measures a latency table, which it "
                          "does only for a budget with latency_ms and no latency_table; drop it")
    if budget.latency_ms is not None and table is None:
        check_where(spec, rpc, "latency_rpc")
    return table


def check_finetune(finetune: Any) -> None:
    if finetune is None:
        return
    if not isinstance(finetune, Mapping):
        raise OptionError(f"finetune must be a dict of options such as {{'epochs': 1, 'lr': "
                          f"1e-3}}, got {type(finetune).__name__}")
    unknown = sorted(map(str, set(finetune) - FINETUNE_KEYS))
    if unknown:
        close = [f"{k!r}: did you mean {m[0]!r}?" for k in unknown
                 if (m := difflib.get_close_matches(k, sorted(FINETUNE_KEYS), n=1))]
        hint = f" ({'; '.join(close)})" if close else ""
        raise OptionError(f"unknown finetune options {unknown}{hint}; known: "
                          f"{sorted(FINETUNE_KEYS)}")


def check_data(data: Any, finetune: Mapping | None, solver: Any) -> None:
    """``data`` is given where an option needs it, and can be read more than once."""
    if data is None:
        if finetune is not None:
            raise DataError("finetune needs data: pass data= (a DataLoader of (inputs, target) "
                            "batches), or finetune=None")
        if needs_context(solver):
            raise DataError(f"solver {getattr(solver, 'name', solver)!r} searches on data: "
                            "pass data= (a DataLoader of (inputs, target) batches), or pick a "
                            "data-free solver such as 'ilp'")
        return
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise DataError(f"data must be an iterable of (inputs, target) batches, such as a "
                        f"DataLoader or a list, got {type(data).__name__}")
    if isinstance(data, Iterator):
        raise DataError(f"data is a {type(data).__name__}, an iterator that can be read only "
                        "once, but compile() reads the data several times (sensitivity, "
                        "calibration, fine-tuning): pass a list of batches or a DataLoader")


def check_bit_options(bit_options: Any, default: Any = None) -> tuple[tuple[int, int], ...]:
    """The pairs given, checked; ``None``: the solver's own default (PIC-PQ's takes every
    weight width of its per-stage rule), else :data:`DEFAULT_BIT_OPTIONS`."""
    if bit_options is None:
        return DEFAULT_BIT_OPTIONS if default is None else check_bit_options(default)
    if isinstance(bit_options, (str, bytes)) or not isinstance(bit_options, Iterable):
        raise OptionError(f"bit_options must be a list of (weight bits, activation bits) "
                          f"pairs such as [(8, 8), (4, 8)], got {bit_options!r}")
    options = list(bit_options)
    if not options:
        raise OptionError("bit_options is empty: give (weight bits, activation bits) pairs "
                          "such as [(8, 8), (4, 8)], or None for the default")
    for option in options:
        if isinstance(option, (str, bytes)) or not isinstance(option, Sequence) \
                or len(option) != 2 or not all(isinstance(b, Integral) and not isinstance(
                    b, bool) and b in LOWERING_BITS for b in option):
            raise OptionError(f"bit_options: {option!r} is not a (weight bits, activation "
                              f"bits) pair of ints in {LOWERING_BITS.start}.."
                              f"{LOWERING_BITS.stop - 1}, the widths the integer lowering "
                              f"takes; e.g. (4, 8)")
    pairs = tuple(sorted({(int(w), int(a)) for w, a in options}))
    if PINNED_BITS not in pairs:
        raise OptionError(f"bit_options {list(pairs)} lack {PINNED_BITS}: the first and last "
                          f"layers are kept at {PINNED_BITS[0]}/{PINNED_BITS[1]} bits; add "
                          f"{PINNED_BITS}")
    return pairs


def check_keep_levels(keep_levels: Any) -> tuple[float, ...]:
    if keep_levels is None:
        return DEFAULT_KEEP_FRACTIONS
    levels = list(keep_levels) if isinstance(keep_levels, Iterable) \
        and not isinstance(keep_levels, (str, bytes)) else None
    if not levels or not all(isinstance(f, Real) and not isinstance(f, bool) and 0 < f <= 1
                             for f in levels):
        raise OptionError(f"keep_levels must be fractions in (0, 1] of each channel group's "
                          f"channels, e.g. (1.0, 0.75, 0.5), got {keep_levels!r}; (1.0,) "
                          "keeps every channel (no pruning)")
    return tuple(float(f) for f in levels)


def check_batches(graph: torch.fx.GraphModule, batches: Sequence[Any]) -> None:
    """Every batch is a tensor or a tuple of tensors (inputs first), and the traced model runs
    on each distinct input shape and dtype (cut to the example inputs' batch size)."""
    examples = EXAMPLE_INPUTS.get(graph).args
    n_inputs = len(examples)
    tried: set[tuple] = set()
    for i, batch in enumerate(batches):
        inputs = (batch,) if isinstance(batch, torch.Tensor) else \
            tuple(batch[:n_inputs]) if isinstance(batch, (tuple, list)) else ()
        if len(inputs) != n_inputs or not all(isinstance(t, torch.Tensor) and t.dim()
                                              for t in inputs):
            got = type(batch).__name__ if not isinstance(batch, (tuple, list)) else \
                f"a {type(batch).__name__} of {[type(t).__name__ for t in batch]}"
            raise DataError(f"data batch {i} is {got}: yield (inputs, target) batches whose "
                            f"first {n_inputs} item(s) are batched input tensors, as a "
                            "DataLoader over a TensorDataset does")
        if graph.meta.get("pqc.shape_specialized") and any(
                tuple(t.shape) != tuple(e.shape) for t, e in zip(inputs, examples)):
            raise DataError(
                f"data batch {i} has inputs of shape "
                f"{[tuple(t.shape) for t in inputs]}; the model was traced for "
                f"{[tuple(e.shape) for e in examples]} exactly (its forward branches on input "
                "shapes, so the trace is specialized to them): give batches of that shape, "
                "e.g. a DataLoader with that batch size and drop_last=True")
        key = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)
        if key in tried:
            continue
        tried.add(key)
        try:
            check_example_inputs(graph, None, tuple(t[:len(e)] if e.dim() else t
                                                    for t, e in zip(inputs, examples)))
        except ExampleInputError as exc:
            where = str(exc).removeprefix("example inputs do not fit the model: ")
            where = where.split(". Give example inputs")[0]
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)
            raise DataError(f"data batch {i} (inputs {shapes}) does not fit the model: {where}. "
                            "Give batches whose inputs have the example inputs' shape (batch "
                            "size aside) and dtype") from exc.__cause__
