"""Attention's matmuls of two activations as integer products (pqcompile.quant.matmul).

* a small Hugging Face BERT (eager attention, and ``scaled_dot_product_attention``) builds with
  its ``q @ k^T`` and ``probs @ v`` as int8 x int8 / uint8 x int8 products with int32
  accumulation: no float matmul left, the report lists no float MACs, each product costs
  MACs x 8 x 8 BOPs (checked by hand), and the host program equals the reference bit for bit;
* one product's integers equal the fixed-point formula computed here in numpy, and lie within
  half an LSB (plus the multiplier's rounding) of the exact rescaled accumulator;
* ``scaled_dot_product_attention`` with a causal flag, a boolean or additive mask, a mask
  computed from an integer input, or an explicit scale decomposes into the same function and
  compiles with program == reference; a grouped-query call is left whole (a float op);
* the ILP keeps every head at a BOPs budget where it pruned heads when the products were costed
  as 32 x 32-bit float MACs;
* the ONNX export writes each product in QDQ form, within 1 LSB of the reference in ONNX Runtime.
"""

import dataclasses
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

import pqcompile
from pqcompile.frontend.attention import AttentionSoftmax, decompose_sdpa
from pqcompile.build import analysis, compile_assignment
from pqcompile.errors import UnsupportedOpError
from pqcompile.meta import CHANNEL_GROUPS, COST, QParams
from pqcompile.export.onnx_export import export_onnx
from pqcompile.presets import compute_layers, uniform
from pqcompile.quant import integer_outputs
from pqcompile.quant.matmul import QMatMul, activation_products, make_matmul
from pqcompile.solvers import ILPSolver, build_problem

HIDDEN, LAYERS, HEADS, FFN, LENGTH, BATCH = 64, 2, 4, 128, 16, 2


class Encoder(nn.Module):
    """BERT from its input embeddings."""

    def __init__(self, attn: str):
        super().__init__()
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, intermediate_size=FFN,
                         max_position_embeddings=32, attn_implementation=attn)
        self.bert = BertModel(cfg, add_pooling_layer=False).eval()

    def forward(self, x):
        return self.bert(inputs_embeds=x).last_hidden_state


def embeddings(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, LENGTH, HIDDEN, generator=torch.Generator().manual_seed(seed))


def build(model: nn.Module, example: tuple, calibration: list) -> pqcompile.build.Compiled:
    gm = analysis(model, example)
    return compile_assignment(model, example, uniform(gm, 8), target="host",
                              calibration=calibration)


def products_of(c) -> list[str]:
    return [n.name for n in c.reference.graph.nodes if n.op == "call_module"
            and isinstance(c.reference.get_submodule(n.target), QMatMul)]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def bert(request):
    model = Encoder(request.param)
    c = build(model, (embeddings(0),), [embeddings(s) for s in range(10, 13)])
    return request.param, model, c


def test_bert_attention_products_are_integer(bert):
    attn, _, c = bert
    assert len(products_of(c)) == 2 * LAYERS
    assert not [op for _, op in c.float_ops if "matmul" in op or "scaled_dot" in op]
    float_ops = {op for _, op in c.float_ops}
    assert float_ops <= {"LayerNorm", "add", "softmax", "AttentionSoftmax"}, float_ops
    assert "float MACs" not in c.report()
    # one product by hand: batch x heads x queries x keys x head dim MACs, at 8 x 8 bits
    head_dim = HIDDEN // HEADS
    one = BATCH * HEADS * LENGTH * LENGTH * head_dim
    nodes = [n for n in c.graph.graph.nodes if COST.get(n).macs and n.op != "call_module"]
    assert len(nodes) == (2 * LAYERS if attn == "eager" else LAYERS)
    for n in nodes:
        cost = COST.get(n)
        assert cost.macs == (one if attn == "eager" else 2 * one)
        assert (cost.weight_bits, cost.activation_bits, cost.bops) == (8, 8, cost.macs * 64)
    assert c.totals["bops"] == c.totals["macs"] * 64  # everything at 8 x 8: exactly 16x
    row = next(r for r in c.layers if r["name"] == nodes[0].name)
    assert (row["weight_bits"], row["activation_bits"], row["float"]) == (8, 8, False)


