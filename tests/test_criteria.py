"""Sensitivity criteria: Hutchinson and Fisher traces against exact formulas, monotonicity on
ResNet-20, data-free defaults, and channel importance on a CNN trained on Fashion-MNIST.

Measured figures are printed (run with ``-s``).
"""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from training import train_steps

from pqcompile import Pipeline
from pqcompile.build import analysis
from pqcompile.criteria import (
    CRITERIA,
    L1,
    ChannelFisher,
    FisherTrace,
    HessianTrace,
    Magnitude,
    Taylor,
    WeightError,
    get_criterion,
    prepare,
)
from pqcompile.errors import PipelineError
from pqcompile.meta import CHANNEL_GROUPS, SENSITIVITY_INFO
from pqcompile.models import resnet20
from pqcompile.passes import ShapeAnalysis
from pqcompile.passes.prune import zero_channels
from pqcompile.passes.sensitivity import (
    SensitivityAnalysis,
    channel_importance,
    layer_sensitivities,
)
from pqcompile.presets import compute_layers
from pqcompile.quant import quantize_weight

BITS = (2, 3, 4, 6, 8)


def exact_block_trace(model: nn.Module, name: str, data, loss_fn) -> float:
    """Trace of the Hessian of the mean loss over ``data`` w.r.t. parameter ``name``."""
    params = dict(model.named_parameters())
    n = sum(len(y) for _, y in data)

    def loss(p):
        return sum(loss_fn(functional_call(model, {**params, name: p}, (x,)), y) * len(y)
                   for x, y in data) / n

    h = torch.autograd.functional.hessian(loss, params[name].detach())
    k = params[name].numel()
    return float(h.reshape(k, k).diagonal().sum())


# --- Hutchinson -----------------------------------------------------------------------------


def test_hutchinson_matches_exact_trace_on_linear_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 0.8])
    y = x @ torch.randn(6, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    model = nn.Linear(6, 1)
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    gm = analysis(model, (x[:1],))
    crit = HessianTrace(loss_fn=F.mse_loss, tol=0.0, min_iters=1, max_iters=1000, seed=0)
    start = time.perf_counter()
    crit.calibrate(gm, data)
    elapsed = time.perf_counter() - start
    exact = exact_block_trace(model, "weight", data, F.mse_loss)
    # d^2 L / dx_n^2 = 2/N w w^T per sample: the input's trace is 2 ||w||^2 exactly.
    exact_act = 2 * float(model.weight.detach().pow(2).sum())
    est, est_act = crit.weight_trace["_0"], crit.activation_trace["_0"]
    print(f"\nlinear regression: Tr(H_w) Hutchinson {est:.5f} vs exact {exact:.5f} "
          f"({100 * (est / exact - 1):+.2f} %), Tr(H_x) {est_act:.5f} vs {exact_act:.5f} "
          f"({100 * (est_act / exact_act - 1):+.2f} %), {crit.iterations} draws, "
          f"{elapsed:.2f} s")
    assert est == pytest.approx(exact, rel=0.03)
    assert est_act == pytest.approx(exact_act, rel=0.03)


def test_hutchinson_matches_exact_trace_on_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 4))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 5, generator=g), torch.randint(0, 4, (32,), generator=g))
            for _ in range(4)]
    gm = analysis(model, (data[0][0][:1],))
    crit = HessianTrace(loss_fn=F.cross_entropy, tol=0.0, min_iters=1, max_iters=2000, seed=0)
    crit.calibrate(gm, data)
    hidden = dict(model.named_children())

    def act_trace(x, y) -> float:  # Hessian w.r.t. the tanh output, one batch
        a = torch.tanh(hidden["0"](x)).detach()
        h = torch.autograd.functional.hessian(lambda t: F.cross_entropy(hidden["2"](t), y), a)
        return float(h.reshape(a.numel(), a.numel()).diagonal().sum())

    exact = {"_0": exact_block_trace(model, "0.weight", data, F.cross_entropy),
             "_2": exact_block_trace(model, "2.weight", data, F.cross_entropy)}
    exact_act = np.mean([act_trace(x, y) for x, y in data])
    for layer, value in exact.items():
        print(f"\nMLP {layer}: Tr(H_w) Hutchinson {crit.weight_trace[layer]:.5f} vs exact "
              f"{value:.5f} ({100 * (crit.weight_trace[layer] / value - 1):+.2f} %)")
        assert crit.weight_trace[layer] == pytest.approx(value, rel=0.05)
    print(f"MLP _2 input: Tr(H_a) {crit.activation_trace['_2']:.5f} vs exact {exact_act:.5f}")
    assert crit.activation_trace["_2"] == pytest.approx(exact_act, rel=0.05)


