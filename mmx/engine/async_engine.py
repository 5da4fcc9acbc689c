"""Streaming for servers: the engine steps in a background thread, each request reads its outputs from an asyncio
queue. Requests enter and leave (abort, client gone) between steps, so the batch changes continuously.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mmx.engine.llm_engine import LLMEngine
from mmx.engine.outputs import RequestOutput
from mmx.engine.sampling_params import SamplingParams
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class EngineStats:
    requests_total: int = 0
    requests_failed: int = 0
    requests_aborted: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: int = 0
    running: int = 0
    waiting: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per finished request (most recent 1000)


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, float]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="mmx-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changes it; the last one has ``finished``.
        Leaving the loop early (client disconnect, cancellation) aborts the request and frees its cache."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream, time.perf_counter())
        self._commands.put(("add", request_id, prompt, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None, None))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, stream, _ = entry
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _handle_commands(self) -> None:
        while True:
            try:
                kind, request_id, prompt, params = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(request_id, prompt, params)
                    self.stats.requests_total += 1
                    self.stats.prompt_tokens_total += len(self.engine.requests[request_id].prompt_ids)
                except Exception as e:  # a bad request fails alone
                    self.stats.requests_failed += 1
                    self._deliver(request_id, e)
            elif self.engine.abort_request(request_id) is not None:
                self.stats.requests_aborted += 1
                self._streams.pop(request_id, None)

    def _loop(self) -> None:
        while not self._stop:
            self._handle_commands()
            self.stats.running = len(self.engine.scheduler.running)
            self.stats.waiting = len(self.engine.scheduler.waiting)
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # keep serving: fail the requests in flight, not the process
                logger.exception("engine step failed; aborting the %d requests in flight", len(self.engine.requests))
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    self.stats.requests_failed += 1
                    self._deliver(request_id, RuntimeError(f"engine step failed: {e}"))
                continue
            self.stats.steps_total += 1
            self.stats.running = len(self.engine.scheduler.running)
            self.stats.waiting = len(self.engine.scheduler.waiting)
            for out in outputs:
                self.stats.generation_tokens_total += sum(1 for _ in out.outputs)
                if out.finished:
                    entry = self._streams.get(out.request_id)
                    if entry is not None:
                        self.stats.latencies = [*self.stats.latencies[-999:], time.perf_counter() - entry[2]]
                self._deliver(out.request_id, out)
