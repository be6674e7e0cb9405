"""GPTQ weight rounding (Frantar et al. 2022, "OPTQ"): one-shot second-order rounding of the
conv/linear weights of a compressed graph onto the scheme's grid, from calibration inputs.

Nearest rounding puts every weight on its closest grid point independently. GPTQ rounds the
columns (input features) of a layer one at a time and spreads each column's rounding error
over the columns not yet rounded, weighted by the inverse Hessian ``H = 2 X X^T`` of the
layer's inputs ``X`` (im2col patches for a conv, :func:`torch.nn.functional.unfold`; rows for
a linear; one ``H`` per group of a grouped or depthwise conv), so that the layer's *output*
``W X`` moves as little as the grid allows. ``H`` and its Cholesky factor are float64,
dampened by ``damp`` times the mean of its diagonal; columns go in blocks of ``block`` with
lazy updates; ``act_order`` takes columns by decreasing ``diag(H)``.

The grid is the scheme's (:mod:`pqcompile.quant.qparams`): per output channel, symmetric narrow
range, ``q = clamp(floor(w / s + 0.5), -qmax, qmax)``, the step ``s[c] = r[c] / qmax`` fixed up
front from the channel's range ``r[c]``: its largest ``|w[c]|`` (``clip="max"``) or the MSE-
optimal clip (``clip="mse"``, :func:`pqcompile.fakequant.mse_clip`). The rounded weights are
written back as ``float32(q * s)`` with ``max |q[c]| = qmax`` in every live channel: each
channel's largest original weight is pinned to ``+-qmax`` (its rounding error is spread like any
other), because a channel that lost its ``qmax`` element would be re-scaled by the reference
and land off GPTQ's integers. So :func:`~pqcompile.quant.qparams.quantize_weight` re-derives
exactly ``s`` and ``q``. Dead channels (range below 2^-16 of the layer's largest, which the
scheme stores as zeros) are left out. The one way the program's integers can still differ is
the bias floor (a channel whose bias needs a larger step than ``s``), which binds only on dead
channels in practice; :func:`stored_mismatches` counts such channels.

Layers are rounded in graph order on inputs that come from the already-rounded layers before
them (``sequential``; the graph runs once, node by node over all calibration batches).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..assignment import Assignment
from ..errors import OptionError
from ..meta import EXAMPLE_INPUTS
from .plan import make_plan
from .qparams import REL_SCALE_FLOOR, quantize_weight, weight_qmax

__all__ = ["ROUNDINGS", "GptqOptions", "LayerRounding", "check_weight_rounding", "gptq_round",
           "gptq_rows", "layer_hessian", "round_layer", "stored_mismatches"]

ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class GptqOptions:
    """GPTQ's settings: ``damp`` (times the mean of diag H), ``block`` (columns per lazy
    update), ``act_order``, ``clip`` (``"max"`` or ``"mse"``: each channel's range),
    ``skip_bits`` (weight widths left to nearest rounding, e.g. ``(8,)``), ``sequential``
    (inputs from the already-rounded layers, else from the float graph), ``batches`` (data
    batches H is accumulated over; ``None``: compile's ``calibration_batches``)."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    clip: str = "max"
    skip_bits: tuple[int, ...] = ()
    sequential: bool = True
    batches: int | None = None


def check_weight_rounding(value: Any) -> GptqOptions | None:
    """``compile(weight_rounding=...)`` checked: ``"nearest"`` (None: the reference rounds),
    ``"gptq"``, or ``{"method": "gptq", <GptqOptions field>: value, ...}``."""
    if isinstance(value, str):
        if value not in ROUNDINGS:
            raise OptionError(f"weight_rounding must be one of {ROUNDINGS} or a dict "
                              f"{{'method': 'gptq', ...}}, got {value!r}")
        return None if value == "nearest" else GptqOptions()
    if not isinstance(value, Mapping):
        raise OptionError(f"weight_rounding must be 'nearest', 'gptq' or a dict such as "
                          f"{{'method': 'gptq', 'act_order': True}}, got {type(value).__name__}")
    opts = dict(value)
    method = opts.pop("method", "gptq")
    if method not in ROUNDINGS:
        raise OptionError(f"weight_rounding['method'] must be one of {ROUNDINGS}, got "
                          f"{method!r}")
    known = [f.name for f in fields(GptqOptions)]
    unknown = sorted(set(opts) - set(known))
    if method == "nearest" and opts:
        raise OptionError(f"weight_rounding: options {sorted(opts)} apply to 'gptq' only")
    if unknown:
        raise OptionError(f"weight_rounding: unknown GPTQ option(s) {unknown}; known: {known}")
    if method == "nearest":
        return None
    if "skip_bits" in opts:
        skip = opts["skip_bits"]
        opts["skip_bits"] = tuple(skip) if isinstance(skip, (list, tuple, set)) else (skip,)
    out = GptqOptions(**opts)
    if not (isinstance(out.damp, (int, float)) and 0 < out.damp < 1):
        raise OptionError(f"weight_rounding: damp must be in (0, 1), got {out.damp!r}")
    if isinstance(out.block, bool) or not isinstance(out.block, int) or out.block < 1:
        raise OptionError(f"weight_rounding: block must be a positive int, got {out.block!r}")
    if out.batches is not None and (isinstance(out.batches, bool) or
                                    not isinstance(out.batches, int) or out.batches < 1):
        raise OptionError(f"weight_rounding: batches must be a positive int or None, got "
                          f"{out.batches!r}")
    if out.clip not in ("max", "mse"):
        raise OptionError(f"weight_rounding: clip must be 'max' or 'mse', got {out.clip!r}")
    if not all(isinstance(b, int) and 2 <= b <= 8 for b in out.skip_bits):
        raise OptionError(f"weight_rounding: skip_bits must be weight widths in 2..8, got "
                          f"{out.skip_bits!r}")
    for name in ("act_order", "sequential"):
        if not isinstance(getattr(out, name), bool):
            raise OptionError(f"weight_rounding: {name} must be True or False")
    return out


@dataclass
class LayerRounding:
    """One layer's GPTQ result: the integers ``q`` (weight-shaped, int8; zeros in dead
    channels), the steps ``scales`` (float64 per output channel), ``bits``, the layer's output
    error ``tr(E H E^T)`` on the calibration inputs for nearest rounding and for GPTQ
    (``E = W - s q``), and ``pinned``: the channels whose largest weight GPTQ would have
    rounded below ``qmax`` (pinned back, see the module docstring)."""

    q: torch.Tensor
    scales: torch.Tensor
    bits: int
    error_nearest: float
    error_gptq: float
    pinned: int


def _groups(layer: nn.Module) -> int:
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(N, features, positions)`` columns (im2col for a conv)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    else:
        padding = layer.padding
    return F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding,
                    stride=layer.stride)


def layer_hessian(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over columns of x x^T per group (G, K, K) float64, number of columns)`` of the
    layer ``layer`` (Conv2d or Linear) reading ``x``."""
    g = _groups(layer)
    k = layer.weight[0].numel()
    total, count = torch.zeros(g, k, k, dtype=torch.float64), 0
    chunk = max(1, (1 << 23) // max(1, x[0].numel() * (math.prod(
        layer.kernel_size) if isinstance(layer, nn.Conv2d) else 1)))
    for i in range(0, len(x), chunk):
        cols = _columns(layer, x[i:i + chunk].detach()).to(torch.float64)
        n, _, positions = cols.shape
        cols = cols.reshape(n, g, k, positions).permute(1, 2, 0, 3).reshape(g, k, -1)
        total += cols @ cols.transpose(1, 2)
        count += cols.shape[-1]
    return total, count


def gptq_rows(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmax: int,
              pin: torch.Tensor, *, damp: float = 0.01, block: int = 128,
              act_order: bool = False) -> tuple[torch.Tensor, int]:
    """GPTQ of ``w`` (G, R, K) on its groups' Hessians ``h`` (G, K, K), steps ``scale`` (G, R);
    ``pin`` (G, R): the column whose element is set to ``+-qmax`` by its sign in ``w`` (-1: none).
    Returns ``(q (G, R, K) float64 integers, how many pins changed a rounding)``."""
    w, h = w.to(torch.float64).clone(), h.to(torch.float64).clone()
    g, r, k = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    diag[diag == 0] = 1.0  # a column no input reaches: rounded alone, no error to spread
    sign = torch.sign(torch.gather(w, 2, pin.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True)
        w = torch.gather(w, 2, perm.unsqueeze(1).expand(g, r, k))
        h = torch.gather(torch.gather(h, 1, perm.unsqueeze(-1).expand(g, k, k)), 2,
                         perm.unsqueeze(1).expand(g, k, k))
        inverse = torch.argsort(perm, dim=1)
        pin = torch.where(pin >= 0, torch.gather(inverse, 1, pin.clamp(min=0)), pin)
    u = _inverse_cholesky(h, damp)
    q, changed = torch.zeros_like(w), 0
    s = scale.to(torch.float64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, :, i1:i2].clone(), torch.zeros(g, r, i2 - i1, dtype=torch.float64)
        for i in range(i2 - i1):
            col = w1[:, :, i]
            qi = torch.clamp(torch.floor(col / s + 0.5), -qmax, qmax)
            pinned = pin == i1 + i
            changed += int((pinned & (qi != sign * qmax)).sum())
            qi = torch.where(pinned, sign * qmax, qi)
            e = (col - qi * s) / u[:, i1 + i, i1 + i].unsqueeze(1)
            w1[:, :, i:] -= e.unsqueeze(-1) * u[:, i1 + i, i1 + i:i2].unsqueeze(1)
            err[:, :, i], q[:, :, i1 + i] = e, qi
        w[:, :, i2:] -= err @ u[:, i1:i2, i2:]
    if act_order:
        q = torch.gather(q, 2, inverse.unsqueeze(1).expand(g, r, k))
    return q, changed


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; the damping grows
    tenfold (up to 3 times) while ``H`` is not positive definite."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    mean = torch.diagonal(h, dim1=1, dim2=2).mean(1).view(-1, 1, 1)
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h + damp * 10 ** attempt * mean * eye)
        if not bool(info.any()):
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not bool(info.any()):
                return upper
    raise ValueError(f"GPTQ: the input Hessian is not positive definite even with damping "
                     f"{damp * 1000:g} x its mean diagonal; raise weight_rounding's damp")


def _ranges(w: torch.Tensor, bits: int, clip: str) -> torch.Tensor:
    """Each output channel's range (float32): its largest |w| or the MSE-optimal clip."""
    if clip == "mse":
        from ..fakequant import mse_clip  # fakequant imports quant: import here, not above
        return mse_clip(w, bits)
    return w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)


