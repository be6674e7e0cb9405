"""Weight bytes: the cost model and the solvers' problem predict what the built program stores
(``totals["weight_bytes"]``: weights file + float islands' constants), counted by hand, with
the pieces the program adds beyond each module's parameters (:mod:`pqcompile.passes.stored`):
constants folded into their readers, lookup tables, shared islands."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pqcompile.build import analysis, compile_assignment
from pqcompile.presets import uniform
from pqcompile.quant.tables import table_nodes
from pqcompile.solvers.graph import build_problem
from pqcompile.solvers.problem import problem_costs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_transformer_inputs import batch, encoder  # noqa: E402

H, FFN, L = 32, 64, 8  # the encoder's hidden size, FFN width, sequence length


def _solver_bytes(gm, assignment) -> float:
    """The solvers' predicted weight bytes for ``assignment`` (no pruning)."""
    problem = build_problem(gm, None, None, pin_first_last=False)
    bits = {n: (b.weight, b.activation) for n, b in assignment.bits.items()}
    return problem_costs(problem, bits=bits, kept={})["weight_bytes"]


def _linear(i: int, o: int, bits: int = 8) -> int:
    """A quantized linear: packed weight, int32 bias, multiplier and shift per output."""
    return i * o * bits // 8 + o * 3 * 4


@pytest.mark.parametrize("table_bits", [None, 4])
def test_bert_encoder_predicted_bytes_equal_stored(table_bits):
    model = encoder()  # 1 layer, hidden 32, 2 heads, FFN 64, vocab 100, 32 positions
    ex = batch(0)
    gm = analysis(model, ex)
    a = uniform(gm, 8)
    c = compile_assignment(model, ex, a, calibration=[batch(1), batch(2)],
                           table_bits=table_bits)
    words = 100 * H if table_bits is None else 100 * H * 4 // 8 + 100 * 4  # + row multipliers
    hand = (words
            + 1 * 1 * H * 8  # token type: ids are a zero buffer, one row folded, float64
            + 1 * L * H * 8  # positions: the first L rows folded, float64 (not the table)
            + 3 * H * 16  # three fixed-point layer norms: int32 multiplier and shift, int64
            # offset per channel, each its own
            + 4 * _linear(H, H) + _linear(H, FFN) + _linear(FFN, H)
            + 2 * 256  # the scores' division and the GELU: 256-entry int8 tables
            + 256 * 4)  # the masked fixed-point softmax: 256 int32 exponentials
    assert c.totals["weight_bytes"] == hand
    assert c.totals["predicted_weight_bytes"] == hand
    assert _solver_bytes(gm, a) == hand - words + (100 * H)  # the solver's tables at 8 bits
    # the position and token-type lookups read constant ids: no tables to pack
    assert [n.target for n in table_nodes(gm)] == ["bert.embeddings.word_embeddings"]
    ids, mask = batch(3)
    np.testing.assert_array_equal(c(ids.numpy(), mask.numpy()), c.reference(ids, mask).numpy())


def test_distinct_layer_norms_are_stored_each():
    model = encoder()
    with torch.no_grad():
        for i, ln in enumerate(m for m in model.modules() if isinstance(m, nn.LayerNorm)):
            ln.weight.add_(0.1 * i)
    ex = batch(0)
    gm = analysis(model, ex)
    c = compile_assignment(model, ex, uniform(gm, 8), calibration=[batch(1)])
    assert c.totals["weight_bytes"] == c.totals["predicted_weight_bytes"] == \
        _solver_bytes(gm, uniform(gm, 8))
    # the library's float64 constants: the folded token-type row and positions; the layer
    # norms run in fixed point, their words in the weights file
    assert c.totals["constant_bytes"] == (1 * H + L * H) * 8


class Net(nn.Module):
    """A CNN with a folded batch norm, a hardswish (a table), a learned per-channel offset read
    with ``get_attr``, an unfolded batch norm (an integer affine map) and a scale computed from
    a parameter (a constant subgraph folded into the multiplication that reads it)."""

    def __init__(self, classes: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.log_scale = nn.Parameter(torch.randn(8) * 0.1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x) + self.offset) * self.log_scale.exp().view(1, 8, 1, 1)
        return self.fc(x.mean((2, 3)))


def _cnn(classes: int):
    torch.manual_seed(0)
    model = Net(classes).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    gm = analysis(model, (x,))
    a = uniform(gm, 8)
    c = compile_assignment(model, (x,), a, calibration=[torch.randn(2, 3, 8, 8)])
    np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
    return gm, a, c


CNN_BYTES = (8 * 27 + 8 * 12  # conv1 (bn1 folded into it): int8 weight, 3 words a channel
             + 256  # hardswish: a table
             + 8 * 72 + 8 * 12  # conv2
             + 8 * 8  # the offset: a float64 constant of its add
             + 8 * 4 * 4  # bn2 after the add: int32 multiplier and shift, int64 offset
             + 8 * 8)  # exp(log_scale) as (1, 8, 1, 1), computed once: float64 in its mul


def test_cnn_predicted_bytes_equal_stored():
    gm, a, c = _cnn(16)
    hand = CNN_BYTES + _linear(8, 16)
    assert c.totals["weight_bytes"] == hand
    assert c.totals["predicted_weight_bytes"] == hand
    assert _solver_bytes(gm, a) == hand


def test_kernel_padding_is_the_residual():
    """The host's linear kernel stores whole vectors of 16 outputs (weights, bias, multiplier
    and shift zero-padded): a 10-class head stores 6 outputs more than the cost model counts,
    which knows no target."""
    gm, a, c = _cnn(10)
    predicted = CNN_BYTES + _linear(8, 10)
    assert c.totals["predicted_weight_bytes"] == _solver_bytes(gm, a) == predicted
    assert c.totals["weight_bytes"] - predicted == 6 * 8 + 6 * 3 * 4


class Attention(nn.Module):
    """One head of self-attention with no mask: ``softmax(q k^T / 4)`` over the last dim of one
    8-bit tensor (a fixed-point softmax, or a float island over ``dim=1``), then ``@ v``."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / 4
        return self.o(torch.softmax(scores, self.dim) @ self.v(x))


@pytest.mark.parametrize("dim", [-1, 1])
def test_integer_softmax_table_is_predicted_and_stored(dim):
    from pqcompile.quant.softmax import QSoftmax

    model = Attention(dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 16, generator=g)
    gm = analysis(model, (x,))
    a = uniform(gm, 8)
    c = compile_assignment(model, (x,), a, calibration=[torch.randn(2, 12, 16, generator=g)])
    integer = any(isinstance(m, QSoftmax) for m in c.reference.modules())
    assert integer == (dim == -1)
    assert [op for _, op in c.float_ops] == ([] if integer else ["softmax"])
    hand = (4 * _linear(16, 16)
            + 256  # the division by 4: a 256-entry int8 table
            + (256 * 4 if integer else 0))  # the softmax: 256 int32 exponentials (no island
    #                                         constants over dim 1)
    assert c.totals["weight_bytes"] == hand
    assert c.totals["predicted_weight_bytes"] == hand
    assert _solver_bytes(gm, a) == hand
    tables = {k: a for k, a in c.artifact.params.items() if k.endswith("softmax.table")}
    assert [(a.dtype, a.shape) for a in tables.values()] == \
        ([(np.dtype("int32"), (256,))] if integer else [])  # in the weights file
    y = torch.randn(2, 12, 16, generator=g)
    np.testing.assert_array_equal(c(y.numpy()), c.reference(y).numpy())
