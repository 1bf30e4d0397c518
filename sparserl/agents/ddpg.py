"""DDPG with statically sparse SimBa networks (PAPER.md §3).

Deterministic ``tanh(Dense)`` actor on the SimBa encoder, Gaussian exploration noise (std 0.1),
the same critic as SAC. One gradient step updates the actor, then the critic (next actions from the
*new* online actor — like our SAC there is no target actor), then the Polyak target critic.
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


def init_actor_params(key, obs_dim: int, action_dim: int, cfg: Config) -> dict:
    k_enc, k_head = jax.random.split(key)
    return {"encoder": networks.init_encoder(k_enc, obs_dim, cfg.actor.width, cfg.actor.blocks, cfg.arch),
            "action": networks.init_dense(k_head, cfg.actor.width, action_dim)}


def init(cfg: Config, obs_dim: int, action_dim: int) -> DDPGState:
    k_actor, k_critic = jax.random.split(jax.random.PRNGKey(cfg.seed))
    actor = common.init_module(cfg, "actor", init_actor_params(k_actor, obs_dim, action_dim, cfg), cfg.actor.sparsity)
    critic = common.init_critic(cfg, k_critic, obs_dim, action_dim)
    return DDPGState(actor, critic, common.copy_tree(critic.params))


def policy(params, obs) -> jax.Array:
    return jnp.tanh(networks.dense(params["action"], networks.encoder(params["encoder"], obs)))


def act(actor_params, obs: jax.Array, key: jax.Array, deterministic: bool, cfg: Config) -> jax.Array:
    action = policy(actor_params, obs)
    if deterministic:
        return action
    return jnp.clip(action + cfg.ddpg.noise_std * jax.random.normal(key, action.shape), -1.0, 1.0)


def actor_losses(actor_params, critic_params, obs) -> jax.Array:
    """Per-sample actor loss ``-Q(s, pi(s))``."""
    return -common.q_value(critic_params, obs, policy(actor_params, obs))


def td_targets(target_params, actor_params, next_obs, reward, discount, cfg: Config) -> jax.Array:
    next_q = common.q_value(target_params, next_obs, policy(actor_params, next_obs))
    return jax.lax.stop_gradient(reward + cfg.gamma * discount * next_q)


def diagnostic_losses(state: DDPGState, batch: Batch, stats: ObsStats, key, cfg: Config):
    """Per-example losses for gradient-interference probes (see sac.diagnostic_losses)."""
    del key
    obs, next_obs = common.normalize(batch.obs, stats), common.normalize(batch.next_obs, stats)
    target_q = td_targets(state.target, state.actor.params, next_obs, batch.reward, batch.discount, cfg)
    examples = {"obs": obs, "action": batch.action, "target": target_q}

    def actor_fn(params, ex):
        return actor_losses(params, state.critic.params, ex["obs"][None])[0]

    def critic_fn(params, ex):
        return common.critic_loss(params, ex["obs"][None], ex["action"][None], ex["target"][None])[0]

    return actor_fn, critic_fn, examples


def update_step(state: DDPGState, batch: Batch, stats: ObsStats, cfg: Config):
    obs, next_obs = common.normalize(batch.obs, stats), common.normalize(batch.next_obs, stats)

    def actor_loss_fn(params):
        return actor_losses(params, state.critic.params, obs).mean()

    actor_loss, actor_grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
    actor, actor_grad_norm = common.step_module(cfg, state.actor, actor_grads)

    target_q = td_targets(state.target, actor.params, next_obs, batch.reward, batch.discount, cfg)
    (critic_loss, q_mean), critic_grads = jax.value_and_grad(common.critic_loss, has_aux=True)(
        state.critic.params, obs, batch.action, target_q)
    critic, critic_grad_norm = common.step_module(cfg, state.critic, critic_grads)
    target = common.polyak(state.target, critic.params, cfg.tau)

    metrics = dict(critic_loss=critic_loss, actor_loss=actor_loss, q_mean=q_mean,
                   actor_grad_norm=actor_grad_norm, critic_grad_norm=critic_grad_norm)
    return DDPGState(actor, critic, target), metrics


def update(state: DDPGState, batches: Batch, stats: ObsStats, cfg: Config):
    return common.scan_updates(update_step, state, batches, stats, cfg)
