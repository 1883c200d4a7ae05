import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from incentive.sandbox import SandboxLimits, SandboxResult, run_python

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the sandbox's isolation layers are Linux-specific"
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="privileges are only dropped when the host runs as root")
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3)

FORK_BOMB = """\
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def nobody_pids() -> set[int]:
    """Processes whose real uid is 65534, from /proc."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                uid_line = next(line for line in status if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid_line.split()[1] == "65534":
            pids.add(int(entry))
    return pids


def assert_no_new_nobody_processes(before: set[int]) -> None:
    deadline = time.monotonic() + 2
    while (left := nobody_pids() - before) and time.monotonic() < deadline:
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
    before = nobody_pids()
    result = run_python(FORK_BOMB, limits=SandboxLimits(cpu_seconds=1, wall_seconds=2))
    assert not result.ok and result.reason
    assert subprocess.run(["true"], check=False).returncode == 0
    if ROOT:
        assert_no_new_nobody_processes(before)
    assert run_python("print('next')", limits=FAST).stdout == "next\n"


@needs_root
def test_detached_background_process_dies_with_the_run():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('parent done')"
    before = nobody_pids()
    result = run_python(code, limits=FAST)
    if "pid-namespace" not in result.layers:
        pytest.skip("a detached process is only contained by a PID namespace, unavailable here")
    assert result.ok and result.stdout == "parent done\n"
    assert_no_new_nobody_processes(before)


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
def test_files_outside_the_scratch_dir_follow_their_permissions(tmp_path):
    (tmp_path / "secret.txt").write_text("hunter2")
    (tmp_path / "secret.txt").chmod(0o600)
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o755)  # traversable, so the file modes alone decide
        public, private = Path(shared, "public.txt"), Path(shared, "private.txt")
        public.write_text("hello")
        private.write_text("hunter2")
        private.chmod(0o600)
        code = f"""\
import os
print(open({str(public)!r}).read())
for path in ({str(private)!r}, {str(tmp_path / "secret.txt")!r}):
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
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines() == [
        "hello",
        f"denied {private}",
        f"denied {tmp_path / 'secret.txt'}",
        "denied /root",
    ]


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
