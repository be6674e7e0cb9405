"""A BERT encoder end to end: Hugging Face ``transformers.BertModel`` (small config, random
weights) is traced (its forward branches on input shapes: the shape-specialized trace takes
it), its Linear layers get mixed bits, its attention heads and FFN channels are prunable
groups, pruning heads computes what zeroing them computes, and it builds for the host and for
aarch64 with integer parity (the aarch64 build run under QEMU).

The attention products are integer (8 x 8 bits a MAC) and the solvers' cost model counts their
MACs per kept head, so they decide heads like any other group: past what bits and FFN pruning
can reach (76x fewer BOPs here), the ILP removes heads.
"""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.build import analysis, compile_assignment
from pqcompile.meta import CHANNEL_GROUPS, BitWidths
from pqcompile.passes import PruneChannels, analyze_cost, predicted_macs, zero_channels
from pqcompile.presets import compute_layers
from pqcompile.quant.plan import activation_sources

HIDDEN, LAYERS, HEADS, FFN, LENGTH = 64, 2, 4, 128, 16


class Encoder(nn.Module):
    """BERT from its input embeddings (token lookups stay outside the compiled program)."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.bert = bert

    def forward(self, x):
        return self.bert(inputs_embeds=x).last_hidden_state


def bert(attn: str = "eager") -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FFN,
                     max_position_embeddings=32, attn_implementation=attn)
    return BertModel(cfg, add_pooling_layer=False).eval()


def embeddings(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, LENGTH, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compiled():
    model = Encoder(bert())
    return model, pqcompile.compile(model, (embeddings(0),), target="host",
                                    budget="bops=24x")


def test_traced_with_shapes_and_heads_and_ffn_channels_are_groups():
    model = Encoder(bert())
    gm = pqcompile.trace(model, (embeddings(0),))
    assert gm.meta["pqc.shape_specialized"]
    x = embeddings(1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    groups = CHANNEL_GROUPS.get(analysis(model, (embeddings(0),)))
    # per layer a head group and an FFN group; the residual stream is one unprunable group
    assert [(g.size, g.prunable) for g in groups] == [(HEADS, True), (HIDDEN, False),
                                                      (FFN, True), (HEADS, True), (FFN, True)]
    for g in heads_and_ffn(groups)[1]:
        assert [(m.node.split("_")[-2:], m.role) for m in g.members if m.role != "pass"] == [
            (["intermediate", "dense"], "out"), (["output", "dense"], "in")]
    for g in heads_and_ffn(groups)[0]:  # a head: 16 query, key and value rows, 16 output columns
        assert [(m.node.split("_")[-1], m.role, np.asarray(m.index).shape)
                for m in g.members if m.role != "pass"] == [
            ("query", "out", (HEADS, HIDDEN // HEADS)), ("key", "out", (HEADS, HIDDEN // HEADS)),
            ("value", "out", (HEADS, HIDDEN // HEADS)), ("dense", "in", (HEADS, HIDDEN // HEADS))]


def heads_and_ffn(groups) -> tuple[list, list]:
    return ([g for g in groups if g.size == HEADS and g.prunable],
            [g for g in groups if g.size == FFN and g.prunable])


def head_masks(gm) -> dict:
    heads, ffn = heads_and_ffn(CHANNEL_GROUPS.get(gm))
    masks = {g.id: np.arange(HEADS) != i + 1 for i, g in enumerate(heads)}  # heads 1 and 2
    masks[ffn[0].id] = np.arange(FFN) % 4 != 0  # and a quarter of layer 0's FFN channels
    return masks


def test_pruning_heads_computes_what_zeroing_them_computes():
    model = Encoder(bert())
    gm = analysis(model, (embeddings(0),))
    masks = head_masks(gm)
    pruned = PruneChannels(masks)(gm).graph_module
    zeroed = zero_channels(model, CHANNEL_GROUPS.get(gm), masks)
    assert pruned.get_submodule("bert.encoder.layer.0.attention.self.query").out_features == \
        HIDDEN - HIDDEN // HEADS
    x = embeddings(7)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)
    assert analyze_cost(pruned).macs == predicted_macs(gm, masks)


def test_linear_layers_get_mixed_bits_and_ffn_channels_are_pruned(compiled):
    model, c = compiled
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(c.assignment.bits) == len(linears) == 6 * LAYERS
    weight_bits = {b.weight for b in c.assignment.bits.values()}
    assert len(weight_bits) >= 2, weight_bits
    assert c.totals["bop_reduction"] >= 24 * 0.999
    kept = [(g, int(m.sum()), m.size) for g, m in c.assignment.masks.items()]
    print(f"\nBERT {LAYERS}x{HIDDEN}: {c.totals['bop_reduction']:.1f}x fewer BOPs, weight bits "
          f"{sorted(weight_bits)}, kept channels {kept}, {len(c.float_ops)} float ops")


def test_the_ilp_prunes_heads_when_the_budget_needs_it():
    model = Encoder(bert())
    c = pqcompile.compile(model, (embeddings(0),), target="host", budget="bops=90x")
    heads, _ = heads_and_ffn(CHANNEL_GROUPS.get(analysis(model, (embeddings(0),))))
    kept = {g.id: int(c.assignment.masks[g.id].sum()) if g.id in c.assignment.masks else HEADS
            for g in heads}
    assert sum(kept.values()) < HEADS * LAYERS, kept
    for key in ("bops", "macs"):  # the attention products scale with the kept heads, exactly
        assert c.totals[key] == c.solution.costs[key]
    x = embeddings(3)
    with torch.no_grad():
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())


def test_host_program_equals_the_reference(compiled):
    _, c = compiled
    for seed in (1, 2, 3):
        x = embeddings(seed)
        with torch.no_grad():
            want = c.reference(x).numpy()
        np.testing.assert_array_equal(c(x.numpy()), want)


def test_heads_pruned_at_mixed_bits_build_for_arm_with_parity(sysroot):
    model = Encoder(bert())
    gm = analysis(model, (embeddings(0),))
    layers = compute_layers(gm)
    sources = activation_sources(gm, layers)
    act = {s: (8, 6)[i % 2] for i, s in enumerate(dict.fromkeys(sources.values()))}
    bits = {n: BitWidths((8, 4, 2)[i % 3], act[sources[n]]) for i, n in enumerate(layers)}
    a = Assignment(bits, head_masks(gm))
    c = compile_assignment(model, (embeddings(0),), a, target="host",
                           calibration=[embeddings(s) for s in range(10, 14)])
    assert c.totals["macs"] < c.totals["fp32_macs"]
    for seed in (1, 2):
        x = embeddings(seed)
        with torch.no_grad():
            np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
    arm = c.retarget("arm")
    assert arm.arch == "aarch64"
    x = embeddings(4).numpy()
    np.testing.assert_array_equal(arm.run_emulated(x), c(x))


def test_sdpa_attention_compiles_too():
    model = Encoder(bert("sdpa"))
    c = pqcompile.compile(model, (embeddings(0),), target="host", budget="bops=12x")
    x = embeddings(5)
    with torch.no_grad():
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())


def test_bert_on_token_ids_compiles_with_an_exact_lookup():
    model = bert()
    ids = torch.randint(0, 100, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    c = pqcompile.compile(model, (ids,), target="host", budget="bops=12x")
    assert c.lowering.weight_storage["embeddings_word_embeddings"] == "int8 lookup table"
    assert c.artifact.manifest["inputs"][0]["dtype"] == "int64"
    for seed in (1, 2):
        x = torch.randint(0, 100, (2, LENGTH), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = c.reference(x)["last_hidden_state"].numpy()
        got = c(x.numpy())  # the model returns a dict: the program gives the same keys back
        assert list(got) == list(c.reference(x))
        np.testing.assert_array_equal(got["last_hidden_state"], want)


class MaskFromIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids) * (ids > 0).unsqueeze(-1))


def test_token_ids_read_by_a_mask_compile_exactly():
    """``ids > 0`` is computed from the integer input as written (a mask op), and the float op
    multiplying the looked-up vectors by it reads it unquantized: program == reference."""
    ids = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    c = pqcompile.compile(MaskFromIds().eval(), (ids,), target="host", budget="bops=4x")
    assert [op for _, op in c.float_ops] == ["mul"]
    x = torch.tensor([[0, 3, 0, 9, 1], [5, 0, 0, 0, 2]])
    with torch.no_grad():
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
        zeroed = c.reference(x)[x == 0]
    # a masked token contributes the linear layer's bias only, identical at every masked place
    assert torch.equal(zeroed, zeroed[:1].expand_as(zeroed))


def test_a_specialized_trace_refuses_batches_of_another_shape():
    data = [(embeddings(1, batch=4), torch.zeros(4))]
    with pytest.raises(pqcompile.errors.DataError, match=r"traced for \[\(2, 16, 64\)\] "
                                                         r"exactly.*give batches of that shape"):
        pqcompile.compile(Encoder(bert()), (embeddings(0),), target="host", budget="bops=12x",
                          data=data)
