"""Lowering: the integer-exact reference to an integer-only TVM Relax program, and its build.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> from pqcompile.quant import build_reference
>>> gm = trace(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))
>>> ref = build_reference(gm, Assignment.uniform(["_0"], 2, 8), [torch.randn(2, 3, 8, 8)])
>>> mod, params, report = lower(ref)
>>> params["_0.weight"].dtype.name, params["_0.weight"].size  # 108 2-bit weights, 4 a byte
('uint8', 27)
"""

from .build import build, resolve_target, run
from .packing import pack, unpack
from .relax_builder import LoweringReport, lower
from .tvmscript import install as _install_fast_macro_lookup

_install_fast_macro_lookup()  # same parse, without per-frame records (see .tvmscript)

__all__ = ["LoweringReport", "build", "lower", "pack", "resolve_target", "run", "unpack"]
