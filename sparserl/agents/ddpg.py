"""DDPG with statically sparse SimBa networks (PAPER.md §3).

Deterministic ``tanh(Dense)`` actor on the SimBa encoder, Gaussian exploration noise (std 0.1),
the same critic as SAC. One gradient step updates the actor, then the critic (next actions from the
*new* online actor — like our SAC there is no target actor), then the Polyak target critic.

As in the reference code (SparseNetwork4DRL, ``ddpg_update.py``), the actor loss and the TD target
see the policy's action plus Gaussian noise of std ``ddpg.policy_noise`` (0.1, the exploration std),
clipped to [-1, 1] after adding: ``-Q(s, clip(pi(s) + eps))`` and
``r + gamma * d * Q_target(s', clip(pi(s') + eps'))``, fresh noise for each. ``policy_noise=0``
gives the noiseless DDPG losses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparserl import networks
from sparserl.agents import common
from sparserl.agents.common import Batch, Module, ObsStats
from sparserl.config import Config

METRICS = ("critic_loss", "actor_loss", "q_mean",
           "actor_grad_norm", "critic_grad_norm")


class DDPGState(NamedTuple):
    actor: Module
    critic: Module
    target: Any
    key: jax.Array  # policy noise of the losses


def init_actor_params(key, obs_dim: int, action_dim: int, cfg: Config) -> dict:
    k_enc, k_head = jax.random.split(key)
    return {"encoder": networks.init_encoder(k_enc, obs_dim, cfg.actor.width, cfg.actor.blocks, cfg.arch),
            "action": networks.init_dense(k_head, cfg.actor.width, action_dim)}


def init(cfg: Config, obs_dim: int, action_dim: int) -> DDPGState:
    k_actor, k_critic = jax.random.split(jax.random.PRNGKey(cfg.seed))
    actor = common.init_module(cfg, "actor", init_actor_params(k_actor, obs_dim, action_dim, cfg), cfg.actor.sparsity)
    critic = common.init_critic(cfg, k_critic, obs_dim, action_dim)
    k_update = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xDD)  # the init keys stay those of earlier versions
    return DDPGState(actor, critic, common.copy_tree(critic.params), k_update)


def policy(params, obs) -> jax.Array:
    return jnp.tanh(networks.dense(params["action"], networks.encoder(params["encoder"], obs)))


def act(actor_params, obs: jax.Array, key: jax.Array, deterministic: bool, cfg: Config) -> jax.Array:
    action = policy(actor_params, obs)
    if deterministic:
        return action
    return jnp.clip(action + cfg.ddpg.noise_std * jax.random.normal(key, action.shape), -1.0, 1.0)


def noisy_policy(params, obs, key, cfg: Config) -> jax.Array:
    """``clip(pi(s) + eps, -1, 1)``, ``eps ~ N(0, policy_noise^2)`` per action dimension (``pi(s)`` when 0).
    The clip passes no gradient through saturated dimensions (``jnp.clip``, as the reference)."""
    action = policy(params, obs)
    if cfg.ddpg.policy_noise == 0.0:
        return action
    return jnp.clip(action + cfg.ddpg.policy_noise * jax.random.normal(key, action.shape), -1.0, 1.0)


def actor_losses(actor_params, critic_params, obs, key, cfg: Config) -> jax.Array:
    """Per-sample actor loss ``-Q(s, clip(pi(s) + eps))``."""
    return -common.q_value(critic_params, obs, noisy_policy(actor_params, obs, key, cfg))


def td_targets(target_params, actor_params, next_obs, reward, discount, key, cfg: Config) -> jax.Array:
    """``r + gamma * d * Q_target(s', clip(pi(s') + eps'))``."""
    next_q = common.q_value(target_params, next_obs, noisy_policy(actor_params, next_obs, key, cfg))
    return jax.lax.stop_gradient(reward + cfg.gamma * discount * next_q)


def diagnostic_losses(state: DDPGState, batch: Batch, stats: ObsStats, key, cfg: Config):
    """Per-example losses for gradient-interference probes (see sac.diagnostic_losses)."""
    obs, next_obs = common.normalize(batch.obs, stats), common.normalize(batch.next_obs, stats)
    k_actor, k_next = jax.random.split(key)
    target_q = td_targets(state.target, state.actor.params, next_obs, batch.reward, batch.discount, k_next, cfg)
    examples = {"obs": obs, "action": batch.action, "target": target_q,
                "key": jax.random.split(k_actor, obs.shape[0])}

    def actor_fn(params, ex):
        return actor_losses(params, state.critic.params, ex["obs"][None], ex["key"], cfg)[0]

    def critic_fn(params, ex):
        return common.critic_loss(params, ex["obs"][None], ex["action"][None], ex["target"][None])[0]

    return actor_fn, critic_fn, examples


def update_step(state: DDPGState, batch: Batch, stats: ObsStats, cfg: Config):
    obs, next_obs = common.normalize(batch.obs, stats), common.normalize(batch.next_obs, stats)
    key, k_actor, k_next = jax.random.split(state.key, 3)

    critic_now = common.bind(cfg, state.critic.params, state.critic, fixed=True)

    def actor_loss_fn(params):
        return actor_losses(common.bind(cfg, params, state.actor), critic_now, obs, k_actor, cfg).mean()

    actor_loss, actor_grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
    actor, actor_grad_norm = common.step_module(cfg, state.actor, actor_grads)

    target_q = td_targets(common.bind(cfg, state.target, state.critic, fixed=True),
                          common.bind(cfg, actor.params, actor, fixed=True),
                          next_obs, batch.reward, batch.discount, k_next, cfg)
    (critic_loss, q_mean), critic_grads = jax.value_and_grad(
        lambda p: common.critic_loss(common.bind(cfg, p, state.critic), obs, batch.action, target_q), has_aux=True)(
        state.critic.params)
    critic, critic_grad_norm = common.step_module(cfg, state.critic, critic_grads)
    target = common.polyak(state.target, critic.params, cfg.tau)

    metrics = dict(critic_loss=critic_loss, actor_loss=actor_loss, q_mean=q_mean,
                   actor_grad_norm=actor_grad_norm, critic_grad_norm=critic_grad_norm)
    return DDPGState(actor, critic, target, key), metrics


def update(state: DDPGState, batches: Batch, stats: ObsStats, cfg: Config):
    return common.scan_updates(update_step, state, batches, stats, cfg)
