"""Hostile programs against the real sandbox: each test asserts the program is NOT passed and the host is unharmed.

Programs that bypass the in-interpreter guards (via the `posix` module or `socket.SocketType`, which the guards leave
alone) exercise the kernel layers (private uid, namespaces, rlimits); those need root and are skipped without it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from phi_train.sandbox import (
    _UID_RANGE,
    SECCOMP_PATH,
    Limits,
    Result,
    SandboxError,
    _rmtree,
    isolation,
    run_program,
    run_programs,
)

FAST = Limits(timeout_s=5, cpu_s=5)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="kernel layers (private uid, namespaces) need root")


def sandbox_uid_processes() -> list[int]:
    """Live processes under a sandbox uid (there must be none after a run)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
        except (OSError, ValueError):
            continue
        uid, state = int(fields["Uid"].split()[0]), fields["State"].strip()
        if _UID_RANGE[0] <= uid < _UID_RANGE[1] and not state.startswith("Z"):  # zombies are dead, awaiting reaping
            pids.append(int(pid))
    return pids


def assert_not_passed(r: Result, *verdicts: str) -> None:
    assert r.verdict != "passed", r
    if verdicts:
        assert r.verdict in verdicts, r


def assert_host_responsive() -> None:
    t = time.monotonic()
    r = run_program("assert sum(range(10)) == 45", FAST)
    assert r.verdict == "passed", r
    assert time.monotonic() - t < 3


# --- ordinary programs -------------------------------------------------------------------------------------------


def test_correct_program_passes_and_keeps_stdout():
    r = run_program("def f(x):\n    return 2 * x\nprint('hi')\nassert f(2) == 4\n", FAST)
    assert r.verdict == "passed" and r.error is None and r.stdout == "hi\n"
    assert 0 < r.duration_s < 5


def test_wrong_program_fails_with_assertion_line():
    r = run_program("def f(x):\n    return x\nassert f(2) == 4, 'f(2) should be 4'\n", FAST)
    assert (r.verdict, r.error) == ("failed", "AssertionError: f(2) should be 4")


def test_syntax_error_and_other_exceptions_are_errors():
    assert (run_program("def f(:\n", FAST).verdict, run_program("def f(:\n", FAST).error) == (
        "error",
        "SyntaxError: invalid syntax",
    )
    r = run_program("print(undefined_name)", FAST)
    assert (r.verdict, r.error) == ("error", "NameError: name 'undefined_name' is not defined")


def test_bad_limits_are_one_line_errors():
    with pytest.raises(SandboxError, match="Limits.memory_mb=10"):
        Limits(memory_mb=10)
    with pytest.raises(SandboxError, match="Limits.timeout_s=0"):
        Limits(timeout_s=0)


@root_only
def test_all_kernel_layers_active_as_root():
    layers = set(isolation())
    assert layers >= {"netns", "ipcns", "mountns", "readonly", "tmpfs", "pidns", "rlimits", "uid", "no_new_privs"}
    assert ("seccomp" in layers) == (SECCOMP_PATH is not None)  # present wherever the libseccomp bindings are


# --- hostile programs --------------------------------------------------------------------------------------------


def test_infinite_loop_times_out():
    t = time.monotonic()
    r = run_program("while True:\n    pass\n", Limits(timeout_s=10, cpu_s=1))
    assert_not_passed(r, "timeout")  # RLIMIT_CPU (SIGXCPU) at 1 s
    r = run_program("import time\ntime.sleep(60)\n", Limits(timeout_s=1, cpu_s=10))
    assert_not_passed(r, "timeout")  # wall clock: sleeping uses no CPU
    assert "wall-clock" in r.error
    assert time.monotonic() - t < 6


def test_fork_bomb_guarded():
    r = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert_not_passed(r, "error")
    assert_host_responsive()


