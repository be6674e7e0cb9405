"""Compress a transformer: a Hugging Face BERT from token ids, with attention heads pruned.

1. build a small ``transformers.BertModel`` (2 layers, hidden 64, 4 heads of 16, FFN 128;
   random weights: nothing is downloaded);
2. analyze it: its forward branches on input shapes, so pqcompile traces it with the example
   inputs' shapes fixed; every layer's attention heads are one channel group (a head = its 16
   query, key and value rows and its 16 output-projection columns), its FFN another;
3. compile it from token ids at a budget the ILP can only meet by removing heads (the solvers'
   cost model counts the attention products per kept head);
4. check the compiled program against the integer-exact reference bit for bit, and that the
   compiled graph has fewer heads.

Run: python tutorials/06_compress_transformer.py   (about 16 s)
"""

import numpy as np
import torch
from transformers import BertConfig, BertModel

import pqcompile
from pqcompile.build import analysis
from pqcompile.meta import CHANNEL_GROUPS

HIDDEN, LAYERS, HEADS, FFN, LENGTH, VOCAB = 64, 2, 4, 128, 16, 100
HEAD_DIM = HIDDEN // HEADS

# --- 1. A small BERT --------------------------------------------------------------------------
torch.manual_seed(0)
config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=FFN,
                    max_position_embeddings=32, attn_implementation="eager")
model = BertModel(config, add_pooling_layer=False).eval()


def token_ids(seed: int) -> torch.Tensor:
    """A batch of 2 sequences of 16 token ids (the compiled program's fixed input shape)."""
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(seed))


example = token_ids(0)

# --- 2. Attention heads are channel groups ----------------------------------------------------
graph = analysis(model, (example,))  # trace (shape-specialized) + shapes + groups + costs
assert graph.meta["pqc.shape_specialized"]  # traced for (2, 16) ids exactly
groups = CHANNEL_GROUPS.get(graph)
for g in groups:
    print(f"group {g.id}: {g.name:45s} {g.size:4d} channels  "
          + ("prunable" if g.prunable else f"unprunable:\n    {g.reason}"))
head_groups = [g for g in groups if g.prunable and g.size == HEADS]
assert len(head_groups) == LAYERS  # one head group per layer
# The residual stream (the embeddings' output and every sublayer output added to it) is one
# unprunable group: its channels start at the embeddings, which have no prunable producer, and
# layer norms normalize across them. Each layer's FFN (128 channels) is a prunable group.
assert [(g.size, g.prunable) for g in groups] == [(HEADS, True), (HIDDEN, False), (FFN, True),
                                                  (HEADS, True), (FFN, True)]
print(f"\nhead group {head_groups[0].id}, one unit = one head:")
for m in head_groups[0].members:
    if m.role != "pass":
        rows = np.asarray(m.index)  # rows[h] = the positions head h owns in this layer
        print(f"  {m.node:45s} {m.role:3s} {rows.shape[0]} heads x {rows.shape[1]} positions"
              f" (head 1: {rows[1][0]}..{rows[1][-1]})")
        assert rows.shape == (HEADS, HEAD_DIM)
roles = [(m.node.rsplit("_", 1)[-1], m.role) for m in head_groups[0].members if m.role != "pass"]
assert roles == [("query", "out"), ("key", "out"), ("value", "out"), ("dense", "in")], roles

# --- 3. Compile from token ids ---------------------------------------------------------------
# 8-bit alone now reaches 16x fewer BOPs (the attention products are integer, 8x8 bits); at 90x the ILP
# also removes heads. No data is given: data-free sensitivities (weight quantization error,
# channel magnitude) and calibration on the example inputs. In a real project, pass
# data= batches of real token ids (and their labels) instead.
compiled = pqcompile.compile(model, (example,), target="host", budget="bops=90x",
                             pareto_points=0)
print()
print(compiled.report())

# The token-id input stays int64; the embedding lookup became an int8 table and an exact take.
assert compiled.artifact.manifest["inputs"][0]["dtype"] == "int64"
assert compiled.lowering.weight_storage["embeddings_word_embeddings"] == "int8 lookup table"

# --- 4. Heads were removed, and the program equals the reference -----------------------------
kept_heads = {g.id: int(compiled.assignment.masks[g.id].sum()) if g.id in
              compiled.assignment.masks else HEADS for g in head_groups}
for layer in range(LAYERS):
    query = compiled.graph.get_submodule(f"encoder.layer.{layer}.attention.self.query")
    print(f"layer {layer}: {query.out_features // HEAD_DIM} of {HEADS} heads kept "
          f"(query {query.in_features} -> {query.out_features})")
print(f"kept heads per head group: {kept_heads}; "
      f"{compiled.totals['bop_reduction']:.1f}x fewer BOPs, {compiled.totals['macs']:,} MACs of "
      f"{compiled.totals['fp32_macs']:,}")
total_heads = sum(kept_heads.values())
assert total_heads < HEADS * LAYERS, kept_heads  # the head count shrank
assert sum(compiled.graph.get_submodule(f"encoder.layer.{i}.attention.self.query").out_features
           for i in range(LAYERS)) == total_heads * HEAD_DIM  # ... for real, in the built graph
assert compiled.totals["bop_reduction"] >= 14 * 0.999
# the solver predicted the built model's costs exactly, attention products included
assert compiled.totals["bops"] == compiled.solution.costs["bops"]

for seed in (1, 2, 3):  # fresh token ids
    ids = token_ids(seed)
    out = compiled(ids.numpy())["last_hidden_state"]  # the compiled program: the model's dict
    with torch.no_grad():
        ref = compiled.reference(ids)["last_hidden_state"].numpy()  # fake-quant torch model
        fp = model(ids).last_hidden_state.numpy()
    # the outputs are dequantized integers (integer x one scale): identical means identical
    assert out.dtype == ref.dtype and np.array_equal(out, ref), np.abs(out - ref).max()
    cos = float(np.sum(out * fp) / np.linalg.norm(out) / np.linalg.norm(fp))
    print(f"ids seed {seed}: program == reference bit for bit; cosine to FP32 output {cos:.3f}")
print("transformer OK")
