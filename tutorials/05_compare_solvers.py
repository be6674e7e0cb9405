"""Compare solvers on one problem: ILP, greedy, uniform baselines and FITCompress.

``pqcompile.compile`` hides three steps this tutorial does by hand, so that several solvers
answer exactly the same question:

1. analysis and sensitivity: the shipped Fashion-MNIST ResNet-20, FIT (Fisher) sensitivities
   from 8 real training batches;
2. ``build_problem``: the problem as pure data (bits options per layer, keep levels per channel
   group, their sensitivities, one exact cost model); one budget, 30x fewer BOPs than FP32;
3. every solver's ``solve(problem, budget)``; the searching ones (FITCompress here, also SBS,
   AJPQ, PIC-PQ) get a ``SearchContext`` with the model and data;
4. a table of each solution's predicted BOPs, weight bytes and objective (the summed
   sensitivity, the predicted loss every solver shares) and of the accuracy of its fake-quant
   model on 4 real held-out batches (no fine-tuning).

Pick one in ``compile(..., solver="greedy")``; ``pqcompile.solvers.register_solver`` adds yours.

Run: python tutorials/05_compare_solvers.py   (about 20 s on an idle 2-core machine)
"""

import time

import torch

from pqcompile.budget import Budget
from pqcompile.build import analysis
from pqcompile.data import fashion_mnist_loaders
from pqcompile.passes import SensitivityAnalysis, channel_importance, layer_sensitivities
from pqcompile.solvers import build_problem, get_solver, list_solvers, resolve_limits, to_assignment
from pqcompile.solvers.search import SearchContext, needs_context
from pqcompile.zoo import pretrained_resnet20_fashion

torch.manual_seed(0)

# --- 1. The model, real data, sensitivities ---------------------------------------------------
model = pretrained_resnet20_fashion()
# 5% of the training split is held out: the searching solver measures candidates on it, and
# the table's accuracy column is measured on it too (never on batches a solver trained on).
loaders = fashion_mnist_loaders(128, val_split=0.05)
held_out = [batch for _, batch in zip(range(4), loaders.val)]  # 512 images
sens_batches = [batch for _, batch in zip(range(8), loaders.train)]

example = held_out[0][0][:1]  # costs are per image
fp32 = analysis(model, (example,))  # trace + shapes + channel groups + FP32 costs
BIT_OPTIONS = [(w, a) for w in (2, 4, 8) for a in (4, 8)]  # (weight bits, activation bits)
scored = SensitivityAnalysis("fisher", sens_batches, bit_options=BIT_OPTIONS)(fp32).graph_module
importance = channel_importance(scored)  # which channels of a group to keep first

# --- 2. One problem, one budget ---------------------------------------------------------------
# The first and last layers are pinned at 8/8 bits; the others choose among BIT_OPTIONS.
problem = build_problem(scored, layer_sensitivities(scored), importance,
                        bit_options=BIT_OPTIONS, keep_levels=(1.0, 0.75, 0.5, 0.25))
budget = Budget(bops="30x")
limit = resolve_limits(problem, budget)["bops"]  # the absolute number of BOPs allowed
print(f"problem: {len(problem.layers)} layers x up to {len(problem.layers[1].options)} bit "
      f"options, "
      f"{len(problem.groups)} prunable channel groups x 4 keep levels; budget {budget} = "
      f"{limit / 1e6:.1f} M BOPs per image (FP32: {problem.reference['bops'] / 1e6:.1f} M)")
print(f"registered solvers: {', '.join(list_solvers())}")

# --- 3. Solve -----------------------------------------------------------------------------------
context = SearchContext(problem, scored, teacher=model, data=loaders.train, held_out=held_out,
                        channel_scores=importance, seed=0)
solvers = {
    "ilp": get_solver("ilp"),            # exact optimum of the summed sensitivity (HiGHS)
    "greedy": get_solver("greedy"),      # best sensitivity per BOP saved, one move at a time
    "uniform4": get_solver("uniform4"),  # every layer w4/a4, first and last 8/8
    "prune8": get_solver("prune8"),      # 8/8 bits, one keep fraction for every group
    "uniform8": get_solver("uniform8"),  # every layer 8/8: 16x, cannot reach 30x
    # FITCompress walks from full precision by Fisher-guided moves, re-estimating the Fisher on
    # the compressed model as it goes; its knobs are cut here to keep the walk short.
    "fitcompress": get_solver("fitcompress", fisher_min_batches=4, fisher_max_batches=8,
                              refresh_every=8, refresh_batches=2),
}
solutions, seconds = {}, {}
for name, solver in solvers.items():
    t0 = time.perf_counter()
    if needs_context(solver):
        solutions[name] = solver.solve(problem, budget, context=context)
    else:
        solutions[name] = solver.solve(problem, budget)
    seconds[name] = time.perf_counter() - t0

# --- 4. Compare: predicted costs, and accuracy of each fake-quant model ------------------------
_, fp32_acc = context.measure(model)
print(f"\nFP32 accuracy on the {sum(len(b[1]) for b in held_out)} held-out images: "
      f"{fp32_acc:.2%}")
print(f"{'solver':12s} {'BOPs x':>7s} {'weights':>9s} {'objective':>10s} {'pruned':>7s} "
      f"{'meets':>6s} {'accuracy':>9s} {'solve':>7s}")
accuracy = {}
for name, s in solutions.items():
    assignment = to_assignment(s, scored, importance)  # bits + keep-masks on the graph
    _, accuracy[name] = context.measure(context.fake_quant(assignment))
    pruned = sum(g.size - s.kept[g.id] for g in problem.groups)
    print(f"{name:12s} {problem.reference['bops'] / s.costs['bops']:6.1f}x "
          f"{s.costs['weight_bytes'] / 1e3:7.1f}KB {s.objective:10.4g} {pruned:7d} "
          f"{s.feasible!s:>6s} {accuracy[name]:9.2%} {seconds[name]:6.1f}s")

# Every solver that can reach the budget does; uniform 8-bit cannot (16x) and says so.
for name, s in solutions.items():
    meets = s.costs["bops"] <= limit
    assert meets == s.feasible, name
    assert meets == (name != "uniform8"), (name, s.costs["bops"], limit)
# The ILP is optimal for the summed sensitivity: nothing under the budget has a lower one.
assert solutions["ilp"].objective <= solutions["greedy"].objective + 1e-12
assert solutions["ilp"].objective <= min(s.objective for n, s in solutions.items()
                                         if s.feasible) + 1e-12
# 8-bit pruning alone must remove channels to get from 16x to 30x: keeping 75% of every group
# gives less than 30x, so it keeps 50% (63.8x), and without fine-tuning that model collapses
# (9.38% here). The joint solvers spend the budget on bits and stay close to FP32 (measured
# here: FP32 93.95%, ILP and greedy 93.55%, FITCompress 93.16%, uniform 4-bit 87.30%).
assert sum(solutions["prune8"].kept.values()) < sum(g.size for g in problem.groups)
assert accuracy["ilp"] >= fp32_acc - 0.015, accuracy
assert accuracy["ilp"] > accuracy["uniform4"] > accuracy["prune8"], accuracy
print("solvers OK")
