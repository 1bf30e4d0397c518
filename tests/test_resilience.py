"""Resilience of training runs: exact resume after SIGKILL, corrupt-checkpoint fallback, stopping on
NaN, several seeds (loop and vmap) and refusing to touch a run directory with another config.

Every run here is small (widths 16, a few thousand env steps of cartpole-balance); one uninterrupted
reference run is shared by the tests that compare against it. ``metrics.csv`` files are compared as
strings with the timing columns (the only ones that legitimately differ between identical runs)
removed.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import yaml

from sparserl import checkpoint, config, rundir, train
from sparserl.cli import EXIT_FAULT, EXIT_USAGE, main
from sparserl.config import ConfigError

ARGS = ["env=cartpole-balance", "env_steps=6000", "checkpoint_every=2000", "eval_every=1000", "warmup_steps=500",
        "eval_episodes=1", "final_eval_episodes=2", "batch_size=32", "actor.width=16", "critic.width=16",
        "critic.blocks=1", "critic.sparsity=0.5", "progress=false"]
TIMING = ("steps_per_s", "wall_time")
# With action_repeat 2, a cartpole episode is 500 agent steps; checkpoint_every=2000 env steps then gives
# checkpoints at agent steps 1000 and 2000, plus the final one at 3000 (keep_checkpoints=2 keeps 2000, 3000).


def read_csv(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.reader(f))


def without_timing(run_dir: Path) -> list[list[str]]:
    rows = read_csv(run_dir)
    keep = [i for i, c in enumerate(rows[0]) if c not in TIMING]
    assert len(keep) == len(rows[0]) - len(TIMING), rows[0]
    return [[r[i] for i in keep] for r in rows]


def assert_same_metrics(run_dir: Path, reference: Path) -> None:
    got, want = without_timing(run_dir), without_timing(reference)
    assert len(got) == len(want), (len(got), len(want))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"metrics.csv row {i} differs:\n  got  {a}\n  want {b}"


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def cli_env() -> dict:
    return {**os.environ, "MUJOCO_GL": "egl"}


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run from an empty directory, so that nothing lands in the repository by mistake (e.g. runs/)."""
    monkeypatch.chdir(tmp_path)


