"""The target's channel granule (``Capabilities.channel_multiple``) and ``compile``'s default
``multiple``: kept channel counts round to the target's granule unless told otherwise."""

import dataclasses

import pytest
import torch
from torch import nn

import pqcompile
from pqcompile.build import analysis
from pqcompile.errors import OptionError
from pqcompile.solvers import build_problem, keep_count
from pqcompile.targets import (
    Capabilities,
    TargetSpec,
    default_channel_multiple,
    get_target,
    register_target,
    unregister_target,
)


@pytest.mark.parametrize("caps, expected", [
    (Capabilities(simd_bits=128), 4),  # NEON / SSE: 4 int32 lanes
    (Capabilities(simd_bits=256), 8),  # AVX2: 8 int32 lanes
    (Capabilities(simd_bits=128, supports_dotprod=True), 4),  # sdot: 4-channel words, tiles
    (Capabilities(simd_bits=512, supports_dotprod=True), 4),  # VNNI
    (Capabilities(simd_bits=0), 1),  # scalar: nothing to round to
    (Capabilities(simd_bits=2048), 16),  # clamped
    (Capabilities(simd_bits=256, channel_multiple=2), 2),  # explicit wins
])
def test_capabilities_channel_multiple(caps, expected):
    assert caps.channel_multiple == expected
    assert isinstance(caps.channel_multiple, int)


def test_channel_multiple_is_validated():
    for bad in ("4", 4.0, True):
        with pytest.raises(TypeError, match="channel_multiple must be an int"):
            Capabilities(channel_multiple=bad)
    for bad in (0, -4, 65):
        with pytest.raises(ValueError, match=r"channel_multiple must be in 1\.\.64"):
            Capabilities(channel_multiple=bad)


@pytest.mark.parametrize("config, expected", [
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}, 4),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, 4),  # AVX2 kernels
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}, 4),  # SSE2: 128 bits
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
      "mattr": ["+neon"]}, 4),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
      "mattr": ["+neon", "+dotprod"]}, 4),
    ("riscv/sifive-u74", 1),
])
def test_derived_from_llvm_features(config, expected):
    import tvm

    caps = Capabilities.from_tvm_target(tvm.target.Target(config))
    assert caps.channel_multiple == expected
    pixel = caps.supports_dotprod or isinstance(config, dict) \
        and config.get("mcpu") in ("skylake-avx512", "haswell")
    assert caps.channel_multiple == default_channel_multiple(caps.simd_bits, pixel)


def test_builtin_targets_and_round_trip():
    assert get_target("arm").capabilities.channel_multiple == 4
    assert get_target("arm-dotprod").capabilities.channel_multiple == 4
    host = get_target("host")
    assert host.capabilities == Capabilities.from_tvm_target(host.tvm_target())
    assert get_target("riscv/sifive-u74").capabilities.channel_multiple == 1
    spec = get_target("arm")
    data = spec.to_dict()
    assert data["capabilities"]["channel_multiple"] == 4
    assert TargetSpec.from_dict(data) == spec
    del data["capabilities"]["channel_multiple"]  # a spec written before the field existed
    assert TargetSpec.from_dict(data).capabilities.channel_multiple == 4


def test_groups_smaller_than_the_multiple_stay_whole():
    assert keep_count(3, 0.5, 4) == 3 and keep_count(6, 0.25, 4) == 4
    assert keep_count(6, 0.75, 8) == 6 and keep_count(20, 0.5, 8) == 16
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 16, 3), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    gm = analysis(model, (torch.randn(1, 3, 12, 12),))
    p = build_problem(gm, None, None, multiple=4)
    assert [(g.size, g.levels) for g in p.groups] == [(16, (16, 12, 8, 4))]
    p1 = build_problem(gm, None, None, multiple=1)
    assert sorted(g.size for g in p1.groups) == [3, 16]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 6, 3), nn.ReLU(),
                         nn.Conv2d(6, 4, 1)).eval()


def test_compile_takes_the_targets_multiple():
    host = get_target("host")
    spec = register_target(TargetSpec(
        name="host-granule-8", description="this machine, kept channels in eights",
        tvm_config=host.tvm_config, arch=host.arch,
        capabilities=dataclasses.replace(host.capabilities, channel_multiple=8)))
    try:
        x = torch.randn(1, 3, 12, 12)
        c = pqcompile.compile(_model(), (x,), target=spec.name, budget="macs=1.5x",
                              pareto_points=0)
        # the 16-channel group in eights; the 6-channel one is below the granule: whole
        groups = dict(c.solution.kept)
        assert len(groups) == 1 and list(groups.values())[0] in (16, 8)
        assert list(groups.values())[0] == 8  # 1.5x fewer MACs needs pruning
        kept = [row["kept_channels"] for row in c.layers if row["op"] == "Conv2d"]
        assert kept[:2] == [8, 6]
        # an explicit multiple wins over the target's
        c1 = pqcompile.compile(_model(), (x,), target=spec.name, budget="macs=1.5x",
                               multiple=1, pareto_points=0)
        assert len(c1.solution.kept) == 2
        with pytest.raises(OptionError, match=r"multiple must be a positive int .* \(8 on "
                                              r"'host-granule-8'\)"):
            pqcompile.compile(_model(), (x,), target=spec.name, budget="macs=1.5x",
                              multiple=0)
    finally:
        unregister_target(spec.name)
