"""ObGD — the overshooting-bounded gradient descent of Stream AC(λ) (Elsayed et al. 2024; PAPER.md §7).

Streaming RL updates on one transition at a time. ObGD keeps an eligibility trace per parameter and
bounds the step so that a single update cannot overshoot its TD target:

    e ← γλ e + g                      (g: gradient of the quantity to *increase*, e.g. V(s) or log π)
    M = α κ max(|δ|, 1) ‖e‖₁           (‖e‖₁ summed over every parameter of the module)
    step = α / M  if M > 1  else  α
    θ ← θ + step · δ · e

so that ``step · κ · max(|δ|,1) · ‖e‖₁ ≤ 1`` always (the "effective step" is at most 1/κ per unit of
TD error). The adaptive variant divides the trace by ``sqrt(v̂ + ε)``, ``v̂`` a bias-corrected running
average of (δe)² (β₂ = 0.999), both in ``‖·‖₁`` and in the update (ε = 1e-8 inside the root, as the
reference's ``AdaptiveObGD``: the divisor is at least 1e-4).

Both are optax ``GradientTransformationExtraArgs``: ``update(grads, state, params, delta=δ)``
returns the *ascent* update ``step·δ·e`` (apply it with ``optax.apply_updates``). The traces live in
the optimizer state; :func:`reset_traces` zeroes them (at the end of every episode) wherever they
sit inside a chained state. The last step size is kept in the state for diagnostics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class ObGDState(NamedTuple):
    trace: PyTree  # eligibility trace, shaped like the parameters
    step_size: jax.Array  # the step used by the last update (α when the bound was inactive)


class AdaptiveObGDState(NamedTuple):
    trace: PyTree
    v: PyTree  # running average of (δ e)², per parameter
    count: jax.Array  # updates so far (bias correction of v)
    step_size: jax.Array


def _l1(tree) -> jax.Array:
    return sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree))


def bounded_step(alpha: float, kappa: float, delta: jax.Array, trace_l1: jax.Array) -> jax.Array:
    """``α / M`` if ``M = α κ max(|δ|,1) ‖e‖₁ > 1``, else ``α``."""
    m = alpha * kappa * jnp.maximum(jnp.abs(delta), 1.0) * trace_l1
    return jnp.where(m > 1.0, alpha / jnp.maximum(m, 1e-30), alpha)


def obgd(alpha: float = 1.0, kappa: float = 2.0, gamma: float = 0.99,
         lamda: float = 0.8) -> optax.GradientTransformationExtraArgs:
    """ObGD over eligibility traces. Call ``update(grads, state, params, delta=δ)``."""

    def init(params):
        return ObGDState(jax.tree_util.tree_map(jnp.zeros_like, params), jnp.asarray(alpha, jnp.float32))

    def update(grads, state, params=None, *, delta, **extra):
        del params, extra
        trace = jax.tree_util.tree_map(lambda e, g: gamma * lamda * e + g, state.trace, grads)
        step = bounded_step(alpha, kappa, delta, _l1(trace))
        updates = jax.tree_util.tree_map(lambda e: (step * delta) * e, trace)
        return updates, ObGDState(trace, step.astype(jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update)


def adaptive_obgd(alpha: float = 1.0, kappa: float = 2.0, gamma: float = 0.99, lamda: float = 0.8,
                  beta2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """Adaptive ObGD: the trace is scaled per parameter by ``1/sqrt(v̂ + eps)`` (eps inside the root,
    as the reference), v̂ the bias-corrected running average of ``(δe)²``; the bound uses the scaled
    trace."""

    def init(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
        return AdaptiveObGDState(zeros(), zeros(), jnp.zeros((), jnp.int32), jnp.asarray(alpha, jnp.float32))

    def update(grads, state, params=None, *, delta, **extra):
        del params, extra
        count = state.count + 1
        trace = jax.tree_util.tree_map(lambda e, g: gamma * lamda * e + g, state.trace, grads)
        v = jax.tree_util.tree_map(lambda v, e: beta2 * v + (1 - beta2) * jnp.square(delta * e), state.v, trace)
        correction = 1.0 - beta2 ** count.astype(jnp.float32)
        scaled = jax.tree_util.tree_map(lambda e, v: e / jnp.sqrt(v / correction + eps), trace, v)
        step = bounded_step(alpha, kappa, delta, _l1(scaled))
        updates = jax.tree_util.tree_map(lambda s: (step * delta) * s, scaled)
        return updates, AdaptiveObGDState(trace, v, count, step.astype(jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update)


def _is_obgd_state(x) -> bool:
    return isinstance(x, (ObGDState, AdaptiveObGDState))


def reset_traces(opt_state, done: jax.Array | bool = True):
    """Zero the eligibility traces (where ``done``) of every ObGD state inside ``opt_state``."""

    def reset(s):
        if not _is_obgd_state(s):
            return s
        trace = jax.tree_util.tree_map(lambda e: jnp.where(done, jnp.zeros_like(e), e), s.trace)
        return s._replace(trace=trace)

    return jax.tree_util.tree_map(reset, opt_state, is_leaf=_is_obgd_state)


def find_states(opt_state) -> list:
    """The ObGD states inside a (chained) optimizer state."""
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=_is_obgd_state)
    return [x for x in leaves if _is_obgd_state(x)]
