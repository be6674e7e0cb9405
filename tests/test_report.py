"""Reports: the compression table's numbers, the candidates the solvers saw, the Pareto and
per-layer plots, and the same report rendered from a saved artifact (``pqcompile report``)."""

import io
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from solver_models import accuracy, context, digits, trained
from torch import nn

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.build import analysis, compile_assignment
from pqcompile.candidates import budget_sweep, pareto_front, solver_candidates
from pqcompile.cli import main as cli_main
from pqcompile.meta import CHANNEL_GROUPS
from pqcompile.meta import BitWidths as Bits
from pqcompile.progress import Progress, Tracked
from pqcompile.report import artifact_report, layers_figure, pareto_figure
from pqcompile.solvers import get_solver, resolve_limits


def _two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def pruned():
    """conv 3->8 (4-bit weights, 8-bit activations) with 3 of its 8 channels pruned, then
    conv 8->4 at 8/6 bits, on 1x3x6x6 inputs."""
    model, x = _two_convs(), torch.randn(1, 3, 6, 6)
    gm = analysis(model, (x,))
    group = next(g for g in CHANNEL_GROUPS.get(gm) if g.prunable)
    mask = np.ones(8, dtype=bool)
    mask[[1, 4, 6]] = False
    a = Assignment({"_0": Bits(4, 8), "_3": Bits(8, 6)}, {group.id: mask})
    return compile_assignment(model, (x,), a, calibration=[torch.randn(4, 3, 6, 6)])


def test_layer_rows_are_the_hand_counted_costs(pruned):
    first, second = pruned.layers
    # conv1 keeps 5 of 8 channels: 5 * 3 * 3 * 3 MACs per output pixel, 36 pixels.
    assert (first["kept_channels"], first["total_channels"]) == (5, 8)
    assert first["shape"] == [1, 5, 6, 6]
    assert first["macs"] == 5 * 27 * 36
    assert first["bops"] == 5 * 27 * 36 * 4 * 8
    # + the int32 bias, multiplier and shift of each output channel
    assert first["weight_bytes"] == 5 * 27 * 4 / 8 + 5 * 12
    # conv2 reads the 5 kept channels, 8-bit weights and 6-bit activations.
    assert (second["kept_channels"], second["total_channels"]) == (4, 4)
    assert second["macs"] == 4 * 5 * 9 * 36
    assert second["bops"] == 4 * 5 * 9 * 36 * 8 * 6
    assert second["weight_bytes"] == 4 * 5 * 9 + 4 * 12
    assert first["sensitivity"] is None  # no solver ran: the column says "-"


def test_table_totals_and_ratios(pruned):
    text = pruned.report()
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("_0 "))
    assert row.split()[:5] == ["_0", "Conv2d", "1x5x6x6", "5/8", "4/8"]
    total = next(line for line in lines if line.startswith("total:"))
    t = pruned.totals
    fp32_macs = (8 * 27 + 4 * 8 * 9) * 36
    assert t["fp32_macs"] == fp32_macs
    assert f"{fp32_macs / t['macs']:.2f}x fewer" in total
    assert f"{t['fp32_bops'] / t['bops']:.2f}x fewer" in total
    assert "9/12 channels kept" in total
    assert t["fp32_bops"] == fp32_macs * 32 * 32


def test_pareto_front_by_hand():
    cands = [{"bops": 10, "accuracy": 0.5}, {"bops": 20, "accuracy": 0.4},
             {"bops": 30, "accuracy": 0.9}, {"bops": 30, "accuracy": 0.7},
             {"bops": 40, "accuracy": 0.9}, {"bops": 50, "accuracy": None}]
    assert [(c["bops"], c["accuracy"]) for c in pareto_front(cands, "accuracy")] == \
        [(10, 0.5), (30, 0.9)]
    losses = [{"bops": 1, "objective": 3.0}, {"bops": 2, "objective": 1.0},
              {"bops": 3, "objective": 2.0}]
    assert [c["bops"] for c in pareto_front(losses, "objective")] == [1, 2]


def test_budget_sweep_meets_each_scaled_limit():
    ctx = context("cnn")
    limits = resolve_limits(ctx.problem, pqcompile.Budget(bops="20x"))
    sweep = budget_sweep(ctx.problem, get_solver("ilp"), limits, factors=(0.5, 1.0, 2.0))
    assert len(sweep) == 3
    for c, f in zip(sweep, (0.5, 1.0, 2.0)):
        assert c["bops"] <= limits["bops"] * f
        assert c["bop_reduction"] == pytest.approx(ctx.problem.reference["bops"] / c["bops"])
    # a looser budget never predicts a larger loss (the ILP is optimal for each)
    objectives = [c["objective"] for c in sweep]
    assert objectives == sorted(objectives, reverse=True)


