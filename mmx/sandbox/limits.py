"""What a sandboxed run may use, and how it ended."""

from __future__ import annotations

import signal
from dataclasses import dataclass


class SandboxUnavailable(RuntimeError):
    """Untrusted code was about to run where it cannot be confined."""


@dataclass
class Limits:
    timeout: float = 10.0  # wall-clock seconds of the whole run
    memory_mb: int = 1024  # address space of each process
    total_memory_mb: int | None = None  # memory of the whole run (all processes, /tmp included); None: memory_mb
    file_mb: int = 64  # largest file the code may write
    processes: int = 64  # processes and threads alive at once
    cpu_seconds: float | None = None  # CPU time of each process; None: the timeout, rounded up
    max_output: int = 64_000  # bytes of stdout / stderr kept

    def __post_init__(self) -> None:
        for name in ("timeout", "memory_mb", "file_mb", "processes", "max_output"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")
        for name in ("total_memory_mb", "cpu_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"Limits.{name} must be positive or None, got {value}")

    @property
    def total_memory_bytes(self) -> int:
        return (self.total_memory_mb or self.memory_mb) * 2**20

    @property
    def cpu_limit(self) -> int:
        return int(self.cpu_seconds if self.cpu_seconds is not None else self.timeout) + 1


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    sandboxed: bool  # whether it ran inside bubblewrap (False only when the caller allowed running unsandboxed)
    memory_exceeded: bool = False  # the run's memory limit was hit and the kernel killed a process of it

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def summary(self) -> str:
        """A short description of how the run ended (for tool results and logs)."""
        if self.timed_out:
            return "timed out"
        if self.memory_exceeded:
            return "killed: out of memory (the run's memory limit)"
        code = self.returncode
        if code is not None and code < 0:
            return f"killed by signal {-code} {_signal_name(-code)}".strip()
        if self.sandboxed and code is not None and 128 < code <= 128 + 64 and _signal_name(code - 128):
            # bubblewrap reports a command killed by signal N as exit status 128 + N, as shells do
            return f"killed by signal {code - 128} {_signal_name(code - 128)}"
        return f"exit code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return ""
