"""Runs a submission and then its tests inside the sandbox, and proves to the parent that the last test passed.

    python -I -B -u harness.py GUARD JOB_FD VERDICT_FD WORKDIR

JOB_FD is an unlinked file holding ``NONCE\\nSIZE\\n`` then the submission (SIZE bytes of UTF-8) and the tests. The
harness reads it and closes it before any submitted code runs, so the submission can find neither the nonce nor
the tests. The one way to the verdict is the statement after ``exec(tests)``: it writes the nonce to VERDICT_FD,
and the parent (:mod:`mmx.sandbox.judge`) counts a pass only when exactly that nonce arrives. The exit status,
stdout and stderr are not evidence: ``sys.exit(0)``, ``os._exit(0)``, ``raise SystemExit``, killing the process
group, printing "OK" all end the process before the write.

Everything the harness uses after the submission starts is held in local variables of :func:`main`, bound before
(builtin functions and types cannot be patched); the tests run with a copy of the builtins taken before the
submission ran, and without the submission's globals that shadow a builtin's name, so patching ``builtins`` (or
defining ``all``) does not change what the tests call; ``assert`` raises the interpreter's own AssertionError
whatever ``builtins.AssertionError`` is. The guard (:mod:`mmx.sandbox.guard`, ``protect=True``) keeps the submission
away from :func:`main`'s frame (frames, the garbage collector, trace hooks, audit hooks, code objects) and from the
process's memory (/proc is not mounted, and opening it is refused).

Not covered (stated for whoever relies on the reward): a submission may return objects whose ``__eq__`` always says
True, and may patch or replace modules that the tests import (``math.isclose``, ``sys.modules["math"]``, a
``math.py`` put first on ``sys.path``), since all of these live in the one process the tests share with it; a
bypass of the audit hook would let it search the process's memory for the nonce. Running the tests in a process of
their own, with only plain values crossing over, would close these. Comparisons of plain values (numbers, strings,
lists, dicts of them) returned by the submission, made by the tests with their own builtins, cannot be faked.

This file imports nothing from mmx; the guard is loaded from its path.
"""

import builtins
import os
import sys


def main() -> None:
    guard_path, job_fd, verdict_fd, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with os.fdopen(job_fd, "rb") as job:
        nonce, size, rest = job.read().split(b"\n", 2)
    solution_source, tests_source = rest[: int(size)].decode(), rest[int(size) :].decode()
    del rest
    with open(guard_path, encoding="utf-8") as f:
        guard: dict = {"__name__": "mmx_sandbox_guard"}
        exec(compile(f.read(), guard_path, "exec"), guard)

    # bound now, used after the submission ran
    write, finish, run, exc_info, report = os.write, os._exit, exec, sys.exc_info, sys.__excepthook__
    clean_builtins = dict(vars(builtins))
    try:
        solution = compile(solution_source, "solution.py", "exec")
        tests = compile(tests_source, "tests.py", "exec")
    except SyntaxError:
        report(*exc_info())
        finish(1)
    os.chdir(workdir)
    guard["install"](workdir, protect=True)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        run(solution, namespace)
        seen_by_tests = {k: v for k, v in namespace.items() if k not in clean_builtins}
        seen_by_tests["__builtins__"] = clean_builtins
        seen_by_tests["__name__"] = "__main__"
        run(tests, seen_by_tests)
        write(verdict_fd, nonce)
        finish(0)
    except:  # noqa: E722 - a bare except looks nothing up that the submission could have replaced
        try:  # noqa: SIM105 - contextlib.suppress(BaseException) would look up a name the submission may have replaced
            report(*exc_info())
        except:  # noqa: E722
            pass
    finish(1)


if __name__ == "__main__":
    main()
