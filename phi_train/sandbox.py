"""Run untrusted, model-generated Python programs and say whether they ran to their end.

This is the ONE sandbox of the project: HumanEval/MBPP scoring (`phi_train.evaluate`) and the validator of synthetic
exercises both call `run_program` / `run_programs`. phi-1 is scored by executing its completions against unit tests
(§2 and §3 of "Textbooks Are All You Need"), so code that a model wrote runs on our machines many thousands of times.

Each program runs in its own process (a new session / process group): a fork of a warm, clean `python -I` zygote
(or, with PHI_SANDBOX_ZYGOTE=0, a fresh interpreter), in which a small bootstrap sets the layers below up *before* the
program's first line runs. The zygote only saves the interpreter start and imports (~40 ms a program); see ZYGOTE.

What is protected (when the harness runs as root, as on our training nodes and CI):
  * Time: a wall-clock timeout kills the whole process group (SIGKILL), and RLIMIT_CPU bounds CPU time.
  * Memory / disk / descriptors: RLIMIT_AS (address space), RLIMIT_FSIZE (largest file it may write: SIGXFSZ),
    RLIMIT_NOFILE, RLIMIT_CORE=0.
  * Processes: the program runs under a private, random, unprivileged uid/gid (no supplementary groups), so
    RLIMIT_NPROC (1 + `Limits.nproc`) really bounds it: a fork bomb gets EAGAIN. (As root RLIMIT_NPROC is not
    enforced, and a shared uid such as `nobody` would let concurrent programs signal each other.) Leftover processes of
    that uid are killed after the run.
  * Other processes: with its own uid it cannot signal the harness (`os.kill(os.getppid(), 9)` is EPERM), nor read
    another process's /proc/PID/environ.
  * Filesystem: its own temp directory (removed afterwards) is its cwd and $HOME. A private mount namespace puts fresh
    small tmpfs over /tmp, /var/tmp and /dev/shm (the world-writable places) and over every directory on the path to
    the interpreter that the private uid could not read (e.g. /root, which would hide its contents: only the Python
    installation is bound back). Everything else is readable but not writable as an unprivileged uid would see it.
  * Network: a private network namespace (only a loopback that is down), so nothing is reachable, not even
    127.0.0.1; in addition socket creation is disabled inside the interpreter.
  * Environment: a scrubbed environment (minimal PATH, HOME=cwd, no API keys or anything else from the parent).
  * Faking success: a program passes only if the bootstrap reaches the end of it and reports a random nonce that the
    harness sent over stdin (not the environment), through a private pipe. `sys.exit(0)`, `os._exit(0)`, killing
    itself, or closing descriptors before the tests ran are therefore NOT passes.
  * Defence in depth inside the interpreter: os.fork/system/popen/exec*/spawn*/kill, subprocess, pty, socket,
    ctypes are disabled; writes, removals and renames of paths outside the sandbox directory raise PermissionError.

What is NOT protected:
  * This is not a VM or a container: the program shares the host kernel, so a kernel exploit escapes it; there is no
    seccomp filter (raw syscalls are reachable, e.g. via a C extension already on disk).
  * The in-interpreter guards are Python-level and can be undone by a determined program (e.g. via `gc` or frame
    introspection, which could also find the nonce): they guard against accidents, the kernel layers guard the host.
  * Without root (a developer laptop) there is no private uid or namespace: only rlimits and the in-interpreter
    guards apply, files the user can write are at risk, and the network is reachable through raw syscalls.
    `isolation()` says which layers are active.
  * It reads every world-readable file on the host (the repository, system files), and could print it into its
    output; CPU caches, disk bandwidth and kernel memory (e.g. tmpfs pages, page cache) are shared.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from phi_train.errors import PhiTrainError

VERDICTS = ("passed", "failed", "error", "timeout", "killed")


class SandboxError(PhiTrainError):
    """Bad sandbox arguments (limits out of range and the like)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    """Wall-clock seconds before the whole process group is killed (verdict "timeout")."""
    cpu_s: int = 10
    """RLIMIT_CPU in seconds (SIGXCPU, verdict "timeout")."""
    memory_mb: int = 1024
    """RLIMIT_AS in MiB: the interpreter itself needs ~30 MiB; exceeding it raises MemoryError (verdict "killed")."""
    file_size_mb: int = 16
    """RLIMIT_FSIZE in MiB, also the size of the private /tmp tmpfs."""
    nproc: int = 0
    """Extra processes *or threads* the program may create (RLIMIT_NPROC = 1 + nproc under the private uid)."""
    nofile: int = 64
    """RLIMIT_NOFILE."""
    output_chars: int = 4000
    """How much of the tail of stdout/stderr is kept in the Result."""

    def __post_init__(self) -> None:
        for key in ("timeout_s", "cpu_s", "memory_mb", "file_size_mb", "nofile"):
            if getattr(self, key) <= 0:
                raise SandboxError(f"Limits.{key}={getattr(self, key)} must be > 0")
        if self.memory_mb < 64:
            raise SandboxError(f"Limits.memory_mb={self.memory_mb} is too small for a Python interpreter (use >= 64)")
        if self.nofile < 16:
            raise SandboxError(f"Limits.nofile={self.nofile} is too small for a Python interpreter (use >= 16)")
        if self.nproc < 0 or self.output_chars < 0:
            raise SandboxError("Limits.nproc and Limits.output_chars must be >= 0")


