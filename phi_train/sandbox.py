"""Run untrusted, model-generated Python programs and say whether they ran to their end.

This is the ONE sandbox of the project: HumanEval/MBPP scoring (`phi_train.evaluate`, through the trusted checker of
`phi_train.verdict`) and the validator of synthetic exercises both call `run_program` / `run_programs`. phi-1 is
scored by executing its completions against unit tests (§2 and §3 of "Textbooks Are All You Need"), so code that a
model wrote runs on our machines many thousands of times.

Each program runs in its own process: a fork of a warm, clean `python -I` zygote (or, with PHI_SANDBOX_ZYGOTE=0, a
fresh interpreter), in which a small bootstrap sets the layers below up *before* the program's first line runs.
`isolation()` lists the layers active on this host; as root with the libseccomp bindings installed (apt's
python3-seccomp) they are all of these:

  layer          protects                                   how
  netns          the network, even 127.0.0.1                fresh network namespace, loopback down
  ipcns          SysV IPC outliving the run                 fresh IPC namespace
  mountns        the host's mount table                     private mount namespace, nothing propagates back
  readonly       every file on the host                     every real mount remounted read-only (whatever call
                                                            writes: os.open on /run/lock included)
  tmpfs          the host disk, leftovers                   the work dir (cwd, $HOME, $TMPDIR) is a private tmpfs of
                                                            file_size_mb; /tmp, /var/tmp, /dev/shm, /run/lock are
                                                            1 MiB private tmpfs; dirs hiding the interpreter (/root)
                                                            are covered and only Python is bound back
  pidns          host processes, strays                     fresh PID namespace with its own /proc; its PID 1 kills
                                                            every other member when the program ends, and the kernel
                                                            kills the rest when PID 1 dies (no uid sweep needed)
  rlimits        CPU, memory, file size, descriptors        RLIMIT_CPU/AS/FSIZE/NOFILE/CORE/NPROC
  uid            other processes, the harness               a private random unprivileged uid/gid
  no_new_privs   privilege gain                             PR_SET_NO_NEW_PRIVS
  seccomp        the kernel's riskier surface               EPERM for namespaces (user namespaces included), mount,
                                                            ptrace, keyring, SysV IPC, memfd, io_uring, bpf, perf,
                                                            modules (SECCOMP_DENY)
  guards         accidents                                  Python-level: fork/exec/subprocess/socket/ctypes off,
                                                            writes outside the work dir refused

plus a wall-clock timer that kills the process group, and a scrubbed environment. A program passes only if the
bootstrap reaches its end and reports a random nonce through a private pipe (`sys.exit(0)`, `os._exit(0)` or a killed
process are not passes). That report lives in the program's own interpreter, so a determined program can forge it
(frames, gc): whole-program verdicts are for exercise validation and `mode=program`. Benchmarks are scored in served
mode (`run_programs(..., checkers=...)`): the program only defines the candidate, and a trusted checker in the
harness runs the tests, calling it through a `Channel` with literal values only (phi_train/verdict.py).

The harness never loses a batch to one program: any failure of its own becomes that program's `error` Result, and
its temp dirs are removed without recursion (a 1,100-level tree made shutil.rmtree raise RecursionError).

What is NOT protected:
  * This is not a VM: the program shares the host kernel, so a kernel exploit through an allowed syscall escapes it.
  * Without root (a developer laptop) there is no private uid and no namespaces: only rlimits, no_new_privs, seccomp
    (if installed) and the Python-level guards apply, files the user can write are at risk, and the network is
    reachable through raw syscalls. Without the libseccomp bindings the seccomp layer is missing, the rest stands.
  * It reads every world-readable file on the host (the repository, system files), and could print it into its
    output; CPU caches, disk bandwidth and kernel memory (e.g. tmpfs pages, page cache) are shared.
  * memfd_create is denied outright (a budget cannot be counted by seccomp).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
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
    cpu_s: float | None = None
    """CPU seconds the program used (user + system, its children included): what per-problem limits scale."""

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
import builtins, ctypes, io, json, os, resource, signal, sys, traceback
rfd, nonce, root, sfd = hdr["result_fd"], hdr["nonce"], hdr["dir"], hdr.get("serve_fd")
_write, _read, _exit, _dumps, _loads = os.write, os.read, os._exit, json.dumps, json.loads
_rusage = resource.getrusage

def _cpu():
    return sum(r.ru_utime + r.ru_stime for r in (_rusage(resource.RUSAGE_SELF), _rusage(resource.RUSAGE_CHILDREN)))
_fmt, _ast = traceback.format_exception_only, __import__("ast")
layers = []
libc = ctypes.CDLL(None, use_errno=True)

def _die_with_parent():
    # PR_SET_PDEATHSIG: SIGKILL when the process that started us dies (a SIGKILLed harness or zygote); a uid change
    # clears it, so it is set again after one. A parent that died before the call has left us to init: go now.
    ppid = os.getppid()
    libc.prctl(1, 9, 0, 0, 0)
    if os.getppid() != ppid:
        _exit(137)
_die_with_parent()

_PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore",
              "bpf", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs", "efivarfs", "rpc_pipefs", "nsfs"}

class _Floats(_ast.NodeTransformer):  # repr() writes inf and nan as names; literal_eval wants constants
    def visit_Name(self, node):
        return _ast.Constant(float(node.id)) if node.id in ("inf", "nan") else node

def _lit(text):
    return _ast.literal_eval(_Floats().visit(_ast.parse(text, mode="eval")))

def _reap(pid):
    # Wait for the child (reaping orphans too: this may be PID 1 of the namespace); its exit code, -N for signal N.
    while True:
        wpid, st = os.waitpid(-1, 0)
        if wpid == pid:
            return os.waitstatus_to_exitcode(st)

def _exit_as(code):
    if code < 0 and os.getpid() != 1:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    _exit(128 - code if code < 0 else code)  # PID 1 ignores its own signals: 128 + N, decoded by its parent

if hdr["uid"] is not None:
    def _mount(src, dst, fstype, flags, data):
        if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()):
            raise OSError(ctypes.get_errno(), "mount " + dst)
    pidns, st_w = bool(hdr.get("pid1")), None  # pid1: the zygote forked us as PID 1 of a fresh PID namespace
    if not pidns and libc.unshare(0x20000000) == 0:  # CLONE_NEWPID: our next child is PID 1 of a fresh namespace
        pidns = True
        st_r, st_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(rfd)
            if sfd is not None:
                os.close(sfd)
            os.close(st_w)
            status = b""
            while True:
                chunk = os.read(st_r, 32)
                if not chunk:
                    break
                status += chunk
            # PID 1 sends the program's status once it has killed the rest of the namespace. In a zygote (a child
            # subreaper that reaps it later) we need not wait while the kernel tears the namespaces down (RCU
            # grace periods: milliseconds of sleep per program); this process holds none of them.
            if status and hdr.get("detach"):
                _exit_as(int(status))
            code = _reap(pid)
            _exit_as(128 - code if code > 128 else code)
        os.close(st_r)
        _die_with_parent()  # a fork does not inherit it: PID 1 of the namespace dies with the process above it
    for flag, name in ((0x40000000, "netns"), (0x08000000, "ipcns")):  # CLONE_NEWNET, CLONE_NEWIPC
        if libc.unshare(flag) == 0:
            layers.append(name)
    if libc.unshare(0x00020000) == 0:  # CLONE_NEWNS
        try:
            _mount(None, "/", None, 16384 | (1 << 18), None)  # MS_REC | MS_PRIVATE: nothing propagates to the host
            ro = True
            with open("/proc/self/mountinfo") as f:
                mounts = [line.split() for line in f]
            for m in mounts:  # every mount read-only (MS_REMOUNT | MS_BIND | MS_RDONLY), keeping nosuid/nodev/noexec
                if m[m.index("-") + 1] in _PSEUDO_FS:
                    continue  # kernel interfaces whose files the private uid cannot write anyway
                opts = m[5].split(",")
                flags = 32 | 4096 | 1 | 2 * ("nosuid" in opts) | 4 * ("nodev" in opts) | 8 * ("noexec" in opts)
                mp = m[4].encode().decode("unicode_escape")
                if libc.mount(None, mp.encode(), None, flags, None) and os.path.isdir(mp):
                    ro = False
            keep = [p for p in hdr["keep"] if os.path.exists(p)]
            fds = {p: os.open(p, os.O_PATH) for p in keep}
            for d, opts in hdr["cover"]:
                if os.path.isdir(d):
                    _mount("tmpfs", d, "tmpfs", 2 | 4, opts)  # MS_NOSUID | MS_NODEV
                    for p in keep:
                        if p.startswith(d.rstrip("/") + "/"):
                            os.makedirs(p, exist_ok=True)
                            _mount("/proc/self/fd/%d" % fds[p], p, None, 4096 | 16384, None)  # MS_BIND | MS_REC
                            _mount(None, p, None, 32 | 4096 | 1, None)
            for fd in fds.values():
                os.close(fd)
            os.makedirs(root, exist_ok=True)
            _mount("tmpfs", root, "tmpfs", 2 | 4, hdr["work_opts"])  # the only writable place of any size
            layers += ["mountns"] + ["readonly"] * ro + ["tmpfs"]
        except OSError:
            pass
    if pidns:
        if "mountns" in layers:
            _mount("proc", "/proc", "proc", 2 | 4 | 8, None)  # this namespace's processes only
        layers.append("pidns")
        pid = os.fork()  # the program is PID 2: PID 1 would ignore SIGXCPU/SIGXFSZ, and its exit kills the namespace
        if pid:
            os.close(rfd)
            if sfd is not None:
                os.close(sfd)
            os.closerange(0, 3)
            code = _reap(pid)
            try:
                os.kill(-1, signal.SIGKILL)  # from PID 1: every other process of the namespace
            except OSError:
                pass
            if st_w is not None:
                os.write(st_w, b"%d" % code)
            _exit_as(code)
        if st_w is not None:
            os.close(st_w)
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
    _die_with_parent()
    layers.append("uid")
if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS: no setuid binary or file capability can lift it
    layers.append("no_new_privs")
if _SECCOMP is not None and "no_new_privs" in layers:
    try:
        _sc = _SECCOMP
        flt = _sc.SyscallFilter(_sc.ALLOW)
        for name in _DENY:
            try:
                flt.add_rule(_sc.ERRNO(1), name)
            except (RuntimeError, ValueError):  # a syscall this kernel / libseccomp does not know
                pass
        for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
            flt.add_rule(_sc.ERRNO(1), "clone", _sc.Arg(0, _sc.MASKED_EQ, flag, flag))  # CLONE_NEW*: no namespaces
        flt.add_rule(_sc.ERRNO(38), "clone3")  # ENOSYS: its flags live in memory seccomp cannot read; libc falls back
        flt.load()
        layers.append("seccomp")
        del flt, _sc
    except Exception:
        pass

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

def _send(msg):
    data = (_dumps(msg) + "\n").encode()
    while data:
        data = data[_write(rfd, data):]

def _report(status, error=None):
    _send({"nonce": nonce, "status": status, "error": error, "layers": layers, "cpu": _cpu()})
    _exit(0)

def _line(exc):
    try:
        return _fmt(type(exc), exc)[-1].strip()[:2000]
    except BaseException:
        return type(exc).__name__
del hdr
glb = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(code, "<program>", "exec"), glb)
except BaseException as exc:  # SystemExit and KeyboardInterrupt included: the program did not reach its end
    _report("raised", (type(exc).__name__, _line(exc)))
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
if sfd is None:
    _report("passed")
# Served mode (phi_train.verdict): the program only defined the candidate; the trusted checker, in the harness, calls
# it by name with literal arguments and judges the literal replies. Nothing here can change a verdict but the replies.
_send({"nonce": nonce, "status": "ready", "error": None, "layers": layers})
buf = b""
while True:
    while b"\n" not in buf:
        chunk = _read(sfd, 1 << 16)
        if not chunk:
            _send({"cpu": _cpu()})  # the checker is done: report the CPU time the calls took, and leave
            _exit(0)
        buf += chunk
    line, buf = buf.split(b"\n", 1)
    try:
        req = _loads(line)
        if req["name"] not in glb:
            raise NameError("name %r is not defined" % req["name"])
        fn = glb[req["name"]]
        args, kwargs = _lit(req["args"])
        val = fn(*args, **kwargs)
        try:
            reply = {"value": repr(val)}
        except BaseException as exc:
            reply = {"raised": ["TypeError", "repr() of the return value raised " + _line(exc)]}
    except BaseException as exc:
        try:
            reply = {"raised": [str(type(exc).__name__), str(exc)[:2000]]}
        except BaseException:
            reply = {"raised": ["Exception", "an exception whose message cannot be read"]}
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    _send(reply)
"""

