"""Running untrusted code: model-written programs for code rewards, and the agent's shell and Python tools.

Every run happens inside bubblewrap (:mod:`mmx.sandbox.bwrap`): new user, pid, network, IPC and UTS namespaces, no
capabilities, a read-only minimal view of the system with the work directory as the only writable place, a private
/tmp, no network, no other process visible. Limits: wall time (the whole process tree is killed with the pid
namespace), CPU time, address space and file size per process (rlimits), and, through a cgroup of the run
(:mod:`mmx.sandbox.cgroups`), the total memory of the run and the number of its processes and threads.

Where no cgroup can be made (an unprivileged user without a delegated cgroup v2 subtree), the fallback is rlimits:
RLIMIT_NPROC bounds the processes, counting every process of that user on the host (so runs of one user at the same
time share the bound, and a run may fail to start when the user already has that many processes; it does not bind a
root caller, who gets the cgroup on any usual host), and memory is bounded per process only (the address-space
limit) plus the size of /tmp: the total is then up to processes x address space.

Without bubblewrap, running untrusted code raises :class:`SandboxUnavailable`, naming the package to install, unless
the caller passes ``allow_unsandboxed=True``: then the code runs directly with the limits and tree cleanup but no
confinement. Python code also runs under an audit hook (:mod:`mmx.sandbox.guard`): a second layer that turns common
escapes into clear errors, not a confinement of its own. Code rewards use :func:`mmx.sandbox.judge.run_tests`,
whose verdict the submission cannot forge by exiting, killing itself or patching builtins.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from mmx.sandbox import bwrap
from mmx.sandbox.beneath import open_beneath
from mmx.sandbox.limits import Limits, SandboxResult, SandboxUnavailable
from mmx.sandbox.process import run_process

GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")


def sandbox_problem(user: int | None = None) -> str | None:
    """Why untrusted code cannot be sandboxed here, or None when it can."""
    return bwrap.problem(user, user)


def sandbox_available(user: int | None = None) -> bool:
    return sandbox_problem(user) is None


@contextmanager
def work_directory(workdir: str | None, user: int | None = None) -> Iterator[str]:
    """The caller's directory, or a temporary one (owned by ``user`` when given) removed afterwards."""
    if workdir is not None:
        yield os.path.realpath(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="mmx-sandbox-") as tmp:
        if user is not None and user != os.getuid():
            os.chown(tmp, user, user)
        yield os.path.realpath(tmp)


def run_python(
    code: str,
    *,
    workdir: str | None = None,
    files: dict[str, str] | None = None,
    stdin: str | None = None,
    limits: Limits | None = None,
    allow_unsandboxed: bool = False,
    user: int | None = None,
) -> SandboxResult:
    """Run Python ``code`` (plus helper ``files``) in the sandbox, under the guard. In a temporary directory the code
    is main.py; in a caller's directory it is a hidden file that is removed afterwards, so nothing of the caller's is
    touched."""
    limits = limits or Limits()
    script = "main.py" if workdir is None else f".mmx-run-{uuid.uuid4().hex[:12]}.py"
    with work_directory(workdir, user) as wd:
        for name, text in {**(files or {}), script: code}.items():
            try:
                fd, _ = open_beneath(wd, name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, make_parents=True)
            except PermissionError as e:
                raise ValueError(f"sandbox file {name!r} is outside the work directory") from e
            if user is not None and workdir is None:
                os.fchown(fd, user, user)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        argv = [sys.executable, "-I", "-B", "-u", GUARD, wd, os.path.join(wd, script)]
        try:
            return run_process(
                argv, wd, limits, stdin, allow_unsandboxed=allow_unsandboxed, user=user, readonly=(GUARD,)
            )
        finally:
            if workdir is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(wd, script))


def run_command(
    command: str,
    workdir: str,
    limits: Limits | None = None,
    *,
    allow_unsandboxed: bool = False,
    user: int | None = None,
) -> SandboxResult:
    """Run a shell command in ``workdir`` in the sandbox."""
    return run_process(
        ["/bin/sh", "-c", command],
        workdir,
        limits or Limits(),
        allow_unsandboxed=allow_unsandboxed,
        user=user,
    )


__all__ = [
    "Limits",
    "SandboxResult",
    "SandboxUnavailable",
    "run_command",
    "run_process",
    "run_python",
    "sandbox_available",
    "sandbox_problem",
]
