"""Sandboxed execution of model-written Python.

Model output (Mixture-of-Thought's code modality, code rewards) runs in a separate process so that a crash,
hang, fork bomb or attack ends as a scored failure, never as damage to the run (DESIGN.md, "Safety of running
model output"). The layers, each best effort and listed in ``SandboxResult.layers`` when they took effect:

* the host starts a launcher (this file run as a script) in its own session, with a scrubbed environment,
  no file descriptors but stdin/stdout/stderr, and a fresh scratch directory as cwd; it caps the output while
  reading, and at the wall-clock limit has the launcher kill its child, then SIGKILLs the whole process group;
* the launcher enters new network and PID namespaces ("net-namespace", "pid-namespace", plus
  "user-namespace" when the host is not root): no network, and every process the code starts dies with it;
* the payload process sets rlimits (CPU, address space, file size, no core dumps; "process-limit" once it is
  an unprivileged user), drops from root to ``nobody`` ("uid 65534"), sets no_new_privs and runs
  ``python -I -S`` with an audit hook that refuses non-Unix sockets ("socket-audit-hook", the fallback where
  no network namespace is available) on ``main.py`` in the scratch directory.

Not covered: files the code leaves in world-writable places outside the scratch directory (/tmp, /dev/shm),
and reading world-readable files (and /proc) of the host.
"""

import ctypes
import errno
import functools
import json
import os
import pwd
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, fields
from typing import Any, NoReturn

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_NOBODY = 65534  # uid/gid when the system has no "nobody" entry
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_KILL_GRACE_SECONDS = 1.0  # how long the launcher gets to kill and reap its child when asked to stop
_DRAIN_SECONDS = 0.5  # how long output may still arrive after the launcher exited
_STATUS_CAP = 1 << 16
_NETWORK_MESSAGE = "network access blocked by sandbox"
_FILE_TOO_LARGE = f"[Errno {errno.EFBIG}]"  # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as this OSError

