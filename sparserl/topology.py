"""Dynamic sparse topology: masks that are rewired during training (SET, RigL), per module.

A module's ``topology`` (``actor.topology``, ``critic.topology``, ``encoder.topology``) is ``static``
(the mask drawn at init is kept; PAPER.md), ``set`` or ``rigl``. Every ``topology.every`` gradient
steps until ``topology.stop``, each prunable tensor of a dynamic module is rewired
(:func:`rewire_tensor`): the ``n = floor(f * kept)`` kept weights of smallest magnitude are dropped
and ``n`` positions that were pruned before this update are grown — at random (SET, Mocanu et al.
2018) or where the dense gradient's magnitude is largest (RigL, Evci et al. 2020). The fraction
``f`` follows :func:`drop_fraction` (cosine decay to 0 at ``topology.decay_end``, as RigL). So the
number of kept weights of every tensor (its ERK density) never changes; grown weights start at
exactly zero with zero AdamW moments; the target critic is masked by the new critic mask.

Everything here is a pure function of arrays; the step schedule is a function of the agent step
(:func:`grad_steps_done`), and the random draws of SET are a function of ``(mask seed, gradient
step)``, so nothing but the masks and the :class:`Tracking` of each module needs checkpointing —
both are in the agent state. The dense gradient RigL needs is computed only at topology updates
(:func:`update_state` is its own jitted function, called by :class:`sparserl.seedgroup.SeedGroup`).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparserl import sparse_kernel, sparsity
from sparserl.config import Config

MODULES = ("encoder", "actor", "critic")  # the module sections that have a ``topology`` key
_TOPOLOGY_STREAM = 0x70_90  # separates the regrowth draws of SET from the mask draw of the same seed
RIGL_STOP_FRACTION = 0.75  # default stop: RigL stops rewiring at 75% of training (Evci et al. 2020)


class Tracking(NamedTuple):
    """What a dynamic module carries besides its mask (part of the agent state, so checkpointed)."""

    ever_active: Any  # bool tree like the mask: was the weight kept at any time so far
    replaced: jax.Array  # fraction of the kept weights replaced at the latest topology update
    updates: jax.Array  # topology updates so far


# ----------------------------------------------------------------------------------------------
# Configuration and schedule


def method(cfg: Config, module: str) -> str:
    """The topology of one module (``static`` for a module without a ``topology`` key)."""
    section = getattr(cfg, module, None)
    return getattr(section, "topology", "static")


def dynamic_modules(cfg: Config) -> tuple[str, ...]:
    return tuple(m for m in MODULES if method(cfg, m) != "static")


def total_grad_steps(cfg: Config) -> int:
    calls = max(0, -(-(cfg.agent_steps - cfg.warmup_steps) // cfg.update_every))
    return calls * cfg.utd


def stop_step(cfg: Config) -> int:
    return cfg.topology.stop or int(RIGL_STOP_FRACTION * total_grad_steps(cfg))


def decay_end(cfg: Config) -> int:
    return cfg.topology.decay_end or stop_step(cfg)


def grad_steps_done(cfg: Config, agent_step: int) -> int:
    """Gradient steps done once the update call at ``agent_step`` has run (0 before learning starts)."""
    if agent_step < cfg.warmup_steps:
        return 0
    return ((agent_step - cfg.warmup_steps) // cfg.update_every + 1) * cfg.utd


def due(cfg: Config, agent_step: int) -> bool:
    """Is a topology update due right after the update call at ``agent_step``: has this call's
    ``utd`` gradient steps crossed a multiple of ``topology.every``, no later than the stop step."""
    if not dynamic_modules(cfg):
        return False
    done = grad_steps_done(cfg, agent_step)
    every = cfg.topology.every
    return 0 < done <= stop_step(cfg) and done // every > (done - cfg.utd) // every


def drop_fraction(cfg: Config, grad_step) -> jax.Array:
    """The drop fraction at ``grad_step``: constant, or ``f0 * (1 + cos(pi t / T_end)) / 2`` (RigL)."""
    f0 = jnp.float32(cfg.topology.drop_fraction)
    if cfg.topology.schedule == "constant":
        return f0
    t = jnp.minimum(jnp.asarray(grad_step, jnp.float32) / max(decay_end(cfg), 1), 1.0)
    return f0 * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


# ----------------------------------------------------------------------------------------------
# One tensor, one module


def rewire_tensor(weights: jax.Array, mask: jax.Array, grow_score: jax.Array, fraction) -> tuple[jax.Array, jax.Array]:
    """The new mask of one tensor and how many weights it replaced.

    Drop the ``n = min(floor(fraction * kept), pruned)`` kept weights of smallest ``|weights|``;
    grow the ``n`` positions that were pruned (before this update) with the largest ``grow_score``.
    Ties go to the lower flat index (stable sorts), so the result is deterministic."""
    m, w, score = mask.reshape(-1), jnp.abs(weights).reshape(-1), grow_score.reshape(-1)
    kept = m.sum()
    n = jnp.minimum(jnp.floor(fraction * kept).astype(jnp.int32), m.size - kept)
    drop_rank = _ranks(jnp.where(m, w, jnp.inf))  # rank 0: the smallest kept magnitude
    grow_rank = _ranks(jnp.where(m, jnp.inf, -score))  # rank 0: the largest score among pruned positions
    new = (m & (drop_rank >= n)) | (~m & (grow_rank < n))
    return new.reshape(mask.shape), n


def _ranks(values: jax.Array) -> jax.Array:
    """The position of each entry in the stable ascending sort of ``values``."""
    order = jnp.argsort(values, stable=True)
    return jnp.zeros(values.shape, jnp.int32).at[order].set(jnp.arange(values.size, dtype=jnp.int32))


def reset_moments(opt_state, params, keep) -> Any:
    """Zero every optimizer-state tree shaped like ``params`` (AdamW's moments) where ``keep`` is False."""
    return sparsity.map_params_like(
        opt_state, params,
        lambda node: jax.tree_util.tree_map(lambda x, k: jnp.where(k, x, jnp.zeros((), x.dtype)), node, keep))


def rewire_module(module, grow_scores, fraction):
    """A module (``params, opt_state, mask, tracking``) after one topology update of each of its
    sparse tensors (boolean masks; scalar ``True`` masks are dense tensors and stay as they are)."""
    masks, scores = jax.tree_util.tree_leaves(module.mask), jax.tree_util.tree_leaves(grow_scores)
    weights = jax.tree_util.tree_leaves(module.params)
    new_masks, replaced, kept = [], jnp.zeros((), jnp.int32), 0
    for w, m, s in zip(weights, masks, scores):
        if jnp.ndim(m) == 0:
            new_masks.append(m)
            continue
        new_m, n = rewire_tensor(w, m, s, fraction)
        new_masks.append(new_m)
        replaced, kept = replaced + n, kept + m.sum()
    mask = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(module.mask), new_masks)
    keep_moments = jax.tree_util.tree_map(lambda old, new: old & new, module.mask, mask)
    params = sparsity.apply_mask(module.params, mask)  # dropped weights -> 0; grown ones are 0 already
    opt_state = reset_moments(module.opt_state, module.params, keep_moments)
    t = module.tracking
    tracking = Tracking(jax.tree_util.tree_map(jnp.logical_or, t.ever_active, mask),
                        replaced / jnp.maximum(kept, 1), t.updates + 1)
    return module._replace(params=params, opt_state=opt_state, mask=mask, tracking=tracking,
                           layout=relayout(module.layout, mask))