def test_hutchinson_is_deterministic_and_stops_on_relative_change():
    torch.manual_seed(0)
    gm = analysis(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
                  (torch.randn(1, 4),))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    runs = []
    for seed in (0, 0, 1):
        crit = HessianTrace(seed=seed, tol=0.0, max_iters=5)
        crit.calibrate(gm, data)
        runs.append(crit.weight_trace)
    assert runs[0] == runs[1] and runs[0] != runs[2]
    crit = HessianTrace(tol=0.05, min_iters=3, max_iters=500)
    crit.calibrate(gm, data)
    assert crit.converged and 3 <= crit.iterations < 500


# --- empirical Fisher -------------------------------------------------------------------------


def per_sample_grads(model, x, y):
    """Per sample: gradients of its loss w.r.t. both weights and w.r.t. the hidden ReLU."""
    out = []
    for i in range(len(y)):
        h = torch.relu(model[0](x[i:i + 1]))
        loss = F.cross_entropy(model[2](h), y[i:i + 1])
        gw0, gw2, gh = torch.autograd.grad(loss, [model[0].weight, model[2].weight, h])
        out.append(((gw0, gw2), gh))
    return out


def test_fisher_matches_the_exact_per_sample_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    gm = analysis(model, (x[:1],))
    grads = per_sample_grads(model, x, y)
    exact_w = [torch.stack([g[0][k] ** 2 for g in grads]).mean(0).double() for k in range(2)]
    exact_act = float(np.mean([float((g[1] ** 2).sum()) for g in grads]))

    # Batches of one: N * grad^2 is the empirical Fisher itself.
    ones = FisherTrace(loss_fn=F.cross_entropy, tol=0.0, min_batches=24, max_batches=24)
    ones.calibrate(gm, [(x[i:i + 1], y[i:i + 1]) for i in range(24)])
    assert ones.batches == 24 and not ones.converged
    for layer, exact in zip(("_0", "_2"), exact_w):
        assert torch.allclose(ones.fisher[layer], exact, rtol=1e-5, atol=1e-12)
        assert ones.weight_trace[layer] == pytest.approx(float(exact.sum()), rel=1e-5)

    # Batches of eight: mean_b 8 * grad_b^2 for parameters; for the activation the per-sample
    # trace is exact at any batch size (samples do not interact).
    eights = FisherTrace(loss_fn=F.cross_entropy, tol=0.0, min_batches=3, max_batches=3)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    eights.calibrate(gm, batches)
    by_hand = torch.zeros(8, 5, dtype=torch.float64)
    for xb, yb in batches:
        g = torch.autograd.grad(F.cross_entropy(model(xb), yb), model[0].weight)[0]
        by_hand += 8 * g.double() ** 2 / 3
    assert torch.allclose(eights.fisher["_0"], by_hand, rtol=1e-5, atol=1e-12)
    assert eights.activation_trace["_2"] == pytest.approx(exact_act, rel=1e-5)

    # FIT in loss units: 1/2 (sum_c Tr(F_c) Delta_c^2 + Tr(F_a) Delta_a^2) / 12, the input of
    # _2 being a ReLU output (unsigned: qmax = 2^b - 1), its range from min/max calibration.
    w = model[2].weight.detach().double()
    delta_w = w.abs().amax(1) / 7
    amax = float(torch.relu(model[0](x)).detach().max())
    expected = 0.5 * float((eights.fisher["_2"].sum(1) * delta_w ** 2).sum()) / 12 \
        + 0.5 * eights.activation_trace["_2"] * (amax / 255) ** 2 / 12
    got = eights.layer_sensitivity(gm, "_2", [(4, 8)])[(4, 8)]
    assert got == pytest.approx(expected, rel=1e-5)


