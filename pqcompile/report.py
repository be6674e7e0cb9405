"""Analysis reports: per-layer costs and channel groups of a traced graph, as text or dicts.

>>> import torch, torchvision
>>> gm = analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
>>> print([l for l in analysis_table(gm).splitlines() if l.startswith("total")][0])
... # doctest: +ELLIPSIS
total ... 1814.07 M MACs...
"""

from __future__ import annotations

from typing import Any

import torch

from .build import analysis as analyze
from .meta import CHANNEL_GROUPS, COST, COST_TOTALS, SHAPE
from .passes import describe_groups

__all__ = ["analysis_table", "analyze", "layer_rows"]


def _op(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def layer_rows(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """One row per node doing MACs or holding parameters."""
    rows = []
    for node in gm.graph.nodes:
        cost = COST.find(node)
        if cost is None or (cost.macs == 0 and cost.params == 0):
            continue
        tm = SHAPE.find(node)
        rows.append({"node": node.name, "op": _op(gm, node),
                     "shape": list(tm.shape) if hasattr(tm, "shape") else None,
                     "macs": cost.macs, "params": cost.params, "bops": cost.bops,
                     "weight_bytes": cost.weight_bytes, "bits": [cost.weight_bits,
                                                                 cost.activation_bits]})
    return rows


def analysis_table(gm: torch.fx.GraphModule, as_dict: bool = False):
    rows = layer_rows(gm)
    totals = COST_TOTALS.get(gm)
    groups = CHANNEL_GROUPS.get(gm)
    if as_dict:
        return {"layers": rows, "totals": {
            "macs": totals.macs, "params": totals.params, "bops": totals.bops,
            "weight_bytes": totals.weight_bytes, "fp32_bops": totals.fp32_bops},
            "channel_groups": [{"id": g.id, "name": g.name, "size": g.size,
                                "prunable": g.prunable, "reason": g.reason,
                                "nodes": list(g.nodes)} for g in groups]}
    lines = [f"{'node':32s} {'op':18s} {'output shape':20s} {'MACs':>12s} {'params':>10s} "
             f"{'w/a bits':>8s}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else "-"
        lines.append(f"{r['node'][:32]:32s} {r['op'][:18]:18s} {shape:20s} "
                     f"{r['macs'] / 1e6:10.2f} M {r['params']:10d} {r['bits'][0]:>3d}/"
                     f"{r['bits'][1]:<3d}")
    lines.append(f"total {len(rows)} layers: {totals.macs / 1e6:.2f} M MACs, "
                 f"{totals.params / 1e6:.3f} M params, {totals.bops / 1e9:.2f} G BOPs, "
                 f"{totals.weight_bytes / 1e6:.2f} MB weights")
    prunable = [g for g in groups if g.prunable]
    lines += ["", f"channel groups: {len(groups)} ({len(prunable)} prunable, "
              f"{sum(g.size for g in prunable)} of {sum(g.size for g in groups)} channels)",
              describe_groups(groups)]
    return "\n".join(lines)
