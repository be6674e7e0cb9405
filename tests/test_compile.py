"""End to end for a given assignment: prune, fold, quantize, lower, build for host and arm.

The aarch64 artifacts run under qemu-aarch64 with the aarch64 TVM runtime and must give the
host build's numbers exactly (integer programs; the parity net's hardswish and sigmoid are
tables of their input codes, its squeeze-excitation gate an integer product).
"""

import numpy as np
import pytest
import torch
import torchvision
from test_parity import PARITY_BITS, batches, parity_net, randomize_bn

from pqcompile import presets
from pqcompile.assignment import Assignment
from pqcompile.build import analysis, compile_assignment, prepare
from pqcompile.lower import lower
from pqcompile.meta import CHANNEL_GROUPS, BitWidths
from pqcompile.quant import build_reference
from pqcompile.targets import elf_arch


def test_parity_net_pruned_mixed_arm_equals_host(tmp_path, sysroot):
    model = parity_net()
    x = torch.randn(2, 3, 32, 32)
    gm = analysis(model, (x,))
    rng = np.random.default_rng(3)
    masks = {}
    for g in CHANNEL_GROUPS.get(gm):
        if g.prunable:
            masks[g.id] = rng.random(g.size) < 0.6
            masks[g.id][0] = True
    a = Assignment({k: BitWidths(*v) for k, v in PARITY_BITS.items()}, masks)
    host = compile_assignment(model, (x,), a, target="host",
                              calibration=batches(4, (4, 3, 32, 32), seed=1))
    assert host.float_ops == []  # hardswish, sigmoid: tables; the SE gate: an integer product
    assert any(r["kept_channels"] < r["total_channels"] for r in host.layers
               if r["kept_channels"] is not None)
    inputs = batches(3, (2, 3, 32, 32), seed=7)
    for xi in inputs:
        np.testing.assert_array_equal(host(xi.numpy()), host.reference(xi).numpy())
    arm = host.retarget("arm")
    assert arm.arch == "aarch64"
    got = arm.run_emulated(inputs[0].numpy(), check_sample=True)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_array_equal(got, host(inputs[0].numpy()))
    saved = arm.save(tmp_path / "arm")
    assert elf_arch(saved / arm.manifest["library"]) == "aarch64"


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def zoo(request):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, request.param)())
    x = torch.randn(1, 3, 64, 64)
    return request.param, model, x, analysis(model, (x,))


@pytest.mark.parametrize("config", ["int8", "mixed"])
def test_zoo_compiles_for_host_and_arm(zoo, config, tmp_path):
    name, model, x, gm = zoo
    a = presets.uniform(gm, 8) if config == "int8" else presets.mixed_pruned(gm)
    c = compile_assignment(model, (x,), a, target="host",
                           calibration=batches(2, (4, 3, 64, 64), seed=1))
    assert c.float_ops == []
    for xi in batches(2, (1, 3, 64, 64), seed=5):
        np.testing.assert_array_equal(c(xi.numpy()), c.reference(xi).numpy())
    if config == "mixed":
        assert c.totals["macs"] < c.totals["fp32_macs"]  # channels really removed
        assert c.totals["bop_reduction"] > 16.0 * c.totals["fp32_macs"] / c.totals["macs"]
    arm = c.retarget("arm")
    path = arm.save(tmp_path / f"{name}-{config}")
    assert elf_arch(path / arm.manifest["library"]) == "aarch64"
    assert arm.manifest["totals"]["bops"] == c.totals["bops"]


def test_mobilenet_v2_mixed_runs_on_aarch64(sysroot):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2())
    x = torch.randn(1, 3, 64, 64)
    a = presets.mixed_pruned(analysis(model, (x,)))
    c = compile_assignment(model, (x,), a, target="arm",
                           calibration=batches(2, (4, 3, 64, 64), seed=1))
    got = c.artifact.run_emulated(x.numpy(), check_sample=True)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_array_equal(got, c.reference(x).numpy())


def test_weight_bytes_shrink_with_bits(zoo):
    """The lowered program's weights take ceil(numel * bits / 8) bytes a layer (no build)."""
    name, model, x, gm = zoo
    calib = batches(1, (2, 3, 64, 64), seed=1)
    sizes = {}
    layers = presets.compute_layers(gm)
    numel = {n.name: gm.get_submodule(n.target).weight.numel() for n in gm.graph.nodes
             if n.name in layers}
    for bits in (8, 4, 2):
        a = presets.uniform(gm, bits, 8)
        _, params, report = lower(build_reference(prepare(gm, a), a, calib))
        sizes[bits] = sum(report.weight_bytes.values())
        assert sizes[bits] == sum(-(-numel[n] * bits // 8) for n in layers)
        assert report.param_bytes == sum(p.nbytes for p in params.values())
    assert sizes[4] / sizes[8] == pytest.approx(0.5, abs=0.01)
    assert sizes[2] / sizes[8] == pytest.approx(0.25, abs=0.01)
