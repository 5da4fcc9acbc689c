"""The process group a sharded model computes in: its rank, its size, and the few collectives the model needs.

Tensor parallelism here is one group of ``size`` processes (one per device), every rank holding a slice of every
sharded weight. The collectives are torch.distributed's: gloo on the CPU, NCCL on CUDA devices.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits in a collective before it gives up: a rank that died leaves the others waiting otherwise
# (a closed socket usually fails them at once; this bounds the rest). Long enough for a rank still loading its
# shard of a large checkpoint while the driver waits to send the first step.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long the ranks mmx spawned have to meet: a fresh interpreter importing torch, not a model load.
RENDEZVOUS_TIMEOUT = timedelta(minutes=2)


@dataclass(frozen=True)
class ParallelGroup:
    rank: int
    size: int
    expert_parallel: bool = False  # MoE experts split across ranks (else each expert split tensor-parallel)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.size})")

    def span(self, total: int) -> tuple[int, int]:
        """This rank's [start, stop) of ``total`` items split evenly (``total`` a multiple of the size)."""
        each = total // self.size
        return self.rank * each, (self.rank + 1) * each

    def padded_span(self, total: int) -> tuple[int, int]:
        """This rank's [start, stop) when ``total`` need not divide: ceil(total / size) each, the last ranks short."""
        each = -(-total // self.size)
        return min(total, self.rank * each), min(total, (self.rank + 1) * each)


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, port: int | None, device: torch.device | str) -> None:
    """Join the default process group: on 127.0.0.1:``port`` when given (processes mmx spawned), else from the
    environment torchrun sets (MASTER_ADDR, MASTER_PORT)."""
    if dist.is_initialized():
        if dist.get_world_size() != size or dist.get_rank() != rank:
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"not rank {rank} of {size}"
            )
        return
    backend = backend_for(device)
    if port is None:
        address = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ['MASTER_PORT']}"
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
        return
    # a store of our own, so that a spawned rank that never starts fails the others in minutes, not the half hour
    # that collectives may wait
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=RENDEZVOUS_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place; returns it."""
    dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """The ranks' ``x`` concatenated along the last dimension (every rank's ``x`` has the same shape)."""
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
