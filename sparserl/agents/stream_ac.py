"""Stream AC(λ) (Elsayed et al. 2024; PAPER.md §7): streaming actor-critic with ObGD, one update per
env step, no replay buffer, no batches, no target network.

Read top to bottom:

1. Networks: ``blocks`` hidden layers ``Linear → LayerNorm (no affine) → LeakyReLU(0.01)`` of width
   ``width``; the actor ends in a mean head and a std head (``softplus``), the critic in a value head.
   Kernels are (in, out), initialised uniformly in ``±1/sqrt(fan_in)``, biases 0.
2. Three ways to be sparse, combinable: ``init=dense``; ``init=sparse_init`` (the method's own sparse
   initialisation: ``stream.sparse_init_fraction`` (0.9) of each output unit's fan-in zeroed at
   init, then trainable); and a static mask (``actor.sparsity`` / ``critic.sparsity``) drawn by
   :mod:`sparserl.sparsity` exactly as for the other agents (per-module keys from the mask seed,
   ERK by default, the critic's value head dense) that keeps the pruned weights at zero forever:
   gradients are masked before they enter the traces and the ObGD update is masked again.
3. Inputs: observations normalised by Welford running statistics (updated with every observation,
   as the reference's wrapper does; float32 on the device, the reference's are float64 in numpy,
   see docs/streaming.md), with the reference's time feature appended: ``max(t-1, 0)/T - 0.5`` for
   the observation ``t`` agent steps into the episode (``T`` the episode's time limit in agent
   steps; the reset observation and the first step's both read -0.5, as the reference's
   ``AddTimeInfo``); rewards divided by the running std of the discounted return
   ``z ← γ(1-done)z + r`` (the reference's ``ScaleReward``: the trace restarts *at* the episode's
   last step, which contributes its own reward only).
4. The per-step update (:func:`step`, one jitted call per env step): TD error
   ``δ = r + γ(1-done)V(s') - V(s)`` — with the time feature, a time-limit end is part of the
   state and is treated as terminal, as in the reference; the critic's trace gets ``∇V(s)``, the
   actor's ``∇[log π(a|s) + c·sign(δ)·H(π(s))]``; both ObGD steps use the same δ; traces are
   reset when the episode ends. Then the next action is sampled on ``s'``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparserl import networks, obgd, sparsity
from sparserl.agents import common
from sparserl.agents.common import Module, init_module
from sparserl.config import Config

METRICS = ("td_error", "abs_td_error", "value", "entropy", "actor_step_size", "critic_step_size")
VALUE_HEAD = "value"


# ----------------------------------------------------------------------------------------------
# 1. Networks


def init_dense(key, in_dim: int, out_dim: int) -> dict:
    bound = 1.0 / math.sqrt(in_dim)
    return {"kernel": jax.random.uniform(key, (in_dim, out_dim), jnp.float32, -bound, bound),
            "bias": jnp.zeros((out_dim,), jnp.float32)}


def init_mlp(key, in_dim: int, width: int, layers: int, heads: dict[str, int]) -> dict:
    keys = jax.random.split(key, layers + len(heads))
    params = {}
    for i in range(layers):
        params[f"layer{i}"] = init_dense(keys[i], in_dim if i == 0 else width, width)
    for j, (name, out) in enumerate(heads.items()):
        params[name] = init_dense(keys[layers + j], width, out)
    return params


def layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm without affine parameters (as ``F.layer_norm`` in the reference)."""
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)


