"""PIC-PQ: the bits rule on hand-computed cases, the HRank filter property on feature maps of
known rank (and its Linear fallback), the 10% floor of the global pruning, the bisection to the
budget, the evolution improving on its initial population, and feasibility, ties and
determinism on the CNN, the MLP and the encoder."""

import functools
import itertools
import math

import numpy as np
import pytest
import solver_models as sm
import torch
from torch import nn

from pqcompile.budget import Budget, InfeasibleBudgetError
from pqcompile.build import analysis
from pqcompile.meta import CHANNEL_GROUPS
from pqcompile.solvers import build_problem, get_solver, problem_costs
from pqcompile.solvers.picpq import PICPQSolver, bit_rule, filter_property, snap_down
from pqcompile.solvers.problem import resolve_limits
from pqcompile.solvers.search import SearchContext

SMALL = {"population": 3, "tournament": 2, "cycles": 4}


@functools.cache
def _context(name):
    return sm.context(name)


def _limits(ctx, ratio):
    return resolve_limits(ctx.problem, Budget.reduction(bops=ratio))


# --- the bits rule ------------------------------------------------------------------------------


def test_bit_rule_hand_cases():
    p = 1 / 6
    assert bit_rule(8, 0.5, p) == 7  # 8 - ceil(1/3)
    assert snap_down(bit_rule(8, 0.5, p), (2, 4, 8)) == 4
    assert snap_down(bit_rule(8, 0.5, p), (2, 3, 4, 5, 6, 7, 8)) == 7
    assert bit_rule(8, 1 / 12, p) == 6  # 8 - ceil(2), not 8 - 3 by rounding
    assert bit_rule(8, 1.0, p) == 8  # nothing pruned: Bmax
    assert bit_rule(4, 1 / 16, p) == 1 and snap_down(1, (2, 4, 8)) == 2  # lowest option
    assert bit_rule(6, 1 / 12, 1 / 3) == 2  # the penalty factor scales the step


def test_bits_rule_on_the_cnn_layers():
    """Pruning half of the stem group: the stem is pinned at 8/8, ``down_0`` (its consumer,
    stage 1: Bmax 8) drops by ceil(p / s) from the hand-computed L1 fraction ``s`` of its kept
    input columns, snapped down to its options; untouched layers of stage 2 sit at Bmax 6 ->
    4; the pinned fc stays 8/8."""
    ctx = _context("cnn")
    solver = PICPQSolver()
    space = solver.space(ctx.problem, ctx)
    keep = np.zeros(16, dtype=bool)
    keep[np.argsort(-space.groups[0].scores, kind="stable")[:8]] = True
    w = ctx.graph.get_submodule("down.0").weight.detach().abs().double()
    s = float(w[:, torch.from_numpy(keep)].sum() / w.sum())
    fractions = space.weight_fractions({0: 8, 1: 32, 2: 32})
    assert fractions[1] == pytest.approx(s, rel=1e-12) and 0.3 < s < 0.7
    down = snap_down(8 - math.ceil(1 / 6 / s), (2, 4, 8))
    assert down == 4
    assert space.bits({0: 8, 1: 32, 2: 32}) == {
        "stem_0": (8, 8), "down_0": (down, down), "block_0": (4, 4), "block_3": (4, 4),
        "fc": (8, 8)}
    # Nothing pruned: every layer at its stage's Bmax.
    assert space.bits({0: 16, 1: 32, 2: 32})["down_0"] == (8, 8)
    # The residual group touches down_0, block_0, block_3 (Bmax 4 -> 4 - 1 -> 2) and the fc.
    pruned = space.bits({0: 16, 1: 16, 2: 32})
    assert pruned["block_0"][0] == pruned["block_3"][0] == 2 and pruned["fc"] == (8, 8)
    assert pruned["block_0"] == (2, 4)  # no 2-bit activations: the nearest option


# --- the filter property ------------------------------------------------------------------------


def _images():
    """Two 2-channel 8x8 images: channel 0 of rank 1 then 2, channel 1 of rank 3 then 2, on
    disjoint rows and columns (so any mix of both channels has the summed rank)."""
    e = torch.eye(8)
    one = torch.stack([e[0:1].T @ e[0:1], e[1:4].T @ e[1:4]])
    two = torch.stack([e[0:2].T @ e[0:2], e[4:6].T @ e[4:6]])
    return [(one.unsqueeze(0),), (two.unsqueeze(0),)]


def _producer_group(gm, node):
    return next(g for g in CHANNEL_GROUPS.get(gm)
                if any(m.node == node and m.role == "out" for m in g.members))


