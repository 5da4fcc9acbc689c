"""Keeping torch's CPU parallelism on one thread.

torch's CPU wheels parallelise ops with GNU OpenMP, which gives every thread that starts a parallel region a pool
of worker threads of its own, kept until that thread exits. Once two threads hold pools, each parallel op on the
second one costs several times more (bench/cpu_threads.py, 2 cores: an add of 200K floats, 13 us on the first
thread to use OpenMP and 44 us on a second; an engine decode step of the tiny M2 at batch 16, 11.9 ms and 26.1 ms).
Where inside libgomp the time goes was not pinned down: GOMP_SPINCOUNT and OMP_WAIT_POLICY did not change it. A
server that loads its model on the main thread and steps the engine on another (mmx.engine.AsyncLLM) would be in
that case, so it loads on a thread that exits first, leaving the engine's thread the only one with a pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T], name: str = "mmx-load") -> T:
    """``fn()`` run on a new thread that ends when it returns (its OpenMP pool goes with it); its result, or its
    exception re-raised here."""
    result: dict[str, T | BaseException] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller
            result["error"] = e

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[return-value]