# Runs in the payload interpreter: block network sockets, then execute main.py as __main__.
_RUNNER = f"""\
import builtins
import runpy
import sys


def _guard(event, args):
    if event == "socket.__new__" and args[1] != 1:  # 1 is AF_UNIX
        raise PermissionError({_NETWORK_MESSAGE!r})


sys.addaudithook(_guard)
del _guard
builtins.exit = builtins.quit = sys.exit  # -S skips site, which defines them
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run (``max_file_bytes`` caps each file the code writes)."""

    cpu_seconds: int = 2
    wall_seconds: float = 5
    memory_mb: int = 512
    max_output_bytes: int = 64_000
    max_processes: int = 16
    max_file_bytes: int = 16_000_000

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            kinds = (int, float) if field.name == "wall_seconds" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
                raise ValueError(f"SandboxLimits.{field.name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run; ``reason`` says why it failed and is None exactly when it succeeded.

    ``exit_code`` is negative when a signal killed the code, None when the sandbox stopped it (timeout,
    output cap) or it never ran.
    """

    exit_code: int | None
    stdout: str
    stderr: str
    reason: str | None
    wall_seconds: float
    layers: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None


_DEFAULT_LIMITS = SandboxLimits()


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = _DEFAULT_LIMITS) -> SandboxResult:
    """Run ``code`` as a script in the sandbox; every failure comes back as a result with a reason."""
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise TypeError("code and stdin must be str")
    if not isinstance(limits, SandboxLimits):
        raise TypeError("limits must be a SandboxLimits")
    start = time.monotonic()
    try:
        return _run(code, stdin, limits, start)
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxResult(None, "", "", f"sandbox error: {exc}", time.monotonic() - start)


def _run(code: str, stdin: str, limits: SandboxLimits, start: float) -> SandboxResult:
    uid, gid = _unprivileged_ids() if os.geteuid() == 0 else (None, None)
    python = _interpreter(uid, gid)
    if python is None:
        reason = f"sandbox error: no Python interpreter that uid {uid} can run"
        return SandboxResult(None, "", "", reason, time.monotonic() - start)
    scratch = tempfile.mkdtemp(prefix="incentive-sandbox-")
    try:
        with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as file:
            file.write(code)
        if uid is not None and gid is not None:
            os.chown(scratch, uid, gid)
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
            config = {
                "python": python,
                "uid": uid,
                "gid": gid,
                "cpu_seconds": limits.cpu_seconds,
                "memory_bytes": limits.memory_mb << 20,
                "max_processes": limits.max_processes,
                "max_file_bytes": limits.max_file_bytes,
                "host_pid": os.getpid(),
            }
            return _execute(
                config, stdin_file.fileno() if stdin else subprocess.DEVNULL, scratch, limits, start
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _execute(
    config: dict[str, Any], stdin: int, scratch: str, limits: SandboxLimits, start: float
) -> SandboxResult:
    status_read, status_write = os.pipe()
    config["status_fd"] = status_write
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_write,),
            cwd=scratch,
            env={"PATH": _CHILD_PATH, "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch},
            start_new_session=True,
        )
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        out, err, status, timed_out, truncated = _pump(proc, status_read, limits)
    finally:
        _kill_group(proc.pid)  # stragglers; the launcher is not reaped yet, so its group id is still ours
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_read)

    layers: list[str] = []
    error = wait_status = None
    for line in status.decode(errors="replace").splitlines():
        with suppress(ValueError):
            message = json.loads(line)
            layers += message.get("layers", [])
            error = message.get("error", error)
            wait_status = message.get("wait_status", wait_status)
    stopped = timed_out or truncated  # any status is then the sandbox's kill, not the code's
    exit_code = None if wait_status is None or stopped else os.waitstatus_to_exitcode(wait_status)
    if error is None and exit_code is None and not stopped:
        error = f"no exit status (launcher exited with {proc.returncode})"
    stderr = err.decode(errors="replace")
    reason = _reason(exit_code, stderr, error=error, timed_out=timed_out, truncated=truncated)
    return SandboxResult(
        exit_code, out.decode(errors="replace"), stderr, reason, time.monotonic() - start, tuple(layers)
    )


def _pump(
    proc: subprocess.Popen[bytes], status_fd: int, limits: SandboxLimits
) -> tuple[bytes, bytes, bytes, bool, bool]:
    """Read stdout, stderr and the launcher's status until all close, capping each; kill at the deadline."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    caps = {out_fd: limits.max_output_bytes, err_fd: limits.max_output_bytes, status_fd: _STATUS_CAP}
    buffers = {fd: bytearray() for fd in caps}
    deadline = time.monotonic() + limits.wall_seconds
    timed_out = truncated = stopping = launcher_done = False
    with selectors.DefaultSelector() as selector:
        for fd in caps:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if stopping or launcher_done:
                    break  # the caller SIGKILLs the group
                stopping = True
                timed_out = not truncated
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)  # the launcher kills and reaps its child
                deadline = time.monotonic() + _KILL_GRACE_SECONDS
                continue
            for key, _ in selector.select(remaining):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fd)
                    if key.fd == status_fd:  # the launcher (and its init) exited
                        launcher_done = True
                        deadline = min(deadline, time.monotonic() + _DRAIN_SECONDS)
                    continue
                buffer = buffers[key.fd]
                room = caps[key.fd] - len(buffer)
                buffer += chunk[:room]
                if len(chunk) > room and not truncated:
                    truncated = True
                    deadline = time.monotonic()
    return bytes(buffers[out_fd]), bytes(buffers[err_fd]), bytes(buffers[status_fd]), timed_out, truncated


def _reason(
    exit_code: int | None, stderr: str, *, error: str | None, timed_out: bool, truncated: bool
) -> str | None:
    if error is not None:
        return f"sandbox error: {error}"
    if truncated:
        return "output truncated"
    if timed_out:
        return "timeout"
    if exit_code is None:
        return "sandbox error: no exit status"
    if exit_code < 0:
        return "cpu limit" if -exit_code == signal.SIGXCPU else f"killed by signal {-exit_code}"
    if exit_code == 0:
        return None
    last_line = stderr.rstrip().rpartition("\n")[2]
    if last_line.startswith("MemoryError"):
        return "memory limit"
    if _NETWORK_MESSAGE in last_line:
        return "network blocked"
    if _FILE_TOO_LARGE in last_line:
        return "file size limit"
    return f"exit code {exit_code}"


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _unprivileged_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return _NOBODY, _NOBODY
    return entry.pw_uid, entry.pw_gid