@dataclass(frozen=True)
class Result:
    verdict: str
    """passed | failed (AssertionError) | error (other exception, early exit) | timeout | killed (limit or signal)."""
    error: str | None
    """The exception's last traceback line ("AssertionError: ...", "NameError: name 'x' ...") or what happened."""
    duration_s: float
    stdout: str = ""
    """Tail of the program's stdout (Limits.output_chars)."""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"


# The bootstrap runs as `python -I -c BOOTSTRAP` (as root when the harness is root), reads a JSON header line and the
# program from stdin, builds the layers described in the module docstring, then execs the program and reports through
# the private pipe. It only uses the standard library, and everything it needs later is bound to locals first, so a
# program that clobbers modules cannot break the report (it can only fail to produce one, which is not a pass).
_READ_STDIN = r"""
import json, os, sys
hdr = json.loads(sys.stdin.readline())
code = sys.stdin.read()
sys.stdin.close()
os.close(0)
os.open(os.devnull, os.O_RDONLY)
"""
_BODY = r"""
import builtins, ctypes, io, json, os, resource, sys, traceback
rfd, nonce, root = hdr["result_fd"], hdr["nonce"], hdr["dir"]
_write, _exit, _dumps, _fmt = os.write, os._exit, json.dumps, traceback.format_exception_only
layers = []
if hdr["uid"] is not None:
    libc = ctypes.CDLL(None, use_errno=True)
    def _mount(src, dst, fstype, flags, data):
        if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()):
            raise OSError(ctypes.get_errno(), "mount " + dst)
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
        layers.append("netns")
    if libc.unshare(0x00020000) == 0:  # CLONE_NEWNS
        try:
            _mount(None, "/", None, 16384 | (1 << 18), None)  # MS_REC | MS_PRIVATE: nothing propagates to the host
            keep = [p for p in hdr["keep"] + [root] if os.path.exists(p)]
            fds = {p: os.open(p, os.O_PATH) for p in keep}
            for d, opts in hdr["cover"]:
                if os.path.isdir(d):
                    _mount("tmpfs", d, "tmpfs", 2 | 4, opts)  # MS_NOSUID | MS_NODEV
                    for p in keep:
                        if p.startswith(d.rstrip("/") + "/"):
                            os.makedirs(p, exist_ok=True)
                            _mount("/proc/self/fd/%d" % fds[p], p, None, 4096 | 16384, None)  # MS_BIND | MS_REC
            for fd in fds.values():
                os.close(fd)
            layers.append("mountns")
        except OSError:
            pass
os.chdir(root)
MB = 1 << 20
for lim, val in (
    (resource.RLIMIT_AS, hdr["memory_mb"] * MB),
    (resource.RLIMIT_FSIZE, hdr["file_size_mb"] * MB),
    (resource.RLIMIT_NOFILE, hdr["nofile"]),
    (resource.RLIMIT_CORE, 0),
    (resource.RLIMIT_NPROC, 1 + hdr["nproc"]),
):
    resource.setrlimit(lim, (val, val))
resource.setrlimit(resource.RLIMIT_CPU, (hdr["cpu_s"], hdr["cpu_s"] + 1))
layers.append("rlimits")
if hdr["uid"] is not None:
    os.setgroups([])
    os.setresgid(hdr["uid"], hdr["uid"], hdr["uid"])
    os.setresuid(hdr["uid"], hdr["uid"], hdr["uid"])
    layers.append("uid")

def _denied(*args, **kwargs):
    raise PermissionError("disabled in the sandbox")
import socket, subprocess, shutil, pty, _socket
for mod, names in (
    (os, "fork forkpty system popen execv execve execl execle execlp execlpe execvp execvpe spawnv spawnve spawnl "
         "spawnle spawnlp spawnlpe spawnvp spawnvpe posix_spawn posix_spawnp kill killpg setsid"),
    (subprocess, "Popen call run check_call check_output getoutput getstatusoutput"),
    (socket, "socket socketpair create_connection create_server fromfd"),
    (_socket, "socket socketpair"),
    (pty, "fork spawn"),
):
    for name in names.split():
        if hasattr(mod, name):
            setattr(mod, name, _denied)
for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing"):
    sys.modules[name] = None
_real, _rootp = os.path.realpath, os.path.realpath(root) + "/"
def _inside(path, dir_fd=None):
    if isinstance(path, int):
        return True
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
    return (_real(path) + "/").startswith(_rootp)
def _guard(fn, nargs=1):
    def wrapped(*args, **kwargs):
        for p in args[:nargs]:
            if not _inside(p, kwargs.get("dir_fd")):
                raise PermissionError("%s outside the sandbox directory is not allowed: %r" % (fn.__name__, p))
        return fn(*args, **kwargs)
    wrapped.__name__ = fn.__name__
    return wrapped
for name, n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("rename", 2), ("renames", 2),
                ("replace", 2), ("truncate", 1), ("chmod", 1), ("chown", 1), ("link", 2), ("symlink", 2),
                ("mkdir", 1), ("makedirs", 1), ("utime", 1)):
    setattr(os, name, _guard(getattr(os, name), n))
shutil.rmtree = _guard(shutil.rmtree)
_open = builtins.open
def _safe_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError("writing outside the sandbox directory is not allowed: %r" % (file,))
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _safe_open
layers.append("guards")
if hdr.get("probe"):
    code = "import os, sys\nprint(os.getuid())"

def _report(status, error=None):
    msg = _dumps({"nonce": nonce, "status": status, "error": error, "layers": layers}) + "\n"
    _write(rfd, msg.encode())
    _exit(0)
del hdr
glb = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(code, "<program>", "exec"), glb)
except BaseException as exc:  # SystemExit and KeyboardInterrupt included: the program did not reach its end
    try:
        line = _fmt(type(exc), exc)[-1].strip()
    except BaseException:
        line = type(exc).__name__
    _report("raised", (type(exc).__name__, line[:2000]))
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
_report("passed")
"""
BOOTSTRAP = _READ_STDIN + _BODY

