"""``sparserl diagnose``: diagnostics of saved runs, the plasticity probe, and simplicity scores.

* ``diagnose RUN_DIR``: loads the run's newest valid checkpoint, recomputes every metric of
  :func:`sparserl.probe.measure` on the probe set a diagnostic at the checkpoint's env step uses
  (``diag_probe=fresh``: drawn from the saved buffer and ``(seed, env_step)``; ``fixed``: the run's
  own set), and writes ``RUN_DIR/diagnose/``: ``metrics.json``, ``layer_norms.json`` (per-tensor
  parameter norms), the N x N gradient-cosine matrices
  (``cosine_actor.npy``, ``cosine_critic.npy``) and their heatmaps (``cosine_*.png``).
* ``--plasticity``: fits a copy of the critic (its mask kept) to fresh random targets on the probe
  inputs for a fixed number of steps; the remaining loss measures lost plasticity.
* ``--simplicity``: simplicity scores of freshly initialised encoders over a grid of widths x
  sparsities (no run needed), as a table and ``simplicity.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from sparserl import (
    agents,
    checkpoint,
    config,
    diagnostics,
    envs,
    networks,
    probe,
    replay,
    runs,
    sparsity,
)
from sparserl.agents import common
from sparserl.agents.common import Batch, ObsStats, normalize
from sparserl.config import ConfigError


def load_run(run_dir: Path):
    """``(cfg, state, probe_batch, obs_stats, meta)`` from a run directory's newest valid checkpoint."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{str(run_dir)!r}: not a sparserl run directory (no config.yaml)")
    raw = config.flatten(yaml.safe_load(cfg_path.read_text()))
    cfg = config.build(raw, check_env=False)
    if cfg.agent == "stream_ac":
        raise ConfigError(f"{str(run_dir)!r}: agent=stream_ac keeps no replay buffer to draw a probe set from; "
                          f"diagnose supports sac and ddpg runs")
    loaded = checkpoint.latest_valid(run_dir / "checkpoints", log=lambda m: print(m))
    if loaded is None:
        raise ConfigError(f"{str(run_dir)!r}: has no usable checkpoint yet")
    arrays, meta = loaded
    action_dim = arrays["buffer/action"].shape[1]
    obs_dim = 1 if cfg.pixels else arrays["buffer/obs"].shape[1]  # pixels: the normaliser is unused
    agent = agents.get(cfg.agent)
    state = checkpoint.unflatten_like(common.dense_state(agent.init(cfg, obs_dim, action_dim)), arrays, "state")
    # diag_probe=fixed: the run's own set (or, before its first diagnostic, the one it would draw);
    # fresh: the set a diagnostic at the checkpoint's env step draws from the same buffer. Runs from
    # before diag_probe existed (no such key in config.yaml) had a fixed set.
    fixed = cfg.diag_probe == "fixed" or ("diag_probe" not in raw and "probe/obs" in arrays)
    fresh_step = None if fixed else meta["env_step"]
    if "probe/obs" in arrays and fresh_step is None:
        batch = Batch(*(arrays[f"probe/{k}"] for k in Batch._fields))
    elif cfg.pixels:  # rebuild the frame replay to draw the probe set from it
        buffer = replay.for_config(cfg, obs_dim, action_dim)
        buffer.restore({k[len("buffer/"):]: v for k, v in arrays.items() if k.startswith("buffer/")}, meta)
        batch = probe.draw_probe_set(buffer, cfg.diag_probe_size, cfg.seed, fresh_step)
    else:
        stored = Batch(*(arrays[f"buffer/{k}"] for k in Batch._fields))  # the buffer's slots, in order
        batch = probe.draw_probe_set(stored, cfg.diag_probe_size, cfg.seed, fresh_step)
    normalizer = envs.RunningMeanStd(obs_dim)
    normalizer.mean, normalizer.var = arrays["normalizer/mean"], arrays["normalizer/var"]
    return cfg, state, batch, normalizer.obs_stats(cfg.obs_norm), meta


