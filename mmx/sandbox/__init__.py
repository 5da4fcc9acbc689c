"""Running untrusted code: model-written programs for code rewards, and the agent's shell and Python tools.

Every run is a subprocess in its own session with a wall-clock timeout (the whole process tree is killed), limits
on memory, CPU time and file size, a minimal environment, and a work directory (a fresh temporary one unless the
caller gives one). Where the kernel allows (:func:`isolation_available`), it also gets a network namespace with no
usable interface and a mount namespace where everything but the work directory is read-only. Python code runs
under an audit hook as well (:mod:`mmx.sandbox.guard`) that refuses sockets, subprocesses, ctypes and writes
outside the work directory, so those guarantees hold for Python even without namespaces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from mmx.sandbox.isolation import enter_namespaces, limit_resources, probe

GUARD = os.path.join(os.path.dirname(__file__), "guard.py")


@dataclass
class Limits:
    timeout: float = 10.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    file_mb: int = 64  # largest file the code may write
    max_output: int = 64_000  # characters of stdout / stderr kept


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolated: bool  # whether kernel namespaces were in force

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def summary(self) -> str:
        """A short description of how the run ended (for tool results and logs)."""
        if self.timed_out:
            return "timed out"
        if self.returncode is not None and self.returncode < 0:
            name = (
                signal.Signals(-self.returncode).name if -self.returncode in signal.Signals._value2member_map_ else ""
            )
            return f"killed by signal {-self.returncode} {name}".strip()
        return f"exit code {self.returncode}"


def isolation_available() -> bool:
    return probe()


def _environment(workdir: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    return env


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters cut)"


def run_process(
    argv: list[str], workdir: str, limits: Limits, stdin: str | None = None, isolate: bool | None = None
) -> SandboxResult:
    """Run ``argv`` confined to ``workdir``. ``isolate`` None uses namespaces when they are available."""
    use_namespaces = isolation_available() if isolate is None else isolate

    def setup() -> None:  # in the child, between fork and exec
        os.setsid()
        if use_namespaces:
            enter_namespaces(workdir)
            os.chdir(workdir)  # the inherited cwd still points into the old, now read-only, mount of the directory
        limit_resources(limits.memory_mb, limits.timeout, limits.file_mb)

    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        env=_environment(workdir),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=setup,
        text=True,
        errors="replace",
    )
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, err = proc.communicate()
    return SandboxResult(
        proc.returncode,
        _truncate(out, limits.max_output),
        _truncate(err, limits.max_output),
        timed_out,
        time.perf_counter() - started,
        use_namespaces,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def work_directory(workdir: str | None):
    """The caller's directory, or a temporary one removed afterwards."""
    if workdir is not None:
        yield os.path.realpath(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="mmx-sandbox-") as tmp:
        yield os.path.realpath(tmp)


def run_python(
    code: str,
    *,
    workdir: str | None = None,
    files: dict[str, str] | None = None,
    stdin: str | None = None,
    limits: Limits | None = None,
    isolate: bool | None = None,
) -> SandboxResult:
    """Run Python ``code`` (plus helper ``files``) in the sandbox. In a temporary directory the code is main.py;
    in a caller's directory it is a hidden file that is removed afterwards, so nothing of the caller's is touched."""
    limits = limits or Limits()
    script = "main.py" if workdir is None else f".mmx-run-{uuid.uuid4().hex[:12]}.py"
    with work_directory(workdir) as wd:
        for name, text in {**(files or {}), script: code}.items():
            path = os.path.realpath(os.path.join(wd, name))
            if not path.startswith(wd + os.sep):
                raise ValueError(f"sandbox file {name!r} is outside the work directory")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        argv = [sys.executable, "-I", "-B", GUARD, wd, os.path.join(wd, script)]
        try:
            return run_process(argv, wd, limits, stdin, isolate)
        finally:
            if workdir is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(wd, script))


def run_command(command: str, workdir: str, limits: Limits | None = None, isolate: bool | None = None) -> SandboxResult:
    """Run a shell command in ``workdir``. Without namespaces nothing stops a shell command from writing elsewhere,
    so callers that must guarantee confinement check :func:`isolation_available` first."""
    return run_process(["/bin/sh", "-c", command], os.path.realpath(workdir), limits or Limits(), None, isolate)


__all__ = ["Limits", "SandboxResult", "isolation_available", "run_command", "run_process", "run_python"]
