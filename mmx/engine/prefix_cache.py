"""Prefix caching: a new sequence starts from the longest prefix of its tokens whose cache is still at hand.

Softmax layers: every full KV block is indexed by its place in a chain, ``(chain id of the block before it,
its tokens)``. Keys compare the tokens themselves, so two blocks match only when all the tokens before them match
too: reuse is exact, no hash can collide. A hit shares the blocks (reference counted, read only); a block that
nobody uses stays cached until the cache needs it (least recently used first, :class:`~mmx.engine.cache.HybridCache`).

Lightning layers keep no per-token memory, only a state after the last token, so a prefix can be resumed only
where a copy of the states was kept: a *snapshot* of a sequence's slot, taken when it had fed exactly the first P
tokens, together with the K/V of the tokens after its last full block (so that P need not be block aligned).
Snapshots cost a slot each (the KV of thousands of tokens at M1's size), live in their own pool with LRU
eviction, and are taken where a later request is likely to resume (:meth:`PrefixCache.plan_snapshots`):

* one token before the end of each prompt (a repeated prompt recomputes its last token, for the logits);
* after every message end in the prompt (``boundary_token_ids``: the chat format's end-of-message token), where
  the next turn of a conversation departs from this one when the template renders history differently;
* at the end of each sequence that finishes or is preempted, where the next agent turn (this turn's prompt and
  output, then a tool result) resumes;
* optionally every ``snapshot_interval`` tokens of a long prompt.

A position inside a prefill chunk costs no extra step: the lightning layers compute the states there from the
chunk's keys and values (:func:`mmx.ops.lightning_prefix_states`, :meth:`PrefixCache.plan_captures`); a chunk's end,
or a sequence's, is read from its slot.

A hybrid request resumes from the longest P where both hold: a snapshot at P, and the full blocks before P cached.
A model without lightning layers resumes after its last cached full block (at most one token short of its
prompt: a fully cached prompt copies its last block and recomputes its last token, copy-on-write).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mmx.engine.cache import CacheLayout, HybridCache
from mmx.engine.sequence import Sequence
from mmx.utils.memory import lazy_zeros

ROOT = 0  # chain id "before the first block"

BlockKey = tuple[int, tuple[int, ...]]


@dataclass
class Hit:
    num_tokens: int  # tokens whose cache is reused
    blocks: list[int]  # full blocks shared as they are
    uids: list[int]  # their chain ids
    copy_from: int | None = None  # a cached block whose first rows are copied into a fresh block (copy-on-write)
    snapshot: BlockKey | None = None  # the snapshot with the lightning states (and partial block) at num_tokens


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, tokens whose cache was reused
    snapshots_taken: int = 0
    snapshots_evicted: int = 0


class PrefixCache:
    def __init__(
        self,
        cache: HybridCache,
        boundary_token_ids: Iterable[int] = (),
        snapshot_interval: int | None = None,
    ):
        self.cache = cache
        self.block_size = cache.block_size
        self.boundary_token_ids = frozenset(boundary_token_ids)
        self.snapshot_interval = snapshot_interval
        self.stats = PrefixCacheStats()
        self._uids = itertools.count(ROOT + 1)
        self._blocks: dict[BlockKey, tuple[int, int]] = {}  # key -> (chain id, block)
        self._key_of: dict[int, BlockKey] = {}  # indexed block -> its key
        cache.is_indexed = self._key_of.__contains__
        cache.on_evict = self._forget_block
        # snapshots: rows of their own pool, keyed by (chain id of the last full block, tokens after it)
        layout = cache.layout
        self.num_snapshots = layout.num_snapshots if cache.uses_slots else 0
        s, bs = self.num_snapshots, self.block_size
        self.states = {i: lazy_zeros((s, *pool.shape[1:]), pool.dtype, pool.device) for i, pool in cache.states.items()}
        self.tail_keys = {
            i: lazy_zeros((s, bs, *pool.shape[2:]), pool.dtype, pool.device) for i, pool in cache.keys.items()
        }
        self.tail_values = {i: lazy_zeros(tuple(t.shape), t.dtype, t.device) for i, t in self.tail_keys.items()}
        self._free_rows = list(range(s - 1, -1, -1))  # popped from the end: lowest first
        self._rows_written = 0  # rows below it were filled before (see _may_write_row)
        self._snapshots: OrderedDict[BlockKey, int] = OrderedDict()  # key -> row, least recently used first
        self._by_parent: dict[int, dict[tuple[int, ...], int]] = {}  # chain id -> {tail tokens: row}
        self._captures: dict[int, list[tuple[int, int]]] = {}  # seq id -> (position, row) filled by this forward

    # ------------------------------------------------------------------ sizes
    @property
    def snapshot_bytes(self) -> int:
        """Memory that the snapshots in use take."""
        if not self.num_snapshots:  # none (a model without lightning layers): the pools have no rows to measure
            return 0
        per_row = sum(t[0].nbytes for t in self.states.values()) + sum(2 * t[0].nbytes for t in self.tail_keys.values())
        return len(self._snapshots) * per_row

    @property
    def num_snapshots_held(self) -> int:
        return len(self._snapshots)

    @property
    def num_indexed_blocks(self) -> int:
        return len(self._key_of)

    # ------------------------------------------------------------------ lookup
    def match(self, seq: Sequence) -> Hit | None:
        """The longest reusable prefix of ``seq``'s tokens (leaving at least one token to feed), or None."""
        bs = self.block_size
        tokens = seq.token_ids
        limit = len(tokens) - 1
        uids, blocks = [ROOT], []
        while (len(blocks) + 1) * bs <= len(tokens):
            i = len(blocks)
            found = self._blocks.get((uids[-1], tuple(tokens[i * bs : (i + 1) * bs])))
            if found is None:
                break
            uids.append(found[0])
            blocks.append(found[1])
        if not self.cache.uses_slots:
            reuse = min(len(blocks) * bs, limit)
            if reuse <= 0:
                return None
            keep = reuse // bs
            copy_from = blocks[keep] if reuse % bs else None  # the whole prompt is cached: redo its last token
            return Hit(reuse, blocks[:keep], uids[1 : keep + 1], copy_from=copy_from)
        for i in range(len(blocks), -1, -1):  # a snapshot after more full blocks is always the longer prefix
            best = None
            for tail in self._by_parent.get(uids[i], {}):
                reuse = i * bs + len(tail)
                if 0 < reuse <= limit and (best is None or reuse > best[0]) and tuple(tokens[i * bs : reuse]) == tail:
                    best = (reuse, tail)
            if best is not None:
                return Hit(best[0], blocks[:i], uids[1 : i + 1], snapshot=(uids[i], best[1]))
        return None

    def attach(self, seq: Sequence) -> int:
        """Start a sequence that has nothing in the cache from its longest cached prefix: share the prefix's
        blocks, give it a slot holding the snapshot's states and a block holding the partial block's rows. Returns
        the number of tokens reused (0: none, or no free slot or block to resume into)."""
        assert seq.num_computed_tokens == 0 and not seq.block_table and seq.slot is None
        cache = self.cache
        hit = None if seq.params.prompt_logprobs is not None else self.match(seq)  # those need every prompt row
        if hit is None:
            return 0
        rows = hit.num_tokens % self.block_size  # tokens of a partial block, to copy into a fresh one
        if (cache.uses_slots and not cache.num_free_slots) or (
            rows and cache.num_free_blocks - cache.num_unused(hit.blocks) < 1
        ):
            return 0
        cache.share(seq, hit.blocks)
        seq.block_uids = list(hit.uids)
        if hit.copy_from is not None:
            cache.append_copy(seq, hit.copy_from, rows)
        if hit.snapshot is not None:
            row = self._snapshots[hit.snapshot]
            self._snapshots.move_to_end(hit.snapshot)
            cache.grow(seq, 0)  # a slot, no blocks yet
            self.restore(row, seq.slot, cache.append_block(seq) if rows else None, rows)
        seq.num_computed_tokens = hit.num_tokens
        return hit.num_tokens

    # ------------------------------------------------------------------ recording
    def plan_snapshots(self, seq: Sequence) -> None:
        """Where to keep this sequence's lightning states while it prefills (positions past what it has)."""
        if not self.num_snapshots:
            return
        prompt = seq.prompt_token_ids
        end = len(prompt) - 1
        start = seq.num_computed_tokens
        points = {end}
        points.update(i + 1 for i, t in enumerate(prompt) if t in self.boundary_token_ids)
        if self.snapshot_interval:
            points.update(range(self.snapshot_interval, end, self.snapshot_interval))
        seq.snapshot_at = sorted(p for p in points if start < p <= end)

    def plan_captures(self, prefill: list[tuple[Sequence, int]]) -> list[tuple[int, int, int]]:
        """Snapshots to take inside the coming forward: (prefill index, offset in its chunk, snapshot row) for every
        planned position strictly inside a prefill chunk. The lightning layers write their states at that
        position into the row (:class:`~mmx.engine.paged_batch.PagedBatch`); :meth:`record` indexes them after
        the forward. A position at a chunk's end needs nothing: the slot holds those states afterwards."""
        for rows in self._captures.values():  # a forward that failed left these unused
            self._free_rows.extend(row for _, row in rows)
        self._captures.clear()
        if not self.num_snapshots:
            return []
        captures = []
        for i, (seq, n) in enumerate(prefill):
            start = seq.num_computed_tokens
            for position in seq.snapshot_at:
                if not start < position < start + n or self._known(seq, position):
                    continue
                row = self._free_row()
                if row is None:  # every row is being filled by this forward
                    break
                self._captures.setdefault(seq.seq_id, []).append((position, row))
                captures.append((i, position - start, row))
        return captures

    def _known(self, seq: Sequence, position: int) -> bool:
        """Whether a snapshot of ``seq`` at ``position`` is already kept (then marked as just used)."""
        full = position // self.block_size
        if len(seq.block_uids) < full:
            return False  # its blocks are not indexed yet: cannot tell
        key = (seq.block_uids[full - 1] if full else ROOT, tuple(seq.tokens(full * self.block_size, position)))
        if key in self._snapshots:
            self._snapshots.move_to_end(key)
            return True
        return False

    def record(self, seq: Sequence) -> None:
        """After a forward that fed ``seq``: index its newly full blocks, keep the states captured inside the
        forward, and those at its chunk's end if that was a planned position."""
        self.index_blocks(seq)
        for position, row in self._captures.pop(seq.seq_id, ()):
            self._keep(seq, position, row)
        while seq.snapshot_at and seq.snapshot_at[0] <= seq.num_computed_tokens:
            if seq.snapshot_at.pop(0) == seq.num_computed_tokens:
                self.snapshot(seq)

    def index_blocks(self, seq: Sequence) -> None:
        """Index the full blocks of ``seq`` that are computed and not indexed yet."""
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        while len(seq.block_uids) < full:
            i = len(seq.block_uids)
            key = (seq.block_uids[-1] if i else ROOT, tuple(seq.tokens(i * bs, (i + 1) * bs)))
            found = self._blocks.get(key)
            if found is None:
                found = (next(self._uids), seq.block_table[i])
                self._blocks[key] = found
                self._key_of[found[1]] = key
            # else the same tokens are cached in another block: this one stays private, the chain goes on
            seq.block_uids.append(found[0])

    def snapshot(self, seq: Sequence) -> None:
        """Keep the states of ``seq``'s slot: they are those after its first ``num_computed_tokens`` tokens."""
        position = seq.num_computed_tokens
        if not self.num_snapshots or seq.slot is None or position == 0:
            return
        self.index_blocks(seq)
        if self._known(seq, position) or len(seq.block_uids) < position // self.block_size:
            return
        row = self._free_row()
        if row is None:
            return
        self.save_states(seq.slot, row)
        self._keep(seq, position, row)

    def _keep(self, seq: Sequence, position: int, row: int) -> None:
        """Index snapshot ``row``, which holds ``seq``'s lightning states after ``position`` tokens: copy the K/V
        of its partial block beside them (those rows are written and stay as they are)."""
        bs = self.block_size
        full = position // bs
        parent = seq.block_uids[full - 1] if full else ROOT
        tail = tuple(seq.tokens(full * bs, position))
        key = (parent, tail)
        if key in self._snapshots:  # taken meanwhile by another sequence with the same tokens
            self._free_rows.append(row)
            self._snapshots.move_to_end(key)
            return
        if tail:
            self.save_tail(seq.block_table[full], row, len(tail))
        self._snapshots[key] = row
        self._by_parent.setdefault(parent, {})[tail] = row
        self.stats.snapshots_taken += 1

    # ------------------------------------------------------------------ copies (journaled for tensor-parallel workers)
    def restore(self, row: int, slot: int, block: int | None, rows: int) -> None:
        """Snapshot ``row`` into state ``slot``, and its partial block's first ``rows`` K/V rows into ``block``."""
        self.cache.journal.record("prefix", "restore", row, slot, block, rows)
        for layer, pool in self.cache.states.items():
            pool[slot] = self.states[layer][row]
        if block is not None:
            for layer in self.cache.keys:
                self.cache.keys[layer][block, :rows] = self.tail_keys[layer][row, :rows]
                self.cache.values[layer][block, :rows] = self.tail_values[layer][row, :rows]

    def save_states(self, slot: int, row: int) -> None:
        """The lightning states of ``slot`` into snapshot ``row``."""
        self.cache.journal.record("prefix", "save_states", slot, row)
        for layer, pool in self.cache.states.items():
            self.states[layer][row] = pool[slot]

    def save_tail(self, block: int, row: int, num_tokens: int) -> None:
        """The first ``num_tokens`` K/V rows of ``block`` beside snapshot ``row``."""
        self.cache.journal.record("prefix", "save_tail", block, row, num_tokens)
        for layer in self.cache.keys:
            self.tail_keys[layer][row, :num_tokens] = self.cache.keys[layer][block, :num_tokens]
            self.tail_values[layer][row, :num_tokens] = self.cache.values[layer][block, :num_tokens]

    def _free_row(self) -> int | None:
        """A snapshot row to fill: a free one, or the least recently used one's (None: all are being filled)."""
        if self._free_rows and (not self._snapshots or self._may_write_row(self._free_rows[-1])):
            row = self._free_rows.pop()
            self._rows_written = max(self._rows_written, row + 1)
            return row
        if not self._snapshots:
            return None
        key, row = self._snapshots.popitem(last=False)
        self._unlink_snapshot(key)
        self.stats.snapshots_evicted += 1
        return row

    def _may_write_row(self, row: int) -> bool:
        """Whether a free ``row`` goes before evicting a snapshot. Rows go out lowest first (freed ones first again),
        so those below ``_rows_written`` were written before. Where the cache keeps its memory to what its busiest
        moment needed (:mod:`mmx.engine.cache`), a new row is written only while the rows written stay within one
        per state slot or, if more, a third of the bytes of the blocks written: the share the snapshots have of
        the cache's budget (:meth:`CacheLayout.plan`)."""
        if row < self._rows_written or self.cache.grow_for_prefix_cache:
            return True
        layout, config = self.cache.layout, self.cache.config
        dtype = next(iter(self.cache.keys.values())).dtype if self.cache.keys else torch.float32
        per_row = CacheLayout.bytes_per_snapshot(config, self.block_size, dtype)
        blocks = self.cache.num_touched_blocks * CacheLayout.bytes_per_block(config, self.block_size, dtype)
        return self._rows_written < max(layout.num_slots, blocks // (3 * per_row))

    def _unlink_snapshot(self, key: BlockKey) -> None:
        parent, tail = key
        siblings = self._by_parent[parent]
        del siblings[tail]
        if not siblings:
            del self._by_parent[parent]

    # ------------------------------------------------------------------ eviction
    def reset(self) -> None:
        """Forget every cached prefix (the model's weights changed): unused cached blocks become free, snapshots go.
        Blocks that running sequences hold stay theirs, no longer indexed."""
        self.cache.free_cached_blocks()
        self._blocks.clear()
        self._key_of.clear()
        self._snapshots.clear()
        self._by_parent.clear()
        self._captures.clear()
        self._free_rows = list(range(self.num_snapshots - 1, -1, -1))

    def _forget_block(self, block: int) -> None:
        """The cache took back ``block``: its contents and the snapshots that continue it can no longer be used."""
        key = self._key_of.pop(block)
        uid, _ = self._blocks.pop(key)
        for tail, row in self._by_parent.pop(uid, {}).items():
            del self._snapshots[(uid, tail)]
            self._free_rows.append(row)
