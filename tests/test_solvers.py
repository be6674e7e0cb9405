"""Solvers over the pure-data problem: the cost model against the really pruned graph, the ILP
against brute force, budgets, ties, pins, infeasibility, determinism and the baselines."""

import itertools
import time

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pqcompile.budget import Budget, InfeasibleBudgetError, UnsupportedBudgetError
from pqcompile.build import analysis
from pqcompile.meta import BITS, CHANNEL_GROUPS, COST, COST_TOTALS
from pqcompile.models import resnet20
from pqcompile.passes import CostAnalysis, PruneChannels, predicted_macs
from pqcompile.passes.cost import activation_products
from pqcompile.solvers import (
    Affine,
    GreedySolver,
    Group,
    ILPSolver,
    Layer,
    Problem,
    build_problem,
    evaluate,
    get_solver,
    keep_count,
    list_solvers,
    problem_costs,
    to_assignment,
)



class Mixed(nn.Module):
    """A concat read by one conv, a conv whose input and output are one group (residual), a
    depthwise conv with multiplier 2, a grouped conv, BN and PReLU params, a flatten-linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.c = nn.Conv2d(14, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.square = nn.Conv2d(16, 16, 1)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(32, 16, 3, padding=1, groups=4)
        self.prelu = nn.PReLU(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))))
        y = y + self.square(y)
        y = self.prelu(self.grouped(torch.relu(self.dw(y))))
        y = nn.functional.adaptive_avg_pool2d(y, 4)
        return self.fc(y.flatten(1))


class Attention(nn.Module):
    """``q`` is called twice (one weight tensor) and its output feeds matmuls."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.h, self.h2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.q, self.k, self.o = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.ln(x)
        x = x + self.h2(torch.relu(self.h(x)))
        a = self.q(x) @ self.k(x).transpose(-1, -2)
        return self.o(torch.softmax(a, -1) @ self.q(x))


def _graph(name):
    torch.manual_seed(0)
    if name == "resnet20":
        return analysis(resnet20().eval(), (torch.randn(1, 3, 32, 32),))
    if name == "mobilenet_v2":
        return analysis(torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 64, 64),))
    if name == "attention":
        return analysis(Attention().eval(), (torch.randn(2, 5, 16),))
    return analysis(Mixed().eval(), (torch.randn(1, 3, 8, 8),))


@pytest.fixture(scope="module")
def graphs():
    return {}


@pytest.fixture
def graph(graphs, request):
    name = request.param
    if name not in graphs:
        graphs[name] = _graph(name)
    return graphs[name]


def _compiled_costs(gm, solution, validate=True):
    """Costs of the really pruned graph annotated with the solution's bits."""
    a = to_assignment(solution, gm)
    if validate:  # random bits need not tie activations; solver output must
        a.validate(gm)
    pruned = PruneChannels(a.masks)(gm).graph_module
    for n in pruned.graph.nodes:
        if n.name in a.bits:
            BITS.set(n, a.bits[n.name])
    t = COST_TOTALS.get(CostAnalysis()(pruned).graph_module)
    return {"bops": t.bops, "macs": t.macs, "weight_bytes": t.weight_bytes}


MODELS = ["resnet20", "mobilenet_v2", "mixed", "attention"]


@pytest.mark.parametrize("graph", MODELS, indirect=True)
def test_macs_model_matches_predicted_macs_for_any_keep_counts(graph):
    p = build_problem(graph, None, None)
    groups = CHANNEL_GROUPS.get(graph)
    rng = np.random.default_rng(1)
    for _ in range(4):
        kept = {g.id: int(rng.integers(1, g.size + 1)) for g in p.groups}
        masks = {}
        for gid, k in kept.items():
            m = np.zeros(groups[gid].size, bool)
            m[rng.permutation(groups[gid].size)[:k]] = True
            masks[gid] = m
        bits = {layer.name: layer.options[0] for layer in p.layers}
        assert problem_costs(p, bits=bits, kept=kept)["macs"] == predicted_macs(graph, masks)


