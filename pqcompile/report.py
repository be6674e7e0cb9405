"""Reports: the analysis table of a traced graph, the compression table and plots of a
compiled model (from a :class:`~pqcompile.build.Compiled` or a saved artifact's manifest).

* :func:`analysis_table`: per-layer costs and the channel groups of an analyzed graph;
* :func:`compression_table`: per compressed layer op, output shape, kept/total channels, w/a
  bits, MACs, BOPs, weight bytes and the sensitivity of the chosen bits, with totals and
  reduction ratios;
* :func:`pareto_figure` / :func:`layers_figure` / :func:`write_plots`: PNG plots (matplotlib):
  the accuracy-vs-BOPs Pareto front of the candidates the solver saw, per-layer bits and kept
  channels; :func:`artifact_report` renders both from an artifact directory
  (``pqcompile report DIR``).

>>> import torch, torchvision
>>> gm = analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
>>> print([l for l in analysis_table(gm).splitlines() if l.startswith("total")][0])
... # doctest: +ELLIPSIS
total ... 1814.07 M MACs...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .candidates import pareto_front
from .fidelity import describe as describe_fidelity
from .graph_analysis import analysis as analyze
from .meta import CHANNEL_GROUPS, COST, COST_TOTALS, SHAPE
from .passes import describe_groups
from .solvers.verdict import budget_line

__all__ = ["analysis_table", "analyze", "artifact_report", "compression_table", "layer_rows",
           "layers_figure", "pareto_figure", "write_plots"]
PLOT_FILES = ("pareto.png", "layers.png")


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


# --- compressed models ------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    """``36864, "BOPs"`` -> ``"36.9 K BOPs"`` (bytes: ``B, KB, MB, GB``)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}" if unit == "B" else \
                f"{value / scale:.3g} {prefix} {unit}"
    return f"{value:.0f} {unit}"


def _ratio(before: float | None, after: float | None) -> str:
    return f"{before / after:.2f}x" if before and after else "-"


def compression_table(layers: Sequence[Mapping[str, Any]], totals: Mapping[str, Any], *,
                      float_ops: Sequence[Sequence[str]] = (), calibration: str = "",
                      solve_notes: Sequence[str] = (),
                      solver: str | None = None, budget: str | None = None,
                      fidelity: Mapping[str, Any] | None = None) -> str:
    """The per-layer table of a compressed model (see the module docstring); ``fidelity``:
    :mod:`pqcompile.fidelity`'s figure, one line.

    >>> rows = [{"name": "conv", "op": "Conv2d", "shape": [1, 8, 4, 4], "kept_channels": 8,
    ...          "total_channels": 16, "weight_bits": 4, "activation_bits": 8, "macs": 1152,
    ...          "bops": 36864, "weight_bytes": 36.0, "sensitivity": 0.25}]
    >>> totals = {"macs": 1152, "bops": 36864, "weight_bytes": 36.0, "fp32_macs": 2304,
    ...           "fp32_bops": 2359296, "fp32_weight_bytes": 576.0, "bop_reduction": 64.0}
    >>> for part in compression_table(rows, totals).splitlines()[-1].split("), "):
    ...     print(part)
    total: 1 layers, 8/16 channels kept, 1.15 K MACs (2.00x fewer
    36.9 K BOPs (64.00x fewer
    36 B weights (16.00x smaller)
    """
    head = (f"{'layer':28s} {'op':10s} {'output shape':16s} {'channels':>9s} {'w/a':>5s} "
            f"{'MACs':>11s} {'BOPs':>13s} {'bytes':>9s} {'sensitivity':>11s}")
    lines = [head, "-" * len(head)]
    kept = total = 0
    for r in layers:
        has = r.get("kept_channels") is not None and r.get("total_channels") is not None
        if has:
            kept, total = kept + r["kept_channels"], total + r["total_channels"]
        ch = f"{r['kept_channels']}/{r['total_channels']}" if has else "-"
        shape = "x".join(map(str, r["shape"])) if r.get("shape") else "-"
        sens = r.get("sensitivity")
        sens_text = f"{sens:11.4g}" if sens is not None else f"{'-':>11s}"
        lines.append(f"{r['name'][:28]:28s} {r['op'][:10]:10s} {shape[:16]:16s} {ch:>9s} "
                     f"{r['weight_bits']:>2d}/{r['activation_bits']:<2d} {r['macs']:11d} "
                     f"{r['bops']:13d} {r['weight_bytes']:9.0f} {sens_text}")
    t = totals
    lines.append("-" * len(head))
    lines.append(
        f"total: {len(layers)} layers, {kept}/{total} channels kept, "
        f"{_si(t['macs'], 'MACs')} ({_ratio(t.get('fp32_macs'), t['macs'])} fewer), "
        f"{_si(t['bops'], 'BOPs')} ({_ratio(t.get('fp32_bops'), t['bops'])} fewer), "
        f"{_si(t['weight_bytes'], 'B')} weights "
        f"({_ratio(t.get('fp32_weight_bytes'), t['weight_bytes'])} smaller)")
    notes = [line for line in (float_macs_note(layers, totals), storage_note(totals)) if line]
    if solver or budget:
        notes.append(budget_line(solver, budget, totals))
    notes.extend(solve_notes)  # how the solver got there, what the Pareto sweep skipped
    if calibration:
        notes.append(f"calibrated on {calibration}")
    if fidelity:
        notes.append(describe_fidelity(fidelity))
    if float_ops:
        notes.append(float_ops_note(float_ops))
    return "\n".join(lines + notes)


