"""bubblewrap (``bwrap``): finding it, checking that it can create namespaces here, and the command line that gives
untrusted code its view of the system.

The sandbox gets new user, pid, network, IPC, UTS and cgroup namespaces (also when mmx runs as root: bwrap then maps
root to itself in a fresh user namespace, where it holds no capability over anything of the host), an empty
capability bounding set (``--cap-drop ALL``), no further user namespaces (``--disable-userns``, bwrap >= 0.8), a
session of its own (so it cannot push keystrokes into the caller's terminal) and ``--die-with-parent``. Its root is an
empty, read-only tmpfs holding only:

* ``/usr`` and the ``/bin``, ``/lib``... links of a merged-/usr system (or read-only binds where they are real
  directories), a few files of ``/etc`` (the dynamic linker's cache, alternatives, the time zone) and a passwd and
  group file naming only the sandbox's own user;
* the Python interpreter's tree and the virtualenv's, read-only, where they live outside /usr;
* extra host paths a caller asks for, read-only at the same place (the guard and test harness scripts);
* a ``/proc`` of its own pid namespace (only its own processes; ``/proc/sys`` read-only, because a root caller's
  sandbox would otherwise pass the owner-write check of the host's sysctls), or none at all;
* a minimal ``/dev`` (null, zero, random, urandom, tty, a private pts and shm), a private tmpfs ``/tmp``;
* the work directory, read-write: the only writable host place.

No home directory, no host ``/tmp``, ``/run`` or ``/var`` (nor the sockets in them), no ``/sys``. The network
namespace has only a loopback interface of its own.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TOP_LEVEL_LINKS = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "nsswitch.conf")
INSTALL_HINT = (
    "install it with `apt-get install bubblewrap` (Debian/Ubuntu; `make install` does it when run as root) or "
    "`dnf install bubblewrap` (Fedora)"
)


@dataclass(frozen=True)
class View:
    """What of the host a sandboxed run sees."""

    workdir: str  # absolute, symlinks resolved: the only writable host directory
    readonly: tuple[str, ...] = ()  # more host paths, shown read-only at the same place
    proc: bool = True  # mount a /proc of the sandbox's own pid namespace
    tmp_bytes: int | None = None  # size of the private /tmp


def find() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def _options(bwrap: str) -> frozenset[str]:
    """The options this bwrap accepts (``--disable-userns`` and ``--size`` are 0.8.0 additions)."""
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(word for word in text.split() if word.startswith("--"))


def _interpreter_trees() -> list[str]:
    """The Python installation and virtualenv directories the sandbox needs to run ``sys.executable``."""
    trees = {
        os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)))
    }
    trees = {t for t in trees if t != "/" and not _under(t, "/usr")}
    return sorted(t for t in trees if not any(o != t and _under(t, o) for o in trees))


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def reachable(path: str, uid: int, gid: int) -> bool:
    """Whether user ``uid`` could look ``path`` up (search permission on every directory above it)."""
    current = "/"
    for part in [p for p in path.split("/") if p][:-1]:
        current = os.path.join(current, part)
        try:
            st = os.stat(current)
        except OSError:
            return False
        bits = st.st_mode & 0o777
        allowed = bits >> 6 if st.st_uid == uid else bits >> 3 if st.st_gid == gid else bits
        if uid != 0 and not allowed & 1:
            return False
    return True


def identity_files(uid: int, gid: int, home: str) -> dict[str, str]:
    """/etc/passwd and /etc/group naming only the sandbox's user (and nobody), so tools that look the user up work
    without seeing the host's accounts."""
    name = "root" if uid == 0 else "sandbox"
    passwd = f"{name}:x:{uid}:{gid}:mmx sandbox:{home}:/bin/sh\n"
    group = f"{name}:x:{gid}:\n"
    if uid != 65534:
        passwd += "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    if gid != 65534:
        group += "nogroup:x:65534:\n"
    return {"/etc/passwd": passwd, "/etc/group": group}


def command(bwrap: str, view: View, argv: list[str], data_fds: dict[str, int], uid: int, gid: int) -> list[str]:
    """The bwrap command line running ``argv`` in ``view``. ``data_fds`` maps sandbox paths to readable fds whose
    content becomes a read-only file there (the identity files). ``uid``/``gid``: the host user bwrap will run as
    (paths that user cannot reach are left out of the view)."""
    options = _options(bwrap)
    flags = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        "mmx-sandbox",
    ]
    if "--disable-userns" in options:
        flags.append("--disable-userns")

    mounts: list[tuple[str, list[str]]] = [("/usr", ["--ro-bind", "/usr", "/usr"])]
    for name in TOP_LEVEL_LINKS:
        path = "/" + name
        if os.path.islink(path):
            mounts.append((path, ["--symlink", os.readlink(path), path]))
        elif os.path.isdir(path):
            mounts.append((path, ["--ro-bind", path, path]))
    for name in ETC_FILES:
        path = "/etc/" + name
        if os.path.exists(path):
            mounts.append((path, ["--ro-bind", path, path]))
    for dest, fd in data_fds.items():
        mounts.append((dest, ["--ro-bind-data", str(fd), dest]))
    for path in (*_interpreter_trees(), *view.readonly):
        if os.path.exists(path) and reachable(path, uid, gid):
            mounts.append((path, ["--ro-bind", path, path]))
    mounts.append(("/dev", ["--dev", "/dev"]))
    if view.proc:
        mounts.append(("/proc", ["--proc", "/proc"]))
        mounts.append(("/proc/sys", ["--ro-bind", "/proc/sys", "/proc/sys"]))
        mounts.append(("/proc/sysrq-trigger", ["--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger"]))
    size = ["--size", str(view.tmp_bytes)] if view.tmp_bytes and "--size" in options else []
    mounts.append(("/tmp", [*size, "--tmpfs", "/tmp"]))
    mounts.append((view.workdir, ["--bind", view.workdir, view.workdir]))
    # bwrap mounts in order: parents before children, so /tmp's tmpfs comes before a work directory inside /tmp and
    # the work directory before a virtualenv inside it (which then stays read-only)
    mounts.sort(key=lambda m: len([p for p in m[0].split("/") if p]))
    return [
        bwrap,
        *flags,
        *(arg for _, args in mounts for arg in args),
        "--remount-ro",
        "/",
        "--chdir",
        view.workdir,
        "--",
        *argv,
    ]


@functools.cache
def _probe(bwrap: str, uid: int, gid: int) -> str | None:
    """Why bwrap cannot run a sandbox here as ``uid``, or None when it can (tried once per process)."""
    with tempfile.TemporaryDirectory(prefix="mmx-bwrap-probe-") as tmp:
        if uid != os.getuid():
            os.chown(tmp, uid, gid)
        argv = command(bwrap, View(os.path.realpath(tmp)), ["true"], {}, uid, gid)
        if uid != os.getuid():
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return f"bwrap could not be started: {e}"
    if done.returncode != 0:
        return f"bwrap cannot create a sandbox here: {done.stderr.strip() or f'exit code {done.returncode}'}"
    return None


def problem(uid: int | None = None, gid: int | None = None) -> str | None:
    """Why untrusted code cannot be sandboxed here (as host user ``uid``), or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux (bubblewrap); this is {sys.platform}"
    bwrap = find()
    if bwrap is None:
        return f"bubblewrap (bwrap) is not installed; {INSTALL_HINT}"
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    for tool in ("prlimit", "setpriv") if uid != os.getuid() else ("prlimit",):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed; the sandbox needs it to set resource limits"
    return _probe(bwrap, uid, gid)
