"""Sandboxed execution of model-written Python.

Model output (Mixture-of-Thought's code modality, code rewards) runs in a separate process so that a crash,
hang, fork bomb or attack ends as a scored failure, never as damage to the run; docs/sandbox.md says what the
sandbox promises and what it does not. The layers, each listed in ``SandboxResult.layers`` when it took effect:

* the host starts a launcher (this file run as a script) in its own session, with a scrubbed environment,
  no file descriptors but stdin/stdout/stderr, and a fresh scratch directory (mode 0700) as cwd; it caps the
  output while reading, and at the wall-clock limit has the launcher kill its child, then SIGKILLs the whole
  process group;
* the launcher enters new mount, network, IPC and PID namespaces ("mount-namespace", "net-namespace",
  "ipc-namespace", "pid-namespace", after "user-namespace" when the host is not root): no network, and every
  process the code starts dies with it. In the mount namespace the host's mounts turn read-only
  ("read-only-root"), /tmp, /var/tmp, /dev/shm and /run become small empty tmpfs of the run's own
  ("private-tmp") with the scratch directory mounted back, writable, at its own path, and the namespace's init
  mounts a /proc that shows only the sandbox's processes ("private-proc");
* the payload process sets rlimits (CPU, address space, file size, no core dumps; "process-limit" once it is
  an unprivileged user), drops from root to a uid that no other run holds ("uid N", from ``SANDBOX_UIDS``),
  sets no_new_privs, installs a seccomp filter that refuses Unix sockets but stream socketpairs
  ("unix-socket-filter") and runs ``python -I -S`` with an audit hook that refuses network sockets and Unix
  socket addresses outside the scratch directory ("socket-audit-hook") on ``main.py``.

Where a layer is unavailable (no unprivileged user namespaces, an old kernel, another architecture) the run
goes on without it, and a warning names the missing layers once per process.
"""

import ctypes
import errno
import functools
import grp
import json
import logging
import os
import pwd
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, fields
from typing import Any, NoReturn

log = logging.getLogger(__name__)

# Uids (and gids of the same number) for runs started as root, one per concurrent run; systemd leaves
# 0x70000000-0x7FFDFFFF unassigned, and a uid that has an account here is skipped.
SANDBOX_UIDS = range(0x7B000000, 0x7B000000 + 0x10000)
_EXPECTED_LAYERS = (
    "mount-namespace",
    "read-only-root",
    "private-tmp",
    "private-proc",
    "net-namespace",
    "ipc-namespace",
    "pid-namespace",
    "unix-socket-filter",
)
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")  # world-writable, or home to the host's sockets
_PRIVATE_INODES = 4096
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
_SYS_IO_URING_SETUP = 425  # io_uring can open sockets without the socket syscall
_PR_SET_PDEATHSIG = 1
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_PR_SET_NO_NEW_PRIVS = 38
_NOBODY = 65534  # the uid of every run where this user namespace maps no SANDBOX_UIDS
# Per machine: its audit arch and the numbers of socket and socketpair.
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41, 53), "aarch64": (0xC00000B7, 198, 199)}
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_KILL_GRACE_SECONDS = 1.0  # how long the launcher gets to kill and reap its child when asked to stop
_DRAIN_SECONDS = 0.5  # how long output may still arrive after the launcher exited
_STATUS_CAP = 1 << 16
_NETWORK_MESSAGE = "network access blocked by sandbox"
_FILE_TOO_LARGE = f"[Errno {errno.EFBIG}]"  # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as this OSError

