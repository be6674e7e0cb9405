"""The search network of the SBS solver (:mod:`pqcompile.solvers.sbs`): the folded training
graph with bit-sharing layers (:mod:`~pqcompile.solvers.sbs_gates`), block masks on the
channel groups, and their gates."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from ..assignment import Assignment
from ..finetune import compressed_graph
from ..meta import CHANNEL_GROUPS, SHAPE
from .problem import Affine, Problem
from .sbs_gates import (
    _expected_bits,
    _GroupGate,
    _mask_for,
    _Quantizer,
    _SBSLayer,
    _WeightQuantizer,
    bit_chain,
)
from .search import SearchContext

# --- the search network -------------------------------------------------------------------------


class _Supernet:
    """The folded training graph with bit-sharing layers and block masks, and its gates."""

    def __init__(self, problem: Problem, context: SearchContext, block: int | None,
                 momentum: float) -> None:
        self.problem = problem
        names = [layer.name for layer in problem.layers]
        self.gm = compressed_graph(context.graph, Assignment.uniform(names, 8, 8))
        nodes = {n.name: n for n in self.gm.graph.nodes}
        missing = [n for n in names if n not in nodes or nodes[n].op != "call_module"]
        if missing:
            raise ValueError(f"layers {missing[:4]} are not module calls of the folded graph; "
                             "SBS needs each problem layer as a conv2d/linear module call")
        self.layers = {n: self.gm.get_submodule(nodes[n].target) for n in names}
        ranges = self._calibrate(context, nodes)
        self.weight_q: dict[str, _WeightQuantizer] = {}
        self.act_q: dict[str, _Quantizer] = {}
        self.wrappers: dict[str, _SBSLayer] = {}
        for layer in problem.layers:
            module = self.layers[layer.name]
            wkey = layer.weight_key or layer.name
            if wkey not in self.weight_q:
                w = module.weight.detach()
                amax = w.abs().reshape(w.shape[0], -1).amax(1)
                amax = torch.where(amax > 0, amax, torch.ones_like(amax))
                self.weight_q[wkey] = _WeightQuantizer(
                    _tied_chain(problem, layer, 0, wkey),
                    amax.reshape((-1,) + (1,) * (w.dim() - 1)), True, momentum)
            akey = layer.activation_key
            if akey not in self.act_q:
                lo, hi = ranges[layer.name]
                self.act_q[akey] = _Quantizer(_tied_chain(problem, layer, 1, akey),
                                              torch.tensor(hi if hi > 0 else 1.0), lo < 0,
                                              momentum)
            wrapper = _SBSLayer(module, self.weight_q[wkey], self.act_q[akey])
            target = f"sbs_layer_{layer.name}"
            self.gm.add_submodule(target, wrapper)
            nodes[layer.name].target = target
            self.wrappers[layer.name] = wrapper
        self.group_gates = self._masks(problem, context, nodes, block)
        self.gm.graph.lint()
        self.gm.recompile()

    def _calibrate(self, context: SearchContext, nodes: Mapping[str, torch.fx.Node]
                   ) -> dict[str, tuple[float, float]]:
        """Min and max |x| of every layer's input on the context's calibration batches."""
        wrappers = {}
        for name, module in self.layers.items():
            wrappers[name] = _SBSLayer(module, None, None)  # type: ignore[arg-type]
            wrappers[name].calibrating = {"min": math.inf, "max": 0.0}
            self.gm.add_submodule(f"sbs_layer_{name}", wrappers[name])
            nodes[name].target = f"sbs_layer_{name}"
        self.gm.recompile()
        with torch.no_grad():
            self.gm.eval()
            for inputs in context.calibration:
                self.gm(*inputs)
        return {n: (w.calibrating["min"], w.calibrating["max"]) for n, w in wrappers.items()}

    def _masks(self, problem: Problem, context: SearchContext,
               nodes: Mapping[str, torch.fx.Node], block: int | None) -> dict[int, _GroupGate]:
        groups = CHANNEL_GROUPS.get(context.graph)
        gates: dict[int, _GroupGate] = {}
        for g in problem.groups:
            group = groups[g.id]
            outs = [m for m in group.members if m.role == "out" and m.node in nodes]
            producers = [(self.layers[m.node], m.index) for m in outs if m.node in self.layers]
            size = block if block is not None else max(1, g.size // 8)
            gate = _GroupGate(group, min(size, g.size), producers)
            self.gm.add_submodule(f"sbs_gate_{g.id}", gate)
            for member in group.members:
                if member.role != "in" or member.node not in self.wrappers:
                    continue
                source = _context_node(context, member.node).args[0]
                shape = tuple(SHAPE.get(source).shape)
                self.wrappers[member.node].masks.append(_mask_for(gate, member, shape))
            gates[g.id] = gate
        return gates

    # --- parameters and gates --------------------------------------------------------------

    def threshold_params(self) -> dict[str, list[nn.Parameter]]:
        """The thresholds by kind: weight bits, pruning blocks, activation bits."""
        return {"weight": [q.alpha for q in self.weight_q.values() if q.alpha.numel()],
                "prune": [g.alpha for g in self.group_gates.values()],
                "activation": [q.alpha for q in self.act_q.values() if q.alpha.numel()]}

    def range_params(self) -> list[nn.Parameter]:
        return [q.log_range for q in (*self.weight_q.values(), *self.act_q.values())]

    def network_params(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.range_params()}
        skip |= {id(p) for kind in self.threshold_params().values() for p in kind}
        return [p for p in self.gm.parameters() if id(p) not in skip and p.requires_grad]

    def refresh(self) -> None:
        for gate in self.group_gates.values():
            gate.refresh()

    def costs(self) -> dict[str, torch.Tensor]:
        """The problem's costs at the current gates (forward: exact; backward: surrogate)."""
        p = self.problem
        kept = {gid: gate.kept() for gid, gate in self.group_gates.items()}
        fm = _affine(p.float_macs, kept)
        bops = float(p.fixed_bops) + p.float_mac_bops * fm
        macs = float(p.fixed_macs) + fm
        wbits = 32 * _affine(p.params32, kept)
        for layer in p.layers:
            wq = self.weight_q[layer.weight_key or layer.name]
            aq = self.act_q[layer.activation_key]
            pairs = _affine(layer.out_channels, kept) * _affine(layer.in_channels, kept)
            w_bits, a_bits = _expected_bits(wq.bits, wq.gates), _expected_bits(aq.bits, aq.gates)
            m = layer.macs_scale * pairs
            bops = bops + m * w_bits * a_bits
            macs = macs + m
            wbits = wbits + layer.weight_scale * pairs * w_bits
        return {"bops": bops, "macs": macs, "weight_bytes": wbits / 8}

    def train(self) -> None:
        self.gm.train()
        for m in self.gm.modules():  # an unfoldable BN keeps its running statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _context_node(context: SearchContext, name: str) -> torch.fx.Node:
    for n in context.graph.graph.nodes:
        if n.name == name:
            return n
    raise ValueError(f"no node {name!r} in the context's graph")


def _affine(form: Affine, kept: Mapping[int, torch.Tensor]) -> torch.Tensor:
    total = torch.tensor(float(form.const), dtype=torch.float64)
    for gid, per in form.terms:
        total = total + per * kept[gid]
    return total


def _tied_chain(problem: Problem, layer: Any, which: int, key: str) -> tuple[int, ...]:
    """The nested candidates of a weight (0) or activation (1) quantizer: the chain of the bit
    widths every layer sharing it offers."""
    if which == 0:
        members = [lay for lay in problem.layers if (lay.weight_key or lay.name) == key]
    else:
        members = [lay for lay in problem.layers if lay.activation_key == key]
    common = set.intersection(*({o[which] for o in lay.options} for lay in members))
    if not common:
        names = [lay.name for lay in members]
        raise ValueError(f"layers {names} share {('weight', 'activation')[which]} bits but "
                         "have no option in common; give them a common option")
    return bit_chain(sorted(common))