def run_main(argv, capsys):
    """The CLI in-process: (exit code, stdout, the non-empty stderr lines but a run's evaluation
    progress lines, such as the step-0 evaluation's)."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, [line for line in err.splitlines() if line.strip() and not re.match(r"\[.*\] env_step \d+: ", line)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process run with ARGS: (run_dir, summary, log messages)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    messages: list[str] = []
    cfg = config.from_args(None, ARGS + [f"run_dir={run_dir}"])
    summary = train.train(cfg, log=messages.append)
    return run_dir, summary, messages


def test_reference_run_layout(reference):
    run_dir, summary, messages = reference
    rows = read_csv(run_dir)
    assert [int(r[0]) for r in rows[1:]] == [0, 1000, 2000, 3000, 4000, 5000, 6000]  # step 0: untrained policy
    assert checkpoint_files(run_dir) == ["step_0000002000.json", "step_0000002000.npz",
                                         "step_0000003000.json", "step_0000003000.npz"]
    assert (run_dir / "summary.json").is_file() and not (run_dir / "error.txt").exists()
    assert not any("resuming" in m for m in messages)
    assert summary["final_eval_episodes"] == 2 and np.isfinite(summary["final_return"])


# ----------------------------------------------------------------------------------------------
# 1. SIGKILL mid-run, then rerun the same command: the same metrics as the uninterrupted run


def test_resume_after_sigkill_matches_uninterrupted_run(reference, tmp_path):
    ref_dir = reference[0]
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparserl.cli", "train", *ARGS, f"run_dir={run_dir}"]
    marker = run_dir / "checkpoints" / "step_0000002000.json"  # agent step 2000 = env step 4000
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, f"exited ({proc.returncode}) before checkpoint 2000: " \
                                            f"{(tmp_path / 'first.err').read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no checkpoint at agent step 2000 within 300 s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    killed_rows = read_csv(run_dir)
    assert len(killed_rows) - 1 >= 4  # the env step 4000 row is flushed before checkpoint 2000 is written
    steps = checkpoint.complete_steps(run_dir / "checkpoints")
    assert 2000 in steps and max(steps) < 3000

    second = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    m = re.search(r"resuming at env step (\d+)", second.stderr)
    assert m, second.stderr[-3000:]
    assert int(m.group(1)) == 2 * max(steps) == 4000
    assert "final_return" in second.stdout

    assert_same_metrics(run_dir, ref_dir)
    assert len(read_csv(run_dir)) == len(read_csv(ref_dir)) == 8  # header, step 0, 1000 ... 6000
    assert (run_dir / "summary.json").is_file()
    # keep_checkpoints=2: the old checkpoint 1000 is gone, no temporary files are left behind
    assert checkpoint_files(run_dir) == checkpoint_files(ref_dir)
    assert len(checkpoint.complete_steps(run_dir / "checkpoints")) <= 2


# ----------------------------------------------------------------------------------------------
# 2. The newest checkpoint is corrupt: warn, quarantine it as *.corrupt, resume from the previous one


def unfinished_copy(ref_dir, run_dir):
    """A copy of the finished reference run that looks killed before writing summary.json."""
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "summary.json").unlink()
    return run_dir


def test_corrupt_checkpoint_falls_back_to_previous(reference, tmp_path):
    ref_dir = reference[0]
    run_dir = unfinished_copy(ref_dir, tmp_path / "corrupt")
    ckpt = run_dir / "checkpoints"
    npz = ckpt / "step_0000003000.npz"
    data = bytearray(npz.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes((b ^ 0xFF) for b in data[middle:middle + 64])
    npz.write_bytes(bytes(data))
    garbled = bytes(data)
    json_text = (ckpt / "step_0000003000.json").read_text()

    messages: list[str] = []
    cfg = config.from_args(None, ARGS + [f"run_dir={run_dir}"])
    assert rundir.check(cfg) == "resume"
    summary = train.train(cfg, log=messages.append)

    warnings = [m for m in messages if "warning" in m]
    assert len(warnings) == 1, messages
    assert "checksum" in warnings[0] and "step_0000003000.npz" in warnings[0]
    assert any("resuming at env step 4000" in m for m in messages), messages
    # the bad files are kept aside, byte for byte, and were not overwritten by the new final checkpoint
    assert (ckpt / "step_0000003000.npz.corrupt").read_bytes() == garbled
    assert (ckpt / "step_0000003000.json.corrupt").read_text() == json_text
    assert checkpoint.complete_steps(ckpt) == [2000, 3000]
    arrays, meta = checkpoint.load(ckpt, 3000)  # the rewritten final checkpoint is valid
    assert meta["agent_step"] == 3000 and meta["csv_rows"] == 7  # the step-0 row counts

    assert_same_metrics(run_dir, ref_dir)
    assert summary["final_return"] == reference[1]["final_return"]


def test_all_checkpoints_corrupt_starts_over(reference, tmp_path):
    ref_dir = reference[0]
    run_dir = unfinished_copy(ref_dir, tmp_path / "all_corrupt")
    ckpt = run_dir / "checkpoints"
    for npz in ckpt.glob("step_*.npz"):
        with open(npz, "r+b") as f:  # truncate: the size no longer matches the marker
            f.truncate(npz.stat().st_size // 3)

    messages: list[str] = []
    summary = train.train(config.from_args(None, ARGS + [f"run_dir={run_dir}"]), log=messages.append)
    warnings = [m for m in messages if "warning" in m]
    assert len(warnings) == 2 and all("checksum" in w for w in warnings), messages
    assert any("no usable checkpoint; starting over" in m for m in messages), messages
    assert not any("resuming" in m for m in messages), messages
    assert_same_metrics(run_dir, ref_dir)
    assert summary["final_return"] == reference[1]["final_return"]
    assert checkpoint.complete_steps(ckpt) == [2000, 3000]
    # bad checkpoints are renamed *.corrupt and kept, even when the run starts over
    assert sorted(p.name for p in ckpt.glob("*.corrupt")) == [
        "step_0000002000.json.corrupt", "step_0000002000.npz.corrupt",
        "step_0000003000.json.corrupt", "step_0000003000.npz.corrupt"]


def test_kill_between_final_checkpoint_and_summary(reference, tmp_path):
    run_dir = unfinished_copy(reference[0], tmp_path / "no_summary")  # final checkpoint (step 3000) intact
    cfg = config.from_args(None, ARGS + [f"run_dir={run_dir}"])
    assert rundir.check(cfg) == "resume"
    summary = train.train(cfg, log=lambda m: None)
    assert summary["final_return"] == reference[1]["final_return"]
    assert (run_dir / "summary.json").is_file()
    assert_same_metrics(run_dir, reference[0])


# ----------------------------------------------------------------------------------------------
# 3. NaN: a Gymnasium env whose reward turns NaN after NAN_AFTER steps


NAN_AFTER = 400
NAN_ENV_ID = "SparserlNaNReward-v0"


class NaNRewardEnv(gymnasium.Env):
    """3-dim observation, 1-dim action; 50-step episodes ended by truncation; the reward of every step
    after the first NAN_AFTER steps of this instance is NaN."""

    def __init__(self):
        self.observation_space = gymnasium.spaces.Box(-10.0, 10.0, (3,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.total_steps = 0
        self.t = 0
        self.state = np.zeros(3, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.state = self.np_random.uniform(-1.0, 1.0, 3).astype(np.float32)
        return self.state.copy(), {}

    def step(self, action):
        a = float(np.asarray(action).ravel()[0])
        self.state = np.clip(0.9 * self.state + np.array([a, 0.1 * a, -0.05], np.float32), -10, 10).astype(np.float32)
        self.t += 1
        self.total_steps += 1
        reward = float("nan") if self.total_steps > NAN_AFTER else -float(self.state[0] ** 2)
        return self.state.copy(), reward, False, self.t >= 50, {}


@pytest.fixture(scope="module")
def nan_env():
    """Registers NaNRewardEnv (before any config naming it is validated) for this module's tests only."""
    registered = NAN_ENV_ID not in gymnasium.envs.registry
    if registered:
        gymnasium.register(id=NAN_ENV_ID, entry_point=NaNRewardEnv, disable_env_checker=True)
    yield f"gym:{NAN_ENV_ID}"
    if registered:
        del gymnasium.envs.registry[NAN_ENV_ID]

