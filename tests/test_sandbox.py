"""The sandbox for model-written code: runaway loops, memory hogs, writes outside the work directory, network."""

from __future__ import annotations

import os
import time

import pytest

from mmx.sandbox import Limits, isolation_available, run_command, run_python

LIMITS = Limits(timeout=3, memory_mb=256)
MODES = [pytest.param(False, id="guard-only"), pytest.param(True, id="namespaces")]


def needs(isolate: bool) -> None:
    if isolate and not isolation_available():
        pytest.skip("kernel namespaces are not available here")


@pytest.mark.parametrize("isolate", MODES)
def test_ordinary_code_runs_and_may_use_its_directory(isolate):
    needs(isolate)
    result = run_python(
        "open('out.txt', 'w').write('42')\nprint(open('out.txt').read(), input())",
        stdin="ok\n",
        limits=LIMITS,
        isolate=isolate,
    )
    assert result.ok and result.stdout.split() == ["42", "ok"]


@pytest.mark.parametrize("isolate", MODES)
def test_infinite_loop_is_killed_at_the_timeout(isolate):
    needs(isolate)
    started = time.perf_counter()
    result = run_python("while True:\n    pass", limits=Limits(timeout=1.5, memory_mb=256), isolate=isolate)
    assert result.timed_out and not result.ok and result.summary() == "timed out"
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("isolate", MODES)
def test_memory_limit(isolate):
    needs(isolate)
    result = run_python("block = bytearray(2 * 1024**3)\nprint('allocated')", limits=LIMITS, isolate=isolate)
    assert not result.ok and "allocated" not in result.stdout and "MemoryError" in result.stderr


@pytest.mark.parametrize("isolate", MODES)
def test_writes_outside_the_directory_are_refused(isolate, tmp_path):
    needs(isolate)
    target = tmp_path / "outside.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.rename('main.py', {str(target)!r})",
        f"import pathlib\npathlib.Path({str(target)!r}).touch()",
        "import os\nos.remove('/etc/hostname')",
    ):
        result = run_python(code, limits=LIMITS, isolate=isolate)
        assert not result.ok and "PermissionError" in result.stderr, code
    assert not target.exists() and os.path.exists("/etc/hostname")


@pytest.mark.parametrize("isolate", MODES)
def test_no_network_no_subprocesses(isolate):
    needs(isolate)
    sock = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))", limits=LIMITS, isolate=isolate)
    assert not sock.ok and "not allowed" in sock.stderr
    sub = run_python("import os\nos.system('echo escaped')", limits=LIMITS, isolate=isolate)
    assert not sub.ok and "escaped" not in sub.stdout
    native = run_python("import ctypes", limits=LIMITS, isolate=isolate)
    assert not native.ok and "ImportError" in native.stderr


def test_shell_commands_are_confined_by_namespaces(tmp_path):
    needs(True)
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside.txt"
    script = (
        f"echo inside > note.txt; echo escaped > {outside}; "
        "python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:9', timeout=2)\" 2>&1 | tail -1; "
        "sleep 60 & echo started"
    )
    started = time.perf_counter()
    result = run_command(script, str(work), Limits(timeout=5))
    assert (work / "note.txt").read_text() == "inside\n"
    assert not outside.exists() and "Read-only file system" in result.stderr
    assert "Connection refused" in result.stdout or "unreachable" in result.stdout
    assert time.perf_counter() - started < 8  # the background sleep did not hold the run open past its timeout
