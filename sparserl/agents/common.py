"""Pieces shared by the off-policy agents: a sparse trainable module, the critic, targets, batches.

A :class:`Module` is one network's parameters, its AdamW state and its mask (fixed, or rewired by
:mod:`sparserl.topology`, which keeps its ``tracking``). Its optimizer is rebuilt from the config
wherever it is needed (``sparse_adamw`` is a pure closure), so the mask travels with the state — it
is checkpointed with it and stacks under ``vmap`` with it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparserl import networks, sparsity, topology
from sparserl.envs import ObsStats  # noqa: F401  (re-exported: what the agents normalise by)
from sparserl.config import Config, ConfigError


class Module(NamedTuple):
    params: Any
    opt_state: Any
    mask: Any
    tracking: Any = None  # a dynamic topology's topology.Tracking (None: a static mask)
    layout: Any = None  # sparsity.layouts(params, mask): where pruned 2-D kernels keep their weights


class Batch(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    discount: jax.Array  # 0 at a true terminal state, 1 otherwise (time limits bootstrap)
    next_obs: jax.Array


def normalize(obs: jax.Array, stats: ObsStats) -> jax.Array:
    return (obs - stats.mean) / stats.std


def optimizer(cfg: Config, mask) -> optax.GradientTransformation:
    return sparsity.sparse_adamw(cfg.lr, cfg.weight_decay, mask, cfg.weight_decay_on)


def init_module(cfg: Config, name: str, params, module_sparsity: float, always_dense=(),
                make_optimizer=None) -> Module:
    """Draw the module's mask (its own key, from the mask seed), prune the init, make the optimizer
    state (masked AdamW by default; ``make_optimizer(mask)`` builds another, e.g. ObGD)."""
    try:
        mask = sparsity.make_mask(sparsity.module_key(cfg.mask_seed, name), params, module_sparsity,
                                  cfg.sparsity.method, cfg.sparsity.budget, cfg.sparsity.draw, always_dense)
    except ValueError as e:
        raise ConfigError(f"{name}.{e}") from None
    params = sparsity.apply_mask(params, mask)
    tx = make_optimizer(mask) if make_optimizer else optimizer(cfg, mask)
    tracking = topology.init_tracking(mask) if topology.method(cfg, name) != "static" else None
    layout = sparsity.layouts(params, mask)
    params = sparsity.to_storage(params, layout, cfg.sparsity.compute)
    return Module(params, tx.init(params), mask, tracking, layout)


def bind(cfg: Config, params, module: Module, fixed: bool = False):
    """``params`` (the module's own, or a copy such as the target critic or the argument of a loss being
    differentiated) as the networks compute with them under ``sparsity.compute``. ``fixed``: a loss
    holds them fixed (no kernel gradient is computed: the critic in the actor's loss, targets)."""
    return sparsity.bind(params, module.layout, cfg.sparsity.compute, fixed)


def bound(module: Module):
    """A module's own parameters as the networks compute with them outside the update (acting): compact
    kernels paired with their layouts (sparse products); masked-dense ones as they are."""
    return sparsity.bind(module.params, module.layout, "masked")


def dense_state(state):
    """An agent state in the one format outside training: every compact leaf (parameters, optimizer
    moments or traces, the target critic) expanded masked-dense. Checkpoints, diagnostics and topology
    updates read this; exact (only kept values move)."""
    return _convert_storage(state, lambda tree, module: sparsity.to_dense(tree, module.layout))


def stored_state(state, cfg: Config):
    """The training form of an agent state (its inverse): kernels that ``sparsity.compute`` multiplies
    sparsely stored compact. A masked-dense state in, whichever mode wrote it."""
    compute = cfg.sparsity.compute
    return _convert_storage(state, lambda tree, module: sparsity.to_storage(tree, module.layout, compute))


def _convert_storage(state, convert):
    new = {}
    for name in state._fields:
        module = getattr(state, name)
        if isinstance(module, Module):
            new[name] = module._replace(
                params=convert(module.params, module),
                opt_state=sparsity.map_params_like(module.opt_state, module.params, lambda t, m=module: convert(t, m)))
    if "target" in state._fields:  # every replay agent's target is a copy of its critic's parameters
        new["target"] = convert(state.target, state.critic)
    return state._replace(**new)


def global_norm(tree) -> jax.Array:
    # vdot, not sum(square(x)): XLA:CPU materialises square(x) before a reduction (another full pass
    # over every gradient); a dot reads x once.
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(tree)))


