"""The driver and its workers: one engine, N processes each holding a shard of the model.

Rank 0 is the driver: it runs the whole engine (scheduler, cache bookkeeping, sampling) on its own shard. Ranks
1..N-1 are workers: they hold their shards and a cache of the same layout for their heads, and wait for messages
(broadcast by the driver through torch.distributed):

* ``cache``: build the cache (the driver's layout, KV dtype, prefix-cache snapshot pools);
* ``step``: the cache copies the driver's bookkeeping made since the last step (prefix-cache hits, snapshots,
  copy-on-write; :class:`~mmx.engine.cache.CacheJournal`), then the step's sequences as plain data; every rank runs
  the same forward, meeting in its collectives;
* ``logits``: the LM head on these hidden rows (the vocabulary is split: every rank takes part in the gather);
* ``stop``.

The workers are spawned by mmx (``tensor_parallel_size`` > 1), or are the other ranks of a ``torchrun`` launch.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmx.engine.args import EngineArgs
from mmx.engine.cache import CacheLayout, HybridCache
from mmx.engine.paged_batch import PagedBatch
from mmx.engine.prefix_cache import PrefixCache
from mmx.engine.sequence import Sequence
from mmx.model.layout import use_decode_layout
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.quantization import quantize_model
from mmx.parallel.group import ParallelGroup, free_port, init_group
from mmx.parallel.loading import load_shard
from mmx.parallel.sharding import local_config
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class FedSequence:
    """What a worker needs of one sequence fed in a step (the fields :class:`PagedBatch` reads)."""

    block_table: list[int]
    slot: int | None
    num_computed_tokens: int
    fed: list[int]  # the token ids fed this step
    num_tokens: int
    samples_at_end: bool

    @classmethod
    def of(cls, seq: Sequence, num_fed: int) -> FedSequence:
        start = seq.num_computed_tokens
        return cls(
            list(seq.block_table), seq.slot, start, seq.tokens(start, start + num_fed), seq.num_tokens,
            seq.samples_at_end,
        )  # fmt: skip

    def tokens(self, start: int, end: int) -> list[int]:
        return self.fed[start - self.num_computed_tokens : end - self.num_computed_tokens]


def _send(message: Any) -> None:
    dist.broadcast_object_list([message], src=0)


def _receive() -> Any:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _threads_per_rank(size: int) -> int:
    return max(1, (os.cpu_count() or 1) // size)


class Workers:
    """The driver's handle on its workers."""

    def __init__(self, group: ParallelGroup, processes: list[subprocess.Popen], threads: int | None = None):
        self.group = group
        self.processes = processes
        self.closed = False
        self._threads = threads  # the driver's torch threads before they were shared out, restored at close
        atexit.register(self.close)

    @classmethod
    def spawn(cls, path: str, args: EngineArgs) -> Workers:
        """Start ranks 1..N-1 as child processes and join the group as rank 0. Each is a fresh interpreter
        (``python -m mmx.parallel.workers``): no fork of a process that holds threads, and no re-import of the
        caller's main module."""
        size = args.tensor_parallel_size
        port = free_port()
        settings = json.dumps(dataclasses.asdict(args))
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "mmx.parallel.workers", str(rank), str(size), str(port), path, settings]
            )
            for rank in range(1, size)
        ]
        try:
            init_group(0, size, port, args.device)
        except BaseException:
            for process in processes:
                process.kill()
            raise
        threads = torch.get_num_threads()
        torch.set_num_threads(_threads_per_rank(size))  # the ranks share the machine's cores
        return cls(ParallelGroup(0, size, args.enable_expert_parallel), processes, threads)

    def build_cache(self, layout: CacheLayout, kv_dtype: torch.dtype, prefix_caching: bool) -> None:
        _send(("cache", layout, str(kv_dtype).replace("torch.", ""), prefix_caching))

    def step(self, journal: list, decode: list[Sequence], prefill: list[tuple[Sequence, int]], captures) -> None:
        fed_decode = [FedSequence.of(seq, 1) for seq in decode]
        fed_prefill = [(FedSequence.of(seq, n), n) for seq, n in prefill]
        _send(("step", journal, fed_decode, fed_prefill, list(captures)))

    def logits(self, model: MiniMaxForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
        _send(("logits", hidden))
        return model.compute_logits(hidden)

    def close(self) -> None:
        """Stop the workers and leave the process group (a no-op the second time)."""
        if self.closed:
            return
        self.closed = True
        try:
            if all(p.poll() is None for p in self.processes):
                _send(("stop",))
        finally:
            for process in self.processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            if self._threads is not None:
                torch.set_num_threads(self._threads)


# ---------------------------------------------------------------------------------------------------- worker side
def _die_with_parent() -> None:
    """End this worker when the driver process goes, however it goes: a daemon thread watches for this process being
    handed to another parent. (PR_SET_PDEATHSIG would fire when the driver's *thread* that started the worker ends,
    and the server starts its workers on a thread that ends once the model is loaded.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        exit_now(1)

    threading.Thread(target=watch, name="mmx-parent-watch", daemon=True).start()


def _worker_process(rank: int, size: int, port: int, path: str, args: EngineArgs) -> None:
    try:
        init_group(rank, size, port, args.device)
        run_worker(ParallelGroup(rank, size, args.enable_expert_parallel), path, args)
    except Exception:
        traceback.print_exc()
        exit_now(1)  # the driver's next collective fails on the closed connection instead of waiting
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_rank_model(group: ParallelGroup, path: str, args: EngineArgs) -> MiniMaxForCausalLM:
    """This rank's shard, prepared as the engine prepares the driver's (quantised, eager layout)."""
    device = _rank_device(args.device, group.rank)
    model = load_shard(
        path, group, args.dtype, device, args.allow_non_finite_weights, keep_fp8=args.quantization == "fp8"
    )
    quantize_model(model, args.quantization)
    use_decode_layout(model)  # tensor-parallel steps run eagerly
    return model


def _rank_device(device: str, rank: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", rank)
    return device


def run_worker(group: ParallelGroup, path: str, args: EngineArgs) -> None:
    """Load this rank's shard, then follow the driver's messages until it says stop."""
    torch.set_num_threads(_threads_per_rank(group.size))
    model = load_rank_model(group, path, args)
    device = model.device
    cache = prefix = None
    with torch.inference_mode():
        while True:
            message = _receive()
            kind = message[0]
            if kind == "stop":
                return
            if kind == "cache":
                _, layout, kv_dtype, prefix_caching = message
                cache = HybridCache(local_config(model), layout, getattr(torch, kv_dtype), device)
                prefix = PrefixCache(cache) if prefix_caching else None
            elif kind == "step":
                _, journal, decode, prefill, captures = message
                cache.journal.replay(journal, cache, prefix)
                batch = PagedBatch(cache, decode, prefill, device, captures, prefix.states if prefix else None)
                ids = torch.tensor([batch.token_ids], dtype=torch.long, device=device)
                model.model(ids, batch.positions_tensor, cache=batch)
            elif kind == "logits":
                model.compute_logits(message[1].to(device))
            else:
                raise RuntimeError(f"unknown message from the driver: {kind!r}")


def main(argv: list[str] | None = None) -> None:
    """A worker that :meth:`Workers.spawn` started: rank, size, port, checkpoint path, engine args (JSON)."""
    _die_with_parent()
    p = argparse.ArgumentParser(prog="python -m mmx.parallel.workers")
    p.add_argument("rank", type=int)
    p.add_argument("size", type=int)
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("args", help="EngineArgs as JSON")
    ns = p.parse_args(argv)
    _worker_process(ns.rank, ns.size, ns.port, ns.path, EngineArgs(**json.loads(ns.args)))
    exit_now(0)


def exit_now(code: int) -> None:
    """End a worker without running C++ static destructors: torch's (gloo's) abort the process on the way out when a
    communication thread outlives its group, which would print a crash after a clean stop."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
