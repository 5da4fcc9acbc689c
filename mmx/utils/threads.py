"""Keeping torch's CPU parallelism on one thread.

torch's CPU wheels parallelise ops with GNU OpenMP, which gives every thread that starts a parallel region a pool
of worker threads of its own, kept until that thread exits. Once two threads hold pools, the process has more
OpenMP threads than cores and libgomp stops letting its workers spin between regions: each parallel op then pays
for waking them (measured on 2 cores: an add of 200K floats, 16 us on the first thread to use OpenMP, 65 us on a
second one; a decode step of the 16M M2 through the engine, 12.5 ms against 29 ms). A server that loads its model
on the main thread and steps the engine on another (mmx.engine.AsyncLLM) would be in that case, so it loads on a
thread that exits first, leaving the engine's thread the only one with a pool.
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
