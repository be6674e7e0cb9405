"""What real pretrained checkpoints bring: dead channels, inputs that flow through pads and
normalizations before the first layer, heavy-tailed activations; and the fidelity figure every
build measures against the float model (on a CNN trained on sklearn's digits, real data)."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from solver_models import digits
from torch import nn
from training import train_steps

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.budget import Budget
from pqcompile.build import analysis, compile_assignment
from pqcompile.criteria import FisherTrace
from pqcompile.errors import CriterionError, FidelityWarning
from pqcompile.fidelity import AGREEMENT_WARN, SQNR_WARN_DB, describe, measure
from pqcompile.meta import QPARAMS, WEIGHT_QUANT
from pqcompile.passes.sensitivity import SensitivityAnalysis, layer_sensitivities
from pqcompile.quant import AutoObserver, build_reference
from pqcompile.quant.observers import quantization_mse
from pqcompile.quant.qparams import (
    INT32_MAX,
    REL_SCALE_FLOOR,
    QParams,
    quantize_bias,
    quantize_layer,
    quantize_weight,
)
from pqcompile.report import artifact_report

DEAD = (1, 6)  # the channels killed in each conv of the checkpoint


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c2, self.b2 = nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def dead_channel_checkpoint(train) -> SmallCNN:
    """Trained with dead channels as real checkpoints hold them: weights of ~1e-9 that training
    leaves alone, so BN's running_var decays to 0 (set to exactly 0 at the end) and the
    channel's output is its BN bias; the BN fold then scales those weights by gamma/sqrt(eps).
    """
    model = SmallCNN()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv, bn in ((model.c1, model.b1), (model.c2, model.b2)):
            keep = torch.ones(conv.out_channels, 1, 1, 1)
            for c, beta in zip(DEAD, (0.8, -1.5)):
                conv.weight[c] = 1e-9 * torch.randn(conv.weight[c].shape, generator=g)
                conv.bias[c], bn.bias[c] = 0.0, beta
                keep[c] = 0.0
            conv.weight.register_hook(lambda grad, keep=keep: grad * keep)
            conv.bias.register_hook(lambda grad, keep=keep: grad * keep.flatten())
    train_steps(model, train, 150)
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            for c in DEAD:
                bn.running_var[c], bn.running_mean[c] = 0.0, 0.0
            assert bn.bias[list(DEAD)].abs().min() > 0.1  # the dead channels' constant output
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint():
    """A CNN trained on digits (real data), with dead channels; the held-out batches."""
    torch.manual_seed(0)
    train, test = digits()
    return dead_channel_checkpoint(train), train, test


def accuracy(fn, batches) -> float:
    with torch.no_grad():
        return sum(int((fn(x).argmax(1) == y).sum()) for x, y in batches) / \
            sum(len(y) for _, y in batches)


# --- weight and bias quantization of dead channels -------------------------------------------


def test_dead_and_zero_channels_get_floored_steps_and_exact_zeros():
    w = torch.randn(4, 3, 3, 3)
    w[1] = 1e-9 * torch.randn(3, 3, 3)  # effectively zero
    w[2] = 0.0  # exactly zero
    w[3] *= 1e-3  # small but alive (2^-10 of the largest): its own step
    q, wq = quantize_weight(w, 8)
    top = float(w[0].abs().max()) / 127
    assert wq.scales[0] == pytest.approx(top, rel=1e-12)
    assert wq.scales[1] == wq.scales[2] == wq.scales[3]  # the smallest live step, not 1e-9 / 127
    assert wq.scales[3] == pytest.approx(float(w[3].abs().max()) / 127, rel=1e-12)
    assert torch.all(q[1] == 0) and torch.all(q[2] == 0)
    assert int(q[3].abs().max()) == 127
    w[3] *= 2.0 ** -7  # 2^-17 of the largest: dead
    q, wq = quantize_weight(w, 8)
    assert torch.all(q[3] == 0) and wq.scales[3] == wq.scales[0]


def test_a_dead_channels_bias_fits_int32_and_stays_exact():
    """The collapse that crashed (bias 2.3 at scale ~1e-13): the dead channel quantizes to
    zeros at the smallest live step, and where even that leaves its bias too large for int32
    (an input of tiny range), the bias floor raises that channel's step until it fits beside
    the products; every bias stays within half an accumulator step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, 3, 3, generator=g) * 0.05
    w[5] = 3e-7 * torch.randn(16, 3, 3, generator=g)  # 1e-9 weights times gamma / sqrt(eps)
    b = torch.randn(8, generator=g) * 0.1
    b[5] = 2.3
    terms = 16 * 9
    for in_range, floor_binds in ((2.0, False), (1e-4, True)):
        inp = QParams(in_range / 127, 8, True)
        _, plain = quantize_weight(w, 8)
        if floor_binds:
            with pytest.raises(ValueError, match="channel 5 .* too small for its bias"):
                quantize_bias(b, inp.scale, plain.scales)  # the steps alone cannot hold it
        wint, wq, bias = quantize_layer(w, b, 8, inp, where="layer 'c'")
        assert (wq.scales[5] > plain.scales[5]) == floor_binds
        assert int(bias.abs().max()) + terms * 127 * 127 <= INT32_MAX
        assert torch.all(wint[5] == 0)
        step = inp.scale * torch.tensor(wq.scales, dtype=torch.float64)
        assert torch.all((bias * step - b.double()).abs() <= step / 2 + 1e-15)
        live = [c for c in range(8) if c != 5]  # live channels keep max |w| / qmax steps
        assert np.allclose([wq.scales[c] for c in live],
                           (w[live].reshape(7, -1).abs().amax(1).double() / 127).numpy())
    # a layer whose weights are all zero keeps its bias too
    inp = QParams(0.02 / 127, 8, True)
    _, wq0, bias0 = quantize_layer(torch.zeros(3, 4), torch.tensor([5.0, -1.0, 0.0]), 8, inp)
    assert torch.allclose(bias0 * inp.scale * torch.tensor(wq0.scales, dtype=torch.float64),
                          torch.tensor([5.0, -1.0, 0.0], dtype=torch.float64), atol=1e-6)


