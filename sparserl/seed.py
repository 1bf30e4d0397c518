"""The host side of one seed of a training run: its envs, replay buffer, observation statistics,
RNG streams, counters and run directory -- and what a checkpoint holds of it (with its agent state
and metric sums, see :func:`save_seed` / :func:`restore_seed`), so that a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparserl import agents, checkpoint, envs, preflight, replay, rundir
from sparserl.agents import common
from sparserl.agents.common import Batch, ObsStats
from sparserl.config import Config


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


def make_seeds(seed_cfgs: list[Config], log: Callable[[str], None]) -> list[Seed]:
    """Each seed's envs first, then -- once the memory check has passed -- the replay buffers, so a
    buffer that cannot fit is refused with one line instead of failing to allocate."""
    pairs = [(envs.make_for(c, envs.derive_seed(c.seed, 0)), envs.make_for(c, envs.derive_seed(c.seed, 1)))
             for c in seed_cfgs]
    preflight.check_model_fits(seed_cfgs[0], pairs[0][0].obs_dim, pairs[0][0].action_dim, num_seeds=len(seed_cfgs))
    check_memory(seed_cfgs[0], len(seed_cfgs), pairs[0][0].action_dim, log)
    return [Seed(c, c.resolved_run_dir, env, eval_env, replay.for_config(c, env.obs_dim, env.action_dim),
                 envs.RunningMeanStd(1 if c.pixels else env.obs_dim),
                 np.random.default_rng(envs.derive_seed(c.seed, 2)),
                 np.random.default_rng(envs.derive_seed(c.seed, 3)))
            for c, (env, eval_env) in zip(seed_cfgs, pairs)]


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds of one seed


def save_seed(s: Seed, state, sums, agent_step: int, extra: dict) -> None:
    arrays = checkpoint.flatten_tree(common.dense_state(state), "state")  # one format for every compute mode
    arrays.update(checkpoint.flatten_tree(sums, "metric_sums"))
    arrays.update({f"buffer/{k}": v for k, v in s.buffer.checkpoint_arrays().items()})
    arrays["normalizer/mean"], arrays["normalizer/var"] = s.normalizer.mean, s.normalizer.var
    if s.probe is not None:
        arrays.update({f"probe/{k}": np.asarray(v) for k, v in s.probe._asdict().items()})
    if not s.needs_reset:  # mid-episode: the episode goes on after a resume exactly as it would have
        arrays.update({f"episode/{k}": v for k, v in s.env.episode_state().items()})
        arrays["episode_obs"] = np.asarray(s.obs)
    meta = {
        "agent_step": agent_step, "env_step": agent_step * s.cfg.action_repeat, **s.buffer.checkpoint_meta(),
        "normalizer_count": s.normalizer.count,
        "sample_rng": s.sample_rng.bit_generator.state, "action_rng": s.action_rng.bit_generator.state,
        "env_rng": s.env.rng_state(), "eval_env_rng": s.eval_env.rng_state(), "needs_reset": s.needs_reset,
        "episode_return": s.episode_return,
        "episodes": s.episodes, "row_returns": s.row_returns, "csv_rows": s.csv_rows, "diag_rows": s.diag_rows,
        "final_eval_returns": None if s.summary_eval is None else s.summary_eval.tolist(), **extra,
    }
    checkpoint.save(s.run_dir / "checkpoints", agent_step, arrays, meta, keep=s.cfg.keep_checkpoints)


def restore_seed(s: Seed, arrays: dict, meta: dict, state_template, sums_template):
    state = common.stored_state(checkpoint.unflatten_like(common.dense_state(state_template), arrays, "state"), s.cfg)
    sums = checkpoint.unflatten_like(sums_template, arrays, "metric_sums")
    s.buffer.restore({k[len("buffer/"):]: v for k, v in arrays.items() if k.startswith("buffer/")}, meta)
    s.normalizer.mean, s.normalizer.var = arrays["normalizer/mean"], arrays["normalizer/var"]
    s.normalizer.count = meta["normalizer_count"]
    s.sample_rng.bit_generator.state = meta["sample_rng"]
    s.action_rng.bit_generator.state = meta["action_rng"]
    s.env.set_rng_state(meta["env_rng"])
    s.eval_env.set_rng_state(meta["eval_env_rng"])
    s.needs_reset, s.obs = meta["needs_reset"], None
    if not s.needs_reset:
        s.env.restore_episode({k[len("episode/"):]: v for k, v in arrays.items() if k.startswith("episode/")})
        s.obs = arrays["episode_obs"]
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