def test_front_accuracy_is_the_fake_quant_accuracy():
    ctx = context("cnn")
    limits = resolve_limits(ctx.problem, pqcompile.Budget(bops="20x"))
    solution = get_solver("ilp").solve(ctx.problem, limits)
    cands = solver_candidates(ctx.problem, get_solver("ilp"), limits, solution, ctx,
                              measure=2)
    chosen = cands[-1]
    assert chosen["source"] == "chosen" and chosen["bops"] == solution.costs["bops"]
    measured = [c for c in cands[:-1] if c["accuracy"] is not None]
    assert 1 <= len(measured) <= 2
    # the chosen one re-measured independently: fake-quant model on the held-out batches
    fq = ctx.fake_quant(ctx.assignment(solution.bits, solution.kept))
    assert chosen["accuracy"] == pytest.approx(accuracy(fq, ctx.held_out))


def test_searching_solver_records_what_it_measured():
    ctx = context("mlp")
    solver = get_solver("ajpq", episodes=4, warmup=2)
    limits = resolve_limits(ctx.problem, pqcompile.Budget(bops="10x"))
    solution = solver.solve(ctx.problem, pqcompile.Budget(bops="10x"), context=ctx)
    assert len(ctx.candidates) == solution.info["measured"]
    cands = solver_candidates(ctx.problem, solver, limits, solution, ctx, measure=4)
    assert all(c["source"] == "search" and c["accuracy"] is not None for c in cands[:-1])
    best = max(solution.info["accuracies"])
    assert cands[-1]["accuracy"] == pytest.approx(best)


def _line_xy(fig, label):
    ax = fig.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == label)
    return list(line.get_xdata()), list(line.get_ydata())


def test_pareto_figure_draws_the_front_and_the_chosen():
    cands = [{"bops": 2e9, "accuracy": 0.8, "source": "sweep"},
             {"bops": 1e9, "accuracy": 0.6, "source": "sweep"},
             {"bops": 3e9, "accuracy": 0.7, "source": "sweep"},
             {"bops": 2e9, "accuracy": 0.8, "source": "chosen"}]
    fig = pareto_figure(cands, {"fp32_bops": 64e9})
    assert _line_xy(fig, "Pareto front") == ([1.0, 2.0], [0.6, 0.8])
    assert _line_xy(fig, "chosen") == ([2.0], [0.8])
    assert fig.axes[0].get_ylabel() == "held-out accuracy"
    predicted = [{"bops": 1e9, "objective": 2.0, "accuracy": None, "source": "sweep"}]
    assert "predicted loss" in pareto_figure(predicted).axes[0].get_ylabel()


def test_layers_figure_bars_are_bits_and_kept_fractions(pruned):
    fig = layers_figure(pruned.layers)
    bits_ax, kept_ax = fig.axes[:2]
    heights = [p.get_height() for p in bits_ax.patches]
    assert heights == [4, 8, 8, 6]  # weight bits of both layers, then activation bits
    assert [p.get_height() for p in kept_ax.patches] == pytest.approx([5 / 8, 1.0])


def test_plots_and_report_from_the_saved_artifact(tmp_path):
    model = trained("cnn")
    train, test = digits()
    c = pqcompile.compile(model, (test[0][0],), target="host", budget="bops=20x", data=train,
                          validation=test[:2], pareto_points=2)
    assert c.candidates[-1]["source"] == "chosen"
    assert any(r["sensitivity"] for r in c.layers)
    text = c.report(plots=tmp_path / "plots")
    for name in ("pareto.png", "layers.png"):
        image = matplotlib.image.imread(tmp_path / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    art = c.save(tmp_path / "art")
    saved = artifact_report(art, plots=tmp_path / "again")
    # the saved artifact renders the same table (its first line names the artifact)
    assert saved.splitlines()[1:-1] == text.splitlines()[:-1]
    assert (tmp_path / "again" / "pareto.png").stat().st_size > 10_000
    # the CLI: text, then JSON with the candidates
    out = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(out):
        assert cli_main(["report", str(art), "--json"]) == 0
    data = json.loads(out.getvalue())
    assert data["totals"]["bops"] == c.totals["bops"]
    assert data["candidates"] == json.loads(json.dumps(
        [{k: v for k, v in x.items() if not k.startswith("_")} for x in c.candidates]))
    assert data["layers"][0]["kept_channels"] == c.layers[0]["kept_channels"]


def test_report_of_a_directory_without_an_artifact(tmp_path):
    with pytest.raises(Exception, match="manifest"):
        artifact_report(tmp_path)
    assert cli_main(["report", str(tmp_path)]) == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_in_place_on_a_terminal():
    term, log = _Terminal(), io.StringIO()
    for stream in (term, log):
        bar = Progress(100, "step", stream=stream)
        for i in range(1, 101):
            bar.update(i)
    assert term.getvalue().count("\n") == 1 and "\r" in term.getvalue()
    assert log.getvalue().count("\n") == 10 and "\r" not in log.getvalue()
    batches = Tracked(range(4), "sensitivity", stream=log)
    assert list(batches) == list(range(4)) and list(batches) == list(range(4))
    assert log.getvalue().count("sensitivity 4/4") == 2
    assert not math.isnan(len(batches))
