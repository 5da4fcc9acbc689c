"""Streaming for servers: the engine steps in a background thread, each request reads its outputs (new token ids
per step) from an asyncio queue. Requests enter and leave (abort, client gone, a stop string found by the output
side) between steps, so the batch changes continuously.

A step's outputs reach each event loop in one hand-over (one wake-up of the loop's thread, not one per request),
and a reader that fell behind takes everything queued for it as one output (:func:`merge_outputs`): on a machine
whose cores the engine's threads already fill, the serving side's work per step is what slows the steps down.

On the CPU, load the model (and warm the engine up) on a thread that has ended before the engine thread starts
(:func:`mmx.utils.threads.in_passing_thread`, as `mmx serve` does): a model loaded on the main thread leaves it an
OpenMP pool, and with two pools every parallel op of the engine's steps runs 2-4x slower (see that module).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from mmx.engine.llm_engine import LLMEngine, RequestFailed
from mmx.engine.outputs import CompletionOutput, RequestOutput
from mmx.engine.sampling_params import RequestOutputKind, SamplingParams
from mmx.utils.logging import get_logger
from mmx.utils.memory import release_free_memory

logger = get_logger(__name__)


@dataclass
class EngineStats:
    requests_failed: int = 0
    requests_aborted: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: int = 0
    running: int = 0
    waiting: int = 0
    prefix_cache_enabled: bool = False
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # of those, tokens whose cache was reused
    prefix_cache_cached_blocks: int = 0  # unused KV blocks kept for their contents
    prefix_cache_snapshots: int = 0  # lightning-state snapshots held
    prefix_cache_snapshot_bytes: int = 0


def merge_outputs(earlier: RequestOutput, later: RequestOutput, delta: bool = False) -> RequestOutput:
    """One output standing for two consecutive ones of a request: the later one's state, with each sample's new
    tokens (and their log-probs) since the earlier one's predecessor; with ``delta`` (RequestOutputKind.DELTA),
    ``token_ids`` and ``logprobs`` hold new ones only and are joined the same way."""
    before = {sample.index: sample for sample in earlier.outputs}
    samples: list[CompletionOutput] = []
    for sample in later.outputs:
        old = before.pop(sample.index, None)
        if old is not None:
            joined = {
                "new_token_ids": old.new_token_ids + sample.new_token_ids,
                "new_logprobs": _joined(old.new_logprobs, sample.new_logprobs),
            }
            if delta:
                joined.update(token_ids=joined["new_token_ids"], logprobs=joined["new_logprobs"])
            sample = replace(sample, **joined)
        samples.append(sample)
    samples += before.values()  # a sample the later output does not carry keeps its last report
    samples.sort(key=lambda sample: sample.index)
    return replace(later, outputs=samples)


def _joined(first: list | None, second: list | None) -> list | None:
    return None if first is None and second is None else [*(first or ()), *(second or ())]


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = EngineStats()
        self._trimmed_at = 0  # steps_total when the heap was last trimmed
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # a step's deliveries per event loop, handed over together when the step is done
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="mmx-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, group: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, one after every step that changes it; the last one has ``finished``. A request
        the engine refuses raises :class:`~mmx.engine.llm_engine.InvalidRequest` here, before anything streams.
        Leaving the loop early (client disconnect, cancellation) aborts the request and frees its cache."""
        try:
            prompt_ids = self.engine.validate_request(prompt_ids, params)
        except Exception:
            self.stats.requests_failed += 1
            raise
        return self._outputs(prompt_ids, params, request_id or f"req-{next(self._ids)}", group)

    async def _outputs(self, prompt_ids: list[int], params: SamplingParams, request_id: str, group: str | None):
        delta = params.output_kind == RequestOutputKind.DELTA
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, prompt_ids, params, group))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                while not isinstance(item, BaseException) and not item.finished and not stream.empty():
                    later = stream.get_nowait()  # fell behind: the queued outputs as one
                    item = later if isinstance(later, BaseException) else merge_outputs(item, later, delta)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def finish_sequence(self, request_id: str, index: int, stop_reason: str | int | None = None) -> None:
        """End one sample (a stop string was found in its text); its request goes on while others run."""
        self._commands.put(("finish", request_id, index, stop_reason))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread
    def _prefix_cache_stats(self) -> None:
        prefix, s = self.engine.prefix_cache, self.stats
        if prefix is None:
            return
        s.prefix_cache_enabled = True
        s.prefix_cache_queried_tokens = prefix.stats.queried_tokens
        s.prefix_cache_hit_tokens = prefix.stats.hit_tokens
        s.prefix_cache_cached_blocks = self.engine.cache.num_cached_blocks
        s.prefix_cache_snapshots = prefix.num_snapshots_held
        s.prefix_cache_snapshot_bytes = prefix.snapshot_bytes

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, stream = entry
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        self._outbox.setdefault(loop, []).append((stream, item))

    def _hand_over(self) -> None:
        """Pass the deliveries gathered since the last hand-over to their event loops, one call per loop."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)

    def _handle_commands(self) -> None:
        while True:
            try:
                kind, request_id, *rest = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt_ids, params, group = rest
                try:
                    self.engine.add_request(request_id, prompt_ids, params, group)
                    self.stats.prompt_tokens_total += len(prompt_ids)
                except Exception as e:  # a bad request fails alone
                    self.stats.requests_failed += 1
                    self._deliver(request_id, e)
            elif kind == "finish":
                final = self.engine.finish_sequence(request_id, *rest)
                if final is not None:
                    self._deliver(request_id, final)
            elif self.engine.abort_request(request_id) is not None:
                self.stats.requests_aborted += 1
                self._streams.pop(request_id, None)

    def _loop(self) -> None:
        while not self._stop:
            try:
                self._run_once()
                self._hand_over()
            except Exception as e:  # keep serving: fail the requests in flight, never end the engine thread
                logger.exception("engine step failed; aborting the %d requests in flight", len(self.engine.requests))
                for request_id in list(self.engine.requests):
                    try:
                        self.engine.abort_request(request_id)
                    except Exception:
                        logger.exception("could not abort request %s cleanly", request_id)
                        self.engine.requests.pop(request_id, None)
                    self.stats.requests_failed += 1
                    self._deliver(request_id, RuntimeError(f"engine step failed: {e}"))
                self._hand_over()

    def _run_once(self) -> None:
        self._handle_commands()
        self.stats.running = len(self.engine.scheduler.running)
        self.stats.waiting = len(self.engine.scheduler.waiting)
        if not self.engine.has_unfinished_requests():
            self._hand_over()  # refusals of the requests just added, before the wait
            if self._trimmed_at != self.stats.steps_total:
                # Idle after work: give the heap's free memory back (the activations of the last prefills, tens of
                # MB that the raised trim threshold keeps for reuse), so that resident memory follows what is in
                # use. 4-8 ms on the bench models; the next burst faults its pages back in (docs/benchmarks.md,
                # "Resident memory: no sympy, a trimmed heap when idle").
                self._trimmed_at = self.stats.steps_total
                release_free_memory(collect=False)
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        outputs = self.engine.step()
        self.stats.steps_total += 1
        self.stats.running = len(self.engine.scheduler.running)
        self.stats.waiting = len(self.engine.scheduler.waiting)
        self._prefix_cache_stats()
        for out in outputs:
            self.stats.generation_tokens_total += sum(len(sample.new_token_ids) for sample in out.outputs)
            if out.error is not None:
                self.stats.requests_failed += 1
                self._deliver(out.request_id, RequestFailed(f"the engine failed this request: {out.error}"))
            else:
                self._deliver(out.request_id, out)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