# Starting a fresh interpreter and importing what the bootstrap needs (ctypes, socket, subprocess, ...) costs ~40 ms a
# program, more than most HumanEval checks take to run. A zygote does that once: a fresh `python -I` started with the
# scrubbed environment, holding nothing of the harness, imports the modules, compiles the bootstrap body and then, per
# request, forks a child that runs exactly the body above (namespaces, rlimits, private uid, guards, program) in a
# new session. Nothing of the layers is skipped or shared: each child makes its own namespaces, uid and temp dir. The
# child closes the zygote's control socket and every descriptor but stdout, stderr and the report pipe before the
# body runs, so a program can neither talk to the zygote nor see other programs' files; the zygote runs as the harness
# (root) and the program under its private uid, so it cannot signal the zygote either. One zygote serves one harness
# thread at a time (a pool), so `run_programs` keeps its parallelism. What children of one zygote do share, as with
# any fork server: the address-space layout (ASLR is drawn once per zygote) and the str-hash seed, which only matter
# to a memory-corruption exploit of the interpreter. Set PHI_SANDBOX_ZYGOTE=0 to start a fresh interpreter per
# program instead (same verdicts, ~4x slower).
ZYGOTE = r"""
import builtins, ctypes, io, json, os, resource, sys, traceback, socket, subprocess, shutil, pty, _socket
BODY = compile(@BODY@, "<bootstrap>", "exec")
ctl = socket.socket(fileno=int(sys.argv[1]))
def _exact(buf, n):
    while len(buf) < n:
        chunk = ctl.recv(n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return buf
def _child(req, fds):
    os.setsid()
    out, err, rfd = fds
    os.close(ctl.detach())
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.closerange(3, rfd)
    os.closerange(rfd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.environ.clear()
    os.environ.update(req["env"])
    req["hdr"]["result_fd"] = rfd
    glb = {"__name__": "__bootstrap__", "__builtins__": builtins, "hdr": req.pop("hdr"), "code": req.pop("code")}
    exec(BODY, glb)
while True:
    head, fds, _, _ = socket.recv_fds(ctl, 8, 3)
    if not head:
        os._exit(0)
    req = json.loads(_exact(b"", int.from_bytes(_exact(head, 8), "big")))
    pid = os.fork()
    if pid == 0:
        try:
            _child(req, fds)
        finally:
            os._exit(1)
    del req
    for fd in fds:
        os.close(fd)
    ctl.sendall(b"P%d\n" % pid)
    ctl.sendall(b"S%d\n" % os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
""".replace("@BODY@", repr(_BODY))