@root_only
def test_fork_bomb_bypassing_guards_is_bounded_and_cleaned_up():
    # posix.fork is the raw call the guards do not patch: RLIMIT_NPROC under the private uid must bound it.
    bomb = (
        "import posix, time\n"
        "forks = 0\n"
        "while True:\n"
        "    try:\n"
        "        if posix.fork() == 0:\n"
        "            forks = 0\n"
        "        else:\n"
        "            forks += 1\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    t = time.monotonic()
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(len(sandbox_uid_processes()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    r = run_program(bomb, Limits(timeout_s=1.5, cpu_s=5, nproc=4))
    done.set()
    watcher.join()
    assert_not_passed(r, "timeout")
    assert 2 <= max(seen) <= 5, seen  # it did fork, but 1 + nproc processes at most
    assert sandbox_uid_processes() == []  # no strays left
    assert time.monotonic() - t < 5
    assert_host_responsive()


def test_memory_bomb_is_killed():
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n", Limits(timeout_s=10, memory_mb=256))
    assert_not_passed(r, "killed")
    assert r.error == "MemoryError"
    assert_host_responsive()


def test_os_system_and_subprocess_are_denied(tmp_path):
    canary = tmp_path / "pwned"
    for prog in (
        f"import os\nassert os.system('touch {canary}') == 0\n",
        f"import subprocess\nsubprocess.run(['touch', '{canary}'], check=True)\n",
    ):
        assert_not_passed(run_program(prog, FAST))
    if os.geteuid() == 0:  # the raw call: no process may be created (RLIMIT_NPROC=1 under the private uid)
        assert_not_passed(run_program(f"import posix\nassert posix.system('touch {canary}') == 0\n", FAST), "failed")
    assert not canary.exists()


def test_deleting_files_outside_the_sandbox_is_denied(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    for prog in (f"import os\nos.remove({str(canary)!r})\n", f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        assert_not_passed(run_program(prog, FAST), "error")
    if os.geteuid() == 0:
        for victim in (str(canary), "/work/main/setup.py", "/etc/hostname"):
            prog = f"import posix\nposix.unlink({victim!r})\n"  # raw unlink: hidden by tmpfs or denied to the uid
            assert_not_passed(run_program(prog, FAST), "error")
        assert os.path.exists("/etc/hostname")
    assert canary.read_text() == "keep me"


def test_secrets_in_the_environment_are_invisible(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary")
    r = run_program("import os\nprint(sorted(os.environ))\nkey = os.environ['OPENAI_API_KEY']\n", FAST)
    assert_not_passed(r, "error")
    assert "KeyError" in r.error and "sk-canary" not in r.stdout
    r = run_program("import os\nprint(open('/proc/%d/environ' % os.getppid()).read())\n", FAST)
    assert "sk-canary" not in r.stdout
    if os.geteuid() == 0:
        assert_not_passed(r, "error")  # another uid's environ is unreadable


@pytest.fixture
def tcp_server():
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    connections = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            connections.append(conn)
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    yield srv.getsockname()[1], connections
    stop.set()
    t.join()
    srv.close()


def test_network_is_unreachable(tcp_server):
    port, connections = tcp_server
    progs = [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"]
    if os.geteuid() == 0:  # socket.SocketType is the real class: only the network namespace stops it
        progs.append(
            f"import socket\ns = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))\n"
        )
    for prog in progs:
        assert_not_passed(run_program(prog, FAST), "error")
    time.sleep(0.3)
    assert connections == []
    # control: the server does accept connections from outside the sandbox
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    time.sleep(0.5)
    assert len(connections) == 1


@pytest.mark.parametrize(
    "early_exit",
    [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "raise SystemExit",
        "import os, signal\nos.kill(os.getpid(), 9)",
        "import posix\nposix.kill(posix.getpid(), 9)",
        "import os\nos.close(1)\nos.close(2)\nos._exit(0)",
    ],
)
def test_exiting_before_the_asserts_is_not_a_pass(early_exit):
    r = run_program(early_exit + "\nassert False, 'the tests'\n", FAST)
    assert_not_passed(r, "error", "killed")


def test_forged_success_report_is_not_a_pass():
    forge = (
        "import os, json\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.write(fd, (json.dumps({'nonce': '0' * 32, 'status': 'passed'}) + '\\n').encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    assert_not_passed(run_program(forge, FAST), "error")


def test_killing_the_parent_fails_and_harness_survives():
    me = os.getpid()
    for prog in (
        "import os\nos.kill(os.getppid(), 9)\n",
        "import posix\nposix.kill(posix.getppid(), 9)\n",
        "import os\nos.killpg(0, 9)\n",
    ):
        r = run_program(prog, FAST)
        assert r.verdict != "passed" or os.geteuid() != 0, r
    assert os.getpid() == me
    assert_host_responsive()


def test_huge_file_is_killed_by_fsize():
    r = run_program(
        "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (8 * 2**20))\n", Limits(timeout_s=5, file_size_mb=1)
    )
    assert_not_passed(r, "killed")
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n", Limits(timeout_s=5, file_size_mb=1))
    assert_not_passed(r, "killed")  # stdout is a file too: flooding it is bounded


def test_many_programs_in_parallel_keep_order():
    kinds = {
        "passed": "assert [1, 2][::-1] == [2, 1]",
        "failed": "assert 1 == 2",
        "error": "1 / 0",
        "timeout": "while True: pass",
    }
    order = [k for _ in range(8) for k in ("passed", "failed", "error")] + ["timeout"] * 2
    t = time.monotonic()
    results = run_programs([kinds[k] for k in order], Limits(timeout_s=1, cpu_s=1), workers=4, progress=True)
    assert [r.verdict for r in results] == order
    assert results[2].error == "ZeroDivisionError: division by zero"
    assert time.monotonic() - t < 10
    assert sandbox_uid_processes() == []


# --- the host stays untouched: one test per class of harm ---------------------------------------------------------

# ctypes is blocked inside the interpreter only by sys.modules entries: a determined program removes them, so the
# programs below reach the raw syscalls and only the kernel layers (namespaces, seccomp) stand in their way.
RAW_LIBC = (
    "import sys\n"
    "for m in ('ctypes', '_ctypes'):\n"
    "    sys.modules.pop(m, None)\n"
    "import ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
)


def sandbox_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("phi-sandbox-")}


@root_only
def test_world_writable_dirs_keep_nothing(tmp_path):
    name = f"phi-canary-{os.getpid()}"
    places = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", str(tmp_path), "/work", "/etc", "/var/lib"]
    prog = (
        "import posix\nwrote = []\n"
        f"for d in {places!r}:\n"
        "    try:\n"
        f"        fd = posix.open(d + '/{name}', posix.O_CREAT | posix.O_WRONLY, 0o666)\n"
        "        posix.write(fd, b'x')\n"
        "        wrote.append(d)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(wrote)\n"
    )
    r = run_program(prog, FAST)
    assert r.verdict == "passed", r  # the private tmpfs dirs take the writes, the rest are read-only
    assert "/work'" not in r.stdout and "/etc" not in r.stdout, r.stdout
    assert [p for p in places if os.path.exists(os.path.join(p, name))] == []


@root_only
def test_sysv_ipc_does_not_outlive_the_run():
    def segments() -> list[str]:
        return [open(f"/proc/sysvipc/{k}").read() for k in ("shm", "msg", "sem")]

    before = segments()
    prog = RAW_LIBC + (
        "ids = [libc.shmget(0, 4096, 0o1666), libc.msgget(0, 0o1666), libc.semget(0, 1, 0o1666)]\n"
        "print(ids)\nassert ids == [-1, -1, -1], ids\n"
    )
    r = run_program(prog, FAST)
    assert r.verdict == "passed", r  # denied by seccomp; and an IPC namespace would hold them if it were not
    assert segments() == before


def test_deep_directory_tree_is_cleaned_up(tmp_path):
    before = sandbox_dirs()
    r = run_program("import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\n", FAST)
    assert r.verdict == "passed", r
    assert sandbox_dirs() <= before  # with a tmpfs work dir it vanished with the namespace; else _rmtree took it
    deep = tmp_path / "deep"  # the harness's own clean-up (what runs without root) does not recurse
    os.makedirs(deep)
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(1100):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(fd)
    _rmtree(str(deep))
    assert not deep.exists()


@root_only
def test_forked_process_that_leaves_the_group_dies_with_the_run():
    prog = "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(30)\n    posix._exit(0)\n"
    r = run_program(prog, Limits(timeout_s=5, cpu_s=5, nproc=4))
    assert r.verdict == "passed", r
    assert sandbox_uid_processes() == []  # the PID namespace died with its init


@root_only
def test_filling_the_disk_stops_at_the_work_dir_size():
    prog = "for i in range(20):\n    with open('f%d' % i, 'wb') as f:\n        f.write(b'x' * (1536 * 1024))\n"
    r = run_program(prog, Limits(timeout_s=5, file_size_mb=2))
    assert_not_passed(r, "error")
    assert "No space left" in r.error, r


@root_only
def test_memfd_and_user_namespaces_are_denied_and_privileges_frozen():
    r = run_program("import os\nos.memfd_create('x')\n", FAST)
    assert_not_passed(r, "error")
    assert "Operation not permitted" in r.error
    prog = (
        RAW_LIBC
        + "print(libc.unshare(0x10000000), libc.unshare(0x00020000))\nprint(open('/proc/self/status').read())\n"
    )
    r = run_program(prog, FAST)
    assert r.verdict == "passed", r
    assert r.stdout.splitlines()[0] == "-1 -1"  # CLONE_NEWUSER and CLONE_NEWNS refused
    assert "NoNewPrivs:\t1" in r.stdout
    if SECCOMP_PATH is not None:
        assert "Seccomp:\t2" in r.stdout


@root_only
def test_host_processes_are_invisible():
    r = run_program("import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n", FAST)
    assert r.verdict == "passed", r
    assert r.stdout.strip() == "['1', '2']"  # the namespace's reaper and the program itself


def test_a_harness_failure_is_that_programs_error_only():
    def broken_checker(chan):
        raise RuntimeError("checker bug")

    codes = ["assert 1", "def f():\n    return 1\n", "assert 1"]
    results = run_programs(codes, FAST, workers=2, checkers=[None, broken_checker, None])
    assert [r.verdict for r in results] == ["passed", "error", "passed"]
    assert "checker bug" in results[1].error
    assert run_programs(codes[:1], FAST)[0].verdict == "passed"  # the pool is still sound


def test_without_the_seccomp_bindings_the_sandbox_still_runs_and_says_so():
    code = (
        "from phi_train.sandbox import isolation, run_program, Limits\n"
        "print(','.join(isolation()))\n"
        "print(run_program('assert 1 + 1 == 2', Limits(timeout_s=5)).verdict)\n"
        "print(run_program('assert 1 + 1 == 3', Limits(timeout_s=5)).verdict)\n"
    )
    env = dict(os.environ, PHI_SANDBOX_SECCOMP="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    layers, passed, failed = out.stdout.split()
    assert "seccomp" not in layers.split(",") and "guards" in layers, out
    assert (passed, failed) == ("passed", "failed")
    if os.geteuid() == 0:
        assert "pidns" in layers and "no_new_privs" in layers  # the other layers stand


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_a_sigkilled_harness_takes_its_programs_and_zygote_along(zygote):
    """A job SIGKILLed mid-evaluation (issue 15): its zygote used to keep the running program alive until the
    program's own CPU limit ended it. The harness's descendants must all be gone shortly after the kill."""
    import psutil

    harness = (
        "import sys\nfrom phi_train.sandbox import Limits, run_programs\n"
        "print('running', flush=True)\n"
        "run_programs(['import time\\nwhile True:\\n    time.sleep(0.05)\\n'], Limits(timeout_s=120, cpu_s=120))\n"
    )
    env = {**os.environ, "PHI_SANDBOX_ZYGOTE": zygote, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", harness], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "running"
        parent = psutil.Process(proc.pid)
        kids: list = []
        for _ in range(200):  # until the program itself runs (the sandbox's processes sit below the harness)
            kids = parent.children(recursive=True)
            if len(kids) >= 2:
                break
            time.sleep(0.05)
        assert kids, "the harness started no sandbox process"
        time.sleep(0.3)
        kids = parent.children(recursive=True)
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(kids, timeout=10)  # a liveness bound, generous: the program would run for 120 s
    assert not alive, [(p.pid, p.name()) for p in alive]
