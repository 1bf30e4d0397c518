"""``sparserl inspect``: parameter counts, per-layer sparsity and FLOPs of a config, without training."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import agents, envs, fidelity
from sparserl.agents import common
from sparserl.agents.common import Batch, ObsStats
from sparserl.config import Config


def _layer_row(layer: dict) -> dict:
    return {"name": layer["name"], "shape": layer["shape"], "sparsity": layer["sparsity"],
            "params": layer["params"], "nonzero": layer["nonzero"]}


def _update_inputs(cfg: Config, obs_dim: int, action_dim: int):
    b, spec = cfg.batch_size, jax.ShapeDtypeStruct
    if cfg.pixels:  # uint8 frame stacks
        shape, dtype, stats_dim = (cfg.render.size, cfg.render.size, 3 * cfg.frame_stack), jnp.uint8, 1
    else:
        shape, dtype, stats_dim = (obs_dim,), jnp.float32, obs_dim
    batches = Batch(spec((1, b, *shape), dtype), spec((1, b, action_dim), jnp.float32),
                    spec((1, b), jnp.float32), spec((1, b), jnp.float32), spec((1, b, *shape), dtype))
    return batches, ObsStats(spec((stats_dim,), jnp.float32), spec((stats_dim,), jnp.float32))


def _flops(cost) -> float:
    if isinstance(cost, (list, tuple)):  # older JAX returns one dict per device program
        cost = cost[0]
    return float((cost or {}).get("flops", float("nan")))


def update_flops(cfg: Config, state, obs_dim: int, action_dim: int, compile: bool = True) -> float:
    """FLOPs of one gradient step (XLA cost analysis of the update, K=1). ``state`` may be abstract
    (``jax.eval_shape``); ``compile=False`` analyses the lowered program (within 0.1% of the
    compiled count for SAC, and seconds instead of minutes for 100M-parameter models). Counted as
    masked-dense compute in every ``sparsity.compute`` mode: XLA cannot count a custom kernel's FLOPs."""
    agent = agents.get(cfg.agent)
    if cfg.sparsity.compute != "masked":
        state = jax.eval_shape(common.dense_state, state)
        cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, compute="masked"))
    if hasattr(agent, "update_flops"):  # streaming agents: one step on one transition
        return agent.update_flops(cfg, state, obs_dim, action_dim)
    batches, stats = _update_inputs(cfg, obs_dim, action_dim)
    lowered = jax.jit(agent.update, static_argnames="cfg").lower(state, batches, stats, cfg=cfg)
    return _flops(lowered.compile().cost_analysis() if compile else lowered.cost_analysis())


def abstract_cost(cfg: Config) -> dict[str, Any]:
    """Total and non-zero parameters, FLOPs per update and of the whole run, from abstract shapes:
    nothing is allocated or drawn, so it is cheap for any model size (``sweep --dry-run``)."""
    from sparserl import sparsity

    env = envs.make_for(cfg, 0)
    agent = agents.get(cfg.agent)
    from sparserl import preflight

    if cfg.pixels or 16 * max(cfg.actor.width, cfg.critic.width) ** 2 > preflight.MAX_EXACT_MASK:  # else all fit
        preflight.check_mask_sizes(cfg, preflight.model_memory(cfg, env.obs_dim, env.action_dim)["largest_kernel"])
    with sparsity.counting_draws() as draws:
        state = jax.eval_shape(lambda: agent.init(cfg, env.obs_dim, env.action_dim))
    total = sum(int(np.prod(x.shape)) for m in agents.modules(state).values()
                for x in jax.tree_util.tree_leaves(m.params))
    nonzero = total - int(sum(n - kept for n, kept in draws))
    flops = update_flops(cfg, state, env.obs_dim, env.action_dim, compile=False)
    # Streaming agents update on every step from the first; replay agents after warm-up, utd times.
    updates = cfg.agent_steps if cfg.agent == "stream_ac" else max(0, cfg.agent_steps - cfg.warmup_steps) * cfg.utd
    return {"total_params": total, "nonzero_params": nonzero, "flops_per_update": flops,
            "updates": updates, "total_flops": flops * updates}


def inspect(cfg: Config, flops: bool = True) -> dict[str, Any]:

    from sparserl import preflight

    env = envs.make_for(cfg, 0)
    preflight.check_model_fits(cfg, env.obs_dim, env.action_dim, num_seeds=1)  # refuse before allocating
    state = agents.get(cfg.agent).init(cfg, env.obs_dim, env.action_dim)
    report: dict[str, Any] = {"agent": cfg.agent, "env": cfg.env, "obs_dim": env.obs_dim,
                              "action_dim": env.action_dim}
    total = nonzero = 0
    for name, s in agents.model_stats(state).items():
        report[name] = {"total_params": s["total_params"], "nonzero_params": s["nonzero_params"],
                        "sparsity": s["sparsity"], "layers": [_layer_row(l) for l in s["layers"]]}
        total += s["total_params"]
        nonzero += s["nonzero_params"]
    report["total_params"], report["nonzero_params"] = total, nonzero
    report["flops_per_update"] = update_flops(cfg, state, env.obs_dim, env.action_dim) if flops else None
    # keys set away from the reference code, where they have an effect (docs/fidelity.md)
    report["non_reference_options"] = fidelity.non_reference_options(cfg)
    report["non_reference_details"] = fidelity.describe(cfg)
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['agent']} on {report['env']} (obs {report['obs_dim']}, action {report['action_dim']})"]
    for name in [n for n in ("encoder", "actor", "critic") if n in report]:
        m = report[name]
        lines.append("")
        lines.append(f"{name}: {m['total_params']:,} params, {m['nonzero_params']:,} non-zero "
                     f"(sparsity {m['sparsity']:.3f})")
        width = max(len(l["name"]) for l in m["layers"])
        lines.append(f"  {'layer':<{width}}  {'shape':>12}  {'params':>11}  {'non-zero':>11}  sparsity")
        for l in m["layers"]:
            shape = "x".join(map(str, l["shape"]))
            lines.append(f"  {l['name']:<{width}}  {shape:>12}  {l['params']:>11,}  {l['nonzero']:>11,}  {l['sparsity']:.3f}")
    lines.append("")
    lines.append(f"total: {report['total_params']:,} params, {report['nonzero_params']:,} non-zero")
    if report.get("flops_per_update") is not None:
        lines.append(f"flops_per_update: {report['flops_per_update']:.4g} ({report['flops_per_update'] / 1e9:.2f} GFLOP)")
    if "non_reference_details" in report:
        lines.append("non-reference options: " + ("; ".join(report["non_reference_details"]) or "none")
                     + ("" if not report["non_reference_details"] else " (docs/fidelity.md)"))
    return "\n".join(lines)