# Runs in the payload interpreter: block network sockets, then execute main.py as __main__.
_RUNNER = f"""\
import builtins
import os
import runpy
import sys

_SCRATCH = os.getcwd() + os.sep
_ADDRESSED = {{"socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg"}}


def _in_scratch(address):
    if isinstance(address, (bytes, bytearray)):
        address = os.fsdecode(bytes(address))
    return isinstance(address, str) and "\\0" not in address and os.path.realpath(address).startswith(_SCRATCH)


def _guard(event, args):
    if event == "socket.__new__" and args[1] != 1:  # 1 is AF_UNIX
        raise PermissionError({_NETWORK_MESSAGE!r})
    if event in _ADDRESSED and args[0].family == 1 and args[1] is not None and not _in_scratch(args[1]):
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
        result = _run(code, stdin, limits, start)
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxResult(None, "", "", f"sandbox error: {exc}", time.monotonic() - start)
    missing = tuple(layer for layer in _EXPECTED_LAYERS if layer not in result.layers)
    if missing and result.layers:
        _warn_missing(missing)
    return result


def _run(code: str, stdin: str, limits: SandboxLimits, start: float) -> SandboxResult:
    claim: AbstractContextManager[int | None]
    if os.geteuid() != 0:
        claim, probe_uid = nullcontext(), None
    elif _uids_mapped():
        claim, probe_uid = _claimed_uid(), SANDBOX_UIDS[0]
    else:  # a user namespace without the range (a rootless container): every run is nobody
        _warn_missing(("a uid of its own",))
        claim, probe_uid = nullcontext(_NOBODY), _NOBODY
    python = _interpreter(probe_uid)
    if python is None:
        reason = f"sandbox error: no Python interpreter that uid {probe_uid} can run"
        return SandboxResult(None, "", "", reason, time.monotonic() - start)
    with claim as uid:
        scratch = tempfile.mkdtemp(prefix="incentive-sandbox-")  # mode 0700
        try:
            with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as file:
                file.write(code)
            if uid is not None:
                os.chown(scratch, uid, uid)
            with tempfile.TemporaryFile() as stdin_file:
                stdin_file.write(stdin.encode())
                stdin_file.seek(0)
                config = {
                    "python": python,
                    "uid": uid,
                    "scratch": scratch,
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


@functools.cache
def _warn_missing(missing: tuple[str, ...]) -> None:
    """Say once per set of missing layers that runs here are less isolated than docs/sandbox.md promises."""
    log.warning(
        "sandbox runs without %s (unavailable here); see docs/sandbox.md for what is then exposed",
        ", ".join(missing),
    )


@contextmanager
def _claimed_uid() -> Iterator[int]:
    """Hold a uid of ``SANDBOX_UIDS`` that no other run holds and no account or group owns, for one run.

    The claim is an abstract Unix socket bound in the host's network namespace: it spans processes and goes
    away with its holder, even after a crash.
    """
    offset = int.from_bytes(os.urandom(4), "little")  # not the random module: the run's RNG stays untouched
    for step in range(len(SANDBOX_UIDS)):
        uid = SANDBOX_UIDS[(offset + step) % len(SANDBOX_UIDS)]
        if _has_account(uid):
            continue
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0incentive-sandbox-uid-{uid}")
        except OSError:
            claim.close()
            continue
        with claim:
            yield uid
        return
    raise OSError(errno.EAGAIN, "every sandbox uid is in use")


@functools.cache
def _uids_mapped() -> bool:
    """Whether this process's user namespace maps every uid and gid of ``SANDBOX_UIDS``."""
    low, high = SANDBOX_UIDS[0], SANDBOX_UIDS[-1]
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/self/{name}") as file:
            spans = [tuple(map(int, line.split())) for line in file]
        if not any(first <= low and high < first + count for first, _, count in spans):
            return False
    return True


