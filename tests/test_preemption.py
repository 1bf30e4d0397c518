"""Preemption: checkpoints at any agent step (the envs' mid-episode state included) and a clean stop on
the signals schedulers send (SIGTERM, SIGINT, SIGUSR1, SIGUSR2), for SAC on DMC, Stream AC on Gymnasium
and DrQ-v2 from pixels. A run stopped by a signal and run again writes the same ``metrics.csv`` as an
uninterrupted run (all but the timing columns)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sparserl import checkpoint, config, envs, interrupt, provenance, runs, sweep, train
from sparserl.cli import main

TIMING = ("steps_per_s", "wall_time")
SAC_ARGS = ["env=cartpole-balance", "env_steps=1400", "checkpoint_every=100000", "eval_every=700", "warmup_steps=300",
            "eval_episodes=1", "final_eval_episodes=1", "batch_size=32", "actor.width=16", "critic.width=16",
            "critic.blocks=1", "critic.sparsity=0.5", "progress=false"]
# eval_every=700 env steps: rows fall mid-episode (cartpole episodes are 1000 env steps)
STREAM_ARGS = ["agent=stream_ac", "env=gym:InvertedPendulum-v5", "action_repeat=1", "env_steps=700", "eval_every=300",
               "checkpoint_every=100000", "actor.width=16", "actor.blocks=1", "critic.width=16", "critic.blocks=1",
               "progress=false"]
PIXEL_ARGS = ["agent=drqv2", "env=cartpole-balance", "render.size=24", "render.fast=true", "encoder.layers=2",
              "encoder.channels=8", "encoder.feature_dim=16", "actor.width=16", "critic.width=16", "batch_size=8",
              "action_repeat=8", "env_steps=1120", "warmup_steps=80", "eval_every=560", "eval_episodes=1",
              "final_eval_episodes=1", "checkpoint_every=100000", "progress=false"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(args)``: the run directory of one uninterrupted in-process run with ``args`` (each
    trained once per module)."""
    done: dict[tuple, Path] = {}

    def run(args: list[str]) -> Path:
        if tuple(args) not in done:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            train.train(config.from_args(None, args + [f"run_dir={run_dir}"]), log=lambda m: None)
            done[tuple(args)] = run_dir
        return done[tuple(args)]
    return run


def rows_without_timing(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, c in enumerate(rows[0]) if c not in TIMING]
    return [[r[i] for i in keep] for r in rows]


