"""The AJPQ solver: two DDPG controllers (keep levels, bits) rewarded by held-out accuracy.

Its own mechanism (the state vector, the critic learning, rewards rising over episodes, the
per-episode tightening, the candidate cache) and the contract every searching solver keeps
(feasible, tied, deterministic, RNG untouched) on the cnn, the mlp and the encoder."""

import numpy as np
import pytest
import torch
from solver_models import bops_ratio, context

from pqcompile.budget import Budget, InfeasibleBudgetError
from pqcompile.solvers import get_solver, resolve_limits
from pqcompile.solvers.ajpq import (
    CHANNEL_STATE,
    LAYER_FEATURES,
    LAYER_STATE,
    AJPQSolver,
    DDPGAgent,
    LayerWalk,
    layer_features,
)

SMALL = {"hidden": 32, "batch_size": 32}
BUDGETS = {"cnn": 40, "mlp": 40, "encoder": 8}


@pytest.fixture(scope="module")
def contexts():
    return {}


def ctx_of(contexts, name):
    if name not in contexts:
        contexts[name] = context(name)
    return contexts[name]


def test_registered_and_options_validated():
    s = get_solver("ajpq", episodes=3)
    assert s.name == "ajpq" and s.needs_context and s.episodes == 3
    for bad, word in [({"episodes": 0}, "episodes"), ({"warmup": -1}, "warmup"),
                      ({"noise": -0.1}, "noise"), ({"noise_decay": 0.0}, "noise_decay"),
                      ({"tau": 1.5}, "tau"), ({"discount": 2.0}, "discount"),
                      ({"batch_size": True}, "batch_size"), ({"actor_lr": 0}, "actor_lr"),
                      ({"finetune_steps": 1.5}, "finetune_steps"), ({"hidden": 0}, "hidden")]:
        with pytest.raises(ValueError, match=word):
            AJPQSolver(**bad)


def test_state_features_are_the_documented_ones_in_unit_interval(contexts):
    ctx = ctx_of(contexts, "cnn")
    f = layer_features(ctx.problem, ctx.graph)
    names = [layer.name for layer in ctx.problem.layers]
    assert names == ["stem_0", "down_0", "block_0", "block_3", "fc"]
    assert f.shape == (5, len(LAYER_FEATURES)) and f.min() >= 0 and f.max() <= 1
    col = {k: f[:, j] for j, k in enumerate(LAYER_FEATURES)}
    np.testing.assert_allclose(col["index"], [0, .25, .5, .75, 1])
    np.testing.assert_allclose(col["stride"], [0, 1, 0, 0, 0])  # only down_0 strides (2)
    np.testing.assert_allclose(col["linear"], [0, 0, 0, 0, 1])
    np.testing.assert_allclose(col["depthwise"], 0)
    np.testing.assert_allclose(col["c_in"], [0, 15 / 31, 1, 1, 1])  # 1, 16, 32, 32, 32
    np.testing.assert_allclose(col["input_hw"], [1, 1, 15 / 63, 15 / 63, 0])  # 64,64,16,16,1
    np.testing.assert_allclose(col["kernel"], [1, 1, 1, 1, 0])  # 3x3 convs, the fc 1
    # params: 144, 4608, 9216, 9216, 320
    np.testing.assert_allclose(col["params"], (np.array([144, 4608, 9216, 9216, 320]) - 144)
                               / (9216 - 144))

    # The states an episode feeds the controllers: documented length, in [0, 1], and the
    # channel controller sees the layer controller's keep decision of its output.
    solver = AJPQSolver(warmup=5, **SMALL)
    walk = LayerWalk(ctx.problem, ctx.graph)
    ep = solver.episode(walk, solver.agents(), 0, np.random.default_rng(3))
    assert len(ep.layer_steps) == 3 and len(ep.channel_steps) == 3  # 3 groups; 3 unpinned
    for step in ep.layer_steps:
        assert step.state.shape == (len(LAYER_STATE),) and step.action.shape == (1,)
    for step in ep.channel_steps:
        assert step.state.shape == (len(CHANNEL_STATE),) and step.action.shape == (2,)
    for step in ep.layer_steps + ep.channel_steps:
        assert 0 <= step.state.min() and step.state.max() <= 1
    kept_out = CHANNEL_STATE.index("kept_out")
    down = ep.channel_steps[0]  # down_0: its output is group 1
    assert down.state[kept_out] == pytest.approx(ep.kept[1] / 32)
    prev = LAYER_STATE.index("previous_keep")
    assert ep.layer_steps[0].state[prev] == 1.0
    assert ep.layer_steps[1].state[prev] == pytest.approx(ep.layer_steps[0].action[0])
    assert ep.bits["stem_0"] == (8, 8) and ep.bits["fc"] == (8, 8)  # pinned


