"""Transformers below 8 bits: packed embedding tables, 16-bit residual sums as a compile()
option, and a small ViT trained here on real Fashion-MNIST images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pqcompile
from pqcompile.budget import Budget
from pqcompile.build import analysis, compile_assignment
from pqcompile.errors import OptionError
from pqcompile.meta import COST_TOTALS, EMBEDDING_BITS
from pqcompile.passes.cost import table_bytes
from pqcompile.presets import uniform
from pqcompile.quant.tables import pack, quantize_table, set_table_bits, unpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import real_vit  # noqa: E402


class Tagger(nn.Module):
    """Token ids -> a word table (most of the weights) -> two linears, per token."""

    def __init__(self, vocab: int = 400, dim: int = 32) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, dim)
        self.hidden, self.out = nn.Linear(dim, 32), nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.words(ids))))


def _tagger() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = Tagger().eval()
    with torch.no_grad():  # rows of very different ranges, as in a trained word table
        m.words.weight.mul_(torch.rand(400, 1) * 4)
    ids = torch.randint(0, 400, (2, 9))
    return m, ids, [torch.randint(0, 400, (4, 9)) for _ in range(4)]


def test_pack_roundtrip_and_per_row_codes():
    codes = torch.randint(-7, 8, (5, 12))
    assert torch.equal(unpack(pack(codes, 4), 4, 12), codes)
    two = torch.randint(-1, 2, (3, 8))
    assert pack(two, 2).shape == (3, 2) and torch.equal(unpack(pack(two, 2), 2, 8), two)
    # each row's largest magnitude takes the top code, whatever the other rows' range
    w = torch.tensor([[0.1, -0.05, 0.0, 0.02], [10.0, 5.0, -2.5, 0.0]])
    from pqcompile.meta import QParams
    c, mults, sh = quantize_table(w, 4, QParams(0.1, 8, True))
    assert c.tolist() == [[7, -3, 0, 1], [7, 4, -2, 0]]  # round half up: 3.5 -> 4, -1.75 -> -2
    np.testing.assert_allclose(mults / 2.0 ** sh, [0.1 / 7 / 0.1, 10 / 7 / 0.1], rtol=1e-8)


@pytest.mark.filterwarnings("ignore::pqcompile.errors.FidelityWarning")  # 2-bit rows: coarse
@pytest.mark.parametrize("bits", [4, 2])
def test_packed_table_program_equals_reference_and_bytes(bits):
    m, ids, cal = _tagger()
    gm = analysis(m, (ids,))
    c8 = compile_assignment(m, (ids,), uniform(gm, 8), calibration=cal)
    c = compile_assignment(m, (ids,), uniform(gm, 8), calibration=cal, table_bits=bits)
    assert np.array_equal(c(ids.numpy()), c.reference(ids).numpy())
    # stored: 400 rows of 32 * bits / 8 bytes + an int32 multiplier per row, for 400 * 32
    assert table_bytes(400, 32, bits) == 400 * 32 * bits / 8 + 400 * 4
    saved = 400 * 32 - table_bytes(400, 32, bits)
    assert c8.totals["weight_bytes"] - c.totals["weight_bytes"] == saved
    assert c8.totals["predicted_weight_bytes"] - c.totals["predicted_weight_bytes"] == saved
    assert "multiplier per row" in c.lowering.weight_storage["words"]
    every = torch.arange(400).reshape(2, 200)[:, :9]  # other ids than the example's
    assert np.array_equal(c(every.numpy()), c.reference(every).numpy())


def test_table_bits_options_and_budget():
    m, ids, cal = _tagger()
    gm = set_table_bits(analysis(m, (ids,)), 4)
    node = next(n for n in gm.graph.nodes if n.target == "words")
    assert EMBEDDING_BITS.get(node) == 4
    with pytest.raises(OptionError, match="table_bits"):
        set_table_bits(analysis(m, (ids,)), 3)
    with pytest.raises(OptionError, match="not embedding lookups"):
        set_table_bits(analysis(m, (ids,)), {"hidden": 4})
    with pytest.raises(OptionError, match="table_bits"):
        pqcompile.compile(m, (ids,), target="host", budget=Budget(weight_bytes="4x"),
                          table_bits=5)
    # the int8 table alone is 400 * 32 bytes, > fp32 / 4.5: the budget needs the packed table,
    # which the solver's weight-byte count knows
    fp32 = COST_TOTALS.get(analysis(m, (ids,))).fp32_weight_bytes
    assert 400 * 32 > fp32 / 4.5
    c = pqcompile.compile(m, (ids,), target="host", budget=Budget(weight_bytes="4.5x"),
                          table_bits=4, bit_options=[(8, 8), (4, 8)], keep_levels=(1.0,))
    assert c.totals["weight_bytes"] <= fp32 / 4.5
    assert np.array_equal(c(ids.numpy()), c.reference(ids).numpy())
    assert any("'words': int4 codes" in n for n in c.artifact.manifest["extra"]["notes"])


@pytest.fixture(scope="module")
def tiny_vit():
    """A 2-block ViT (7 x 7 patches, dim 32) trained for seconds on 3000 real images."""
    torch.manual_seed(0)
    x, y = real_vit.images("train", 3500)
    model = real_vit.ViT(patch=7, dim=32, depth=2, heads=2, mlp=64)
    real_vit.train(model, x[:3000], y[:3000], epochs=3, batch=64, lr=3e-3)
    return model, x[3000:], y[3000:]


def test_vit_int8_accuracy_and_program_equals_reference(tiny_vit):
    model, x, y = tiny_vit
    acc32, _ = real_vit.accuracy(model, x, y, 100)
    assert acc32 > 0.6  # trained: chance is 0.1
    c = compile_assignment(model, (x[:100],), uniform(analysis(model, (x[:100],)), 8),
                           calibration=[x[:100], x[100:200]], observer="percentile")
    acc8, program = real_vit.accuracy(lambda b: c(b.numpy()), x, y, 100)
    _, reference = real_vit.accuracy(c.reference, x, y, 100)
    assert np.array_equal(program, reference)
    assert abs(acc8 - acc32) <= 0.01


def test_residual_bits_option(tiny_vit):
    model, x, y = tiny_vit
    with pytest.raises(OptionError, match="residual_bits"):
        pqcompile.compile(model, (x[:100],), target="host", budget="bops=4x",
                          residual_bits=32)
    c = pqcompile.compile(model, (x[:100],), target="host", budget=Budget(bops="4x"),
                          data=[(x[:100], y[:100]), (x[100:200], y[100:200])],
                          calibration_batches=2, sensitivity_batches=2, pareto_points=0,
                          residual_bits="auto", keep_levels=(1.0,))
    note = next(n for n in c.artifact.manifest["extra"]["notes"]
                if n.startswith("residual sums"))
    # two blocks, two residual adds each; the chosen width is the better measured one
    assert "4 add(s)" in note and "8-bit" in note and "16-bit" in note
    assert "residual sums" in c.report()
    assert np.array_equal(c(x[:100].numpy()), c.reference(x[:100]).numpy())
