"""The hybrid cache: paged K/V blocks for softmax layers, a fixed pool of state slots for lightning layers.

A softmax layer's memory grows with the sequence, so it is paged: fixed-size blocks handed out as a sequence
grows. A lightning layer keeps one float32 [H, Dk, Dv] state per sequence whatever its length, so each running
sequence holds one slot (one row in every lightning layer's pool).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmx.config import MiniMaxConfig
from mmx.engine.sequence import Sequence


@dataclass(frozen=True)
class CacheLayout:
    block_size: int
    num_blocks: int
    num_slots: int

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
    def plan(
        cls,
        config: MiniMaxConfig,
        dtype: torch.dtype,
        memory_bytes: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
    ) -> CacheLayout:
        """State slots for up to ``max_num_seqs`` sequences and KV blocks with the rest of the budget. The budget
        must hold one slot plus one sequence of ``max_model_len`` tokens; the error says how much that takes."""
        slot_bytes = cls.bytes_per_slot(config)
        block_bytes = cls.bytes_per_block(config, block_size, dtype)
        longest = math.ceil(max_model_len / block_size) * block_bytes
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
        return cls(block_size, int(num_blocks), int(num_slots))


class HybridCache:
    """Storage and bookkeeping. K/V per softmax layer: [num_blocks, block_size, kv_heads, head_dim] (keys after
    RoPE); state per lightning layer: [num_slots, heads, head_dim, head_dim] float32."""

    def __init__(self, config: MiniMaxConfig, layout: CacheLayout, dtype: torch.dtype, device: torch.device | str):
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        g, d, h = config.num_key_value_heads, config.head_dim, config.num_attention_heads
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.states: dict[int, torch.Tensor] = {}
        for i in range(config.num_hidden_layers):
            if config.is_lightning(i):
                self.states[i] = torch.zeros(layout.num_slots, h, d, d, dtype=torch.float32, device=device)
            else:
                self.keys[i] = torch.zeros(layout.num_blocks, self.block_size, g, d, dtype=dtype, device=device)
                self.values[i] = torch.zeros_like(self.keys[i])
        self.uses_blocks = bool(self.keys)
        self.uses_slots = bool(self.states)
        self._free_blocks = list(range(layout.num_blocks - 1, -1, -1))
        self._free_slots = list(range(layout.num_slots - 1, -1, -1))

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

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
        return bool(slot_ok) and self.blocks_to_grow(seq, num_tokens) <= len(self._free_blocks)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` a slot (if it has none) and blocks for ``num_tokens`` tokens; call :meth:`can_admit` first."""
        if self.uses_slots and seq.slot is None:
            seq.slot = self._free_slots.pop()
        for _ in range(self.blocks_to_grow(seq, num_tokens)):
            seq.block_table.append(self._free_blocks.pop())

    def release(self, seq: Sequence) -> None:
        self._free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    # ------------------------------------------------------------------ addressing
    def addresses(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat (block * block_size + offset) cache addresses of token positions start..end-1 of ``seq``."""
        positions = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size