def test_critic_loss_decreases_and_actor_follows_it_on_a_fixed_buffer():
    rng = np.random.default_rng(0)
    agent = DDPGAgent(4, 1, hidden=32, actor_lr=1e-3, critic_lr=3e-3, batch_size=64, seed=0)
    for _ in range(256):  # one-step episodes: reward peaks at action 0.3
        s = rng.uniform(0, 1, 4)
        a = rng.uniform(0, 1, 1)
        agent.observe(s, a, 1.0 - 4 * (a[0] - 0.3) ** 2, np.zeros(4), True)
    fixed = agent.buffer.sample(np.random.default_rng(1), 256)
    agent.baseline = 0.0
    with torch.no_grad():
        before = float(agent.critic_loss(fixed))
    states = torch.from_numpy(rng.uniform(0, 1, (64, 4)).astype(np.float32))
    with torch.no_grad():
        start = float(agent.actor(states).mean())
    losses = [agent.update(rng) for _ in range(300)]
    with torch.no_grad():
        after = float(agent.critic_loss(fixed))
    assert after < 0.2 * before
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    with torch.no_grad():
        end = agent.actor(states)[:, 0]
    assert abs(start - 0.5) < 0.05  # the actor starts near 0.5 (small last layer)
    assert float((end - 0.3).abs().mean()) < 0.12  # and moves to the reward's peak


def test_rewards_rise_over_episodes_and_beat_a_frozen_policy(contexts):
    # At 40x fewer BOPs, random actions tightened by the greedy mostly land on candidates at
    # chance accuracy; the controllers learn to avoid them. The control freezes both agents.
    ctx = ctx_of(contexts, "cnn")
    budget = Budget.reduction(bops=40)
    runs = {lr: AJPQSolver(episodes=40, warmup=10, actor_lr=lr, critic_lr=lr, seed=0).solve(
        ctx.problem, budget, context=ctx) for lr in (1e-3, 1e-12)}
    s, frozen = runs[1e-3], runs[1e-12]
    r, r0 = np.array(s.info["rewards"]), np.array(frozen.info["rewards"])
    assert len(r) == 40 and s.info["warmup"] == 10
    np.testing.assert_array_equal(r[:10], r0[:10])  # same warm-up episodes
    # Measured mean rewards: warm-up -0.87 (episodes within 0.07 of it); last ten episodes
    # -0.62 learned, -0.86 frozen.
    assert r[-10:].mean() > r[:10].mean() + 0.15  # the learned policy beats the random warm-up
    assert r[-10:].mean() > r0[-10:].mean() + 0.15  # and the frozen one
    assert max(r) > r[0]  # the best-so-far curve rises above the first episode
    assert s.info["best_reward"] == max(r) and s.info["best_episode"] >= 10
    assert all(c is None for c in s.info["critic_losses"][:10])
    assert all(c is not None for c in s.info["critic_losses"][10:])
    assert s.feasible and bops_ratio(ctx, s) >= 40
    # The returned assignment is the best episode's, measured on the held-out batches.
    _, acc = ctx.measure(ctx.fake_quant(ctx.assignment(s.bits, s.kept)))
    assert acc - s.info["fp_accuracy"] == pytest.approx(s.info["best_reward"])


