"""The hybrid cache: paged K/V blocks for softmax layers, a fixed pool of state slots for lightning layers.

A softmax layer's memory grows with the sequence, so it is paged: fixed-size blocks handed out as a sequence
grows. A lightning layer keeps one float32 [H, Dk, Dv] state per sequence whatever its length, so each running
sequence holds one slot (one row in every lightning layer's pool).

Blocks are reference counted so that sequences can share the blocks of a common prefix (prefix caching,
:mod:`mmx.engine.prefix_cache`). A block whose last user lets go either becomes free or, when the prefix cache
holds its contents, stays as it is among the *cached* blocks: free for the taking, but taken last (least recently
used first), and reusable until then.

Where the pools are committed page by page as first written (the CPU), the cache by default writes a block that no
request has used yet only while it holds fewer cached blocks than the running sequences hold; past that it takes
the least recently used cached block. The prefix cache then keeps as much again as the busiest moment's requests
used, and the process holds that, rather than growing by every distinct prompt served until the pools, sized for
``max_num_seqs`` sequences of ``max_model_len`` tokens, are all resident. A GPU's pools are committed whole, and a
cache the user sized (``cache_memory_gb``) may use all its memory: there the free blocks always go first.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmx.config import MiniMaxConfig
from mmx.engine.sequence import Sequence
from mmx.utils.memory import lazy_zeros


@dataclass(frozen=True)
class CacheLayout:
    block_size: int
    num_blocks: int
    num_slots: int
    num_snapshots: int = 0  # lightning-state snapshots kept for prefix caching (their own share of the budget)

    @staticmethod
    def bytes_per_block(config: MiniMaxConfig, block_size: int, dtype: torch.dtype) -> int:
        softmax_layers = sum(not config.is_lightning(i) for i in range(config.num_hidden_layers))
        per_token = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
        return softmax_layers * block_size * per_token

    @staticmethod
    def bytes_per_slot(config: MiniMaxConfig) -> int:
        lightning_layers = sum(config.is_lightning(i) for i in range(config.num_hidden_layers))
        return lightning_layers * config.num_attention_heads * config.head_dim * config.head_dim * 4

    @classmethod
    def bytes_for(
        cls, config: MiniMaxConfig, dtype: torch.dtype, max_num_seqs: int, max_model_len: int, block_size: int
    ) -> int:
        """What ``max_num_seqs`` sequences of ``max_model_len`` tokens can use at most: their blocks and slots."""
        blocks = math.ceil(max_model_len / block_size) * cls.bytes_per_block(config, block_size, dtype)
        return max_num_seqs * (blocks + cls.bytes_per_slot(config))

    @classmethod
    def bytes_per_snapshot(cls, config: MiniMaxConfig, block_size: int, dtype: torch.dtype) -> int:
        """A slot's lightning states plus the K/V of one partial block (the tokens after the last full block)."""
        return cls.bytes_per_slot(config) + cls.bytes_per_block(config, block_size, dtype)

    @classmethod
    def plan(
        cls,
        config: MiniMaxConfig,
        dtype: torch.dtype,
        memory_bytes: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        snapshot_bytes: int | None = 0,
    ) -> CacheLayout:
        """State slots for up to ``max_num_seqs`` sequences and KV blocks with the rest of the budget. The budget
        must hold one slot plus one sequence of ``max_model_len`` tokens; the error says how much that takes.

        Prefix-cache snapshots of the lightning states (models that have lightning layers) get ``snapshot_bytes``
        on top of the budget; None: a quarter of the budget, taken from it as far as the rest still holds one
        sequence of ``max_model_len`` tokens."""
        slot_bytes = cls.bytes_per_slot(config)
        block_bytes = cls.bytes_per_block(config, block_size, dtype)
        longest = math.ceil(max_model_len / block_size) * block_bytes
        num_snapshots = 0
        if slot_bytes and snapshot_bytes != 0:
            each = cls.bytes_per_snapshot(config, block_size, dtype)
            if snapshot_bytes is None:
                num_snapshots = max(0, min(memory_bytes // 4, memory_bytes - longest - slot_bytes)) // each
                memory_bytes -= num_snapshots * each
            else:
                num_snapshots = snapshot_bytes // each
        if memory_bytes < longest + slot_bytes:
            raise ValueError(
                f"cache memory {memory_bytes / 2**20:.1f} MiB cannot hold one sequence of max_model_len="
                f"{max_model_len} tokens ({(longest + slot_bytes) / 2**20:.1f} MiB); raise the budget or lower "
                "max_model_len"
            )
        num_slots = min(max_num_seqs, (memory_bytes - longest) // slot_bytes) if slot_bytes else 0
        num_blocks = (memory_bytes - num_slots * slot_bytes) // block_bytes if block_bytes else 0
        # never more than max_num_seqs sequences of max_model_len tokens can use
        num_blocks = min(num_blocks, max_num_seqs * math.ceil(max_model_len / block_size))
        return cls(block_size, int(num_blocks), int(num_slots), int(num_snapshots))


class CacheJournal:
    """The copies between cache tensors that the bookkeeping makes outside a forward (prefix-cache hits and
    snapshots, copy-on-write), as (owner, method, arguments). Off by default; a tensor-parallel driver turns it on
    and sends the entries to its workers before each step, which replay them on their own heads' tensors."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, tuple]] | None = None

    def record(self, owner: str, method: str, *args: int | None) -> None:
        if self.entries is not None:
            self.entries.append((owner, method, args))

    def drain(self) -> list[tuple[str, str, tuple]]:
        entries, self.entries = self.entries or [], []
        return entries

    @staticmethod
    def replay(entries: list[tuple[str, str, tuple]], cache: HybridCache, prefix: object | None) -> None:
        for owner, method, args in entries:
            getattr(cache if owner == "cache" else prefix, method)(*args)


class HybridCache:
    """Storage and bookkeeping. K/V per softmax layer: [num_blocks, block_size, kv_heads, head_dim] (keys after
    RoPE); state per lightning layer: [num_slots, heads, head_dim, head_dim] float32."""

    def __init__(
        self,
        config: MiniMaxConfig,
        layout: CacheLayout,
        dtype: torch.dtype,
        device: torch.device | str,
        grow_for_prefix_cache: bool | None = None,
    ):
        """``grow_for_prefix_cache``: whether cached blocks are kept as long as never-used blocks remain (see the
        module's docstring); None: only where the pools are not committed as written (off the CPU)."""
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        g, d, h = config.num_key_value_heads, config.head_dim, config.num_attention_heads
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.states: dict[int, torch.Tensor] = {}
        for i in range(config.num_hidden_layers):
            # resident only as far as used: the pools are sized for max_num_seqs sequences of max_model_len tokens
            if config.is_lightning(i):
                self.states[i] = lazy_zeros((layout.num_slots, h, d, d), torch.float32, device)
            else:
                self.keys[i] = lazy_zeros((layout.num_blocks, self.block_size, g, d), dtype, device)
                self.values[i] = lazy_zeros((layout.num_blocks, self.block_size, g, d), dtype, device)
        self.uses_blocks = bool(self.keys)
        self.uses_slots = bool(self.states)
        # Free blocks: a set, plus a min-heap (with stale entries) to hand out the lowest free id. A growing
        # sequence takes the block right after its last one when it can, so long sequences usually own one
        # contiguous run of blocks, which attention then reads as a view instead of gathering a copy.
        self._free_blocks = set(range(layout.num_blocks))
        self._free_heap = list(range(layout.num_blocks))
        self._free_slots = list(range(layout.num_slots - 1, -1, -1))
        self._users = [0] * layout.num_blocks  # sequences holding each block
        # blocks go out lowest id first, so those below this mark are the ones ever written (committed on the CPU)
        self.num_touched_blocks = 0
        if grow_for_prefix_cache is None:
            grow_for_prefix_cache = torch.device(device).type != "cpu"
        self.grow_for_prefix_cache = grow_for_prefix_cache
        # Unused blocks whose contents the prefix cache indexes, least recently used first. They count as free;
        # taking one evicts it (``on_evict`` tells the prefix cache to forget it).
        self._cached: OrderedDict[int, None] = OrderedDict()
        self.is_indexed: Callable[[int], bool] = lambda block: False
        self.on_evict: Callable[[int], None] = lambda block: None
        self.journal = CacheJournal()

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        """Blocks that a sequence can take: free ones and cached ones that nobody uses."""
        return len(self._free_blocks) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        """Unused blocks kept for their contents (prefix caching)."""
        return len(self._cached)

    def _take_block(self, after: int | None) -> int:
        block = self._take_free_block(after)
        self._users[block] = 1
        return block

    def _take_free_block(self, after: int | None) -> int:
        if after is not None and after + 1 in self._free_blocks and self._may_touch(after + 1):
            self._free_blocks.remove(after + 1)
            return self._touch(after + 1)
        while self._free_blocks:
            block = self._free_heap[0]
            if block not in self._free_blocks:  # a stale entry
                heapq.heappop(self._free_heap)
                continue
            if not self._may_touch(block):
                break
            heapq.heappop(self._free_heap)
            self._free_blocks.remove(block)
            return self._touch(block)
        block, _ = self._cached.popitem(last=False)  # evict the least recently used
        self.on_evict(block)
        return block

    def _may_touch(self, block: int) -> bool:
        """Whether a free ``block`` goes before the cached ones: written before, or none cached, or fewer blocks
        cached than running sequences hold, or the cache may grow for its cached blocks (see the module's
        docstring)."""
        if block < self.num_touched_blocks or not self._cached or self.grow_for_prefix_cache:
            return True
        in_use = self.layout.num_blocks - len(self._free_blocks) - len(self._cached)
        return len(self._cached) < in_use

    def _touch(self, block: int) -> int:
        self.num_touched_blocks = max(self.num_touched_blocks, block + 1)
        return block

    def free_cached_blocks(self) -> None:
        """Make every unused cached block free (their contents are no longer wanted)."""
        for block in self._cached:
            self._free_blocks.add(block)
        self._free_heap = sorted(self._free_blocks)
        self._cached.clear()

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Append ``blocks`` (already filled, read only from now on) to ``seq``'s block table."""
        for block in blocks:
            self._hold(block)
        seq.block_table.extend(blocks)

    def _hold(self, block: int) -> None:
        if self._users[block] == 0:
            del self._cached[block]
        self._users[block] += 1

    def _drop(self, block: int) -> None:
        self._users[block] -= 1
        if self._users[block] > 0:
            return
        if self.is_indexed(block):
            self._cached[block] = None  # most recently used end
        else:
            self._free_blocks.add(block)
            heapq.heappush(self._free_heap, block)

    def num_unused(self, blocks: list[int]) -> int:
        """How many of ``blocks`` nobody holds (they count among the free blocks until shared)."""
        return sum(1 for block in blocks if self._users[block] == 0)

    def append_block(self, seq: Sequence) -> int:
        """One more block for ``seq`` (check :attr:`num_free_blocks` first); returns it."""
        block = self._take_block(seq.block_table[-1] if seq.block_table else None)
        seq.block_table.append(block)
        return block

    def append_copy(self, seq: Sequence, source: int, num_tokens: int) -> None:
        """Copy-on-write: a fresh block for ``seq`` holding the first ``num_tokens`` K/V rows of ``source``, a block
        that others share (``seq`` goes on to write the rows after them)."""
        self._hold(source)  # so that taking the fresh block cannot evict it
        self.copy_block_rows(self.append_block(seq), source, num_tokens)
        self._drop(source)

    def copy_block_rows(self, block: int, source: int, num_tokens: int) -> None:
        """K/V rows [0, num_tokens) of block ``source`` into ``block``, in every softmax layer."""
        self.journal.record("cache", "copy_block_rows", block, source, num_tokens)
        for layer in self.keys:
            self.keys[layer][block, :num_tokens] = self.keys[layer][source, :num_tokens]
            self.values[layer][block, :num_tokens] = self.values[layer][source, :num_tokens]

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs so that its first ``num_tokens`` tokens have a place."""
        if not self.uses_blocks:
            return 0
        return max(0, math.ceil(num_tokens / self.block_size) - len(seq.block_table))

    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        slot_ok = not self.uses_slots or seq.slot is not None or self._free_slots
        return bool(slot_ok) and self.blocks_to_grow(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` a slot (if it has none) and blocks for ``num_tokens`` tokens; call :meth:`can_admit` first."""
        if self.uses_slots and seq.slot is None:
            seq.slot = self._free_slots.pop()
        for _ in range(self.blocks_to_grow(seq, num_tokens)):
            seq.block_table.append(self._take_block(seq.block_table[-1] if seq.block_table else None))

    def release(self, seq: Sequence) -> None:
        # the last blocks first, so that a cached prefix is evicted from its end (its start is the most shared)
        for block in reversed(seq.block_table):
            self._drop(block)
        seq.block_table = []
        if len(self._free_heap) > 4 * max(1, self.layout.num_blocks):  # drop stale heap entries now and then
            self._free_heap = sorted(self._free_blocks)
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    # ------------------------------------------------------------------ addressing
    def contiguous_start(self, seq: Sequence, num_tokens: int) -> int | None:
        """First block of ``seq``'s first ``num_tokens`` tokens if those blocks are one contiguous run."""
        n = math.ceil(num_tokens / self.block_size)
        table = seq.block_table[:n]
        if table and table[-1] - table[0] == n - 1 and all(b - a == 1 for a, b in itertools.pairwise(table)):
            return table[0]
        return None

    def history(self, layer: int, seq: Sequence, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values [num_tokens, kv_heads, head_dim] of ``seq`` as views (no copy), if contiguous."""
        first = self.contiguous_start(seq, num_tokens)
        if first is None:
            return None
        n = math.ceil(num_tokens / self.block_size)
        k = self.keys[layer][first : first + n].flatten(0, 1)[:num_tokens]
        v = self.values[layer][first : first + n].flatten(0, 1)[:num_tokens]
        return k, v

    def padded_addresses(self, seqs: list[Sequence], lengths: list[int]) -> torch.Tensor:
        """[len(seqs), max(lengths)] addresses of each sequence's first lengths[i] tokens, padded with 0."""
        width = max(lengths)
        blocks = -(-width // self.block_size)
        tables = torch.zeros(len(seqs), blocks, dtype=torch.long)
        for i, (seq, n) in enumerate(zip(seqs, lengths)):
            used = -(-n // self.block_size)
            tables[i, :used] = torch.tensor(seq.block_table[:used], dtype=torch.long)
        positions = torch.arange(width)
        out = tables[:, positions // self.block_size] * self.block_size + positions % self.block_size
        return out.masked_fill_(positions[None, :] >= torch.tensor(lengths)[:, None], 0)

    def addresses(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat (block * block_size + offset) cache addresses of token positions start..end-1 of ``seq``."""
        positions = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size
