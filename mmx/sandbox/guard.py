"""An audit hook (PEP 578) for Python code running inside the sandbox: a second layer, not the confinement.

    python -I -B -u guard.py WORKDIR SCRIPT [ARGS...]

Bubblewrap (:mod:`mmx.sandbox.bwrap`) is what confines the code. The hook only turns the most common ways of
reaching out into clear Python errors, and narrows what a program can do to the process it runs in: it refuses
sockets, starting processes, loading native code through ctypes, signalling other processes, and writes, removals,
renames and permission changes outside WORKDIR and $TMPDIR. It can be bypassed (a path relative to a ``dir_fd``
is not visible to it, for one), so it never stands alone as a sandbox.

``protect=True`` (the code-reward harness, :mod:`mmx.sandbox.harness`) also refuses what would let a submission
read the harness's memory or tamper with the harness's frames: frame and garbage-collector introspection, trace and
profile hooks, new audit hooks, new or swapped code objects, and opening anything under /proc. This file imports
nothing from mmx, so it runs with the standard library alone.
"""

import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {  # event -> positions of the path arguments that are modified
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.link": (0, 1),
    "os.symlink": (1,),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "os.chflags": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.copytree": (1,),
    "shutil.move": (1,),
}
_BLOCKED_PREFIXES = (
    "socket.",
    "subprocess.",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.system",
    "os.startfile",
    "ctypes.",
    "pty.",
    "os.forkpty",
    "_posixsubprocess",
)
_BLOCKED_IMPORTS = {"ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "_posixsubprocess"}
_ALLOWED_WRITES = ("/dev/null", "/dev/stdout", "/dev/stderr")

# protect=True: what reaches another frame's variables, the heap, or the process's memory
_PROTECTED_EVENTS = {
    "sys._getframe",
    "sys._current_frames",
    "sys._current_exceptions",
    "sys.settrace",
    "sys.setprofile",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
    "code.__new__",
}
_FRAME_ATTRIBUTES = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}
_PROTECTED_IMPORTS = {"_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase", "_xxsubinterpreters"}


class IntrospectionRefused(PermissionError, ValueError):
    """Also a ValueError: the standard library reads "no frame available" that way (namedtuple, typing, logging)."""


def install(workdir: str, protect: bool = False) -> None:
    roots = [os.path.realpath(workdir)]
    if os.path.isabs(os.environ.get("TMPDIR", "")):
        roots.append(os.path.realpath(os.environ["TMPDIR"]))

    def inside(path) -> bool:
        if isinstance(path, int):  # an open file descriptor: it was checked when it was opened
            return True
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return full in _ALLOWED_WRITES or any(full == r or full.startswith(r + os.sep) for r in roots)

    def under_proc(path) -> bool:
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return True
        return full == "/proc" or full.startswith("/proc/")

    def hook(event: str, args: tuple) -> None:
        if protect:
            if event in _PROTECTED_EVENTS:
                raise IntrospectionRefused(f"sandbox: {event} is not allowed here")
            if event == "sys.addaudithook":
                raise RuntimeError("sandbox: adding audit hooks is not allowed here")  # the new hook is dropped
            if event == "object.__getattr__" and len(args) > 1 and args[1] in _FRAME_ATTRIBUTES:
                raise IntrospectionRefused(f"sandbox: reading {args[1]} is not allowed here")
            if event == "object.__setattr__" and len(args) > 1 and args[1] == "__code__":
                raise PermissionError("sandbox: replacing a function's __code__ is not allowed here")
            if event == "import" and args and args[0] in _PROTECTED_IMPORTS:
                raise ImportError(f"sandbox: importing {args[0]} is not allowed here")
            if event == "open" and args and isinstance(args[0], (str, bytes)) and under_proc(args[0]):
                raise PermissionError(f"sandbox: opening {args[0]} is not allowed here")
        if event == "import" and args and args[0] in _BLOCKED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event.startswith(_BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path} (outside the work directory) is not allowed")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]} (outside the work directory) is not allowed")
        elif event == "os.kill" and args and args[0] not in (0, os.getpid()):
            raise PermissionError("sandbox: signalling other processes is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    workdir, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    os.chdir(workdir)
    sys.path.insert(0, workdir)
    import runpy  # imported before the hook exists, like everything the runner itself needs

    install(workdir)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
