"""How attention layers reach their cache.

A layer never stores state itself. It hands q, k, v to an :class:`AttentionCache`, which knows where earlier
tokens live and how sequences are laid out: :class:`DenseCache` (contiguous tensors, for plain generation) here,
the engine's paged KV blocks and lightning-state slots later. ``cache=None`` means one causal pass over
independent rows with no state kept.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from mmx.ops import fused_rows, lightning_attention, lightning_decode


class AttentionCache(Protocol):
    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Default position ids [batch, seq_len] of the tokens about to be processed."""
        ...

    def softmax_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [B, H, T, D], new k / v [B, G, T, D] -> attention output [B, H, T, D] over past and new keys."""
        ...

    def lightning_attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rates: torch.Tensor,
    ) -> torch.Tensor:
        """Token-major q, k, v [B, T, H, D] -> output [B, T, H, D], continuing and updating the layer's state."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once per model forward, after every layer has run."""
        ...


# Queries per SDPA call when a chunk continues a history and no log-sum-exp kernel is at hand: the boolean mask is
# [rows, keys], so this bounds its memory (512 x 64K keys = 32 MB) instead of growing as chunk x context.
MASKED_QUERY_BLOCK = 512
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def causal_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int = 0) -> torch.Tensor:
    """GQA softmax attention where query i sits at absolute position q_offset + i and keys start at 0."""
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == 1:  # a single new token sees every key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if fused_rows.takes_attention(q, k, v):  # any offset, no mask, written as the output projection reads it
        return fused_rows.attention(q, k, v, scale, q_offset)
    if q_offset == 0 and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q.device.type == "cpu" and _FLASH_CPU is not None and 0 < q_offset == s - t:
        return _continue_with_lse(q, k, v, scale, q_offset)
    outs = []
    for r0 in range(0, t, MASKED_QUERY_BLOCK):
        r1 = min(t, r0 + MASKED_QUERY_BLOCK)
        visible = q_offset + r1  # keys past the block's last query are never seen: leave them out
        rows = torch.arange(r0, r1, device=q.device)[:, None] + q_offset
        mask = torch.arange(visible, device=q.device)[None, :] <= rows
        block = F.scaled_dot_product_attention(
            q[:, :, r0:r1], k[:, :, :visible], v[:, :, :visible], attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        outs.append(block)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _continue_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: int) -> torch.Tensor:
    """A chunk of t queries after ``past`` cached keys, without any mask: attention over the past keys (all visible)
    and over the chunk's own keys (a causal square), merged by their log-sum-exps. Memory stays in the kernel's
    tiles instead of a [heads, t, past + t] mask."""
    b, h, t, d = q.shape
    g = k.shape[1]
    r = h // g
    # Past part: the r query heads that share a KV head attend to it as one head of r * t rows (no K / V copies).
    grouped = q.reshape(b, g, r * t, d)
    out_past, lse_past = _FLASH_CPU(grouped, k[:, :, :past], v[:, :, :past], 0.0, False, scale=scale)
    # the causal square: the kernel maps each query head to its K/V head itself (SDPA's enable_gqa relies on it too)
    out_new, lse_new = _FLASH_CPU(q, k[:, :, past:], v[:, :, past:], 0.0, True, scale=scale)
    out_past, lse_past = out_past.reshape(b, h, t, d), lse_past.reshape(b, h, t)
    top = torch.maximum(lse_past, lse_new)
    w_past, w_new = torch.exp(lse_past - top)[..., None], torch.exp(lse_new - top)[..., None]
    merged = (out_past.float() * w_past + out_new.float() * w_new) / (w_past + w_new)
    return merged.to(q.dtype)


class DenseCache:
    """Contiguous cache for generation outside the engine: all rows share one length. Softmax layers keep K / V
    [B, G, T, D] (keys after RoPE); lightning layers keep a float32 state [B, H, Dk, Dv]."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.states: dict[int, torch.Tensor] = {}
        self.length = 0

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + seq_len, device=device).expand(batch, seq_len)

    def softmax_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if layer_idx in self.kv:
            past_k, past_v = self.kv[layer_idx]
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        self.kv[layer_idx] = (k, v)
        return causal_softmax(q, k, v, scale, q_offset=self.length)

    def lightning_attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rates: torch.Tensor,
    ) -> torch.Tensor:
        state = self.states.get(layer_idx)
        if q.shape[1] == 1 and state is not None and not torch.is_grad_enabled():
            return lightning_decode(q[:, 0], k[:, 0], v[:, 0], rates, state)[:, None]  # updates state in place
        out, self.states[layer_idx] = lightning_attention(q, k, v, rates, state)
        return out

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class PackedDocuments:
    """Training on packed rows: each row holds several documents that must not see each other. Softmax layers use a
    block-diagonal causal mask; lightning layers restart their state at every document start; positions restart at
    0 in each document. ``doc_ids`` [B, T] numbers the documents of each row (padding gets -1)."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        b, t = doc_ids.shape
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        flat_starts = torch.nonzero(starts.reshape(-1)).flatten()
        self.cu_seqlens = torch.cat((flat_starts, torch.tensor([b * t], device=doc_ids.device)))
        index = torch.arange(t, device=doc_ids.device).expand(b, t)
        last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        self._positions = index - last_start
        same = doc_ids[:, :, None] == doc_ids[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
        self.mask = (same & causal)[:, None]  # [B, 1, T, T]

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        return self._positions

    def softmax_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    def lightning_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor
    ) -> torch.Tensor:
        b, t = q.shape[:2]
        flat = [x.reshape(1, b * t, *x.shape[2:]) for x in (q, k, v)]
        out, _ = lightning_attention(*flat, rates, cu_seqlens=self.cu_seqlens)
        return out.reshape(b, t, *out.shape[2:])

    def advance(self, num_tokens: int) -> None:
        """Nothing is cached."""