def relayout(layout_tree, mask):
    """The sparse-compute layout of each pruned kernel (:func:`sparsity.layouts`) rebuilt for its new
    mask. A topology update keeps every tensor's kept count, so each layout keeps its shapes (its
    count is read from the old layout: under ``jit`` the new mask's count cannot be)."""
    if layout_tree is None:
        return None

    def one(lay, m):
        return None if lay is None else sparse_kernel.layout(m, lay.rows.shape[-1])

    is_leaf = lambda t: t is None or isinstance(t, sparse_kernel.Layout)  # noqa: E731
    return jax.tree_util.tree_map(one, layout_tree, mask, is_leaf=is_leaf)


def init_tracking(mask) -> Tracking:
    return Tracking(jax.tree_util.tree_map(jnp.copy, mask), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# An agent state


def module_key(key: jax.Array, module: str, grad_step) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(module.encode()) & 0x7FFFFFFF), grad_step)


def seed_key(cfg: Config) -> jax.Array:
    """The key of one seed's topology draws: from the mask seed, separate from the mask's own draw."""
    return jax.random.fold_in(jax.random.PRNGKey(cfg.mask_seed), _TOPOLOGY_STREAM)


def dense_grads(agent, state, batch, stats, key, cfg: Config) -> dict:
    """``{module: dense gradient}`` of the actor's and the critic's losses on ``batch`` (the mean of the
    agent's per-example losses, ``diagnostic_losses``): gradients at pruned positions included, so
    computed masked-dense whatever ``sparsity.compute`` (a sparse product has no gradient there)."""
    masked = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, compute="masked"))
    actor_fn, critic_fn, examples = agent.diagnostic_losses(state, batch, stats, key, masked)

    def grad(fn, params):
        return jax.grad(lambda p: jax.vmap(fn, in_axes=(None, 0))(p, examples).mean())(params)

    grads = {"actor": grad(actor_fn, state.actor.params), "critic": grad(critic_fn, state.critic.params)}
    if "encoder" in state._fields and method(cfg, "encoder") == "rigl":  # DrQ-v2: through the critic's loss
        grads["encoder"] = jax.grad(agent.encoder_loss(state, batch, stats, key, masked))(state.encoder.params)
    return grads


