"""The training loop: act, store, update, evaluate, log, checkpoint, resume.

One loop serves one seed or several: the agent states of all seeds are stacked and the policy and
the update are ``vmap``-ped over them (each seed keeps its own env, buffer, mask, init, RNG streams
and run directory, and writes the same numbers a single-seed run with that seed writes).

One agent step, for every seed: reset the env if its episode ended, pick an action (random during
warm-up, else the stochastic policy), step the env (``action_repeat`` env steps), store the
transition, update the running observation statistics and, after warm-up, every ``update_every``
agent steps, run ``utd`` gradient steps in one jitted call. Before the first step (env step 0: the
untrained policy, as the reference) and every ``eval_every`` env steps the deterministic policy is
evaluated on a separately seeded env and a row goes to ``metrics.csv`` (flushed at once). Every
``checkpoint_every`` env steps, at the next step where every seed has just ended an episode, a
checkpoint holds everything needed to continue exactly (see :mod:`sparserl.checkpoint`). At the end:
a final evaluation of ``final_eval_episodes`` episodes, a last checkpoint and ``summary.json``.

Run directory: ``config.yaml`` (fully resolved), ``model.json`` (parameter counts and per-layer
sparsity), ``metrics.csv``, ``diagnostics.csv``, ``checkpoints/``, ``summary.json``, ``curves.png``;
``error.txt`` when a run stopped on a numerical fault; ``RUNNING`` (the pid) while it trains.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from sparserl import agents, checkpoint, envs, loggers, probe, replay, rundir, sparsity
from sparserl.agents import common
from sparserl.agents.common import Batch, ObsStats, accumulate, fresh_sums, normalize
from sparserl.rundir import Timers
from sparserl.config import Config, ConfigError, to_yaml

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


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, i: int):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


@dataclass
class Seed:
    """Host-side state of one seed: its envs, buffer, statistics, RNGs, counters and outputs."""

    cfg: Config
    run_dir: Path
    env: envs.Env
    eval_env: envs.Env
    buffer: replay.ReplayBuffer | replay.FrameReplay
    normalizer: envs.RunningMeanStd
    sample_rng: np.random.Generator
    action_rng: np.random.Generator
    obs: np.ndarray | None = None
    needs_reset: bool = True
    episode_return: float = 0.0
    episodes: int = 0
    row_returns: list = field(default_factory=list)
    csv_rows: int = 0
    summary_eval: np.ndarray | None = None
    probe: Any = None  # the fixed probe set of the diagnostics (a Batch), drawn at the first diagnostic
    diag_rows: int = 0

    def obs_stats(self) -> ObsStats:
        return self.normalizer.obs_stats(self.cfg.obs_norm)


def reset_state(cfg: Config, state, count: int, obs_dim: int, action_dim: int):
    """The ``count``-th periodic reset: fresh actor and critic parameters (a new init seed derived
    from ``seed`` and ``count``), fresh optimizer states and target; the same masks (same mask seed);
    everything else (temperature, RNG key) kept."""
    init_cfg = dataclasses.replace(cfg, seed=envs.derive_seed(cfg.seed, 1000 + count) % 2**31,
                                   sparsity=dataclasses.replace(cfg.sparsity, seed=cfg.mask_seed))
    fresh = agents.get(cfg.agent).init(init_cfg, obs_dim, action_dim)
    fields = [f for f in ("encoder", "actor", "critic", "target") if f in state._fields]
    return state._replace(**{f: getattr(fresh, f) for f in fields})


def check_memory(cfg: Config, num_seeds: int, action_dim: int, log: Callable[[str], None]) -> None:
    """Pixels: print the frame replay's memory and refuse (ConfigError) a buffer that cannot fit."""
    if not cfg.pixels:
        return
    size, capacity = cfg.render.size, replay.capacity(cfg)
    per = replay.FrameReplay.bytes_per_transition((size, size, 3), action_dim)
    need = num_seeds * (capacity + cfg.frame_stack) * per
    available = replay.check_fits(need, f"frame replay ({num_seeds} x {capacity:,} transitions)")
    avail = "unknown" if available is None else f"{available / 1e9:.1f} GB"
    log(f"pixels: MUJOCO_GL={envs.gl_backend()}, render.fast={str(cfg.render.fast).lower()}; frame replay "
        f"{per * 1e6 / 1e9:.1f} GB per million transitions (uint8 {size}x{size}x3 frames stored once); "
        f"this run: {need / 1e9:.2f} GB, memory available: {avail}")


