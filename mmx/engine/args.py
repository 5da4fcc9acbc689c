"""Engine settings, apart from the engine so that the CLI can build its flags from them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class EngineArgs:
    """Engine settings (the names follow vLLM's)."""

    dtype: str | None = None  # model dtype when loading from a path; None: the checkpoint's
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's context, capped at 32768
    max_num_seqs: int = 64  # sequences decoded together (each holds one lightning-state slot)
    max_num_batched_tokens: int = 2048  # tokens per forward, prefill chunks included
    block_size: int = 16  # tokens per KV block
    cache_memory_gb: float | None = None  # KV blocks + state slots; None: 20% of RAM (at most 8 GB)
    enable_chunked_prefill: bool = True
    seed: int = 0
    allow_non_finite_weights: bool = False  # load a checkpoint whose weights hold NaN / Inf (else refused)

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[EngineArgs, dict[str, Any]]:
        """(engine args, the rest) from a flat keyword dict; a misspelt engine argument is an error."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {
            k: v for k, v in kwargs.items() if k not in names
        }
