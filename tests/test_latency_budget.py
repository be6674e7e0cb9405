"""Latency budgets: tables measured on the target (this machine; aarch64 under qemu-user over
TVM RPC on loopback), the model the solvers bound, and ``compile`` with ``latency_ms``.

Timings are real and noisy: the tests assert the tables' structure and the budget arithmetic
(every figure against the cached/measured table), never a speed.
"""

import itertools
import json
import math

import pytest
import torch
from solver_models import DigitsCNN
from torch import nn

import pqcompile
from pqcompile.budget import Budget, InfeasibleBudgetError, UnsupportedBudgetError
from pqcompile.build import analysis
from pqcompile.errors import OptionError
from pqcompile.latency import (
    LatencyError,
    LatencyTable,
    LayerTable,
    attach_latency,
    cache_path,
    layer_points,
    measure_latency,
)
from pqcompile.runtime.rpc_local import local_server
from pqcompile.solvers import build_problem, get_solver, minimum_costs, problem_costs
from pqcompile.solvers.problem import layer_latency, resolve_limits

FAST = {"repeat": 3, "min_repeat_ms": 2}
# The CNN runs on 32x32 images: at 8x8 its layers took ~4 us, call overhead, and halving their
# channels saved 0-0.5 us, within the noise (the budget tests need pruning to be measurably
# faster); at 32x32 they take 7-11 us and pruning saves 10-60%.
CNN_INPUT = (1, 1, 32, 32)


@pytest.fixture(scope="module")
def tuning_dir(tmp_path_factory):
    """A fresh tuning folder (and so latency cache) for the module, as compile() finds it."""
    path = tmp_path_factory.mktemp("tuning")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PQCOMPILE_TUNING_DIR", str(path))
        yield path


def _problem(model, shape, keep_levels=(1.0, 0.5), multiple=4):
    torch.manual_seed(0)
    gm = analysis(model.eval(), (torch.randn(*shape),))
    return build_problem(gm, None, None, keep_levels=keep_levels, multiple=multiple), gm


def _points(table):
    return {name: dict(t.points) for name, t in table.layers.items()}


@pytest.fixture(scope="module")
def cnn(tuning_dir):
    torch.manual_seed(0)
    problem, gm = _problem(DigitsCNN(), CNN_INPUT)
    return problem, gm, measure_latency(problem, gm, "host", **FAST)


@pytest.fixture(scope="module")
def chain(tuning_dir):
    """conv 3->16 -> conv 16->4: one prunable group, four levels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3))
    problem, gm = _problem(model, (1, 3, 24, 24), keep_levels=(1.0, 0.75, 0.5, 0.25))
    return problem, gm, measure_latency(problem, gm, "host", **FAST)


@pytest.fixture(scope="module")
def three(tuning_dir):
    """conv 3->8 -> conv 8->8 -> conv 8->4: the middle layer's latency depends on two groups."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 4, 1))
    problem, gm = _problem(model, (1, 3, 10, 10))
    return problem, gm, measure_latency(problem, gm, "host", **FAST)


def test_table_of_a_small_cnn(cnn, tuning_dir):
    problem, gm, table = cnn
    assert table.target == "host" and table.device == "local"
    assert list(table.layers) == [layer.name for layer in problem.layers]
    full = {g.id: g.size for g in problem.groups}
    for i, layer in enumerate(problem.layers):
        entry = table.layers[layer.name]
        assert entry.full == (layer.out_channels.value(full), layer.in_channels.value(full))
        assert sorted(entry.points) == sorted(layer_points(problem, i))
        assert all(ms > 0 and math.isfinite(ms) for ms in entry.points.values())
    # the residual block's convs are one program shape: measured once, one figure
    block = [table.layers[n] for n in ("block_0", "block_3")]
    assert block[0].shape == block[1].shape and block[0].points[(32, 32)] == \
        block[1].points[(32, 32)]
    assert table.unpruned_ms == pytest.approx(sum(t.points[t.full]
                                                  for t in table.layers.values()))
    # every figure sits in the cache next to the tuning database; a second call reads it
    path = cache_path("host")
    assert path.parent.parent == tuning_dir and path.name == "latency.json"
    entries = json.loads(path.read_text())["entries"]
    shapes = {t.shape for t in table.layers.values()}
    assert shapes <= {k.split("|")[-1] for k in entries}
    again = measure_latency(problem, gm, "host", **FAST)
    assert again.measured == 0 and again.seconds == 0.0 and _points(again) == _points(table)
    # saved and loaded as JSON
    loaded = LatencyTable.load(table.save(tuning_dir / "cnn-table.json"))
    assert loaded.to_dict() == table.to_dict()
    assert "latency table for host on local" in table.summary()