def _make_seeds(seed_cfgs: list[Config], log: Callable[[str], None]) -> list[Seed]:
    """Each seed's envs first, then -- once the memory check has passed -- the replay buffers, so a
    buffer that cannot fit is refused with one line instead of failing to allocate."""
    pairs = [(envs.make_for(c, envs.derive_seed(c.seed, 0)), envs.make_for(c, envs.derive_seed(c.seed, 1)))
             for c in seed_cfgs]
    check_memory(seed_cfgs[0], len(seed_cfgs), pairs[0][0].action_dim, log)
    return [Seed(c, c.resolved_run_dir, env, eval_env, replay.for_config(c, env.obs_dim, env.action_dim),
                 envs.RunningMeanStd(1 if c.pixels else env.obs_dim),
                 np.random.default_rng(envs.derive_seed(c.seed, 2)),
                 np.random.default_rng(envs.derive_seed(c.seed, 3)))
            for c, (env, eval_env) in zip(seed_cfgs, pairs)]


# ----------------------------------------------------------------------------------------------
# Checkpoint contents of one seed


def _save_seed(s: Seed, state, sums, agent_step: int, extra: dict) -> None:
    arrays = checkpoint.flatten_tree(state, "state")
    arrays.update(checkpoint.flatten_tree(sums, "metric_sums"))
    arrays.update({f"buffer/{k}": v for k, v in s.buffer.checkpoint_arrays().items()})
    arrays["normalizer/mean"], arrays["normalizer/var"] = s.normalizer.mean, s.normalizer.var
    if s.probe is not None:
        arrays.update({f"probe/{k}": np.asarray(v) for k, v in s.probe._asdict().items()})
    meta = {
        "agent_step": agent_step, "env_step": agent_step * s.cfg.action_repeat, **s.buffer.checkpoint_meta(),
        "normalizer_count": s.normalizer.count,
        "sample_rng": s.sample_rng.bit_generator.state, "action_rng": s.action_rng.bit_generator.state,
        "env_rng": s.env.rng_state(), "eval_env_rng": s.eval_env.rng_state(), "needs_reset": s.needs_reset,
        "obs": None if s.obs is None or s.cfg.pixels else s.obs.tolist(), "episode_return": s.episode_return,
        "episodes": s.episodes, "row_returns": s.row_returns, "csv_rows": s.csv_rows, "diag_rows": s.diag_rows,
        "final_eval_returns": None if s.summary_eval is None else s.summary_eval.tolist(), **extra,
    }
    checkpoint.save(s.run_dir / "checkpoints", agent_step, arrays, meta, keep=s.cfg.keep_checkpoints)