def test_an_accumulator_too_small_for_the_products_names_the_cause():
    inp = QParams(0.01, 8, True)
    with pytest.raises(ValueError, match="layer 'big'.*accumulator could overflow.*before any "
                                         "bias"):
        quantize_layer(torch.randn(2, 140000), None, 8, inp, where="layer 'big'")


# --- the checkpoint with dead channels, end to end ------------------------------------------


def check_program(c, x: torch.Tensor) -> None:
    out = c(x.numpy())
    assert np.array_equal(out, c.reference(x).numpy())


def test_dead_channel_checkpoint_compiles_data_free_and_with_data(checkpoint):
    model, train, test = checkpoint
    fp32_acc = accuracy(model, test)
    assert fp32_acc > 0.8  # trained on real data, dead channels and all
    example = (train[0][0][:8],)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FidelityWarning)  # 8-bit layers: no warning
        free = pqcompile.compile(model, example, target="host", budget=Budget(bops="16x"))
        data = pqcompile.compile(model, example, target="host", budget=Budget(bops="16x"),
                                 data=train, calibration_batches=4)
    x = test[0][0][:8]  # the example inputs' shape
    for c, inputs in ((free, 8), (data, 4 * 64)):
        check_program(c, x)
        f = c.fidelity
        assert f["inputs"] == inputs
        assert f["sqnr_db"] > 25 and f["top1_agreement"] >= 0.95
        assert c.artifact.manifest["extra"]["fidelity"] == f
        assert describe(f) in c.report()
        # the dead channels' weights are exact zeros, their biases kept
        ref = {n.name: n for n in c.reference.graph.nodes}
        for layer in ("c1", "c2"):
            conv = c.reference.get_submodule(ref[layer].target)  # int8 weights, int32 bias
            scales = WEIGHT_QUANT.get(ref[layer]).scales
            assert min(scales) >= max(scales) * REL_SCALE_FLOOR
            for ch in DEAD:
                assert torch.all(conv.weight[ch] == 0) and int(conv.bias[ch]) != 0
        assert accuracy(c.reference, test) >= fp32_acc - 0.03  # held-out digits


