"""DrQ-v2 from pixels with statically sparse networks (PAPER.md §6; Yarats et al. 2021).

Three sparse modules, each with its own mask and Adam state:

* ``encoder``: 4 conv layers x 32 channels (3x3, strides 2,1,1,1, ReLU) on ``frames/255 - 0.5``
  (:func:`sparserl.networks.conv_encoder`); trained by the critic loss only.
* ``actor``: its trunk ``Linear(50) + LayerNorm + tanh`` on the (stop-gradient) encoder features,
  an MLP or SimBa encoder of width ``actor.width``, and a ``tanh(Dense)`` mean. Exploration noise
  has a scheduled std (``drqv2.std_start -> std_end`` linearly over ``drqv2.std_steps`` *agent*
  steps, counted from the run's start, as DrQ-v2's ``linear(1.0,0.1,500000)``).
* ``critic``: its own trunk and two Q networks (double Q; the target is their minimum); the
  ``H -> 1`` heads stay dense. The target critic (trunk and Qs) is a Polyak copy (tau 0.01);
  the encoder has no target copy: next observations go through the online encoder.

Initialisation as DrQ-v2's ``weight_init``: every Linear kernel (trunks, MLP layers, heads)
orthogonal with gain 1, every conv kernel orthogonal with gain sqrt(2), biases zero (SimBa blocks,
``arch=simba``, keep their own He-normal init). Noisy actions are ``mu + clip(std * N(0,1), ±c)``
clamped to ``[-1+1e-6, 1-1e-6]`` by a *straight-through* clamp (DrQ-v2's ``TruncatedNormal``): the
value is clamped, the gradient passes as if it were not, so saturated dimensions still train the actor.

One gradient step: random-shift augmentation (replicate-pad ``drqv2.aug_pad``, random crop back)
of ``obs`` and ``next_obs``; the critic and encoder step on the n-step TD loss (the buffer gives the
n-step ``reward`` and the bootstrap factor ``discount = gamma^n`` or 0); then the actor steps on
``-min(Q1, Q2)`` at its clipped-noise action, with features from the encoder *before* its step
(as DrQ-v2 does); then the target moves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparserl import networks
from sparserl.agents import common
from sparserl.agents.common import Batch, Module, ObsStats
from sparserl.config import Config

METRICS = ("critic_loss", "actor_loss", "q_mean", "std", "encoder_grad_norm", "actor_grad_norm",
           "critic_grad_norm")
SCHEDULED_EXPLORATION = True  # act() takes the agent step (the exploration std decays)
MODULES = ("encoder", "actor", "critic")


class DrQv2State(NamedTuple):
    encoder: Module
    actor: Module
    critic: Module
    target: Any  # target critic parameters (trunk and Qs)
    key: jax.Array
    step: jax.Array  # gradient steps taken (drives the std schedule inside the update)


def obs_shape(cfg: Config) -> tuple[int, int, int]:
    return (cfg.render.size, cfg.render.size, 3 * cfg.frame_stack)


def repr_dim(cfg: Config) -> int:
    return networks.conv_out_size(cfg.render.size, cfg.encoder.layers) ** 2 * cfg.encoder.channels


def init_encoder(key, in_dim: int, width: int, blocks: int, arch: str) -> dict:
    """:func:`networks.init_encoder` with DrQ-v2's init for ``arch=mlp``: every layer orthogonal
    (gain 1, zero bias; the library's MLP draws its hidden layers He-normal). SimBa is unchanged."""
    params = networks.init_encoder(key, in_dim, width, blocks, arch)
    if arch == "mlp":
        keys = jax.random.split(key, 2 * blocks + 1)  # the keys networks.init_encoder gives each layer
        for i in range(blocks):
            params[f"layer{i}"] = networks.init_dense(keys[2 * i + 1], width, width)
    return params


def init_actor_params(key, action_dim: int, cfg: Config) -> dict:
    k_trunk, k_enc, k_head = jax.random.split(key, 3)
    f = cfg.encoder.feature_dim
    return {"trunk": networks.init_trunk(k_trunk, repr_dim(cfg), f),
            "encoder": init_encoder(k_enc, f, cfg.actor.width, cfg.actor.blocks, cfg.arch),
            "mean": networks.init_dense(k_head, cfg.actor.width, action_dim)}


def init_critic_params(key, action_dim: int, cfg: Config) -> dict:
    """Trunk and two Q networks (``q0``, ``q1``: encoder on concat(features, action), dense H -> 1 head),
    keyed as :func:`networks.init_critic` keys them."""
    k_trunk, k_q = jax.random.split(key)
    f = cfg.encoder.feature_dim
    params = {"trunk": networks.init_trunk(k_trunk, repr_dim(cfg), f)}
    width, blocks = cfg.critic.width, cfg.critic.blocks
    for i, k in enumerate(jax.random.split(k_q, 2)):
        k_enc, k_head = jax.random.split(k)
        params[f"q{i}"] = {"encoder": init_encoder(k_enc, f + action_dim, width, blocks, cfg.arch),
                           "head": networks.init_dense(k_head, width, 1)}
    return params


def init(cfg: Config, obs_dim: int, action_dim: int) -> DrQv2State:
    del obs_dim  # the frame shape comes from the config
    k_enc, k_actor, k_critic, k_update = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)
    enc = networks.init_conv_encoder(k_enc, obs_shape(cfg)[-1], cfg.encoder.channels, cfg.encoder.layers)
    encoder = common.init_module(cfg, "encoder", enc, cfg.encoder.sparsity)
    actor = common.init_module(cfg, "actor", init_actor_params(k_actor, action_dim, cfg), cfg.actor.sparsity)
    critic_params = init_critic_params(k_critic, action_dim, cfg)
    critic = common.init_module(cfg, "critic", critic_params, cfg.critic.sparsity, ("q0/head", "q1/head"))
    return DrQv2State(encoder, actor, critic, common.copy_tree(critic.params), k_update, jnp.zeros((), jnp.int32))


