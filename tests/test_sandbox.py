"""The bubblewrap sandbox, probed as an escaping program would: writes outside the work directory (after remounting,
through nested namespaces, through a ``dir_fd``), host files, host sockets (TCP on loopback, a Unix socket in a host
directory, an abstract one), other processes' /proc, capabilities, background and ``setsid`` children, signals to
host processes, fork loops, total memory, host sysctls; and the agent's ``write_file`` against a directory <-> symlink
swap. Each escape runs as mmx's own user (root here) and, where the machine allows, as an unprivileged host user.

Every probe asserts on the host side (the file is not there, the process is alive, the listener saw nothing), not
only on what the sandboxed program printed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from mmx.sandbox import (
    Limits,
    SandboxResult,
    SandboxUnavailable,
    bwrap,
    run_command,
    run_python,
    sandbox_available,
    sandbox_problem,
)
from mmx.sandbox.cgroups import parents

ROOT = os.getuid() == 0
NOBODY = 65534
USERS = [pytest.param(None, id="own-user")]
if ROOT:
    USERS.append(pytest.param(NOBODY, id="unprivileged"))
LIMITS = Limits(timeout=10, memory_mb=512)

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason=f"no sandbox here: {sandbox_problem()}")


def cgroup_controllers() -> set[str]:
    return {c for p in parents() for c in p.controllers}


@pytest.fixture
def user(request):
    uid = request.param
    if uid is not None and not sandbox_available(uid):
        pytest.skip(f"cannot run the sandbox as uid {uid} here: {sandbox_problem(uid)}")
    if uid is None and not sandbox_available():
        pytest.skip(f"no sandbox here: {sandbox_problem()}")
    return uid


@pytest.fixture
def workdir(user):
    """A work directory the sandbox's user owns, under /tmp so that an unprivileged user can reach it."""
    path = tempfile.mkdtemp(prefix="mmx-sandbox-test-", dir="/tmp")
    if user is not None:
        os.chown(path, user, user)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def outside():
    """A host directory next to the work directories (world-writable, so an unprivileged escape could write too)."""
    path = tempfile.mkdtemp(prefix="mmx-outside-", dir="/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def remove(paths: list[str]) -> None:
    """Clean up after a failed escape test, so that a broken sandbox does not leave files on the host."""
    for path in paths:
        os.unlink(path)


def sh(command: str, workdir: str, user: int | None, **limits) -> SandboxResult:
    result = run_command(command, workdir, Limits(**{"timeout": 10, "memory_mb": 512, **limits}), user=user)
    assert result.sandboxed
    return result


# ---------------------------------------------------------------------------------------------------- ordinary use
@needs_sandbox
def test_ordinary_code_runs_and_may_use_its_directory(tmp_path):
    result = run_python(
        "open('out.txt', 'w').write('42')\nimport tempfile\ntempfile.TemporaryFile().write(b'x')\n"
        "print(open('out.txt').read(), input())",
        stdin="ok\n",
        limits=LIMITS,
    )
    assert result.ok and result.sandboxed and result.stdout.split() == ["42", "ok"], result
    result = run_command("echo made > note.txt && cat note.txt && ls", str(tmp_path), LIMITS)
    assert result.ok and result.stdout.split() == ["made", "note.txt"] and (tmp_path / "note.txt").exists()


@needs_sandbox
def test_infinite_loop_is_killed_at_the_timeout():
    started = time.perf_counter()
    result = run_python("while True:\n    pass", limits=Limits(timeout=1.5, memory_mb=256))
    assert result.timed_out and not result.ok and result.summary() == "timed out"
    assert time.perf_counter() - started < 6


@needs_sandbox
def test_address_space_limit_per_process():
    result = run_python("block = bytearray(2 * 1024**3)\nprint('allocated')", limits=LIMITS)
    assert not result.ok and "allocated" not in result.stdout and "MemoryError" in result.stderr


@needs_sandbox
def test_endless_output_is_cut_without_filling_memory(tmp_path):
    result = run_command("yes 0123456789abcdef | head -c 50000000", str(tmp_path), Limits(timeout=10, max_output=1000))
    assert result.ok and result.stdout.startswith("0123456789abcdef\n")
    assert "more bytes cut" in result.stdout and len(result.stdout) < 1100


@needs_sandbox
def test_guard_stays_as_a_second_layer_for_python():
    sock = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))", limits=LIMITS)
    assert not sock.ok and "not allowed" in sock.stderr
    sub = run_python("import os\nos.system('echo escaped')", limits=LIMITS)
    assert not sub.ok and "escaped" not in sub.stdout


