"""One engine step as the model sees it: a flat row of tokens and the cache they read and write.

:class:`PagedBatch` implements the model's ``AttentionCache`` protocol over a :class:`HybridCache`. Tokens are laid
out decode first (one per decoding sequence), then each prefill chunk. Softmax layers write their new K/V into the
sequences' blocks, then attend over them: the decode tokens in one padded SDPA call, each prefill chunk on its own
with its causal offset (fresh prompts of one length side by side: one batched call). Lightning layers run one pooled
decode step and one packed prefill over their state slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmx.engine.cache import HybridCache
from mmx.engine.sequence import Sequence
from mmx.model.cache import causal_softmax
from mmx.ops import fused_rows, lightning_decode, lightning_prefill, lightning_prefix_states

# Decode histories at least this long are read in place (when contiguous) rather than gathered into the batch.
LONG_CONTEXT = 1024


class PagedBatch:
    def __init__(
        self,
        cache: HybridCache,
        decode: list[Sequence],
        prefill: list[tuple[Sequence, int]],
        device: torch.device,
        captures: list[tuple[int, int, int]] = (),
        snapshot_states: dict[int, torch.Tensor] | None = None,
    ):
        """``captures``: (prefill index, offset in its chunk, row) where the lightning states are to be copied into
        ``snapshot_states`` [rows, H, Dk, Dv] per layer, in the middle of a chunk (prefix caching)."""
        self.cache = cache
        if cache.uses_slots:  # decode in slot order, so that a run of slots is updated in place
            decode = sorted(decode, key=lambda s: s.slot)
        self.n_decode = len(decode)
        starts = [seq.num_computed_tokens for seq in decode] + [seq.num_computed_tokens for seq, _ in prefill]
        lengths = [1] * len(decode) + [n for _, n in prefill]
        seqs = list(decode) + [seq for seq, _ in prefill]
        self.token_ids = [tok for seq, a, n in zip(seqs, starts, lengths) for tok in seq.tokens(a, a + n)]
        positions = [p for a, n in zip(starts, lengths) for p in range(a, a + n)]
        self.positions_tensor = torch.tensor([positions], dtype=torch.long, device=device)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        # (sequence, first position fed, tokens fed, first row of the hidden state) of every sequence fed
        self.spans = list(zip(seqs, starts, lengths, offsets))
        # rows of the hidden state whose next token is sampled: the last fed token of sequences fed to their end
        # (a prefill-only request, max_tokens 0, samples nothing)
        ends = [a + n == seq.num_tokens and seq.samples_at_end for seq, a, n in zip(seqs, starts, lengths)]
        self.sample_rows = [offsets[i + 1] - 1 for i, end in enumerate(ends) if end]
        self.sampled = [seq for seq, end in zip(seqs, ends) if end]
        long = dict(dtype=torch.long, device=device)
        if cache.uses_blocks:
            self.slot_mapping = torch.cat([cache.addresses(s, a, a + n) for s, a, n in zip(seqs, starts, lengths)]).to(
                device
            )
            # Long histories held in one contiguous run of blocks are read as views, one SDPA call each; the rest
            # of the decode tokens share one padded SDPA call over gathered copies.
            contexts = [seq.num_computed_tokens + 1 for seq in decode]
            self.decode_views = [
                (i, seq, c)
                for i, (seq, c) in enumerate(zip(decode, contexts))
                if c >= LONG_CONTEXT and cache.contiguous_start(seq, c) is not None
            ]
            viewed = {i for i, _, _ in self.decode_views}
            self.decode_rows = [i for i in range(len(decode)) if i not in viewed]
            if self.decode_rows:
                seqs_, lengths_ = [decode[i] for i in self.decode_rows], [contexts[i] for i in self.decode_rows]
                self.decode_gather = cache.padded_addresses(seqs_, lengths_).to(device)
                lengths = torch.tensor(lengths_, **long)
                self.decode_mask = torch.arange(max(lengths_), device=device)[None, :] < lengths[:, None]
                self.decode_rows_tensor = torch.tensor(self.decode_rows, **long)
            self.prefill_past = [
                None
                if not seq.num_computed_tokens
                else (seq, seq.num_computed_tokens + n)
                if cache.contiguous_start(seq, seq.num_computed_tokens + n) is not None
                else cache.addresses(seq, 0, seq.num_computed_tokens + n).to(device)
                for seq, n in prefill
            ]
        self.prefill_spans = [
            (offsets[len(decode) + i], seq.num_computed_tokens, n) for i, (seq, n) in enumerate(prefill)
        ]
        if cache.uses_blocks:
            self.prefill_runs = _fresh_runs(self.prefill_spans, self.prefill_past)
        if cache.uses_slots:
            slots = [seq.slot for seq in decode]
            contiguous = bool(slots) and slots[-1] - slots[0] == len(slots) - 1
            self.decode_slots = slice(slots[0], slots[-1] + 1) if contiguous else torch.tensor(slots, **long)
            self.prefill_slots = torch.tensor([seq.slot for seq, _ in prefill], **long)
            self.prefill_has_state = torch.tensor([seq.num_computed_tokens > 0 for seq, _ in prefill], device=device)
            cu = [0]
            for _, n in prefill:
                cu.append(cu[-1] + n)
            self.prefill_cu = torch.tensor(cu, dtype=torch.int32, device=device)
            self.snapshot_states = snapshot_states
            # (prefill index, [offsets], [snapshot rows]) of the chunks whose inner states are kept
            grouped: dict[int, list[tuple[int, int]]] = {}
            for i, offset, row in captures:
                grouped.setdefault(i, []).append((offset, row))
            self.captures = [(i, [o for o, _ in c], [r for _, r in c]) for i, c in sorted(grouped.items())]
            self.prefill_bounds = cu
            self.prefill_resumes = [seq.num_computed_tokens > 0 for seq, _ in prefill]  # host-side, no sync

    # ------------------------------------------------------------------ AttentionCache protocol
    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        return self.positions_tensor

    def advance(self, num_tokens: int) -> None:
        """Sequence lengths are the scheduler's business; nothing to do here."""

    def softmax_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        g, d = k.shape[1], k.shape[3]
        keys = self.cache.keys[layer_idx].view(-1, g, d)
        values = self.cache.values[layer_idx].view(-1, g, d)
        new_k, new_v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, G, D]
        keys.index_copy_(0, self.slot_mapping, new_k.to(keys.dtype))
        values.index_copy_(0, self.slot_mapping, new_v.to(values.dtype))
        cast = keys.dtype != q.dtype  # kv_cache_dtype: attention reads the stored (rounded) K/V, in q's dtype

        def read(t: torch.Tensor) -> torch.Tensor:
            return t.to(q.dtype) if cast else t

        gqa = q.shape[1] != g
        outs = []
        if self.n_decode:
            out = q.new_empty(q.shape[1], self.n_decode, d)
            if self.decode_rows:
                ks = read(keys[self.decode_gather]).permute(0, 2, 1, 3)  # [n, G, L, D]
                vs = read(values[self.decode_gather]).permute(0, 2, 1, 3)
                qs = q[0, :, self.decode_rows_tensor].transpose(0, 1)[:, :, None]  # [n, H, 1, D]
                mask = self.decode_mask[:, None, None, :]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
                out[:, self.decode_rows_tensor] = o[:, :, 0].transpose(0, 1)
            for i, seq, context in self.decode_views:
                ks, vs = map(read, self.cache.history(layer_idx, seq, context))
                qs = q[:, :, i : i + 1]
                o = F.scaled_dot_product_attention(
                    qs, ks.permute(1, 0, 2)[None], vs.permute(1, 0, 2)[None], scale=scale, enable_gqa=gqa
                )
                out[:, i] = o[0, :, 0]
            outs.append(out)
        for first, count in self.prefill_runs:
            (offset, start, n), past = self.prefill_spans[first], self.prefill_past[first]
            qs = q[:, :, offset : offset + n]
            if past is None:  # fresh sequences: their keys are the new ones (as stored, so that a cached prefix is
                rows = slice(offset, offset + count * n)  # read back the same)
                ks, vs = k[:, :, rows], v[:, :, rows]
                if cast:
                    ks, vs = ks.to(keys.dtype).to(q.dtype), vs.to(values.dtype).to(q.dtype)
                if count > 1:
                    outs.append(_same_length_causal(q[:, :, rows], ks, vs, count, scale))
                    continue
            elif isinstance(past, tuple):  # a contiguous history: views
                hk, hv = map(read, self.cache.history(layer_idx, *past))
                ks, vs = hk.permute(1, 0, 2)[None], hv.permute(1, 0, 2)[None]
            else:
                ks, vs = read(keys[past]).permute(1, 0, 2)[None], read(values[past]).permute(1, 0, 2)[None]
            outs.append(causal_softmax(qs, ks, vs, scale, q_offset=start)[0])
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))[None]

    def lightning_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor
    ) -> torch.Tensor:
        pool = self.cache.states[layer_idx]
        outs = []
        nd = self.n_decode
        if nd:
            outs.append(lightning_decode(q[0, :nd], k[0, :nd], v[0, :nd], rates, pool, self.decode_slots)[None])
        if self.prefill_spans:
            if self.captures:
                self._capture_states(layer_idx, k[0, nd:], v[0, nd:], rates, pool)
            outs.append(
                lightning_prefill(
                    q[:, nd:],
                    k[:, nd:],
                    v[:, nd:],
                    rates,
                    self.prefill_cu,
                    pool,
                    self.prefill_slots,
                    self.prefill_has_state,
                )
            )
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _capture_states(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, rates, pool: torch.Tensor) -> None:
        """Keep the states at the capture offsets inside the prefill chunks (before the prefill updates the slots,
        whose states they start from)."""
        bounds = self.prefill_bounds
        for i, offsets, rows in self.captures:
            seq_start, seq_end = bounds[i], bounds[i + 1]
            initial = pool[self.prefill_slots[i]] if self.prefill_resumes[i] else None
            states = lightning_prefix_states(k[seq_start:seq_end], v[seq_start:seq_end], rates, initial, offsets)
            self.snapshot_states[layer_idx][rows] = states.to(pool.dtype)


