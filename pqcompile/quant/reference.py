"""``build_reference``: the integer-exact fake-quant reference of a traced float graph.

The reference is a ``torch.fx.GraphModule`` called like the model (float in, float out). Inside,
tensors hold integers (float64) and every op does exactly what the compiled program does (see
:mod:`pqcompile.quant` for the scheme). Its nodes keep the source node names and carry
``QPARAMS`` (every quantized tensor), ``WEIGHT_QUANT``, ``REQUANT``, ``BITS`` and
``FUSED_ACTIVATION`` (compute layers); ``FLOAT_OPS`` on the graph lists the ops left in float.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
>>> gm = trace(model, (torch.randn(1, 3, 8, 8),))
>>> ref = build_reference(gm, Assignment.uniform(["_0"], 4, 8), [torch.randn(2, 3, 8, 8)])
>>> ref(torch.randn(1, 3, 8, 8)).shape
torch.Size([1, 4, 6, 6])
>>> QPARAMS.get(next(n for n in ref.graph.nodes if n.name == "_0")).signed
False
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from ..assignment import Assignment, check_graph_and_assignment
from ..frontend.attention import decompose_sdpa
from ..meta import (
    EXAMPLE_INPUTS,
    FLOAT_OPS,
    KEPT_CHANNELS,
    QPARAMS,
    REQUANT,
    SHAPE,
    SOURCE_MODEL,
    WEIGHT_QUANT,
    QParams,
)
from ..passes.base import TRACE_PROVIDES, mark_provided, provided_keys
from .builder import _Builder
from .calibrate import capture, check_batches, observe
from .observers import Observer, grid, make_observer
from .plan import Plan, make_plan, residual_sums
from .qmodules import Dequantize


def _needed_values(gm: torch.fx.GraphModule, plan: Plan) -> set[str]:
    """Constant and shape-valued nodes that float ops (or verbatim ops) read."""
    out = set()
    for n in gm.graph.nodes:
        if plan.kind[n.name] in ("float", "view", "identity", "meta", "split", "mask",
                                 "inlined"):
            out |= {a.name for a in n.all_input_nodes if plan.kind[a.name] in ("const", "meta")}
    return out


def build_reference(gm: torch.fx.GraphModule, assignment: Assignment,
                    calib_batches: Iterable[Any],
                    observer: str | Callable[[], Observer] = "minmax", *,
                    activation_amax: Mapping[str, float] | None = None,
                    residual_bits: int = 8) -> torch.fx.GraphModule:
    """Calibrate ``gm`` (BN folded) on ``calib_batches`` and build its integer-exact reference.

    ``assignment`` gives weight and activation bits (2..8) per conv/linear node; layers it does
    not name stay in float (and are listed in ``FLOAT_OPS``). ``observer`` is ``"minmax"``,
    ``"percentile"``, ``"mse"`` or a callable returning an
    :class:`~pqcompile.quant.observers.Observer`.

    ``activation_amax`` fixes the clipping range of some quantized tensors instead of observing
    it: ``{node name: amax}``, keyed by the node that produces the tensor (a root: the input,
    a conv/linear, add, cat, average pool or float op; ``scale = amax / qmax``), e.g. the
    ranges learned by :func:`pqcompile.finetune.qat_finetune`. The other tensors are calibrated.

    Each ``scaled_dot_product_attention`` call is decomposed first
    (:func:`pqcompile.frontend.attention.decompose_sdpa`): its two products are integer, its
    softmax a float op.

    ``residual_bits`` (8..16): the width of integer sums (``add``) that no conv/linear layer
    reads, e.g. a transformer's residual stream before each LayerNorm (int16 above 8 bits):
    the accumulating residual carries outlier channels that one 8-bit scale cannot hold.
    """
    check_graph_and_assignment(gm, assignment, "build_reference")
    if assignment.masks and KEPT_CHANNELS.name not in provided_keys(gm):
        raise ValueError(
            f"the assignment prunes channel groups {sorted(assignment.masks)[:5]} but the graph "
            "was not pruned: run PruneChannels(assignment.masks) on it first (after "
            "ShapeAnalysis and ChannelGroupAnalysis)")
    example = EXAMPLE_INPUTS.get(gm).args
    work = copy.deepcopy(gm)  # the caller's graph is never annotated or changed
    with torch.no_grad():
        ShapeProp(work).propagate(*example)
        if decompose_sdpa(work):  # integer products around a float softmax
            ShapeProp(work).propagate(*example)
    plan = make_plan(work, assignment)
    if not 8 <= residual_bits <= 16:
        raise ValueError(f"residual_bits must be in 8..16, got {residual_bits}")
    for r in residual_sums(work, plan):
        plan.bits[r] = residual_bits
    batches = check_batches(work, calib_batches)
    factory = make_observer(observer)
    roots = [r for r, k in plan.kind.items() if r in plan.bits]
    fixed = _fixed_amax(activation_amax, roots, plan)
    observers = {plan.observe_at(r): factory() for r in roots if r not in fixed}
    observe(work, batches, observers)
    qp = {}
    for r in roots:
        signed, bits = plan.signed[r], plan.bits[r]
        if r in fixed:
            qp[r] = QParams(fixed[r] / grid(bits, signed)[1], bits, signed)
            continue
        obs = observers[plan.observe_at(r)]
        try:
            qp[r] = QParams(obs.scale(bits, signed), bits, signed)
        except ValueError as exc:
            raise ValueError(f"calibrating node {r!r} ({plan.op[r]}): {exc}") from exc
    builder = _Builder(work, plan, qp, capture(work, _needed_values(work, plan)), assignment)
    builder.run()
    ref = torch.fx.GraphModule(builder.root, builder.graph, "QuantizedReference")
    ref.meta[EXAMPLE_INPUTS.name] = EXAMPLE_INPUTS.get(gm)
    ref.meta[SOURCE_MODEL.name] = SOURCE_MODEL.find(gm, type(gm).__name__)
    FLOAT_OPS.set(ref, tuple(builder.float_ops))
    with torch.no_grad():
        ShapeProp(ref).propagate(*example)
    mark_provided(ref, TRACE_PROVIDES + (SHAPE, QPARAMS, WEIGHT_QUANT, REQUANT, FLOAT_OPS))
    return ref


def _fixed_amax(amax: Mapping[str, float] | None, roots: list[str], plan: Plan
                ) -> dict[str, float]:
    if amax is None:
        return {}
    if not isinstance(amax, Mapping):
        raise TypeError(f"activation_amax must be a dict {{node name: amax}}, got "
                        f"{type(amax).__name__}")
    out = {}
    for name, value in amax.items():
        if name not in plan.kind:
            raise ValueError(f"activation_amax names {name!r}, which is not a node of the graph; "
                             f"quantized tensors are named by the nodes producing them: "
                             f"{roots[:6]}")
        if name not in roots:
            root = plan.root.get(name)
            hint = f"; it shares the tensor of {root!r}: give that name" if root else ""
            raise ValueError(f"activation_amax names {name!r} ({plan.op.get(name, '?')}), which "
                             f"does not produce a quantized tensor of its own{hint}")
        v = float(value)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"activation_amax[{name!r}] must be a positive finite number, got "
                             f"{value!r}")
        out[name] = v
    return out


def fake_quant_view(ref: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``ref`` computing the standard float fake-quant view (float32 throughout).

    It differs from the integer-exact reference by float rounding and by the fixed-point
    multipliers: at most 1 LSB per requantizing op.
    """
    view = copy.deepcopy(ref)
    for m in view.modules():
        if hasattr(m, "fake"):
            m.fake = True
    return view


def integer_outputs(ref: torch.fx.GraphModule, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``ref`` and return its output integers (int64), before dequantization."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in ref.named_children():
        if isinstance(m, Dequantize):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0])))
    try:
        with torch.no_grad():
            ref(*inputs)
    finally:
        for h in hooks:
            h.remove()
    order = [n.target for n in ref.graph.nodes
             if n.op == "call_module" and isinstance(ref.get_submodule(n.target), Dequantize)]
    return [seen[name].round().to(torch.int64) for name in order]