def linear(p: dict, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias``. A kernel bound for sparse compute (``common.bind``) multiplies its kept
    weights only (:func:`sparserl.networks.dense`); a masked-dense one is the plain product (batch 1:
    none of the batched matmul's backend choices apply)."""
    if isinstance(p["kernel"], sparsity.SparseKernel):
        return networks.dense(p, x)
    return x @ p["kernel"] + p["bias"]


def trunk(params: dict, x: jax.Array) -> jax.Array:
    i = 0
    while f"layer{i}" in params:
        x = jax.nn.leaky_relu(layer_norm(linear(params[f"layer{i}"], x)), 0.01)
        i += 1
    return x


def policy(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gaussian policy: mean and std (softplus)."""
    h = trunk(params, x)
    return linear(params["mu"], h), jax.nn.softplus(linear(params["std"], h))


def value(params: dict, x: jax.Array) -> jax.Array:
    return linear(params[VALUE_HEAD], trunk(params, x))[..., 0]


# ----------------------------------------------------------------------------------------------
# 2. Initialisation: dense, sparse_init, static mask


def sparse_init(key, params: dict, fraction: float) -> dict:
    """Zero ``ceil(fraction * fan_in)`` random inputs of every output unit of every kernel (trainable
    afterwards: no mask is kept)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = []
    for i, x in enumerate(leaves):
        if x.ndim == 2:
            fan_in, fan_out = x.shape
            zeros = math.ceil(fraction * fan_in)
            keys = jax.random.split(jax.random.fold_in(key, i), fan_out)
            # per output unit (column), a random permutation's first `zeros` inputs are zeroed
            ranks = jax.vmap(functools.partial(jax.random.permutation, x=fan_in))(keys).T  # (fan_in, fan_out)
            x = jnp.where(ranks < zeros, 0.0, x)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def make_optimizer(cfg: Config, kappa: float, mask) -> optax.GradientTransformationExtraArgs:
    """ObGD (or adaptive ObGD) between two masks: pruned weights get no trace and no update."""
    s = cfg.stream
    core = (obgd.adaptive_obgd(s.alpha, kappa, cfg.gamma, s.lamda, s.beta2) if s.adaptive
            else obgd.obgd(s.alpha, kappa, cfg.gamma, s.lamda))
    return optax.chain(sparsity.keep_masked(mask), core, sparsity.keep_masked(mask))


class Welford(NamedTuple):
    """Running sample mean/variance (Welford), as the reference's ``SampleMeanStd``."""

    mean: jax.Array
    p: jax.Array  # sum of squared deviations
    count: jax.Array

    @staticmethod
    def zeros(shape=()) -> Welford:
        return Welford(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((), jnp.float32))

    def update(self, x: jax.Array) -> Welford:
        count = self.count + 1
        mean = self.mean + (x - self.mean) / count
        return Welford(mean, self.p + (x - self.mean) * (x - mean), count)

    @property
    def var(self) -> jax.Array:
        return jnp.where(self.count < 2, jnp.ones_like(self.p), self.p / jnp.maximum(self.count - 1, 1))


class State(NamedTuple):
    actor: Module
    critic: Module
    obs_stats: Welford
    return_stats: Welford
    return_trace: jax.Array  # discounted return of the current episode (reward scaling)
    obs: jax.Array  # the current normalised observation, time feature appended
    action: jax.Array  # the action taken in it
    t: jax.Array  # agent steps into the episode
    step: jax.Array  # agent steps so far (the action RNG is folded with it)
    key: jax.Array


def init(cfg: Config, obs_dim: int, action_dim: int) -> State:
    key = jax.random.PRNGKey(cfg.seed)
    k_actor, k_critic, k_sparse_a, k_sparse_c, k_act = jax.random.split(key, 5)
    in_dim = obs_dim + 1  # time feature
    actor = init_mlp(k_actor, in_dim, cfg.actor.width, cfg.actor.blocks, {"mu": action_dim, "std": action_dim})
    critic = init_mlp(k_critic, in_dim, cfg.critic.width, cfg.critic.blocks, {VALUE_HEAD: 1})
    if cfg.init == "sparse_init":
        actor = sparse_init(k_sparse_a, actor, cfg.stream.sparse_init_fraction)
        critic = sparse_init(k_sparse_c, critic, cfg.stream.sparse_init_fraction)
    actor_m = init_module(cfg, "actor", actor, cfg.actor.sparsity,
                          make_optimizer=lambda m: make_optimizer(cfg, cfg.stream.kappa_policy, m))
    critic_m = init_module(cfg, "critic", critic, cfg.critic.sparsity, (VALUE_HEAD,),
                           make_optimizer=lambda m: make_optimizer(cfg, cfg.stream.kappa_value, m))
    return State(actor_m, critic_m, Welford.zeros((obs_dim,)), Welford.zeros(), jnp.zeros(()),
                 jnp.zeros((in_dim,)), jnp.zeros((action_dim,)), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32), k_act)


# ----------------------------------------------------------------------------------------------
# 3. Inputs


def time_feature(t: jax.Array, time_limit: int) -> jax.Array:
    """The reference's (``AddTimeInfo``) feature of the observation ``t`` agent steps into an episode:
    -0.5 at the reset and after the first step, then ``(t-1)/T - 0.5`` (it appends the episode time
    *before* advancing it by ``1/T``)."""
    return (jnp.maximum(t - 1, 0) / time_limit - 0.5).astype(jnp.float32)


def observe(state: State, obs_raw: jax.Array, t: jax.Array, cfg: Config, time_limit: int) -> tuple[State, jax.Array]:
    """Update the observation statistics with ``obs_raw``; return it normalised, time feature appended."""
    stats = state.obs_stats.update(obs_raw) if cfg.obs_norm else state.obs_stats
    x = (obs_raw - stats.mean) / jnp.sqrt(stats.var + 1e-8) if cfg.obs_norm else obs_raw
    x = jnp.concatenate([x, time_feature(t, time_limit)[None]])
    return state._replace(obs_stats=stats), x


def act(actor_params, x: jax.Array, key, deterministic: bool = False, cfg: Config | None = None) -> jax.Array:
    """A Gaussian sample (the mean when ``deterministic``); ``cfg`` unused (the agents' common signature)."""
    mu, std = policy(actor_params, x)
    return mu if deterministic else mu + std * jax.random.normal(key, mu.shape)


def _sample(state: State, x: jax.Array) -> jax.Array:
    return act(common.bound(state.actor), x, jax.random.fold_in(state.key, state.step))


def begin(state: State, obs_raw: jax.Array, cfg: Config, time_limit: int) -> tuple[State, jax.Array]:
    """Start an episode on the reset observation: normalise it and sample the first action."""
    state, x = observe(state, obs_raw, jnp.zeros((), jnp.int32), cfg, time_limit)
    action = _sample(state, x)
    return state._replace(obs=x, action=action, t=jnp.zeros((), jnp.int32)), action


# ----------------------------------------------------------------------------------------------
# 4. The per-step update


def gaussian_log_prob(a, mu, std):
    return -0.5 * jnp.square((a - mu) / std) - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)


def gaussian_entropy(std):
    return 0.5 + 0.5 * jnp.log(2 * jnp.pi) + jnp.log(std)


def learn(state: State, s, a, r, s_next, done, cfg: Config) -> tuple[State, dict]:
    """One Stream AC(λ) update on the transition ``(s, a, r, s')`` (``r`` already scaled)."""
    def value_of(params, x):
        return value(common.bind(cfg, params, state.critic), x)

    v, grad_v = jax.value_and_grad(value_of)(state.critic.params, s)
    v_next = value_of(state.critic.params, s_next)
    delta = jax.lax.stop_gradient(r + cfg.gamma * (1.0 - done) * v_next - v)

    def actor_objective(params):
        mu, std = policy(common.bind(cfg, params, state.actor), s)
        entropy = gaussian_entropy(std).sum()
        return gaussian_log_prob(a, mu, std).sum() + cfg.stream.entropy_coef * jnp.sign(delta) * entropy, entropy

    grad_pi, entropy = jax.grad(actor_objective, has_aux=True)(state.actor.params)

    def ascend(module: Module, grads, kappa: float) -> Module:
        tx = make_optimizer(cfg, kappa, module.mask)
        updates, opt_state = tx.update(grads, module.opt_state, module.params, delta=delta)
        params = optax.apply_updates(module.params, updates)
        # _replace: the module's other fields (its sparse-compute layouts) go through unchanged
        return module._replace(params=params, opt_state=obgd.reset_traces(opt_state, done > 0))

    actor = ascend(state.actor, grad_pi, cfg.stream.kappa_policy)
    critic = ascend(state.critic, grad_v, cfg.stream.kappa_value)
    metrics = {"td_error": delta, "abs_td_error": jnp.abs(delta), "value": v, "entropy": entropy,
               "actor_step_size": obgd.find_states(actor.opt_state)[0].step_size,
               "critic_step_size": obgd.find_states(critic.opt_state)[0].step_size}
    return state._replace(actor=actor, critic=critic), metrics


def step(state: State, transition: jax.Array, cfg: Config, time_limit: int) -> tuple[State, dict, jax.Array]:
    """One env step's work in one call: ``transition = [next_obs_raw, reward, terminated, truncated]``
    for the action in ``state``. Normalises ``s'``, scales ``r``, updates, then samples the action
    for ``s'`` (ignored by the loop when the episode ended; the next :func:`begin` starts anew)."""
    next_obs, reward, terminated, truncated = transition[:-3], transition[-3], transition[-2], transition[-1]
    done = jnp.maximum(terminated, truncated)
    t_next = state.t + 1
    state, s_next = observe(state, next_obs, t_next, cfg, time_limit)
    if cfg.stream.reward_scale:  # the reference's ScaleReward: the trace restarts at the last step itself
        trace = cfg.gamma * (1.0 - done) * state.return_trace + reward
        ret = state.return_stats.update(trace)
        r = reward / jnp.sqrt(ret.var + 1e-8)
        state = state._replace(return_stats=ret, return_trace=trace)
    else:
        r = reward
    state, metrics = learn(state, state.obs, state.action, r, s_next, done, cfg)
    action = _sample(state._replace(step=state.step + 1), s_next)
    state = state._replace(obs=s_next, action=action, t=t_next, step=state.step + 1)
    return state, metrics, action


def pack(next_obs: np.ndarray, reward: float, terminated: bool, truncated: bool) -> np.ndarray:
    """The host side of :func:`step`'s ``transition`` (one array: one transfer)."""
    return np.concatenate([np.asarray(next_obs, np.float32),
                           np.asarray([reward, float(terminated), float(truncated)], np.float32)])


def update_flops(cfg: Config, state: State, obs_dim: int, action_dim: int) -> float:
    """FLOPs of one streaming step (XLA cost analysis of the compiled :func:`step`)."""
    transition = jax.ShapeDtypeStruct((obs_dim + 3,), jnp.float32)
    compiled = jax.jit(step, static_argnames=("cfg", "time_limit")).lower(
        state, transition, cfg=cfg, time_limit=1000).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))