NAN_ARGS = [f"env=gym:{NAN_ENV_ID}", "action_repeat=1", "env_steps=2000", "warmup_steps=100",
            "checkpoint_every=100", "eval_every=100000", "eval_episodes=1", "final_eval_episodes=1",
            "batch_size=32", "actor.width=16", "critic.width=16", "critic.blocks=1", "progress=false"]


def test_nan_reward_stops_with_numerical_fault(nan_env, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    cfg = config.from_args(None, NAN_ARGS + [f"run_dir={run_dir}"])
    messages: list[str] = []
    with pytest.raises(rundir.NumericalFault) as info:
        train.train(cfg, log=messages.append)
    msg = str(info.value)
    assert "critic_loss" in msg and "agent step" in msg, msg
    fault_step = int(re.search(r"agent step (\d+)", msg).group(1))
    # the first NaN transition is stored at agent step NAN_AFTER (0-based), learning runs on it from then on
    assert NAN_AFTER <= fault_step < cfg.agent_steps, msg
    assert f"env step {fault_step}" in msg  # action_repeat=1

    error = (run_dir / "error.txt").read_text()
    assert "critic_loss" in error and f"agent step {fault_step}" in error
    assert not (run_dir / "summary.json").exists()
    steps = checkpoint.complete_steps(run_dir / "checkpoints")
    assert steps, "no checkpoint before the fault"
    assert all(s <= fault_step for s in steps), (steps, fault_step)
    assert max(steps) >= NAN_AFTER - 100  # checkpoints kept coming until the fault
    for s in steps:  # the kept checkpoints hold finite parameters and finite rewards only
        arrays, meta = checkpoint.load(run_dir / "checkpoints", s)
        for key, value in arrays.items():
            if key.startswith("state/") and np.issubdtype(value.dtype, np.floating):
                assert np.isfinite(value).all(), key
        assert np.isfinite(arrays["buffer/reward"]).all()
    assert len(read_csv(run_dir)) == 2  # header and the step-0 row: no later evaluation was reached

    # through the CLI: exit code 3 and one line naming the quantity
    cli_dir = tmp_path / "nan_cli"
    capsys.readouterr()
    rc, out, err = run_main(["train", *NAN_ARGS, f"run_dir={cli_dir}"], capsys)
    assert rc == EXIT_FAULT == 3
    assert len(err) == 1 and err[0].startswith("sparserl: stopped:") and "critic_loss" in err[0], err
    assert "critic_loss" in (cli_dir / "error.txt").read_text()
    assert not (cli_dir / "summary.json").exists()


def test_faulted_run_dir_is_refused(nan_env, tmp_path, capsys):
    """Rerunning a run that stopped on NaN is a usage error (exit 2), not a silent retrain."""
    run_dir = tmp_path / "nan"
    cfg = config.from_args(None, NAN_ARGS + ["env_steps=600", f"run_dir={run_dir}"])
    with pytest.raises(rundir.NumericalFault):
        train.train(cfg, log=lambda m: None)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    capsys.readouterr()
    rc, out, err = run_main(["train", *NAN_ARGS, "env_steps=600", f"run_dir={run_dir}"], capsys)
    assert rc == EXIT_USAGE
    assert len(err) == 1 and "numerical fault" in err[0] and "overwrite=true" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


# ----------------------------------------------------------------------------------------------
# 4. Several seeds in a loop compute exactly what single-seed runs compute


def test_multi_seed_loop_equals_single_seed_runs(tmp_path):
    short = ARGS + ["env_steps=3000"]
    multi = tmp_path / "multi"
    summaries = train.train(config.from_args(None, short + ["seeds=0,1", f"run_dir={multi}"]), log=lambda m: None)
    assert isinstance(summaries, list) and [s["seed"] for s in summaries] == [0, 1]
    assert sorted(p.name for p in multi.iterdir()) == ["seed0", "seed1"]
    for k in (0, 1):
        saved = yaml.safe_load((multi / f"seed{k}" / "config.yaml").read_text())
        assert saved["seed"] == k and saved["seeds"] is None and saved["run_dir"] == str(multi / f"seed{k}")
        assert (multi / f"seed{k}" / "summary.json").is_file()

    single = tmp_path / "single1"
    summary1 = train.train(config.from_args(None, short + ["seed=1", f"run_dir={single}"]), log=lambda m: None)
    assert_same_metrics(multi / "seed1", single)
    assert len(read_csv(single)) == 1 + 4  # header, env steps 0, 1000, 2000, 3000
    assert summary1["final_return"] == summaries[1]["final_return"]
    # the two seeds really are different runs
    assert without_timing(multi / "seed0")[1:] != without_timing(multi / "seed1")[1:]

    # A kill between the seeds' saves of the final checkpoint: seed0 has it, seed1 does not. Rerunning
    # resumes both seeds from the newest step they share and reproduces the same metrics.
    resumed = tmp_path / "resumed"
    shutil.copytree(multi, resumed)
    for k in (0, 1):
        (resumed / f"seed{k}" / "summary.json").unlink()
    for suffix in (".npz", ".json"):
        (resumed / "seed1" / "checkpoints" / f"step_0000001500{suffix}").unlink()
    assert checkpoint.complete_steps(resumed / "seed0" / "checkpoints") == [1000, 1500]
    assert checkpoint.complete_steps(resumed / "seed1" / "checkpoints") == [1000]
    messages: list[str] = []
    again = train.train(config.from_args(None, short + ["seeds=0,1", f"run_dir={resumed}"]), log=messages.append)
    assert any("resuming at env step 2000" in m for m in messages), messages
    assert not any("warning" in m for m in messages), messages
    for k in (0, 1):
        assert_same_metrics(resumed / f"seed{k}", multi / f"seed{k}")
        assert again[k]["final_return"] == summaries[k]["final_return"]
        assert checkpoint.complete_steps(resumed / f"seed{k}" / "checkpoints") == [1000, 1500]

    # a kill between the seeds' summary.json writes: the rerun completes the missing summary
    (resumed / "seed1" / "summary.json").unlink()
    finished = train.train(config.from_args(None, short + ["seeds=0,1", f"run_dir={resumed}"]), log=lambda m: None)
    assert [f["final_return"] for f in finished] == [s["final_return"] for s in summaries]
    assert (resumed / "seed1" / "summary.json").is_file()
    assert_same_metrics(resumed / "seed1", multi / "seed1")


def test_num_seeds_resolves_to_consecutive_seeds(tmp_path):
    cfg = config.from_args(None, ARGS + ["num_seeds=2", "seed=5", f"run_dir={tmp_path / 'r'}"])
    assert cfg.seed_list == [5, 6]
    per = cfg.per_seed()
    assert [c.seed for c in per] == [5, 6]
    assert [c.resolved_run_dir for c in per] == [tmp_path / "r" / "seed5", tmp_path / "r" / "seed6"]
    assert all(c.num_seeds == 1 and c.seeds is None for c in per)
    assert config.from_args(None, ARGS + ["seeds=3,1"]).seed_list == [3, 1]  # seeds= overrides seed/num_seeds
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# 5. vmap mode: same run, numbers close to the loop mode (vmapped kernels may round differently)


def test_vmap_seeds_close_to_loop(tmp_path):
    short = ARGS + ["env_steps=1200", "warmup_steps=500", "eval_every=1200", "seeds=0,1"]
    out = {}
    for mode in ("loop", "vmap"):
        root = tmp_path / mode
        out[mode] = train.train(config.from_args(None, short + [f"seed_parallel={mode}", f"run_dir={root}"]),
                                log=lambda m: None)
    metrics = train.agents.get("sac").METRICS
    for k in (0, 1):
        rows = {}
        for mode in ("loop", "vmap"):
            with open(tmp_path / mode / f"seed{k}" / "metrics.csv", newline="") as f:
                rows[mode] = list(csv.DictReader(f))
            assert [int(r["env_step"]) for r in rows[mode]] == [0, 1200]  # the step-0 row, the final one
        loop, vmap = rows["loop"][-1], rows["vmap"][-1]
        for key in metrics:
            assert vmap[key] != "", key
            assert float(vmap[key]) == pytest.approx(float(loop[key]), rel=1e-3), (k, key, vmap[key], loop[key])
        for key in ("episodes", "train_return"):  # warm-up and env stepping are host-side: identical
            assert vmap[key] == loop[key], key
        assert np.isfinite(float(vmap["eval_return"])) and int(vmap["eval_episodes"]) == 2
    for a, b in zip(out["vmap"], out["loop"]):
        assert np.isfinite(a["final_return"])
        assert a["params"] == b["params"]
        assert a["seed"] == b["seed"]


# ----------------------------------------------------------------------------------------------
# 6. A run directory holding another config is refused; a finished run is not retrained


def test_config_mismatch_and_finished_run(reference, tmp_path, capsys):
    run_dir = tmp_path / "done"
    shutil.copytree(reference[0], run_dir)
    metrics = run_dir / "metrics.csv"
    before_text = metrics.read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    capsys.readouterr()

    other = [a for a in ARGS if not a.startswith("critic.width=")] + ["critic.width=32"]
    rc, out, err = run_main(["train", *other, f"run_dir={run_dir}"], capsys)
    assert rc == EXIT_USAGE
    assert len(err) == 1, err
    assert "critic.width" in err[0] and "overwrite=true" in err[0] and err[0].startswith("sparserl: error:"), err
    assert metrics.read_text() == before_text
    with pytest.raises(ConfigError, match="critic.width"):
        train.train(config.from_args(None, other + [f"run_dir={run_dir}"]))

    rc, out, err = run_main(["train", *ARGS, f"run_dir={run_dir}"], capsys)
    assert rc == 0, err
    assert "final_return" in out
    assert any("already finished" in line for line in err), err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == mtimes  # nothing retrained or rewritten
    assert metrics.read_text() == before_text

    rc, out, err = run_main(["train", *ARGS, "resume=false", f"run_dir={run_dir}"], capsys)
    assert rc == EXIT_USAGE
    assert len(err) == 1 and "resume=false" in err[0] and "overwrite=true" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == mtimes


# ----------------------------------------------------------------------------------------------
# Found in review: resuming from a final checkpoint taken mid-episode; diagnostics rows after a resume


def test_resume_from_final_mid_episode_checkpoint_and_diagnostics_rows(tmp_path):
    # env_steps=1500: the final checkpoint (agent step 750) falls mid-episode; the one at env step 1000
    # (agent step 500) is taken before the first diagnostics row (learning starts at agent step 500)
    args = ARGS + ["env_steps=1500", "checkpoint_every=1000", "keep_checkpoints=10", "diag_every=500",
                   "diag_probe_size=64", "diag_grad_samples=4"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    reference = train.train(config.from_args(None, args + [f"run_dir={ref_dir}"]), log=lambda m: None)
    assert checkpoint.complete_steps(ref_dir / "checkpoints") == [500, 750]

    # killed after the final checkpoint, before summary.json: finishes from the saved final evaluation
    unfinished_copy(ref_dir, run_dir)
    again = train.train(config.from_args(None, args + [f"run_dir={run_dir}"]), log=lambda m: None)
    assert again["final_return"] == reference["final_return"]
    assert again["env_steps"] == 1500

    # killed before the final checkpoint: resume from step 500, whose diag_rows is 0
    for suffix in (".npz", ".json"):
        (run_dir / "checkpoints" / f"step_0000000750{suffix}").unlink()
    (run_dir / "summary.json").unlink()
    messages = []
    train.train(config.from_args(None, args + [f"run_dir={run_dir}"]), log=messages.append)
    assert any("resuming at env step 1000" in m for m in messages), messages
    assert (run_dir / "diagnostics.csv").read_text() == (ref_dir / "diagnostics.csv").read_text()
    assert_same_metrics(run_dir, ref_dir)