def policy_params(state: DrQv2State) -> dict:
    """What :func:`act` needs: the encoder's and the actor's parameters."""
    return {"encoder": state.encoder.params, "actor": common.bound(state.actor)}


def schedule_std(cfg: Config, agent_step) -> jax.Array:
    """Exploration std at ``agent_step``: linear from ``std_start`` (step 0) to ``std_end`` (step
    ``std_steps``), then constant (DrQ-v2's ``linear(init, final, duration)`` of its global step)."""
    d = cfg.drqv2
    frac = jnp.clip(jnp.asarray(agent_step, jnp.float32) / d.std_steps, 0.0, 1.0)
    return (1.0 - frac) * d.std_start + frac * d.std_end


def mean_action(actor_params, features) -> jax.Array:
    h = networks.encoder(actor_params["encoder"], networks.trunk(actor_params["trunk"], features))
    return jnp.tanh(networks.dense(actor_params["mean"], h))


def q_values(critic_params, features, action) -> jax.Array:
    """Both Q-values, shape (2, batch)."""
    h = networks.trunk(critic_params["trunk"], features)
    qs = {k: v for k, v in critic_params.items() if k != "trunk"}
    return networks.critic(qs, h, action)


CLAMP_EPS = 1e-6  # DrQ-v2's TruncatedNormal clamps samples to [-1 + eps, 1 - eps]


def straight_through_clamp(x: jax.Array, low: float = -1.0 + CLAMP_EPS, high: float = 1.0 - CLAMP_EPS) -> jax.Array:
    """The value of ``clip(x, low, high)`` with the gradient of ``x`` (identity): DrQ-v2's
    ``x - x.detach() + clamped.detach()``."""
    return x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(jnp.clip(x, low, high))


def _noisy(mu, std, key, clip: float | None) -> jax.Array:
    noise = std * jax.random.normal(key, mu.shape)
    if clip is not None:
        noise = jnp.clip(noise, -clip, clip)
    return straight_through_clamp(mu + noise)


def act(params, obs: jax.Array, key: jax.Array, deterministic: bool, cfg: Config, step=0) -> jax.Array:
    """Action for uint8 frames ``obs`` (batch, H, W, C); ``step`` is the agent step (std schedule)."""
    mu = mean_action(params["actor"], networks.conv_encoder(params["encoder"], obs))
    if deterministic:
        return mu
    return _noisy(mu, schedule_std(cfg, step), key, None)


