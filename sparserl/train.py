"""The training loop of the replay agents (SAC, DDPG, DrQ-v2), and :func:`train`, which picks the
loop for an agent.

One loop serves one seed or several (each seed keeps its own env, buffer, mask, init, RNG streams
and run directory, and writes the same numbers a single-seed run with that seed writes; the agent
states live in a :class:`~sparserl.seedgroup.SeedGroup`, the host side of each seed in a
:class:`~sparserl.seed.Seed`). :meth:`ReplayLoop.run` is the loop, top to bottom; one agent step,
for every seed:

1. **act**: reset the env if its episode ended, pick an action (random during warm-up, else the
   stochastic policy), step the env (``action_repeat`` env steps);
2. **store** the transition and update the running observation statistics;
3. **update**: after warm-up, every ``update_every`` agent steps, ``utd`` gradient steps in one
   jitted call;
4. **evaluate and log**: before the first step (env step 0: the untrained policy, as the reference)
   and every ``eval_every`` env steps, the deterministic policy on a separately seeded env, and a
   row to ``metrics.csv`` (flushed at once); diagnostics every ``diag_every`` env steps;
5. **checkpoint** every ``checkpoint_every`` env steps, at that agent step (mid-episode: the envs save
   their episode, see :meth:`sparserl.envs.Env.episode_state`; an env that cannot waits for every seed
   to end an episode): everything needed to continue exactly (see :mod:`sparserl.seed`);
6. **stop** cleanly after the step when a stop signal came (:mod:`sparserl.interrupt`).

At the end: a final evaluation of ``final_eval_episodes`` episodes, a last checkpoint and
``summary.json``. What the run directory holds: :mod:`sparserl.rundir`.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from sparserl import agents, checkpoint, envs, interrupt, loggers, probe, provenance, rundir, runs, seed
from sparserl.agents import common
from sparserl.agents.common import fresh_sums
from sparserl.config import Config, ConfigError, to_yaml
from sparserl.rundir import Timers
from sparserl.seed import Seed, reset_state
from sparserl.seedgroup import SeedGroup, stack


def train(cfg: Config, log: Callable[[str], None] | None = None):
    """Train one or several seeds per ``cfg``. Returns the summary (a list of them for several seeds).

    Every seed's run directory is claimed (locked) first and released however the run ends; the
    agent picks the loop: streaming (:mod:`sparserl.stream`) or replay (:class:`ReplayLoop`)."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    loggers.check_available(cfg)
    seed_cfgs = cfg.per_seed()
    with rundir.claimed(seed_cfgs) as statuses, interrupt.handling():
        for c in seed_cfgs:
            interrupt.unmark(c.resolved_run_dir)  # this run goes on: an earlier stop is history
        try:
            if cfg.agent in agents.STREAMING:
                from sparserl import stream

                return stream.train_stream(seed_cfgs, statuses, log)
            return train_replay(cfg, seed_cfgs, statuses, log)
        except OSError as e:
            if checkpoint.is_disk_full(e):
                raise checkpoint.DiskFull.of(e) from None
            raise


def check_run_dirs(cfg: Config) -> list[str]:
    """Validate every seed's run directory (and the optional loggers asked for) before any compute."""
    loggers.check_available(cfg)
    return [rundir.check(c) for c in cfg.per_seed()]


def evaluate(env: envs.Env, policy: Callable[[np.ndarray], np.ndarray], episodes: int) -> np.ndarray:
    """Returns of ``episodes`` episodes of one policy on one env."""
    return evaluate_lockstep([env], lambda obs: policy(obs[0])[None], episodes)[0]


