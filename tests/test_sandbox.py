"""Hostile programs against the real sandbox: each test asserts the program is NOT passed and the host is unharmed.

Programs that bypass the in-interpreter guards (via the `posix` module or `socket.SocketType`, which the guards leave
alone) exercise the kernel layers (private uid, namespaces, rlimits); those need root and are skipped without it.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from phi_train.sandbox import _UID_RANGE, Limits, Result, SandboxError, isolation, run_program, run_programs

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
    assert set(isolation()) >= {"netns", "mountns", "rlimits", "uid", "guards"}


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