def masked_global_norm(tree, mask) -> jax.Array:
    """Global L2 norm of ``tree`` over kept coordinates only (``mask`` True): the norm of the gradient
    a masked step actually applies (the reference logs this one). Dense leaves (scalar masks) are a
    plain ``vdot``; a sparse leaf is ``vdot(where(m, g, 0), g)``, which XLA:CPU fuses into Adam's
    moment updates (measured on the compiled update: only the 1-byte mask is read once more; the
    equivalent ``sum(where(m, g*g, 0))`` writes and reads one more f32 array per kernel)."""
    total = jnp.zeros((), jnp.float32)
    for x, m in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(mask)):
        if sparsity.is_compact(x, m):  # kept values only
            total = total + jnp.vdot(x, x)
        elif jnp.ndim(m) == 0:
            total = total + jnp.where(m, jnp.vdot(x, x), 0)
        else:
            total = total + jnp.vdot(jnp.where(m, x, jnp.zeros((), x.dtype)), x)
    return jnp.sqrt(total)


def step_module(cfg: Config, module: Module, grads) -> tuple[Module, jax.Array]:
    """One masked AdamW step; returns the new module and the global norm of the applied gradient
    (over kept weights: pruned coordinates are never applied, so they are not counted)."""
    updates, opt_state = optimizer(cfg, module.mask).update(grads, module.opt_state, module.params)
    params = optax.apply_updates(module.params, updates)
    return module._replace(params=params, opt_state=opt_state), masked_global_norm(grads, module.mask)


def init_critic(cfg: Config, key, obs_dim: int, action_dim: int) -> Module:
    params = networks.init_critic(key, obs_dim, action_dim, cfg.critic.width, cfg.critic.blocks, cfg.arch,
                                  num_q=2 if cfg.critic.cdq else 1)
    return init_module(cfg, "critic", params, cfg.critic.sparsity, networks.critic_always_dense(params))


def q_value(params, obs, action) -> jax.Array:
    """min over the Q ensemble (a single Q unless clipped double-Q is on)."""
    return networks.critic(params, obs, action).min(0)


def critic_loss(params, obs, action, target_q) -> tuple[jax.Array, jax.Array]:
    qs = networks.critic(params, obs, action)
    return jnp.square(qs - target_q[None]).mean(1).sum(), qs.mean()


def copy_tree(tree):
    """Own buffers (the target starts equal to the online critic but must not alias it: buffers are donated)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def polyak(target, online, tau: float):
    return jax.tree_util.tree_map(lambda t, o: (1 - tau) * t + tau * o, target, online)


def scan_updates(update_step, state, batches: Batch, stats: ObsStats, cfg: Config):
    """K gradient steps in one call: batches carry a leading axis K; metrics come back stacked.

    Up to 4 steps are unrolled: in a rolled XLA while loop each step copies the loop-carried critic
    parameters (the old ones are still read after the new ones are written), and unrolled steps also
    fuse across the step boundary. Unrolling more only lengthens compilation."""
    return jax.lax.scan(lambda s, b: update_step(s, b, stats, cfg), state, batches,
                        unroll=min(batches.reward.shape[0], 4))


def fresh_sums(agent) -> dict:
    """Metric sums over a metrics row, plus the first numerical fault (quantity index, agent step)."""
    sums = {k: jnp.zeros((), jnp.float32) for k in agent.METRICS}
    return {**sums, "_fault": jnp.array(-1, jnp.int32), "_fault_step": jnp.array(-1, jnp.int32)}


def accumulate(sums: dict, metrics: dict, names: tuple[str, ...], step) -> dict:
    """Add one update's metrics to the row's sums and note the first non-finite one (on the device).

    Losses and gradient norms turn non-finite as soon as any parameter does: checking these scalars
    every step costs nothing, unlike a pass over all parameters."""
    bad = jnp.stack([~jnp.isfinite(metrics[k]).all() for k in names])
    new_fault = (sums["_fault"] < 0) & bad.any()
    out = {k: sums[k] + metrics[k].mean() for k in names}
    out["_fault"] = jnp.where(new_fault, jnp.argmax(bad).astype(jnp.int32), sums["_fault"])
    out["_fault_step"] = jnp.where(new_fault, step, sums["_fault_step"])
    return out
