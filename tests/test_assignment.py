"""Assignment: validation, JSON round trip, uniform construction."""

import numpy as np
import pytest
import torch
from torch import nn

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.meta import BitWidths


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.a(y) + self.b(y)


def test_round_trip_and_uniform():
    a = Assignment({"stem": BitWidths(8, 8), "a": BitWidths(4, 4)},
                   {3: np.array([True, False, True]), 0: np.ones(5, bool)})
    b = Assignment.from_json(a.to_json())
    assert b == a and b.kept(3, 3) == 2 and b.kept(7, 9) == 9
    u = Assignment.uniform(["stem", "a", "b"], 4, 4, keep_8bit=["stem"])
    assert u.bits["stem"] == BitWidths(8, 8) and u.bits["b"] == BitWidths(4, 4)


def test_validate():
    gm = pqcompile.trace(TwoHeads(), (torch.randn(1, 3, 8, 8),))
    Assignment({"a": BitWidths(4, 8), "b": BitWidths(2, 8)}).validate(gm)
    with pytest.raises(ValueError, match=r"\['a', 'b'\] read the same tensor 'stem'.*\[4, 8\]"):
        Assignment({"a": BitWidths(4, 8), "b": BitWidths(4, 4)}).validate(gm)
    with pytest.raises(ValueError, match="not in the graph: \\['conv9'\\]"):
        Assignment({"conv9": BitWidths(4, 8)}).validate(gm)


def test_bad_values():
    with pytest.raises(TypeError, match=r"bits\['a'\] must be BitWidths"):
        Assignment({"a": (4, 4)})
    with pytest.raises(TypeError, match=r"masks\[1\] must be a 1-D bool array"):
        Assignment(masks={1: np.array([1, 0])})
    with pytest.raises(ValueError, match="must be an int in 1..32"):
        BitWidths(0, 8)
    with pytest.raises(ValueError, match="format 99 is not supported"):
        Assignment.from_json('{"format": 99, "bits": {}, "masks": {}}')
