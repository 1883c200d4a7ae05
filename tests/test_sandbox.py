import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from incentive.sandbox import SANDBOX_UIDS, SandboxLimits, SandboxResult, run_python

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the sandbox's isolation layers are Linux-specific"
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="privileges are only dropped when the host runs as root")
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3)


def namespaces_available() -> bool:
    """Whether a process here may make a mount namespace: as root, or inside an unprivileged user namespace."""
    flags = 0x00020000 if ROOT else 0x10020000  # CLONE_NEWNS, plus CLONE_NEWUSER without root
    probe = f"import ctypes, sys\nsys.exit(ctypes.CDLL(None).unshare({flags}) != 0)"
    return subprocess.run([sys.executable, "-I", "-S", "-c", probe], check=False).returncode == 0


NAMESPACES = sys.platform == "linux" and namespaces_available()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="mount and PID namespaces need root or unprivileged user namespaces"
)

FORK_BOMB = """\
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def run_uid(result: SandboxResult) -> int:
    """The uid the run's code had, from its layers (runs started as root only)."""
    return next(int(layer.split()[1]) for layer in result.layers if layer.startswith("uid "))


def pids_of(uid: int) -> set[int]:
    """Processes whose real uid is ``uid``, from /proc."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                uid_line = next(line for line in status if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) == uid:
            pids.add(int(entry))
    return pids


def assert_no_processes_left(uid: int) -> None:
    deadline = time.monotonic() + 2
    while (left := pids_of(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left


def test_success_with_stdout_and_stdin():
    result = run_python("import sys\nprint('hello', sys.stdin.read().upper())", stdin="abc", limits=FAST)
    assert result.ok and result.reason is None
    assert (result.exit_code, result.stdout, result.stderr) == (0, "hello ABC\n", "")
    assert 0 < result.wall_seconds < FAST.wall_seconds


def test_exit_code_and_exit_builtin():
    result = run_python("print('partial')\nexit(3)", limits=FAST)
    assert not result.ok
    assert (result.exit_code, result.reason, result.stdout) == (3, "exit code 3", "partial\n")


def test_syntax_error():
    result = run_python("def broken(:\n    pass\n", limits=FAST)
    assert (result.ok, result.exit_code, result.reason) == (False, 1, "exit code 1")
    assert "SyntaxError" in result.stderr


def test_infinite_loop_is_stopped():
    result = run_python("while True:\n    pass\n", limits=FAST)
    assert result.reason in {"cpu limit", "timeout"}
    assert result.wall_seconds < FAST.wall_seconds + 1.5


def test_sleeping_code_hits_the_wall_clock():
    result = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(wall_seconds=1))
    assert (result.reason, result.exit_code) == ("timeout", None)
    assert 1 <= result.wall_seconds < 2.5


def test_fork_bomb_is_contained():
    result = run_python(FORK_BOMB, limits=SandboxLimits(cpu_seconds=1, wall_seconds=2))
    assert not result.ok and result.reason
    assert subprocess.run(["true"], check=False).returncode == 0
    if ROOT:
        assert_no_processes_left(run_uid(result))
    assert run_python("print('next')", limits=FAST).stdout == "next\n"


@needs_root
def test_detached_background_process_dies_with_the_run():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('parent done')"
    result = run_python(code, limits=FAST)
    if "pid-namespace" not in result.layers:
        pytest.skip("a detached process is only contained by a PID namespace, unavailable here")
    assert result.ok and result.stdout == "parent done\n"
    assert_no_processes_left(run_uid(result))


def test_memory_hog_fails():
    result = run_python("hog = bytearray(2 * 1024**3)\nprint(len(hog))", limits=FAST)
    assert result.reason == "memory limit"
    assert result.stdout == ""


def test_large_file_hits_the_file_size_limit():
    code = "with open('big.bin', 'wb') as file:\n    file.write(b'x' * 100_000)"
    result = run_python(code, limits=SandboxLimits(max_file_bytes=10_000))
    assert result.reason == "file size limit"


def test_huge_output_is_truncated_with_bounded_host_memory():
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n    sys.stderr.write('y' * 65536)"
    limits = SandboxLimits(max_output_bytes=10_000)
    tracemalloc.start()
    try:
        result = run_python(code, limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (result.reason, result.exit_code) == ("output truncated", None)
    assert 0 < len(result.stdout) <= 10_000 and len(result.stderr) <= 10_000
    assert set(result.stdout) == {"x"}
    assert peak < 2_000_000
    assert result.wall_seconds < limits.wall_seconds


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("INCENTIVE_SANDBOX_SECRET", "hunter2")
    result = run_python(
        "import json, os\nprint(json.dumps(dict(os.environ)))\nprint(os.getcwd())", limits=FAST
    )
    assert result.ok
    assert "hunter2" not in result.stdout
    env_line, cwd = result.stdout.splitlines()
    env = json.loads(env_line)
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR"}
    assert env["HOME"] == env["TMPDIR"] == cwd


@needs_root
def test_files_outside_the_scratch_dir_follow_their_permissions():
    """Host files the mount namespace leaves in sight (all but /tmp, /var/tmp, /dev/shm, /run) keep their modes."""
    private = [path for path in ("/etc/shadow", "/etc/gshadow") if os.path.exists(path)]
    code = f"""\
