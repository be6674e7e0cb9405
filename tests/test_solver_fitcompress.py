"""FITCompress: the FIT model, the variance-stopped Fisher, the path that stops exactly at the
budget, Fisher-ordered channel pruning, refreshes, ties, determinism and errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from solver_models import bops_ratio, context

from pqcompile.budget import Budget, InfeasibleBudgetError
from pqcompile.criteria import FisherTrace, prepare
from pqcompile.meta import CHANNEL_GROUPS
from pqcompile.passes.sensitivity import channel_importance, layer_sensitivities
from pqcompile.solvers import build_problem, evaluate, get_solver, resolve_limits
from pqcompile.solvers.fit_fisher import _initial_stats, _refresh, _Stream
from pqcompile.solvers.fitcompress import FITCompressSolver, _Path, fit_term
from pqcompile.solvers.search import SearchContext

SMALL = {"fisher_min_batches": 2, "fisher_max_batches": 6, "refresh_every": 3,
         "refresh_batches": 1}


@pytest.fixture(scope="module")
def contexts():
    return {}


def _ctx(contexts, name):
    if name not in contexts:
        contexts[name] = context(name)
    return contexts[name]


def _replay(problem, path):
    """Bits and kept counts after each path entry, from the top setting, by each entry's
    from/to (an independent reading of the path)."""
    from pqcompile.solvers.greedy import DescentState
    state = DescentState(problem)
    bits, kept = state.bits(), dict(state.kept)
    nodes = []
    for e in path:
        if e["kind"] == "prune":
            assert kept[e["group"]] == e["from"]
            kept[e["group"]] = e["to"]
        else:
            for name, old, new in zip(e["layers"], e["from"], e["to"]):
                assert tuple(bits[name]) == tuple(old)
                bits[name] = tuple(new)
        nodes.append((dict(bits), dict(kept)))
    return state, nodes


def test_fit_term_scales_as_delta_squared():
    ratio = ((2 ** 8 - 1) / (2 ** 4 - 1)) ** 2
    assert fit_term(3.5, 0.7, 4) / fit_term(3.5, 0.7, 8) == pytest.approx(ratio, rel=1e-12)
    assert fit_term(1.0, 2.0, 8) == pytest.approx((2.0 / 255) ** 2 / 12, rel=1e-12)


def test_layer_fit_is_trace_times_delta_squared_from_the_fisher(contexts):
    """A layer's weight term is sum_r Tr(F_r) (2 max|w_r| / (2^b - 1))^2 / 12 with the
    FisherTrace estimate; halving 8 -> 4 bits multiplies it by (255 / 15)^2 exactly."""
    ctx = _ctx(contexts, "mlp")
    path = _Path(ctx.problem, ctx.graph)
    crit = _initial_stats(ctx, path, _Stream(ctx.data), tol=1e-3, min_batches=2,
                          max_batches=3)
    ref = FisherTrace(loss_fn=F.cross_entropy, tol=1e-3, min_batches=2, max_batches=3)
    ref.calibrate(ctx.graph, ctx.data)
    assert crit.batches == ref.batches == 3
    work = prepare(ctx.graph)
    i = [lay.name for lay in ctx.problem.layers].index("net_3")
    w = work.get_submodule("net.3").weight.detach().double()
    expected = float((ref.fisher["net_3"].sum(1) * (2 * w.abs().amax(1)) ** 2).sum()) \
        / 255 ** 2 / 12
    assert path.weight_fit(i, 8) == pytest.approx(expected, rel=1e-9)
    assert path.weight_fit(i, 4) / path.weight_fit(i, 8) == pytest.approx(17 ** 2, rel=1e-12)
    assert path.activation_fit(i, 4) / path.activation_fit(i, 8) == pytest.approx(17 ** 2,
                                                                                 rel=1e-12)
    assert path.activation_fit(i, 8) > 0
    # Channel importance is FisherTrace's F theta^2 of the producer rows (without its 1/2).
    for g in ctx.problem.groups:
        scores = ref.channel_scores(ctx.graph, CHANNEL_GROUPS.get(ctx.graph)[g.id])
        np.testing.assert_allclose(path.channel_importance(g.id), 2 * scores, rtol=1e-12)


def test_fisher_stops_by_the_variance_rule_before_the_cap(contexts):
    ctx = _ctx(contexts, "mlp")
    budget = Budget(bops="40x")
    s = FITCompressSolver(fisher_tol=0.1, fisher_min_batches=2, fisher_max_batches=30,
                          refresh_every=0).solve(ctx.problem, budget, context=ctx)
    ref = FisherTrace(loss_fn=F.cross_entropy, tol=0.1, min_batches=2, max_batches=30)
    ref.calibrate(ctx.graph, list(ctx.data) * 2)  # the solver cycles through the data
    assert s.info["fisher_converged"] is True and ref.converged
    assert 2 <= s.info["fisher_batches"] == ref.batches < 30
    assert s.info["batches"] == s.info["fisher_batches"]  # no refresh: nothing else read
    capped = FITCompressSolver(fisher_tol=0.0, fisher_min_batches=2, fisher_max_batches=5,
                               refresh_every=0).solve(ctx.problem, budget, context=ctx)
    assert capped.info["fisher_batches"] == 5 and capped.info["fisher_converged"] is False


@pytest.mark.parametrize("name,ratio", [("cnn", "40x"), ("mlp", "40x")])
def test_path_stops_exactly_when_the_budget_holds_and_every_step_lowers_cost(contexts, name,
                                                                             ratio):
    ctx = _ctx(contexts, name)
    budget = Budget(bops=ratio)
    limits = resolve_limits(ctx.problem, budget)
    s = FITCompressSolver(**SMALL).solve(ctx.problem, budget, context=ctx)
    path = s.info["path"]
    assert s.feasible and not s.info["repaired"] and len(path) >= 2
    state, nodes = _replay(ctx.problem, path)
    assert state.totals["bops"] > limits["bops"]  # the start (all 8/8 here) misses it
    assert nodes[-1] == (dict(s.bits), dict(s.kept))
    costs = [state.totals["bops"]]
    for e, (bits, kept) in zip(path, nodes):
        node = evaluate(ctx.problem, bits, kept, limits)
        assert node.costs["bops"] == e["costs"]["bops"]  # the recorded costs are the node's
        assert node.costs["bops"] < costs[-1]  # every step lowers the cost
        costs.append(node.costs["bops"])
        assert node.feasible == (e is path[-1])  # feasible first at the last node
        assert e["g"] >= 0 and e["h"] >= 0
    assert [e["g"] for e in path] == sorted(e["g"] for e in path)  # g accumulates
    # Refreshes every 3 moves, except at the final node; each reads one batch.
    assert s.info["refreshes"] == (len(path) - 1) // 3
    assert s.info["batches"] == s.info["fisher_batches"] + s.info["refreshes"]
    # The candidate still classifies (held-out digits, fake-quant, no fine-tuning).
    a = ctx.assignment(s.bits, s.kept, s.info["channel_scores"])
    _, acc = ctx.measure(ctx.fake_quant(a))
    assert bops_ratio(ctx, s) >= 40 and acc >= 0.85


def _pruning_only(ctx):
    """The mlp's problem with every layer at 8/8: only pruning moves remain."""
    problem = build_problem(ctx.graph, layer_sensitivities(ctx.graph),
                            channel_importance(ctx.graph), bit_options=((8, 8),))
    return SearchContext(problem, ctx.graph, teacher=ctx.teacher, data=ctx.data,
                         held_out=ctx.held_out, channel_scores=ctx.channel_scores)