# Syscalls no check program needs, denied (EPERM) by the seccomp filter: namespaces and mounts (a way out of the
# others), tracing other processes, the kernel keyring, SysV IPC (it would outlive the program without the IPC
# namespace), memfd (anonymous memory outside RLIMIT_AS and the tmpfs sizes), io_uring (its operations bypass
# seccomp), BPF, perf, module loading and other administration.
SECCOMP_DENY = (
    "unshare setns mount umount2 pivot_root chroot fsopen fsmount fsconfig fspick move_mount open_tree mount_setattr "
    "ptrace process_vm_readv process_vm_writev kcmp keyctl add_key request_key shmget shmat shmctl shmdt msgget "
    "msgsnd msgrcv msgctl semget semop semctl semtimedop memfd_create memfd_secret io_uring_setup io_uring_enter "
    "io_uring_register bpf perf_event_open userfaultfd kexec_load kexec_file_load init_module finit_module "
    "delete_module swapon swapoff reboot acct quotactl syslog iopl ioperm settimeofday clock_settime sethostname "
    "setdomainname open_by_handle_at name_to_handle_at lookup_dcookie"
).split()


def _seccomp_module() -> str | None:
    """Where the libseccomp Python bindings are (apt's python3-seccomp, or a pip install in this interpreter);
    PHI_SANDBOX_SECCOMP=0 runs without them (how a host without the package behaves)."""
    import importlib.util
    import sysconfig

    if os.environ.get("PHI_SANDBOX_SECCOMP") == "0":
        return None

    spec = importlib.util.find_spec("seccomp")
    if spec is not None and spec.origin:
        return spec.origin
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    for d in ("/usr/lib/python3/dist-packages", "/usr/local/lib/python3/dist-packages"):
        path = os.path.join(d, "seccomp" + suffix)
        if os.path.exists(path):
            return path
    return None


