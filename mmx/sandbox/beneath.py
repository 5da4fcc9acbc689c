"""Opening a path beneath a directory so that it cannot end up outside, whatever runs concurrently in the tree.

Checking a path (``realpath``) and then opening it is a race: a process that swaps a directory for a symlink between
the two redirects the open anywhere. Here every component is opened relative to the file descriptor of the one
before it, with ``O_NOFOLLOW``; a symlink met on the way is read (``readlinkat``) and its target walked the same way
from the directory that holds it, or from the root for an absolute target that lies under the root; ``..`` steps back
to a descriptor already held, never above the root. So each step is taken from a directory known to be beneath the
root, and a swap can only change which inside path is reached, or make the call fail. (openat2's RESOLVE_BENEATH
does the same in the kernel; this walk works on every Linux and Python.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

MAX_SYMLINKS = 40


class OutsideError(PermissionError):
    """The path leads outside the root directory."""


def _components(path: str, root: str) -> list[str]:
    if os.path.isabs(path):
        if not (path == root or path.startswith(root.rstrip("/") + "/")):
            raise OutsideError(path)
        path = path[len(root) :]
    return [p for p in path.split("/") if p not in ("", ".")]


def open_beneath(root: str, path: str, flags: int, mode: int = 0o666, *, make_parents: bool = False) -> tuple[int, str]:
    """Open ``path`` (relative to ``root``, or absolute under it) with ``flags``; returns the descriptor and the path
    actually opened, relative to ``root``. Raises :class:`OutsideError` when the path, or a symlink on it, leads
    outside; the usual OSErrors otherwise. ``make_parents`` creates missing directories on the way. Files are opened
    non-blocking (a FIFO cannot hang the caller); callers check the type with :func:`regular_file`."""
    root = os.path.realpath(root)
    pending = _components(path, root)
    stack = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    names: list[str] = []
    followed = 0
    try:
        while pending:
            name = pending.pop(0)
            if name == "..":
                if len(stack) == 1:
                    raise OutsideError(path)
                os.close(stack.pop())
                names.pop()
                continue
            last = not pending
            open_flags = (
                flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                if last
                else os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            try:
                fd = os.open(name, open_flags, mode, dir_fd=stack[-1])
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    target = _link_target(name, stack[-1])
                    if target is None:
                        raise
                    followed += 1
                    if followed > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, "too many symbolic links", path) from None
                    if os.path.isabs(target):
                        target_parts = _components(target, root)  # an absolute link must point under the root
                        while len(stack) > 1:
                            os.close(stack.pop())
                        names.clear()
                    else:
                        target_parts = [p for p in target.split("/") if p not in ("", ".")]
                    pending = target_parts + pending
                    continue
                if e.errno == errno.ENOENT and make_parents and not last:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o777, dir_fd=stack[-1])
                    pending.insert(0, name)
                    continue
                raise
            names.append(name)
            if last:
                return fd, "/".join(names)
            stack.append(fd)
        # the path ended on a directory already held (the root itself, or after "..")
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        return os.dup(stack[-1]), "/".join(names) or "."
    finally:
        for fd in stack:
            os.close(fd)


def _link_target(name: str, dir_fd: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.EINVAL:  # not a symlink: the error was about something else
            return None
        raise


def regular_file(fd: int, path: str) -> None:
    """Raise unless ``fd`` is a regular file (not a directory, FIFO, socket or device)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