def heatmap(matrix: np.ndarray, title: str, path: Path) -> None:
    plt = runs.pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("sample")
    ax.set_ylabel("sample")
    fig.colorbar(im, ax=ax, label="gradient cosine")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def critic_plasticity(cfg, state, batch: Batch, stats: ObsStats, steps: int, seed: int = 0) -> float:
    """Final loss of a copy of the critic (mask kept) fitted to fresh random targets."""
    inputs = jnp.concatenate([normalize(jnp.asarray(batch.obs), stats), jnp.asarray(batch.action)], -1)
    obs_dim = batch.obs.shape[1]

    def apply_fn(params, x):
        return networks.critic(params, x[:, :obs_dim], x[:, obs_dim:]).T

    return diagnostics.plasticity_probe(apply_fn, state.critic.params, inputs, jax.random.PRNGKey(seed),
                                        steps=steps, lr=cfg.lr, mask=state.critic.mask)


def diagnose_run(run_dir: Path, plasticity_steps: int | None = None) -> dict:
    cfg, state, batch, stats, meta = load_run(run_dir)
    key = jax.random.fold_in(jax.random.PRNGKey(envs.derive_seed(cfg.seed, 5)), meta["env_step"])  # as in training
    scalars, cosines = probe.measure(state, batch, stats, key, cfg, cfg.diag_grad_samples)
    result = {"run_dir": str(run_dir), "env_step": meta["env_step"], **scalars}
    layer_norms = {name: diagnostics.layer_norms(module.params) for name, module in agents.modules(state).items()}
    if plasticity_steps:
        if cfg.pixels:
            raise ConfigError(f"{str(run_dir)!r}: --plasticity is not implemented for pixel runs (agent=drqv2)")
        result["critic_plasticity_loss"] = critic_plasticity(cfg, state, batch, stats, plasticity_steps)
        result["plasticity_steps"] = plasticity_steps
    out = run_dir / "diagnose"
    out.mkdir(exist_ok=True)
    for name, cos in cosines.items():
        np.save(out / f"cosine_{name}.npy", cos)
        heatmap(cos, f"{name} gradient cosine, env step {meta['env_step']}", out / f"cosine_{name}.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    (out / "layer_norms.json").write_text(json.dumps(layer_norms, indent=1))
    return result


def simplicity_grid(widths: list[int], sparsities: list[float], base: config.Config, num_inits: int,
                    out_dir: Path) -> list[dict]:
    """Simplicity score of a critic-like encoder + dense head on 2-D inputs, per width x sparsity."""
    rows = []
    for width in widths:
        for s in sparsities:
            def init_fn(key, width=width, s=s):
                k_enc, k_head, k_mask = jax.random.split(key, 3)
                params = {"encoder": networks.init_encoder(k_enc, 2, width, base.critic.blocks, base.arch),
                          "head": networks.init_dense(k_head, width, 1)}
                mask = sparsity.make_mask(k_mask, params, s, base.sparsity.method, base.sparsity.budget,
                                          base.sparsity.draw, always_dense=("head",))
                return sparsity.apply_mask(params, mask)

            def apply_fn(params, x):
                return networks.dense(params["head"], networks.encoder(params["encoder"], x))

            score = diagnostics.simplicity_score(apply_fn, init_fn, jax.random.PRNGKey(base.seed), num_inits=num_inits)
            rows.append({"width": width, "sparsity": s, "simplicity": float(score)})
    _plot_simplicity(rows, out_dir / "simplicity.png")
    (out_dir / "simplicity.json").write_text(json.dumps(rows, indent=1))
    return rows


def _plot_simplicity(rows: list[dict], path: Path) -> None:
    plt = runs.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for s in sorted({r["sparsity"] for r in rows}):
        pts = [(r["width"], r["simplicity"]) for r in rows if r["sparsity"] == s]
        ax.plot(*zip(*pts), marker="o", label=f"sparsity {s:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("simplicity score (higher = simpler)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
