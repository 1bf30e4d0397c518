"""Soft Actor-Critic with statically sparse SimBa networks (PAPER.md §3).

Tanh-Gaussian actor (mean and log-std heads; log-std squashed into [min, max]); critic Q(s, a) on
concat(obs, action), a single Q on DMC (``critic.cdq=true`` for clipped double-Q); learned
temperature (init 0.01, target entropy -0.5|A|). One gradient step updates, in order: the actor,
the temperature, the critic (with next actions from the *new* actor), then the Polyak target.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparserl import networks
from sparserl.agents import common
from sparserl.agents.common import Batch, Module, ObsStats
from sparserl.config import Config

METRICS = ("critic_loss", "actor_loss", "temperature", "entropy", "q_mean",
           "actor_grad_norm", "critic_grad_norm")


class SACState(NamedTuple):
    actor: Module
    critic: Module
    target: Any  # target critic parameters (masked like the critic; Polyak keeps them sparse)
    log_temp: jax.Array
    temp_opt_state: Any
    key: jax.Array


def init_actor_params(key, obs_dim: int, action_dim: int, cfg: Config) -> dict:
    k_enc, k_mean, k_std = jax.random.split(key, 3)
    width = cfg.actor.width
    return {"encoder": networks.init_encoder(k_enc, obs_dim, width, cfg.actor.blocks, cfg.arch),
            "mean": networks.init_dense(k_mean, width, action_dim),
            "log_std": networks.init_dense(k_std, width, action_dim)}


def init(cfg: Config, obs_dim: int, action_dim: int) -> SACState:
    k_actor, k_critic, k_update = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    actor = common.init_module(cfg, "actor", init_actor_params(k_actor, obs_dim, action_dim, cfg), cfg.actor.sparsity)
    critic = common.init_critic(cfg, k_critic, obs_dim, action_dim)
    log_temp = jnp.log(jnp.float32(cfg.sac.temperature_init))
    return SACState(actor, critic, common.copy_tree(critic.params), log_temp, optax.adam(cfg.lr).init(log_temp), k_update)


def _distribution(params, obs, cfg: Config):
    h = networks.encoder(params["encoder"], obs)
    mean = networks.dense(params["mean"], h)
    lo, hi = cfg.sac.log_std_min, cfg.sac.log_std_max
    log_std = lo + 0.5 * (hi - lo) * (jnp.tanh(networks.dense(params["log_std"], h)) + 1.0)
    return mean, log_std


def sample_action(params, obs, key, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Reparameterised tanh-Gaussian sample and its log-probability."""
    mean, log_std = _distribution(params, obs, cfg)
    noise = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * noise
    gaussian_logp = (-0.5 * jnp.square(noise) - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    # log(1 - tanh(u)^2) written stably
    squash = (2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))).sum(-1)
    return jnp.tanh(u), gaussian_logp - squash


def act(actor_params, obs: jax.Array, key: jax.Array, deterministic: bool, cfg: Config) -> jax.Array:
    if deterministic:
        return jnp.tanh(_distribution(actor_params, obs, cfg)[0])
    return sample_action(actor_params, obs, key, cfg)[0]


def actor_losses(actor_params, critic_params, obs, key, temp, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Per-sample actor loss ``temp * log pi(a|s) - Q(s, a)`` and the log-probabilities."""
    action, logp = sample_action(actor_params, obs, key, cfg)
    return temp * logp - common.q_value(critic_params, obs, action), logp


def td_targets(target_params, actor_params, next_obs, reward, discount, key, temp, cfg: Config) -> jax.Array:
    """Soft TD targets ``r + gamma * d * (Q_target(s', a') - temp * log pi(a'|s'))``, ``a' ~ pi(s')``."""
    next_action, next_logp = sample_action(actor_params, next_obs, key, cfg)
    next_q = common.q_value(target_params, next_obs, next_action)
    return jax.lax.stop_gradient(reward + cfg.gamma * discount * (next_q - temp * next_logp))


def diagnostic_losses(state: SACState, batch: Batch, stats: ObsStats, key, cfg: Config):
    """Per-example losses for gradient-interference probes: ``(actor_fn, critic_fn, examples)`` where
    each fn maps ``(params, example) -> scalar`` with the other networks and the targets held fixed."""
    obs, next_obs = common.normalize(batch.obs, stats), common.normalize(batch.next_obs, stats)
    k_actor, k_next = jax.random.split(key)
    temp = jnp.exp(state.log_temp)
    target_q = td_targets(state.target, state.actor.params, next_obs, batch.reward, batch.discount, k_next, temp, cfg)
    keys = jax.random.split(k_actor, obs.shape[0])
    examples = {"obs": obs, "action": batch.action, "target": target_q, "key": keys}

    def actor_fn(params, ex):
        return actor_losses(params, state.critic.params, ex["obs"][None], ex["key"], temp, cfg)[0][0]

    def critic_fn(params, ex):
        return common.critic_loss(params, ex["obs"][None], ex["action"][None], ex["target"][None])[0]

    return actor_fn, critic_fn, examples


def update_step(state: SACState, batch: Batch, stats: ObsStats, cfg: Config):
    obs, next_obs = common.normalize(batch.obs, stats), common.normalize(batch.next_obs, stats)
    key, k_actor, k_next = jax.random.split(state.key, 3)
    temp = jnp.exp(state.log_temp)

    critic_now = common.bind(cfg, state.critic.params, state.critic, fixed=True)

    def actor_loss_fn(params):
        losses, logp = actor_losses(common.bind(cfg, params, state.actor), critic_now, obs, k_actor, temp, cfg)
        return losses.mean(), -logp.mean()

    (actor_loss, entropy), actor_grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
    actor, actor_grad_norm = common.step_module(cfg, state.actor, actor_grads)

    target_entropy = -cfg.sac.target_entropy_scale * batch.action.shape[-1]
    temp_grad = jax.grad(lambda lt: jnp.exp(lt) * (entropy - target_entropy))(state.log_temp)
    temp_updates, temp_opt_state = optax.adam(cfg.lr).update(temp_grad, state.temp_opt_state)
    log_temp = optax.apply_updates(state.log_temp, temp_updates)

    target_q = td_targets(common.bind(cfg, state.target, state.critic, fixed=True),
                          common.bind(cfg, actor.params, actor, fixed=True),
                          next_obs, batch.reward, batch.discount, k_next, jnp.exp(log_temp), cfg)
    (critic_loss, q_mean), critic_grads = jax.value_and_grad(
        lambda p: common.critic_loss(common.bind(cfg, p, state.critic), obs, batch.action, target_q), has_aux=True)(
        state.critic.params)
    critic, critic_grad_norm = common.step_module(cfg, state.critic, critic_grads)
    target = common.polyak(state.target, critic.params, cfg.tau)

    metrics = dict(critic_loss=critic_loss, actor_loss=actor_loss, temperature=jnp.exp(log_temp),
                   entropy=entropy, q_mean=q_mean, actor_grad_norm=actor_grad_norm,
                   critic_grad_norm=critic_grad_norm)
    return SACState(actor, critic, target, log_temp, temp_opt_state, key), metrics


def update(state: SACState, batches: Batch, stats: ObsStats, cfg: Config):
    return common.scan_updates(update_step, state, batches, stats, cfg)
