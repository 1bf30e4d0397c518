"""A user's data is never lost: overwrite only replaces sparserl runs, names stay inside runs/,
exactly one process owns a run directory, and a NaN in the physics or a full disk ends a run
cleanly with its last good checkpoint (issue 20, items 1-5)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sparserl import checkpoint, rundir, runs
from sparserl.cli import EXIT_DISK_FULL, EXIT_FAULT, EXIT_USAGE, main

# Two 1000-step cartpole episodes in 500 agent steps with few updates: seconds per run.
TINY = ["env=cartpole-balance", "env_steps=2000", "action_repeat=4", "utd=1", "eval_every=1000", "warmup_steps=100",
        "eval_episodes=1", "final_eval_episodes=1", "batch_size=16", "actor.width=16", "critic.width=16",
        "critic.blocks=1", "progress=false", "diag_every=0", "diag_probe_size=64", "diag_grad_samples=4"]
TIMING = {"steps_per_s", "wall_time"}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its contents (directories as empty entries)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else b"<dir>"
    return out


def run_cli(argv, capsys):
    """Exit code and the ``sparserl:`` lines of stderr (progress lines of the run are left out)."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("sparserl")]


def metrics_without_timing(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# 1. overwrite=true removes sparserl runs only


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(workdir, capsys):
    mystuff = workdir / "mystuff"
    mystuff.mkdir()
    (mystuff / "thesis.tex").write_text("\\chapter{Results}\n")
    before = snapshot(workdir)
    rc, err = run_cli(["train", *TINY, "run_dir=mystuff", "overwrite=true"], capsys)
    assert rc == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("sparserl: error:") and "thesis.tex" in err[0], err
    assert "overwrite=true" not in err[0]  # the refusal must not recommend what it refuses
    assert snapshot(workdir) == before


def test_overwrite_refuses_a_run_that_holds_a_users_file(workdir, capsys):
    assert run_cli(["train", *TINY, "run_dir=r"], capsys)[0] == 0
    (workdir / "r" / "notes.md").write_text("seed 0 looked odd")
    before = snapshot(workdir)
    rc, err = run_cli(["train", *TINY, "run_dir=r", "overwrite=true"], capsys)
    assert rc == EXIT_USAGE and len(err) == 1 and "notes.md" in err[0], err
    assert snapshot(workdir) == before
    # resuming (no overwrite) a run that holds a user's file is fine: nothing is deleted
    rc, err = run_cli(["train", *TINY, "run_dir=r"], capsys)
    assert rc == 0 and (workdir / "r" / "notes.md").read_text() == "seed 0 looked odd"


def test_starting_over_clears_only_sparserl_files(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_0000000010.json").write_text("{}")
    (run_dir / "checkpoints" / "step_0000000005.npz.corrupt").write_text("bad")
    for name in ("config.yaml", "metrics.csv", "summary.json", "cosine_critic.npy", "mine.txt"):
        (run_dir / name).write_text("x")
    (run_dir / "my_plots").mkdir()
    rundir.clear(run_dir, keep_corrupt=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "mine.txt", "my_plots"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_0000000005.npz.corrupt"]
    rundir.clear(run_dir, keep_corrupt=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["mine.txt", "my_plots"]


# ----------------------------------------------------------------------------------------------
# 2. a name is a plain file name


@pytest.mark.parametrize("name", [".", "..", "../../etc", "/abs/path", "a/b", "a\\b", "two\nlines", "tab\there"])
def test_name_must_be_a_plain_file_name(name, workdir, capsys):
    (workdir / "runs" / "kept").mkdir(parents=True)
    (workdir / "runs" / "kept" / "config.yaml").write_text("agent: sac\n")
    (workdir / "paper.tex").write_text("keep")
    before = snapshot(workdir.parent)
    rc, err = run_cli(["train", *TINY, f"name={name}", "overwrite=true"], capsys)
    assert rc == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("sparserl: error:") and "name=" in err[0], err
    assert "plain file name" in err[0] or "control character" in err[0], err
    assert snapshot(workdir.parent) == before


# ----------------------------------------------------------------------------------------------
# 3. exactly one process owns a run directory


def test_lock_is_exclusive_across_processes_and_dies_with_its_owner(tmp_path):
    run_dir = tmp_path / "r"
    probe = textwrap.dedent(f"""
        import sys
        from sparserl import runs
        try:
            runs.RunLock({str(run_dir)!r}).acquire()
        except runs.RunLocked as e:
            print(e); sys.exit(7)
        """)
    lock = runs.RunLock(run_dir).acquire()
    assert runs.is_locked(run_dir) and (run_dir / runs.RUNNING_MARKER).read_text() == str(os.getpid())
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert other.returncode == 7 and f"pid {os.getpid()}" in other.stdout
    lock.release()
    assert not (run_dir / runs.RUNNING_MARKER).exists() and not runs.is_locked(run_dir)
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0

    # A marker whose pid is alive (here: this very process) but whose lock nobody holds -- a killed
    # trainer's pid reused -- blocks nothing.
    (run_dir / runs.RUNNING_MARKER).write_text(str(os.getpid()))
    assert not runs.is_locked(run_dir)
    runs.RunLock(run_dir).acquire().release()

    # kill -9 of an owner frees the directory at once
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sparserl import runs
        runs.RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert runs.is_locked(run_dir) and runs.run_status(run_dir) == "running"
        holder.kill()
        holder.wait(timeout=30)
        assert not runs.is_locked(run_dir)
        runs.RunLock(run_dir).acquire().release()
    finally:
        holder.kill()


def test_two_trainings_started_at_once_on_one_run_dir(tmp_path):
    """Both processes are released by a barrier (each waits for the other's ready file), so both
    claim the directory within milliseconds: exactly one trains, the other is refused in one line."""
    run_dir, barrier = tmp_path / "r", tmp_path / "barrier"
    barrier.mkdir()
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        import sparserl.train  # the imports take seconds: done before the barrier
        from sparserl.cli import main
        barrier, me = Path(sys.argv[1]), sys.argv[2]
        (barrier / me).touch()
        deadline = time.time() + 120
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.001)
        sys.exit(main(sys.argv[3:]))
        """)
    args = [*TINY, "diag_every=1000", f"run_dir={run_dir}"]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(barrier), str(i), "train", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MUJOCO_GL": "egl"}) for i in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, EXIT_USAGE], results
    loser = next(err for rc, err in results if rc == EXIT_USAGE)
    lines = [line for line in loser.splitlines() if line.strip()]
    assert len(lines) == 1 and "another process" in lines[0] and "Traceback" not in loser
    for name in ("metrics.csv", "diagnostics.csv"):  # every row once
        with open(run_dir / name) as f:
            steps = [row["env_step"] for row in csv.DictReader(f)]
        assert len(steps) == len(set(steps)) and "2000" in steps, (name, steps)
    assert runs.run_status(run_dir) == "finished"


# ----------------------------------------------------------------------------------------------
# 4. a NaN in the physics of a DMC task is a numerical fault


def test_nan_on_a_dmc_task_is_a_numerical_fault(workdir, capsys):
    args = [*TINY, "env_steps=3000", "lr=1e30", "run_dir=nan"]
    rc, err = run_cli(["train", *args], capsys)
    assert rc == EXIT_FAULT, err
    assert len(err) == 1 and err[0].startswith("sparserl: stopped:") and "non-finite" in err[0], err
    error = (workdir / "nan" / "error.txt").read_text()
    assert "non-finite" in error
    steps = checkpoint.complete_steps(workdir / "nan" / "checkpoints")
    if steps:  # the message names the checkpoint kept, and only when there is one
        assert "last good checkpoint" in error
    else:
        assert "no checkpoint had been written yet" in error and "kept" not in error
    assert runs.run_status(workdir / "nan") == "failed"
    rc, err = run_cli(["train", *args], capsys)  # a sweep must not re-run it forever: refused
    assert rc == EXIT_USAGE and "numerical fault" in err[0]


# ----------------------------------------------------------------------------------------------
# 5. a full disk: one line, no temporary files, previous checkpoint kept, exact resume


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_checkpoint(tmp_path, small_disk, capsys):
    mount, resize = small_disk
    args = [*TINY, "checkpoint_every=1000", "diag_every=1000"]
    ref = tmp_path / "ref"
    assert run_cli(["train", *args, f"run_dir={ref}"], capsys)[0] == 0
    sizes = {s: (ref / "checkpoints" / f"step_{s:010d}.npz").stat().st_size
             for s in checkpoint.complete_steps(ref / "checkpoints")}
    first, last = sorted(sizes)
    # room for the run's small files and the first checkpoint, not for the second beside it
    small_files = sum(p.stat().st_size for p in ref.iterdir() if p.is_file())
    resize((sizes[first] + small_files + sizes[last] // 2) // 4096 * 4096 + 64 * 1024)
    run_dir = mount / "run"
    rc, err = run_cli(["train", *args, f"run_dir={run_dir}"], capsys)
    assert rc == EXIT_DISK_FULL, err
    assert len(err) == 1 and err[0].startswith("sparserl: stopped: no space left") and str(run_dir) in err[0], err
    assert "MB" in err[0] and "resume" in err[0]
    assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*.tmp"))
    assert checkpoint.complete_steps(run_dir / "checkpoints") == [first]
    arrays, meta = checkpoint.load(run_dir / "checkpoints", first)  # intact: the checksum verifies
    assert meta["agent_step"] == first and not (run_dir / "summary.json").exists()
    assert runs.run_status(run_dir) == "interrupted"

    resize(64 * 1024 * 1024)  # space freed: the same command resumes and ends as the uninterrupted run
    assert run_cli(["train", *args, f"run_dir={run_dir}"], capsys)[0] == 0
    assert metrics_without_timing(run_dir) == metrics_without_timing(ref)
    a = np.genfromtxt(run_dir / "diagnostics.csv", delimiter=",", names=True)
    b = np.genfromtxt(ref / "diagnostics.csv", delimiter=",", names=True)
    assert a.dtype.names == b.dtype.names and all(np.allclose(a[n], b[n], equal_nan=True) for n in a.dtype.names)


def test_a_damaged_summary_is_not_finished_and_is_written_again(workdir, capsys):
    assert run_cli(["train", *TINY, "run_dir=r"], capsys)[0] == 0
    good = (workdir / "r" / "summary.json").read_text()
    metrics = metrics_without_timing(workdir / "r")
    (workdir / "r" / "summary.json").write_bytes(b"\x00garbage")
    assert runs.run_status(workdir / "r") == "interrupted"
    assert run_cli(["train", *TINY, "run_dir=r"], capsys)[0] == 0  # resumes from the final checkpoint
    again = json.loads((workdir / "r" / "summary.json").read_text())
    assert again["final_return"] == json.loads(good)["final_return"]
    assert metrics_without_timing(workdir / "r") == metrics


def test_a_run_of_an_older_version_is_refused_by_name(tmp_path):
    """A config.yaml without keys added since (e.g. update_every): never resumed silently under
    semantics that may have changed, and the message says why."""
    import yaml

    from sparserl import config
    from sparserl.errors import ConfigError

    cfg = config.from_args(None, [*TINY, f"run_dir={tmp_path / 'old'}"])
    old = cfg.to_dict()
    del old["update_every"], old["weight_decay_on"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "old" / "metrics.csv").write_text("env_step\n")
    with pytest.raises(ConfigError, match=r"older sparserl .*update_every, weight_decay_on.*overwrite=true"):
        rundir.check(cfg)
    assert rundir.check(config.from_args(None, [*TINY, f"run_dir={tmp_path / 'old'}", "overwrite=true"])) == "new"
