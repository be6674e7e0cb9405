"""Exception types raised by pqcompile.

Every error says what went wrong, where (node, op, argument) and what to do about it.
They subclass the built-in exception a caller would expect, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class PQCompileError(Exception):
    """Base class of every pqcompile error."""


class TraceError(PQCompileError, RuntimeError):
    """The model could not be turned into a ``torch.fx`` graph."""


class ExampleInputError(PQCompileError, ValueError):
    """The example inputs do not fit the model."""


class MissingAnnotationError(PQCompileError, KeyError):
    """A pass needed an annotation that no earlier pass provided."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class PipelineError(PQCompileError, ValueError):
    """A pipeline is ordered so that a pass would run before what it requires."""


class UnsupportedOpError(PQCompileError, NotImplementedError):
    """An op has no handling in this pass; the message names the node and the op."""


class ModelError(PQCompileError, TypeError):
    """The model is not an eager ``torch.nn.Module`` (a function, a TorchScript module, ...)."""


class NonFiniteWeightError(PQCompileError, ValueError):
    """A parameter or normalization statistic of the model holds NaN or inf; the message names
    it."""


class DataError(PQCompileError, ValueError):
    """The data is missing where an option needs it, empty, read-once, or its batches do not fit
    the model; the message names the batch (and the failing node)."""


class OptionError(PQCompileError, ValueError):
    """An option has an unknown name or a value outside what it accepts (solver, fine-tuning
    options, bit options, keep levels); the message lists what is accepted."""


class LatencyError(PQCompileError, RuntimeError):
    """Measuring a latency table failed, or a table does not fit the problem it is attached
    to; the message names the layer and what to do."""


class CriterionError(PQCompileError, ValueError):
    """A sensitivity criterion cannot score the model as given (e.g. no gradient reaches a
    layer); the message names the layer or node and what to do."""


class DegenerateSensitivityError(CriterionError):
    """A sensitivity table that cannot rank anything: all zero, non-finite or constant."""


class PQCompileWarning(UserWarning):
    """Base class of the warnings pqcompile issues."""


class FidelityWarning(PQCompileWarning):
    """The compiled model's outputs are far from the float model's on the calibration inputs
    (low SQNR or top-1 agreement); the message says what to try."""


class SolverTimeoutError(PQCompileError, RuntimeError):
    """A solver ran out of time before finding any assignment that meets the budget; the
    message says which limit to raise."""


class BudgetWarning(PQCompileWarning):
    """The compressed model misses its budget (over a limit), or lands far below every limit
    (accuracy given away); the message names the costs and limits."""