def round_layer(layer: nn.Module, bits: int, hessian: torch.Tensor, count: int,
                options: GptqOptions) -> LayerRounding:
    """GPTQ of one layer's weights in place (``layer.weight`` becomes ``float32(q * s)``)."""
    w = layer.weight.detach()
    cout, g, qmax = w.shape[0], _groups(layer), weight_qmax(bits)
    r = _ranges(w, bits, options.clip)
    dead = (r == 0) | (r < r.max() * REL_SCALE_FLOOR)
    scale = torch.where(dead, torch.ones_like(r), r).to(torch.float64) / qmax
    flat = w.reshape(cout, -1).to(torch.float64)
    pin = torch.where(dead, -1, flat.abs().argmax(dim=1))
    h = 2.0 * hessian / max(count, 1)
    rows = (g, cout // g, flat.shape[1])
    q, changed = gptq_rows(flat.view(rows), h, scale.view(g, -1), qmax, pin.view(g, -1),
                           damp=options.damp, block=options.block, act_order=options.act_order)
    q = torch.where(dead.view(g, -1, 1), torch.zeros_like(q), q).reshape(cout, -1)
    near = torch.clamp(torch.floor(flat / scale.unsqueeze(1) + 0.5), -qmax, qmax)
    errors = [_output_error(flat - x * scale.unsqueeze(1), h, g, dead) for x in (near, q)]
    keep = flat.clamp(-r.unsqueeze(1).double(), r.unsqueeze(1).double())  # dead: clamp to r
    new = torch.where(dead.unsqueeze(1), keep, q * scale.unsqueeze(1)).to(torch.float32)
    with torch.no_grad():
        layer.weight.copy_(new.view_as(w))
    return LayerRounding(q.view_as(w).to(torch.int8), scale, bits, errors[0], errors[1], changed)


def _output_error(e: torch.Tensor, h: torch.Tensor, g: int, dead: torch.Tensor) -> float:
    """``sum_c e[c] H e[c]^T`` over live channels: the squared output error per column."""
    e = torch.where(dead.unsqueeze(1), torch.zeros_like(e), e).view(g, -1, h.shape[-1])
    return float(torch.einsum("grk,gkm,grm->", e, h, e)) / 2.0


def gptq_round(gm: torch.fx.GraphModule, assignment: Assignment,
               batches: Sequence[tuple[torch.Tensor, ...]], options: GptqOptions
               ) -> tuple[torch.fx.GraphModule, dict[str, LayerRounding]]:
    """A copy of the compressed graph ``gm`` (pruned, BN folded:
    :func:`pqcompile.fakequant.compressed_graph`) whose quantized conv/linear layers hold their
    GPTQ-rounded weights under ``assignment``, from the calibration input tuples ``batches``;
    and ``{node: LayerRounding}``. Layers at ``options.skip_bits`` and layers whose module is
    called at several nodes keep their float weights (nearest rounding in the reference)."""
    if not batches:
        raise ValueError("GPTQ needs calibration batches: pass data=")
    work = copy.deepcopy(gm).eval()
    shaped = copy.deepcopy(gm)
    with torch.no_grad():
        ShapeProp(shaped).propagate(*EXAMPLE_INPUTS.get(gm).args)
    plan = make_plan(shaped, Assignment(dict(assignment.bits)))
    calls: dict[str, int] = {}
    for n in work.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    targets = {n.name for n in work.graph.nodes
               if plan.kind.get(n.name) in ("conv", "linear") and calls[n.target] == 1
               and assignment.bits[n.name].weight not in options.skip_bits}
    last: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in work.graph.nodes:
        for a in n.all_input_nodes:
            last[a] = n
    runs = []
    for inputs in batches:
        run = torch.fx.Interpreter(work, garbage_collect_values=False)
        run.args_iter, run.env = iter(inputs), {}
        runs.append(run)
    out: dict[str, LayerRounding] = {}
    later: list[tuple[nn.Module, torch.Tensor]] = []
    with torch.no_grad():
        for n in work.graph.nodes:
            if n.op == "output":
                break
            if n.name in targets:
                layer = work.get_submodule(n.target)
                original = layer.weight.detach().clone()
                total, count = None, 0
                for run in runs:
                    part, c = layer_hessian(layer, run.env[n.args[0]])
                    total, count = (part if total is None else total + part), count + c
                try:
                    out[n.name] = round_layer(layer, assignment.bits[n.name].weight, total,
                                              count, options)
                except ValueError as exc:
                    raise ValueError(f"node {n.name!r} ({type(layer).__name__}): {exc}") from exc
                if not options.sequential:  # the next layers read the float model's outputs
                    later.append((layer, layer.weight.detach().clone()))
                    layer.weight.copy_(original)
            for run in runs:
                run.env[n] = run.run_node(n)
                for a in n.all_input_nodes:
                    if last.get(a) is n:
                        del run.env[a]
        for layer, weight in later:
            layer.weight.copy_(weight)
    return work, out


def stored_mismatches(gm: torch.fx.GraphModule, rounding: Mapping[str, LayerRounding]
                      ) -> dict[str, int]:
    """``{node: channels}`` whose integers the scheme's weight quantizer (no bias floor) would
    store differently from GPTQ's ``q`` in ``gm``'s rounded weights (expected: none)."""
    out = {}
    modules = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes
               if n.name in rounding}
    for name, result in rounding.items():
        q, _ = quantize_weight(modules[name].weight, result.bits, where=name)
        bad = (q != result.q).reshape(q.shape[0], -1).any(dim=1)
        if bool(bad.any()):
            out[name] = int(bad.sum())
    return out