SECCOMP_PATH = _seccomp_module()
# Loaded by the zygote (or the fresh bootstrap) before anything of the program; _SECCOMP is None where the bindings
# are missing, and isolation() then does not list "seccomp".
_PRELUDE = f"""
_DENY = {SECCOMP_DENY!r}
try:
    import importlib.util as _ilu
    _spec = _ilu.spec_from_file_location("seccomp", {SECCOMP_PATH!r})
    _SECCOMP = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_SECCOMP)
except Exception:
    _SECCOMP = None
"""
BOOTSTRAP = _READ_STDIN + _PRELUDE + _BODY

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
import ast, builtins, ctypes, io, json, os, resource, select, signal, sys, traceback, socket, subprocess, shutil, pty
import _socket
exec(@PRELUDE@)
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
    out, err, rfd = fds[:3]
    os.close(ctl.detach())
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    keep = sorted(fds[2:])
    for lo, hi in zip([3] + [k + 1 for k in keep], keep + [resource.getrlimit(resource.RLIMIT_NOFILE)[0]]):
        os.closerange(lo, hi)
    os.environ.clear()
    os.environ.update(req["env"])
    req["hdr"]["result_fd"] = rfd
    req["hdr"]["serve_fd"] = fds[3] if len(fds) > 3 else None
    glb = {"__name__": "__bootstrap__", "__builtins__": builtins, "hdr": req.pop("hdr"), "code": req.pop("code"),
           "_SECCOMP": _SECCOMP, "_DENY": _DENY}
    exec(BODY, glb)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: a detached namespace init is reaped here
