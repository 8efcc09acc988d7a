"""phi_train/demo.py's own machinery (what `make demo` runs): the stage runner (real subprocesses, real log files) and the loss plot. The
pipeline itself is what `make demo` runs; its parts are tested in their own files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    from phi_train import demo

    return demo


def test_failing_stage_prints_its_log_tail_and_path(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "LOGS", tmp_path / "logs")
    script = "import sys; print('third-party chatter'); print('the real error: bad key', file=sys.stderr); sys.exit(3)"
    stage = demo.Stage("boom", [sys.executable, "-c", script])
    runner = demo.Demo(env=dict(os.environ))
    with pytest.raises(demo.StageFailed, match=r"'boom' failed \(exit 3\).*boom\.log"):
        runner.run(stage)
    err = capsys.readouterr().err
    assert "the real error: bad key" in err and "third-party chatter" in err
    assert "the real error: bad key" in (tmp_path / "logs" / "boom.log").read_text()


def test_quiet_stage_keeps_output_in_the_log_and_verbose_shows_it(demo, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(demo, "LOGS", tmp_path / "logs")
    stage = demo.Stage("chatty", [sys.executable, "-c", "print('FutureWarning: something deprecated')"])
    demo.Demo(env=dict(os.environ)).run(stage)
    assert "FutureWarning" not in capfd.readouterr().out
    assert "FutureWarning" in stage.log.read_text()
    verbose = demo.Demo(verbose=True, env=dict(os.environ))
    verbose.run(stage)
    assert "FutureWarning" in capfd.readouterr().out
    assert "FutureWarning" in stage.log.read_text() and verbose.rows[0].wall_s is not None


def test_stage_is_skipped_when_its_output_exists(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    (tmp_path / "out").write_text("x")
    stage = demo.Stage("done", [sys.executable, "-c", "raise SystemExit(1)"], tmp_path / "out", lambda: "42 kept")
    runner = demo.Demo(env={})
    runner.run(stage)
    assert [(r.skipped, r.figure) for r in runner.rows] == [(True, "42 kept")]


def test_kill_when_sigkills_the_stage_and_counts_as_done(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "LOGS", tmp_path / "logs")
    flag = tmp_path / "checkpoint"
    script = f"import pathlib, time; pathlib.Path({str(flag)!r}).write_text('1'); time.sleep(600)"
    stage = demo.Stage("preempted", [sys.executable, "-c", script], kill_when=flag.exists)
    runner = demo.Demo(env=dict(os.environ))
    runner.run(stage)  # returns, rather than waiting out the sleep or raising on the -9 exit
    assert runner.rows[0].wall_s is not None and flag.exists()


def test_tqdm_progress_reads_the_last_bar_state(demo, tmp_path):
    log = tmp_path / "x.log"
    log.write_text("noise\rtrain:  10%| | 3/30 [00:01<00:09]\rtrain:  20%| | 6/30 [00:02<00:08]")
    assert demo.tqdm_progress(log) == (6, 30)
    log.write_text("reading: 431doc [00:00, 13191.75doc/s]")
    assert demo.tqdm_progress(log) == (0, None)


def test_loss_plot_draws_a_falling_curve(demo):
    points = [(s, 9.0 - 4.0 * s / 100) for s in range(1, 101)]
    lines = demo.loss_plot(points, width=25, height=4, mark=20)
    grid = [line[8:] for line in lines[:4]]
    assert lines[0].startswith("  8.90") and lines[3].startswith("  5.06")  # column means of 4 steps
    assert grid[0][0] == "█" and grid[0][-1] == " "  # the first column reaches the top, the last does not
    assert grid[3][-1] != " "  # the lowest column still shows
    assert lines[-1].split()[1] == "1" and lines[-1].endswith("100") and "resumed at 20" in lines[-1]


def test_window_mean_quotes_whole_windows_at_the_ends(demo):
    points = [(s, float(s)) for s in range(1, 101)]
    assert [demo.window_mean(points, w, n=10) for w in (0.0, 0.5, 1.0)] == [
        "steps 1-10 5.50",
        "steps 46-55 50.50",
        "steps 91-100 95.50",
    ]
