"""Multi-head attention as layers: ``nn.MultiheadAttention`` rewritten into the ops it computes.

``torch.nn.MultiheadAttention`` keeps its query/key/value projections in one packed parameter
and runs them inside one fused call, so a traced graph would hold it as a single opaque node
returning a tuple: nothing in it could be quantized or pruned. :func:`decompose_attention`
swaps each such module (in a model pqcompile owns, e.g. the frontend's copy) for
:class:`DecomposedAttention`: three ``nn.Linear`` projections, per-head scaled dot products,
softmax, and the output projection, computing the same function (eval mode; dropout is not
applied) and returning the same ``(output, weights)`` pair.

>>> import torch
>>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
>>> x = torch.randn(2, 5, 8)
>>> dec = DecomposedAttention.from_module(mha)
>>> ref, w_ref = mha(x, x, x)
>>> out, w = dec(x, x, x)
>>> bool(torch.allclose(out, ref, atol=1e-6)), bool(torch.allclose(w, w_ref, atol=1e-6))
(True, True)

``F.scaled_dot_product_attention`` is one fused call as well. :func:`decompose_sdpa` rewrites
each call of a traced graph into the pieces it computes: ``q @ k^T`` and ``probs @ v`` (two
matmuls of activations, integer products in the quantized program,
:mod:`pqcompile.quant.matmul`) around one :class:`AttentionSoftmax` (scale, mask, softmax: a
float island whose output, non-negative, is stored unsigned). The last matmul keeps the call's
name and annotations, so what names the call (a calibrated range, a report row) names it.

>>> from pqcompile import trace
>>> class Sdpa(nn.Module):
...     def forward(self, q, k, v):
...         return F.scaled_dot_product_attention(q, k, v, is_causal=True)
>>> q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
>>> gm = trace(Sdpa(), (q, k, v))
>>> from torch.fx.passes.shape_prop import ShapeProp
>>> ShapeProp(gm).propagate(q, k, v) is not None
True
>>> decompose_sdpa(gm)
['scaled_dot_product_attention']
>>> [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
['scaled_dot_product_attention_key_t', 'scaled_dot_product_attention_scores', \
'scaled_dot_product_attention_probs', 'scaled_dot_product_attention']
>>> bool(torch.allclose(gm(q, k, v), Sdpa()(q, k, v), atol=1e-6))
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..meta import SHAPE


def unsupported_reason(m: nn.MultiheadAttention) -> str | None:
    """Why ``m`` cannot be decomposed (``None`` when it can)."""
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True"
    if m.add_zero_attn:
        return "add_zero_attn=True"
    return None


class DecomposedAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward, written with ``nn.Linear`` projections.

    Takes the same arguments as ``nn.MultiheadAttention.forward`` (batched 3-d inputs);
    ``attn_mask``/``key_padding_mask`` may be boolean (``True`` = not attended) or additive
    float masks, as there.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, bias: bool,
                 batch_first: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention) -> DecomposedAttention:
        reason = unsupported_reason(m)
        if reason is not None:
            raise ValueError(f"MultiheadAttention with {reason} has no decomposition")
        bias = m.in_proj_bias is not None
        dec = cls(m.embed_dim, m.num_heads, m.kdim, m.vdim, bias, m.batch_first)
        e = m.embed_dim
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                ws = m.in_proj_weight.split(e)
            else:
                ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
            bs = m.in_proj_bias.split(e) if bias else (None,) * 3
            for proj, w, b in zip((dec.q_proj, dec.k_proj, dec.v_proj), ws, bs):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            dec.out_proj.weight.copy_(m.out_proj.weight)
            if bias:
                dec.out_proj.bias.copy_(m.out_proj.bias)
        return dec.train(m.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, length, embed) -> (batch, heads, length, head_dim)
        b, n = x.shape[0], x.shape[1]
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask.reshape(-1, self.num_heads, lq, lk) if attn_mask.dim() == 3 \
                else attn_mask
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(b, 1, 1, lk)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool \
                else scores + pad
        weights = F.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, lq, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def decompose_attention(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Replace, in place, every decomposable ``nn.MultiheadAttention`` of ``model`` (but those
    at the paths in ``skip``) by a :class:`DecomposedAttention`; returns their paths. Call it
    on a copy you own."""
    done, skip = [], set(skip)
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and path not in skip and \
                unsupported_reason(m) is None:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, DecomposedAttention.from_module(m))
            done.append(path)
    return done


class AttentionSoftmax(nn.Module):
    """``softmax(scores * scale + mask)`` over the last dim: the float part of a decomposed
    ``scaled_dot_product_attention``. ``causal``: a boolean buffer, ``True`` where a query may
    attend (``is_causal``); the optional ``mask`` argument is the call's ``attn_mask``, boolean
    (``bool_mask``: ``True`` = attended; the program reads it as 0/1 values) or additive. A
    boolean mask adds ``log(mask)`` (``-inf`` where masked, 0 elsewhere): TVM's frontend
    translates that in float64, not ``masked_fill`` or ``where`` with an infinite scalar."""

    def __init__(self, scale: float, causal: torch.Tensor | None, bool_mask: bool) -> None:
        super().__init__()
        self.scale, self.bool_mask = float(scale), bool_mask
        self.register_buffer("causal", causal)

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = scores * self.scale
        if self.causal is not None:
            y = y + torch.log(self.causal.to(y.dtype))
        if mask is not None:
            y = y + (torch.log((mask != 0).to(y.dtype)) if self.bool_mask else mask)
        return torch.softmax(y, dim=-1)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def _sdpa_args(n: torch.fx.Node) -> dict | None:
    if n.op != "call_function" or n.target is not F.scaled_dot_product_attention:
        return None
    if len(n.args) > len(_SDPA_ARGS) or set(n.kwargs) - set(_SDPA_ARGS):
        return None
    args = dict(_SDPA_DEFAULTS) | dict(zip(_SDPA_ARGS, n.args)) | dict(n.kwargs)
    return args if all(k in args for k in _SDPA_ARGS[:3]) else None


