"""The training loop: act, store, update, evaluate, log.

One agent step: pick an action (random during warm-up, else the stochastic policy), step the env
(``action_repeat`` env steps), store the transition, update the running observation statistics
and, after warm-up, run ``utd`` gradient steps in one jitted call. Every ``eval_every`` env steps
the deterministic policy is evaluated on a separately seeded env and a row goes to ``metrics.csv``
(flushed at once, so a kill loses at most one row). At the end, a final evaluation of
``final_eval_episodes`` episodes, ``summary.json``.

Run directory: ``config.yaml`` (fully resolved), ``model.json`` (parameter counts and per-layer
sparsity), ``metrics.csv``, ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sparserl import agents, envs, sparsity
from sparserl.agents.common import ObsStats, normalize
from sparserl.config import Config, ConfigError, to_yaml
from sparserl.replay import ReplayBuffer

BASE_COLUMNS = ("env_step", "agent_step", "episodes", "train_return", "eval_return", "eval_return_std",
                "eval_episodes")
TAIL_COLUMNS = ("steps_per_s", "wall_time")


def metric_columns(cfg: Config) -> tuple[str, ...]:
    return BASE_COLUMNS + agents.get(cfg.agent).METRICS + TAIL_COLUMNS


def check_run_dir(cfg: Config) -> Path:
    """Refuse (before any compute) to write into a directory that already holds a run."""
    run_dir = cfg.resolved_run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"run_dir={str(run_dir)!r}: already holds a run; pass overwrite=true to replace it "
                              f"or choose another run_dir=/name=")
    return run_dir


def model_stats(state) -> dict[str, Any]:
    return {name: sparsity.stats(m.params, m.mask) for name, m in agents.modules(state).items()}


class Timers:
    """Wall-time accounting per phase (env, act, update, eval, log)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now


def evaluate(env: envs.Env, policy: Callable[[np.ndarray], np.ndarray], episodes: int) -> np.ndarray:
    returns = np.zeros(episodes)
    for i in range(episodes):
        obs, done = env.reset(), False
        while not done:
            obs, reward, terminated, truncated = env.step(policy(obs))
            returns[i] += reward
            done = terminated or truncated
    return returns


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return repr(float(x)) if isinstance(x, (float, np.floating)) else str(x)


