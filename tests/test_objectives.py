"""One objective for any model, and costs that match what the program stores.

* a regression model (sklearn's diabetes data) and a dict-output model (sklearn's digits)
  compile with data: Fisher sensitivity, the ILP, the measured Pareto front and a short
  fine-tune all measure the distillation objective; the program equals its reference;
* the default objective's Gauss-Newton Fisher is not zero at the float model and predicts the
  measured distillation-loss increase of quantized weights; a loss whose gradient is zero
  there gives an all-zero table, which raises naming the criterion;
* a model with an nn.Embedding reaches weight_bytes budgets of 4x and 6x (the table is stored
  as int8), and ``.totals["weight_bytes"]`` equals the bytes the artifact stores;
* matmuls of two activations are integer products (int8 operands, int32 accumulation): their
  MACs are costed at 8 x 8 bits, not as float MACs, and the report lists no float MACs.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits
from torch import nn

import pqcompile
from pqcompile.budget import Budget
from pqcompile.build import analysis
from pqcompile.criteria import FisherTrace, HessianTrace, prepare
from pqcompile.errors import DegenerateSensitivityError, OptionError
from pqcompile.finetune import fake_quant_weight
from pqcompile.meta import COST
from pqcompile.objective import Objective, leaves
from pqcompile.passes.cost import program_constant_bytes
from pqcompile.passes.sensitivity import SensitivityAnalysis, check_table
from pqcompile.presets import compute_layers
from pqcompile.solvers import build_problem, evaluate


def _train(model, x, y, loss, steps=300, lr=1e-2):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def diabetes():
    """An MLP regressor trained on sklearn's diabetes data (standardized), and its batches."""
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)[:, None]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 1))
    model = _train(model, x[:384], y[:384], F.mse_loss, lr=1e-3)  # held-out R^2 0.45
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 384, 32)]
    return model, train, (x[384:], y[384:])


