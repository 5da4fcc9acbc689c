"""``mmx plan MODEL --tensor-parallel-size N ...``: per-rank memory of a sharded model, from its config alone."""

from __future__ import annotations

import argparse
import os

from mmx.config import MiniMaxConfig
from mmx.engine.args import KV_CACHE_DTYPES, QUANTIZATION_METHODS
from mmx.presets import PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="weight and cache memory per device of a model split over devices")
    p.add_argument("model", help=f"checkpoint directory or preset ({', '.join(PRESETS)})")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--quantization", choices=QUANTIZATION_METHODS, default=None)
    p.add_argument("--dtype", default=None, help="model dtype (default: the config's, else bfloat16)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of each device, e.g. 80GiB, 141GB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of it the engine may use")
    p.add_argument("--max-model-len", type=int, default=None, help="tokens per sequence (default: the model's)")
    p.add_argument("--block-size", type=int, default=16)


def run(args: argparse.Namespace) -> int:
    from mmx.parallel.plan import format_plan, plan_memory

    if os.path.isdir(args.model):
        config = MiniMaxConfig.from_pretrained(args.model)
    else:
        config = MiniMaxConfig.from_preset(args.model)
    plan = plan_memory(
        config,
        args.tensor_parallel_size,
        args.enable_expert_parallel,
        args.quantization,
        args.dtype,
        None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
        args.gpu_memory,
        args.max_model_len,
        args.gpu_memory_utilization,
        args.block_size,
    )
    print(format_plan(args.model, plan))
    return 0