def test_hrank_property_equals_hand_computed_ranks():
    conv = nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]]).view(4, 2, 1, 1))
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 1, 1)).eval()
    batches = _images()
    gm = analysis(model, batches[0])
    g = _producer_group(gm, "_0")
    # Per image: ranks (1, 3, 4, 0) then (2, 2, 4, 0); averaged over the two batches.
    np.testing.assert_allclose(filter_property(gm, [g], batches)[g.id], [1.5, 2.5, 4.0, 0.0])


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False)
        self.c = nn.Conv2d(2, 1, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 0], [0, 1]]).view(2, 2, 1, 1))
            self.b.weight.copy_(torch.tensor([[0.0, 0], [1, 1]]).view(2, 2, 1, 1))

    def forward(self, x):
        return self.c(torch.relu(self.a(x) + self.b(x)))


def test_hrank_of_a_residual_group_averages_its_producers():
    batches = _images()
    gm = analysis(_Residual().eval(), batches[0])
    g = _producer_group(gm, "a")
    assert {m.node for m in g.members if m.role == "out"} == {"a", "b"}
    # a: (1.5, 2.5), b: (0, 4) -> mean (0.75, 3.25)
    np.testing.assert_allclose(filter_property(gm, [g], batches)[g.id], [0.75, 3.25])


def test_linear_property_is_the_channel_std_over_samples_and_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 3, 4) * torch.tensor([1.0, 2, 3, 4])
    gm = analysis(model, (x,))
    g = _producer_group(gm, "_0")
    want = model[0](x).detach().reshape(-1, 6).double().std(0, correction=0).numpy()
    np.testing.assert_allclose(filter_property(gm, [g], [(x,)])[g.id], want, rtol=1e-6)
    assert np.ptp(want) > 0.1  # the channels differ: the fallback is not a constant


# --- the global pruning and the bisection ---------------------------------------------------------


def test_global_pruning_keeps_ten_percent_of_each_group():
    """Levels down to 1/32 of a group: the 10% floor, not the levels, stops the pruning."""
    ctx = _context("cnn")
    problem = build_problem(ctx.graph, None, None,
                            keep_levels=(1.0, 0.5, 0.25, 0.1, 0.05, 1 / 32))
    fine = SearchContext(problem, ctx.graph, teacher=ctx.teacher, data=ctx.data,
                         held_out=ctx.held_out, channel_scores=ctx.channel_scores)
    space = PICPQSolver().space(problem, fine)
    rng = np.random.default_rng(0)
    for _ in range(3):
        a, b = np.exp(rng.normal(size=3)), rng.normal(size=3)
        order = space.order(a, b)
        kept = space.kept(order, len(order))
        assert kept == {0: 2, 1: 4, 2: 4}  # ceil(10% of 16) = 2, ceil(10% of 32) = 4
        assert all(kept[g.id] >= 0.1 * g.size and g.levels[-1] < kept[g.id]
                   for g in problem.groups)
    # min_keep=0: the lowest levels bind instead.
    bare = PICPQSolver(min_keep=0.0).space(problem, fine)
    order = bare.order(np.ones(3), np.zeros(3))
    assert bare.kept(order, len(order)) == {0: 1, 1: 1, 2: 1}
    # The solver at a budget needing most of that pruning keeps the floor too.
    s = PICPQSolver(**SMALL).solve(problem, Budget.reduction(bops=900), context=fine)
    assert s.feasible and not s.info["repaired"]
    assert all(s.kept[g.id] >= 0.1 * g.size for g in problem.groups)
    assert s.info["pruned_channels"] > 0.5 * s.info["removable_channels"]


@pytest.mark.parametrize("ratio", [60, 100, 300])
def test_bisection_lands_within_one_level_step_of_the_budget(ratio):
    ctx = _context("cnn")
    solver = PICPQSolver()
    space = solver.space(ctx.problem, ctx)
    limits = _limits(ctx, ratio)
    rng = np.random.default_rng(ratio)
    for a, b in [(np.ones(3), np.zeros(3)), (np.exp(rng.normal(size=3)), rng.normal(size=3))]:
        bits, kept, n, repaired = solver.target(space, a, b, limits, ctx)
        assert not repaired and n > 0
        assert problem_costs(ctx.problem, bits=bits, kept=kept)["bops"] <= limits["bops"]
        order = space.order(a, b)
        before = space.candidate(order, n - 1)
        assert before[1] != kept  # one channel less removed = one level step up ...
        over = problem_costs(ctx.problem, bits=before[0], kept=before[1])["bops"]
        assert over > limits["bops"]  # ... misses the budget