def test_fisher_stops_when_the_relative_variance_is_small():
    torch.manual_seed(0)
    gm = analysis(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
                  (torch.randn(1, 4),))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(30)]
    loose = FisherTrace(tol=10.0, min_batches=4, max_batches=30)
    loose.calibrate(gm, iter(data))
    assert loose.converged and loose.batches == 4
    strict = FisherTrace(tol=1e-9, min_batches=4, max_batches=20)
    strict.calibrate(gm, data)
    assert not strict.converged and strict.batches == 20
    mid = FisherTrace(tol=0.01, min_batches=2, max_batches=30)
    mid.calibrate(gm, data)
    if mid.converged:  # the rule held at the batch it stopped on
        assert mid.batches < 30


# --- ResNet-20: monotone, non-negative, all layers and groups --------------------------------


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1).eval()
    gm = analysis(model, (torch.randn(1, 1, 32, 32),))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
            for _ in range(2)]
    return gm, data


@pytest.mark.parametrize("name", ["weight_error", "hessian", "fisher"])
def test_sensitivities_are_monotone_in_bits_on_resnet20(resnet, name):
    gm, data = resnet
    options = {"hessian": {"max_iters": 2, "min_iters": 1},
               "fisher": {"min_batches": 2, "max_batches": 2}}.get(name, {})
    crit = get_criterion(name, **options)
    start = time.perf_counter()
    out = SensitivityAnalysis(crit, data if crit.needs_data else None,
                              weight_bits=BITS)(gm).graph_module
    print(f"\n{name}: ResNet-20 sensitivities in {time.perf_counter() - start:.1f} s")
    table = layer_sensitivities(out)
    assert sorted(table) == sorted(compute_layers(gm)) and len(table) == 22
    for layer, s in table.items():
        values = np.array([[s[(w, a)] for a in BITS] for w in BITS])  # rows: weight bits
        assert np.isfinite(values).all() and (values >= 0).all(), layer
        assert (np.diff(values, axis=0) <= 0).all(), f"{layer}: not monotone in weight bits"
        assert (np.diff(values, axis=1) <= 0).all(), f"{layer}: not monotone in act. bits"
        if name != "hessian":  # a Hutchinson trace may come out negative (counted as zero)
            assert values[0, 0] > values[-1, -1], layer
    positive = sum(s[(2, 2)] > s[(8, 8)] for s in table.values())
    assert positive >= 20
    scores = channel_importance(out)
    groups = [g for g in CHANNEL_GROUPS.get(gm) if g.prunable]
    assert sorted(scores) == sorted(g.id for g in groups)
    assert all(scores[g.id].shape == (g.size,) and (scores[g.id] >= 0).all() for g in groups)
    assert SENSITIVITY_INFO.get(out).criterion == name


def test_the_data_free_criterion_needs_no_data(resnet):
    gm, _ = resnet
    out = SensitivityAnalysis(weight_bits=(2, 4, 8))(gm).graph_module
    info = SENSITIVITY_INFO.get(out)
    assert (info.criterion, info.channel_criterion, info.data) == ("weight_error",
                                                                  "weight_error", False)
    assert not WeightError.needs_data and not Magnitude.needs_data and not L1.needs_data
    # The weight term is ||Q_b(W) - W||^2 on pqcompile.quant's grid (the BN-folded weight);
    # the activation proxy is ||W||^2 k^2 / (12 qmax^2): conv1 reads the signed input,
    # layer1_0_conv1 a ReLU output (unsigned).
    folded = prepare(gm)
    table = layer_sensitivities(out)
    for layer, qmax8 in (("conv1", 127), ("layer1_0_conv1", 255)):
        w = folded.get_submodule(layer.replace("_", ".")).weight.detach().double()
        q, wq = quantize_weight(w, 4)
        scales = torch.tensor(wq.scales, dtype=torch.float64).view(-1, 1, 1, 1)
        err = float(((q.double() * scales - w) ** 2).sum())
        proxy = float(w.pow(2).sum()) * 16 / (12 * qmax8 ** 2)
        assert table[layer][(4, 8)] == pytest.approx(err + proxy, rel=1e-9)
    with pytest.raises(ValueError, match="'hessian' needs data"):
        SensitivityAnalysis("hessian")
    with pytest.raises(ValueError, match="calibrate"):
        FisherTrace().layer_sensitivity(gm, "conv1", [(4, 4)])
    with pytest.raises(PipelineError, match="ChannelGroupAnalysis"):
        Pipeline([ShapeAnalysis(), SensitivityAnalysis()])
    assert set(CRITERIA) >= {"weight_error", "magnitude", "l1", "hessian", "fisher", "taylor",
                             "channel_fisher"}