def _restore_seed(s: Seed, arrays: dict, meta: dict, state_template, sums_template):
    state = checkpoint.unflatten_like(state_template, arrays, "state")
    sums = checkpoint.unflatten_like(sums_template, arrays, "metric_sums")
    s.buffer.restore({k[len("buffer/"):]: v for k, v in arrays.items() if k.startswith("buffer/")}, meta)
    s.normalizer.mean, s.normalizer.var = arrays["normalizer/mean"], arrays["normalizer/var"]
    s.normalizer.count = meta["normalizer_count"]
    s.sample_rng.bit_generator.state = meta["sample_rng"]
    s.action_rng.bit_generator.state = meta["action_rng"]
    s.env.set_rng_state(meta["env_rng"])
    s.eval_env.set_rng_state(meta["eval_env_rng"])
    s.needs_reset = meta["needs_reset"]
    if not s.needs_reset and meta["agent_step"] < s.cfg.agent_steps:  # the final checkpoint may be mid-episode
        raise checkpoint.CheckpointError("checkpoint taken mid-episode cannot be resumed exactly")
    s.obs = None
    s.episode_return, s.episodes = meta["episode_return"], meta["episodes"]
    s.row_returns, s.csv_rows = list(meta["row_returns"]), meta["csv_rows"]
    if meta["final_eval_returns"] is not None:  # killed after the final checkpoint, before summary.json
        s.summary_eval = np.asarray(meta["final_eval_returns"])
    rundir.truncate_csv(s.run_dir / "metrics.csv", s.csv_rows)
    s.diag_rows = meta["diag_rows"]
    if s.diag_rows:
        rundir.truncate_csv(s.run_dir / "diagnostics.csv", s.diag_rows)
    else:  # rows written after this checkpoint (header included) are written again
        (s.run_dir / "diagnostics.csv").unlink(missing_ok=True)
    if "probe/obs" in arrays:
        s.probe = Batch(*(arrays[f"probe/{k}"] for k in Batch._fields))
    return state, sums


# ----------------------------------------------------------------------------------------------
# The device side of all seeds: their agent states, the policy and the update


