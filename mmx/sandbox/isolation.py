"""Kernel-level confinement of a child process, set up between fork and exec (Linux):

* a new network namespace: only a loopback interface that is down, so no connection leaves the process;
* a new mount namespace in which every mount is read-only except the work directory (and /dev), so files outside
  it cannot be created, changed or removed;
* a new session (the whole process tree is killed on timeout) and resource limits on address space, CPU time,
  file size and core dumps.

Namespaces need root or unprivileged user namespaces. :func:`probe` says whether they work here; callers fall back
to the Python-level guard (:mod:`mmx.sandbox.guard`) and to rlimits alone when they do not.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import subprocess
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
WRITABLE_SYSTEM_MOUNTS = (
    "/dev",
    "/proc",
    "/sys",
)  # device nodes and kernel views; /proc/sys is covered by /proc's own mount


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mounts() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            flags = 0
            for option in fields[5].split(","):
                flags |= _OPTION_FLAGS.get(option, 0)
            out.append((point, flags))
    return out


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(workdir: str | None, network: bool = False) -> None:
    """Called in the child: unshare and make everything but ``workdir`` read-only. Raises OSError on failure."""
    libc = _libc()
    flags = CLONE_NEWNS | (0 if network else CLONE_NEWNET)
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        flags |= CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare failed")
    if uid != 0:  # map ourselves to root inside the new user namespace, which allows the mounts below
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making mounts private failed")
    keep = os.path.realpath(workdir).encode() if workdir else None
    if keep and mount(keep, keep, None, MS_BIND | MS_REC, None) != 0:
        raise OSError(ctypes.get_errno(), f"bind-mounting {workdir} failed")
    for point, kept in _mounts():
        if (keep and (point.encode() == keep or point.encode().startswith(keep + b"/"))) or point.startswith(
            WRITABLE_SYSTEM_MOUNTS
        ):
            continue
        if mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None) != 0 and point == "/":
            raise OSError(ctypes.get_errno(), "remounting / read-only failed")


def limit_resources(memory_mb: int | None, cpu_seconds: float | None, file_mb: int | None) -> None:
    if memory_mb:
        size = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    if cpu_seconds:
        seconds = int(cpu_seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    if file_mb:
        size = file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@functools.cache
def probe() -> bool:
    """Whether a child can enter the namespaces here (tried once per process, in a throwaway child)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from mmx.sandbox.isolation import enter_namespaces as e; e(None)"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0