# --- channel importance on a CNN trained on Fashion-MNIST ------------------------------------


@pytest.fixture(scope="module")
def fashion_cnn():
    from pqcompile.data import fashion_mnist_loaders

    torch.manual_seed(0)
    loaders = fashion_mnist_loaders(64, resize=28, train_subset=6000, seed=0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 49, 10))
    train_steps(model, loaders.train, 250)
    train = [b for _, b in zip(range(8), loaders.train)]
    test = [b for _, b in zip(range(8), loaders.test)]
    return model, train, test


def test_low_scored_channels_hurt_less_than_high_scored_ones(fashion_cnn):
    model, train, test = fashion_cnn
    gm = analysis(model, (train[0][0][:1],))
    x = torch.cat([b[0] for b in test])
    y = torch.cat([b[1] for b in test])
    groups = [g for g in CHANNEL_GROUPS.get(gm) if g.prunable]
    assert [g.size for g in groups] == [8, 16]

    def loss_without(group, channel) -> float:
        keep = np.ones(group.size, dtype=bool)
        keep[channel] = False
        with torch.no_grad():
            return float(F.cross_entropy(zero_channels(model, CHANNEL_GROUPS.get(gm),
                                                       {group.id: keep})(x), y))

    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
    ce = F.cross_entropy
    for crit in (L1(), Magnitude(), Taylor(loss_fn=ce), ChannelFisher(loss_fn=ce),
                 FisherTrace(loss_fn=ce, min_batches=8)):
        crit.calibrate(gm, train)
        for g in groups:
            s = crit.channel_scores(gm, g)
            low, high = loss_without(g, int(np.argmin(s))), loss_without(g, int(np.argmax(s)))
            print(f"\n{crit.name:14s} group {g.name}: base loss {base:.4f}, zeroing the lowest "
                  f"channel {low:.4f}, the highest {high:.4f}")
            assert low < high


def test_second_order_estimates_are_in_loss_units(fashion_cnn):
    """Hessian/Fisher bit sensitivities and Fisher channel scores estimate the increase of the
    mean loss: they rank the measured increases and match their size to a small factor."""
    from scipy.stats import spearmanr

    from pqcompile.finetune import fake_quant_weight

    model, train, _ = fashion_cnn
    gm = analysis(model, (train[0][0][:1],))
    work = prepare(gm)
    x, y = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])

    def loss(m) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    base = loss(work)
    hessian = HessianTrace(loss_fn=F.cross_entropy, max_iters=20)
    fisher = FisherTrace(loss_fn=F.cross_entropy, min_batches=8)
    hessian.calibrate(gm, train)
    fisher.calibrate(gm, train)
    measured, predicted = [], {"hessian": [], "fisher": []}
    for layer in compute_layers(gm):
        module = work.get_submodule(layer[1:])  # node "_4" is module "4"
        original = module.weight.detach().clone()
        for bits in (2, 3, 4):
            with torch.no_grad():
                module.weight.copy_(fake_quant_weight(original, bits))
            measured.append(loss(work) - base)
            with torch.no_grad():
                module.weight.copy_(original)
            for crit in (hessian, fisher):
                predicted[crit.name].append(crit.layer_sensitivity(gm, layer, [(bits, 32)])
                                            [(bits, 32)])
    for name, values in predicted.items():
        rho = spearmanr(measured, values)[0]
        ratio = sum(values) / sum(measured)
        print(f"\n{name}: weight-quantization loss increase, Spearman {rho:.2f} over "
              f"{len(values)} (layer, bits); predicted / measured total {ratio:.2f}")
        assert rho > 0.5 and 0.1 < ratio < 10
    scorer = ChannelFisher(loss_fn=F.cross_entropy)
    scorer.calibrate(gm, train)
    for g in (g for g in CHANNEL_GROUPS.get(gm) if g.prunable):
        actual = []
        for c in range(g.size):
            keep = np.ones(g.size, dtype=bool)
            keep[c] = False
            actual.append(loss(zero_channels(model, CHANNEL_GROUPS.get(gm), {g.id: keep})) - base)
        scores = scorer.channel_scores(gm, g)
        rho, ratio = spearmanr(actual, scores)[0], scores.sum() / sum(actual)
        print(f"channel_fisher {g.name}: pruning one channel, Spearman {rho:.2f}; predicted / "
              f"measured total {ratio:.2f}")
        assert rho > 0.5 and 0.1 < ratio < 10
