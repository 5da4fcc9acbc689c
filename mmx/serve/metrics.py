"""Prometheus text metrics for /metrics: requests, tokens, latency, time to first token, queue."""

from __future__ import annotations

import threading
from collections import defaultdict, deque


def _quantiles(values: deque[float], qs=(0.5, 0.9, 0.99)) -> list[tuple[float, float]]:
    data = sorted(values)
    if not data:
        return []
    return [(q, data[min(len(data) - 1, int(q * len(data)))]) for q in qs]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started: dict[str, int] = defaultdict(int)
        self.finished: dict[str, int] = defaultdict(int)
        self.failed: dict[str, int] = defaultdict(int)
        self.http: dict[int, int] = defaultdict(int)
        self.latency: deque[float] = deque(maxlen=2000)
        self.ttft: deque[float] = deque(maxlen=2000)

    def request_started(self, endpoint: str) -> None:
        with self._lock:
            self.started[endpoint] += 1

    def request_finished(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.finished[endpoint] += 1
            self.latency.append(seconds)

    def request_failed(self, endpoint: str) -> None:
        with self._lock:
            self.failed[endpoint] += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.append(seconds)

    def http_status(self, status: int) -> None:
        with self._lock:
            self.http[status] += 1

    def render(self, engine_stats) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        with self._lock:
            endpoints = sorted(set(self.started) | set(self.finished) | set(self.failed))
            metric(
                "mmx_requests_started_total",
                "counter",
                "API requests accepted, by endpoint",
                [(f'{{endpoint="{e}"}}', self.started[e]) for e in endpoints],
            )
            metric(
                "mmx_requests_finished_total",
                "counter",
                "API requests completed, by endpoint",
                [(f'{{endpoint="{e}"}}', self.finished[e]) for e in endpoints],
            )
            metric(
                "mmx_requests_failed_total",
                "counter",
                "API requests that failed after starting",
                [(f'{{endpoint="{e}"}}', self.failed[e]) for e in endpoints],
            )
            metric(
                "mmx_http_responses_total",
                "counter",
                "HTTP responses by status code",
                [(f'{{code="{c}"}}', n) for c, n in sorted(self.http.items())],
            )
            latency = _quantiles(self.latency)
            metric(
                "mmx_request_latency_seconds",
                "summary",
                "end-to-end request latency (recent requests)",
                [(f'{{quantile="{q}"}}', v) for q, v in latency]
                + [("_count", len(self.latency)), ("_sum", sum(self.latency))],
            )
            metric(
                "mmx_time_to_first_token_seconds",
                "summary",
                "time to the first streamed event",
                [(f'{{quantile="{q}"}}', v) for q, v in _quantiles(self.ttft)],
            )
        s = engine_stats
        metric("mmx_prompt_tokens_total", "counter", "prompt tokens admitted", [("", s.prompt_tokens_total)])
        metric("mmx_generation_tokens_total", "counter", "tokens generated", [("", s.generation_tokens_total)])
        metric("mmx_engine_steps_total", "counter", "engine forward steps", [("", s.steps_total)])
        metric("mmx_requests_running", "gauge", "sequences in the running batch", [("", s.running)])
        metric("mmx_requests_waiting", "gauge", "sequences waiting for the cache", [("", s.waiting)])
        metric(
            "mmx_engine_requests_aborted_total", "counter", "requests aborted (client gone)", [("", s.requests_aborted)]
        )
        if s.prefix_cache_enabled:
            for name, kind, help_text, value in (
                ("queries_total", "counter", "prompt tokens looked up", s.prefix_cache_queried_tokens),
                ("hits_total", "counter", "prompt tokens whose cache was reused", s.prefix_cache_hit_tokens),
                ("cached_blocks", "gauge", "unused KV blocks kept for their contents", s.prefix_cache_cached_blocks),
                ("snapshots", "gauge", "lightning-state snapshots held", s.prefix_cache_snapshots),
                ("snapshot_bytes", "gauge", "memory of the snapshots held", s.prefix_cache_snapshot_bytes),
            ):
                metric(f"mmx_prefix_cache_{name}", kind, help_text, [("", value)])
        return "\n".join(lines) + "\n"
