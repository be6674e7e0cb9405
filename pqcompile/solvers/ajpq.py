"""AJPQ: joint pruning + mixed precision by hierarchical reinforcement learning (two DDPG agents).

AJPQ treats pruning as 0-bit quantization of whole channels and searches one mixed-precision
policy with two controllers: a *layer controller* that picks each layer's sparsity and a
*channel controller* that picks the bitwidth of the layer's kernels, both ranking channels by
one importance criterion. The paper's state, action and reward are not public; this solver
follows the HAQ/AMC design it builds on, as implemented here:

* **Episode.** The problem's layers are walked in order (topological). At layer ``t``:

  - the *layer controller* acts when the layer's output carries a prunable group not decided
    yet (the first layer producing it; a group no layer produces is decided at its first
    reader). Its action ``a in [0, 1]`` is the keep fraction, mapped onto the group's levels
    in equal bins (``a = 1`` keeps the whole group), as HAQ maps an action onto bitwidths;
  - the *channel controller* acts when the layer has more than one bit option, with two
    action dims: the weight bits (equal bins over the layer's weight bitwidths, ascending)
    and the activation bits (equal bins over the activation bitwidths offered with those
    weight bits). pqcompile's integer kernels take one weight bitwidth per layer, so the
    paper's per-kernel bitwidths become one bitwidth for a layer's kept kernels, and its
    0-bit kernels are the group's lowest-importance channels by the problem's channel
    importance (the context's ``channel_scores``, the ones ``compile`` prunes by): both
    controllers rank by the same criterion, as in the paper.

  Ties are enforced during the walk by the *first member's* rule: a layer reading a tensor
  whose activation bits an earlier reader already set takes those activation bits, a later
  call of a shared module its first call's weight bits (its own action chooses among what
  is left), and every member of a tied set only chooses values all members offer.
* **State** (every feature in ``[0, 1]``): the layer features :data:`LAYER_FEATURES` (layer
  index / (L - 1); C_in, C_out, stride, kernel size (k*k), #weights and input H*W (tokens for
  a Linear) min-max normalized over the layers as in AMC; is-depthwise and is-Linear as
  0/1), read from the analyzed graph's modules and SHAPE annotations (the problem's Layer
  records where a node has no module). The layer controller adds its previous action
  (:data:`LAYER_STATE`); the channel controller adds the kept fraction of the layer's output
  and input channels (the layer controller's decisions so far: the hierarchy) and its own
  previous two actions (:data:`CHANNEL_STATE`). "Previous" starts at 1.0 (uncompressed).
* **Budget.** After the walk, the candidate is tightened by ``context.tighten``, the greedy's
  least-sensitivity-per-cost-saved descent, until the budget holds (HAQ's "tighten actions
  after each episode"; AMC limits actions during the walk instead). The transitions keep the
  agents' raw actions, as HAQ's do.
* **Reward** (sparse, at the episode's end, as HAQ): the accuracy of the tightened candidate's
  fake-quant graph on ``context.held_out`` (after ``finetune_steps`` QAT steps where > 0)
  minus the FP32 graph's accuracy on the same batches. Every transition of the episode gets
  that reward (HAQ/AMC). Candidates are cached by ``(bits, kept)``: a repeated assignment is
  not measured again.
* **DDPG** (AMC/HAQ's agent, one per controller): actor ``state -> hidden -> hidden ->
  sigmoid``, critic ``relu(W_s s + W_a a) -> hidden -> 1``, Adam, target networks with soft
  updates (``tau``), a replay buffer, target ``r - baseline + discount * Q'(s', mu'(s'))``
  with AMC's moving-average reward baseline (``alpha = 0.5``) and ``discount = 1`` as in
  AMC/HAQ. The first ``warmup`` episodes act uniformly at random and do not update; later
  ones act ``mu(s)`` plus truncated-normal noise of width ``noise * noise_decay ** (episode -
  warmup)`` and update ``updates_per_step`` times per stored transition after each episode.
* **Result**: the best episode's tightened (hence feasible) assignment, by reward, ties broken
  by the lower held-out loss, then the earlier episode.

Departures from HAQ's settings, for a search that fits a few minutes on two CPU cores: 40
episodes with 10 of warm-up (HAQ: 600 and 20; AMC: 400 and 100), a faster noise decay (0.95,
as AMC) and an actor learning rate of 1e-3 (HAQ: 1e-4), since the actor must move within ~30
learning episodes; no reward scaling (HAQ multiplies by 0.1). The paper prunes kernels inside
any layer; here pruning follows the problem's channel groups (a residual's operands prune
together) and bits follow its options and ties.

Knobs: ``episodes``, ``warmup``, ``noise``, ``noise_decay``, ``actor_lr``, ``critic_lr``,
``hidden``, ``batch_size``, ``buffer_size``, ``tau``, ``discount``, ``updates_per_step``,
``finetune_steps``, ``finetune_lr``, ``seed``. Each episode costs one fake-quant build and
one pass over the held-out batches (plus ``finetune_steps`` QAT steps), and one DDPG update
per layer-step. ``info``: ``rewards``, ``accuracies`` and ``episode_costs`` per episode,
``fp_accuracy``, ``best_episode``, ``best_reward``, ``critic_losses`` (``None`` in warm-up),
``noise``, ``repaired`` (the returned candidate's raw actions missed the budget),
``repaired_episodes``, ``measured`` (distinct candidates), ``seconds``, ``channel_scores``.

>>> AJPQSolver(episodes=0)
Traceback (most recent call last):
...
ValueError: AJPQSolver: episodes must be an int >= 1, got 0
>>> keep_index(1.0, 4), keep_index(0.0, 4), keep_index(0.6, 4)
(3, 0, 2)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from ..progress import Progress
from .ajpq_state import (
    CHANNEL_STATE,
    LAYER_FEATURES,
    LAYER_STATE,
    keep_index,
    layer_features,
)
from .ddpg import DDPGAgent, ReplayBuffer
from .problem import Affine, Layer, Option, Problem, Solution, resolve_limits
from .search import SearchContext, check_int, check_real

_NAME = "AJPQSolver"

__all__ = [
    "CHANNEL_STATE",
    "LAYER_FEATURES",
    "LAYER_STATE",
    "AJPQSolver",
    "DDPGAgent",
    "LayerWalk",
    "ReplayBuffer",
    "keep_index",
    "layer_features",
]

# --- the walk ---------------------------------------------------------------------------------


@dataclass
class _Step:
    state: np.ndarray
    action: np.ndarray


@dataclass
class _Episode:
    bits: dict[str, Option]
    kept: dict[int, int]
    layer_steps: list[_Step] = field(default_factory=list)
    channel_steps: list[_Step] = field(default_factory=list)


class LayerWalk:
    """What each layer decides, its features, and the values its tied sets allow."""

    def __init__(self, problem: Problem, graph: torch.fx.GraphModule | None) -> None:
        self.problem = problem
        self.features = layer_features(problem, graph)
        self.decides: list[tuple[int, ...]] = [() for _ in problem.layers]
        seen: set[int] = set()
        for attr in ("out_channels", "in_channels"):  # producers first, then first readers
            for i, layer in enumerate(problem.layers):
                new = tuple(g for g, _ in getattr(layer, attr).terms if g not in seen)
                self.decides[i] += tuple(dict.fromkeys(new))
                seen.update(new)
        self.groups = {g.id: g for g in problem.groups}
        self.full = {g.id: g.size for g in problem.groups}
        self.allowed = [self._allowed(i) for i in range(len(problem.layers))]

    def _allowed(self, i: int) -> tuple[Option, ...]:
        layers = self.problem.layers
        layer = layers[i]
        sets = [(0, lambda lay: lay.weight_key or lay.name), (1, lambda lay: lay.activation_key)]
        options = list(layer.options)
        for which, key in sets:
            members = [lay for lay in layers if key(lay) == key(layer)]
            common = set.intersection(*({o[which] for o in m.options} for m in members))
            if not common:
                raise ValueError(f"layers {[m.name for m in members]} must share "
                                 f"{('weight', 'activation')[which]} bits but have no option "
                                 "in common; give them a common option")
            options = [o for o in options if o[which] in common]
        if not options:
            raise ValueError(f"layer {layer.name!r}: no option meets both its weight and "
                             "activation ties; use the 'ilp' solver")
        return tuple(options)

    def fraction(self, form: Affine, kept: Mapping[int, int]) -> float:
        full = form.value(self.full)
        return form.value(kept) / full if full > 0 else 1.0

    def option(self, i: int, action: np.ndarray, forced_w: int | None,
               forced_a: int | None) -> Option:
        """The layer's bits from the channel controller's two action dims, within the forced
        (first member's) values of its tied sets."""
        layer = self.problem.layers[i]
        cand = [o for o in self.allowed[i] if (forced_a is None or o[1] == forced_a)
                and (forced_w is None or o[0] == forced_w)]
        if not cand:
            raise ValueError(f"layer {layer.name!r}: no option has the weight bits {forced_w} "
                             f"and activation bits {forced_a} its ties require; give tied "
                             "layers the same options or use the 'ilp' solver")
        ws = sorted({o[0] for o in cand})
        w = ws[keep_index(action[0], len(ws))]
        acts = sorted({o[1] for o in cand if o[0] == w})
        return (w, acts[keep_index(action[1], len(acts))])


# --- the solver -------------------------------------------------------------------------------


class AJPQSolver:
    """Hierarchical DDPG search over keep levels (layer controller) and bits (channel
    controller); see the module docstring."""

    name = "ajpq"
    needs_context = True

    def __init__(self, *, seed: int = 0, episodes: int = 40, warmup: int = 10,
                 noise: float = 0.5, noise_decay: float = 0.95, actor_lr: float = 1e-3,
                 critic_lr: float = 1e-3, hidden: int = 300, batch_size: int = 64,
                 buffer_size: int = 2000, tau: float = 0.01, discount: float = 1.0,
                 updates_per_step: int = 1, finetune_steps: int = 0,
                 finetune_lr: float = 0.01) -> None:
        check_int(_NAME, "seed", seed)
        check_int(_NAME, "episodes", episodes, 1)
        check_int(_NAME, "warmup", warmup, 0)
        check_int(_NAME, "hidden", hidden, 1)
        check_int(_NAME, "batch_size", batch_size, 1)
        check_int(_NAME, "buffer_size", buffer_size, 1)
        check_int(_NAME, "updates_per_step", updates_per_step, 0)
        check_int(_NAME, "finetune_steps", finetune_steps, 0)
        check_real(_NAME, "noise", noise, 0.0, math.inf, low_open=False)
        check_real(_NAME, "noise_decay", noise_decay, 0.0, 1.0)
        check_real(_NAME, "actor_lr", actor_lr, 0.0, math.inf)
        check_real(_NAME, "critic_lr", critic_lr, 0.0, math.inf)
        check_real(_NAME, "tau", tau, 0.0, 1.0)
        check_real(_NAME, "discount", discount, 0.0, 1.0, low_open=False)
        check_real(_NAME, "finetune_lr", finetune_lr, 0.0, math.inf)
        self.seed, self.episodes, self.warmup = seed, episodes, warmup
        self.noise, self.noise_decay = float(noise), float(noise_decay)
        self.actor_lr, self.critic_lr, self.hidden = float(actor_lr), float(critic_lr), hidden
        self.batch_size, self.buffer_size, self.tau = batch_size, buffer_size, float(tau)
        self.discount, self.updates_per_step = float(discount), updates_per_step
        self.finetune_steps, self.finetune_lr = finetune_steps, float(finetune_lr)

    # --- agents and episodes ----------------------------------------------------------------

    def agents(self) -> tuple[DDPGAgent, DDPGAgent]:
        """The layer controller (one action: the keep fraction) and the channel controller
        (two: weight bits, activation bits)."""
        kw = {"hidden": self.hidden, "actor_lr": self.actor_lr, "critic_lr": self.critic_lr,
                  "tau": self.tau, "discount": self.discount, "buffer_size": self.buffer_size,
                  "batch_size": self.batch_size}
        return (DDPGAgent(len(LAYER_STATE), 1, seed=self.seed, **kw),
                DDPGAgent(len(CHANNEL_STATE), 2, seed=self.seed + 1, **kw))

    def episode(self, walk: LayerWalk, agents: tuple[DDPGAgent, DDPGAgent], index: int,
                rng: np.random.Generator) -> _Episode:
        """One walk over the layers: raw (untightened) bits and kept counts, and the steps."""
        problem = walk.problem
        layer_agent, channel_agent = agents
        explore = index < self.warmup
        sigma = self.noise * self.noise_decay ** max(index - self.warmup, 0)

        def act(agent: DDPGAgent, state: np.ndarray) -> np.ndarray:
            return agent.random_action(rng) if explore else agent.act(state, rng, sigma)

        out = _Episode({}, dict(walk.full))
        prev_keep, prev_bits = 1.0, np.ones(2)
        forced_w: dict[str, int] = {}
        forced_a: dict[str, int] = {}
        for i, layer in enumerate(problem.layers):
            features = walk.features[i]
            if walk.decides[i]:
                state = np.concatenate([features, [prev_keep]])
                action = act(layer_agent, state)
                for g in walk.decides[i]:
                    levels = walk.groups[g].levels[::-1]  # ascending: action 1.0 keeps all
                    out.kept[g] = levels[keep_index(action[0], len(levels))]
                out.layer_steps.append(_Step(state, action))
                prev_keep = float(action[0])
            state = np.concatenate([features, [walk.fraction(layer.out_channels, out.kept),
                                               walk.fraction(layer.in_channels, out.kept)],
                                    prev_bits])
            wkey, akey = layer.weight_key or layer.name, layer.activation_key
            if len(layer.options) > 1:
                action = act(channel_agent, state)
                out.channel_steps.append(_Step(state, action))
                prev_bits = action
            else:
                action = np.ones(2)
            option = walk.option(i, action, forced_w.get(wkey), forced_a.get(akey))
            forced_w.setdefault(wkey, option[0])
            forced_a.setdefault(akey, option[1])
            out.bits[layer.name] = option
        return out

    def learn(self, agents: tuple[DDPGAgent, DDPGAgent], episode: _Episode, reward: float,
              update: bool, rng: np.random.Generator) -> float | None:
        """Store the episode's transitions (every one rewarded with the episode's reward) and,
        past warm-up, update each agent once per stored transition; the mean critic loss."""
        losses: list[float] = []
        for agent, steps in zip(agents, (episode.layer_steps, episode.channel_steps)):
            for j, step in enumerate(steps):
                last = j + 1 == len(steps)
                nxt = np.zeros_like(step.state) if last else steps[j + 1].state
                agent.observe(step.state, step.action, reward, nxt, last)
            if update:
                for _ in range(self.updates_per_step * len(steps)):
                    loss = agent.update(rng)
                    if loss is not None:
                        losses.append(loss)
        return float(np.mean(losses)) if losses else None

    # --- solve ------------------------------------------------------------------------------

    def solve(self, problem: Problem, budget, *, context: SearchContext | None = None
              ) -> Solution:
        if context is None:
            raise ValueError("the 'ajpq' solver searches with the model and data: call "
                             "solve(problem, budget, context=SearchContext(...))")
        if context.problem is not problem and context.problem != problem:
            raise ValueError("the context was built for another problem; build the "
                             "SearchContext from this problem")
        resolve_limits(problem, budget)  # rejects latency and malformed budgets up front
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._search(problem, budget, context, t0)

    def _search(self, problem: Problem, budget, context: SearchContext, t0: float
                ) -> Solution:
        rng = np.random.default_rng(self.seed)
        walk = LayerWalk(problem, context.graph)
        agents = self.agents()
        _, fp_accuracy = context.measure(copy.deepcopy(context.graph))
        cache: dict[tuple, tuple[float, float]] = {}
        rewards, accuracies, critic_losses, noises, costs = [], [], [], [], []
        repaired: list[bool] = []
        best: tuple | None = None
        bar = Progress(self.episodes, "ajpq", enabled=bool(context.progress))
        for index in range(self.episodes):
            ep = self.episode(walk, agents, index, rng)
            missed = not context.solution(ep.bits, ep.kept, budget).feasible
            bits, kept = context.tighten(ep.bits, ep.kept, budget) if missed \
                else (ep.bits, ep.kept)
            key = (tuple(bits[layer.name] for layer in problem.layers),
                   tuple(kept[g.id] for g in problem.groups))
            if key not in cache:
                cache[key] = self._measure(context, bits, kept)
            loss, acc = cache[key]
            reward = acc - fp_accuracy
            critic = self.learn(agents, ep, reward, index >= self.warmup, rng)
            rewards.append(reward)
            accuracies.append(acc)
            critic_losses.append(critic)
            noises.append(0.0 if index < self.warmup else
                          self.noise * self.noise_decay ** (index - self.warmup))
            repaired.append(missed)
            costs.append(context.solution(bits, kept).costs)
            rank = (reward, -loss, -index)
            if best is None or rank > best[0]:
                best = (rank, index, bits, kept)
            bar.update(index + 1, reward=reward, best=best[0][0])
        _, best_index, bits, kept = best
        info: dict[str, Any] = {
            "episodes": self.episodes, "warmup": min(self.warmup, self.episodes),
            "rewards": rewards, "accuracies": accuracies, "fp_accuracy": fp_accuracy,
            "best_episode": best_index, "best_reward": rewards[best_index],
            "critic_losses": critic_losses, "noise": noises, "episode_costs": costs,
            "repaired": repaired[best_index], "repaired_episodes": int(sum(repaired)),
            "measured": len(cache), "finetune_steps": self.finetune_steps,
            "seconds": time.perf_counter() - t0,
        }
        if context.channel_scores:
            info["channel_scores"] = {g.id: np.asarray(context.channel_scores[g.id])
                                      for g in problem.groups if g.id in context.channel_scores}
        return context.solution(bits, kept, budget, solver=self.name, info=info)

    def _measure(self, context: SearchContext, bits, kept) -> tuple[float, float]:
        """Held-out loss and accuracy of a candidate (after ``finetune_steps`` QAT steps)."""
        assignment = context.assignment(bits, kept)
        module = context.finetune(assignment, self.finetune_steps, lr=self.finetune_lr) \
            if self.finetune_steps else context.fake_quant(assignment)
        loss, acc = context.measure(module)
        context.record(bits, kept, accuracy=acc, loss=loss)
        return loss, acc