def test_pruning_moves_remove_the_lowest_fisher_channels(contexts):
    ctx = _pruning_only(_ctx(contexts, "mlp"))
    budget = Budget(bops="30x")  # 8/8 gives 16x: pruning must find the rest
    s = FITCompressSolver(fisher_min_batches=2, fisher_max_batches=4, refresh_every=0).solve(
        ctx.problem, budget, context=ctx)
    assert s.feasible and {e["kind"] for e in s.info["path"]} == {"prune"}
    ref = FisherTrace(loss_fn=F.cross_entropy, tol=1e-3, min_batches=2, max_batches=4)
    ref.calibrate(ctx.graph, ctx.data)
    masks = ctx.assignment(s.bits, s.kept, s.info["channel_scores"]).masks
    pruned = 0
    for g in ctx.problem.groups:
        if s.kept[g.id] == g.size:
            continue
        pruned += 1
        importance = ref.channel_scores(ctx.graph, CHANNEL_GROUPS.get(ctx.graph)[g.id])
        mask = masks[g.id]
        assert mask.sum() == s.kept[g.id]
        assert importance[~mask].max() <= importance[mask].min()  # the least F theta^2 go
        removed = [c for e in s.info["path"] if e.get("group") == g.id for c in e["removed"]]
        assert sorted(removed) == sorted(np.flatnonzero(~mask).tolist())
    assert pruned >= 1


def test_refreshed_pruning_keeps_the_path_channels(contexts):
    """With a refresh after every move the ranking changes along the path, and the solution's
    channel scores still keep exactly the channels the path kept."""
    ctx = _pruning_only(_ctx(contexts, "mlp"))
    s = FITCompressSolver(fisher_min_batches=2, fisher_max_batches=4, refresh_every=1,
                          refresh_batches=1).solve(ctx.problem, Budget(bops="40x"), context=ctx)
    assert s.info["refreshes"] == len(s.info["path"]) - 1 >= 2
    masks = ctx.assignment(s.bits, s.kept, s.info["channel_scores"]).masks
    for g in ctx.problem.groups:
        removed = [c for e in s.info["path"] if e.get("group") == g.id for c in e["removed"]]
        assert len(removed) == len(set(removed)) == g.size - s.kept[g.id]
        if removed:
            assert sorted(removed) == sorted(np.flatnonzero(~masks[g.id]).tolist())


