"""Helpers shared by test files that run a real server as a subprocess on 127.0.0.1. Plain functions rather than
fixtures, so each test file picks its own fixture scope; tests/conftest.py holds the fixtures several files share."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for a server started right after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], port: int) -> Iterator[str]:
    """Run ``command`` (a server listening on ``port``) until its /health answers 200, yield its base URL, and stop it
    afterwards; a server that exits or is not up within 90 s raises with its output."""
    with running_process(command, port) as (url, _):
        yield url


@contextlib.contextmanager
def running_process(command: list[str], port: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """:func:`running`, yielding the process too (to signal it)."""
    env = {**os.environ, "MMX_LOG_LEVEL": "WARNING", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{proc.stdout.read()}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve(
    checkpoint: str, *extra: str, max_model_len: int = 512, cache_gb: float = 0.05
) -> contextlib.AbstractContextManager[str]:
    """`mmx serve` of ``checkpoint`` with small limits (``extra``: more flags); use as ``with serve(...) as url``."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mmx.cli.main",
        "serve",
        checkpoint,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--cache-memory-gb",
        str(cache_gb),
        "--max-body-mb",
        "0.25",
        *extra,
    ]
    return running(command, port)