@pytest.mark.parametrize("graph", MODELS, indirect=True)
def test_cost_model_matches_cost_analysis_on_pruned_graph(graph):
    p = build_problem(graph, None, None, pin_first_last=False)
    full = evaluate(p, {layer.name: (32, 32) for layer in p.layers}, {})
    fp32 = COST_TOTALS.get(graph)
    # Weight bytes are the integer program's storage (per-channel words, float64 constants):
    # at 32/32 bits they are not the FP32 model's. Nor are the BOPs of the attention products,
    # which the program computes on 8-bit integers whatever the layers' bits.
    products = sum(COST.get(n).macs for n in graph.graph.nodes
                   if n.name in activation_products(graph))
    assert (full.costs["bops"], full.costs["macs"]) == \
        (fp32.fp32_bops - products * (32 * 32 - 8 * 8), fp32.macs)
    # Stored bytes are those of a program, and no program has 32-bit layers: the problem
    # counts what the program stores beside its layers (folded constants, tables, the fixed-
    # point softmax's 1 KiB of exponentials) at the bits a program has, so compare at 8/8.
    eight = evaluate(p, {layer.name: (8, 8) for layer in p.layers}, {})
    assert eight.costs == _compiled_costs(graph, eight, validate=False)
    rng = np.random.default_rng(0)
    for _ in range(3):
        bits = {layer.name: layer.options[rng.integers(len(layer.options))]
                for layer in p.layers}
        kept = {g.id: int(rng.choice(g.levels)) for g in p.groups}
        sol = evaluate(p, bits, kept)
        assert sol.costs == _compiled_costs(graph, sol, validate=False)


@pytest.mark.parametrize("graph", ["mixed"], indirect=True)
def test_problem_structure(graph):
    p = build_problem(graph, None, None)
    layers = {layer.name: layer for layer in p.layers}
    ids = {g.name: g.id for g in p.groups}
    # The concat sums two groups; the residual conv squares one; depthwise scales once. The
    # grouped conv ties channel k of its 4 groups, so a "c:out" channel is 4 conv channels,
    # 8 after the depthwise multiplier 2, and 2 per group at the grouped conv's input.
    c = ids["c:out"]
    assert layers["c"].in_channels == Affine(0, ((ids["a:out"], 1), (ids["b:out"], 1)))
    assert layers["square"].in_channels == layers["square"].out_channels == Affine(0, ((c, 4),))
    assert layers["dw"].in_channels == Affine(1)
    assert layers["dw"].out_channels == Affine(0, ((c, 8),))
    assert layers["grouped"].in_channels == Affine(0, ((c, 2),))
    # The first and last layer are pinned; b reads the input like a (one activation key).
    assert layers["a"].options == layers["fc"].options == ((8, 8),)
    assert layers["a"].activation_key == layers["b"].activation_key == "x"
    assert p.activation_sets() == {"x": (0, 1)}


@pytest.mark.parametrize("graph", ["attention"], indirect=True)
def test_matmul_groups_stay_whole_and_shared_modules_share_weight_bits(graph):
    p = build_problem(graph, None, None)
    assert [g.name for g in p.groups] == ["h:out"]  # "q:out" feeds a matmul: held whole
    # the two attention products: integer, 8 x 8 bits a MAC
    assert p.fixed_macs == 2 * (5 * 8 * 5 + 5 * 5 * 8) and p.fixed_bops == p.fixed_macs * 64
    assert p.weight_sets() == {"q": (2, 4)}
    sens = {layer.name: dict(zip(layer.options, layer.sensitivity)) for layer in p.layers}
    sens["q_1"] = {o: 0.0 for o in sens["q_1"]}  # q_1 alone would drop to 2-bit weights
    q = build_problem(graph, sens, None)
    sol = ILPSolver().solve(q, Budget(bops="10x"))
    assert sol.bits["q"][0] == sol.bits["q_1"][0]
    assert _compiled_costs(graph, sol) == sol.costs
    greedy = GreedySolver().solve(q, Budget(bops="10x"))
    assert greedy.bits["q"][0] == greedy.bits["q_1"][0] and greedy.feasible