# --- the evolution ----------------------------------------------------------------------------


def test_evolution_improves_on_its_initial_population_and_never_worsens():
    ctx = _context("cnn")
    s = PICPQSolver(population=3, tournament=2, cycles=6, seed=0).solve(
        ctx.problem, Budget.reduction(bops=60), context=ctx)
    hist = s.info["fitness_history"]
    assert len(hist) == 7 and s.info["evaluations"] == 9
    assert all(b <= a for a, b in itertools.pairwise(hist))
    assert hist[-1] < 0.5 * hist[0]  # 2.62 -> 0.66 held-out cross entropy
    assert s.info["best_loss"] == hist[-1]
    # The answer is the best candidate: measured again, it has the best fitness.
    fq = ctx.fake_quant(ctx.assignment(s.bits, s.kept, s.info["channel_scores"]))
    assert ctx.measure(fq)[0] == pytest.approx(hist[-1], rel=1e-6)
    assert s.info["best_accuracy"] > 0.75


# --- feasibility, ties, determinism, repair -------------------------------------------------------


@pytest.mark.parametrize("name,ratio,extra", [("cnn", 60, {}), ("mlp", 60, {"finetune_steps": 1}),
                                              ("encoder", 8, {})])
def test_feasible_and_honors_ties(name, ratio, extra):
    ctx = _context(name)
    p = ctx.problem
    s = PICPQSolver(**SMALL, **extra).solve(p, Budget.reduction(bops=ratio), context=ctx)
    assert s.feasible and s.solver == "picpq" and sm.bops_ratio(ctx, s) >= ratio
    assert all(s.bits[lay.name] in lay.options for lay in p.layers)
    assert all(s.kept[g.id] in g.levels for g in p.groups)
    for which, sets in ((1, p.activation_sets()), (0, p.weight_sets())):
        for members in sets.values():
            assert len({s.bits[p.layers[i].name][which] for i in members}) == 1
    ctx.assignment(s.bits, s.kept, s.info["channel_scores"]).validate(ctx.graph)
    assert {g: len(v) for g, v in s.info["channel_scores"].items()} == \
        {g.id: g.size for g in p.groups}
    assert s.info["evaluations"] == (SMALL["population"] + SMALL["cycles"] if p.groups else 1)
    assert math.isfinite(s.info["best_loss"]) and s.info["seconds"] > 0
    if name == "encoder":  # q, k, v read one tensor: one activation width (stages 8 vs 6->4)
        assert s.bits["q"][1] == s.bits["k"][1] == s.bits["v"][1] == 8
        assert s.bits["v"][0] == 4


def test_same_seed_same_solution_and_global_rng_untouched():
    ctx = _context("cnn")
    state = torch.get_rng_state()
    runs = [PICPQSolver(**SMALL, seed=3).solve(ctx.problem, Budget.reduction(bops=100),
                                                context=ctx) for _ in range(2)]
    assert torch.equal(state, torch.get_rng_state())
    assert runs[0].bits == runs[1].bits and runs[0].kept == runs[1].kept
    assert runs[0].info["fitness_history"] == runs[1].info["fitness_history"]
    assert runs[0].info["best_transform"] == runs[1].info["best_transform"]


def test_repair_when_the_rule_misses_and_infeasible_budget():
    ctx = _context("cnn")
    # The rule at the most pruning reaches ~1036x; the search space ~1149x.
    s = PICPQSolver(**SMALL).solve(ctx.problem, Budget.reduction(bops=1100), context=ctx)
    assert s.feasible and s.info["repaired"] and sm.bops_ratio(ctx, s) >= 1100
    with pytest.raises(InfeasibleBudgetError, match="smallest reachable"):
        PICPQSolver(**SMALL).solve(ctx.problem, Budget.reduction(bops=5000), context=ctx)


def test_options_are_validated_and_registered():
    for kw, word in [({"population": 1}, "population"), ({"tournament": 17}, "tournament"),
                     ({"mutate_fraction": 0}, "mutate_fraction"), ({"penalty": -1}, "penalty"),
                     ({"stage_bits": ()}, "stage_bits"), ({"min_keep": 1.0}, "min_keep"),
                     ({"cycles": -1}, "cycles"), ({"rank_batches": 0}, "rank_batches")]:
        with pytest.raises(ValueError, match=word):
            PICPQSolver(**kw)
    solver = get_solver("picpq", cycles=2)
    assert isinstance(solver, PICPQSolver) and solver.needs_context and solver.name == "picpq"
