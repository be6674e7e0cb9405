"""pqcompile: joint pruning and mixed-precision quantization of PyTorch models, compiled by TVM.

>>> import torch, pqcompile
>>> gm = pqcompile.trace(torch.nn.Conv2d(3, 8, 3), (torch.randn(1, 3, 8, 8),))
>>> gm = pqcompile.Pipeline([pqcompile.passes.ShapeAnalysis()])(gm).graph_module
"""

from . import meta, passes, targets
from .errors import (DataError, ExampleInputError, MissingAnnotationError, ModelError,
                     NonFiniteWeightError, OptionError, PipelineError, PQCompileError,
                     TraceError, UnsupportedOpError)
from .api import compile
from .budget import Budget, BudgetError, InfeasibleBudgetError
from .frontend import trace
from .passes import Pass, PassContext, PassInfo, PassResult, Pipeline, graph_pass
from .targets import ToolchainError, UnknownTargetError, get_target, list_targets, register_target
from .coverage import check_model
from .artifact import Artifact
from .onnx_export import export_onnx

__version__ = "0.1.0"

__all__ = [
    "Artifact", "Budget", "BudgetError", "InfeasibleBudgetError", "check_model", "compile",
    "DataError", "ExampleInputError", "MissingAnnotationError", "ModelError",
    "NonFiniteWeightError", "OptionError", "Pass", "PassContext", "PassInfo",
    "PassResult", "Pipeline", "PipelineError", "PQCompileError", "ToolchainError", "TraceError",
    "UnknownTargetError", "UnsupportedOpError", "export_onnx", "get_target", "graph_pass", "list_targets",
    "meta", "passes", "register_target", "targets", "trace",
]