def train(cfg: Config, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one agent per ``cfg``; returns the summary (also written to ``summary.json``)."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    run_dir = check_run_dir(cfg)
    agent = agents.get(cfg.agent)
    env = envs.make(cfg.env, envs.derive_seed(cfg.seed, 0), cfg.action_repeat)
    eval_env = envs.make(cfg.env, envs.derive_seed(cfg.seed, 1), cfg.action_repeat)
    state = agent.init(cfg, env.obs_dim, env.action_dim)
    stats = model_stats(state)

    if run_dir.exists():
        shutil.rmtree(run_dir)  # only reached with overwrite=true
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "model.json").write_text(json.dumps(stats, indent=1))

    act_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xAC7)

    @partial(jax.jit, static_argnames="deterministic")
    def policy_fn(actor_params, obs, obs_stats, step, deterministic):
        return agent.act(actor_params, normalize(obs, obs_stats)[None], jax.random.fold_in(act_key, step), deterministic, cfg)[0]

    @partial(jax.jit, donate_argnums=(0, 1))
    def learn(state, metric_sums, batches, obs_stats):
        state, metrics = agent.update(state, batches, obs_stats, cfg)
        return state, {k: metric_sums[k] + metrics[k].mean() for k in metric_sums}

    normalizer = envs.RunningMeanStd(env.obs_dim)

    def obs_stats() -> ObsStats:
        if not cfg.obs_norm:
            return ObsStats(np.zeros(env.obs_dim, np.float32), np.ones(env.obs_dim, np.float32))
        return ObsStats(normalizer.mean.astype(np.float32), normalizer.std.astype(np.float32))

    def deterministic_policy(obs):
        return np.asarray(policy_fn(state.actor.params, obs, current_stats, 0, True))

    buffer = ReplayBuffer(min(cfg.buffer_size, cfg.agent_steps), env.obs_dim, env.action_dim)
    sample_rng = np.random.default_rng(envs.derive_seed(cfg.seed, 2))
    action_rng = np.random.default_rng(envs.derive_seed(cfg.seed, 3))

    def zero_sums():  # fresh arrays each time: `learn` donates (reuses) the buffers it is given
        return {k: jnp.zeros((), jnp.float32) for k in agent.METRICS}

    metric_sums, updates_in_row = zero_sums(), 0

    columns = metric_columns(cfg)
    csv_file = open(run_dir / "metrics.csv", "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=columns)
    writer.writeheader()
    csv_file.flush()

    timers = Timers()
    start = row_start = time.perf_counter()
    row_start_step = 0
    episode_return, episode_returns, episodes = 0.0, [], 0
    obs = env.reset()
    normalizer.update(obs)
    current_stats = obs_stats()
    bar = tqdm(total=cfg.env_steps, unit="step", disable=not cfg.progress, dynamic_ncols=True,
               desc=run_dir.name[:40], file=sys.stderr)
    last_eval = float("nan")
    summary_eval = None
    try:
        for agent_step in range(cfg.agent_steps):
            t = time.perf_counter()
            if agent_step < cfg.warmup_steps:
                action = action_rng.uniform(-1.0, 1.0, env.action_dim).astype(np.float32)
            else:
                action = np.asarray(policy_fn(state.actor.params, obs, current_stats, agent_step, False))
            t = timers.add("act", t)
            next_obs, reward, terminated, truncated = env.step(action)
            buffer.add(obs, action, reward, 0.0 if terminated else 1.0, next_obs)
            episode_return += reward
            if terminated or truncated:
                episode_returns.append(episode_return)
                episodes += 1
                episode_return = 0.0
                next_obs = env.reset()
            obs = next_obs
            if cfg.obs_norm:
                normalizer.update(obs)
                current_stats = obs_stats()
            t = timers.add("env", t)

            if agent_step >= cfg.warmup_steps:
                batches = buffer.sample(sample_rng, cfg.utd, cfg.batch_size)
                state, metric_sums = learn(state, metric_sums, batches, current_stats)
                updates_in_row += 1
                t = timers.add("update", t)

            env_step = (agent_step + 1) * cfg.action_repeat
            bar.update(cfg.action_repeat)
            is_last = agent_step + 1 == cfg.agent_steps
            if env_step % cfg.eval_every < cfg.action_repeat or is_last:
                n_eval = cfg.final_eval_episodes if is_last else cfg.eval_episodes
                returns = evaluate(eval_env, deterministic_policy, n_eval)
                t = timers.add("eval", t)
                means = ({k: float(v) / updates_in_row for k, v in jax.device_get(metric_sums).items()}
                         if updates_in_row else {})
                now = time.perf_counter()
                row = {"env_step": env_step, "agent_step": agent_step + 1, "episodes": episodes,
                       "train_return": float(np.mean(episode_returns)) if episode_returns else float("nan"),
                       "eval_return": float(returns.mean()), "eval_return_std": float(returns.std()),
                       "eval_episodes": n_eval, **means,
                       "steps_per_s": (agent_step + 1 - row_start_step) / (now - row_start),
                       "wall_time": now - start}
                writer.writerow({k: _fmt(row.get(k)) for k in columns})
                csv_file.flush()
                last_eval = row["eval_return"]
                bar.set_postfix(eval_return=f"{last_eval:.1f}", refresh=False)
                log(f"[{run_dir.name}] env_step {env_step}: eval_return {last_eval:.1f} ± {returns.std():.1f} "
                    f"({n_eval} ep), {row['steps_per_s']:.0f} agent steps/s")
                if is_last:
                    summary_eval = returns
                metric_sums, updates_in_row, episode_returns = zero_sums(), 0, []
                row_start, row_start_step = time.perf_counter(), agent_step + 1
                timers.add("log", now)
    finally:
        bar.close()
        csv_file.close()

    wall = time.perf_counter() - start
    summary = {
        "final_return": float(summary_eval.mean()),
        "final_return_std": float(summary_eval.std()),
        "final_return_ci95": float(1.96 * summary_eval.std(ddof=1) / np.sqrt(len(summary_eval)))
        if len(summary_eval) > 1 else 0.0,
        "final_eval_episodes": len(summary_eval),
        "env_steps": cfg.env_steps,
        "wall_time": wall,
        "agent_steps_per_s": cfg.agent_steps / wall,
        "time_share": {k: v / wall for k, v in timers.seconds.items()},
        "params": {name: {k: s[k] for k in ("total_params", "nonzero_params", "sparsity")} for name, s in stats.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
