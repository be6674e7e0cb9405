"""pqcompile: joint pruning and mixed-precision quantization of PyTorch models, compiled by TVM.

>>> import torch, pqcompile
>>> gm = pqcompile.trace(torch.nn.Conv2d(3, 8, 3), (torch.randn(1, 3, 8, 8),))
>>> gm = pqcompile.Pipeline([pqcompile.passes.ShapeAnalysis()])(gm).graph_module
"""

from importlib import import_module
from typing import Any

# Imported on first use (PEP 562), so that `pqcompile --help` and the command line's argument
# errors do not pay for importing torch and TVM: exported name -> the module defining it.
_EXPORTS = {
    **dict.fromkeys(["DataError", "ExampleInputError", "MissingAnnotationError", "ModelError",
                     "NonFiniteWeightError", "OptionError", "PipelineError", "PQCompileError",
                     "TraceError", "UnsupportedOpError"], ".errors"),
    "compile": ".api",
    **dict.fromkeys(["Budget", "BudgetError", "InfeasibleBudgetError"], ".budget"),
    "trace": ".frontend.tracer",
    **dict.fromkeys(["Pass", "PassContext", "PassInfo", "PassResult", "Pipeline",
                     "graph_pass"], ".passes"),
    **dict.fromkeys(["ToolchainError", "UnknownTargetError", "get_target", "list_targets",
                     "register_target"], ".targets"),
    **dict.fromkeys(["get_pipeline", "list_pipelines", "register_pipeline"], ".pipeline"),
    "check_model": ".coverage",
    "Artifact": ".runtime.artifact",
    "export_onnx": ".export.onnx_export",
}
_SUBMODULES = ("meta", "passes", "pipeline", "targets")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    elif name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
    else:
        raise AttributeError(f"module 'pqcompile' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


__version__ = "0.1.0"

__all__ = [
    "Artifact", "Budget", "BudgetError", "InfeasibleBudgetError", "check_model", "compile",
    "DataError", "ExampleInputError", "MissingAnnotationError", "ModelError",
    "NonFiniteWeightError", "OptionError", "Pass", "PassContext", "PassInfo",
    "PassResult", "Pipeline", "PipelineError", "PQCompileError", "ToolchainError", "TraceError",
    "UnknownTargetError", "UnsupportedOpError", "export_onnx", "get_pipeline", "get_target",
    "graph_pass", "list_pipelines", "list_targets", "register_pipeline", "pipeline",
    "meta", "passes", "register_target", "targets", "trace",
]
