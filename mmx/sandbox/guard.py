"""Runs a Python file under an audit hook that refuses what sandboxed code must not do.

    python -I -B guard.py WORKDIR SCRIPT [ARGS...]

The hook (PEP 578; it cannot be removed once installed) refuses sockets, starting processes, loading native code
through ctypes, signalling other processes, and any write, removal, rename or permission change outside WORKDIR.
It is the second line of defence behind the kernel namespaces of :mod:`mmx.sandbox.isolation`, and the only one
where namespaces are unavailable. This file imports nothing from mmx, so it runs with the stdlib alone.
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


def install(workdir: str) -> None:
    root = os.path.realpath(workdir)

    def inside(path) -> bool:
        if isinstance(path, int):  # an open file descriptor: it was checked when it was opened
            return True
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return full == root or full.startswith(root + os.sep) or full in _ALLOWED_WRITES

    def hook(event: str, args: tuple) -> None:
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
