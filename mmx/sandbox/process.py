"""Starting one sandboxed process, feeding it, collecting its output within bounds, and ending it with everything it
started.

The process is started through a short chain of execs: ``/bin/sh`` writes its own pid into the run's cgroups (so
everything after it is counted from the first instruction), ``setpriv`` switches to another host user when asked,
``prlimit`` sets the rlimits, and ``bwrap`` builds the sandbox (:mod:`mmx.sandbox.bwrap`). The sandbox's first
process is the init of its pid namespace: when it ends, or when the outer bwrap dies (``--die-with-parent``), the
kernel kills every process in the namespace, background and ``setsid`` children included. At the time limit the
outer bwrap and anything left in the cgroups get SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence

from mmx.sandbox import bwrap
from mmx.sandbox.cgroups import RunCgroup
from mmx.sandbox.limits import Limits, SandboxResult, SandboxUnavailable

UNSAFE_HINT = (
    "To run model-written code with no confinement at all anyway, pass allow_unsandboxed=True "
    "(mmx agent: --unsafe-no-sandbox)."
)


def environment(workdir: str, sandboxed: bool) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": "/tmp" if sandboxed else workdir,  # the sandbox's /tmp is its own tmpfs; the host's is shared
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }


def check_workdir(workdir: str) -> str:
    full = os.path.realpath(workdir)
    if not os.path.isdir(full):
        raise FileNotFoundError(f"sandbox work directory {workdir} does not exist")
    if full == "/" or any(full == p or full.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
        raise ValueError(f"sandbox work directory {workdir} would expose the host system; use a directory of its own")
    return full


def run_process(
    argv: list[str],
    workdir: str,
    limits: Limits,
    stdin: str | None = None,
    *,
    allow_unsandboxed: bool = False,
    user: int | None = None,
    readonly: Sequence[str] = (),
    proc: bool = True,
    pass_fds: Sequence[int] = (),
) -> SandboxResult:
    """Run ``argv`` in bubblewrap with ``workdir`` as its only writable place.

    Raises :class:`SandboxUnavailable` where bubblewrap cannot run, unless ``allow_unsandboxed`` (then ``argv`` runs
    directly: limits and process-tree cleanup still apply, confinement does not). ``user``: a host uid (its gid the
    same number) to run as; needs root. ``readonly``: host paths shown read-only at the same place. ``proc``: mount
    the sandbox's own /proc. ``pass_fds``: descriptors the program inherits."""
    workdir = check_workdir(workdir)
    if user is not None and user != os.getuid() and os.getuid() != 0:
        raise PermissionError(f"running the sandbox as user {user} needs root")
    uid, gid = (os.getuid(), os.getgid()) if user is None else (user, user)
    problem = bwrap.problem(uid, gid)
    if problem and not allow_unsandboxed:
        raise SandboxUnavailable(f"refusing to run untrusted code: {problem}. {UNSAFE_HINT}")
    sandboxed = problem is None

    started = time.perf_counter()
    cgroup = RunCgroup.create(limits.total_memory_bytes, limits.processes)
    data_fds: dict[str, int] = {}
    try:
        if sandboxed:
            for dest, text in bwrap.identity_files(uid, gid, workdir).items():
                data_fds[dest] = _pipe_with(text)
            view = bwrap.View(workdir, tuple(readonly), proc, limits.total_memory_bytes)
            argv = bwrap.command(bwrap.find() or "bwrap", view, argv, data_fds, uid, gid)
        command = _launcher(cgroup, uid, gid, limits) + argv
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=environment(workdir, sandboxed),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(*pass_fds, *data_fds.values()),
            start_new_session=True,
        )
        for fd in data_fds.values():
            os.close(fd)
        data_fds.clear()
        out, err, timed_out = _collect(process, stdin, limits, started + limits.timeout, cgroup)
        oom = cgroup.oom_kills() > 0 if cgroup else False
    finally:
        for fd in data_fds.values():
            os.close(fd)
        if cgroup:
            cgroup.remove()
    return SandboxResult(process.returncode, out, err, timed_out, time.perf_counter() - started, sandboxed, oom)


def _pipe_with(text: str) -> int:
    """A readable fd holding ``text`` (small: it must fit the pipe's buffer)."""
    data = text.encode()
    if len(data) > 16384:
        raise ValueError(f"sandbox data file of {len(data)} bytes does not fit a pipe")
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return read


def _launcher(cgroup: RunCgroup | None, uid: int, gid: int, limits: Limits) -> list[str]:
    chain: list[str] = []
    if cgroup:
        files = cgroup.procs_files
        joins = "".join(f'echo $$ > "${i + 1}" || exit 125; ' for i in range(len(files)))
        chain += ["/bin/sh", "-c", joins + f'shift {len(files)}; exec "$@"', "mmx-sandbox", *files]
    if uid != os.getuid():
        chain += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    chain += [
        "prlimit",
        f"--as={limits.memory_mb * 2**20}",
        f"--cpu={limits.cpu_limit}:{limits.cpu_limit + 1}",
        f"--fsize={limits.file_mb * 2**20}",
        f"--nproc={limits.processes}",
        "--core=0",
        "--",
    ]
    return chain


def _collect(
    process: subprocess.Popen, stdin: str | None, limits: Limits, deadline: float, cgroup: RunCgroup | None
) -> tuple[str, str, bool]:
    """Feed stdin and read stdout / stderr until both close or the deadline passes; keep the first
    ``limits.max_output`` bytes of each and count the rest (a program printing forever fills no memory here)."""
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    dropped = {"stdout": 0, "stderr": 0}
    pending = memoryview((stdin or "").encode())
    timed_out = False
    killed_at: float | None = None
    with selectors.DefaultSelector() as selector:
        for name in ("stdout", "stderr"):
            stream = getattr(process, name)
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, selectors.EVENT_READ, name)
        if process.stdin is not None:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE, "stdin")
        while selector.get_map():
            now = time.perf_counter()
            if killed_at is None and now >= deadline:
                timed_out, killed_at = True, now
                _kill(process, cgroup)
            if killed_at is not None and now - killed_at > 5:
                break  # only an unsandboxed run can leave a process holding the pipes after the kill
            wait = deadline - now if killed_at is None else killed_at + 5 - now
            for key, _ in selector.select(max(wait, 0)):
                if key.data == "stdin":
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[len(pending) :]
                    if not pending:
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                room = max(limits.max_output - len(kept[key.data]), 0)
                kept[key.data] += chunk[:room]
                dropped[key.data] += max(len(chunk) - room, 0)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        process.wait(timeout=max(deadline - time.perf_counter(), 0) + 1)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(process, cgroup)
        process.wait()
    return _text(kept["stdout"], dropped["stdout"]), _text(kept["stderr"], dropped["stderr"]), timed_out


def _text(data: bytearray, dropped: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text + (f"\n... ({dropped} more bytes cut)" if dropped else "")


def _kill(process: subprocess.Popen, cgroup: RunCgroup | None) -> None:
    """SIGKILL the outer bwrap's process group (its sandbox dies with it) and whatever is left in the cgroups."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if cgroup:
        cgroup.kill()