def test_model_reproduces_the_measured_cross(cnn):
    """On the cross through the unpruned point the model gives the measured figures."""
    problem, _, table = cnn
    timed = attach_latency(problem, table)
    assert timed.reference["latency_ms"] == pytest.approx(table.unpruned_ms)
    full = {g.id: g.size for g in problem.groups}
    levels = {g.id: g.levels for g in problem.groups}
    checked = 0
    for i, layer in enumerate(problem.layers):
        points = table.layers[layer.name].points
        out, inp = layer.out_channels, layer.in_channels
        if len(out.terms) > 1 or len(inp.terms) > 1 or {g for g, _ in out.terms} & {
                g for g, _ in inp.terms}:
            continue
        for g, _ in out.terms:
            for kept in levels[g]:
                state = full | {g: kept}
                expect = points[(out.value(state), inp.value(full))]
                assert layer_latency(timed, i, state) == pytest.approx(expect)
                checked += 1
        for g, _ in inp.terms:
            for kept in levels[g]:
                state = full | {g: kept}
                expect = points[(out.value(full), inp.value(state))]
                assert layer_latency(timed, i, state) == pytest.approx(expect)
                checked += 1
    assert checked >= 10


def test_ilp_and_greedy_meet_latency_budgets(cnn):
    problem, _, table = cnn
    timed = attach_latency(problem, table)
    full_ms = timed.reference["latency_ms"]
    low = minimum_costs(timed, ["latency_ms"])["latency_ms"]
    assert 0 < low < full_ms
    previous = None
    for frac in (0.8, 0.5, 0.2):
        limit = low + frac * (full_ms - low)
        s = get_solver("ilp").solve(timed, Budget(latency_ms=limit))
        assert s.feasible and s.costs["latency_ms"] <= limit
        assert s.costs == problem_costs(timed, s)
        assert s.costs["latency_ms"] == pytest.approx(sum(
            layer_latency(timed, i, s.kept) for i in range(len(timed.layers))))
        assert any(s.kept[g.id] < g.size for g in timed.groups)  # below unpruned: pruned
        if previous is not None:  # a tighter budget costs at least as much sensitivity
            assert s.objective >= previous.objective - 1e-9
        previous = s
        try:
            g = get_solver("greedy").solve(timed, {"latency_ms": limit})
        except InfeasibleBudgetError as err:  # measured latency may not fall level by level
            assert "greedy descent stopped" in str(err) and "'ilp'" in str(err)
        else:
            assert g.feasible and g.costs["latency_ms"] <= limit
            assert g.objective >= s.objective - 1e-9  # never better than the exact optimum
    # ratios resolve against the table's unpruned total
    assert resolve_limits(timed, Budget(latency_ms="2x"), latency=True) == \
        {"latency_ms": pytest.approx(full_ms / 2)}
    with pytest.raises(InfeasibleBudgetError, match=r"latency_ms <= .* ms asked, smallest "
                                                    r"reachable is .* ms") as info:
        get_solver("ilp").solve(timed, Budget(latency_ms=low * 0.9))
    assert info.value.minimum["latency_ms"] == pytest.approx(low)
    assert f"{low:.4g} ms" in str(info.value)


