"""``mmx plan``: what one rank of a sharded model holds, and how many sequences its device fits, from the config
alone (the model is built on the meta device, sharded as it would be, and its tensors' sizes summed).

Weights per rank count each tensor as the engine stores it: the model dtype, the router and routing bias in
float32, and the quantised layouts (int8: one byte a weight plus a scale per output row in bf16 / fp16; FP8: one
byte plus a float32 factor per 128 x 128 block). The cache per rank is its KV heads' K and V for every softmax layer
(per token) and its lightning heads' float32 states (per sequence). Activations, the CUDA context and allocator
slack are not modelled: they come out of the part of the device memory that ``utilization`` leaves free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mmx.config import MiniMaxConfig
from mmx.engine.cache import CacheLayout
from mmx.model.checkpoint_io import parse_dtype
from mmx.model.fp8 import block_size_from, expected_scale_shape
from mmx.model.modeling import FP32_PARAMETER_SUFFIXES, MiniMaxForCausalLM
from mmx.model.quantization import check_quantization, kernel_dtype
from mmx.parallel.group import ParallelGroup
from mmx.parallel.sharding import local_cache_config, shard_model

_ATTENTION_WEIGHT = re.compile(
    r"^model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|output_gate|out_proj)\.weight$"
)
_EXPERT_WEIGHT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_UNITS.update({"GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40})


def parse_memory(text: str) -> int:
    """'80GiB', '80 GB', '85899345920' -> bytes (GiB and G are powers of 2, GB of 10)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match[2].upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as an amount of memory (e.g. 80GiB, 141GB)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _fp8_bytes(shape: tuple[int, ...], block: tuple[int, int]) -> int:
    """FP8 matrices (leading dims stacked): a byte each plus a float32 factor per block."""
    *lead, rows, cols = shape
    return math.prod(shape) + math.prod(lead) * math.prod(expected_scale_shape((rows, cols), block)) * 4


def _gate_up_fp8_bytes(shape: tuple[int, ...], block: tuple[int, int]) -> int:
    """Stacked gate|up experts: the gate and up halves have their own scale grids (checkpoints scale w1 and w3
    apart)."""
    experts, rows, cols = shape
    return 2 * _fp8_bytes((experts, rows // 2, cols), block)


def tensor_bytes(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, quantization: str | None, block: tuple[int, int]
) -> int:
    """Bytes the engine holds for the model tensor ``name`` of ``shape`` (one rank's shape when sharded)."""
    numel = math.prod(shape)
    if name.endswith(FP32_PARAMETER_SUFFIXES):
        return numel * 4
    attention = _ATTENTION_WEIGHT.match(name) is not None
    expert = _EXPERT_WEIGHT.match(name)
    if quantization == "fp8" and (attention or expert):
        if expert and expert[1] == "gate_up_proj":
            return _gate_up_fp8_bytes(shape, block)
        return _fp8_bytes(shape, block)
    if (quantization == "int8" and (attention or expert)) or (quantization == "experts_int8" and expert):
        rows = numel // shape[-1]
        return numel + rows * kernel_dtype(dtype).itemsize
    return numel * dtype.itemsize


def rank_weight_bytes(
    config: MiniMaxConfig, group: ParallelGroup, dtype: torch.dtype, quantization: str | None = None
) -> int:
    """Bytes of weights that rank ``group.rank`` holds."""
    with torch.device("meta"):
        model = MiniMaxForCausalLM(config)
    shard_model(model, group)
    block = block_size_from(config.quantization_config)
    total = 0
    for name, param in model.named_parameters():  # a tied embedding is listed once
        total += tensor_bytes(name, tuple(param.shape), dtype, quantization, block)
    for name, buffer in model.named_buffers():
        total += tensor_bytes(name, tuple(buffer.shape), dtype, quantization, block)
    return total


@dataclass(frozen=True)
class MemoryPlan:
    tensor_parallel_size: int
    expert_parallel: bool
    quantization: str | None
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    weight_bytes: int  # per rank (the largest rank's)
    kv_bytes_per_token: int  # per rank
    state_bytes_per_sequence: int  # per rank
    device_bytes: int
    utilization: float
    max_model_len: int
    block_size: int

    @property
    def usable_bytes(self) -> int:
        return int(self.device_bytes * self.utilization)

    @property
    def cache_bytes(self) -> int:
        return self.usable_bytes - self.weight_bytes

    @property
    def bytes_per_sequence(self) -> int:
        """One sequence of max_model_len tokens: its KV blocks (whole blocks) and its state slot."""
        blocks = math.ceil(self.max_model_len / self.block_size)
        return blocks * self.block_size * self.kv_bytes_per_token + self.state_bytes_per_sequence

    @property
    def sequences(self) -> int:
        return max(0, self.cache_bytes // self.bytes_per_sequence)


def plan_memory(
    config: MiniMaxConfig,
    tensor_parallel_size: int = 1,
    expert_parallel: bool = False,
    quantization: str | None = None,
    dtype: torch.dtype | str | None = None,
    kv_cache_dtype: torch.dtype | str | None = None,
    device_memory: int | str = "80GiB",
    max_model_len: int | None = None,
    utilization: float = 0.9,
    block_size: int = 16,
) -> MemoryPlan:
    check_quantization(quantization)
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype) or torch.bfloat16
    kv_dtype = parse_dtype(kv_cache_dtype) or dtype
    size = tensor_parallel_size
    groups = [ParallelGroup(rank, size, expert_parallel) for rank in range(size)]
    weights = max(rank_weight_bytes(config, group, dtype, quantization) for group in groups)
    local = local_cache_config(config, size)
    return MemoryPlan(
        tensor_parallel_size=size,
        expert_parallel=expert_parallel,
        quantization=quantization,
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
        weight_bytes=weights,
        kv_bytes_per_token=CacheLayout.bytes_per_block(local, 1, kv_dtype),
        state_bytes_per_sequence=CacheLayout.bytes_per_slot(local),
        device_bytes=parse_memory(device_memory) if isinstance(device_memory, str) else int(device_memory),
        utilization=utilization,
        max_model_len=max_model_len or config.max_position_embeddings,
        block_size=block_size,
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def format_plan(name: str, plan: MemoryPlan) -> str:
    moe = "experts split across ranks" if plan.expert_parallel else "every expert split across ranks"
    rows = [
        ("model", f"{name}, {plan.dtype}".replace("torch.", "")),
        ("parallelism", f"tensor parallel {plan.tensor_parallel_size}, {moe}"),
        ("quantization", plan.quantization or "none"),
        ("weights per rank", _size(plan.weight_bytes)),
        ("KV cache per token", _size(plan.kv_bytes_per_token) + f" per rank ({str(plan.kv_cache_dtype)[6:]})"),
        ("state per sequence", _size(plan.state_bytes_per_sequence) + " per rank (lightning, float32)"),
        ("device memory", f"{_size(plan.device_bytes)} x {plan.utilization:g} usable"),
        ("left for the cache", _size(plan.cache_bytes) + " per rank"),
        (f"one {plan.max_model_len:,}-token sequence", _size(plan.bytes_per_sequence) + " per rank"),
        ("sequences that fit", f"{plan.sequences:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if plan.cache_bytes < 0:
        lines.append("the weights alone do not fit: raise --tensor-parallel-size or quantise")
    return "\n".join(lines)
