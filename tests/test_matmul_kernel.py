"""The kernels of integer activation x activation products (pqcompile.lower.matmul_kernel).

Each combination of operand types (int8 / uint8 on either side: the packs' offsets and their
row / column corrections), a depth that is no multiple of 4, batch dims, and a product whose
columns are no whole vector (TVM's ``matmul`` then): the host program (AVX-512 VNNI's kernel)
and the aarch64 programs under QEMU (``sdot`` with indexed row quads on ``arm-dotprod``, NEON
pair sums on ``arm``) equal the integer reference bit for bit, and the lowering says which
ran on the kernel.
"""

import numpy as np
import pytest
import torch
from torch import nn

from pqcompile.build import analysis, compile_assignment
from pqcompile.lower import lower
from pqcompile.lower import matmul_kernel as mk
from pqcompile.lower.build import resolve_target
from pqcompile.lower.kernel_types import isa_for
from pqcompile.presets import uniform


class Product(nn.Module):
    """``a @ b``, each operand made non-negative (uint8, as attention's probabilities) by a
    softmax or left signed (int8)."""

    def __init__(self, pos_a: bool, pos_b: bool) -> None:
        super().__init__()
        self.pos_a, self.pos_b = pos_a, pos_b

    def forward(self, x, y):
        return (x.softmax(-1) if self.pos_a else x) @ (y.softmax(-1) if self.pos_b else y)


CASES = [(False, False, 20, 48, True), (True, False, 128, 32, True), (False, True, 7, 16, True),
         (True, True, 33, 64, True), (False, False, 16, 20, False)]


def _compiled(pos_a, pos_b, depth, cols):
    """The product compiled for the host, and a draw of inputs."""
    g = torch.Generator().manual_seed(depth)

    def draw():
        return (3 * torch.randn(2, 3, 8, depth, generator=g),
                torch.randn(2, 3, depth, cols, generator=g))

    model, example = Product(pos_a, pos_b), draw()
    c = compile_assignment(model, example, uniform(analysis(model, example), 8), target="host",
                           calibration=[draw() for _ in range(3)])
    return c, draw


@pytest.mark.parametrize("pos_a,pos_b,depth,cols,kernel", CASES)
def test_product_kernel_equals_reference(pos_a, pos_b, depth, cols, kernel):
    c, draw = _compiled(pos_a, pos_b, depth, cols)
    kernels = {k: v for k, v in lower(c.reference, target="host")[2].kernels.items()
               if v not in ("quantize", "softmax")}  # the inputs' quantization, the softmax
    tile = mk.tile(mk.ProductShape(6, 8, depth, cols, "int8", "int8", "int8", -1, 1, 1, 1))
    # the kernel is AVX-512 VNNI's: elsewhere the product is TVM's matmul, equally exact
    vnni = isa_for(resolve_target("host")).name == "vnni"
    assert kernels == ({"matmul": f"product vnni {tile[0]}x{tile[1] * 16}"}
                       if kernel and vnni else {})
    module = c.reference.get_submodule("matmul")
    assert (module.a.signed, module.b.signed) == (not pos_a, not pos_b)
    for _ in range(2):
        x, y = draw()
        with torch.no_grad():
            want = c.reference(x, y).numpy()
        np.testing.assert_array_equal(c(x.numpy(), y.numpy()), want)


@pytest.mark.parametrize("target,isa", [("arm", "neon"), ("arm-dotprod", "sdot")])
def test_product_kernels_on_aarch64_equal_reference(target, isa, sysroot):
    """Every case on both aarch64 kernels, one program a case (4-column vectors: the ragged
    case of the host, 20 columns, runs on the kernel here)."""
    for pos_a, pos_b, depth, cols, _ in CASES:
        c, draw = _compiled(pos_a, pos_b, depth, cols)
        shape = mk.ProductShape(6, 8, depth, cols, "int8", "int8", "int8", -1, 1, 1, 1)
        mr, nr = mk.tile(shape, isa)
        assert lower(c.reference, target=target)[2].kernels["matmul"] == \
            f"product {isa} {mr}x{nr * 4}"
        x, y = draw()
        with torch.no_grad():
            want = c.reference(x, y).numpy()
        np.testing.assert_array_equal(c.retarget(target).run_emulated(x.numpy(), y.numpy()),
                                      want)


def test_aarch64_tiles_fit_the_registers():
    """``sdot``: at most 16 accumulators, row quads where the rows allow (one 16-byte load
    for 4 rows' words); ``neon``: at most 8 vectors (16 registers of pair sums), each vector
    of ``B`` two 8-byte loads. The packs' offsets: ``A`` to int8 on aarch64."""
    pv = mk.ProductShape(12, 128, 128, 32, "uint8", "int8", "int8", -127, 127, 1 << 30, 40)
    assert mk.tile(pv, "sdot") == (8, 2) and mk.tile(pv, "neon") == (4, 2)
    assert mk.tile(mk.ProductShape(1, 6, 4, 8, "int8", "int8", "int8", -1, 1, 1, 1),
                   "sdot") == (6, 2)  # no whole quads: one word a row
    assert pv.offsets("sdot") == (-128, 0) and pv.offsets("vnni") == (0, 0)


def test_tiles_divide_the_output_and_fit_the_stack():
    shape = mk.ProductShape(12, 128, 128, 32, "uint8", "int8", "int8", -127, 127, 1 << 30, 40)
    assert mk.tile(shape) == (4, 2)  # probs @ v: 2 vectors of 16 columns, 8 accumulators
    qk = mk.ProductShape(12, 128, 32, 128, "int8", "int8", "int8", -127, 127, 1 << 30, 40)
    mr, nr = mk.tile(qk)
    assert 128 % mr == 0 and 8 % nr == 0 and mr * nr == 8
    assert mk.tile(mk.ProductShape(1, 5, 4, 20, "int8", "int8", "int8", -1, 1, 1, 1)) is None
    assert not mk.supported(mk.ProductShape(1, 4, 70000, 16, "int8", "int8", "int8", -1, 1, 1,
                                            40))  # offset sums past int32
