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

from sparserl import agents, checkpoint, envs, interrupt, loggers, provenance, rundir
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
    return StreamLoop(cfg, status, log).run()


class StreamLoop:
    """One streaming run of one seed, from its first (or resumed) step to the end.

    :meth:`run` is the loop: act and learn from one transition, log a row every ``eval_every`` env
    steps, checkpoint every ``checkpoint_every`` env steps (mid-episode too, with the env's episode
    state; at an episode end for an env that cannot save it), stop cleanly after a stop signal."""

    def __init__(self, cfg: Config, status: str, log: Callable[[str], None]):
        self.cfg, self.log, self.run_dir = cfg, log, cfg.resolved_run_dir
        self.env = envs.make(cfg.env, envs.derive_seed(cfg.seed, 0), cfg.action_repeat)
        self.state = stream_ac.init(cfg, self.env.obs_dim, self.env.action_dim)
        self.stats = agents.model_stats(self.state)
        self.sums = fresh_sums(stream_ac)
        # Host-side counters (checkpointed with the state)
        self.start_step, self.wall_offset, self.timers = 0, 0.0, Timers()
        self.episodes, self.episode_return, self.row_returns, self.recent = 0, 0.0, [], []
        self.csv_rows, self.steps_in_row = 0, 0
        self.needs_reset, self.action, self.last_checkpoint = True, None, None
        if not (status == "resume" and self.resume()):
            rundir.start(cfg, self.stats)
        self.step_fn, self.begin_fn = make_step(cfg, self.env.time_limit)
        self.norms_fn = jax.jit(lambda st: {"actor_param_norm": common.global_norm(st.actor.params),
                                            "critic_param_norm": common.global_norm(st.critic.params)})
        self.live = loggers.make_loggers(cfg, self.run_dir, to_yaml(cfg), cfg.to_dict())  # tensorboard / wandb
        self.metrics_log = rundir.MetricsLog(cfg)
        self.start = time.perf_counter() - self.wall_offset
        self.row_start, self.row_start_step = time.perf_counter(), self.start_step
        self.next_checkpoint = (self.start_step * cfg.action_repeat // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        self.bar = tqdm(total=cfg.env_steps, initial=self.start_step * cfg.action_repeat, unit="step",
                        disable=not cfg.progress, dynamic_ncols=True, desc=self.run_dir.name[:40], file=sys.stderr)
        self.agent_step = self.start_step
        self.mid_episode = envs.saves_episodes(self.env)  # checkpoints at any step, else at episode ends
        self.t = time.perf_counter()

    def run(self) -> dict:
        cfg = self.cfg
        try:
            self.t = time.perf_counter()
            for agent_step in range(self.start_step, cfg.agent_steps):
                self.agent_step = agent_step
                self.act_and_learn()
                done = agent_step + 1
                env_step = done * cfg.action_repeat
                if done % BAR_EVERY == 0:
                    self.bar.update(env_step - self.bar.n)
                if env_step % cfg.eval_every < cfg.action_repeat or done == cfg.agent_steps:
                    self.log_row(done)
                if (self.needs_reset or self.mid_episode) and env_step >= self.next_checkpoint:
                    self.save(done)
                    self.next_checkpoint = (env_step // cfg.checkpoint_every + 1) * cfg.checkpoint_every
                    self.t = self.timers.add("checkpoint", self.t)
                self.stop_if_asked(done)
            self.save(cfg.agent_steps)
        except envs.EnvFault as fault:  # a NaN action, a diverging simulation: a numerical fault
            self.check_faults(jax.device_get(self.sums), jax.device_get(self.norms_fn(self.state)), self.agent_step)
            raise rundir.numerical_fault(self.run_dir, str(fault), self.agent_step, cfg.action_repeat) from None
        finally:
            self.close()
        return self.write_summary()

    def stop_if_asked(self, done: int) -> None:
        """After a stop signal: checkpoint, record the stop, raise :class:`~sparserl.interrupt.Interrupted`
        (an env that cannot save its episode midway first plays it to the end)."""
        signum = interrupt.requested()
        if signum is None or not (self.needs_reset or self.mid_episode):
            return
        if self.last_checkpoint != done:
            self.save(done)
        raise interrupt.stopped(signum, done, done * self.cfg.action_repeat, [self.run_dir])

    def act_and_learn(self) -> None:
        """One env step with the action sampled after the previous update, then one jitted update."""
        if self.needs_reset:
            self.state, self.action = self.begin_fn(self.state, self.env.reset())
            self.needs_reset = False
        a = np.clip(np.asarray(self.action), -1.0, 1.0)  # the only host sync: waits for the previous update
        t = self.timers.add("update", self.t)
        next_obs, reward, terminated, truncated = self.env.step(a)
        self.episode_return += reward
        t = self.timers.add("env", t)
        self.state, self.sums, self.action = self.step_fn(self.state, self.sums,
                                                          stream_ac.pack(next_obs, reward, terminated, truncated))
        self.steps_in_row += 1
        self.t = self.timers.add("update", t)
        if terminated or truncated:
            self.row_returns.append(self.episode_return)
            self.recent = (self.recent + [self.episode_return])[-self.cfg.stream.final_episodes:]
            self.episodes += 1
            self.episode_return, self.needs_reset = 0.0, True

    def log_row(self, done: int) -> None:
        """A metrics row: the training episodes that ended since the last row, the update metrics."""
        host_sums, norms = jax.device_get(self.sums), jax.device_get(self.norms_fn(self.state))
        self.check_faults(host_sums, norms, done)
        now = time.perf_counter()
        means = {k: float(host_sums[k]) / self.steps_in_row for k in stream_ac.METRICS} if self.steps_in_row else {}
        ret = float(np.mean(self.row_returns)) if self.row_returns else float("nan")
        env_step = done * self.cfg.action_repeat
        row = {"env_step": env_step, "agent_step": done, "episodes": self.episodes,
               "train_return": ret, "eval_return": ret,
               "eval_return_std": float(np.std(self.row_returns)) if self.row_returns else float("nan"),
               "eval_episodes": len(self.row_returns), **means, **norms,
               "steps_per_s": (done - self.row_start_step) / (now - self.row_start), "wall_time": now - self.start}
        scalars = self.metrics_log.write(row)
        for logger in self.live:
            logger.log_scalars(env_step, scalars, "metrics")
        self.csv_rows += 1
        self.row_returns = []
        self.sums, self.steps_in_row = fresh_sums(stream_ac), 0
        self.bar.set_postfix(train_return=f"{ret:.1f}", refresh=False)
        self.log(f"[{self.run_dir.name}] env_step {env_step}: train_return {ret:.1f} ({row['eval_episodes']} "
                 f"episodes), {row['steps_per_s']:.0f} agent steps/s")
        self.row_start, self.row_start_step = time.perf_counter(), done
        self.t = self.timers.add("log", now)

    def check_faults(self, host_sums: dict, norms: dict, agent_step: int) -> None:
        if int(host_sums["_fault"]) >= 0:
            raise rundir.numerical_fault(self.run_dir, stream_ac.METRICS[int(host_sums["_fault"])],
                                         int(host_sums["_fault_step"]), self.cfg.action_repeat)
        for key, value in norms.items():
            if not np.isfinite(value):
                raise rundir.numerical_fault(self.run_dir, key.replace("_param_norm", " parameters"), agent_step,
                                             self.cfg.action_repeat)

    def resume(self) -> bool:
        """Restore the newest usable checkpoint; False when there is none (the run starts over)."""
        cfg, run_dir = self.cfg, self.run_dir
        loaded = checkpoint.latest_valid(run_dir / "checkpoints", None, self.log)
        if loaded is None:
            self.log(f"[{run_dir.name}] no usable checkpoint; starting over")
            return False
        arrays, meta = loaded
        state = common.stored_state(checkpoint.unflatten_like(common.dense_state(self.state), arrays, "state"), cfg)
        sums = checkpoint.unflatten_like(self.sums, arrays, "metric_sums")
        self.env.set_rng_state(meta["env_rng"])
        self.start_step, self.wall_offset, self.timers = meta["agent_step"], meta["wall_time"], Timers(meta["timers"])
        self.episodes, self.episode_return = meta["episodes"], meta["episode_return"]
        self.row_returns, self.recent = list(meta["row_returns"]), list(meta["recent_returns"])
        self.csv_rows, self.steps_in_row = meta["csv_rows"], meta["steps_in_row"]
        self.needs_reset, self.last_checkpoint = meta["needs_reset"], self.start_step
        if not self.needs_reset:  # mid-episode: the env's state and the action already sampled for it
            self.env.restore_episode({k[len("episode/"):]: v for k, v in arrays.items() if k.startswith("episode/")})
            self.action = jnp.asarray(arrays["episode_action"])
        rundir.truncate_csv(run_dir / "metrics.csv", self.csv_rows)
        self.state, self.sums = jax.tree_util.tree_map(jnp.asarray, (state, sums))
        self.log(f"[{run_dir.name}] resuming at env step {self.start_step * cfg.action_repeat}")
        provenance.record(run_dir, "resume")
        return True

    def save(self, agent_step: int) -> None:
        cfg = self.cfg
        host_sums = jax.device_get(self.sums)
        self.check_faults(host_sums, jax.device_get(self.norms_fn(self.state)), agent_step)  # never save a faulty state
        arrays = checkpoint.flatten_tree(common.dense_state(self.state), "state")  # one format for every mode
        arrays.update(checkpoint.flatten_tree(host_sums, "metric_sums"))
        if not self.needs_reset:
            arrays.update({f"episode/{k}": v for k, v in self.env.episode_state().items()})
            arrays["episode_action"] = np.asarray(self.action)
        meta = {"agent_step": agent_step, "env_step": agent_step * cfg.action_repeat, "env_rng": self.env.rng_state(),
                "episodes": self.episodes, "episode_return": self.episode_return, "row_returns": self.row_returns,
                "recent_returns": self.recent, "csv_rows": self.csv_rows, "needs_reset": self.needs_reset,
                "steps_in_row": self.steps_in_row, "wall_time": time.perf_counter() - self.start,
                "timers": self.timers.seconds}
        checkpoint.save(self.run_dir / "checkpoints", agent_step, arrays, meta, keep=cfg.keep_checkpoints)
        self.last_checkpoint = agent_step

    def close(self) -> None:
        self.bar.close()
        self.metrics_log.close()
        for logger in self.live:
            logger.close()

    def write_summary(self) -> dict:
        cfg, wall = self.cfg, time.perf_counter() - self.start
        # no finished episode: the partial one
        final = np.asarray(self.recent if self.recent else [self.episode_return], np.float64)
        summary = {
            "final_return": float(final.mean()), "final_return_std": float(final.std()),
            "final_return_ci95": float(1.96 * final.std(ddof=1) / np.sqrt(len(final))) if len(final) > 1 else 0.0,
            "final_eval_episodes": len(self.recent), "final_return_source": "training episodes",
            "episodes": self.episodes, "env_steps": cfg.agent_steps * cfg.action_repeat, "seed": cfg.seed,
            "wall_time": wall, "agent_steps_per_s": (cfg.agent_steps - self.start_step) / max(wall - self.wall_offset, 1e-9),
            "time_share": {k: v / wall for k, v in self.timers.seconds.items()},
            "params": {n: {k: m[k] for k in ("total_params", "nonzero_params", "sparsity")}
                       for n, m in self.stats.items()},
        }
        rundir.write_summary(self.run_dir, summary, self.log)
        self.log(f"[{self.run_dir.name}] final_return {summary['final_return']:.1f} (last {len(self.recent)} training "
                 f"episodes), {summary['agent_steps_per_s']:.0f} agent steps/s")
        return summary