def test_every_episode_meets_the_budget_after_tightening(contexts):
    ctx = ctx_of(contexts, "cnn")
    budget = Budget.reduction(bops=50)
    limit = resolve_limits(ctx.problem, budget)["bops"]
    s = AJPQSolver(episodes=8, warmup=4, **SMALL).solve(ctx.problem, budget, context=ctx)
    costs = s.info["episode_costs"]
    assert len(costs) == 8 and all(c["bops"] <= limit for c in costs)
    assert s.info["repaired_episodes"] > 0  # some raw actions missed and were tightened


@pytest.mark.parametrize("name", ["cnn", "mlp", "encoder"])
def test_feasible_and_ties_honored(contexts, name):
    ctx = ctx_of(contexts, name)
    s = AJPQSolver(episodes=6, warmup=3, **SMALL).solve(
        ctx.problem, Budget.reduction(bops=BUDGETS[name]), context=ctx)
    assert s.feasible and s.solver == "ajpq" and bops_ratio(ctx, s) >= BUDGETS[name]
    for layer in ctx.problem.layers:
        assert s.bits[layer.name] in layer.options
    for g in ctx.problem.groups:
        assert s.kept[g.id] in g.levels
    for members in ctx.problem.activation_sets().values():
        assert len({s.bits[ctx.problem.layers[i].name][1] for i in members}) == 1
    for members in ctx.problem.weight_sets().values():
        assert len({s.bits[ctx.problem.layers[i].name][0] for i in members}) == 1
    ctx.assignment(s.bits, s.kept).validate(ctx.graph)
    info = s.info
    assert 0 <= info["best_episode"] < 6 and info["seconds"] > 0
    assert set(info["channel_scores"]) == {g.id for g in ctx.problem.groups}
    if name == "encoder":
        assert ctx.problem.activation_sets()  # q, k, v read one tensor


def test_deterministic_and_leaves_rng_and_graph_alone(contexts):
    ctx = ctx_of(contexts, "mlp")
    before = {k: v.clone() for k, v in ctx.graph.state_dict().items()}
    torch.manual_seed(123)
    rng_state = torch.get_rng_state()
    runs = [AJPQSolver(episodes=12, warmup=4, seed=seed, **SMALL).solve(
        ctx.problem, Budget.reduction(bops=40), context=ctx) for seed in (5, 5, 6)]
    assert torch.equal(torch.get_rng_state(), rng_state)
    a, b, c = runs
    assert a.bits == b.bits and a.kept == b.kept and a.info["rewards"] == b.info["rewards"]
    assert a.info["rewards"] != c.info["rewards"]  # the seed matters
    for k, v in ctx.graph.state_dict().items():
        assert torch.equal(v, before[k])


def test_repeated_candidates_are_not_measured_again(contexts, monkeypatch):
    ctx = ctx_of(contexts, "mlp")
    calls = []
    original = ctx.fake_quant
    monkeypatch.setattr(ctx, "fake_quant", lambda a: calls.append(a) or original(a))
    s = AJPQSolver(episodes=20, warmup=4, **SMALL).solve(
        ctx.problem, Budget.reduction(bops=40), context=ctx)
    assert len(calls) == s.info["measured"] < 20


def test_finetune_steps_fine_tune_each_candidate(contexts, monkeypatch):
    ctx = context("mlp")  # its own context: fine-tuning advances the training stream
    calls = []
    original = ctx.finetune
    monkeypatch.setattr(ctx, "finetune", lambda a, steps, **kw: calls.append(steps)
                        or original(a, steps, **kw))
    s = AJPQSolver(episodes=2, warmup=2, finetune_steps=2, **SMALL).solve(
        ctx.problem, Budget.reduction(bops=20), context=ctx)
    assert calls and set(calls) == {2} and len(calls) == s.info["measured"]
    assert s.feasible and s.info["finetune_steps"] == 2


def test_unreachable_budget_raises(contexts):
    ctx = ctx_of(contexts, "mlp")
    with pytest.raises(InfeasibleBudgetError, match="smallest reachable"):
        AJPQSolver(episodes=2, **SMALL).solve(ctx.problem, Budget.reduction(bops=10_000),
                                              context=ctx)
    with pytest.raises(ValueError, match="context"):
        AJPQSolver(episodes=2).solve(ctx.problem, Budget.reduction(bops=10))