_own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)
while True:
    head, fds, _, _ = socket.recv_fds(ctl, 8, 4)
    if not head:
        os._exit(0)
    req = json.loads(_exact(b"", int.from_bytes(_exact(head, 8), "big")))
    # As root the child is forked straight into a fresh PID namespace as its PID 1 (one fork fewer per program than
    # unsharing in the child); setns() puts our own namespace back for the next request.
    pid1 = req["hdr"]["uid"] is not None and _libc.unshare(0x20000000) == 0
    req["hdr"]["pid1"] = pid1
    pid = os.fork()
    if pid1 and pid:
        _libc.setns(_own_pidns, 0x20000000)
    if pid == 0:
        try:
            os.close(_own_pidns)
            _child(req, fds)
        finally:
            os._exit(1)
    del req
    for fd in fds:
        os.close(fd)
    ctl.sendall(b"P%d\n" % pid)
    # While the program runs the harness sends nothing (it reads this status first), so a readable control socket
    # means the harness is gone (killed, maybe by SIGKILL): the program goes with it, then this zygote. Killing a
    # PID-namespace init takes its whole namespace along; without one the program leads its own process group.
    child = os.pidfd_open(pid)
    while child not in select.select([ctl, child], [], [])[0]:
        if not ctl.recv(1, socket.MSG_PEEK):
            for kill in (os.kill, os.killpg):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(0)
    os.close(child)
    _, st, ru = os.wait4(pid, 0)  # rusage of the child and its reaped descendants: the program's CPU time
    code = os.waitstatus_to_exitcode(st)
    code = 128 - code if pid1 and code > 128 else code  # PID 1 exits 128 + N for "the program died of signal N"
    ctl.sendall(b"S%d %.6f\n" % (code, ru.ru_utime + ru.ru_stime))
    while True:  # namespace inits that finished their teardown
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
""".replace("@BODY@", repr(_BODY)).replace("@PRELUDE@", repr(_PRELUDE))


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
    # The work dir gets its own tmpfs (work_opts); the world-writable places only need to exist, so they stay tiny.
    tmp_opts = "size=1m,mode=1777,nr_inodes=256"
    cover = [(d, tmp_opts) for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")]
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


def _rmtree(path: str) -> None:
    """Remove a directory tree without recursion (shutil.rmtree recurses: a 1,100-level tree made it raise
    RecursionError) and without following symlinks; what cannot be removed is left in place, never raised."""
    stack, failed = [path], set()
    while stack:
        d = stack[-1]
        subdirs = []
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            if e.path not in failed:
                                subdirs.append(e.path)
                        else:
                            os.unlink(e.path)
                    except OSError:
                        pass
        except OSError:
            pass
        if subdirs:
            stack.extend(subdirs)
            continue
        stack.pop()
        try:
            os.rmdir(d)
        except OSError:
            failed.add(d)


def _spawn_fresh(header: dict, code: str, env: dict, out, err, fds: list[int]) -> subprocess.Popen:
    """A new `python -I` running BOOTSTRAP, fed the header and the program on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", "-c", BOOTSTRAP],
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=err,
        cwd="/",
        env=env,
        pass_fds=tuple(fds),
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
        self.sock, self.owner, self.pending = ours, os.getpid(), False
        self.reader = ours.makefile("rb")

    def spawn(self, payload: bytes, fds: list[int]) -> int:
        """Hand over one request (its stdout, stderr and report descriptors travel as SCM_RIGHTS); the child's pid."""
        if self.pending:  # the previous child's exit status, not waited for (its verdict came from its report)
            self.pending = False
            self.wait()
        socket.send_fds(self.sock, [len(payload).to_bytes(8, "big")], fds)
        self.sock.sendall(payload)
        line = self.reader.readline()
        if not line.startswith(b"P"):
            raise OSError("sandbox zygote did not start the program")
        return int(line[1:])

    def wait(self) -> tuple[int, float]:
        """The child's exit code as Popen reports it (-N: killed by signal N), and its CPU seconds."""
        line = self.reader.readline()
        if not line.startswith(b"S"):
            raise OSError("sandbox zygote died")
        code, cpu = line[1:].split()
        return int(code), float(cpu)

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