@pytest.mark.parametrize("graph", ["mixed"], indirect=True)
def test_to_assignment_keeps_the_highest_scores(graph):
    p = build_problem(graph, None, None)
    c = next(g for g in p.groups if g.name == "c:out")
    sol = evaluate(p, {layer.name: layer.options[0] for layer in p.layers}, {c.id: 2})
    scores = {c.id: np.array([0.5, 3.0, 0.1, 2.0])}
    a = to_assignment(sol, graph, scores)
    assert a.masks[c.id].tolist() == [False, True, False, True] and len(a.masks) == 1
    a = to_assignment(sol, graph, lambda gm, group: np.arange(group.size, dtype=float))
    assert a.masks[c.id].tolist() == [False, False, True, True]
    assert a.bits["a"].weight == 8 and set(a.bits) == {layer.name for layer in p.layers}
    with pytest.raises(ValueError, match="no channel scores for group"):
        to_assignment(sol, graph, {})


def test_keep_levels_and_multiple():
    assert keep_count(16, 0.25, 8) == 8 and keep_count(16, 0.75, 8) == 16
    assert keep_count(10, 0.25, 1) == 3 and keep_count(3, 0.1, 1) == 1
    gm = _graph("resnet20")
    p = build_problem(gm, None, None, multiple=8, keep_levels=(0.5, 0.25))
    assert {g.size: g.levels for g in p.groups} == {16: (16, 8), 32: (32, 16, 8), 64: (64, 32, 16)}
    for g in p.groups:  # removing least important first: sensitivities grow with pruning
        assert g.sensitivity[0] == 0 and list(g.sensitivity) == sorted(g.sensitivity)


def test_build_problem_validation():
    gm = _graph("mixed")
    names = [layer.name for layer in build_problem(gm, None, None).layers]
    full = {n: {o: 0.1 for o in itertools.product((2, 4, 8), (4, 8))} for n in names}
    with pytest.raises(ValueError, match="no sensitivities for layer 'b'"):
        build_problem(gm, {k: v for k, v in full.items() if k != "b"}, None)
    with pytest.raises(ValueError, match=r"sensitivities\['c'\]\[\(2, 4\)\]"):
        build_problem(gm, dict(full, c={**full["c"], (2, 4): -1.0}), None)
    with pytest.raises(ValueError, match="unknown layers"):
        build_problem(gm, dict(full, nope={}), None)
    with pytest.raises(ValueError, match="multiple"):
        build_problem(gm, full, None, multiple=0)
    with pytest.raises(ValueError, match="fractions in"):
        build_problem(gm, full, None, keep_levels=(1.5,))
    with pytest.raises(ValueError, match="pair"):
        build_problem(gm, full, None, bit_options=[(4,)])
    with pytest.raises(ValueError, match="finite values >= 0"):
        build_problem(gm, full, {g.id: [-1.0] * g.size for g in CHANNEL_GROUPS.get(gm)})
    p = build_problem(gm, full, None, layer_options={"c": [(4, 8)]})
    assert p.layer("c").options == ((4, 8),)


# --- brute force on small hand-made problems -----------------------------------------------


def _tiny(seed):
    rng = np.random.default_rng(seed)
    pool = [(8, 8), (8, 4), (4, 8), (4, 4), (2, 4)]

    def options(pin=False):
        if pin:
            return ((8, 8),)
        idx = sorted(rng.choice(len(pool), size=int(rng.integers(2, 4)), replace=False))
        return tuple(pool[i] for i in idx) + ((4, 4),) * (not any(pool[i] == (4, 4)
                                                               for i in idx))

    def layer(name, out, inn, key, pin=False):
        opts = options(pin)
        sens = tuple(0.0 if o == (8, 8) else float(rng.uniform(0, 1) * 16 / (o[0] * o[1]))
                     for o in opts)
        return Layer(name, 0, 0, out, inn, int(rng.integers(1, 9)), int(rng.integers(1, 4)),
                     opts, sens, key)

    groups = (Group(0, "g0", 6, (6, 4, 2), (0.0, *sorted(rng.uniform(0, 2, 2)))),
              Group(1, "g1", 4, (4, 3, 1), (0.0, *sorted(rng.uniform(0, 2, 2)))))
    layers = (
        layer("first", Affine(0, ((0, 1),)), Affine(3), "x", pin=True),
        layer("mid", Affine(0, ((1, 2),)), Affine(0, ((0, 1),)), "t0"),
        layer("short", Affine(1, ((1, 1),)), Affine(0, ((0, 1),)), "t0"),  # shares t0
        layer("square", Affine(0, ((1, 1),)), Affine(0, ((1, 1),)), "t1"),
        layer("concat", Affine(5), Affine(2, ((0, 1), (1, 3))), "t2"),
        layer("last", Affine(4), Affine(0, ((1, 1),)), "t3", pin=True),
    )
    p = Problem(layers, groups, Affine(7, ((0, 2), (1, 1))), 11, 11 * 1024, {})
    return p, _brute_force(p)


