"""The streaming loop of ``agent=stream_ac``: one transition, one update, no replay, no batches.

``train.train(cfg)`` claims the run directories and hands ``stream_ac`` configs to
:func:`train_stream`, which writes the same run directory as every other agent through
:mod:`sparserl.rundir` (``config.yaml`` / ``model.json`` / ``metrics.csv`` / ``summary.json``,
numerical faults), with checkpoints and exact resume, progress bar, TensorBoard / W&B loggers.

Per env step the host does: ``env.step(action)``; one jitted call (donated state) that normalises
the next observation, scales the reward, runs the ObGD updates of actor and critic, adds the
metrics to on-device sums and samples the next action; reading that action back is the only host
sync. At an episode end the env is reset and a second small jitted call (:func:`stream_ac.begin`)
samples the first action of the next episode.

What the run directory holds (streaming RL reports training episodes, there is no separate
evaluation): a ``metrics.csv`` row every ``eval_every`` env steps whose ``train_return`` and
``eval_return`` are both the mean return of the training episodes that ended in that interval
(``eval_return_std`` their std, ``eval_episodes`` their count; empty when none ended);
``summary.json``'s ``final_return`` is the mean of the last ``stream.final_episodes`` (10) training
episodes. Several seeds run one after another in the process. Diagnostics (``diag_every``) need a
replay buffer and are not computed for stream_ac.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sparserl import agents, checkpoint, envs, loggers, rundir
from sparserl.agents import common, stream_ac
from sparserl.agents.common import accumulate, fresh_sums
from sparserl.rundir import Timers
from sparserl.config import Config, to_yaml

BAR_EVERY = 250  # agent steps between progress-bar refreshes


def train_stream(seed_cfgs: list[Config], statuses: list[str], log: Callable[[str], None]):
    """Train every seed in turn (run directories claimed and checked by ``train.train``); the
    summary (a list of them for several seeds)."""
    summaries = [train_one(c, status, log) for c, status in zip(seed_cfgs, statuses)]
    return summaries[0] if len(summaries) == 1 else summaries


def make_step(cfg: Config, time_limit: int):
    """The jitted per-step call ``(state, sums, transition) -> (state, sums, action)`` and the jitted
    episode start ``(state, obs) -> (state, action)``."""

    def step(state, sums, transition):
        first = state.step
        state, metrics, action = stream_ac.step(state, transition, cfg, time_limit)
        return state, accumulate(sums, metrics, stream_ac.METRICS, first), action

    begin = functools.partial(stream_ac.begin, cfg=cfg, time_limit=time_limit)
    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(begin, donate_argnums=0)


def train_one(cfg: Config, status: str, log: Callable[[str], None]) -> dict:
    run_dir = cfg.resolved_run_dir
    if status == "finished":
        log(f"[{run_dir.name}] already finished; delete it or pass overwrite=true to train again")
        return json.loads((run_dir / "summary.json").read_text())
    env = envs.make(cfg.env, envs.derive_seed(cfg.seed, 0), cfg.action_repeat)
    state = stream_ac.init(cfg, env.obs_dim, env.action_dim)
    stats = agents.model_stats(state)
    sums = fresh_sums(stream_ac)

    # Host-side counters (checkpointed with the state)
    start_step, wall_offset, timers = 0, 0.0, Timers()
    episodes, episode_return, row_returns, recent, csv_rows, steps_in_row = 0, 0.0, [], [], 0, 0
    if status == "resume":
        loaded = checkpoint.latest_valid(run_dir / "checkpoints", None, log)
        if loaded is None:
            log(f"[{run_dir.name}] no usable checkpoint; starting over")
            status = "new"
        else:
            arrays, meta = loaded
            state = checkpoint.unflatten_like(state, arrays, "state")
            sums = checkpoint.unflatten_like(sums, arrays, "metric_sums")
            env.set_rng_state(meta["env_rng"])
            start_step, wall_offset, timers = meta["agent_step"], meta["wall_time"], Timers(meta["timers"])
            episodes, episode_return = meta["episodes"], meta["episode_return"]
            row_returns, recent, csv_rows = list(meta["row_returns"]), list(meta["recent_returns"]), meta["csv_rows"]
            steps_in_row = meta["steps_in_row"]
            if not meta["needs_reset"] and start_step < cfg.agent_steps:
                raise checkpoint.CheckpointError("checkpoint taken mid-episode cannot be resumed exactly")
            rundir.truncate_csv(run_dir / "metrics.csv", csv_rows)
            state, sums = jax.tree_util.tree_map(jnp.asarray, (state, sums))
            log(f"[{run_dir.name}] resuming at env step {start_step * cfg.action_repeat}")
    if status == "new":
        rundir.start(cfg, stats)

    step_fn, begin_fn = make_step(cfg, env.time_limit)
    norms_fn = jax.jit(lambda st: {"actor_param_norm": common.global_norm(st.actor.params),
                                   "critic_param_norm": common.global_norm(st.critic.params)})
    live = loggers.make_loggers(cfg, run_dir, to_yaml(cfg), cfg.to_dict())  # log.tensorboard / log.wandb
    metrics_log = rundir.MetricsLog(cfg)
    start = time.perf_counter() - wall_offset
    row_start, row_start_step = time.perf_counter(), start_step
    next_checkpoint = (start_step * cfg.action_repeat // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    bar = tqdm(total=cfg.env_steps, initial=start_step * cfg.action_repeat, unit="step", disable=not cfg.progress,
               dynamic_ncols=True, desc=run_dir.name[:40], file=sys.stderr)
    needs_reset, action = True, None

    def check_faults(host_sums, norms, agent_step):
        if int(host_sums["_fault"]) >= 0:
            raise rundir.numerical_fault(run_dir, stream_ac.METRICS[int(host_sums["_fault"])],
                                  int(host_sums["_fault_step"]), cfg.action_repeat)
        for key, value in norms.items():
            if not np.isfinite(value):
                raise rundir.numerical_fault(run_dir, key.replace("_param_norm", " parameters"), agent_step, cfg.action_repeat)

    def save(agent_step: int) -> None:
        host_sums = jax.device_get(sums)
        check_faults(host_sums, jax.device_get(norms_fn(state)), agent_step)  # never save a faulty state
        arrays = checkpoint.flatten_tree(state, "state")
        arrays.update(checkpoint.flatten_tree(host_sums, "metric_sums"))
        meta = {"agent_step": agent_step, "env_step": agent_step * cfg.action_repeat, "env_rng": env.rng_state(),
                "episodes": episodes, "episode_return": episode_return, "row_returns": row_returns,
                "recent_returns": recent, "csv_rows": csv_rows, "needs_reset": needs_reset, "steps_in_row": steps_in_row,
                "wall_time": time.perf_counter() - start, "timers": timers.seconds}
        checkpoint.save(run_dir / "checkpoints", agent_step, arrays, meta, keep=cfg.keep_checkpoints)

    try:
        t = time.perf_counter()
        for agent_step in range(start_step, cfg.agent_steps):
            if needs_reset:
                state, action = begin_fn(state, env.reset())
                needs_reset = False
            a = np.clip(np.asarray(action), -1.0, 1.0)  # the only host sync: waits for the previous update
            t = timers.add("update", t)
            next_obs, reward, terminated, truncated = env.step(a)
            episode_return += reward
            t = timers.add("env", t)
            state, sums, action = step_fn(state, sums, stream_ac.pack(next_obs, reward, terminated, truncated))
            steps_in_row += 1
            t = timers.add("update", t)
            if terminated or truncated:
                row_returns.append(episode_return)
                recent = (recent + [episode_return])[-cfg.stream.final_episodes:]
                episodes += 1
                episode_return, needs_reset = 0.0, True

            env_step = (agent_step + 1) * cfg.action_repeat
            if (agent_step + 1) % BAR_EVERY == 0:
                bar.update(env_step - bar.n)
            is_last = agent_step + 1 == cfg.agent_steps
            if env_step % cfg.eval_every < cfg.action_repeat or is_last:
                host_sums, norms = jax.device_get(sums), jax.device_get(norms_fn(state))
                check_faults(host_sums, norms, agent_step + 1)
                now = time.perf_counter()
                means = {k: float(host_sums[k]) / steps_in_row for k in stream_ac.METRICS} if steps_in_row else {}
                ret = float(np.mean(row_returns)) if row_returns else float("nan")
                row = {"env_step": env_step, "agent_step": agent_step + 1, "episodes": episodes,
                       "train_return": ret, "eval_return": ret,
                       "eval_return_std": float(np.std(row_returns)) if row_returns else float("nan"),
                       "eval_episodes": len(row_returns), **means, **norms,
                       "steps_per_s": (agent_step + 1 - row_start_step) / (now - row_start), "wall_time": now - start}
                scalars = metrics_log.write(row)
                for logger in live:
                    logger.log_scalars(env_step, scalars, "metrics")
                csv_rows += 1
                row_returns = []
                sums, steps_in_row = fresh_sums(stream_ac), 0
                bar.set_postfix(train_return=f"{ret:.1f}", refresh=False)
                row_start, row_start_step = time.perf_counter(), agent_step + 1
                t = timers.add("log", now)
            if needs_reset and env_step >= next_checkpoint:
                save(agent_step + 1)
                next_checkpoint = (env_step // cfg.checkpoint_every + 1) * cfg.checkpoint_every
                t = timers.add("checkpoint", t)
        save(cfg.agent_steps)
    except envs.EnvFault as fault:  # a NaN action, a diverging simulation: a numerical fault
        check_faults(jax.device_get(sums), jax.device_get(norms_fn(state)), agent_step)  # the root cause, if any
        raise rundir.numerical_fault(run_dir, str(fault), agent_step, cfg.action_repeat) from None
    finally:
        bar.close()
        metrics_log.close()
        for logger in live:
            logger.close()

    wall = time.perf_counter() - start
    final = np.asarray(recent if recent else [episode_return], np.float64)  # no finished episode: the partial one
    summary = {
        "final_return": float(final.mean()), "final_return_std": float(final.std()),
        "final_return_ci95": float(1.96 * final.std(ddof=1) / np.sqrt(len(final))) if len(final) > 1 else 0.0,
        "final_eval_episodes": len(recent), "final_return_source": "training episodes",
        "episodes": episodes, "env_steps": cfg.agent_steps * cfg.action_repeat, "seed": cfg.seed, "wall_time": wall,
        "agent_steps_per_s": (cfg.agent_steps - start_step) / max(wall - wall_offset, 1e-9),
        "time_share": {k: v / wall for k, v in timers.seconds.items()},
        "params": {n: {k: m[k] for k in ("total_params", "nonzero_params", "sparsity")} for n, m in stats.items()},
    }
    rundir.write_summary(run_dir, summary, log)
    log(f"[{run_dir.name}] final_return {summary['final_return']:.1f} (last {len(recent)} training episodes), "
        f"{summary['agent_steps_per_s']:.0f} agent steps/s")
    return summary