@pytest.fixture(scope="module")
def eight_bit(checkpoint):
    """The checkpoint at 8/8 bits, calibrated on two batches of digits; the warnings seen."""
    model, train, _ = checkpoint
    batches = [x for x, _ in train[:2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = compile_assignment(model, (batches[0][:1],),
                               Assignment.uniform(["c1", "c2", "fc"], 8, 8), calibration=batches)
    return c, batches, [w for w in caught if issubclass(w.category, FidelityWarning)]


def test_fidelity_is_the_hand_computed_sqnr_and_agreement(checkpoint, eight_bit, tmp_path):
    model = checkpoint[0]
    c, batches, _ = eight_bit
    with torch.no_grad():
        y = torch.cat([model(x) for x in batches]).double()
        q = torch.cat([c.reference(x) for x in batches]).double()
    sqnr = 10 * math.log10(float((y ** 2).sum()) / float(((y - q) ** 2).sum()))
    agree = float((y.argmax(1) == q.argmax(1)).double().mean())
    assert c.fidelity["sqnr_db"] == pytest.approx(sqnr, rel=1e-9)
    assert c.fidelity["top1_agreement"] == agree and c.fidelity["inputs"] == 128
    c.save(tmp_path / "a")
    assert describe(c.fidelity) in artifact_report(tmp_path / "a")
    assert artifact_report(tmp_path / "a", as_dict=True)["fidelity"] == c.fidelity


def test_fidelity_warning_fires_for_a_destroyed_configuration_only(checkpoint, eight_bit):
    model = checkpoint[0]
    good, batches, warned = eight_bit
    assert not warned and good.fidelity["sqnr_db"] > 30
    assert good.fidelity["top1_agreement"] >= 0.95
    # 2-bit weights and activations everywhere, ranges calibrated on inputs 100x too small
    with pytest.warns(FidelityWarning, match=r"far from the FP32 model.*give data=.*"
                                             r"raise the budget's bits.*finetune"):
        bad = compile_assignment(model, (batches[0][:1],),
                                 Assignment.uniform(["c1", "c2", "fc"], 2, 2),
                                 calibration=[x / 100 for x in batches])
    f = bad.fidelity
    assert f["sqnr_db"] < SQNR_WARN_DB or f["top1_agreement"] < AGREEMENT_WARN
    assert "POOR" in bad.report()


def test_fidelity_of_several_outputs_takes_the_worst():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 3)

        def forward(self, x):
            return self.a(x), 1e-3 * self.b(x)

    torch.manual_seed(0)
    gm = analysis(Two().eval(), (torch.randn(1, 6),))
    batches = [(torch.randn(32, 6),)]
    ref = build_reference(gm, Assignment.uniform(["a", "b"], 4, 8), batches)
    f = measure(gm, ref, batches)
    assert f["top1_agreement"] is None and len(f["sqnr_db_per_output"]) == 2
    assert f["sqnr_db"] == min(f["sqnr_db_per_output"])


# --- criteria where the inputs flow through pads, normalizations, several inputs -------------


class PaddedNormalized(nn.Module):
    """An input normalization and an explicit F.pad before the first conv."""

    def __init__(self, extra: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3]))
        self.register_buffer("std", torch.tensor([0.4]))
        self.c1 = nn.Conv2d(1, 8, 3)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 + extra, 10)

    def features(self, x):
        y = F.relu(self.c1(F.pad((x - self.mean) / self.std, (1, 1, 1, 1))))
        return F.relu(self.c2(y)).mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


class TwoInputs(PaddedNormalized):
    """A second input, scaled, joins the features before the classifier."""

    def __init__(self):
        super().__init__(extra=8)

    def forward(self, x, z):
        return self.fc(torch.cat([self.features(x), z * 2.0], 1))


def test_fisher_takes_gradients_through_a_pad_and_a_normalization():
    torch.manual_seed(0)
    train, _ = digits()
    model = PaddedNormalized().eval()
    gm = analysis(model, (train[0][0][:1],))
    crit = FisherTrace(loss_fn=F.cross_entropy, min_batches=1, max_batches=1)
    crit.calibrate(gm, train[:1])
    # the first layer's input is the pad's output: its trace is N * sum (dL/da)^2, by hand
    x, y = train[0]
    a = F.pad((x - model.mean) / model.std, (1, 1, 1, 1)).requires_grad_(True)
    out = model.fc(F.relu(model.c2(F.relu(model.c1(a)))).mean((2, 3)))
    (g,) = torch.autograd.grad(F.cross_entropy(out, y), [a])
    expected = len(y) * float((g.double() ** 2).sum())
    assert crit.activation_trace["c1"] == pytest.approx(expected, rel=1e-6)
    s = crit.layer_sensitivity(gm, "c1", [(8, 8), (4, 4), (2, 2)])
    assert s[(2, 2)] > s[(4, 4)] > s[(8, 8)] > 0