def test_bert_program_equals_reference(bert):
    _, model, c = bert
    for seed in (1, 2):
        x = embeddings(seed)
        with torch.no_grad():
            want, fp32 = c.reference(x).numpy(), model(x).numpy()
        np.testing.assert_array_equal(c(x.numpy()), want)
        assert np.abs(want - fp32).max() < 0.2  # 8-bit everywhere: close to FP32


def test_products_follow_the_fixed_point_formula(bert):
    _, _, c = bert
    name = products_of(c)[-1]  # the last probs @ v: a uint8 x int8 product
    module = c.reference.get_submodule(name)
    assert (module.a.signed, module.a.bits, module.b.signed) == (False, 8, True)
    assert module.a.scale * 255 <= 1 + 1e-9  # the softmax's calibrated range, at most 1
    seen = {}
    hook = module.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        c.reference(embeddings(4))
    hook.remove()
    a, b = (t.numpy().astype(np.int64) for t in seen["args"])
    assert a.min() >= 0 and a.max() > 200  # the probabilities use the uint8 codes
    acc = a @ b
    assert np.abs(acc).max() < 2 ** 31
    y = np.clip((acc * module.mult + (1 << (module.shift - 1))) >> module.shift,
                module.lo, module.hi)
    np.testing.assert_array_equal(seen["out"].numpy(), y)
    exact = acc * module.a.scale * module.b.scale / module.out.scale
    inside = (exact > module.lo) & (exact < module.hi)
    assert inside.mean() > 0.99 and np.abs(y - exact)[inside].max() <= 0.5 + 1e-6
    assert len(np.unique(y)) > 50


def test_wide_operands_and_long_reductions_are_refused():
    s8, s16 = QParams(0.1, 8, True), QParams(0.1, 16, True)
    with pytest.raises(UnsupportedOpError, match=r"node 'mm' \(matmul\): its first operand is "
                                                 r"a 16-bit tensor"):
        make_matmul(s16, s8, s8, -127, 127, 16, where="node 'mm' (matmul)")
    with pytest.raises(UnsupportedOpError, match=r"reduction over 200000 terms .* int32"):
        make_matmul(s8, s8, s8, -127, 127, 200_000, where="node 'mm' (matmul)")


class Sdpa(nn.Module):
    """Projections around one ``scaled_dot_product_attention`` call (``variant`` picks its
    arguments); ``keep`` (0/1 per key, an integer input) masks keys where given."""

    def __init__(self, variant: str, dim: int = 16, heads: int = 2, length: int = 6):
        super().__init__()
        torch.manual_seed(1)
        self.variant, self.heads = variant, heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        tril = torch.ones(length, length, dtype=torch.bool).tril()
        self.register_buffer("bool_mask", tril)
        self.register_buffer("float_mask", torch.where(tril, 0.0, -1e4) + 0.1 *
                             torch.randn(length, length))

    def split(self, t):
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x, keep):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.variant == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.variant == "bool":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bool_mask)
        elif self.variant == "additive":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.float_mask, scale=0.2)
        elif self.variant == "input mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(keep > 0)[:, None, None, :])
        else:  # grouped-query heads: one key/value head for both query heads
            y = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        return self.out(y.transpose(1, 2).flatten(2))


def sdpa_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(3, 6, generator=g) > 0.3).long()
    keep[:, 0] = 1  # every query attends to at least one key
    return torch.randn(3, 6, 16, generator=g), keep