def _fresh_runs(spans: list[tuple[int, int, int]], past: list) -> list[tuple[int, int]]:
    """(first, count) over the prefill spans: runs of fresh prompts (no history) of the same length, side by side
    in the batch, which attend in one causal call (a batch of lm-eval requests or of RL prompts: 0.68-0.84x the time
    of per-prompt calls at 16 x 128 tokens, ~0.95x at 512; bench/prompt_attention.py); every other span alone."""
    runs: list[tuple[int, int]] = []
    for i, (offset, start, n) in enumerate(spans):
        if runs and past[i] is None and start == 0:
            first, count = runs[-1]
            if past[first] is None and spans[first][1:] == (0, n) and spans[first][0] + count * n == offset:
                runs[-1] = (first, count + 1)
                continue
        runs.append((i, 1))
    return runs


def _same_length_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int, scale: float) -> torch.Tensor:
    """Causal attention of ``count`` fresh prompts of the same length laid end to end in q [1, H, count * n, D] and
    k, v [1, G, count * n, D], as one batched call; [H, count * n, D]."""
    h, g, d = q.shape[1], k.shape[1], q.shape[3]

    def batched(t: torch.Tensor, heads: int) -> torch.Tensor:
        return t[0].view(heads, count, -1, d).transpose(0, 1)

    qs, ks, vs = batched(q, h), batched(k, g), batched(v, g)
    if fused_rows.takes_attention(qs, ks, vs):
        out = fused_rows.attention(qs, ks, vs, scale, 0)
    else:
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=h != g)
    return out.transpose(0, 1).reshape(h, -1, d)