def sdpa_decomposable(n: torch.fx.Node) -> bool:
    """``n`` is a ``scaled_dot_product_attention`` call :func:`decompose_sdpa` rewrites: node
    operands, no dropout, a Python scale, causality flag and grouped-query flag, and an
    ``attn_mask`` that is ``None`` or a node."""
    a = _sdpa_args(n)
    if a is None:
        return False
    mask = a["attn_mask"]
    return all(isinstance(a[k], torch.fx.Node) for k in _SDPA_ARGS[:3]) and \
        not isinstance(a["dropout_p"], torch.fx.Node) and a["dropout_p"] == 0 and \
        isinstance(a["enable_gqa"], bool) and isinstance(a["is_causal"], bool) and \
        (a["scale"] is None or isinstance(a["scale"], (int, float))) and \
        (mask is None or isinstance(mask, torch.fx.Node))


def _shape(n: torch.fx.Node, what: str) -> tuple[int, ...]:
    meta = SHAPE.find(n)
    if not hasattr(meta, "shape"):
        raise ValueError(f"decompose_sdpa needs shapes: node {n.name!r} ({what}) has none; run "
                         "ShapeProp or ShapeAnalysis first")
    return tuple(int(d) for d in meta.shape)


def _repeat_heads(g: torch.fx.Graph, t: torch.fx.Node, group: int, ndim: int, name: str,
                  made: list) -> torch.fx.Node:
    """``t`` (heads at dim -3) with each head repeated ``group`` times in a row, as
    ``t.repeat_interleave(group, -3)``; the new nodes are appended to ``made``."""
    sizes = [-1] * (ndim + 1)
    sizes[-3] = group
    u = g.create_node("call_method", "unsqueeze", (t, -3), {}, name=f"{name}_heads")
    e = g.create_node("call_method", "expand", (u, *sizes), {}, name=f"{name}_groups")
    f = g.create_node("call_method", "flatten", (e, -4, -3), {}, name=f"{name}_repeated")
    made += [u, e, f]
    return f


_CARRIED = ("stack_trace", "nn_module_stack", "source_fn_stack")  # provenance, not results


def decompose_sdpa(gm: torch.fx.GraphModule) -> list[str]:
    """Rewrite, in place, every :func:`sdpa_decomposable` call of ``gm`` (shapes recorded) as
    ``matmul(AttentionSoftmax(q @ k^T), v)`` (see the module doc); returns the calls' names.
    With ``enable_gqa=True`` and fewer key/value heads than query heads, each key/value head
    is repeated for its group of query heads first (``unsqueeze``, ``expand``, ``flatten``:
    what the call's ``repeat_interleave`` computes). Call it on a graph you own; shapes of the
    new nodes are not recorded."""
    done = []
    for n in list(gm.graph.nodes):
        if not sdpa_decomposable(n):
            continue
        a = _sdpa_args(n)
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        q_shape, k_shape = _shape(q, "query"), _shape(k, "key")
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q_shape[-1])
        causal = None
        if a["is_causal"]:
            causal = torch.ones(q_shape[-2], k_shape[-2], dtype=torch.bool).tril(0)
        bool_mask = mask is not None and getattr(SHAPE.find(mask), "dtype", None) == torch.bool
        target = f"{n.name}_softmax"
        while hasattr(gm, target):
            target += "_"
        gm.add_submodule(target, AttentionSoftmax(scale, causal, bool_mask))
        name, g = n.name, gm.graph
        provenance = {key: n.meta[key] for key in _CARRIED if key in n.meta}
        extra = []
        with g.inserting_before(n):
            if a["enable_gqa"] and q_shape[-3] != k_shape[-3]:
                group = q_shape[-3] // k_shape[-3]
                k = _repeat_heads(g, k, group, len(k_shape), f"{name}_key", extra)
                v = _repeat_heads(g, v, group, len(k_shape), f"{name}_value", extra)
            kt = g.create_node("call_method", "transpose", (k, -2, -1), {}, name=f"{name}_key_t")
            scores = g.create_node("call_function", torch.matmul, (q, kt), {},
                                   name=f"{name}_scores")
            probs = g.create_node("call_module", target, (scores,) if mask is None
                                  else (scores, mask), {}, name=f"{name}_probs")
        for x in (*extra, kt, scores, probs):
            x.meta.update(provenance)
        n.target, n.args, n.kwargs = torch.matmul, (probs, v), {}  # the call becomes the last op
        done.append(name)
    if done:
        gm.recompile()
    return done