class SeedGroup:
    """Agent states of all seeds, acted and updated together.

    ``vmapped=True`` stacks the states and ``vmap``s policy and update (one call for all seeds: the
    throughput mode on accelerators). ``vmapped=False`` keeps one state per seed and calls the same
    jitted single-seed functions in turn: every seed then computes bit-for-bit what a single-seed
    run computes (vmapped XLA kernels may round differently), which is the default on CPU.
    """

    def __init__(self, agent, cfg: Config, seed_cfgs: list[Config], states: list, vmapped: bool):
        self.agent, self.cfg, self.vmapped, self.n = agent, cfg, vmapped, len(states)
        keys = [jax.random.fold_in(jax.random.PRNGKey(c.seed), 0xAC7) for c in seed_cfgs]
        sums = [fresh_sums(self.agent) for _ in states]
        norms = lambda st: {f"{n}_param_norm": common.global_norm(m.params) for n, m in agents.modules(st).items()}
        self.pass_step = getattr(agent, "SCHEDULED_EXPLORATION", False)
        self.norms_fn = jax.jit(jax.vmap(norms) if vmapped else norms)
        policy = self.single_policy = jax.jit(self._policy, static_argnums=5)
        learn = jax.jit(self._learn, donate_argnums=(0, 1))
        if vmapped:
            self.states, self.sums, self.keys = _stack(states), _stack(sums), jnp.stack(keys)
            self.policy = jax.jit(jax.vmap(self._policy, in_axes=(0, 0, 0, 0, None, None)), static_argnums=5)
            self.learn_fn = jax.jit(jax.vmap(self._learn, in_axes=(0, 0, 0, 0, None)), donate_argnums=(0, 1))
        else:
            self.states, self.sums, self.keys = list(states), sums, keys
            self.policy, self.learn_fn = policy, learn

    def _policy(self, actor_params, obs, obs_stats, act_key, step, deterministic):
        key = jax.random.fold_in(act_key, step)
        if self.cfg.pixels:  # uint8 frames, scaled inside the encoder
            return self.agent.act(actor_params, obs[None], key, deterministic, self.cfg, step=step)[0]
        extra = {"step": step} if self.pass_step else {}
        return self.agent.act(actor_params, normalize(obs, obs_stats)[None], key, deterministic, self.cfg, **extra)[0]

    def _learn(self, state, sums, batches, obs_stats, first_step):
        state, metrics = self.agent.update(state, batches, obs_stats, self.cfg)
        return state, accumulate(sums, metrics, self.agent.METRICS, first_step)

    def act(self, obs: np.ndarray, stats: list[ObsStats], step: int, deterministic: bool) -> np.ndarray:
        if self.vmapped:
            return np.asarray(self.policy(agents.policy_params(self.states), obs, _stack(stats), self.keys, step,
                                          deterministic))
        actions = [self.policy(agents.policy_params(st), o, ss, k, step, deterministic)
                   for st, o, ss, k in zip(self.states, obs, stats, self.keys)]
        return np.stack([np.asarray(a) for a in actions])

    def act_one(self, i: int, obs: np.ndarray, stats: ObsStats, deterministic: bool) -> np.ndarray:
        """The action of seed ``i`` alone (videos)."""
        return np.asarray(self.single_policy(self.actor_params(i), obs, stats, self.keys[i], 0, deterministic))

    def compile(self, batches: list, stats: list[ObsStats]) -> None:
        """Compile the update and both policies for these argument shapes (example ``batches``, one per
        seed) ahead of the first step, so that steps/s, the ETA and the time shares measure training,
        not XLA compilation (seconds, more for large networks). Nothing runs and nothing is donated:
        the later calls find the executables in JAX's cache."""
        step, obs = jnp.int32(0), [b.obs[0, 0] for b in batches]  # one observation as the env gives it
        if self.vmapped:
            self.learn_fn.lower(self.states, self.sums, _stack(batches), _stack(stats), step).compile()
            policy_args = (agents.policy_params(self.states), np.stack(obs), _stack(stats), self.keys)
        else:  # every seed has the same shapes: one compilation serves them all
            self.learn_fn.lower(self.states[0], self.sums[0], batches[0], stats[0], step).compile()
            policy_args = (agents.policy_params(self.states[0]), obs[0], stats[0], self.keys[0])
        for deterministic in (False, True):
            self.policy.lower(*policy_args, 0, deterministic).compile()

    def learn(self, batches: list, stats: list[ObsStats], step: int) -> None:
        step = jnp.int32(step)
        if self.vmapped:
            self.states, self.sums = self.learn_fn(self.states, self.sums, _stack(batches), _stack(stats), step)
        else:
            for i in range(self.n):
                self.states[i], self.sums[i] = self.learn_fn(self.states[i], self.sums[i], batches[i], stats[i], step)
        # The next action needs the new actor anyway; waiting here costs nothing and charges the
        # update's time to "update" rather than to the next "act" in the time shares.
        jax.block_until_ready(self.sums)

    def reset_sums(self) -> None:
        sums = [fresh_sums(self.agent) for _ in range(self.n)]
        self.sums = _stack(sums) if self.vmapped else sums

    def host_sums(self) -> list[dict]:
        host = jax.device_get(self.sums)
        return [_take(host, i) for i in range(self.n)] if self.vmapped else host

    def host_states(self) -> list:
        host = jax.device_get(self.states)
        return [_take(host, i) for i in range(self.n)] if self.vmapped else host

    def param_norms(self) -> list[dict]:
        if self.vmapped:
            host = jax.device_get(self.norms_fn(self.states))
            return [_take(host, i) for i in range(self.n)]
        return jax.device_get([self.norms_fn(st) for st in self.states])

    def state(self, i: int):
        return _take(self.states, i) if self.vmapped else self.states[i]

    def replace_state(self, i: int, new_state) -> None:
        if self.vmapped:
            self.states = jax.tree_util.tree_map(lambda x, y: x.at[i].set(y), self.states, new_state)
        else:
            self.states[i] = new_state

    def actor_params(self, i: int):
        return agents.policy_params(self.state(i))


# ----------------------------------------------------------------------------------------------


