"""Starting a tensor-parallel engine: spawn the workers (or find them, under torchrun) and load rank 0's shard."""

from __future__ import annotations

import os

import torch.distributed as dist

from mmx.engine.args import EngineArgs
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.parallel.group import ParallelGroup, init_group
from mmx.parallel.loading import load_shard
from mmx.parallel.workers import Workers, exit_now, run_worker


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several that torchrun started, else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and "RANK" in os.environ and "MASTER_PORT" in os.environ:
        return int(os.environ["RANK"]), size
    return None


def load_parallel(directory: str, args: EngineArgs) -> tuple[MiniMaxForCausalLM, Workers]:
    """Rank 0's shard and the handle on ranks 1..N-1. Under torchrun, ranks other than 0 serve the driver here and
    exit when it stops (the program's code after the engine is built runs on rank 0 only)."""
    launched = torchrun_rank()
    if launched is None:
        workers = Workers.spawn(directory, args)
    else:
        rank, size = launched
        if size != args.tensor_parallel_size:
            raise ValueError(
                f"torchrun started {size} processes but tensor_parallel_size is {args.tensor_parallel_size}"
            )
        init_group(rank, size, None, args.device)
        group = ParallelGroup(rank, size, args.enable_expert_parallel)
        if rank != 0:
            try:
                run_worker(group, directory, args)
            finally:
                dist.destroy_process_group()
            exit_now(0)
        workers = Workers(group, [])
    try:
        model = load_shard(
            directory,
            workers.group,
            args.dtype,
            args.device,
            args.allow_non_finite_weights,
            keep_fp8=args.quantization == "fp8",
        )
    except BaseException:
        workers.close()
        raise
    return model, workers
