"""Whether a submission passes its tests, decided so that the submission cannot forge the answer.

The submission and the tests run in :mod:`mmx.sandbox.harness` inside bubblewrap, without /proc. A fresh random
nonce goes in through an unlinked file the harness reads and closes before the submission runs, and comes back
through a pipe only from the statement after the last test; a pass is exactly that nonce on that pipe, whatever the
exit status or the output say. See the harness for what that does and does not rule out.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass

from mmx.sandbox.limits import Limits, SandboxResult
from mmx.sandbox.process import run_process

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "harness.py")
GUARD = os.path.join(HERE, "guard.py")


@dataclass
class TestVerdict:
    passed: bool
    result: SandboxResult

    def summary(self) -> str:
        if self.passed:
            return "passed"
        if self.result.timed_out or self.result.memory_exceeded:
            return self.result.summary()
        lines = [line.strip() for line in self.result.stderr.splitlines() if line.strip()]
        reason = lines[-1][:200] if lines else self.result.summary()
        return f"failed: {reason}"


def run_tests(
    solution: str, tests: str, limits: Limits | None = None, *, allow_unsandboxed: bool = False
) -> TestVerdict:
    """Run ``solution`` then ``tests`` (Python asserts) in the sandbox; passed only if every test ran and passed."""
    try:
        compile(tests, "tests.py", "exec")
    except SyntaxError as e:
        raise ValueError(f"the tests do not compile: {e}") from e
    limits = limits or Limits(timeout=10, memory_mb=512)
    nonce = secrets.token_hex(32).encode()
    solution_bytes = solution.encode("utf-8", errors="surrogateescape")
    verdict_read, verdict_write = os.pipe()
    try:
        with tempfile.TemporaryDirectory(prefix="mmx-judge-") as workdir, tempfile.TemporaryFile() as job:
            job.write(nonce + b"\n" + str(len(solution_bytes)).encode() + b"\n" + solution_bytes + tests.encode())
            job.flush()
            job.seek(0)
            argv = [sys.executable, "-I", "-B", "-u", HARNESS, GUARD, str(job.fileno()), str(verdict_write), workdir]
            result = run_process(
                argv,
                workdir,
                limits,
                allow_unsandboxed=allow_unsandboxed,
                readonly=(HARNESS, GUARD),
                proc=False,
                pass_fds=(job.fileno(), verdict_write),
            )
        os.close(verdict_write)
        verdict_write = -1
        received = _read_some(verdict_read, len(nonce) + 1)
    finally:
        os.close(verdict_read)
        if verdict_write >= 0:
            os.close(verdict_write)
    return TestVerdict(received == nonce, result)


def _read_some(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of what the harness wrote (every writer has exited, so this cannot block)."""
    data = b""
    with contextlib.suppress(BlockingIOError):
        os.set_blocking(fd, False)
        while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
            data += chunk
    return data