def test_fisher_sensitivity_with_data_and_two_inputs():
    """What compile(data=..., criterion="fisher") runs, on a model with a second input and on
    the padded, normalized one: every layer gets a positive, monotone sensitivity."""
    torch.manual_seed(0)
    train, _ = digits()
    two = [(x, torch.rand(len(y), 8), y) for x, y in train[:4]]
    for model, data in ((TwoInputs().eval(), two), (PaddedNormalized().eval(), train[:4])):
        example = tuple(t[:1] for t in data[0][:-1])
        scored = SensitivityAnalysis("fisher", data)(analysis(model, example)).graph_module
        sens = layer_sensitivities(scored)
        assert sorted(sens) == ["c1", "c2", "fc"]
        for layer, options in sens.items():
            assert options[(2, 2)] > options[(4, 4)] > options[(8, 8)] > 0, layer


def test_a_model_with_two_inputs_compiles_with_and_without_data():
    """Calibration (and Fisher with data) see both inputs: the data-free build calibrates on
    both example inputs, the data build on each batch's first two items."""

    class Joined(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x, z):
            return self.b(torch.relu(self.a(x)) + z)

    torch.manual_seed(0)
    model = Joined().eval()
    example = (torch.randn(4, 4), torch.randn(4, 8))
    data = [(torch.randn(4, 4), torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(4)]
    for kwargs, inputs in (({}, 4), ({"data": data, "criterion": "fisher"}, 16)):
        c = pqcompile.compile(model, example, target="host", budget="bops=16x", **kwargs)
        assert c.fidelity["inputs"] == inputs and c.fidelity["sqnr_db"] > 30
        x, z = data[0][0], data[0][1]
        assert np.array_equal(c(x.numpy(), z.numpy()), c.reference(x, z).numpy())


def test_a_layer_no_gradient_reaches_is_named():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).detach())

    gm = analysis(Detached().eval(), (torch.randn(1, 4),))
    with pytest.raises(CriterionError, match="fisher.*weight of layer 'a'.*not differentiable"):
        FisherTrace(min_batches=1).calibrate(gm, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])


# --- observers -----------------------------------------------------------------------------


def test_auto_observer_picks_percentile_on_a_heavy_tailed_tensor_only():
    """A Gaussian bulk with a few outliers 60 sigma out: at 4 bits min/max puts every bulk value
    on 0 (MSE ~ the variance); the 99.99th percentile clips the outliers and resolves the
    bulk. A plain Gaussian keeps min/max at 8 bits and takes the MSE search at 4."""
    g = torch.Generator().manual_seed(0)
    bulk = torch.randn(100000, generator=g)
    heavy = bulk.clone()
    heavy[:5] = torch.tensor([60.0, -55.0, 58.0, 62.0, -60.0])
    picks = {}
    for name, x in (("gaussian", bulk), ("heavy", heavy)):
        for bits in (4, 8):
            obs = AutoObserver()
            obs.observe(x.reshape(10, -1))
            amax = obs.amax(bits, True)
            picks[name, bits] = obs.chosen[(bits, True)]
            errors = obs.errors[(bits, True)]
            assert errors[picks[name, bits]][0] == amax
            for a, e in errors.values():  # each candidate's quantization MSE on the values
                assert quantization_mse(x.double().numpy(), [a], bits, True)[0] == \
                    pytest.approx(e, rel=1e-9)
            if picks[name, bits] != "minmax":
                assert errors[picks[name, bits]][1] <= 0.5 * errors["minmax"][1]
    assert picks == {("gaussian", 4): "mse", ("gaussian", 8): "minmax",
                     ("heavy", 4): "percentile", ("heavy", 8): "minmax"}


def test_auto_observer_sets_the_scale_of_a_heavy_tailed_activation():
    torch.manual_seed(0)
    gm = analysis(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval(),
                  (torch.randn(1, 16),))
    x = torch.randn(1024, 16)
    x[0, 0] = 60.0  # one outlier in the input, read by a layer with 4-bit activations
    assignment = Assignment.uniform(["_0", "_2"], 8, 4)
    refs = {obs: build_reference(gm, assignment, [x], obs) for obs in ("minmax", "auto")}
    scale = {k: QPARAMS.get(next(n for n in r.graph.nodes if n.name == "input_1_quantize")).scale
             for k, r in refs.items()}
    assert scale["minmax"] == pytest.approx(60.0 / 7)
    pct = float(np.quantile(x.abs().double().numpy(), 0.9999))
    assert scale["auto"] == pytest.approx(pct / 7) and scale["auto"] < scale["minmax"] / 10