def _has_account(uid: int) -> bool:
    """Whether ``uid`` names a user or a group here: a run taking it would own that account's files."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        try:
            grp.getgrgid(uid)
        except KeyError:
            return False
    return True


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


@functools.cache
def _interpreter(uid: int | None) -> str | None:
    """The first Python that ``uid`` can run with its standard library (a root-only venv may not qualify).

    Every uid of ``SANDBOX_UIDS`` is a stranger to the host's files, so probing one answers for all.
    """
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
                group=uid,
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
    mount_namespace = "mount-namespace" in layers
    if mount_namespace:
        try:
            layers += _private_filesystem(libc, config["scratch"], config["max_file_bytes"])
        except OSError as exc:
            _report(config, layers=layers, error=f"filesystem setup failed: {exc}")
            return
    _report(config, layers=layers)
    pid_namespace = "pid-namespace" in layers
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if not pid_namespace:
            _payload(config, libc)
        try:  # pid 1 of the new namespace: when it exits, the kernel kills every process left in it
            _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
            if mount_namespace:  # a proc of this PID namespace: the host's processes drop out of sight
                with suppress(OSError):
                    _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
                    _report(config, layers=["private-proc"])
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
    """Enter each new namespace that is allowed here; return the names of those entered.

    Without root a user namespace comes first; it maps the host's uid and gid to themselves, so that files
    the launcher makes in its own mounts have an owner and the payload holds no capability after exec.
    """
    unshare = getattr(libc, "unshare", None)
    if unshare is None:
        return []
    layers = []
    if not as_root:
        uid, gid = os.getuid(), os.getgid()
        if unshare(ctypes.c_int(_CLONE_NEWUSER)) != 0:
            return []  # every other namespace needs privileges this process lacks
        layers.append("user-namespace")
        maps = {"setgroups": "deny", "uid_map": f"{uid} {uid} 1", "gid_map": f"{gid} {gid} 1"}
        for name, text in maps.items():
            with suppress(OSError), open(f"/proc/self/{name}", "w") as file:
                file.write(text)
    steps = [
        (_CLONE_NEWNS, "mount-namespace"),
        (_CLONE_NEWNET, "net-namespace"),
        (_CLONE_NEWIPC, "ipc-namespace"),
        (_CLONE_NEWPID, "pid-namespace"),
    ]
    return layers + [name for flag, name in steps if unshare(ctypes.c_int(flag)) == 0]


def _private_filesystem(libc: ctypes.CDLL, scratch: str, tmpfs_bytes: int) -> list[str]:
    """In the new mount namespace: host mounts read-only, empty private tmpfs, and the scratch dir writable.

    Raises OSError where the scratch directory cannot be mounted back, since the run cannot work without it.
    """
    layers = []
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
    # struct mount_attr: attributes to set, to clear, propagation, user namespace
    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    recursive_read_only = libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(b"/"),
        ctypes.c_uint(_AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if recursive_read_only == 0:
        layers.append("read-only-root")
    options = f"mode=1777,size={tmpfs_bytes},nr_inodes={_PRIVATE_INODES}"
    mounted: set[str] = set()
    failed = False
    for path in map(os.path.realpath, _PRIVATE_DIRS):
        if path in mounted or not os.path.isdir(path):
            continue  # absent, or hidden under an earlier one: nothing of the host's to reach there
        try:
            _mount(libc, "tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
        except OSError:
            failed = True
        mounted.add(path)
    if not failed:
        layers.append("private-tmp")
    try:
        visible = os.path.samestat(os.stat(scratch), os.stat("."))
    except FileNotFoundError:
        visible = False
    if not visible:  # hidden under a private tmpfs: make its path there
        os.makedirs(scratch, mode=0o700)
    _mount(libc, ".", scratch, None, _MS_BIND)  # the cwd still is the host's scratch directory
    _mount(libc, None, scratch, None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV)  # writable again
    os.chdir(scratch)
    return layers


def _mount(
    libc: ctypes.CDLL,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    """mount(2) with None as NULL; raises OSError, naming the target, where it fails."""
    args = [None if value is None else os.fsencode(value) for value in (source, target, fstype, data)]
    if libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


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
        uid = config["uid"]
        if uid is not None:  # root ignores RLIMIT_NPROC, and the host's own user has processes of its own
            rlimits.append((resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"]))
            layers.append("process-limit")
        for kind, soft, hard in rlimits:
            resource.setrlimit(kind, (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            layers.append(f"uid {uid}")
        if _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1) == 0:
            layers.append("no-new-privs")
            if _filter_unix_sockets(libc):
                layers.append("unix-socket-filter")
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        _report(config, layers=[*layers, "socket-audit-hook"])
        python = config["python"]
        os.execve(python, [python, "-I", "-S", "-c", _RUNNER], dict(os.environ))
    except Exception as exc:
        _report(config, error=f"payload setup failed: {type(exc).__name__}: {exc}")
    finally:
        os._exit(127)


def _filter_unix_sockets(libc: ctypes.CDLL) -> bool:
    """Install a seccomp filter that refuses (EPERM) new Unix sockets, socketpairs but SOCK_STREAM and io_uring.

    Path and abstract sockets of the host are then out of reach wherever they live; a stream socketpair (what
    multiprocessing and asyncio use) cannot be pointed anywhere. Other ABIs (i386, x32) are refused whole.
    Returns False on architectures without a known syscall table, or where seccomp is unavailable.
    """
    arch = _SECCOMP_ARCHES.get(os.uname().machine)
    if arch is None or sys.byteorder != "little":  # the filter reads the low 32 bits of each argument
        return False
    audit_arch, nr_socket, nr_socketpair = arch
    # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGE|BPF_K, BPF_ALU|BPF_AND|BPF_K, BPF_RET|BPF_K
    load, jeq, jge, and_, ret = 0x20, 0x15, 0x35, 0x54, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    program = [  # (code, jump if true, jump if false, k); seccomp_data: nr at 0, arch at 4, args from 16
        (load, 0, 0, 4),
        (jeq, 1, 0, audit_arch),
        (ret, 0, 0, deny),  # 2: another ABI
        (load, 0, 0, 0),
        (jge, 0, 1, 0x40000000),
        (ret, 0, 0, deny),  # 5: x32
        (jeq, 0, 1, _SYS_IO_URING_SETUP),
        (ret, 0, 0, deny),  # 7: io_uring
        (jeq, 0, 4, nr_socket),
        (load, 0, 0, 16),
        (jeq, 0, 1, socket.AF_UNIX),
        (ret, 0, 0, deny),  # 11: socket(AF_UNIX, ...)
        (ret, 0, 0, allow),  # 12: socket of another family
        (jeq, 0, 4, nr_socketpair),
        (load, 0, 0, 24),
        (and_, 0, 0, 0xF),  # SOCK_TYPE_MASK: drops SOCK_NONBLOCK and SOCK_CLOEXEC
        (jeq, 1, 0, socket.SOCK_STREAM),
        (ret, 0, 0, deny),  # 17: a datagram socketpair could still send to any path
        (ret, 0, 0, allow),
    ]

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*(SockFilter(*instruction) for instruction in program))
    fprog = SockFprog(len(program), filters)
    return _prctl(libc, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog)) == 0


def _prctl(libc: ctypes.CDLL, option: int, value: int, pointer: int = 0) -> int:
    zero = ctypes.c_ulong(0)
    return int(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(pointer), zero, zero))


def _report(config: dict[str, Any], **message: object) -> None:
    os.write(config["status_fd"], (json.dumps(message) + "\n").encode())


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
