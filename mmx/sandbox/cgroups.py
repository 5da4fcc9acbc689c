"""A control group per sandboxed run, bounding what rlimits cannot: the memory of the whole run (every process of it,
and its /tmp tmpfs, whose pages are charged to the group) and the number of its processes and threads (RLIMIT_NPROC
does not bind a sandbox of a root caller: the kernel exempts the host's root user from it).

Where: cgroup v2 when the group mmx runs in offers the memory and pids controllers to children (the root group, or a
delegated subtree); otherwise the cgroup v1 memory and pids hierarchies when they are writable (root on a v1 or
hybrid host); each controller independently. Where neither works (an unprivileged user without a delegated
subtree), :func:`RunCgroup.create` returns None and the run is bounded by rlimits alone (see :mod:`mmx.sandbox`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
import uuid
from dataclasses import dataclass

CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class _Parent:
    version: int  # 1 or 2
    controllers: tuple[str, ...]  # the controllers a child group of this directory gets
    path: str  # the directory child groups are made in


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(hierarchy root, mount point, fs type, super options) of every cgroup mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1 :]
            if tail[0] in ("cgroup", "cgroup2"):
                found.append((fields[3], fields[4].replace("\\040", " "), tail[0], set(tail[2].split(","))))
    return found


def _own_groups() -> dict[str, str]:
    """Controller (or "" for v2) -> the path of this process's group, from /proc/self/cgroup."""
    groups = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                groups[name] = path
    return groups


def _directory(mount_root: str, mount_point: str, path: str) -> str | None:
    if not (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
        return None  # our group is not visible through this mount
    return os.path.join(mount_point, path[len(mount_root) :].lstrip("/"))


def _can_make_children(path: str) -> bool:
    probe = os.path.join(path, f"mmx-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return True


def _v2_parent(mount_root: str, mount_point: str, own: dict[str, str]) -> _Parent | None:
    path = own.get("")
    base = _directory(mount_root, mount_point, path) if path is not None else None
    if base is None:
        return None
    try:
        with open(os.path.join(base, "cgroup.controllers")) as f:
            offered = set(f.read().split())
        if not set(CONTROLLERS) <= offered:
            return None
        with open(os.path.join(base, "cgroup.subtree_control")) as f:
            enabled = set(f.read().split())
        if not set(CONTROLLERS) <= enabled:
            # fails (EBUSY) where this group holds processes and is not the root: then cgroup v2 is not usable
            with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join("+" + c for c in CONTROLLERS))
    except OSError:
        return None
    return _Parent(2, CONTROLLERS, base) if _can_make_children(base) else None


@functools.cache
def parents() -> tuple[_Parent, ...]:
    """Where this process can make per-run groups, and with which controllers (worked out once)."""
    try:
        mounts, own = _mounts(), _own_groups()
    except (OSError, ValueError, IndexError):
        return ()
    for root, point, kind, _ in mounts:
        if kind == "cgroup2":
            found = _v2_parent(root, point, own)
            if found:
                return (found,)
    found = []
    for controller in CONTROLLERS:
        for root, point, kind, options in mounts:
            if kind == "cgroup" and controller in options and controller in own:
                base = _directory(root, point, own[controller])
                if base and _can_make_children(base):
                    found.append(_Parent(1, (controller,), base))
                    break
    return tuple(found)


class RunCgroup:
    """The groups (one for cgroup v2, one per controller for v1) holding one run's processes."""

    def __init__(self, groups: list[tuple[_Parent, str]]):
        self.groups = groups

    @classmethod
    def create(cls, memory_bytes: int, max_tasks: int) -> RunCgroup | None:
        name = f"mmx-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        made: list[tuple[_Parent, str]] = []
        try:
            for parent in parents():
                path = os.path.join(parent.path, name)
                os.mkdir(path)
                made.append((parent, path))
                if "memory" in parent.controllers:
                    if parent.version == 2:
                        _write(path, "memory.max", memory_bytes)
                        _write(path, "memory.swap.max", 0, optional=True)
                    else:
                        _write(path, "memory.limit_in_bytes", memory_bytes)
                        _write(path, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                if "pids" in parent.controllers:
                    _write(path, "pids.max", max_tasks)
        except OSError:
            cls(made).remove()
            return None
        return cls(made) if made else None

    @property
    def controllers(self) -> set[str]:
        return {c for parent, _ in self.groups for c in parent.controllers}

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes its pid to to join (every group)."""
        return [os.path.join(path, "cgroup.procs") for _, path in self.groups]

    def _pids(self) -> set[int]:
        pids: set[int] = set()
        for file in self.procs_files:
            with contextlib.suppress(OSError), open(file) as f:
                pids.update(int(p) for p in f.read().split())
        return pids

    def kill(self) -> None:
        """SIGKILL every process still in the run's groups."""
        for parent, path in self.groups:
            if parent.version == 2 and os.path.exists(os.path.join(path, "cgroup.kill")):
                with contextlib.suppress(OSError):
                    _write(path, "cgroup.kill", 1)
        for _ in range(100):  # v1: a process may fork between reading the list and the kill; repeat until empty
            pids = self._pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def oom_kills(self) -> int:
        """How many processes of the run the kernel killed for exceeding the memory limit."""
        total = 0
        for parent, path in self.groups:
            if "memory" not in parent.controllers:
                continue
            name = "memory.events" if parent.version == 2 else "memory.oom_control"
            with contextlib.suppress(OSError), open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        total += int(value)
        return total

    def remove(self) -> None:
        self.kill()
        for _, path in self.groups:
            for _ in range(200):  # the kernel releases a group shortly after its last process is reaped
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)


def _write(group: str, name: str, value: int, optional: bool = False) -> None:
    path = os.path.join(group, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(str(value))