def evaluate_lockstep(eval_envs: list[envs.Env], policy: Callable[[np.ndarray], np.ndarray],
                      episodes: int, on_episode: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Evaluate several seeds together: ``policy`` maps stacked observations (N, obs) to actions.
    ``on_episode(k)`` is called as each round of episodes starts, with k the rounds done (progress)."""
    returns = [np.zeros(episodes) for _ in eval_envs]
    for ep in range(episodes):
        if on_episode is not None:
            on_episode(ep)
        obs = [e.reset() for e in eval_envs]
        done = [False] * len(eval_envs)
        while not all(done):
            actions = policy(np.stack(obs))
            for i, e in enumerate(eval_envs):
                if done[i]:
                    continue
                try:
                    obs[i], reward, terminated, truncated = e.step(actions[i])
                except envs.EnvFault as fault:
                    fault.seed_index = i  # which seed's run stops (see train_replay)
                    raise
                returns[i][ep] += reward
                done[i] = terminated or truncated
    return returns


def train_replay(cfg: Config, seed_cfgs: list[Config], statuses: list[str], log: Callable[[str], None]):
    """The replay agents' training over claimed run directories (every seed in the same state)."""
    if all(st == "finished" for st in statuses):
        summaries = [runs.read_summary(c.resolved_run_dir) for c in seed_cfgs]
        for c in seed_cfgs:
            log(f"[{c.resolved_run_dir.name}] already finished; delete it or pass overwrite=true to train again")
        return summaries[0] if len(summaries) == 1 else summaries
    if set(statuses) == {"finished", "resume"}:
        statuses = ["resume"] * len(statuses)  # killed between the seeds' summaries: all resume at the end
    if len(set(statuses)) > 1:
        raise ConfigError(f"the seeds' run directories are in different states ({', '.join(statuses)}); "
                          f"resume or run the seeds separately, or pass overwrite=true")
    summaries = ReplayLoop(cfg, seed_cfgs, statuses[0], log).run()
    return summaries[0] if len(summaries) == 1 else summaries


class ReplayLoop:
    """One training run of a replay agent, every seed, from its first (or resumed) step to the end.

    :meth:`run` is the loop; each phase of an agent step is one method below it."""

    def __init__(self, cfg: Config, seed_cfgs: list[Config], status: str, log: Callable[[str], None]):
        self.cfg, self.cfg0, self.seed_cfgs, self.log = cfg, seed_cfgs[0], seed_cfgs, log
        self.agent = agents.get(cfg.agent)
        self.seeds = seed.make_seeds(seed_cfgs, log)
        self.obs_dim, self.action_dim = self.seeds[0].env.obs_dim, self.seeds[0].env.action_dim
        single_states = [self.agent.init(c, self.obs_dim, self.action_dim) for c in seed_cfgs]
        self.stats = [agents.model_stats(st) for st in single_states]
        self.start_step, self.wall_offset, self.timers, self.updates_in_row = 0, 0.0, Timers(), 0
        states, sums = self.resume_or_start(status, single_states)
        vmapped = cfg.seed_parallel == "vmap" or (cfg.seed_parallel == "auto" and jax.default_backend() != "cpu")
        # cfg0: the static config of the jitted functions (only the seed differs between seeds)
        self.group = SeedGroup(self.agent, self.cfg0, seed_cfgs, states, vmapped and len(self.seeds) > 1)
        if sums is not None:
            self.group.sums = stack(sums) if self.group.vmapped else sums
        self.live = [loggers.make_loggers(cfg, s.run_dir, to_yaml(c), c.to_dict()) for s, c in zip(self.seeds, seed_cfgs)]
        self.video_envs: dict[int, envs.Env] = {}
        self.metrics_logs = [rundir.MetricsLog(c) for c in seed_cfgs]
        self.name = self.seeds[0].run_dir.name if len(self.seeds) == 1 else f"{len(self.seeds)} seeds"
        self.start = time.perf_counter() - self.wall_offset
        self.next_checkpoint = (self.start_step * cfg.action_repeat // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        self.bar = tqdm(total=cfg.env_steps, initial=self.start_step * cfg.action_repeat, unit="step",
                        disable=not cfg.progress, dynamic_ncols=True, desc=self.name[:40], file=sys.stderr)
        self.agent_step, self.last_checkpoint = self.start_step, self.start_step if status == "resume" else None
        # checkpoints at any agent step when every env can save its episode (else at episode ends)
        self.mid_episode = all(envs.saves_episodes(s.env) for s in self.seeds)
        if not self.mid_episode and len(self.seeds) > 1:
            log(f"warning: {cfg.env} cannot save an episode midway, so several seeds checkpoint only when every "
                f"seed ends an episode on the same step; run one seed per process for regular checkpoints")
        self.row_start, self.row_start_step = time.perf_counter(), self.start_step
        self.t = time.perf_counter()  # when the phase being timed began

    # ------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> list[dict]:
        cfg = self.cfg
        try:
            self.compile()
            self.stop_if_asked(self.start_step)  # before the step-0 row, which a resume at step 0 writes
            self.row_start, self.row_start_step = time.perf_counter(), self.start_step
            if self.start_step == 0:  # a row at env step 0: the untrained policy
                self.timers.add("log", self.evaluate_and_log(0, False, time.perf_counter()))
                self.row_start = time.perf_counter()
            for agent_step in range(self.start_step, cfg.agent_steps):
                self.agent_step, self.t = agent_step, time.perf_counter()
                self.act_and_store(agent_step)
                if agent_step >= cfg.warmup_steps and (agent_step - cfg.warmup_steps) % cfg.update_every == 0:
                    self.update(agent_step)
                self.evaluate_diagnose_checkpoint(agent_step + 1)
                self.stop_if_asked(agent_step + 1)
            self.save_checkpoints(cfg.agent_steps)
        except envs.EnvFault as fault:  # a NaN action, a diverging simulation: a numerical fault of that seed
            raise self.env_fault(fault) from None
        finally:
            self.close()
        return self.write_summaries()

    def compile(self) -> None:
        """Compile the update and the policies before the first step, so that steps/s, the ETA and
        the time shares measure training."""
        if self.start_step >= self.cfg.agent_steps:
            return
        self.bar.set_postfix_str("compiling the update", refresh=True)
        t = time.perf_counter()
        self.group.compile([s.buffer.gather(np.zeros((self.cfg.utd, self.cfg.batch_size), np.int64)) for s in self.seeds],
                           [s.obs_stats() for s in self.seeds])
        self.timers.add("compile", t)
        self.bar.set_postfix_str("", refresh=False)

    def act_and_store(self, agent_step: int) -> None:
        cfg, seeds = self.cfg, self.seeds
        for s in seeds:
            if s.needs_reset:
                s.obs, s.needs_reset = s.env.reset(), False
                if cfg.obs_norm:
                    s.normalizer.update(s.obs)
        t = self.timers.add("env", self.t)
        if agent_step < cfg.warmup_steps:
            actions = [s.action_rng.uniform(-1.0, 1.0, self.action_dim).astype(np.float32) for s in seeds]
        else:
            actions = self.group.act(np.stack([s.obs for s in seeds]), [s.obs_stats() for s in seeds], agent_step,
                                     False)
        t = self.timers.add("act", t)
        for i, (s, action) in enumerate(zip(seeds, actions)):
            try:
                next_obs, reward, terminated, truncated = s.env.step(action)
            except envs.EnvFault as fault:
                fault.seed_index = i
                raise
            self.store(s, action, next_obs, reward, terminated, truncated)
        self.t = self.timers.add("env", t)

    def store(self, s: Seed, action, next_obs, reward: float, terminated: bool, truncated: bool) -> None:
        s.buffer.add(s.obs, action, reward, 0.0 if terminated else 1.0, next_obs, episode_end=terminated or truncated)
        s.episode_return += reward
        if terminated or truncated:
            s.row_returns.append(s.episode_return)
            s.episodes += 1
            s.episode_return, s.needs_reset = 0.0, True
        else:
            s.obs = next_obs
            if self.cfg.obs_norm:
                s.normalizer.update(next_obs)

    def update(self, agent_step: int) -> None:
        cfg = self.cfg
        self.group.learn([s.buffer.sample(s.sample_rng, cfg.utd, cfg.batch_size) for s in self.seeds],
                         [s.obs_stats() for s in self.seeds], agent_step)
        self.updates_in_row += 1
        self.t = self.timers.add("update", self.t)

    def evaluate_diagnose_checkpoint(self, done: int) -> None:
        """What is due after ``done`` agent steps: evaluation and metrics row (and video),
        diagnostics, a periodic reset of the networks, a checkpoint."""
        cfg = self.cfg
        env_step = done * cfg.action_repeat
        self.bar.update(cfg.action_repeat)
        is_last = done == cfg.agent_steps
        if env_step % cfg.eval_every < cfg.action_repeat or is_last:
            now = self.evaluate_and_log(done, is_last, self.t)
            if cfg.video.every and env_step % cfg.video.every < cfg.action_repeat:
                self.record_videos(env_step)
            self.row_start, self.row_start_step = time.perf_counter(), done
            self.t = self.timers.add("log", now)
        if cfg.diag_every and env_step % cfg.diag_every < cfg.action_repeat and done > cfg.warmup_steps:
            self.run_diagnostics(env_step)
            self.t = self.timers.add("diagnostics", self.t)
        if cfg.reset.every and env_step % cfg.reset.every < cfg.action_repeat and not is_last:
            self.reset_networks(env_step)
        if env_step >= self.next_checkpoint and (self.mid_episode or all(s.needs_reset for s in self.seeds)):
            self.save_checkpoints(done)
            self.next_checkpoint = (env_step // cfg.checkpoint_every + 1) * cfg.checkpoint_every
            self.t = self.timers.add("checkpoint", self.t)

    def stop_if_asked(self, done: int) -> None:
        """After a stop signal (:mod:`sparserl.interrupt`): checkpoint after ``done`` agent steps, record
        the stop in every run directory, raise :class:`~sparserl.interrupt.Interrupted`. An env whose
        episode state cannot be saved first plays its episode to the end (a Gymnasium env without MuJoCo)."""
        signum = interrupt.requested()
        if signum is None or not (self.mid_episode or all(s.needs_reset for s in self.seeds)):
            return
        self.bar.set_postfix_str(f"{signal_name(signum)}: writing a checkpoint", refresh=True)
        if self.last_checkpoint != done:
            self.save_checkpoints(done)
        raise interrupt.stopped(signum, done, done * self.cfg.action_repeat, [s.run_dir for s in self.seeds])

    # ------------------------------------------------------------------------------------------
    # Evaluation, diagnostics, resets, videos

    def evaluate_and_log(self, done: int, is_last: bool, t: float) -> float:
        """Evaluate every seed's deterministic policy after ``done`` agent steps (0: the untrained
        policy, as the reference evaluates it before training) and write its metrics row (update
        metrics averaged over the update calls since the last row). Returns when the evaluation ended."""
        cfg, seeds = self.cfg, self.seeds
        host_sums, norms = self.group.host_sums(), self.group.param_norms()
        self.check_faults(host_sums, norms, done)
        n_eval = cfg.final_eval_episodes if is_last else cfg.eval_episodes
        eval_stats = [s.obs_stats() for s in seeds]
        label = "final eval" if is_last else "eval"
        all_returns = evaluate_lockstep(
            [s.eval_env for s in seeds], lambda obs: self.group.act(obs, eval_stats, 0, True), n_eval,
            lambda k: self.bar.set_postfix_str(f"{label} {k}/{n_eval} episodes", refresh=True))
        self.timers.add("eval", t)
        now = time.perf_counter()
        for i, (s, returns) in enumerate(zip(seeds, all_returns)):
            means = ({k: float(host_sums[i][k]) / self.updates_in_row for k in self.agent.METRICS}
                     if self.updates_in_row else {})
            steps_per_s = (done - self.row_start_step) / (now - self.row_start) if done > self.row_start_step \
                else float("nan")
            row = {"env_step": done * cfg.action_repeat, "agent_step": done, "episodes": s.episodes,
                   "train_return": float(np.mean(s.row_returns)) if s.row_returns else float("nan"),
                   "eval_return": float(returns.mean()), "eval_return_std": float(returns.std()),
                   "eval_episodes": n_eval, **means, **norms[i], "steps_per_s": steps_per_s,
                   "wall_time": now - self.start}
            self.write_metrics_row(i, s, row, returns, is_last)
        self.bar.set_postfix(eval_return=f"{np.mean([r.mean() for r in all_returns]):.1f}", refresh=False)
        self.group.reset_sums()  # faults were checked above
        self.updates_in_row = 0
        return now

    def write_metrics_row(self, i: int, s: Seed, row: dict, returns: np.ndarray, is_last: bool) -> None:
        scalars = self.metrics_logs[i].write(row)
        for logger in self.live[i]:
            logger.log_scalars(row["env_step"], scalars, "metrics")
        s.csv_rows += 1
        s.row_returns = []
        if is_last:
            s.summary_eval = returns
        speed = "untrained policy" if row["agent_step"] == 0 else f"{row['steps_per_s']:.0f} agent steps/s"
        self.log(f"[{s.run_dir.name}] env_step {row['env_step']}: eval_return {returns.mean():.1f} ± "
                 f"{returns.std():.1f} ({row['eval_episodes']} ep), {speed}")

    def run_diagnostics(self, env_step: int) -> None:
        cfg = self.cfg
        for i, s in enumerate(self.seeds):
            if cfg.diag_probe == "fixed":  # drawn once, kept in the checkpoints
                if s.probe is None:
                    s.probe = probe.draw_probe_set(s.buffer, cfg.diag_probe_size, s.cfg.seed)
                probe_set = s.probe
            else:  # fresh: from (seed, env_step) alone, so a resumed run draws the same
                probe_set = probe.draw_probe_set(s.buffer, cfg.diag_probe_size, s.cfg.seed, env_step)
            key = jax.random.fold_in(jax.random.PRNGKey(envs.derive_seed(s.cfg.seed, 5)), env_step)
            state = common.dense_state(self.group.state(i))  # diagnostics read masked-dense parameters
            scalars, cosines = probe.measure(state, probe_set, s.obs_stats(), key, self.cfg0, cfg.diag_grad_samples)
            write_diagnostics(s, env_step, scalars, cosines)
            for logger in self.live[i]:
                logger.log_scalars(env_step, scalars, "diagnostics")

    def reset_networks(self, env_step: int) -> None:
        count = env_step // self.cfg.reset.every
        for i, c in enumerate(self.seed_cfgs):
            self.group.replace_state(i, reset_state(c, self.group.state(i), count, self.obs_dim, self.action_dim))
        self.log(f"[{self.name}] env_step {env_step}: reset actor and critic (reset {count})")

    def record_videos(self, env_step: int) -> None:
        for i, s in enumerate(self.seeds):
            try:  # the evaluation row is already written: a rendering failure only costs the video
                if i not in self.video_envs:
                    self.video_envs[i] = envs.make_for(self.cfg, envs.derive_seed(s.cfg.seed, 6), render=True)
                stats_i = s.obs_stats()
                frames = loggers.record_episode(self.video_envs[i],
                                                lambda o: self.group.act_one(i, o, stats_i, True), self.cfg.video.size)
                path = loggers.write_video(frames, s.run_dir / "videos" / f"step_{env_step}")
                self.log(f"[{s.run_dir.name}] video: {path} ({len(frames)} frames)")
                for logger in self.live[i]:
                    logger.log_video(env_step, path, frames)
            except Exception as e:  # noqa: BLE001
                self.log(f"[{s.run_dir.name}] warning: could not record the evaluation video at env step "
                         f"{env_step}: {e}")

    # ------------------------------------------------------------------------------------------
    # Resume, checkpoints, faults, the end

    def resume_or_start(self, status: str, single_states: list):
        """Restore every seed from a checkpoint at one common agent step (``status == "resume"``),
        or start fresh run directories. Returns the agent states and metric sums (None: fresh)."""
        if status == "resume":
            loaded = self.common_checkpoints()
            if loaded is None:
                self.log(f"[{self.seeds[0].run_dir.name}] no usable checkpoint; starting over")
            else:
                template = fresh_sums(self.agent)
                restored = [seed.restore_seed(s, arrays, meta, st, template) for s, (arrays, meta), st
                            in zip(self.seeds, loaded, single_states)]
                meta = loaded[0][1]
                self.start_step, self.wall_offset = meta["agent_step"], meta["wall_time"]
                self.timers, self.updates_in_row = Timers(meta["timers"]), meta["updates_in_row"]
                self.log(f"[{self.seeds[0].run_dir.name}] resuming at env step {self.start_step * self.cfg.action_repeat}")
                for s in self.seeds:
                    provenance.record(s.run_dir, "resume")
                return [r[0] for r in restored], [r[1] for r in restored]
        for c, st in zip(self.seed_cfgs, self.stats):
            rundir.start(c, st)
        return single_states, None

    def common_checkpoints(self) -> list | None:
        """The newest checkpoint every seed has at the same agent step (a kill may fall between the
        seeds' saves), or None."""
        at_most = None
        for _ in range(2):
            loaded = [checkpoint.latest_valid(s.run_dir / "checkpoints", at_most, self.log) for s in self.seeds]
            if any(x is None for x in loaded):
                return None
            steps = [meta["agent_step"] for _, meta in loaded]
            if len(set(steps)) == 1:
                return loaded
            at_most = min(steps)
        return None

    def save_checkpoints(self, agent_step: int) -> None:
        host_sums = self.group.host_sums()
        self.check_faults(host_sums, self.group.param_norms(), agent_step)  # never save a faulty state
        extra = {"wall_time": time.perf_counter() - self.start, "timers": self.timers.seconds,
                 "updates_in_row": self.updates_in_row}
        for s, state_i, sums_i in zip(self.seeds, self.group.host_states(), host_sums):
            seed.save_seed(s, state_i, sums_i, agent_step, extra)
        self.last_checkpoint = agent_step

    def check_faults(self, host_sums: list[dict], norms: list[dict], agent_step: int) -> None:
        """Stop at the first non-finite metric (its quantity and step) or parameter norm of any seed."""
        for s, sums_i, norms_i in zip(self.seeds, host_sums, norms):
            if int(sums_i["_fault"]) >= 0:
                raise rundir.numerical_fault(s.run_dir, self.agent.METRICS[int(sums_i["_fault"])],
                                             int(sums_i["_fault_step"]), self.cfg.action_repeat)
            for key, value in norms_i.items():
                if not np.isfinite(value):
                    raise rundir.numerical_fault(s.run_dir, key.replace("_param_norm", " parameters"), agent_step,
                                                 self.cfg.action_repeat)

    def env_fault(self, fault: envs.EnvFault) -> rundir.NumericalFault:
        self.check_faults(self.group.host_sums(), self.group.param_norms(), self.agent_step)  # a loss first, if any
        s = self.seeds[getattr(fault, "seed_index", 0)]
        return rundir.numerical_fault(s.run_dir, str(fault), self.agent_step, self.cfg.action_repeat)

    def close(self) -> None:
        self.bar.close()
        for metrics_log, seed_loggers in zip(self.metrics_logs, self.live):
            metrics_log.close()
            for logger in seed_loggers:
                logger.close()

    def write_summaries(self) -> list[dict]:
        cfg, wall = self.cfg, time.perf_counter() - self.start
        summaries = []
        for s, st in zip(self.seeds, self.stats):
            ev = s.summary_eval
            summary = {
                "final_return": float(ev.mean()), "final_return_std": float(ev.std()),
                "final_return_ci95": float(1.96 * ev.std(ddof=1) / np.sqrt(len(ev))) if len(ev) > 1 else 0.0,
                "final_eval_episodes": len(ev), "env_steps": cfg.agent_steps * cfg.action_repeat, "seed": s.cfg.seed,
                "wall_time": wall, "agent_steps_per_s": (cfg.agent_steps - self.start_step) / (wall - self.wall_offset),
                "time_share": {k: v / wall for k, v in self.timers.seconds.items()},
                "params": {n: {k: m[k] for k in ("total_params", "nonzero_params", "sparsity")} for n, m in st.items()},
            }
            rundir.write_summary(s.run_dir, summary, self.log)
            summaries.append(summary)
        return summaries


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def write_diagnostics(s: Seed, env_step: int, scalars: dict, cosines: dict) -> None:
    """A ``diagnostics.csv`` row, and the latest cosine matrices (for the report's heatmaps)."""
    for module, matrix in cosines.items():
        with open(s.run_dir / f"cosine_{module}.npy.tmp", "wb") as f:
            np.save(f, matrix)
        os.replace(s.run_dir / f"cosine_{module}.npy.tmp", s.run_dir / f"cosine_{module}.npy")
    row = {"env_step": env_step, **scalars}
    with open(s.run_dir / "diagnostics.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if s.diag_rows == 0:
            writer.writeheader()
        writer.writerow({k: rundir.fmt(v) for k, v in row.items()})
    s.diag_rows += 1
