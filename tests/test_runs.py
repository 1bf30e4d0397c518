"""`sparserl ls`, run status and curves.png."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from sparserl import config, runs, train
from sparserl.cli import main

TINY = ["env=cartpole-balance", "env_steps=2000", "eval_every=1000", "warmup_steps=300", "eval_episodes=1",
        "final_eval_episodes=2", "batch_size=32", "actor.width=16", "critic.width=16", "critic.blocks=1",
        "progress=false", "diag_every=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train.train(config.from_args(None, TINY + ["critic.sparsity=0.8", f"run_dir={root / 'done'}"]), log=lambda m: None)
    return root


def test_finished_run_has_summary_and_curves(finished):
    run_dir = finished / "done"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_episodes"] == 2 and summary["env_steps"] == 2000
    assert summary["params"]["critic"]["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert summary["agent_steps_per_s"] > 0 and summary["wall_time"] > 0
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (run_dir / runs.RUNNING_MARKER).exists()  # removed when the run stopped


HELD_LOCKS: list = []


def make_copy(finished, tmp_path, name, status):
    run_dir = tmp_path / name
    shutil.copytree(finished / "done", run_dir)
    if status != "finished":
        (run_dir / "summary.json").unlink()
    if status == "failed":
        (run_dir / "error.txt").write_text("non-finite critic_loss at agent step 5\n")
    if status == "running":  # a live owner holds the kernel lock (kept until the test session ends)
        HELD_LOCKS.append(runs.RunLock(run_dir).acquire())
    if status == "stale_live_pid":  # a marker left by a killed trainer whose pid now names a live process
        (run_dir / runs.RUNNING_MARKER).write_text(str(os.getpid()))
    if status == "interrupted":
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (run_dir / runs.RUNNING_MARKER).write_text(str(dead.pid))
    return run_dir


def test_ls_shows_each_status(finished, tmp_path, capsys):
    for status in ("finished", "running", "failed", "interrupted", "stale_live_pid"):
        make_copy(finished, tmp_path / "sweep", f"r_{status}", status)
    (tmp_path / "sweep" / "not_a_run").mkdir()
    assert main(["ls", str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[0].split(), [line.split() for line in lines[1:]]
    assert header == ["name", "env", "agent", "widths", "sparsity", "env_steps", "eval_return", "status"]
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"r_finished", "r_running", "r_failed", "r_interrupted", "r_stale_live_pid"}
    for status in ("finished", "running", "failed", "interrupted", "stale_live_pid"):
        row = by_name[f"r_{status}"]
        assert row[-1] == ("interrupted" if status == "stale_live_pid" else status)  # only a held lock is "running"
        assert row[1] == "cartpole-balance" and row[2] == "sac"
        assert row[3:5] == ["a16x1", "c16x1"] and row[5:7] == ["a0", "c0.8"]
        assert row[7] == "2000/2000"
    last_eval = float(runs.read_metrics(finished / "done")[-1]["eval_return"])
    assert float(by_name["r_finished"][8]) == pytest.approx(last_eval, abs=0.05)


def test_ls_empty_and_missing(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out
    assert main(["ls", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_config_of_listed_run_is_readable(finished):
    cfg = yaml.safe_load((finished / "done" / "config.yaml").read_text())
    row = runs.describe(finished / "done", finished)
    assert row["name"] == "done" and row["env"] == cfg["env"]


def test_a_running_run_is_not_trained_twice(finished, tmp_path, capsys):
    run_dir = make_copy(finished, tmp_path, "live", "running")
    before = (run_dir / "metrics.csv").read_text()
    for extra in ([], ["overwrite=true"]):
        assert main(["train", *TINY, "critic.sparsity=0.8", f"run_dir={run_dir}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another process" in err[0]
    assert (run_dir / "metrics.csv").read_text() == before