def play(env: envs.Env, seed: int, steps: int) -> list:
    """``steps`` random actions (a reset after each episode end): observations, rewards, ends."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(steps):
        obs, reward, terminated, truncated = env.step(rng.uniform(-1, 1, env.action_dim))
        out.append((obs.tobytes(), reward, terminated, truncated))
        if terminated or truncated:
            out.append(env.reset().tobytes())
    return out


@pytest.mark.parametrize("make", [
    lambda: envs.make("cheetah-run", 3, 2),  # a task with an episode-progress counter on the task object
    lambda: envs.make("reacher-easy", 5, 1),  # a task that moves and resizes its target in the model per episode
    lambda: envs.make("gym:Hopper-v5", 3, 1),  # terminates early: episodes of every length
    lambda: envs.PixelEnv("cartpole-balance", 2, 8, 24, 3, True),  # frame stack; 300 agent steps cross 2 episodes
], ids=["dmc-cheetah", "dmc-reacher", "gym-hopper", "pixels"])
def test_episode_state_continues_exactly_in_a_fresh_env(make):
    env = make()
    env.reset()
    play(env, 0, 37)
    state, rng = env.episode_state(), env.rng_state()
    expected = play(env, 1, 300)
    fresh = make()
    fresh.set_rng_state(rng)
    fresh.restore_episode(state)
    assert play(fresh, 1, 300) == expected  # bit for bit, across the following resets too


def stop_at_row(env_step: int, signum: int):
    """A log callback that sends ``signum`` to this process when the row at ``env_step`` is logged."""
    def log(message: str) -> None:
        if f"env_step {env_step}:" in message:
            os.kill(os.getpid(), signum)
    return log


@pytest.mark.parametrize("args,stop_step,signum", [
    (SAC_ARGS, 700, signal.SIGUSR2),
    (STREAM_ARGS, 600, signal.SIGTERM),
    (PIXEL_ARGS, 560, signal.SIGUSR1),
], ids=["sac-dmc", "stream_ac-gym", "drqv2-pixels"])
def test_signal_stops_mid_episode_and_resume_is_exact(args, stop_step, signum, reference, tmp_path):
    reference_dir = reference(args)

    run_dir = tmp_path / "stopped"
    cfg = config.from_args(None, args + [f"run_dir={run_dir}"])
    with interrupt.handling(), pytest.raises(interrupt.Interrupted) as stopped:
        train.train(cfg, log=stop_at_row(stop_step, signum))
    assert stopped.value.signum == signum and stopped.value.env_step == stop_step
    record = json.loads((run_dir / interrupt.MARKER).read_text())
    assert record["signal"] == signal.Signals(signum).name and record["env_step"] == stop_step
    assert runs.run_status(run_dir) == "interrupted"
    arrays, meta = checkpoint.latest_valid(run_dir / "checkpoints", None, lambda m: None)
    assert meta["env_step"] == stop_step and meta["needs_reset"] is False  # taken mid-episode
    assert any(k.startswith("episode/") for k in arrays)

    train.train(cfg, log=lambda m: None)  # the same command again: resumes and finishes
    assert rows_without_timing(run_dir) == rows_without_timing(reference_dir)
    assert runs.run_status(run_dir) == "finished" and not (run_dir / interrupt.MARKER).exists()
    sessions = provenance.read(run_dir)  # what produced the run: one entry per session
    assert [x["event"] for x in sessions] == ["start", "resume"]
    assert sessions[0]["versions"]["jax"] == jax.__version__ and sessions[0]["executor"] == "direct"
    assert sessions[0]["device_kind"] and sessions[0]["host"] and sessions[0]["job_id"] is None


def test_sigterm_at_a_random_moment_from_the_command_line(reference, tmp_path):
    """The CLI as a scheduler drives it: SIGTERM at a random moment (exit 75, status interrupted), the
    same command again, and the metrics of an uninterrupted run."""
    reference_dir = reference(SAC_ARGS)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparserl.cli", "train", *SAC_ARGS, f"run_dir={run_dir}"]
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.csv").is_file() or len((run_dir / "metrics.csv").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # somewhere in training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # finished before the signal: nothing to resume (rare on this small run)
        assert rows_without_timing(run_dir) == rows_without_timing(reference_dir)
        return
    assert proc.returncode == interrupt.EXIT_INTERRUPTED, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    listing = subprocess.run([sys.executable, "-m", "sparserl.cli", "ls", str(tmp_path)], capture_output=True,
                             text=True, env=env)
    assert any(line.split()[0] == "run" and "interrupted" in line for line in listing.stdout.splitlines()[1:])
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert rows_without_timing(run_dir) == rows_without_timing(reference_dir)


def test_second_sigint_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    with interrupt.handling():
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested() == signal.SIGINT  # the first: recorded, the run goes on to a checkpoint
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
    assert interrupt.requested() is None
    assert signal.getsignal(signal.SIGINT) == before  # the handlers the block found are restored


def test_stop_before_the_first_step_writes_a_checkpoint_at_step_zero(tmp_path, capsys):
    """A signal during start-up (before the step-0 evaluation): checkpoint at step 0, exit 75; the rerun
    writes the step-0 row once."""
    run_dir = tmp_path / "early"
    args = ["train", *SAC_ARGS, "env_steps=400", f"run_dir={run_dir}"]
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    from sparserl import train as train_module

    original = train_module.ReplayLoop.compile

    def compile_then_signal(self):
        original(self)
        os.kill(os.getpid(), signal.SIGUSR2)

    train_module.ReplayLoop.compile = compile_then_signal
    try:
        assert main(args) == interrupt.EXIT_INTERRUPTED
    finally:
        train_module.ReplayLoop.compile = original
    assert checkpoint.complete_steps(run_dir / "checkpoints") == [0]
    assert not (run_dir / "metrics.csv").exists() or len((run_dir / "metrics.csv").read_text().splitlines()) <= 1
    assert main(args) == 0
    steps = [r[0] for r in rows_without_timing(run_dir)[1:]]
    assert steps == ["0", "400"]  # the step-0 row once
    assert "stopped by SIGUSR2 at env step 0" in capsys.readouterr().err


@pytest.mark.parametrize("share, fraction", [(0.25, "0.237"), (0.5, "0.475"), (1.0, None), (0.0, None)])
def test_runs_sharing_a_gpu_get_a_capped_share_of_its_memory(share, fraction):
    env = sweep._child_env("local", share)
    assert env.get("XLA_PYTHON_CLIENT_MEM_FRACTION") == fraction
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and env["SPARSERL_EXECUTOR"] == "local"