def _brute_force(p):
    rows = []
    for opts in itertools.product(*(layer.options for layer in p.layers)):
        if opts[1][1] != opts[2][1]:  # "mid" and "short" read one tensor
            continue
        bits = {layer.name: o for layer, o in zip(p.layers, opts)}
        for levels in itertools.product(*(g.levels for g in p.groups)):
            kept = {g.id: k for g, k in zip(p.groups, levels)}
            s = evaluate(p, bits, kept)
            rows.append((s.objective, s.costs))
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_ilp_is_optimal_against_brute_force(seed):
    p, rows = _tiny(seed)
    rng = np.random.default_rng(100 + seed)
    low = {k: min(c[k] for _, c in rows) for k in ("bops", "macs", "weight_bytes")}
    high = {k: max(c[k] for _, c in rows) for k in low}
    keys = ["bops"] + (["weight_bytes"] if seed % 2 else []) + (["macs"] if seed % 3 == 0 else [])
    limits = {k: low[k] + rng.uniform(0.1, 0.6) * (high[k] - low[k]) for k in keys}
    feasible = [o for o, c in rows if all(c[k] <= v for k, v in limits.items())]
    best = min(feasible)
    sol = ILPSolver(mip_rel_gap=0.0).solve(p, limits)
    assert sol.feasible and all(sol.costs[k] <= v for k, v in limits.items())
    assert sol.objective == pytest.approx(best, abs=1e-9)
    assert sol.bits["mid"][1] == sol.bits["short"][1]
    assert sol.bits["first"] == sol.bits["last"] == (8, 8)
    greedy = GreedySolver().solve(p, limits)
    assert greedy.feasible and greedy.objective >= best - 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_infeasible_budget_states_the_minimum(seed):
    p, rows = _tiny(seed)
    low = {k: min(c[k] for _, c in rows) for k in ("bops", "weight_bytes")}
    limits = {"bops": low["bops"] * 0.9, "weight_bytes": low["weight_bytes"] * 2}
    for solver in (ILPSolver(), GreedySolver()):
        with pytest.raises(InfeasibleBudgetError) as info:
            solver.solve(p, limits)
        assert info.value.minimum == low and isinstance(info.value, ValueError)
        assert f"smallest reachable is {int(low['bops']):,}" in str(info.value)
        assert "bops <= " in str(info.value) and "relax" in str(info.value)


# --- real models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r20():
    gm = _graph("resnet20")
    return gm, build_problem(gm, None, None)


def test_ilp_resnet20_60x_honours_budget_on_pruned_graph(r20):
    gm, p = r20
    budget = Budget(bops="60x", weight_bytes="20x")
    limits = budget.resolve(p.reference)
    start = time.perf_counter()
    sol = get_solver("ilp").solve(p, budget)
    seconds = time.perf_counter() - start
    print(f"\nILP resnet20 60x BOPs + 20x bytes: {sol.info['variables']} variables, "
          f"{sol.info['constraints']} constraints, {seconds:.2f} s")
    assert seconds < 30
    assert (compiled := _compiled_costs(gm, sol)) == sol.costs
    assert compiled["bops"] <= limits["bops"] and compiled["weight_bytes"] <= limits["weight_bytes"]
    assert sol.bits["conv1"] == sol.bits["fc"] == (8, 8)
    ties = p.activation_sets()  # downsampling blocks: conv1 and the shortcut share an input
    assert ties and all(len({sol.bits[p.layers[i].name][1] for i in m}) == 1 for m in ties.values())
    greedy = get_solver("greedy").solve(p, budget)
    assert _compiled_costs(gm, greedy)["bops"] <= limits["bops"]
    assert greedy.objective >= sol.objective - 1e-6 * abs(sol.objective)