@functools.cache
def _interpreter(uid: int | None, gid: int | None) -> str | None:
    """The first Python that ``uid`` can run with its standard library (a root-only venv may not qualify)."""
    own = os.path.realpath(sys.executable)
    if uid is None:
        return own
    candidates = [own]
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        found = shutil.which(name, path=_CHILD_PATH)
        if found:
            candidates.append(os.path.realpath(found))
    for python in dict.fromkeys(candidates):
        try:
            probe = subprocess.run(
                [python, "-I", "-S", "-c", "import encodings, json"],
                user=uid,
                group=gid,
                extra_groups=[],
                env={},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return python
    return None


# Everything below runs in the launcher process (this file as a script), as root when the host is root.


def _launch(config: dict[str, Any]) -> None:
    """Enter namespaces, fork the payload (under a PID-namespace init when there is one), report its status.

    SIGTERM from the host makes the launcher SIGKILL and reap its child, so no orphaned init is left behind.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the handler knows whom to kill
    os.set_inheritable(config["status_fd"], False)  # the payload's exec closes it
    _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != config["host_pid"]:
        return  # the host is already gone
    layers = _unshare(libc, as_root=config["uid"] is not None)
    _report(config, layers=layers)
    pid_namespace = "pid-namespace" in layers
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if not pid_namespace:
            _payload(config, libc)
        try:  # pid 1 of the new namespace: when it exits, the kernel kills every process left in it
            _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
            _supervise(config, libc)
        finally:
            os._exit(0)

    def stop(signum: int, frame: object) -> None:
        with suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    status = os.waitpid(child, 0)[1]
    if not pid_namespace:
        _report(config, wait_status=status)


def _unshare(libc: ctypes.CDLL, *, as_root: bool) -> list[str]:
    """Enter each new namespace that is allowed here; return the names of those entered."""
    unshare = getattr(libc, "unshare", None)
    if unshare is None:
        return []
    steps = [] if as_root else [(_CLONE_NEWUSER, "user-namespace")]
    steps += [(_CLONE_NEWNET, "net-namespace"), (_CLONE_NEWPID, "pid-namespace")]
    return [name for flag, name in steps if unshare(ctypes.c_int(flag)) == 0]


def _supervise(config: dict[str, Any], libc: ctypes.CDLL) -> None:
    """As the namespace init: fork the payload, reap orphans until it exits, and report its wait status."""
    payload = os.fork()
    if payload == 0:
        _payload(config, libc)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == payload:
            _report(config, wait_status=status)
            return


def _payload(config: dict[str, Any], libc: ctypes.CDLL) -> NoReturn:
    """Limit resources, drop privileges, and exec the isolated interpreter on main.py (in a forked child)."""
    try:
        cpu, memory, files = config["cpu_seconds"], config["memory_bytes"], config["max_file_bytes"]
        rlimits = [
            (resource.RLIMIT_CPU, cpu, cpu + 1),
            (resource.RLIMIT_AS, memory, memory),
            (resource.RLIMIT_FSIZE, files, files),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        layers = ["rlimits"]
        uid, gid = config["uid"], config["gid"]
        if uid is not None:  # root ignores RLIMIT_NPROC, and the host's own user has processes of its own
            rlimits.append((resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"]))
            layers.append("process-limit")
        for kind, soft, hard in rlimits:
            resource.setrlimit(kind, (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            layers.append(f"uid {uid}")
        if _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1) == 0:
            layers.append("no-new-privs")
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        _report(config, layers=[*layers, "socket-audit-hook"])
        python = config["python"]
        os.execve(python, [python, "-I", "-S", "-c", _RUNNER], dict(os.environ))
    except Exception as exc:
        _report(config, error=f"payload setup failed: {type(exc).__name__}: {exc}")
    finally:
        os._exit(127)


def _prctl(libc: ctypes.CDLL, option: int, value: int) -> int:
    zero = ctypes.c_ulong(0)
    return int(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero))


def _report(config: dict[str, Any], **message: object) -> None:
    os.write(config["status_fd"], (json.dumps(message) + "\n").encode())


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