def train(cfg: Config, log: Callable[[str], None] | None = None):
    """Train one or several seeds per ``cfg``. Returns the summary (a list of them for several seeds).

    Every seed's run directory is claimed (locked) first and released however the run ends."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    loggers.check_available(cfg)
    seed_cfgs = cfg.per_seed()
    with rundir.claimed(seed_cfgs) as statuses:
        try:
            if cfg.agent == "stream_ac":  # streaming: no replay, no batches -- its own small loop
                from sparserl import stream

                return stream.train_stream(seed_cfgs, statuses, log)
            return train_replay(cfg, seed_cfgs, statuses, log)
        except OSError as e:
            if checkpoint.is_disk_full(e):
                raise checkpoint.DiskFull.of(e) from None
            raise


def train_replay(cfg: Config, seed_cfgs: list[Config], statuses: list[str], log: Callable[[str], None]):
    """The loop of the replay agents (SAC, DDPG, DrQ-v2) over claimed run directories."""
    if all(st == "finished" for st in statuses):
        summaries = [json.loads((c.resolved_run_dir / "summary.json").read_text()) for c in seed_cfgs]
        for c in seed_cfgs:
            log(f"[{c.resolved_run_dir.name}] already finished; delete it or pass overwrite=true to train again")
        return summaries[0] if len(summaries) == 1 else summaries
    if set(statuses) == {"finished", "resume"}:
        statuses = ["resume"] * len(statuses)  # killed between the seeds' summaries: all resume at the end
    if len(set(statuses)) > 1:
        raise ConfigError(f"the seeds' run directories are in different states ({', '.join(statuses)}); "
                          f"resume or run the seeds separately, or pass overwrite=true")
    if len(seed_cfgs) > 1 and cfg.env.startswith(envs.GYM_PREFIX):
        log("warning: several seeds on a Gymnasium task checkpoint only when every seed ends an episode on the "
            "same step, which variable-length episodes rarely do; run one seed per process for regular checkpoints")
    cfg0 = seed_cfgs[0]  # static config of the jitted functions (only the seed differs between seeds)
    agent = agents.get(cfg.agent)
    seeds = _make_seeds(seed_cfgs, log)
    obs_dim, action_dim = seeds[0].env.obs_dim, seeds[0].env.action_dim
    single_states = [agent.init(c, obs_dim, action_dim) for c in seed_cfgs]
    stats = [agents.model_stats(st) for st in single_states]

    # Resume: every seed from a checkpoint at the same agent step.
    start_step, wall_offset, timers, updates_in_row = 0, 0.0, Timers(), 0
    states, sums = single_states, None
    if statuses[0] == "resume":
        common_step = None
        for _ in range(2):  # find a step every seed has (a kill may fall between the seeds' saves)
            loaded = [checkpoint.latest_valid(s.run_dir / "checkpoints", common_step, log) for s in seeds]
            if any(x is None for x in loaded):
                loaded = None
                break
            steps = [meta["agent_step"] for _, meta in loaded]
            if len(set(steps)) == 1:
                break
            common_step = min(steps)
        if loaded is None or len({meta["agent_step"] for _, meta in loaded}) != 1:
            log(f"[{seeds[0].run_dir.name}] no usable checkpoint; starting over")
            statuses = ["new"] * len(seeds)
        else:
            template = fresh_sums(agent)
            restored = [_restore_seed(s, arrays, meta, st, template) for s, (arrays, meta), st
                        in zip(seeds, loaded, single_states)]
            states, sums = [r[0] for r in restored], [r[1] for r in restored]
            meta = loaded[0][1]
            start_step, wall_offset, timers = meta["agent_step"], meta["wall_time"], Timers(meta["timers"])
            updates_in_row = meta["updates_in_row"]
            log(f"[{seeds[0].run_dir.name}] resuming at env step {start_step * cfg.action_repeat}")
    if statuses[0] == "new":
        for s, c, st in zip(seeds, seed_cfgs, stats):
            rundir.start(c, st)

    vmapped = cfg.seed_parallel == "vmap" or (cfg.seed_parallel == "auto" and jax.default_backend() != "cpu")
    group = SeedGroup(agent, cfg0, seed_cfgs, states, vmapped and len(seeds) > 1)
    if sums is not None:
        group.sums = _stack(sums) if group.vmapped else sums
    del single_states, states, sums

    live = [loggers.make_loggers(cfg, s.run_dir, to_yaml(c), c.to_dict()) for s, c in zip(seeds, seed_cfgs)]
    video_envs: dict[int, envs.Env] = {}

    def record_videos(env_step: int) -> None:
        for i, s in enumerate(seeds):
            try:  # the evaluation row is already written: a rendering failure only costs the video
                if i not in video_envs:
                    video_envs[i] = envs.make_for(cfg, envs.derive_seed(s.cfg.seed, 6), render=True)
                stats_i = s.obs_stats()
                frames = loggers.record_episode(video_envs[i], lambda o: group.act_one(i, o, stats_i, True),
                                                cfg.video.size)
                path = loggers.write_video(frames, s.run_dir / "videos" / f"step_{env_step}")
                log(f"[{s.run_dir.name}] video: {path} ({len(frames)} frames)")
                for logger in live[i]:
                    logger.log_video(env_step, path, frames)
            except Exception as e:  # noqa: BLE001
                log(f"[{s.run_dir.name}] warning: could not record the evaluation video at env step {env_step}: {e}")
    metrics_logs = [rundir.MetricsLog(c) for c in seed_cfgs]
    name = seeds[0].run_dir.name if len(seeds) == 1 else f"{len(seeds)} seeds"
    start = time.perf_counter() - wall_offset
    next_checkpoint = (start_step * cfg.action_repeat // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    bar = tqdm(total=cfg.env_steps, initial=start_step * cfg.action_repeat, unit="step", disable=not cfg.progress,
               dynamic_ncols=True, desc=name[:40], file=sys.stderr)

    def stop(s: Seed, quantity: str, step: int) -> None:
        raise rundir.numerical_fault(s.run_dir, quantity, step, cfg.action_repeat)

    def check_faults(host_sums: list[dict], norms: list[dict], agent_step: int) -> None:
        for s, sums_i, norms_i in zip(seeds, host_sums, norms):
            if int(sums_i["_fault"]) >= 0:
                stop(s, agent.METRICS[int(sums_i["_fault"])], int(sums_i["_fault_step"]))
            for key, value in norms_i.items():
                if not np.isfinite(value):
                    stop(s, key.replace("_param_norm", " parameters"), agent_step)

    def save_checkpoints(agent_step: int) -> None:
        host_sums = group.host_sums()
        check_faults(host_sums, group.param_norms(), agent_step)  # never save a faulty state
        extra = {"wall_time": time.perf_counter() - start, "timers": timers.seconds, "updates_in_row": updates_in_row}
        for s, state_i, sums_i in zip(seeds, group.host_states(), host_sums):
            _save_seed(s, state_i, sums_i, agent_step, extra)

    def run_diagnostics(env_step: int) -> None:
        for i, s in enumerate(seeds):
            if cfg.diag_probe == "fixed":  # drawn once, kept in the checkpoints
                if s.probe is None:
                    s.probe = probe.draw_probe_set(s.buffer, cfg.diag_probe_size, s.cfg.seed)
                probe_set = s.probe
            else:  # fresh: from (seed, env_step) alone, so a resumed run draws the same
                probe_set = probe.draw_probe_set(s.buffer, cfg.diag_probe_size, s.cfg.seed, env_step)
            key = jax.random.fold_in(jax.random.PRNGKey(envs.derive_seed(s.cfg.seed, 5)), env_step)
            scalars, cosines = probe.measure(group.state(i), probe_set, s.obs_stats(), key, cfg0, cfg.diag_grad_samples)
            for module, matrix in cosines.items():  # the latest matrices, for the report's heatmaps
                with open(s.run_dir / f"cosine_{module}.npy.tmp", "wb") as f:
                    np.save(f, matrix)
                os.replace(s.run_dir / f"cosine_{module}.npy.tmp", s.run_dir / f"cosine_{module}.npy")
            row = {"env_step": env_step, **scalars}
            path = s.run_dir / "diagnostics.csv"
            with open(path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if s.diag_rows == 0:
                    writer.writeheader()
                writer.writerow({k: rundir.fmt(v) for k, v in row.items()})
            s.diag_rows += 1
            for logger in live[i]:
                logger.log_scalars(env_step, scalars, "diagnostics")

    def reset_networks(env_step: int) -> None:
        count = env_step // cfg.reset.every
        for i, c in enumerate(seed_cfgs):
            group.replace_state(i, reset_state(c, group.state(i), count, obs_dim, action_dim))
        log(f"[{name}] env_step {env_step}: reset actor and critic (reset {count})")

    def evaluation_rows(done: int, is_last: bool, t: float) -> float:
        """Evaluate every seed's deterministic policy after ``done`` agent steps (0: the untrained
        policy, as the reference evaluates it before training) and write its metrics row (update
        metrics averaged over the update calls since the last row). Returns when the evaluation ended."""
        nonlocal updates_in_row
        env_step = done * cfg.action_repeat
        host_sums, norms = group.host_sums(), group.param_norms()
        check_faults(host_sums, norms, done)
        n_eval = cfg.final_eval_episodes if is_last else cfg.eval_episodes
        eval_stats = [s.obs_stats() for s in seeds]
        label = "final eval" if is_last else "eval"
        all_returns = evaluate_lockstep(
            [s.eval_env for s in seeds], lambda obs: group.act(obs, eval_stats, 0, True), n_eval,
            lambda k: bar.set_postfix_str(f"{label} {k}/{n_eval} episodes", refresh=True))
        timers.add("eval", t)
        now = time.perf_counter()
        for i, (s, returns) in enumerate(zip(seeds, all_returns)):
            means = {k: float(host_sums[i][k]) / updates_in_row for k in agent.METRICS} if updates_in_row else {}
            steps_per_s = (done - row_start_step) / (now - row_start) if done > row_start_step else float("nan")
            row = {"env_step": env_step, "agent_step": done, "episodes": s.episodes,
                   "train_return": float(np.mean(s.row_returns)) if s.row_returns else float("nan"),
                   "eval_return": float(returns.mean()), "eval_return_std": float(returns.std()),
                   "eval_episodes": n_eval, **means, **norms[i], "steps_per_s": steps_per_s,
                   "wall_time": now - start}
            scalars = metrics_logs[i].write(row)
            for logger in live[i]:
                logger.log_scalars(env_step, scalars, "metrics")
            s.csv_rows += 1
            s.row_returns = []
            if is_last:
                s.summary_eval = returns
            speed = "untrained policy" if done == 0 else f"{steps_per_s:.0f} agent steps/s"
            log(f"[{s.run_dir.name}] env_step {env_step}: eval_return {returns.mean():.1f} ± "
                f"{returns.std():.1f} ({n_eval} ep), {speed}")
        bar.set_postfix(eval_return=f"{np.mean([r.mean() for r in all_returns]):.1f}", refresh=False)
        group.reset_sums()  # faults were checked above
        updates_in_row = 0
        return now

    try:
        if start_step < cfg.agent_steps:
            bar.set_postfix_str("compiling the update", refresh=True)
            t = time.perf_counter()
            group.compile([s.buffer.gather(np.zeros((cfg.utd, cfg.batch_size), np.int64)) for s in seeds],
                          [s.obs_stats() for s in seeds])
            timers.add("compile", t)
            bar.set_postfix_str("", refresh=False)
        row_start, row_start_step = time.perf_counter(), start_step
        agent_step = start_step
        if start_step == 0:  # a row at env step 0: the untrained policy (resume truncates to csv_rows rows)
            timers.add("log", evaluation_rows(0, False, time.perf_counter()))
            row_start = time.perf_counter()
        for agent_step in range(start_step, cfg.agent_steps):
            t = time.perf_counter()
            for s in seeds:
                if s.needs_reset:
                    s.obs, s.needs_reset = s.env.reset(), False
                    if cfg.obs_norm:
                        s.normalizer.update(s.obs)
            t = timers.add("env", t)
            if agent_step < cfg.warmup_steps:
                actions = [s.action_rng.uniform(-1.0, 1.0, action_dim).astype(np.float32) for s in seeds]
            else:
                actions = group.act(np.stack([s.obs for s in seeds]), [s.obs_stats() for s in seeds], agent_step, False)
            t = timers.add("act", t)
            for i, (s, action) in enumerate(zip(seeds, actions)):
                try:
                    next_obs, reward, terminated, truncated = s.env.step(action)
                except envs.EnvFault as fault:
                    fault.seed_index = i
                    raise
                s.buffer.add(s.obs, action, reward, 0.0 if terminated else 1.0, next_obs,
                             episode_end=terminated or truncated)
                s.episode_return += reward
                if terminated or truncated:
                    s.row_returns.append(s.episode_return)
                    s.episodes += 1
                    s.episode_return, s.needs_reset = 0.0, True
                else:
                    s.obs = next_obs
                    if cfg.obs_norm:
                        s.normalizer.update(next_obs)
            t = timers.add("env", t)

            if agent_step >= cfg.warmup_steps and (agent_step - cfg.warmup_steps) % cfg.update_every == 0:
                group.learn([s.buffer.sample(s.sample_rng, cfg.utd, cfg.batch_size) for s in seeds],
                            [s.obs_stats() for s in seeds], agent_step)
                updates_in_row += 1
                t = timers.add("update", t)

            env_step = (agent_step + 1) * cfg.action_repeat
            bar.update(cfg.action_repeat)
            is_last = agent_step + 1 == cfg.agent_steps
            if env_step % cfg.eval_every < cfg.action_repeat or is_last:
                now = evaluation_rows(agent_step + 1, is_last, t)
                if cfg.video.every and env_step % cfg.video.every < cfg.action_repeat:
                    record_videos(env_step)
                row_start, row_start_step = time.perf_counter(), agent_step + 1
                t = timers.add("log", now)

            if cfg.diag_every and env_step % cfg.diag_every < cfg.action_repeat and agent_step >= cfg.warmup_steps:
                run_diagnostics(env_step)
                t = timers.add("diagnostics", t)
            if cfg.reset.every and env_step % cfg.reset.every < cfg.action_repeat and not is_last:
                reset_networks(env_step)

            if env_step >= next_checkpoint and all(s.needs_reset for s in seeds):
                save_checkpoints(agent_step + 1)
                next_checkpoint = (env_step // cfg.checkpoint_every + 1) * cfg.checkpoint_every
                timers.add("checkpoint", t)
        save_checkpoints(cfg.agent_steps)
    except envs.EnvFault as fault:  # a NaN action, a diverging simulation: a numerical fault of that seed
        check_faults(group.host_sums(), group.param_norms(), agent_step)  # name the root cause (a loss) if any
        s = seeds[getattr(fault, "seed_index", 0)]
        raise rundir.numerical_fault(s.run_dir, str(fault), agent_step, cfg.action_repeat) from None
    finally:
        bar.close()
        for metrics_log, seed_loggers in zip(metrics_logs, live):
            metrics_log.close()
            for logger in seed_loggers:
                logger.close()

    wall = time.perf_counter() - start
    summaries = []
    for s, st in zip(seeds, stats):
        ev = s.summary_eval
        summary = {
            "final_return": float(ev.mean()), "final_return_std": float(ev.std()),
            "final_return_ci95": float(1.96 * ev.std(ddof=1) / np.sqrt(len(ev))) if len(ev) > 1 else 0.0,
            "final_eval_episodes": len(ev), "env_steps": cfg.agent_steps * cfg.action_repeat, "seed": s.cfg.seed, "wall_time": wall,
            "agent_steps_per_s": (cfg.agent_steps - start_step) / (wall - wall_offset),
            "time_share": {k: v / wall for k, v in timers.seconds.items()},
            "params": {n: {k: m[k] for k in ("total_params", "nonzero_params", "sparsity")} for n, m in st.items()},
        }
        rundir.write_summary(s.run_dir, summary, log)
        summaries.append(summary)
    return summaries[0] if len(summaries) == 1 else summaries

