"""Sweeps on a real one-node Slurm (munge, MariaDB + slurmdbd, slurmctld, slurmd started by
``scripts/slurm_up.sh``; the packages come from ``make install``): a job array that finishes like a
local sweep, and a job preempted with SIGUSR2 (what Slurm sends before a time limit, and submitit's
signal) that checkpoints, requeues itself, resumes, and ends with the metrics of an uninterrupted run.

Not skipped when Slurm is missing: the fixture fails and says how to get it (``make install`` as
root). ``SPARSERL_SKIP_SLURM=1`` skips these tests, saying so, on machines where no Slurm may run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sparserl import provenance

REPO = Path(__file__).resolve().parent.parent
TIMING = ("steps_per_s", "wall_time")
BASE = {"env": "cartpole-balance", "warmup_steps": 200, "eval_every": 500, "eval_episodes": 1,
        "final_eval_episodes": 1, "batch_size": 16, "actor.width": 16, "critic.width": 16, "critic.blocks": 1,
        "checkpoint_every": 100000}
SLURM_OPTS = ["executor=slurm", "slurm.time=60", "slurm.mem_gb=2", "slurm.signal_lead=60"]


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.environ.get("SPARSERL_SKIP_SLURM") == "1":
        pytest.skip("SPARSERL_SKIP_SLURM=1: the Slurm tests were asked to be skipped")
    was_up = subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode == 0 \
        if _has("scontrol") else False
    up = subprocess.run(["bash", str(REPO / "scripts" / "slurm_up.sh")], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.fail(f"could not start the one-node Slurm (scripts/slurm_up.sh; `make install` as root installs "
                    f"its packages): {(up.stdout + up.stderr).strip()[-1500:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_down.sh")], capture_output=True, timeout=120)


def _has(binary: str) -> bool:
    import shutil

    return shutil.which(binary) is not None


def write_preset(path: Path, env_steps: int, sparsities: list[float]) -> Path:
    path.write_text(yaml.safe_dump({"description": "slurm test", "base": {**BASE, "env_steps": env_steps},
                                    "grid": {"critic.sparsity": sparsities, "seed": [0]}}))
    return path


def sweep(preset: Path, sweep_dir: Path, *options: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparserl.cli", "sweep", str(preset), f"sweep_dir={sweep_dir}",
                           *options], capture_output=True, text=True, timeout=timeout, cwd=sweep_dir.parent,
                          env={**os.environ, "MUJOCO_GL": "egl"})


def metrics(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, c in enumerate(rows[0]) if c not in TIMING]
    return [[r[i] for i in keep] for r in rows]


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/seed*/metrics.csv"))


def test_sweep_as_a_job_array_matches_a_local_sweep(slurm_cluster, tmp_path):
    preset = write_preset(tmp_path / "grid.yaml", 1000, [0.0, 0.8])
    on_slurm = sweep(preset, tmp_path / "slurm", *SLURM_OPTS, "slurm.parallelism=2")
    assert on_slurm.returncode == 0, on_slurm.stdout[-2000:] + on_slurm.stderr[-2000:]
    assert "submitted job array" in on_slurm.stdout
    status = json.loads((tmp_path / "slurm" / "sweep_status.json").read_text())
    assert len(status["finished"]) == 2 and not status["failed"]
    job_ids = json.loads((tmp_path / "slurm" / "slurm_jobs.json").read_text())
    assert len(set(job_ids.values())) == 2 and all("_" in j for j in job_ids.values())  # array tasks
    array = next(iter(job_ids.values())).split("_")[0]
    accounting = subprocess.run(["sacct", "-n", "-X", "-j", array, "-o", "JobID,State"], capture_output=True,
                                text=True).stdout.split()
    assert accounting.count("COMPLETED") == 2, accounting
    for run in run_dirs(tmp_path / "slurm"):
        session = provenance.read(run)[0]
        assert session["executor"] == "slurm" and session["job_id"] in job_ids.values()
        assert (tmp_path / "slurm" / "logs" / f"{run.parent.name}.{run.name}.log").is_file()

    local = sweep(preset, tmp_path / "local", "executor=local", "workers=2")
    assert local.returncode == 0, local.stderr[-2000:]
    slurm_runs, local_runs = run_dirs(tmp_path / "slurm"), run_dirs(tmp_path / "local")
    assert [p.relative_to(tmp_path / "slurm") for p in slurm_runs] == \
           [p.relative_to(tmp_path / "local") for p in local_runs]
    for a, b in zip(slurm_runs, local_runs):
        assert metrics(a) == metrics(b)

    again = sweep(preset, tmp_path / "slurm", *SLURM_OPTS)  # rerun: everything finished, nothing submitted
    assert again.returncode == 0 and "nothing to run" in again.stdout and "submitted" not in again.stdout


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tmp_path):
    preset = write_preset(tmp_path / "grid.yaml", 4000, [0.8])
    sweep_dir = tmp_path / "slurm"
    proc = subprocess.Popen([sys.executable, "-m", "sparserl.cli", "sweep", str(preset), f"sweep_dir={sweep_dir}",
                             *SLURM_OPTS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "MUJOCO_GL": "egl"})
    run_dir = sweep_dir / "default" / "seed0"  # a grid of one point
    deadline = time.monotonic() + 400
    while not ((run_dir / "metrics.csv").is_file() and len((run_dir / "metrics.csv").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    job_id = json.loads((sweep_dir / "slurm_jobs.json").read_text())["default/seed0"]
    # what Slurm does ahead of a time limit (--signal=USR2@lead) and submitit's preemption signal:
    # to the job's steps, not the batch shell
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    log = (sweep_dir / "logs" / "default.seed0.log").read_text()
    assert "stopped by SIGUSR2" in log and "restart 1" in log and "resuming at env step" in log
    sessions = provenance.read(run_dir)
    assert [s["event"] for s in sessions] == ["start", "resume"] and sessions[1]["restart_count"] >= 1
    assert not (run_dir / "interrupted.json").exists()

    local = sweep(preset, tmp_path / "local", "executor=local")
    assert local.returncode == 0, local.stderr[-2000:]
    assert metrics(run_dir) == metrics(tmp_path / "local" / "default" / "seed0")