def test_tighter_budget_prunes_more(chain):
    problem, _, table = chain
    timed = attach_latency(problem, table)
    (group,) = problem.groups
    assert group.levels == (16, 12, 8, 4)
    points = table.layers["_0"].points, table.layers["_2"].points
    cost = {k: points[0][(k, 3)] + points[1][(4, k)] for k in group.levels}  # by hand
    kept_seen = []
    for limit in sorted({cost[k] * 1.000001 for k in group.levels}, reverse=True):
        s = get_solver("ilp").solve(timed, {"latency_ms": limit})
        # by hand: the least pruning whose table cost meets the limit
        assert s.kept[group.id] == max(k for k in group.levels if cost[k] <= limit)
        assert s.costs["latency_ms"] == pytest.approx(cost[s.kept[group.id]])
        kept_seen.append(s.kept[group.id])
    assert kept_seen == sorted(kept_seen, reverse=True) and len(kept_seen) == 4
    with pytest.raises(InfeasibleBudgetError, match="latency_ms"):
        get_solver("ilp").solve(timed, {"latency_ms": min(cost.values()) * 0.99})


def test_hand_computed_cost_with_two_groups(three):
    problem, _, table = three
    timed = attach_latency(problem, table)
    a, b = (g.id for g in problem.groups)
    levels = {g.id: g.levels for g in problem.groups}
    assert levels == {a: (8, 4), b: (8, 4)}
    t1, t2, t3 = (table.layers[n].points for n in ("_0", "_2", "_4"))

    def by_hand(ka, kb):  # the middle layer off the cross: t(o, I) * t(O, i) / t(O, I)
        return t1[(ka, 3)] + t2[(kb, 8)] * t2[(8, ka)] / t2[(8, 8)] + t3[(4, kb)]

    assert t2.keys() == {(8, 8), (4, 8), (8, 4)}  # measured: the cross only
    best_bits = sum(min(layer.sensitivity) for layer in timed.layers)
    combos = list(itertools.product(levels[a], levels[b]))
    for ka, kb in combos:
        assert problem_costs(timed, bits={n.name: (8, 8) for n in timed.layers},
                             kept={a: ka, b: kb})["latency_ms"] == pytest.approx(by_hand(ka, kb))
    sens = {g.id: dict(zip(g.levels, g.sensitivity)) for g in problem.groups}
    for limit in sorted({by_hand(*c) * 1.000001 for c in combos}):
        feasible = [c for c in combos if by_hand(*c) <= limit]
        best = min(sens[a][ka] + sens[b][kb] for ka, kb in feasible)
        s = get_solver("ilp").solve(timed, {"latency_ms": limit})
        assert s.costs["latency_ms"] == pytest.approx(by_hand(s.kept[a], s.kept[b]))
        assert s.costs["latency_ms"] <= limit
        assert s.objective == pytest.approx(best + best_bits)  # the brute-force optimum


def test_solvers_without_latency_support(chain):
    problem, _, table = chain
    timed = attach_latency(problem, table)
    for name in ("uniform8", "prune8", "uniform4"):
        with pytest.raises(UnsupportedBudgetError, match="only the 'ilp' and 'greedy'"):
            get_solver(name).solve(timed, Budget(latency_ms="2x"))
    for name in ("ilp", "greedy"):  # no table attached
        with pytest.raises(UnsupportedBudgetError, match="measured latency table"):
            get_solver(name).solve(problem, Budget(latency_ms=1))
    # a table measured for other levels does not fit
    other, _ = _problem(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 4, 3)), (1, 3, 24, 24),
                        keep_levels=(1.0, 0.6), multiple=1)
    with pytest.raises(LatencyError, match=r"lacks 10 out x 3 in channels"):
        attach_latency(other, table)
    with pytest.raises(LatencyError, match=r"no layer '_0' \(it has \['x'\]"):
        attach_latency(problem, LatencyTable("host", "local", {"x": LayerTable("s", (1, 1),
                                                                              {(1, 1): 1.0})}))