def update_state(agent, state, batch, stats, key, grad_step, cfg: Config):
    """One topology update of every dynamic module of an agent state (``batch``: one minibatch, for
    RigL's dense gradients; ``key``: :func:`seed_key`); the target critic follows the critic's mask."""
    names = dynamic_modules(cfg)
    rigl = [n for n in names if method(cfg, n) == "rigl"]
    grads = dense_grads(agent, state, batch, stats, jax.random.fold_in(key, grad_step), cfg) if rigl else {}
    fraction = drop_fraction(cfg, grad_step)
    new = {}
    for name in names:
        module = getattr(state, name)
        if name in grads:
            scores = jax.tree_util.tree_map(jnp.abs, grads[name])
        else:
            leaves, treedef = jax.tree_util.tree_flatten(module.params)
            k = module_key(key, name, grad_step)
            scores = jax.tree_util.tree_unflatten(
                treedef, [jax.random.uniform(jax.random.fold_in(k, i), x.shape) for i, x in enumerate(leaves)])
        new[name] = rewire_module(module, scores, fraction)
    if "critic" in new and "target" in state._fields:
        new["target"] = sparsity.apply_mask(state.target, new["critic"].mask)
    return state._replace(**new)


def diagnostics(state) -> dict[str, jax.Array]:
    """Per dynamic module: ``{m}_replaced`` (fraction of kept weights replaced at the latest topology
    update), ``{m}_topology_updates`` and ``{m}_ever_active`` (fraction of the weights of its sparse
    tensors that have been kept at some time: 1 - sparsity at the start, growing as masks move)."""
    out = {}
    for name in MODULES:
        module = getattr(state, name, None)
        tracking = getattr(module, "tracking", None)
        if tracking is None:
            continue
        ever = [e for e in jax.tree_util.tree_leaves(tracking.ever_active) if jnp.ndim(e) > 0]
        size = sum(e.size for e in ever)
        out[f"{name}_replaced"] = tracking.replaced
        out[f"{name}_topology_updates"] = tracking.updates
        out[f"{name}_ever_active"] = sum(e.sum() for e in ever) / max(size, 1)
    return out