def float_macs_note(layers: Sequence[Mapping[str, Any]], totals: Mapping[str, Any]) -> str:
    """How the MACs of nodes without bits (matmuls of two activations, float layers) are
    costed: as float MACs (:data:`pqcompile.passes.cost.FLOAT_BITS`), computed in float64 by
    the program's islands.

    >>> note = float_macs_note([{"name": "matmul", "float": True, "weight_bits": 32,
    ...                          "activation_bits": 32, "macs": 10, "bops": 10240}],
    ...                        {"bops": 20480})
    >>> note.split(", ")
    ['float MACs: 1 node(s) (matmul)', '10 MACs costed at 32x32 bits a MAC (no integer \
lowering: the program computes them in float64)', '50% of the BOPs']
    """
    rows = [r for r in layers if r.get("float")]
    if not rows:
        return ""
    names = ", ".join(r["name"] for r in rows[:4]) + (", ..." if len(rows) > 4 else "")
    widths = sorted({(r["weight_bits"], r["activation_bits"]) for r in rows})
    what = ", ".join(f"{w}x{a}" for w, a in widths)
    share = sum(r["bops"] for r in rows) / totals["bops"] if totals.get("bops") else 0.0
    kind = " (no integer lowering: the program computes them in float64)"
    return (f"float MACs: {len(rows)} node(s) ({names}), {sum(r['macs'] for r in rows)} MACs "
            f"costed at {what} bits a MAC{kind}, {share:.0%} of the BOPs")


def storage_note(totals: Mapping[str, Any]) -> str:
    """Where the weight bytes are: the weights file and the float islands' constants.

    >>> storage_note({"weight_bytes": 1200, "param_bytes": 1000, "constant_bytes": 200})
    'weights stored: 1000 B in the weights file + 200 B of float64 constants in the library'
    """
    if totals.get("constant_bytes") is None or totals.get("param_bytes") is None:
        return ""
    return (f"weights stored: {totals['param_bytes']} B in the weights file + "
            f"{totals['constant_bytes']} B of float64 constants in the library")