class DigitsHeads(nn.Module):
    """A digits classifier returning a dict: class logits and an embedding (a ModelOutput's
    shape of output)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.cls = nn.Linear(64, 10)
        self.emb = nn.Linear(64, 16)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.cls(h), "embedding": self.emb(h)}


@pytest.fixture(scope="module")
def digits_heads():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = _train(DigitsHeads(), x[:1280], y[:1280],
                   lambda out, t: F.cross_entropy(out["logits"], t), steps=200)
    train = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1280, 64)]
    return model, train, (x[1280:], y[1280:])


def _program_equals_reference(c, x):
    got, ref = c(x.numpy()), c.reference(x)
    if isinstance(ref, dict):
        assert set(got) == set(ref)
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key].numpy())
    else:
        np.testing.assert_array_equal(got, ref.numpy())


def test_regression_model_compiles_with_data(diabetes):
    model, train, (x_test, y_test) = diabetes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pqcompile.errors.PQCompileWarning)
        c = pqcompile.compile(model, (x_test[:8],), target="host", budget=Budget(bops="24x"),
                              data=train, pareto_points=2,
                              finetune={"epochs": 1, "max_batches": 4, "lr": 1e-3})
    assert c.totals["bop_reduction"] >= 24
    _program_equals_reference(c, x_test[:8])
    # The front is measured by the objective's loss; a regressor has no accuracy.
    measured = [cand for cand in c.candidates if cand["loss"] is not None]
    assert measured and all(cand["accuracy"] is None for cand in c.candidates)
    chosen = next(cand for cand in c.candidates if cand["source"] == "chosen")
    assert chosen["loss"] is not None and 0 <= chosen["loss"] < 1  # NMSE against FP32
    # The compressed regressor still predicts: R^2 on the 58 held-out patients.
    with torch.no_grad():
        pred = c.reference(x_test).double()
    r2 = 1 - float(((pred - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())
    with torch.no_grad():
        fp32 = model(x_test).double()
    r2_fp32 = 1 - float(((fp32 - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())
    print(f"\ndiabetes MLP at {c.totals['bop_reduction']:.1f}x fewer BOPs: held-out R^2 "
          f"{r2:.3f} (FP32 {r2_fp32:.3f}); chosen NMSE vs FP32 {chosen['loss']:.4f}")
    assert r2_fp32 > 0.4 and r2 > r2_fp32 - 0.1


@pytest.mark.parametrize("solver,options", [
    ("sbs", {"steps": 30}), ("ajpq", {"episodes": 4}),
    ("picpq", {"cycles": 3, "population": 4, "tournament": 2, "finetune_steps": 2})])
def test_searching_solvers_measure_a_regressor_by_the_objective(diabetes, solver, options):
    model, train, (x_test, _) = diabetes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pqcompile.errors.PQCompileWarning)
        c = pqcompile.compile(model, (x_test[:8],), target="host", budget=Budget(bops="20x"),
                              data=train, solver=solver, solver_options=options,
                              pareto_points=1)
    assert c.solution.feasible and c.totals["bop_reduction"] >= 20
    chosen = next(cand for cand in c.candidates if cand["source"] == "chosen")
    assert chosen["accuracy"] is None and 0 <= chosen["loss"] < 1  # NMSE against FP32
    _program_equals_reference(c, x_test[:8])


def test_dict_output_model_compiles_with_data(digits_heads):
    model, train, (x_test, y_test) = digits_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pqcompile.errors.PQCompileWarning)
        c = pqcompile.compile(model, (x_test[:4],), target="host", budget=Budget(bops="20x"),
                              data=train, pareto_points=2,
                              finetune={"epochs": 1, "max_batches": 3, "lr": 1e-3})
    assert c.totals["bop_reduction"] >= 20
    _program_equals_reference(c, x_test[:4])
    # Labelled batches and a logits leaf: the front also gets a top-1 accuracy.
    chosen = next(cand for cand in c.candidates if cand["source"] == "chosen")
    assert chosen["loss"] is not None and 0 <= chosen["accuracy"] <= 1
    with torch.no_grad():
        acc = float((c.reference(x_test)["logits"].argmax(1) == y_test).float().mean())
        acc_fp32 = float((model(x_test)["logits"].argmax(1) == y_test).float().mean())
    print(f"\ndigits dict model at {c.totals['bop_reduction']:.1f}x: held-out top-1 {acc:.3f} "
          f"(FP32 {acc_fp32:.3f})")
    assert acc > acc_fp32 - 0.05


def test_the_objective_over_output_structures():
    s = {"a": torch.ones(4, 3), "b": [torch.zeros(4, 2), (torch.arange(4), None)]}
    t = {"a": torch.full((4, 3), 2.0), "b": [torch.full((4, 2), 1.0), (torch.arange(4), None)]}
    assert [tuple(x.shape) for x in leaves(s)] == [(4, 3), (4, 2)]  # integer leaves skipped
    # NMSE per leaf: (1 - 2)^2 / 2^2 + (0 - 1)^2 / 1^2
    assert float(Objective().loss(s, t, None)) == pytest.approx(0.25 + 1.0)
    # Integer labels of the rows make a (N, C) leaf class logits: T^2 KL of softened logits.
    logits_s, logits_t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    temp = 2.0
    p, q = F.softmax(logits_t / temp, -1), F.softmax(logits_s / temp, -1)
    kl = float((p * (p.log() - q.log())).sum()) * temp ** 2
    obj = Objective(temperature=temp)
    assert float(obj.loss(logits_s, logits_t, torch.tensor([0]))) == pytest.approx(kl)
    assert obj.correct(logits_s, logits_t, torch.tensor([0])) == 0
    assert obj.correct(logits_s, logits_t, None) is None  # no labels: not a classifier
    with pytest.raises(OptionError, match="scalar tensor"):
        Objective(lambda s, t, y: s).loss(torch.ones(2, 2), torch.ones(2, 2), None)
    with pytest.raises(OptionError, match="not a built-in"):
        Objective("mse")


def test_gauss_newton_fisher_predicts_the_distillation_loss_increase(diabetes):
    """At the float model the distillation loss and its gradient are zero; the default
    objective's Fisher (Gauss-Newton probe) is not, and estimates the measured increase of
    the NMSE when a layer's weights are quantized (the criterion's units)."""
    model, train, _ = diabetes
    gm = analysis(model, (train[0][0][:1],))
    work = prepare(gm)
    x = torch.cat([b[0] for b in train])
    with torch.no_grad():
        teacher = work(x)
    fisher = FisherTrace(min_batches=12, max_batches=12)
    fisher.calibrate(gm, train * 4)
    measured, predicted = [], []
    for layer in compute_layers(gm):
        module = work.get_submodule(layer[1:])
        original = module.weight.detach().clone()
        for bits in (2, 3, 4):
            with torch.no_grad():
                module.weight.copy_(fake_quant_weight(original, bits))
                measured.append(float(Objective().loss(work(x), teacher, None)))
                module.weight.copy_(original)
            predicted.append(fisher.layer_sensitivity(gm, layer, [(bits, 32)])[(bits, 32)])
    ratio = sum(predicted) / sum(measured)
    order = np.corrcoef(np.argsort(np.argsort(measured)), np.argsort(np.argsort(predicted)))
    print(f"\nGauss-Newton Fisher vs measured NMSE increase: predicted / measured {ratio:.2f}, "
          f"Spearman {order[0, 1]:.2f} over {len(measured)} (layer, bits)")
    assert all(p > 0 for p in predicted)
    assert 0.2 < ratio < 5 and order[0, 1] > 0.7


def test_a_zero_gradient_loss_gives_a_degenerate_table(diabetes):
    model, train, _ = diabetes

    def mse_to_teacher(student, teacher, target):  # zero, with zero gradient, at the teacher
        return ((student - teacher) ** 2).mean()

    with pytest.raises(DegenerateSensitivityError, match="criterion 'fisher' scored every"):
        pqcompile.compile(model, (train[0][0][:1],), target="host", budget=Budget(bops="20x"),
                          data=train, loss=mse_to_teacher, criterion="fisher")
    # Its curvature is not zero: the Hessian criterion scores it.
    gm = analysis(model, (train[0][0][:1],))
    crit = HessianTrace(objective=Objective(mse_to_teacher), max_iters=4)
    table = SensitivityAnalysis(crit, train[:2], channels=False)(gm).graph_module
    assert table is not None and min(crit.weight_trace.values()) > 0
    options = ((4, 8), (8, 8))
    with pytest.raises(DegenerateSensitivityError, match="non-finite"):
        check_table(crit, {"_0": {(4, 8): math.nan, (8, 8): 0.0}}, {}, options)
    with pytest.raises(DegenerateSensitivityError, match="same value at all bit options"):
        check_table(crit, {"_0": {(4, 8): 1.0, (8, 8): 1.0}}, {}, options)


class Bag(nn.Module):
    """Token ids -> embedding -> mean over the sequence -> MLP. Every layer's outputs are a
    multiple of 16, the kernels' widest vector: no padding in the stored weights."""

    def __init__(self, vocab=200, dim=32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 16))

    def forward(self, ids):
        return self.mlp(self.emb(ids).mean(1))