def random_shift(obs: jax.Array, key: jax.Array, pad: int) -> jax.Array:
    """DrQ's augmentation: replicate-pad each image by ``pad`` and crop back at a random offset
    (independent per sample, integer pixels)."""
    if pad == 0:
        return obs
    n, h, w, c = obs.shape
    padded = jnp.pad(obs, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def update_agent_step(state: DrQv2State, cfg: Config) -> jax.Array:
    """The agent step of the update call about to run: the loop calls the update (``utd`` gradient
    steps) at agent steps ``warmup_steps + k * update_every``, k = 0, 1, ..."""
    return cfg.warmup_steps + (state.step // cfg.utd) * cfg.update_every


def _train_std(state: DrQv2State, cfg: Config) -> jax.Array:
    return schedule_std(cfg, update_agent_step(state, cfg))


def critic_loss_fn(enc_params, critic_params, obs, action, target_q):
    features = networks.conv_encoder(enc_params, obs)
    qs = q_values(critic_params, features, action)
    return jnp.square(qs - target_q[None]).mean(1).sum(), (qs.mean(), features)


def td_targets(state: DrQv2State, next_features, reward, discount, std, key, cfg: Config) -> jax.Array:
    actor_params = common.bind(cfg, state.actor.params, state.actor, fixed=True)
    next_action = _noisy(mean_action(actor_params, next_features), std, key, cfg.drqv2.std_clip)
    next_q = q_values(common.bind(cfg, state.target, state.critic, fixed=True), next_features, next_action).min(0)
    return jax.lax.stop_gradient(reward + discount * next_q)


def actor_losses(actor_params, critic_params, features, std, key, cfg: Config) -> jax.Array:
    action = _noisy(mean_action(actor_params, features), std, key, cfg.drqv2.std_clip)
    return -q_values(critic_params, features, action).min(0)


def update_step(state: DrQv2State, batch: Batch, stats: ObsStats, cfg: Config):
    del stats  # pixels are scaled inside the encoder, never normalised by running statistics
    key, k_aug, k_aug_next, k_target, k_actor = jax.random.split(state.key, 5)
    pad = cfg.drqv2.aug_pad
    obs, next_obs = random_shift(batch.obs, k_aug, pad), random_shift(batch.next_obs, k_aug_next, pad)
    std = _train_std(state, cfg)

    next_features = jax.lax.stop_gradient(networks.conv_encoder(state.encoder.params, next_obs))
    target_q = td_targets(state, next_features, batch.reward, batch.discount, std, k_target, cfg)
    (critic_loss, (q_mean, features)), (enc_grads, critic_grads) = jax.value_and_grad(
        lambda e, c: critic_loss_fn(e, common.bind(cfg, c, state.critic), obs, batch.action, target_q),
        argnums=(0, 1), has_aux=True)(state.encoder.params, state.critic.params)
    encoder, encoder_grad_norm = common.step_module(cfg, state.encoder, enc_grads)
    critic, critic_grad_norm = common.step_module(cfg, state.critic, critic_grads)

    features = jax.lax.stop_gradient(features)
    actor_loss, actor_grads = jax.value_and_grad(
        lambda p: actor_losses(common.bind(cfg, p, state.actor), common.bind(cfg, critic.params, critic, fixed=True),
                               features, std, k_actor, cfg).mean())(state.actor.params)
    actor, actor_grad_norm = common.step_module(cfg, state.actor, actor_grads)
    target = common.polyak(state.target, critic.params, cfg.tau)

    metrics = {"critic_loss": critic_loss, "actor_loss": actor_loss, "q_mean": q_mean, "std": std,
               "encoder_grad_norm": encoder_grad_norm, "actor_grad_norm": actor_grad_norm,
               "critic_grad_norm": critic_grad_norm}
    return DrQv2State(encoder, actor, critic, target, key, state.step + 1), metrics


def update(state: DrQv2State, batches: Batch, stats: ObsStats, cfg: Config):
    """K gradient steps, unrolled in one jitted call (not a ``lax.scan``: XLA's CPU convolutions ran
    ~3x slower inside the scan's loop body than outside it — measured, see docs/visual.md)."""
    all_metrics = []
    for k in range(batches.reward.shape[0]):
        state, metrics = update_step(state, jax.tree_util.tree_map(lambda x, k=k: x[k], batches), stats, cfg)
        all_metrics.append(metrics)
    return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *all_metrics)


def diagnostic_features(state: DrQv2State, batch: Batch) -> dict:
    """``{prefix: (encoder_params, inputs)}`` for the feature diagnostics (srank, dormant units), plus
    the conv encoder's own captures under ``"encoder"``: ``(capture, trunk_outputs)``."""
    capture: dict = {}
    features = networks.conv_encoder(state.encoder.params, batch.obs, capture)
    actor_in = networks.trunk(state.actor.params["trunk"], features)
    critic_in = jnp.concatenate([networks.trunk(state.critic.params["trunk"], features), batch.action], -1)
    return {"actor": (state.actor.params["encoder"], actor_in),
            "critic": (state.critic.params["q0"]["encoder"], critic_in),
            "encoder": (capture, actor_in)}


def encoder_loss(state: DrQv2State, batch: Batch, stats: ObsStats, key, cfg: Config):
    """The critic's TD loss as a function of the encoder's parameters (the encoder is trained by it
    alone), on un-augmented observations with the actor, critic and targets held fixed: the loss whose
    dense gradient RigL regrows the encoder's kernels by."""
    del stats
    std = _train_std(state, cfg)
    next_features = networks.conv_encoder(state.encoder.params, batch.next_obs)
    target_q = td_targets(state, next_features, batch.reward, batch.discount, std, key, cfg)
    return lambda enc_params: critic_loss_fn(enc_params, state.critic.params, batch.obs, batch.action, target_q)[0]


def diagnostic_losses(state: DrQv2State, batch: Batch, stats: ObsStats, key, cfg: Config):
    """Per-example losses for gradient-interference probes (encoder held fixed, no augmentation)."""
    del stats
    k_target, k_actor = jax.random.split(key)
    std = _train_std(state, cfg)
    features = networks.conv_encoder(state.encoder.params, batch.obs)
    next_features = networks.conv_encoder(state.encoder.params, batch.next_obs)
    target_q = td_targets(state, next_features, batch.reward, batch.discount, std, k_target, cfg)
    keys = jax.random.split(k_actor, features.shape[0])
    examples = {"features": features, "action": batch.action, "target": target_q, "key": keys}

    def actor_fn(params, ex):
        return actor_losses(params, state.critic.params, ex["features"][None], std, ex["key"], cfg)[0]

    def critic_fn(params, ex):
        qs = q_values(params, ex["features"][None], ex["action"][None])
        return jnp.square(qs - ex["target"][None, None]).mean(1).sum()

    return actor_fn, critic_fn, examples