def test_activation_ties_bind(r20):
    gm, p = r20
    # Untied, the shortcut would take 4-bit activations and its partner 8; tied, both pay the
    # smaller price (5 < 10) and take 4.
    tie = next(iter(p.activation_sets().values()))
    sens = {layer.name: dict(zip(layer.options, layer.sensitivity)) for layer in p.layers}
    short, other = p.layers[tie[1]].name, p.layers[tie[0]].name
    sens[short] = {o: 0.0 if o[1] == 4 else 10.0 for o in sens[short]}
    sens[other] = {o: 5.0 if o[1] == 4 else 0.0 for o in sens[other]}
    q = build_problem(gm, sens, None)
    sol = ILPSolver().solve(q, {"bops": q.reference["bops"]})
    assert sol.bits[short][1] == sol.bits[other][1] == 4


def test_determinism_mobilenet_v2():
    gm = _graph("mobilenet_v2")
    p = build_problem(gm, None, None)
    budget = Budget(bops="60x")
    one = ILPSolver().solve(p, budget)
    two = ILPSolver().solve(build_problem(gm, None, None), budget)
    assert (one.bits, one.kept, one.objective) == (two.bits, two.kept, two.objective)
    assert to_assignment(one, gm) == to_assignment(two, gm)
    assert _compiled_costs(gm, one)["bops"] <= budget.resolve(p.reference)["bops"]


def test_uniform_baselines(r20):
    gm, p = r20
    ref = p.reference
    u8 = get_solver("uniform8").solve(p, Budget(bops="16x"))
    assert u8.costs["bops"] == ref["bops"] // 16 and u8.feasible and u8.info["budget_met"]
    u4 = get_solver("uniform4").solve(p, Budget(bops="60x"))
    first, last = p.layers[0], p.layers[-1]
    expect = sum(layer.fp32_macs * (64 if layer in (first, last) else 16) for layer in p.layers)
    assert u4.costs["bops"] == expect
    assert u4.bits[first.name] == (8, 8) and u4.bits[p.layers[1].name] == (4, 4)
    assert all(u4.kept[g.id] == g.size for g in p.groups)
    assert u4.feasible == (expect <= ref["bops"] / 60)
    assert not get_solver("uniform4").solve(p, {"bops": 1.0}).feasible
    limit = ref["bops"] / 30
    pr = get_solver("prune8").solve(p, {"bops": limit})
    meets = [f for f in p.keep_fractions if problem_costs(
        p, bits=pr.bits, kept={g.id: keep_count(g.size, f) for g in p.groups})["bops"] <= limit]
    assert pr.feasible and pr.info["keep_fraction"] == max(meets) < 1
    assert all(b == (8, 8) for b in pr.bits.values())
    assert _compiled_costs(gm, pr) == pr.costs
    assert not get_solver("prune8").solve(p, Budget(bops="1000x")).feasible


def test_registry_and_latency():
    assert {"ilp", "greedy", "uniform4", "uniform8", "prune8", "sbs", "ajpq", "fitcompress",
            "picpq"} <= set(list_solvers())
    with pytest.raises(ValueError, match="registered solvers: ajpq, fitcompress, greedy, ilp"):
        get_solver("hawq")
    p, _ = _tiny(0)
    for name in ("ilp", "greedy", "uniform8"):
        with pytest.raises(UnsupportedBudgetError, match="measured latency table"):
            get_solver(name).solve(p, Budget(latency_ms=5))
    with pytest.raises(ValueError, match="mip_rel_gap"):
        ILPSolver(mip_rel_gap=2)