@pytest.mark.parametrize("ratio", [4, 6])
def test_embedding_budgets_and_stored_bytes(ratio):
    torch.manual_seed(0)  # random weights: a cost and parity test, no accuracy claim
    model = Bag().eval()
    ids = torch.randint(0, 200, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pqcompile.errors.PQCompileWarning)
        c = pqcompile.compile(model, (ids,), target="host",
                              budget=Budget(weight_bytes=f"{ratio}x"))
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert c.totals["fp32_weight_bytes"] == fp32_bytes
    assert c.solution.feasible and c.solution.costs["weight_bytes"] <= fp32_bytes / ratio
    stored = sum(p["nbytes"] for p in c.artifact.manifest["params"])
    table = next(p for p in c.artifact.manifest["params"] if p["name"].startswith("emb"))
    assert table["dtype"] in ("int8", "uint8") and table["nbytes"] == 200 * 32
    assert program_constant_bytes(c.reference) == 0  # no float island here
    assert c.totals["weight_bytes"] == stored  # what the artifact stores for parameters
    assert c.totals["predicted_weight_bytes"] == c.solution.costs["weight_bytes"] == stored
    assert c.totals["weight_bytes"] <= fp32_bytes / ratio
    _program_equals_reference(c, ids)


def test_activation_matmuls_are_integer_products_costed_at_8x8_bits():
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4.0, -1) @ self.v(x)
            return self.out(a.mean(1))

    torch.manual_seed(0)
    model, x = Attend().eval(), torch.randn(1, 6, 16)
    problem = build_problem(analysis(model, (x,)), None, None)
    assert problem.float_nodes == ()  # the two products run on integers
    full = {g.id: g.size for g in problem.groups}  # the products scale with kept channels
    assert problem.fixed_macs + problem.float_macs.value(full) == 2 * 6 * 6 * 16
    assert problem.float_mac_bops == 8 * 8
    eights = evaluate(problem, {layer.name: (8, 8) for layer in problem.layers}, {})
    layer_macs = sum(layer.fp32_macs for layer in problem.layers)
    assert eights.costs["bops"] == (layer_macs + 2 * 6 * 6 * 16) * 8 * 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pqcompile.errors.PQCompileWarning)
        c = pqcompile.compile(model, (x,), target="host", budget=Budget(bops="12x"))
    matmuls = [n for n in c.graph.graph.nodes if n.op == "call_function"
               and "matmul" in str(n.target)]
    assert len(matmuls) == 2
    for n in matmuls:
        cost = COST.get(n)
        assert (cost.weight_bits, cost.activation_bits) == (8, 8)
        assert cost.macs == 6 * 6 * 16 and cost.bops == cost.macs * 8 * 8
    assert list(c.float_ops) == []  # the products and the (fixed-point) softmax are integer
    assert "float MACs" not in c.report()
    assert c.totals["weight_bytes"] == sum(p["nbytes"] for p in c.artifact.manifest["params"])
    _program_equals_reference(c, x)
