"""DDPG as AMC and HAQ use it: actor, critic, target copies with soft updates, a replay buffer
and a moving-average reward baseline.

The agent acts in ``[0, 1]^action_dim`` (a sigmoid actor; exploration by truncated-normal noise
inside the box). :class:`~pqcompile.solvers.ajpq.AJPQSolver` runs two of them, one per
controller.

>>> import numpy as np
>>> agent = DDPGAgent(3, 2, hidden=8, seed=0)
>>> a = agent.act(np.zeros(3, np.float32), np.random.default_rng(0), noise=0.1)
>>> a.shape, bool(((0 <= a) & (a <= 1)).all())
((2,), True)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["DDPGAgent", "ReplayBuffer"]

_BASELINE_ALPHA = 0.5  # AMC's moving-average reward baseline


class ReplayBuffer:
    """A ring buffer of ``(state, action, reward, next state, done)`` transitions."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int) -> None:
        self.capacity, self.size, self.head = capacity, 0, 0
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.a = np.zeros((capacity, action_dim), np.float32)
        self.r = np.zeros(capacity, np.float32)
        self.s2 = np.zeros((capacity, state_dim), np.float32)
        self.done = np.zeros(capacity, np.float32)

    def __len__(self) -> int:
        return self.size

    def add(self, s, a, r: float, s2, done: bool) -> None:
        i = self.head
        self.s[i], self.a[i], self.r[i], self.s2[i], self.done[i] = s, a, r, s2, float(done)
        self.head = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, self.size, size=n)
        return tuple(torch.from_numpy(x[idx]) for x in (self.s, self.a, self.r, self.s2,
                                                        self.done))


class _Actor(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        last = nn.Linear(hidden, action_dim)
        nn.init.uniform_(last.weight, -3e-3, 3e-3)  # AMC: outputs start near 0.5
        nn.init.uniform_(last.bias, -3e-3, 3e-3)
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), last, nn.Sigmoid())

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s)


class _Critic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.fs, self.fa = nn.Linear(state_dim, hidden), nn.Linear(action_dim, hidden)
        last = nn.Linear(hidden, 1)
        nn.init.uniform_(last.weight, -3e-3, 3e-3)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), last)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.out(self.fs(s) + self.fa(a)).squeeze(-1)


class DDPGAgent:
    """Actor, critic, their target copies and a replay buffer (AMC/HAQ's agent).

    Networks are initialized from ``seed`` without touching the global torch RNG; sampling
    and noise take the caller's numpy generator.
    """

    def __init__(self, state_dim: int, action_dim: int, *, hidden: int = 300,
                 actor_lr: float = 1e-3, critic_lr: float = 1e-3, tau: float = 0.01,
                 discount: float = 1.0, buffer_size: int = 2000, batch_size: int = 64,
                 seed: int = 0) -> None:
        self.state_dim, self.action_dim = state_dim, action_dim
        self.tau, self.discount, self.batch_size = tau, discount, batch_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = _Actor(state_dim, action_dim, hidden)
            self.critic = _Critic(state_dim, action_dim, hidden)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=critic_lr)
        self.buffer = ReplayBuffer(buffer_size, state_dim, action_dim)
        self.baseline: float | None = None

    def act(self, state: np.ndarray, rng: np.random.Generator, noise: float = 0.0
            ) -> np.ndarray:
        """``mu(state)`` plus truncated-normal noise of width ``noise``, within ``[0, 1]``."""
        with torch.no_grad():
            mu = self.actor(torch.as_tensor(state, dtype=torch.float32)).numpy()
        return _truncated_normal(rng, mu.astype(np.float64), noise) if noise > 0 \
            else mu.astype(np.float64)

    def random_action(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0.0, 1.0, self.action_dim)

    def observe(self, s, a, r: float, s2, done: bool) -> None:
        self.buffer.add(s, a, r, s2, done)

    def critic_loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """The TD error of the critic on ``batch`` against the target networks (reward minus
        the moving-average baseline)."""
        s, a, r, s2, done = batch
        with torch.no_grad():
            q_next = self.critic_target(s2, self.actor_target(s2))
            target = r - (self.baseline or 0.0) + self.discount * (1.0 - done) * q_next
        return nn.functional.mse_loss(self.critic(s, a), target)

    def update(self, rng: np.random.Generator) -> float | None:
        """One DDPG step on a sampled batch; the critic's loss (``None`` if the buffer is
        empty)."""
        if not len(self.buffer):
            return None
        batch = self.buffer.sample(rng, self.batch_size)
        mean = float(batch[2].mean())
        self.baseline = mean if self.baseline is None \
            else self.baseline + _BASELINE_ALPHA * (mean - self.baseline)
        loss = self.critic_loss(batch)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        policy_loss = -self.critic(batch[0], self.actor(batch[0])).mean()
        self.actor_opt.zero_grad()
        policy_loss.backward()
        self.actor_opt.step()
        for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            with torch.no_grad():
                for p, t in zip(net.parameters(), target.parameters()):
                    t.mul_(1.0 - self.tau).add_(p, alpha=self.tau)
        return float(loss.detach())


def _truncated_normal(rng: np.random.Generator, mean: np.ndarray, sigma: float) -> np.ndarray:
    out = np.empty_like(mean)
    for i, m in enumerate(mean):
        x = m
        for _ in range(100):  # rejection sampling; clipping is the (unlikely) fallback
            x = rng.normal(m, sigma)
            if 0.0 <= x <= 1.0:
                break
        out[i] = min(max(x, 0.0), 1.0)
    return out