def test_without_bubblewrap_running_code_is_refused_unless_explicitly_unsafe(monkeypatch, tmp_path):
    monkeypatch.setattr(bwrap, "find", lambda: None)
    for run in (
        lambda: run_command("echo hi", str(tmp_path)),
        lambda: run_python("print('hi')"),
    ):
        with pytest.raises(SandboxUnavailable) as refused:
            run()
        message = str(refused.value)
        assert "bubblewrap" in message and "apt-get install bubblewrap" in message
        assert "allow_unsandboxed=True" in message and "--unsafe-no-sandbox" in message
    result = run_command("echo hi", str(tmp_path), Limits(timeout=5), allow_unsandboxed=True)
    assert result.ok and result.stdout == "hi\n" and not result.sandboxed


def test_work_directory_that_would_expose_the_host_is_refused():
    with pytest.raises(ValueError, match="would expose the host"):
        run_command("true", "/", allow_unsandboxed=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_command("true", "/nonexistent-mmx-dir", allow_unsandboxed=True)


# ---------------------------------------------------------------------------------------------------- escapes
@pytest.mark.parametrize("user", USERS, indirect=True)
def test_writes_outside_fail_even_after_remounting_or_entering_namespaces(user, workdir, outside):
    target = os.path.join(outside, "escaped.txt")
    usr_target = f"/usr/mmx-escape-{uuid.uuid4().hex[:8]}"
    parent_target = os.path.join(os.path.dirname(workdir), f"mmx-escape-{uuid.uuid4().hex[:8]}")
    attempts = [
        "mount -o remount,rw /",
        "mount -o remount,bind,rw /",
        "mount -o remount,bind,rw /usr",
        f"mkdir -p {outside}; echo x > {target}",
        f"echo x > {usr_target}",
        f"echo x > {parent_target}",
        f"nsenter --mount=/proc/1/ns/mnt sh -c 'echo x > {target}'",
        f"unshare -Urm sh -c 'mount -o remount,bind,rw /usr; echo x > {usr_target}; mount -t tmpfs t /tmp'",
        "echo inside > inside.txt",
    ]
    result = sh("; ".join(f"{a} 2>/dev/null" for a in attempts), workdir, user)
    escaped = [p for p in (target, usr_target, parent_target) if os.path.exists(p)]
    remove(escaped)
    assert escaped == []
    with open(os.path.join(workdir, "inside.txt")) as f:
        assert f.read() == "inside\n", result


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_dir_fd_and_rename_writes_stay_inside(user, workdir, outside):
    parent = os.path.dirname(workdir)
    name = f"mmx-escape-{uuid.uuid4().hex[:8]}"
    code = f"""
import os
attempts = [
    lambda: os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=os.open('..', os.O_RDONLY)),
    lambda: os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=os.open('/', os.O_RDONLY)),
    lambda: os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=os.open({outside!r}, os.O_RDONLY)),
    lambda: os.rename('mine.txt', {name!r}, dst_dir_fd=os.open('..', os.O_RDONLY)),
    lambda: os.rename('mine.txt', {os.path.join(outside, "renamed.txt")!r}),
    lambda: os.symlink('/', 'root-link') or open('root-link/tmp/' + {name!r}, 'w'),
]
open('mine.txt', 'w').write('x')
for attempt in attempts:
    try:
        attempt()  # may succeed: ".." and "/tmp" are the sandbox's own tmpfs, not the host's
    except OSError as e:
        print(type(e).__name__)
"""
    result = sh(f"python3 - <<'EOF'\n{code}\nEOF", workdir, user)
    assert result.ok, result
    escaped = [p for p in (os.path.join(parent, name), f"/{name}", f"/tmp/{name}") if os.path.exists(p)]
    remove(escaped)
    assert escaped == [] and os.listdir(outside) == []
    assert os.path.exists(os.path.join(workdir, "mine.txt"))


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_host_files_outside_the_work_directory_are_invisible(user, workdir):
    secret = uuid.uuid4().hex
    places = [f"/tmp/mmx-secret-{secret[:8]}.txt", f"/etc/mmx-secret-{secret[:8]}.txt"]
    if ROOT:
        places.append(f"/root/mmx-secret-{secret[:8]}.txt")
    for place in places:
        with open(place, "w") as f:
            f.write(secret)
        os.chmod(place, 0o644)  # readable by anyone on the host: only the sandbox's view hides it
    try:
        result = sh(
            "; ".join(f"cat {p} 2>/dev/null" for p in places)
            + "; cat /etc/shadow 2>/dev/null && echo SHADOW-READ; ls -A /root/.ssh /home /var/run 2>/dev/null",
            workdir,
            user,
        )
    finally:
        for place in places:
            os.unlink(place)
    assert secret not in result.stdout and "SHADOW-READ" not in result.stdout, result
    assert result.stdout == "", result  # not one of those paths exists in the sandbox


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_no_connection_to_host_sockets(user, workdir):
    connections = []
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    socket_dir = tempfile.mkdtemp(prefix="mmx-sock-", dir="/tmp")
    os.chmod(socket_dir, 0o777)
    unix_path = os.path.join(socket_dir, "s")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen()
    abstract_name = f"\0mmx-test-{uuid.uuid4().hex}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(abstract_name)
    abstract.listen()
    for server in (tcp, unix, abstract):
        server.settimeout(0.2)

        def accept(server=server):
            while True:
                try:
                    connections.append(server.accept())
                except TimeoutError:
                    continue
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
    code = f"""
import socket
for family, address in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_UNIX, {unix_path!r}),
                        (socket.AF_UNIX, {abstract_name!r})]:
    s = socket.socket(family)
    s.settimeout(2)
    try:
        s.connect(address)
        print('CONNECTED', address)
    except OSError as e:
        print('refused', type(e).__name__)
"""
    try:
        bash_tcp = f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo CONNECTED-bash; " + (
            f"nsenter --net=/proc/$PPID/ns/net bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo CONNECTED"
        )
        result = sh(f"python3 - <<'EOF'\n{code}\nEOF\n{bash_tcp}", workdir, user)
        time.sleep(0.3)
    finally:
        for server in (tcp, unix, abstract):
            server.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert "CONNECTED" not in result.stdout and result.stdout.count("refused") == 3, result
    assert connections == []


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_other_processes_and_their_environment_are_invisible(user, workdir):
    secret = uuid.uuid4().hex
    host = subprocess.Popen(["sleep", "30"], env={"MMX_TEST_SECRET": secret})
    try:
        result = sh(
            f"cat /proc/{host.pid}/environ /proc/{os.getpid()}/environ 2>/dev/null; "
            "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; echo; ls /proc | grep -c '^[0-9]'",
            workdir,
            user,
        )
    finally:
        host.kill()
        host.wait()
    assert secret not in result.stdout
    assert int(result.stdout.split()[-1]) <= 5, result  # the sandbox's own few processes


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_no_capabilities_and_no_host_sysctl_writes(user, workdir):
    result = sh(
        "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; "
        "v=$(cat /proc/sys/vm/overcommit_ratio); (echo $v > /proc/sys/vm/overcommit_ratio) 2>/dev/null "
        "&& echo WROTE-SYSCTL",
        workdir,
        user,
    )
    capabilities = dict(line.split(":") for line in result.stdout.splitlines() if line.startswith("Cap"))
    assert len(capabilities) == 5 and all(int(v, 16) == 0 for v in capabilities.values()), result
    assert "WROTE-SYSCTL" not in result.stdout


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_background_and_setsid_children_die_with_the_call(user, workdir):
    quiet = ">/dev/null 2>&1"
    marker = f"{time.time() % 1000 + 100:.6f}"  # a sleep duration no other process uses
    started = time.perf_counter()
    result = sh(
        # output redirected, so nothing holds the call's pipes open: only the pid namespace ends them
        f"sleep {marker} {quiet} & setsid sleep {marker} {quiet} & (setsid sleep {marker} {quiet} &);"
        f" nohup sleep {marker} {quiet} & echo started",
        workdir,
        user,
    )
    assert result.ok and result.stdout == "started\n" and time.perf_counter() - started < 5
    timed_out = sh(f"setsid sleep {marker} {quiet} & while :; do :; done", workdir, user, timeout=1)
    assert timed_out.timed_out
    time.sleep(0.2)
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    survivors.append(pid)
        except OSError:
            continue
    assert survivors == []


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_host_processes_cannot_be_signalled(user, workdir):
    victim = subprocess.Popen(["sleep", "30"], user=user, group=user, extra_groups=[] if user else None)
    try:
        # only the victim's pid: a broad "kill -1" would, in a sandbox that had lost its pid namespace, hit the host
        result = sh(f"kill -9 {victim.pid}; echo done", workdir, user)
        time.sleep(0.1)
        assert victim.poll() is None, result
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_fork_loop_is_bounded(user, workdir):
    if user is None and ROOT and "pids" not in cgroup_controllers():
        pytest.skip("no pids cgroup here: a root caller's fork loop is bounded only by the wall time")
    code = """
import os, time
started = 0
for _ in range(300):
    try:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
    except OSError:
        break
    started += 1
print(started)
"""
    begun = time.perf_counter()
    result = sh(f"python3 - <<'EOF'\n{code}\nEOF", workdir, user, processes=32)
    assert result.ok and int(result.stdout) < 32, result
    assert time.perf_counter() - begun < 5  # the children sleeping 5 s died with the call
    leftovers = [d for p in parents() for d in os.listdir(p.path) if d.startswith(f"mmx-sandbox-{os.getpid()}-")]
    assert leftovers == []  # the run's cgroups are gone too