def _spawn_in_zygote(header: dict, code: str, env: dict, out, err, fds: list[int]) -> tuple[_Zygote | None, int]:
    """(zygote, pid) of the program started by a pooled zygote, or (None, 0) when zygotes are off or failing."""
    if os.environ.get("PHI_SANDBOX_ZYGOTE", "1") == "0":
        return None, 0
    payload = json.dumps({"hdr": dict(header, detach=True), "code": code, "env": env}).encode()
    for _ in range(2):  # a stale zygote (it died, or this process forked since) is dropped and replaced once
        with _POOL_LOCK:
            z = _POOL.pop() if _POOL else None
        try:
            if z is None or z.owner != os.getpid():
                z = _Zygote()
            return z, z.spawn(payload, [out.fileno(), err.fileno(), *fds])
        except OSError:
            if z is not None:
                z.close()
    return None, 0


class ChannelClosed(BaseException):
    """The served program stopped answering (it exited, was killed, ran out of time, or broke the protocol).

    A BaseException, like the trusted checker's own failures, so `except Exception` in a benchmark's test code cannot
    swallow it."""


class Channel:
    """The harness end of a served program (`run_programs(..., checkers=...)`): one JSON line out, one JSON line back.

    Replies are size-capped and time-limited; whatever the program sends is only ever parsed as JSON here."""

    def __init__(self, rfd: int, wfd: int, deadline: float, max_bytes: int) -> None:
        self.rfd, self.wfd, self.deadline, self.max_bytes = rfd, wfd, deadline, max_bytes
        self.buf = b""

    def readline(self) -> dict:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise ChannelClosed("no reply before the time limit")
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                raise ChannelClosed("the program exited")
            self.buf += chunk
            if len(self.buf) > self.max_bytes:
                raise ChannelClosed(f"reply larger than {self.max_bytes} bytes")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise ChannelClosed("reply is not JSON") from None
        if not isinstance(msg, dict):
            raise ChannelClosed("reply is not a JSON object")
        return msg

    def request(self, msg: dict) -> dict:
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.wfd, data) :]
        except OSError:
            raise ChannelClosed("the program exited") from None
        return self.readline()