def float_ops_note(float_ops: Sequence[Sequence[str]], width: int = 100) -> str:
    """The nodes that run in float, grouped by op (most nodes first, up to 6 names each) and
    wrapped to ``width`` columns: one line per op, readable with hundreds of nodes.

    >>> print(float_ops_note([("add_1", "add"), ("gelu", "gelu"), ("add_2", "add")]))
    run in float (no integer lowering), 3 nodes:
      add x2: add_1, add_2
      gelu x1: gelu
    """
    import textwrap

    by_op: dict[str, list[str]] = {}
    for node, op in float_ops:
        by_op.setdefault(str(op), []).append(str(node))
    lines = [f"run in float (no integer lowering), {len(float_ops)} nodes:"]
    for op, nodes in sorted(by_op.items(), key=lambda item: (-len(item[1]), item[0])):
        names = ", ".join(nodes[:6]) + (f", ... ({len(nodes) - 6} more)" if len(nodes) > 6
                                        else "")
        lines += textwrap.wrap(f"{op} x{len(nodes)}: {names}", width, initial_indent="  ",
                               subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(lines)


def _y_key(candidates: Sequence[Mapping[str, Any]]) -> str:
    return "accuracy" if any(c.get("accuracy") is not None for c in candidates) \
        else "objective"


def pareto_figure(candidates: Sequence[Mapping[str, Any]], totals: Mapping[str, Any] | None = None,
                  title: str = ""):
    """A matplotlib ``Figure``: the candidates' accuracy (or, when none was measured, the
    predicted loss: summed sensitivity) against BOPs, the Pareto front as a line and the
    chosen one as a star."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter


    key = _y_key(candidates)
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    pts = [c for c in candidates if c.get(key) is not None and c.get("source") != "chosen"]
    others = sum(c.get("source") != "chosen" for c in candidates)
    ax.scatter([c["bops"] / 1e9 for c in pts], [c[key] for c in pts], s=14, color="0.6",
               label=f"candidates ({len(pts)} of {others} measured)" if key == "accuracy"
               else f"candidates ({len(pts)})")
    front = pareto_front(candidates, key)
    ax.plot([c["bops"] / 1e9 for c in front], [c[key] for c in front], "-o", ms=4,
            color="tab:blue", label="Pareto front")
    for c in candidates:
        if c.get("source") == "chosen" and c.get(key) is not None:
            ax.plot([c["bops"] / 1e9], [c[key]], "*", ms=14, color="tab:red", label="chosen")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    if totals and totals.get("fp32_bops"):
        ref = totals["fp32_bops"] / 1e9
        top = ax.secondary_xaxis("top", functions=(lambda g: ref / g.clip(1e-12),
                                                   lambda r: ref / r.clip(1e-12)))
        times = FuncFormatter(lambda v, _: f"{v:.3g}x")
        top.xaxis.set_major_formatter(times)
        top.xaxis.set_minor_formatter(times)
        top.tick_params(axis="x", which="minor", labelsize=7)
        top.set_xlabel("BOP reduction vs FP32")
    ax.set_xlabel("BOPs (G)")
    ax.set_ylabel("held-out accuracy" if key == "accuracy"
                  else "predicted loss (summed sensitivity; lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def layers_figure(layers: Sequence[Mapping[str, Any]], title: str = ""):
    """A matplotlib ``Figure``: per layer, weight and activation bits (top) and the fraction
    of output channels kept (bottom, kept/total written on the bars)."""
    from matplotlib.figure import Figure

    n = len(layers)
    fig = Figure(figsize=(max(7.0, 0.22 * n + 2), 5.5), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(n))
    top.bar([x - 0.2 for x in xs], [r["weight_bits"] for r in layers], 0.4, label="weight bits")
    top.bar([x + 0.2 for x in xs], [r["activation_bits"] for r in layers], 0.4,
            label="activation bits")
    top.set_ylabel("bits")
    top.set_yticks([0, 2, 4, 8, 16, 32] if any(r["weight_bits"] > 8 for r in layers)
                   else [0, 2, 4, 6, 8])
    top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8,
               frameon=False)
    fractions = [r["kept_channels"] / r["total_channels"]
                 if r.get("kept_channels") is not None and r.get("total_channels") else math.nan
                 for r in layers]
    bars = bottom.bar(xs, [0.0 if math.isnan(f) else f for f in fractions], 0.6,
                      color="tab:green")
    for bar, r in zip(bars, layers):
        if r.get("kept_channels") is not None and r.get("total_channels"):
            bottom.annotate(f"{r['kept_channels']}/{r['total_channels']}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6, rotation=90)
    bottom.set_ylim(0, 1.25)
    bottom.set_ylabel("output channels kept")
    bottom.set_xticks(xs, [r["name"] for r in layers], rotation=90, fontsize=6)
    for ax in (top, bottom):
        ax.grid(True, axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_plots(layers: Sequence[Mapping[str, Any]], candidates: Sequence[Mapping[str, Any]],
                totals: Mapping[str, Any] | None, directory: str | Path,
                title: str = "") -> list[Path]:
    """Write ``pareto.png`` (when there are candidates) and ``layers.png`` to ``directory``
    (made if missing); returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if candidates:
        path = out / PLOT_FILES[0]
        pareto_figure(candidates, totals, title).savefig(path)
        written.append(path)
    path = out / PLOT_FILES[1]
    layers_figure(layers, title).savefig(path)
    written.append(path)
    return written


def artifact_report(directory: str | Path, plots: str | Path | None = None,
                    as_dict: bool = False):
    """The compression table of a saved artifact (its manifest, integrity checked), and its
    plots written to ``plots`` when given. ``as_dict``: layers, totals and candidates instead
    of text (with ``"plots"``: the files written)."""
    from .runtime.artifact import Artifact

    manifest = Artifact.load(directory).manifest
    extra = manifest.get("extra", {})
    layers, totals = manifest.get("layers") or [], manifest.get("totals")
    if totals is None or not layers:
        raise ValueError(f"{directory}: the manifest has no per-layer table (it was not "
                         "built by pqcompile.compile / compile_assignment); nothing to report")
    title = f"{Path(directory).name}: {manifest['target']['name']}"
    written = write_plots(layers, extra.get("candidates", []), totals, plots, title) \
        if plots is not None else []
    if as_dict:
        return {"target": manifest["target"]["name"], "layers": layers, "totals": totals,
                "candidates": extra.get("candidates", []), "solver": extra.get("solver"),
                "budget": extra.get("budget"), "float_ops": extra.get("float_ops", []),
                "fidelity": extra.get("fidelity"),
                "plots": [str(p) for p in written]}
    text = compression_table(layers, totals, float_ops=extra.get("float_ops", ()),
                             calibration=extra.get("calibration", ""),
                             solve_notes=extra.get("notes", ()),
                             solver=extra.get("solver"), budget=extra.get("budget"),
                             fidelity=extra.get("fidelity"))
    if written:
        text += "\nplots: " + ", ".join(str(p) for p in written)
    return f"artifact {directory} ({manifest['target']['name']})\n{text}"
