"""The decode step both kinds of compiled graph are traced from: the model's forward for a batch of one-token
sequences over the engine's cache pools, with every input a tensor (mmx.engine.decode_graph runs it through
torch.compile in the process, mmx.engine.aot_decode through AOTInductor in a child process)."""

from __future__ import annotations

import torch
from torch import nn

# Block tables are padded to a multiple of this many blocks (masked out): a table of one block would be a size-1
# dimension, which torch specialises into a graph of its own.
TABLE_STEP = 8


class DecodeCache:
    """The AttentionCache of a decode step, built from tensors only (traced into the graph).

    ``write_at`` [N]: flat K/V address of each new token; ``tables`` [N, W]: block ids of each sequence's context
    (padded); ``lengths`` [N]: context length including the new token; ``slots`` [N]: lightning-state rows."""

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        states: list[torch.Tensor],
        layer_index: dict[int, int],
        positions: torch.Tensor,
        write_at: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        slots: torch.Tensor,
    ):
        self.keys, self.values, self.states, self.layer_index = keys, values, states, layer_index
        self._positions, self.write_at, self.tables, self.lengths, self.slots = (
            positions,
            write_at,
            tables,
            lengths,
            slots,
        )

    def positions(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        return self._positions[None]

    def advance(self, num_tokens: int) -> None:
        """Lengths are the scheduler's business."""

    def softmax_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        i = self.layer_index[layer_idx]
        keys, values = self.keys[i], self.values[i]
        nb, bs, g, d = keys.shape
        h = q.shape[1]
        flat_k, flat_v = keys.view(nb * bs, g, d), values.view(nb * bs, g, d)
        flat_k.index_copy_(0, self.write_at, k[0].transpose(0, 1).to(keys.dtype))
        flat_v.index_copy_(0, self.write_at, v[0].transpose(0, 1).to(values.dtype))
        n, w = self.tables.shape
        # [N, W * bs, G, D] through the block tables; read inside the score and mixing loops, not copied
        ks = keys[self.tables].view(n, w * bs, g, 1, d).to(q.dtype)
        vs = values[self.tables].view(n, w * bs, g, 1, d).to(q.dtype)
        qs = _stored(q[0].transpose(0, 1)).view(n, 1, g, h // g, d)  # query heads grouped by their K/V head
        scores = (qs.float() * ks.float()).sum(-1) * scale  # [N, L, G, R]
        visible = torch.arange(w * bs, device=q.device)[None, :] < self.lengths[:, None]
        scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
        probs = scores.softmax(dim=1)
        out = (probs[..., None] * vs.float()).sum(1)  # [N, G, R, D]
        return out.reshape(n, h, d).transpose(0, 1)[None].to(q.dtype)

    def lightning_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor
    ) -> torch.Tensor:
        pool = self.states[self.layer_index[layer_idx]]
        state = pool[self.slots]  # [N, H, Dk, Dv]
        decay = torch.exp(-rates.float())[None, :, None, None]
        state = state * decay + k[0].float()[..., :, None] * v[0].float()[..., None, :]
        pool.index_copy_(0, self.slots, state)
        return (q[0].float()[..., :, None] * state).sum(-2)[None].to(q.dtype)


def _stored(t: torch.Tensor) -> torch.Tensor:
    """``t`` written to memory once. Inductor would otherwise fuse whatever computed it (the query's rotary
    embedding: a sine and a cosine per channel) into the attention loops that read it, and redo it for every key
    position. A scatter is a store it cannot inline."""
    rows = t.reshape(t.shape[0], -1)
    index = torch.arange(rows.shape[0], device=t.device)
    return torch.empty_like(rows).index_copy_(0, index, rows).view(t.shape)


def decode_logits(
    model: nn.Module,
    layer_index: dict[int, int],
    ids: torch.Tensor,
    positions: torch.Tensor,
    write_at: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    slots: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    states: list[torch.Tensor],
) -> torch.Tensor:
    """Logits [N, vocab] of one decode step of N sequences, their K/V and states written into the pools: the code
    both kinds of compiled graph are traced from."""
    cache = DecodeCache(keys, values, states, layer_index, positions, write_at, tables, lengths, slots)
    hidden = model.model(ids[None], positions[None], cache=cache)
    return model.compute_logits(hidden[0])


class DecodeStep(nn.Module):
    """:func:`decode_logits` as a module of flat tensor arguments (what ``torch.export`` takes): the six step inputs,
    then the K pools, the V pools and the state pools."""

    def __init__(self, model: nn.Module, layer_index: dict[int, int], num_keys: int, num_values: int):
        super().__init__()
        self.m = model
        self.layer_index = layer_index
        self.num_keys, self.num_values = num_keys, num_values

    def forward(self, ids, positions, write_at, tables, lengths, slots, *pools):
        k, v = self.num_keys, self.num_values
        return decode_logits(
            self.m, self.layer_index, ids, positions, write_at, tables, lengths, slots,
            list(pools[:k]), list(pools[k : k + v]), list(pools[k + v :]),
        )  # fmt: skip