def test_refresh_reestimates_the_fisher_on_the_compressed_model(contexts):
    """After a pruning move and a move to 4-bit weights, a refresh reads the next batch on the
    pruned fake-quant model: the kept rows get N * grad^2 of that model, the removed rows keep
    their last values."""
    ctx = _ctx(contexts, "mlp")
    path, stream = _Path(ctx.problem, ctx.graph), _Stream(ctx.data)
    _initial_stats(ctx, path, stream, tol=1e-3, min_batches=2, max_batches=2)
    path.apply(next(m for m in path.state.moves() if m[0] == "prune" and m[1].id == 0))
    path.apply(next(m for m in path.state.moves() if m[0] == "bits"
                    and path.names[m[1][0][0]] == "net_3" and m[1][0][1][0] == 4))
    i = path.names.index("net_1")
    before = path.stats[i].trace.copy()
    _refresh(ctx, path, stream, 1)
    assert stream.read == 3
    fq = ctx.fake_quant(ctx.assignment(path.bits(), path.kept(), path.rank_scores())).eval()
    x, y = ctx.data[2]
    layer = fq.get_submodule("pqc_wq_net_1").layer
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(fq(x), y), [layer.weight])
    rows = path.row_mask(i)
    assert rows.sum() == 72
    expected = (len(y) * grad.double() ** 2).sum(1).numpy()
    np.testing.assert_allclose(path.stats[i].trace[rows], expected, rtol=1e-9)
    np.testing.assert_array_equal(path.stats[i].trace[~rows], before[~rows])
    assert not np.allclose(path.stats[i].trace[rows], before[rows])


@pytest.mark.parametrize("name,ratio", [("cnn", "60x"), ("mlp", "60x"), ("encoder", "10x")])
def test_feasible_and_ties_honored(contexts, name, ratio):
    ctx = _ctx(contexts, name)
    p = ctx.problem
    s = get_solver("fitcompress", **SMALL).solve(p, Budget(bops=ratio), context=ctx)
    assert s.feasible and s.solver == "fitcompress"
    assert bops_ratio(ctx, s) >= float(ratio[:-1])
    for layer in p.layers:
        assert tuple(s.bits[layer.name]) in layer.options
    for g in p.groups:
        assert s.kept[g.id] in g.levels
    ctx.assignment(s.bits, s.kept, s.info["channel_scores"]).validate(ctx.graph)
    for which, sets in ((1, p.activation_sets()), (0, p.weight_sets())):
        for members in sets.values():
            assert len({s.bits[p.layers[i].name][which] for i in members}) == 1
    if name == "encoder":
        assert p.activation_sets()  # q, k, v read one tensor
    assert s.info["seconds"] > 0 and s.info["moves"] == len(s.info["path"])


def test_deterministic_for_a_seed_and_restores_the_rng(contexts):
    ctx = _ctx(contexts, "mlp")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = FITCompressSolver(seed=3, **SMALL).solve(ctx.problem, Budget(bops="50x"), context=ctx)
    assert torch.equal(torch.get_rng_state(), state)
    ctx.train_batches(5)  # what the context read before does not matter
    b = FITCompressSolver(seed=3, **SMALL).solve(ctx.problem, Budget(bops="50x"), context=ctx)
    assert a.bits == b.bits and a.kept == b.kept
    assert [e["g"] for e in a.info["path"]] == [e["g"] for e in b.info["path"]]


def test_budget_met_at_the_start_and_unreachable_budget(contexts):
    ctx = _ctx(contexts, "mlp")
    s = FITCompressSolver(**SMALL).solve(ctx.problem, Budget(bops="8x"), context=ctx)
    assert s.feasible and s.info["path"] == [] and s.info["fisher_batches"] == 0
    assert all(tuple(s.bits[lay.name]) == max(lay.options) for lay in ctx.problem.layers)
    with pytest.raises(InfeasibleBudgetError, match="smallest reachable"):
        FITCompressSolver(**SMALL).solve(ctx.problem, Budget(bops="100000x"), context=ctx)


@pytest.mark.parametrize("option,value", [("fisher_tol", -1.0), ("fisher_tol", math.nan),
                                          ("fisher_min_batches", 0), ("refresh_every", -1),
                                          ("refresh_batches", 0), ("seed", 1.5)])
def test_options_are_validated(option, value):
    with pytest.raises(ValueError, match=option):
        FITCompressSolver(**{option: value})
    with pytest.raises(ValueError, match="fisher_min_batches"):
        FITCompressSolver(fisher_min_batches=5, fisher_max_batches=2)


def test_needs_a_context(contexts):
    ctx = _ctx(contexts, "mlp")
    with pytest.raises(ValueError, match="context"):
        FITCompressSolver().solve(ctx.problem, Budget(bops="40x"))
