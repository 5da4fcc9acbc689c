"""Engine settings, apart from the engine so that the CLI can build its flags from them without importing torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

# Weight quantisation schemes (mmx.model.quantization implements them); here so that the CLI lists them without torch.
# int8: every decoder-layer linear map and expert; experts_int8: the MoE experts only (vLLM's name); fp8: keep a
# block-scaled FP8 checkpoint's weights FP8 in memory (chosen at load time).
QUANTIZATION_METHODS = ("int8", "experts_int8", "fp8")
# K/V cache element types: "auto" is the model's dtype
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# How decode graphs are compiled (mmx.engine.decode_graph): "aot", AOTInductor in a child process, the graphs then run
# without the compiler in the engine's process (less memory and per-step overhead); "inductor", torch.compile in
# the process; "auto": aot on the CPU, inductor on other devices.
DECODE_COMPILERS = ("auto", "aot", "inductor")


@dataclass
class EngineArgs:
    """Engine settings (the names follow vLLM's)."""

    dtype: str | None = None  # model dtype when loading from a path; None: the checkpoint's
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's context, capped at 32768
    max_num_seqs: int = 64  # sequences decoded together (each holds one lightning-state slot)
    max_num_batched_tokens: int = 2048  # tokens per forward, prefill chunks included
    block_size: int = 16  # tokens per KV block
    # the softmax layers' stored K/V (lightning states stay float32); lower precision halves the KV memory
    kv_cache_dtype: str = field(default="auto", metadata={"choices": KV_CACHE_DTYPES})
    # KV blocks + state slots (+ snapshots); None: what max_num_seqs x max_model_len can use, at most 20% of RAM and
    # 8 GB on the CPU (committed as used), 80% of free memory on a GPU
    cache_memory_gb: float | None = None
    enable_chunked_prefill: bool = True
    # reuse the cache of earlier requests' prefixes (KV blocks, lightning-state snapshots); exact, on by default
    enable_prefix_caching: bool = True
    snapshot_memory_gb: float | None = None  # lightning-state snapshots; None: a quarter of the cache budget
    snapshot_interval: int | None = None  # also keep the states every this many prompt tokens (long prompts)
    # run every step eagerly; otherwise decode-only steps run as compiled graphs (torch.compile, inductor).
    # Default: $MMX_ENFORCE_EAGER (1 for eager), else compiled
    enforce_eager: bool = field(default_factory=lambda: os.environ.get("MMX_ENFORCE_EAGER", "0") not in ("", "0"))
    # see DECODE_COMPILERS; default: $MMX_DECODE_COMPILER, else auto. Moot where nothing is compiled: enforce_eager,
    # tensor-parallel engines
    decode_compiler: str = field(
        default_factory=lambda: os.environ.get("MMX_DECODE_COMPILER") or "auto", metadata={"choices": DECODE_COMPILERS}
    )
    seed: int = 0
    # processes the model is split over (attention heads, MoE, vocabulary; mmx.parallel), one per device; the engine
    # runs in the first, the others are spawned (or are the other ranks of a torchrun launch)
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts per process instead of a slice of every expert
    allow_non_finite_weights: bool = False  # load a checkpoint whose weights hold NaN / Inf (else refused)
    # int8: per-channel int8 weights for the decoder layers' linear maps (CPU kernel), applied after loading
    quantization: str | None = field(default=None, metadata={"choices": QUANTIZATION_METHODS})

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.decode_compiler not in DECODE_COMPILERS:
            raise ValueError(
                f"decode_compiler must be one of {', '.join(DECODE_COMPILERS)}; got {self.decode_compiler!r}"
            )
        if self.snapshot_interval is not None and self.snapshot_interval < 1:
            raise ValueError(f"snapshot_interval must be a positive number of tokens; got {self.snapshot_interval}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1; got {self.tensor_parallel_size}")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("enable_expert_parallel splits experts over processes: set tensor_parallel_size above 1")
        if self.snapshot_memory_gb is not None and self.snapshot_memory_gb < 0:
            raise ValueError(f"snapshot_memory_gb must be at least 0; got {self.snapshot_memory_gb}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None for none); "
                f"got {self.quantization!r}"
            )

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[EngineArgs, dict[str, Any]]:
        """(engine args, the rest) from a flat keyword dict; a misspelt engine argument is an error."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {
            k: v for k, v in kwargs.items() if k not in names
        }
