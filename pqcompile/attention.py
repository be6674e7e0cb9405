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
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


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