@pytest.mark.parametrize("user", USERS, indirect=True)
def test_total_memory_of_the_run_is_bounded(user, workdir):
    if "memory" not in cgroup_controllers():
        pytest.skip("no memory cgroup here: memory is bounded per process (address space) only")
    # four processes of 100 MB each at once, each well within its 512 MB address space, against 200 MB for the run
    code = "import time\nblock = b'x' * (100 * 2**20)\ntime.sleep(0.5)\nprint('done', flush=True)"
    result = sh(" & ".join(f'python3 -c "{code}"' for _ in range(4)) + " & wait", workdir, user, total_memory_mb=200)
    assert result.memory_exceeded and result.stdout.count("done") < 4, result
    # the private /tmp is memory too
    result = sh(
        "head -c 300000000 /dev/zero > /tmp/big; stat -c %s /tmp/big", workdir, user, total_memory_mb=200, file_mb=1024
    )
    size = result.stdout.split()
    assert result.memory_exceeded or (size and int(size[-1]) <= 200 * 2**20), result


# ---------------------------------------------------------------------------------------------------- file tools
SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(sys.argv[1])
while True:  # atomically exchange the directory "d" and the symlink "swap" -> outside
    libc.renameat2(-100, b"d", -100, b"swap", 2)
"""


def test_write_file_cannot_be_raced_outside_by_a_symlink_swap(tmp_path):
    from mmx.agent.tools import ToolError, Workspace, file_tools

    if not hasattr(ctypes.CDLL(None), "renameat2"):
        pytest.skip("the C library has no renameat2 to swap atomically")
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "d").mkdir(parents=True)
    outside.mkdir()
    (work / "swap").symlink_to(outside)
    write = {t.name: t for t in file_tools(Workspace(str(work)))}["write_file"]
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(work)])
    outcomes = {"written": 0, "refused": 0}
    try:
        time.sleep(0.1)
        for _ in range(2000):  # the former realpath-then-open let 4 to 120 of 2000 writes out here
            try:
                write({"path": "d/f.txt", "content": "x"})
                outcomes["written"] += 1
            except ToolError:
                outcomes["refused"] += 1
            assert list(outside.iterdir()) == [], outcomes
    finally:
        swapper.kill()
        swapper.wait()
    assert outcomes["written"] > 0 and outcomes["refused"] > 0, outcomes  # both states were met: the race was on