def test_compile_with_a_latency_budget(cnn, tuning_dir):
    problem, _, table = cnn
    torch.manual_seed(0)
    model, x = DigitsCNN().eval(), torch.randn(*CNN_INPUT)
    timed = attach_latency(problem, table)
    low = minimum_costs(timed, ["latency_ms"])["latency_ms"]
    limit = low + 0.5 * (timed.reference["latency_ms"] - low)
    c = pqcompile.compile(model, (x,), target="host", keep_levels=(1.0, 0.5),
                          budget=Budget(latency_ms=limit), latency_table=table)
    assert c.latency_table is table
    assert c.solution.costs["latency_ms"] <= limit
    extra = c.artifact.manifest["extra"]["latency"]
    assert extra["predicted_ms"] == c.solution.costs["latency_ms"]
    assert extra["unpruned_ms"] == pytest.approx(table.unpruned_ms)
    assert extra["measured"] == "host on local"
    # measured by compile itself: the same figures, from the cache
    auto = pqcompile.compile(model, (x,), target="host", keep_levels=(1.0, 0.5),
                             budget=f"latency_ms={limit}ms")
    assert auto.latency_table.measured == 0 and _points(auto.latency_table) == _points(table)
    assert auto.solution.kept == c.solution.kept
    assert auto.solution.costs["latency_ms"] == pytest.approx(c.solution.costs["latency_ms"])


def test_compile_latency_argument_errors(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedBudgetError, match="solver 'uniform8' cannot bound latency"):
        pqcompile.compile(model, (x,), target="host", budget="latency_ms=2x", solver="uniform8")
    with pytest.raises(OptionError, match=r"target 'arm' runs on aarch64 .* latency_rpc="
                                          r"'HOST:PORT'.*latency_rpc='emulator' to time it "
                                          r"under qemu-aarch64"):
        pqcompile.compile(model, (x,), target="arm", budget="latency_ms=2x")
    with pytest.raises(OptionError, match="latency_rpc says where"):
        pqcompile.compile(model, (x,), target="host", budget="bops=4x", latency_rpc="emulator")
    with pytest.raises(OptionError, match="runs another architecture"):
        pqcompile.compile(model, (x,), target="host", budget="latency_ms=2x",
                          latency_rpc="emulator")
    with pytest.raises(LatencyError, match="cannot read a latency table"):
        pqcompile.compile(model, (x,), target="host", budget="latency_ms=2x",
                          latency_table=tmp_path / "missing.json")
    arm_table = LatencyTable("arm", "local", {})
    with pytest.raises(OptionError, match="measured for target 'arm'"):
        pqcompile.compile(model, (x,), target="host", budget="latency_ms=2x",
                          latency_table=arm_table)


def test_arm_table_over_rpc_under_qemu(sysroot, tuning_dir):
    """A two-layer table for 'arm' timed by the aarch64 RPC server under qemu-user."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    problem, gm = _problem(model, (1, 3, 8, 8))
    with local_server("aarch64") as address:
        table = measure_latency(problem, gm, "arm", rpc=str(address), repeat=2,
                                min_repeat_ms=1)
    assert table.target == "arm" and table.device.startswith("rpc ")
    assert table.device.endswith("aarch64") and table.measured == 4
    assert {n: sorted(t.points) for n, t in table.layers.items()} == \
        {"_0": [(4, 3), (8, 3)], "_2": [(4, 4), (4, 8)]}
    assert all(ms > 0 for t in table.layers.values() for ms in t.points.values())
    assert cache_path("arm").exists() and cache_path("arm") != cache_path("host")
    timed = attach_latency(problem, table)
    s = get_solver("ilp").solve(timed, Budget(latency_ms="1x"))
    assert s.costs["latency_ms"] <= timed.reference["latency_ms"] * (1 + 1e-9)


def test_cli_latency_rpc_reaches_compile(tmp_path, capsys):
    from pqcompile.cli import main

    args = ["compile", "--model", "pqcompile.models:resnet20", "--input-shape", "1,3,32,32",
            "--budget", "latency_ms=2x", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(args + ["--target", "arm"]) == 2
    assert "Give latency_rpc='HOST:PORT' (--latency-rpc on the command line)" in \
        capsys.readouterr().err
    assert main(args + ["--target", "host", "--latency-rpc", "emulator"]) == 2
    assert "latency_rpc='emulator' runs another architecture" in capsys.readouterr().err