import os
print(open("/etc/passwd").read().startswith("root:"))
for path in {private!r}:
    try:
        print(open(path).read())
    except PermissionError:
        print("denied", path)
try:
    print(os.listdir("/root"))
except PermissionError:
    print("denied /root")
"""
    result = run_python(code, limits=FAST)
    assert result.ok
    assert result.stdout.splitlines() == ["True", *(f"denied {path}" for path in private), "denied /root"]


def test_scratch_dir_is_writable_and_removed():
    code = "import os\nwith open('data.txt', 'w') as file:\n    file.write('saved')\nprint(open('data.txt').read())\nprint(os.getcwd())"
    result = run_python(code, limits=FAST)
    assert result.ok
    content, scratch = result.stdout.splitlines()
    assert content == "saved"
    assert os.path.basename(scratch).startswith("incentive-sandbox-")
    assert not os.path.exists(scratch)


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def test_network_is_blocked(listener):
    port = listener.getsockname()[1]
    result = run_python(
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", limits=FAST
    )
    assert result.reason == "network blocked"
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_network_namespace_stops_raw_sockets(listener):
    """A libc socket skips the audit hook; the network namespace still has no route to the host."""
    port = listener.getsockname()[1]
    code = f"""\
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
address = struct.pack("<H", 2) + struct.pack(">H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
print(fd >= 0, libc.connect(fd, address, len(address)))
"""
    result = run_python(code, limits=FAST)
    if "net-namespace" not in result.layers:
        pytest.skip("no network namespace here; only the audit hook applies")
    assert result.ok and result.stdout == "True -1\n"
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_killing_its_parent_leaves_the_host_alive():
    targets = (
        "(os.getppid(), -1)" if ROOT else "(os.getppid(),)"
    )  # kill(-1) as the host's own user is no test
    code = f"import os, signal\nfor pid in {targets}:\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nprint('survived')"
    result = run_python(code, limits=FAST)
    assert isinstance(result, SandboxResult)
    if ROOT:  # as nobody it can signal neither the root launcher nor the host
        assert result.stdout == "survived\n"
    assert run_python("print('next')", limits=FAST).stdout == "next\n"


def test_inherited_file_descriptors_are_closed(tmp_path):
    path = tmp_path / "host.txt"
    path.write_text("host secret")
    fd = os.open(path, os.O_RDONLY)
    os.set_inheritable(fd, True)
    code = f"""\
import os
try:
    print(os.read({fd}, 100))
except OSError:
    print("closed")
print(sorted(int(name) for name in os.listdir("/proc/self/fd")))
"""
    try:
        result = run_python(code, limits=FAST)
    finally:
        os.close(fd)
    assert result.ok
    status, fds = result.stdout.splitlines()
    assert status == "closed"
    assert set(json.loads(fds)) <= {0, 1, 2, 3}  # 3 is listdir's own


def test_layers_are_reported():
    layers = run_python("pass", limits=FAST).layers
    assert {"rlimits", "socket-audit-hook"} <= set(layers)
    if ROOT:
        assert any(layer.startswith("uid ") for layer in layers)


@pytest.mark.parametrize(
    "fields", [{"cpu_seconds": 0}, {"memory_mb": 1.5}, {"wall_seconds": True}, {"max_output_bytes": -1}]
)
def test_invalid_limits_raise(fields):
    with pytest.raises(ValueError):
        SandboxLimits(**fields)


def test_invalid_code_raises():
    with pytest.raises(TypeError):
        run_python(b"print(1)")  # type: ignore[arg-type]


# Attacks on the host and on other runs: each must come to nothing (docs/sandbox.md, "What it promises").

SECRET = "host secret 7f3a"


@pytest.fixture
def shared_dir():
    """A host directory anyone may enter, in the shared /tmp (where /tmp/.X11-unix and the like live)."""
    with tempfile.TemporaryDirectory(prefix="incentive-test-") as path:
        os.chmod(path, 0o755)
        yield Path(path)


@contextmanager
def serving(address: str) -> Iterator[list[int]]:
    """A host Unix socket anyone may connect to that sends SECRET to each client; yields the clients served."""
    served: list[int] = []
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(address)
        if not address.startswith("\0"):
            os.chmod(address, 0o777)
        server.listen()
        server.settimeout(0.05)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    connection, _ = server.accept()
                except TimeoutError:
                    continue
                with connection:
                    connection.sendall(SECRET.encode())
                served.append(1)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield served
        finally:
            stop.set()
            thread.join()


UNIX_CLIENT = """\
import ctypes, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
for address in {addresses!r}:
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(2)
            client.connect(address)
            print("python got", client.recv(100))
    except OSError as exc:
        print("python refused", type(exc).__name__)
    fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM, past the audit hook
    raw = address.encode() if isinstance(address, str) else address
    sockaddr = struct.pack("H", 1) + raw
    if fd >= 0 and libc.connect(fd, sockaddr, len(sockaddr)) == 0:
        buffer = ctypes.create_string_buffer(100)
        size = libc.recv(fd, buffer, 100, 0)
        print("libc got", buffer.raw[: max(size, 0)])
    else:
        print("libc refused", fd)
"""


@needs_namespaces
def test_attack_host_unix_socket_in_shared_tmp(shared_dir):
    """(a) A world-writable path socket of the host, here in /tmp, is out of the sandbox's reach."""
    path = str(shared_dir / "host.sock")
    with serving(path) as served:
        result = run_python(UNIX_CLIENT.format(addresses=[path]), limits=FAST)
    assert result.ok, result.stderr
    assert SECRET not in result.stdout and "got" not in result.stdout
    assert not served


def test_host_abstract_unix_socket_is_out_of_reach():
    """Abstract sockets belong to the network namespace, so the host's are out of reach (the filter aside)."""
    name = f"\0incentive-test-{os.getpid()}-{time.monotonic_ns()}"
    with serving(name) as served:
        result = run_python(UNIX_CLIENT.format(addresses=[name.encode()]), limits=FAST)
    if "net-namespace" not in result.layers and "unix-socket-filter" not in result.layers:
        pytest.skip("neither a network namespace nor the socket filter is available here")
    assert result.ok, result.stderr
    assert "got" not in result.stdout
    assert not served


def test_unix_sockets_are_refused_but_stream_socketpairs_work():
    code = """\
import ctypes, errno, socket
libc = ctypes.CDLL(None, use_errno=True)
left, right = socket.socketpair()
left.sendall(b"pair ok")
print(right.recv(10).decode())
try:
    left.connect("/run/elsewhere.sock")
except PermissionError as exc:
    print("hook:", exc)
for label, make in (
    ("unix socket", lambda: socket.socket(socket.AF_UNIX)),
    ("datagram pair", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)),
):
    try:
        make()
        print(label, "allowed")
    except PermissionError:
        print(label, "refused")
print("libc", libc.socket(1, 1, 0), ctypes.get_errno() == errno.EPERM)
params = ctypes.create_string_buffer(120)  # struct io_uring_params
print("io_uring", libc.syscall(ctypes.c_long(425), ctypes.c_uint(1), params), ctypes.get_errno() == errno.EPERM)
"""
    result = run_python(code, limits=FAST)
    if "unix-socket-filter" not in result.layers:
        pytest.skip("no seccomp filter here (another architecture, or no seccomp)")
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == [
        "pair ok",
        "hook: network access blocked by sandbox",
        "unix socket refused",
        "datagram pair refused",
        "libc -1 True",
        "io_uring -1 True",
    ]


@needs_namespaces
def test_attack_host_processes_are_hidden():
    """(b) The host's /proc (here another process's command line) is out of sight."""
    marker = f"incentive-secret-{os.getpid()}-{time.monotonic_ns()}"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    code = f"""\
import os
pids = [name for name in os.listdir("/proc") if name.isdigit()]
for pid in pids:
    try:
        with open(f"/proc/{{pid}}/cmdline", "rb") as file:
            print(file.read().replace(b"\\0", b" ").decode())
    except OSError:
        pass
try:
    print(open("/proc/{host.pid}/cmdline").read())
except OSError as exc:
    print("host pid", type(exc).__name__)
print("processes", len(pids))
"""
    try:
        result = run_python(code, limits=FAST)
    finally:
        host.kill()
        host.wait()
    if "mount-namespace" in result.layers and "private-proc" not in result.layers:
        pytest.skip("the kernel refuses a fresh /proc here (a container that masks parts of its /proc?)")
    assert result.ok, result.stderr
    assert marker not in result.stdout
    assert int(result.stdout.splitlines()[-1].split()[1]) <= 3  # init, the code, and at most one more


@needs_namespaces
def test_attack_shared_tmp_and_shm_stay_untouched():
    """(c) /tmp, /var/tmp and /dev/shm are the run's own: usable, and gone with it; the rest is read-only."""
    name = f"incentive-leftover-{os.getpid()}-{time.monotonic_ns()}"
    places = [place for place in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(place)]
    code = f"""\
import os
for place in {places!r}:
    try:
        with open(os.path.join(place, {name!r}), "w") as file:
            file.write("left behind")
        print("wrote", place)
    except OSError as exc:
        print("refused", place, type(exc).__name__)
print("read-only root", bool(os.statvfs("/").f_flag & os.ST_RDONLY))
"""
    result = run_python(code, limits=FAST)
    leftovers = [place for place in places if os.path.exists(os.path.join(place, name))]
    for place in leftovers:
        os.remove(os.path.join(place, name))
    assert result.ok, result.stderr
    assert not leftovers
    assert [f"wrote {place}" for place in places] == result.stdout.splitlines()[:-1]
    if "read-only-root" in result.layers:
        assert result.stdout.splitlines()[-1] == "read-only root True"


def find_scratch(marker: str, timeout: float = 5) -> Path:
    """The scratch directory of the run whose main.py holds ``marker``, as the host sees it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for main in glob.glob(os.path.join(tempfile.gettempdir(), "incentive-sandbox-*", "main.py")):
            try:
                if marker in Path(main).read_text():
                    return Path(main).parent
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError(f"no scratch directory with {marker} appeared")


@pytest.mark.skipif(not ROOT and not NAMESPACES, reason="runs of one non-root user share a uid and a /tmp")
def test_attack_concurrent_runs_cannot_reach_each_other():
    """(d) A run can neither list, read nor write the scratch directory of another run going on at once."""
    marker = f"incentive-victim-{os.getpid()}-{time.monotonic_ns()}"
    victim_code = f"""\
# {marker}
import time
with open("secret.txt", "w") as file:
    file.write("victim secret")
time.sleep(3)
print(open("secret.txt").read())
"""
    with ThreadPoolExecutor(1) as pool:
        victim_future = pool.submit(run_python, victim_code, limits=SandboxLimits(wall_seconds=10))
        victim_dir = find_scratch(marker)
        deadline = time.monotonic() + 5
        while not (victim_dir / "secret.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        attack = f"""\
import os
victim = {str(victim_dir)!r}
attempts = {{
    "list": lambda: os.listdir(victim),
    "read": lambda: open(os.path.join(victim, "secret.txt")).read(),
    "write": lambda: open(os.path.join(victim, "pwned"), "w").write("pwned"),
}}
for label, attempt in attempts.items():
    try:
        print(label, "got", attempt())
    except OSError as exc:
        print(label, "refused", type(exc).__name__)
"""
        attacker = run_python(attack, limits=FAST)
        pwned = (victim_dir / "pwned").exists()
        victim = victim_future.result()
    assert attacker.ok, attacker.stderr
    assert "got" not in attacker.stdout and "victim secret" not in attacker.stdout
    assert not pwned
    assert victim.ok and victim.stdout == "victim secret\n"
    if ROOT and run_uid(victim) in SANDBOX_UIDS:
        assert run_uid(attacker) != run_uid(victim)
