"""Coverage: torchvision architectures of every family go through the whole path.

Each model (random weights, small input) is traced, analyzed, scored data-free, solved by the
ILP at 24x fewer BOPs (mixed 2/4/8-bit weights, pruned channel groups), lowered and built for
the host, then its compiled program is compared with the integer-exact reference on fresh
inputs: bit for bit where every op is integer, SQNR >= 30 dB where float ops run in between
(their float64 results may round the other way at a quantization step, one LSB). An
architecture pqcompile cannot do must fail with a pqcompile error naming the op. The model
is never changed. ``python benchmarks/coverage.py`` writes the table of docs/coverage.md from
the same list.
"""

import hashlib

import pytest
import torch
from coverage_models import MODELS, REFUSED, make

from pqcompile.coverage import check_model

pytestmark = pytest.mark.slow


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256(str(model.training).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_the_sweep_covers_every_family():
    assert len(MODELS) >= 25
    families = ("resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3",
                "efficientnet_b", "efficientnet_v2", "regnet", "shufflenet", "squeezenet",
                "densenet", "googlenet", "inception", "mnasnet", "vgg", "convnext", "vit",
                "swin")
    for family in families:
        assert any(name.startswith(family) for name in MODELS), family


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_compiles_with_parity(name):
    model, example = make(name)
    before = fingerprint(model)
    row = check_model(model, example, budget="bops=24x", name=name)
    assert fingerprint(model) == before
    print(f"\n{name}: {row.status}, groups {row.prunable_groups}/{row.groups} prunable, "
          f"integer MACs {100 * row.integer_mac_share:.1f}%, {row.bop_reduction:.1f}x fewer "
          f"BOPs, {len(row.float_ops)} float ops, worst {row.worst_lsb} LSB, "
          f"SQNR {row.sqnr_db:.1f} dB {row.error}")
    if name in REFUSED:
        error_type, op = REFUSED[name]
        assert (row.status, row.error_type) == ("error", error_type)
        assert op in row.error
        return
    assert row.status == "ok", row.error
    assert row.bop_reduction >= 24 * 0.999
    assert row.groups > 0
    if not row.float_ops:
        assert row.worst_lsb == 0
    assert row.sqnr_db >= 30