Checker = Callable[[Channel], tuple[str, "str | None"]]


def _run(code: str, limits: Limits, probe: bool = False, checker: Checker | None = None) -> tuple[Result, list[str]]:
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
    child_fds = [wfd]
    sread = swrite = None
    if checker is not None:
        sread, swrite = os.pipe()
        child_fds.append(sread)
    header = {
        "result_fd": wfd,
        "serve_fd": sread,
        "nonce": nonce,
        "dir": workdir,
        "uid": uid,
        "keep": _KEEP,
        "cover": _cover_list(limits),
        "work_opts": f"size={limits.file_size_mb}m,mode=0700,uid={uid or 0},gid={uid or 0},nr_inodes=65536",
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
    checked: tuple[str, str | None] | None = None
    clean = False
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                zygote, pid = _spawn_in_zygote(header, code, env, out, err, child_fds)
                if zygote is None:
                    proc = _spawn_fresh(header, code, env, out, err, child_fds)
                    pid = proc.pid

                    def wait(proc=proc) -> tuple[int, float]:
                        _, st, ru = os.wait4(proc.pid, 0)
                        proc.returncode = os.waitstatus_to_exitcode(st)
                        return proc.returncode, ru.ru_utime + ru.ru_stime
                else:
                    wait = zygote.wait
            finally:
                for fd in child_fds:
                    os.close(fd)
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
            deadline = start + limits.timeout_s + 1
            cpu = None
            if checker is not None:
                report, checked = _serve(rfd, swrite, nonce, deadline, checker)
                os.close(swrite)  # EOF: the served program reports its CPU time and exits
                swrite = None
                if checked is not None:
                    cpu = _await(rfd, deadline, lambda m: "cpu" in m)
                    cpu = cpu.get("cpu") if cpu else None
                decided = checked is not None and cpu is not None
            else:
                report = _await(rfd, deadline, lambda m: m.get("nonce") == nonce)
                decided = report is not None
                cpu = report.get("cpu") if report else None
            returncode = 0
            if decided and zygote is not None:
                # The report decides the verdict: the exit status is not waited for (the zygote collects it before
                # its next program), which keeps the namespace teardown off every program's critical path.
                zygote.pending = True
                cpu = cpu if isinstance(cpu, (int, float)) else None
            else:
                try:
                    returncode, cpu = wait()
                except OSError:  # the zygote died under us: its child is killed below, the verdict is not a pass
                    returncode = -signal.SIGKILL
                    zygote.close()
                    zygote = None
            finished.set()
            timer.cancel()
            timed_out = expired.is_set()
            duration = time.monotonic() - start
            _killpg(pid)  # anything left in its process group
            if uid is not None and (limits.nproc > 0 or timed_out or returncode < 0):
                # Killing the namespace's PID 1 kills the rest, but asynchronously: wait until none is left (and
                # without a PID namespace a fork may have left the process group).
                _kill_uid(uid)
            if report is None and checker is None:
                report = _read_report(rfd, nonce)
            stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
            clean = True
    finally:
        if zygote is not None:  # a zygote whose child was not waited for would answer the next request wrongly
            _release(zygote) if clean else zygote.close()
        os.close(rfd)
        if swrite is not None:
            os.close(swrite)
        _rmtree(workdir)
    if checked is not None and not timed_out:
        verdict, error = checked
    else:
        verdict, error = _verdict(report, returncode, timed_out, limits)
        if verdict == "passed" and checker is not None:  # a served program the checker could not judge did not pass
            verdict, error = "error", "the program stopped answering the checker"
    return Result(verdict, error, duration, stdout, stderr, cpu), (report or {}).get("layers", [])


def _await(rfd: int, deadline: float, wanted) -> dict | None:
    """The first JSON line on the report pipe that `wanted` accepts, or None at EOF / the deadline / garbage."""
    chan = Channel(rfd, -1, deadline, 1 << 24)
    try:
        while True:
            msg = chan.readline()
            if wanted(msg):
                return msg
    except ChannelClosed:
        return None


def _serve(rfd: int, wfd: int, nonce: str, deadline: float, checker: Checker):
    """(report, (verdict, error) or None): wait until the served program is ready, then let the checker judge it.

    None means the checker could not finish (the program died or stopped answering): its exit status decides."""
    chan = Channel(rfd, wfd, deadline, 1 << 24)
    try:
        while True:  # lines without our nonce are the program's own writes to the pipe: skipped
            msg = chan.readline()
            if msg.get("nonce") == nonce:
                break
    except ChannelClosed:
        return None, None
    if msg.get("status") != "ready":
        return msg, None
    try:
        return msg, checker(chan)
    except ChannelClosed:
        return msg, None
    except BaseException as exc:  # a bug in a checker is that sample's error, and the program is still reaped
        return msg, ("error", f"harness: checker raised {type(exc).__name__}: {exc}"[:2000])


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
    codes: list[str],
    limits: Limits | Sequence[Limits] = Limits(),
    workers: int | None = None,
    progress: bool = False,
    checkers: Sequence[Checker | None] | None = None,
    on_result: Callable[[int, Result], None] | None = None,
) -> list[Result]:
    """Run many programs, `workers` at a time (default: CPU count), results in input order.

    `limits` may be one Limits or one per program. `checkers[i]`, when given, makes program i a served program: it
    only defines names, and the trusted `checkers[i](channel)` (phi_train.verdict) decides the verdict by calling
    them. `on_result(i, result)` is called as each result arrives (from the worker thread, under a lock).
    A failure of the harness itself on one program becomes that program's `error` verdict; the others are unaffected.

    Threads are enough: each worker only waits on its child process. Popen is called without preexec_fn, so spawning
    from several threads at once is safe.
    """
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise SandboxError(f"workers={workers} must be >= 1")
    per = [limits] * len(codes) if isinstance(limits, Limits) else list(limits)
    if len(per) != len(codes) or (checkers is not None and len(checkers) != len(codes)):
        raise SandboxError(f"{len(codes)} programs need as many limits and checkers")
    results: list[Result | None] = [None] * len(codes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(codes), desc="sandbox", unit="prog")
    lock = threading.Lock()

    def one(i: int) -> None:
        t = time.monotonic()
        try:
            results[i] = _run(codes[i], per[i], checker=checkers[i] if checkers else None)[0]
        except SandboxError as exc:
            results[i] = Result("error", str(exc), 0.0)
        except BaseException as exc:  # the harness's own failure: this sample's verdict, never the batch's
            results[i] = Result("error", f"harness: {type(exc).__name__}: {exc}"[:2000], time.monotonic() - t)
        with lock:
            if on_result is not None:
                on_result(i, results[i])
            if bar is not None:
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