# Signals that mean "a limit was hit" -> the verdict for a program that died of them without reporting.
_SIGNAL_VERDICT = {signal.SIGXCPU: "timeout", signal.SIGXFSZ: "killed", signal.SIGKILL: "killed"}
_RESOURCE_EXCEPTIONS = ("MemoryError",)
_UID_RANGE = (2**30, 2**30 + 2**24)  # private uids/gids: far above any real account, unlikely to collide


def _is_root() -> bool:
    return os.geteuid() == 0


def _readable_by_others(path: str) -> bool:
    st = os.stat(path)
    return bool(st.st_mode & stat.S_IROTH and st.st_mode & stat.S_IXOTH)


def _interpreter_paths() -> tuple[list[str], list[str]]:
    """Paths the private uid must read to run Python, and the directories that hide them from it (e.g. /root 0700)."""
    paths = {
        os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)))
    }
    keep = sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths))
    cover: set[str] = set()
    for path in keep:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            anc = "/" + "/".join(parts[:i])
            if anc != path and not _readable_by_others(anc):
                cover.add(anc)
                break
    return keep, sorted(cover)


_KEEP, _HIDE = _interpreter_paths()


def _cover_list(limits: Limits) -> list[tuple[str, str]]:
    tmp_opts = f"size={limits.file_size_mb}m,mode=1777,nr_inodes=4096"
    cover = [(d, tmp_opts) for d in ("/tmp", "/var/tmp", "/dev/shm")]
    cover += [(d, "size=1m,mode=0755,nr_inodes=1024") for d in _HIDE]
    return cover


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process of the private uid (a fork may have left the process group), until none is left.

    Zombies are skipped: they are dead already and only wait for init to reap them."""
    for _ in range(50):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
            except (OSError, ValueError):
                continue
            if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.01)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _tail(f, n: int) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * n))
    return f.read().decode("utf-8", "replace")[-n:] if n else ""


def _spawn_fresh(header: dict, code: str, env: dict, out, err, wfd: int) -> subprocess.Popen:
    """A new `python -I` running BOOTSTRAP, fed the header and the program on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", "-c", BOOTSTRAP],
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=err,
        cwd=header["dir"],
        env=env,
        pass_fds=(wfd,),
        start_new_session=True,
        close_fds=True,
    )
    try:
        proc.stdin.write((json.dumps(header) + "\n" + code).encode("utf-8", "surrogatepass"))
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    return proc


class _Zygote:
    """A warm `python -I` that forks one sandboxed child per request (see ZYGOTE); talks over a socketpair."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", ZYGOTE, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env=env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                close_fds=True,
            )
        finally:
            theirs.close()
        self.sock, self.owner = ours, os.getpid()
        self.reader = ours.makefile("rb")

    def spawn(self, payload: bytes, fds: list[int]) -> int:
        """Hand over one request (its stdout, stderr and report descriptors travel as SCM_RIGHTS); the child's pid."""
        socket.send_fds(self.sock, [len(payload).to_bytes(8, "big")], fds)
        self.sock.sendall(payload)
        line = self.reader.readline()
        if not line.startswith(b"P"):
            raise OSError("sandbox zygote did not start the program")
        return int(line[1:])

    def wait(self) -> int:
        """The child's exit code as Popen reports it (-N: killed by signal N)."""
        line = self.reader.readline()
        if not line.startswith(b"S"):
            raise OSError("sandbox zygote died")
        return int(line[1:])

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


_POOL: list[_Zygote] = []
_POOL_LOCK = threading.Lock()


def _release(z: _Zygote) -> None:
    with _POOL_LOCK:
        _POOL.append(z)


def _spawn_in_zygote(header: dict, code: str, env: dict, out, err, wfd: int) -> tuple[_Zygote | None, int]:
    """(zygote, pid) of the program started by a pooled zygote, or (None, 0) when zygotes are off or failing."""
    if os.environ.get("PHI_SANDBOX_ZYGOTE", "1") == "0":
        return None, 0
    payload = json.dumps({"hdr": header, "code": code, "env": env}).encode()
    for _ in range(2):  # a stale zygote (it died, or this process forked since) is dropped and replaced once
        with _POOL_LOCK:
            z = _POOL.pop() if _POOL else None
        try:
            if z is None or z.owner != os.getpid():
                z = _Zygote()
            return z, z.spawn(payload, [out.fileno(), err.fileno(), wfd])
        except OSError:
            if z is not None:
                z.close()
    return None, 0