@pytest.mark.parametrize("variant", ["causal", "bool", "additive", "input mask", "gqa"])
def test_sdpa_variants(variant):
    model = Sdpa(variant).eval()
    gm = pqcompile.trace(model, sdpa_inputs(0))
    ShapeProp = torch.fx.passes.shape_prop.ShapeProp
    ShapeProp(gm).propagate(*sdpa_inputs(0))
    done = decompose_sdpa(gm)
    x = sdpa_inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), model(*x), atol=1e-5, rtol=1e-5)
    c = build(model, sdpa_inputs(0), [sdpa_inputs(s) for s in (2, 3, 4)])
    with torch.no_grad():
        np.testing.assert_array_equal(c(*(t.numpy() for t in x)), c.reference(*x).numpy())
        ref, fp32 = c.reference(*x).numpy(), model(*x).numpy()
    rel = np.sqrt(np.mean((ref - fp32) ** 2) / np.mean(fp32 ** 2))
    assert rel < 0.05, rel  # the 8-bit model stays near FP32 (RMS error / RMS value: 26 dB)
    sdpa = next(n for n in c.graph.graph.nodes if "scaled_dot" in n.name)
    assert done == ["scaled_dot_product_attention"]
    assert products_of(c) == ["scaled_dot_product_attention_scores",
                              "scaled_dot_product_attention"]
    repeats = ["expand", "expand"] if variant == "gqa" else []  # key and value heads repeated
    assert [op for _, op in c.float_ops] == repeats + ["AttentionSoftmax"]
    assert isinstance(c.reference.get_submodule("scaled_dot_product_attention_probs").fn,
                      torch.fx.GraphModule)
    assert COST.get(sdpa).macs == 2 * 3 * 2 * 6 * 6 * 8
    assert COST.get(sdpa).bops == COST.get(sdpa).macs * 64


def test_attention_softmax_is_sdpas_float_part():
    s = torch.randn(2, 3, 4, 5)
    mask = torch.rand(2, 1, 4, 5) > 0.3
    mask[..., 0] = True
    want = F.softmax((s * 0.5).masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(AttentionSoftmax(0.5, None, True)(s, mask), want)
    torch.testing.assert_close(AttentionSoftmax(0.5, None, True)(s, mask.double()), want)


def test_the_ilp_keeps_heads_it_pruned_when_products_were_float_macs():
    model = Encoder("eager")
    gm = analysis(model, (embeddings(0),))
    problem = build_problem(gm, None, None)
    heads = {g.id for g in CHANNEL_GROUPS.get(gm) if g.size == HEADS and g.prunable}
    assert heads and heads <= {g.id for g in problem.groups}
    products = 2 * LAYERS * BATCH * HEADS * LENGTH * LENGTH * (HIDDEN // HEADS)
    full = {g.id: g.size for g in problem.groups}
    assert problem.fixed_macs + problem.float_macs.value(full) == products
    as_float = dataclasses.replace(problem, float_mac_bops=32 * 32,
                                   fixed_bops=problem.fixed_macs * 32 * 32)
    budget = {"bops": problem.reference["bops"] / 14}
    before = ILPSolver().solve(as_float, budget)
    now = ILPSolver().solve(problem, budget)
    assert any(before.kept[g] < HEADS for g in heads), before.kept
    assert all(now.kept[g] == HEADS for g in heads), now.kept
    assert now.feasible and now.costs["bops"] <= budget["bops"]


def test_onnx_export_writes_products_in_qdq_form():
    model = Sdpa("causal").eval()
    c = build(model, sdpa_inputs(0), [sdpa_inputs(s) for s in (2, 3, 4)])
    onnx_model = export_onnx(c)
    ops = [n.op_type for n in onnx_model.graph.node]
    assert ops.count("MatMul") == 2
    session = ort.InferenceSession(onnx_model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    scale = c.lowering.outputs[0].scale
    for seed in (5, 6):
        x = sdpa_inputs(seed)
        got = session.run(None, dict(zip(names, (t.numpy() for t in x))))[0]
        want = integer_outputs(c.reference, *x)[0].numpy()
        assert np.abs(np.round(got / scale) - want).max() <= 1
        assert len(np.unique(want)) > 20
    assert math.isfinite(scale)
