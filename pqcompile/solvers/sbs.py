"""SBS, Single-path Bit Sharing (Liu, Zhuang, Chen, Shen, Cai, Tan): a differentiable search.

One training copy of the BN-folded float graph encodes every candidate of the problem at once.

* **Bit sharing.** Every layer's weight is normalized with a learnable per-output-channel range
  ``v``, ``z = (clip(w / v, -1, 1) + 1) / 2``, and decomposed over its weight-bit candidates
  ``b_0 < b_1 < ...`` (default 2, 4, 8): ``z_hat = z_0 + g_1 (eps_1 + g_2 (eps_2 + ...))`` with
  ``z_0 = D(z, s_0)``, ``eps_k = D(z - z_(k-1), s_k)``, ``z_k = z_(k-1) + eps_k`` and
  ``D(z, s) = s * round(z / s)``, ``s_k = 1 / (2^b_k - 1)``; ``w_hat = (2 z_hat - 1) v``. The
  input activation of every layer is decomposed the same way over its activation-bit
  candidates (default 4, 8), ``z = clip(x / v, 0, 1)`` with a learnable per-tensor range (the
  signed form of the weights where calibration saw negative inputs). Layers reading one tensor
  share one activation quantizer and the calls of one module one weight quantizer, so ties hold
  by construction. A layer whose options hold a single weight (activation) bit width is pinned
  there: it is quantized at that width, with no gate.
* **Quantization gates.** ``g_k = 1[A_k > alpha_k]`` with one learnable threshold per gate and
  quantizer, ``A_k`` the RMS of ``z - z_(k-1)`` (the residual the gate would add), and the
  straight-through gradient ``d g / d alpha = -sigmoid'(A_k - alpha_k)``. A gate only matters
  where its coarser gates are open (``g_2`` refines ``g_1``'s residual), so a coarser gate is
  held open while a finer one is (``g_k OR g_(k+1)``): bits fall 8 -> 4 -> 2, finest first.
* **Pruning gates.** Each prunable channel group (``problem.groups``, members from the graph's
  ``CHANNEL_GROUPS``) is split into blocks of ``B`` channels; ``g_p = 1[A_p > alpha_p]`` with one
  learnable threshold per group and ``A_p`` the block's mean per-channel L1 norm of the
  producing weights (over the largest block, times 0.5: the scale of the bit gates'
  statistics); the gate multiplies the group's channels in the (quantized) input of every
  consuming layer, so every consumer reads zeros as after real pruning. Masking there rather
  than at the producers' outputs keeps a closed block's gradient alive: a masked producer
  output followed by a ReLU would pass no gradient back (``relu'(0) = 0``) and the block could
  never reopen.
* **Loss.** ``task + lam * log(BOPs) + penalty * sum_k max(0, log(cost_k / target_k))^2``:
  the paper's ``lambda log(BOPs)`` term plus a squared hinge at each budget limit, where
  ``cost_k`` are the problem's own cost model (``Layer.out_channels`` / ``in_channels`` as
  affine forms of the expected kept counts ``sum_p B_p g_p``, times ``macs_scale``, times the
  expected weight bits ``b_0 + sum_k (b_k - b_(k-1)) g_1 ... g_k`` and the expected activation
  bits), evaluated on the gates' forward values (exact costs of the current configuration)
  with the sigmoid surrogate gradient. ``task`` is the cross entropy, mixed half and half with
  distillation from ``context.teacher`` (KL at ``temperature``; ``distill=False``: CE only).
  Plus ``fisher * sum_p (1 - g_p) C_p`` over the pruning blocks (a departure, below).
* **Training.** Network weights and the (log-)ranges train at every step; the thresholds of the
  weight-side gates (weight bits and pruning) and those of the activation gates are updated on
  alternate steps (even / odd), as in the paper.
* **Read-off.** Per layer the bits up to the last open gate (activation gates by a running mean
  of their statistic over the search), snapped to the layer's options (the smallest option at
  or above both, raised to the maximum over a tied set); per group the channels of open blocks,
  rounded *up* to the nearest keep level, and ``info["channel_scores"]`` ranking the channels by
  their block's gate margin ``A_p - alpha_p`` (ties inside a block by the channel's own L1
  norm). If the result misses the budget, :meth:`SearchContext.tighten` repairs it
  (``info["repaired"]``). Fine-tuning the result is ``compile``'s job, as for every solver.

Departures from the paper, and details it leaves open, filled with common practice:

* The gate statistic is the RMS of the residual *in units of the coarser step*
  (``||z - z_(k-1)||_2 / (sqrt(n) s_(k-1))``, in [0, 0.5]), not the raw L2 norm, so one
  threshold scale fits every layer size and bit width; the pruning statistic is normalized
  by the group's largest block for the same reason. The raw norms order the gates by
  themselves (a coarse residual is several times a fine one, so fine gates close first); the
  normalized ones do not, hence the explicit finest-first nesting of the gates (without it,
  a 50-step search on ResNet-20 dropped 9 of 22 layers from 8 straight to 2-bit weights).
  Thresholds start at 0 (all gates open,
  the search starts at the highest precision and no pruning) and learn by momentum SGD whose
  gradients are divided by a running RMS over all thresholds of one kind (weight bits, pruning,
  activation bits; step about ``gate_lr``): scale-free like Adam, but unlike Adam a gate with
  more loss or cost at stake still moves faster than the others (with Adam every threshold
  moves at the same speed and all gates close together). The statistics are treated as
  constants (the surrogate gradient reaches the thresholds, not the weights).
* The paper uses one weight range per layer; here it is per output channel, like the grid the
  compiled program quantizes with. Ranges start at the weights' per-channel max and the
  activations' calibrated max (``context.calibration``) and learn in log space with Adam
  (``range_lr``), which is scale-free.
* The paper tunes ``lambda`` by hand per target; the squared hinge (weight ``penalty``, aimed
  at ``(1 - margin)`` of each limit, whatever costs the budget names) makes one run land on
  the budget, and ``lam`` keeps the paper's pressure towards fewer BOPs below it. Squared, its
  push fades near the target, so the task loss stops the closing there instead of the gates
  overshooting far below the budget; what the discrete gates leave above it the repair
  removes. A short search still overshoots (the discrete gates close faster than the task
  loss can hold them), so below ``floor`` times the binding limit (default 0.85; the
  binding limit is the one with the largest ``cost / limit``) the ``lambda`` pressure stops and
  a second squared hinge pulls the costs back up, re-opening gates through the same
  surrogate, so the search's costs return towards the band ``[floor, 1 - margin]`` of the
  budget. The read-off judges activation gates by the running mean of their statistics, so
  while the search still moves it can differ from the last step's gates (on the digits CNN
  at a 20x budget a 40-step search was still swinging between 26.2x and 19.9x; an 80-step
  one holds 19.9x through its second half).
  ``floor=None`` is the paper's behaviour (``lambda`` pushes at every cost).
* The codes are computed in integers of the finest grid, ``z_hat = (c_0 + g_1 (f_1 r_1 + ...))
  / (2^b_top - 1)`` with ``f_k = (2^b_top - 1) / (2^b_k - 1)`` and rounding ``floor(v + 0.5)``,
  so all gates open equals the plain top-bit quantization of ``z`` exactly, and all closed the
  plain lowest-bit one. This needs each candidate to divide the next (the paper's doubling);
  from other option sets the longest such chain ending at the highest width is searched and
  the other widths are never chosen.
* Network weights use SGD with Nesterov momentum (``lr``); training batches are read from
  ``context.data`` from its start (re-iterated as needed), so the result depends only on the
  seed, not on what the context served before. The global RNG state is restored afterwards.
* **The closing cost of a pruning block** (not in the paper). A pruning gate's task-loss
  gradient is the first-order Taylor term of its mask, about zero at a trained model's
  optimum (scaling a channel scales its consumers' weights, which sit at a stationary
  point), while the gate with the most BOPs at stake gets the largest cost gradient: with
  the paper's loss alone, a search on Fashion-MNIST ResNet-20 at 60x fewer BOPs kept 4 of
  the 16 channels of the stage-1 residual trunk (with 50 search steps and with 150) and
  scored 66% after the fine-tune. So each block also carries ``C_p``, half the empirical
  Fisher of its gate (``0.5 E_i[(d task_i / d g_p)^2]``, per-sample derivatives summed over
  the gate's mask sites, a running mean over the steps; Theis et al.'s Fisher pruning), the
  second-order estimate of the task loss its closing costs; ``fisher * sum_p (1 - g_p) C_p``
  joins the loss, and its surrogate gradient holds open the blocks whose closing costs more
  than it saves. ``fisher`` scales the estimate; measured there at 60x, ``fisher=1`` kept 8
  of the 16 trunk channels (90.12%), 4 and 10 kept all 16 (92.50% both); 4 is the default,
  ``fisher=0`` the paper's loss.

Knobs: ``steps`` (default 150: about 2.5 min on ResNet-20 at batch 128 on two cores), ``lam``,
``penalty``, ``margin``, ``floor``, ``fisher``, ``block`` (channels per pruning block; default
``max(1, size // 8)`` per group), ``lr``, ``gate_lr``, ``range_lr``, ``distill``,
``temperature``, ``momentum`` (running mean of the activation statistics and of the closing
costs).

>>> z = torch.rand(1000, generator=torch.Generator().manual_seed(0))
>>> one = torch.ones(())
>>> bool((bit_sharing(z, (2, 4, 8), (one, one)) == discretize(z, 8)).all())
True
>>> bool((bit_sharing(z, (2, 4, 8), (0 * one, one)) == discretize(z, 2)).all())
True
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from ..progress import Progress
from .ilp_model import infeasible_error
from .problem import Option, Problem, Solution, evaluate, resolve_limits
from .sbs_gates import (
    _channel_scores,
    _read_bits,
    _ThresholdOptimizer,
    bit_chain,
    bit_sharing,
    discretize,
)
from .sbs_supernet import _Supernet
from .search import SearchContext, check_int, check_real

_NAME = "SBSSolver"

__all__ = ["SBSSolver", "bit_chain", "bit_sharing", "discretize"]  # the last three: sbs_gates


# --- the solver -----------------------------------------------------------------------------------


class SBSSolver:
    """Single-path Bit Sharing: gates over shared bit codes and channel blocks, trained with a
    BOPs-aware loss, read off as bits and kept counts (see the module docstring)."""

    name = "sbs"
    needs_context = True

    def __init__(self, *, seed: int = 0, steps: int = 150, lam: float = 0.02,
                 penalty: float = 10.0, margin: float = 0.05, block: int | None = None,
                 lr: float = 0.003, gate_lr: float = 0.02, range_lr: float = 0.01,
                 distill: bool = True, temperature: float = 4.0, momentum: float = 0.9,
                 floor: float | None = 0.85, fisher: float = 4.0) -> None:
        check_int(_NAME, "steps", steps, 1)
        if block is not None:
            check_int(_NAME, "block", block, 1)
        check_int(_NAME, "seed", seed)
        for opt, value in (("lr", lr), ("gate_lr", gate_lr), ("range_lr", range_lr),
                           ("temperature", temperature)):
            check_real(_NAME, opt, value, 0.0)
        for opt, value in (("lam", lam), ("penalty", penalty), ("fisher", fisher)):
            check_real(_NAME, opt, value, 0.0, low_open=False)
        for opt, value in (("margin", margin), ("momentum", momentum)):
            check_real(_NAME, opt, value, 0.0, 1.0, low_open=False, high_open=True)
        if floor is not None:
            check_real(_NAME, "floor", floor, 0.0, 1.0 - margin, high_open=True)
        if not isinstance(distill, bool):
            raise ValueError(  # noqa: TRY004
                f"SBSSolver: distill must be True or False, got {distill!r}")
        self.seed, self.steps, self.lam, self.penalty = seed, steps, float(lam), float(penalty)
        self.margin, self.block, self.lr = float(margin), block, float(lr)
        self.gate_lr, self.range_lr = float(gate_lr), float(range_lr)
        self.distill, self.temperature, self.momentum = distill, float(temperature), momentum
        self.floor = None if floor is None else float(floor)
        self.fisher = float(fisher)

    def solve(self, problem: Problem, budget: Any, *, context: SearchContext) -> Solution:
        if not isinstance(context, SearchContext):
            raise TypeError("SBSSolver searches on the model and data: call solve(problem, "
                            "budget, context=SearchContext(...))")
        limits = resolve_limits(problem, budget)
        lowest = _lowest_costs(problem)
        if any(lowest[k] > v for k, v in limits.items()):
            raise infeasible_error(problem, limits)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = _Supernet(problem, context, self.block, self.momentum)
            history = self._search(net, context, limits)
            bits, kept, scores, closed = self._read_off(net)
        found = evaluate(problem, bits, kept, limits)
        info: dict[str, Any] = {
            "steps": self.steps, "lam": self.lam, "penalty": self.penalty,
            "search_seconds": time.perf_counter() - t0, "search_bops": found.costs["bops"],
            "search_costs": dict(found.costs), "closed_gates": closed,
            "history": history, "channel_scores": scores, "repaired": not found.feasible,
            "closing_costs": {gid: gate.closing_cost.numpy().copy()
                              for gid, gate in net.group_gates.items()}}
        if not found.feasible:
            bits, kept = context.tighten(bits, kept, budget)
        return context.solution(bits, kept, budget, solver=self.name, info=info)

    # --- search ---------------------------------------------------------------------------

    def _search(self, net: _Supernet, context: SearchContext, limits: Mapping[str, float]
                ) -> list[dict[str, float]]:
        thresholds = net.threshold_params()
        opt = torch.optim.SGD(net.network_params(), lr=self.lr, momentum=0.9, nesterov=True)
        ranges = torch.optim.Adam(net.range_params(), lr=self.range_lr)
        gate_opts = {kind: _ThresholdOptimizer(params, self.gate_lr)
                     for kind, params in thresholds.items() if params}
        # Weight-side gates (bits and pruning) on even steps, activation gates on odd ones.
        sides = ([gate_opts[k] for k in ("weight", "prune") if k in gate_opts],
                 [gate_opts[k] for k in ("activation",) if k in gate_opts])
        teacher = copy.deepcopy(context.teacher).eval() \
            if self.distill and context.teacher is not None else None
        targets = {k: math.log(v * (1 - self.margin)) for k, v in limits.items()}
        logs = {k: math.log(v) for k, v in limits.items()}
        floor = None if self.floor is None else math.log(self.floor)
        bar = Progress(self.steps, "sbs", bool(context.progress))
        history: list[dict[str, float]] = []
        gates = list(net.group_gates.values()) if self.fisher > 0 else []
        for gate in gates:
            gate.tracking = True
        net.train()
        for step, batch in enumerate(_batches(context, self.steps)):
            inputs = context.inputs(batch)
            net.refresh()
            logits = net.gm(*inputs)
            task = context.loss(logits, batch)  # the compile objective (labels: cross entropy)
            if teacher is not None and context.objective.kind == "cross_entropy":
                with torch.no_grad():
                    t_logits = teacher(*inputs)
                t = self.temperature
                kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(t_logits / t, -1),
                              log_target=True, reduction="batchmean") * t * t
                task = 0.5 * task + 0.5 * kd
            costs = net.costs()
            log_bops = torch.log(costs["bops"])
            hinge = sum(torch.relu(torch.log(costs[k]) - v) ** 2 for k, v in targets.items())
            pressure = self.lam * log_bops
            if floor is not None:
                # How close the binding limit is (log of cost / limit, the largest over the
                # limits): below the floor the pressure stops and the costs are pulled back.
                tight = torch.stack([torch.log(costs[k]) - v for k, v in logs.items()]).max()
                if float(tight.detach()) < floor:
                    pressure = 0.0 * log_bops
                hinge = hinge + torch.relu(floor - tight) ** 2
            loss = task + pressure + self.penalty * hinge
            if gates:
                loss = loss + self.fisher * sum(g.fisher_penalty() for g in gates)
            if not torch.isfinite(loss):
                raise ValueError(f"SBSSolver: the loss became {float(loss)} at step {step}; "
                                 f"lower lr (now {self.lr})")
            for o in (opt, ranges):
                o.zero_grad(set_to_none=True)
            for params in thresholds.values():
                for p in params:
                    p.grad = None
            loss.backward()
            for gate in gates:
                gate.fisher_update(self.momentum)
            opt.step()
            ranges.step()
            for gate_opt in sides[step % 2]:
                gate_opt.step()
            ratio = net.problem.reference["bops"] / float(costs["bops"].detach())
            if step % max(1, self.steps // 10) == 0 or step == self.steps - 1:
                history.append({"step": step, "task": float(task.detach()),
                                "bops_ratio": ratio})
            bar.update(step + 1, loss=float(loss.detach()), bops_x=ratio)
        for gate in gates:
            gate.tracking = False
        return history

    # --- read-off ------------------------------------------------------------------------------

    def _read_off(self, net: _Supernet) -> tuple[dict[str, Option], dict[int, int],
                                                  dict[int, np.ndarray], int]:
        problem = net.problem
        closed = 0
        wanted_w, wanted_a = {}, {}
        for key, q in net.weight_q.items():
            w = next(net.layers[lay.name].weight for lay in problem.layers
                     if (lay.weight_key or lay.name) == key)
            gates = q.open_weight_gates(w.detach())
            closed += sum(not g for g in gates)
            wanted_w[key] = _read_bits(q.bits, gates)
        for key, q in net.act_q.items():
            gates = q.open_gates()
            closed += sum(not g for g in gates)
            wanted_a[key] = _read_bits(q.bits, gates)
        bits = _snap_bits(problem, wanted_w, wanted_a)
        kept, scores = {}, {}
        with torch.no_grad():
            for g in problem.groups:
                gate = net.group_gates[g.id]
                stats = gate.stats()
                margin = stats - gate.alpha.detach()
                open_blocks = margin > 0
                closed += int((~open_blocks).sum())
                count = int(gate.block_size[open_blocks].sum())
                kept[g.id] = min((lv for lv in g.levels if lv >= count), default=g.levels[0])
                scores[g.id] = _channel_scores(gate, margin)
        return bits, kept, scores, closed


def _snap_bits(problem: Problem, wanted_w: Mapping[str, int], wanted_a: Mapping[str, int]
               ) -> dict[str, Option]:
    """Per layer the cheapest option at or above its wanted bits, raised until tied layers
    agree (the maximum over a tied set); the highest option where none is at or above."""
    w_key = {lay.name: lay.weight_key or lay.name for lay in problem.layers}
    a_key = {lay.name: lay.activation_key for lay in problem.layers}
    need_w, need_a = dict(wanted_w), dict(wanted_a)
    for _ in range(4 * len(problem.layers) + 4):
        bits = {}
        for lay in problem.layers:
            fit = [o for o in lay.options if o[0] >= need_w[w_key[lay.name]]
                   and o[1] >= need_a[a_key[lay.name]]]
            bits[lay.name] = min(fit, key=lambda o: (o[0] * o[1], o)) if fit \
                else max(lay.options, key=lambda o: (o[0] * o[1], o))
        changed = False
        for lay in problem.layers:
            w, a = bits[lay.name]
            if w > need_w[w_key[lay.name]]:
                need_w[w_key[lay.name]], changed = w, True
            if a > need_a[a_key[lay.name]]:
                need_a[a_key[lay.name]], changed = a, True
        if not changed:
            return bits
    raise ValueError("SBSSolver: the layers' options admit no common bits for a tied set; "
                     "use the 'ilp' solver")


def _lowest_costs(problem: Problem) -> dict[str, float]:
    """A lower bound of every cost: each layer at its cheapest option, each group at its
    lowest level (ties ignored)."""
    bits = {lay.name: min(lay.options, key=lambda o: (o[0] * o[1], o[0]))
            for lay in problem.layers}
    low = evaluate(problem, bits, {g.id: g.levels[-1] for g in problem.groups}).costs
    wbits = {lay.name: min(lay.options) for lay in problem.layers}
    low_w = evaluate(problem, wbits, {g.id: g.levels[-1] for g in problem.groups}).costs
    return {"bops": low["bops"], "macs": low["macs"], "weight_bytes": low_w["weight_bytes"]}


def _batches(context: SearchContext, n: int) -> Iterator[Any]:
    """``n`` training batches from the start of ``context.data``, re-iterated at its end."""
    served = 0
    while served < n:
        before = served
        for batch in context.data:
            yield batch
            served += 1
            if served >= n:
                return
        if served == before:
            raise ValueError("SBSSolver: data yields no batches")