def _run(code: str, limits: Limits, probe: bool = False) -> tuple[Result, list[str]]:
    if not isinstance(code, str):
        raise SandboxError(f"program must be a str, got {type(code).__name__}")
    root = _is_root()
    uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if root else None
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="phi-sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    header = {
        "result_fd": wfd,
        "nonce": nonce,
        "dir": workdir,
        "uid": uid,
        "keep": _KEEP,
        "cover": _cover_list(limits),
        "memory_mb": limits.memory_mb,
        "file_size_mb": limits.file_size_mb,
        "nofile": limits.nofile,
        "nproc": limits.nproc,
        "cpu_s": limits.cpu_s,
        "probe": probe,
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    env |= {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}  # threads count in NPROC
    start = time.monotonic()
    zygote = None
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                zygote, pid = _spawn_in_zygote(header, code, env, out, err, wfd)
                if zygote is None:
                    proc = _spawn_fresh(header, code, env, out, err, wfd)
                    pid, wait = proc.pid, proc.wait
                else:
                    wait = zygote.wait
            finally:
                os.close(wfd)
            # A timer instead of wait(timeout=): Popen.wait polls with sleeps up to 50 ms, which would add ~30 ms to
            # every program; a blocking wait returns the moment the child exits.
            expired, finished = threading.Event(), threading.Event()

            def expire() -> None:
                if not finished.is_set():
                    expired.set()
                    _killpg(pid)
                    try:  # a zygote child that has not reached its setsid() yet is not a group leader
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass

            timer = threading.Timer(limits.timeout_s, expire)
            timer.start()
            try:
                returncode = wait()
            except OSError:  # the zygote died under us: its child is killed below, the verdict is not a pass
                returncode = -signal.SIGKILL
                zygote.close()
                zygote = None
            finished.set()
            timer.cancel()
            timed_out = expired.is_set()
            duration = time.monotonic() - start
            _killpg(pid)  # anything left in its process group
            if uid is not None and limits.nproc > 0:
                _kill_uid(uid)
            report = _read_report(rfd, nonce)
            stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
    finally:
        if zygote is not None:
            _release(zygote)
        os.close(rfd)
        shutil.rmtree(workdir, ignore_errors=True)
    verdict, error = _verdict(report, returncode, timed_out, limits)
    return Result(verdict, error, duration, stdout, stderr), (report or {}).get("layers", [])


def _read_report(rfd: int, nonce: str) -> dict | None:
    data = b""
    while True:
        try:
            chunk = os.read(rfd, 65536)
        except BlockingIOError:
            break
        if not chunk or len(data) > 1 << 20:
            break
        data += chunk
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("nonce") == nonce:
            return msg
    return None


def _verdict(report: dict | None, returncode: int, timed_out: bool, limits: Limits) -> tuple[str, str | None]:
    if timed_out:
        return "timeout", f"wall-clock timeout after {limits.timeout_s:g}s"
    if report is not None:
        if report["status"] == "passed":
            return "passed", None
        kind, line = report["error"]
        if kind == "AssertionError":
            return "failed", line
        if kind in _RESOURCE_EXCEPTIONS or "File too large" in line:
            return "killed", line
        return "error", line
    if returncode < 0:
        sig = signal.Signals(-returncode)
        verdict = _SIGNAL_VERDICT.get(sig, "killed")
        return verdict, f"killed by {sig.name}"
    return "error", f"exited with status {returncode} before the end of the program"


def run_program(code: str, limits: Limits = Limits()) -> Result:
    """Run one program in a fresh sandboxed interpreter; `passed` only if execution reached its last line."""
    return _run(code, limits)[0]


def run_programs(
    codes: list[str], limits: Limits = Limits(), workers: int | None = None, progress: bool = False
) -> list[Result]:
    """Run many programs, `workers` at a time (default: CPU count), results in input order.

    Threads are enough: each worker only waits on its child process. Popen is called without preexec_fn, so spawning
    from several threads at once is safe.
    """
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise SandboxError(f"workers={workers} must be >= 1")
    results: list[Result | None] = [None] * len(codes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(codes), desc="sandbox", unit="prog")
    lock = threading.Lock()

    def one(i: int) -> None:
        results[i] = run_program(codes[i], limits)
        if bar is not None:
            with lock:
                bar.update(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(codes))))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def isolation() -> list[str]:
    """The layers active on this host: netns, mountns, rlimits, uid, guards (see the module docstring)."""
    return _run("", Limits(), probe=True)[1]


if __name__ == "__main__":  # python -m phi_train.sandbox: print the active layers (a quick check of a new host)
    print("sandbox layers:", ", ".join(isolation()) or "none")
