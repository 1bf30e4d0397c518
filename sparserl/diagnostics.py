"""Diagnostics of representations, gradients and plasticity (PAPER.md §5), as pure functions.

Every function takes numpy or JAX arrays (or parameter pytrees) and returns Python numbers, numpy
arrays or JAX arrays; none keeps state or touches a training RNG stream. Functions whose names end
in ``_jax`` (and :func:`gradient_cosine`, :func:`per_sample_grads`) are pure ``jnp`` code that can
run inside ``jax.jit``; the others convert their result to Python floats/ints and compute in
float64 numpy where that matters.

* :func:`srank` / :func:`srank_jax`: effective rank of a feature matrix (Kumar et al. 2021).
* :func:`dormant_ratio` / :func:`dormant_ratio_jax`: fraction of dormant units (Sokar et al. 2023).
* :func:`dormant_ratio_reference` / :func:`dormant_ratio_reference_jax`: the same as the paper's code
  computes it (its epsilon and its ``tau = 0`` rule; measured there on pre-activations).
* :func:`gradient_cosine`, :func:`interference_summary`, :func:`per_sample_grads`: gradient
  interference between samples (Lyle et al. 2023).
* :func:`tree_norm`, :func:`layer_norms`: global and per-tensor L2 norms (parameters, gradients).
* :func:`simplicity_score`: spectral simplicity of a randomly initialised network (SimBa, after
  Teney et al. 2024).
* :func:`plasticity_probe`: how well a copy of a network still fits fresh random targets.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from sparserl import sparsity

PyTree = Any

# Cumulative singular-value sums within this fraction of the total of the (1-δ) threshold count as
# having reached it. Without it, exact-arithmetic ties (k equal singular values with (1-δ)k an
# integer, e.g. 300 ones at δ=0.01 -> exactly 297) would be broken at random by rounding noise of
# the SVD (float32 inside jit). It moves the threshold by 1e-5 of the total: negligible next to δ.
SRANK_RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Effective (stable) rank


def srank(features, delta: float = 0.01) -> int:
    """Effective rank ``srank_δ`` of a ``samples x dims`` feature matrix (Kumar et al. 2021).

    With the singular values ``σ_1 >= σ_2 >= ...`` of the matrix, the smallest ``k`` such that
    ``Σ_{i<=k} σ_i >= (1-δ) Σ_i σ_i``: how many directions carry all but ``δ`` of the feature
    matrix's spectral mass. A collapsing representation (implicit under-parameterisation) has a
    falling srank. The only cap is ``min(samples, dims)`` — pass at least as many samples as
    feature dims, or a small batch caps the value (the reference code capped it at 256, a defect).
    A zero matrix has srank 0. Computed in float64; ties at the threshold are resolved as in exact
    arithmetic (see ``SRANK_RTOL``).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"srank: features must be samples x dims, got shape {x.shape}")
    if x.size == 0:
        return 0
    s = np.linalg.svd(x, compute_uv=False)  # descending
    total = float(s.sum())
    if not total > 0.0:
        return 0
    cum = np.cumsum(s)
    threshold = (1.0 - delta) * total - SRANK_RTOL * total
    return int(min(np.count_nonzero(cum < threshold) + 1, s.size))


def srank_jax(features: jax.Array, delta: float = 0.01) -> jax.Array:
    """:func:`srank` as a 0-d int32 JAX array, usable inside ``jax.jit`` (``delta`` may be traced).

    Same definition (SVD without vectors, in the input's dtype — float32 unless x64 is on).
    """
    x = jnp.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"srank_jax: features must be samples x dims, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.size == 0:
        return jnp.zeros((), jnp.int32)
    s = jnp.linalg.svd(x, compute_uv=False)
    total = s.sum()
    cum = jnp.cumsum(s)
    threshold = (1.0 - delta) * total - SRANK_RTOL * total
    k = jnp.minimum(jnp.sum(cum < threshold) + 1, s.shape[0])
    return jnp.where(total > 0, k, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Dormant units


def _as_layers(activations) -> list:
    if isinstance(activations, (list, tuple)):
        return list(activations)
    return [activations]


def _dormant_counts_np(h: np.ndarray, tau: float) -> tuple[int, int]:
    h = np.abs(np.asarray(h, dtype=np.float64))
    if h.ndim == 0:
        raise ValueError("dormant_ratio: activations must have a units axis")
    h = h.reshape(-1, h.shape[-1])
    per_unit = h.mean(0) if h.shape[0] else np.zeros(h.shape[-1])
    layer_mean = per_unit.mean() if per_unit.size else 0.0
    if layer_mean > 0:
        score = per_unit / layer_mean
    else:  # an all-zero layer: every unit is dead
        score = np.zeros_like(per_unit)
    return int(np.count_nonzero(score <= tau)), int(per_unit.size)


def dormant_ratio(activations, tau: float = 0.1) -> float:
    """Fraction of dormant units over all units of all given layers (Sokar et al. 2023, ReDo).

    ``activations``: one array or a list of arrays, one per layer, each ``samples x units`` (any
    leading axes are treated as samples, the last axis as units). For unit ``i`` of a layer,
    ``s_i = mean_samples |h_i| / mean_k mean_samples |h_k|``; the unit is dormant if ``s_i <= tau``.
    Dormant units barely contribute to the layer's output, and their growth tracks the loss of
    plasticity. The result is count-weighted — dormant units / all units, not a mean of per-layer
    fractions. A layer whose activations are all zero counts every unit as dormant (no NaN);
    ``tau=0`` counts only units that are exactly zero on every sample.

    Measure it on post-activation outputs (the definition); on pre-activations (what the reference
    code did, see :func:`dormant_ratio_reference`) it means something else — label which one was used.
    """
    layers = _as_layers(activations)
    dormant = total = 0
    for h in layers:
        d, n = _dormant_counts_np(h, tau)
        dormant += d
        total += n
    return dormant / total if total else 0.0


def dormant_ratio_jax(activations, tau: float = 0.1) -> jax.Array:
    """:func:`dormant_ratio` as a 0-d float32 JAX array, usable inside ``jax.jit``.

    The list of layers is static (Python structure); ``tau`` may be traced.
    """
    dormant = jnp.zeros((), jnp.int32)
    total = 0
    for per_unit in _unit_scores_jax(activations):
        layer_mean = per_unit.mean()
        score = jnp.where(layer_mean > 0, per_unit / jnp.where(layer_mean > 0, layer_mean, 1), 0)
        dormant = dormant + jnp.sum(score <= tau)
        total += per_unit.shape[0]
    return (dormant / total).astype(jnp.float32) if total else jnp.zeros((), jnp.float32)


def _unit_scores_jax(activations):
    """Per layer, each unit's mean |activation| over the samples (leading axes)."""
    for h in _as_layers(activations):
        h = jnp.abs(jnp.asarray(h))
        if not jnp.issubdtype(h.dtype, jnp.floating):
            h = h.astype(jnp.float32)
        yield h.reshape(-1, h.shape[-1]).mean(0)


# The paper's code (scale_rl/networks/metrics.py, ``get_dormant_ratio``, after ReDo): a layer's scores
# are divided by their mean plus this, not by the mean alone.
REFERENCE_DORMANT_EPS = 1e-9


def dormant_ratio_reference(activations, tau: float = 0.1) -> float:
    """The dormant ratio exactly as the paper's code computes it, as a fraction (it logs x100).

    Per layer (``samples x units``; leading axes are samples): ``s_i = mean_samples |h_i|``,
    normalised ``s_i / (mean_k s_k + 1e-9)``; dormant if ``<= tau`` (``tau > 0``), or, at ``tau = 0``,
    if the normalised score is ``isclose`` to 0 (within 1e-8). Pooled over layers: dormant units of
    all layers / all units (the reference concatenates the layers' masks). Which layers: the paper's
    code passes the outputs of every ``Dense`` layer but the heads — pre-activation (see
    :func:`sparserl.probe.reference_dormant_layers`). Computed in float64.
    """
    dormant = total = 0
    for h in _as_layers(activations):
        h = np.abs(np.asarray(h, dtype=np.float64))
        h = h.reshape(-1, h.shape[-1])
        score = h.mean(0)
        normalized = score / (score.mean() + REFERENCE_DORMANT_EPS)
        dead = normalized <= tau if tau > 0 else np.abs(normalized) <= 1e-8
        dormant += int(np.count_nonzero(dead))
        total += score.size
    return dormant / total if total else 0.0


def dormant_ratio_reference_jax(activations, tau: float = 0.1) -> jax.Array:
    """:func:`dormant_ratio_reference` as a 0-d float32 JAX array, usable inside ``jax.jit``."""
    dormant = jnp.zeros((), jnp.int32)
    total = 0
    for score in _unit_scores_jax(activations):
        normalized = score / (score.mean() + REFERENCE_DORMANT_EPS)
        dead = jnp.where(tau > 0, normalized <= tau, jnp.abs(normalized) <= 1e-8)
        dormant = dormant + jnp.sum(dead)
        total += score.shape[0]
    if total == 0:
        return jnp.zeros((), jnp.float32)
    return (dormant / total).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Gradient interference


def gradient_cosine(per_sample_grads: jax.Array) -> jax.Array:
    """``N x N`` cosine similarity ``C_ij = <g_i, g_j> / (|g_i| |g_j|)`` of per-sample gradients.

    ``per_sample_grads``: ``N x P`` (one flattened gradient per row, e.g. from
    :func:`per_sample_grads`). Strongly negative entries mean an update that helps sample ``i`` hurts
    sample ``j`` (interference, Lyle et al. 2023); uniformly high |C| means the network generalises
    every update to every input. Rows with zero norm have cosine 0 with everything, themselves
    included (never NaN); the other diagonal entries are exactly 1. Pure ``jnp`` — jittable.
    """
    g = jnp.asarray(per_sample_grads)
    if g.ndim != 2:
        raise ValueError(f"gradient_cosine: expected N x P, got shape {g.shape}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        g = g.astype(jnp.float32)
    norm = jnp.linalg.norm(g, axis=1)
    nonzero = norm > 0
    unit = g / jnp.where(nonzero, norm, 1)[:, None]
    cos = jnp.clip(jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST), -1.0, 1.0)
    eye = jnp.eye(g.shape[0], dtype=bool)
    return jnp.where(eye, nonzero[:, None].astype(cos.dtype), cos)


def interference_summary(cos) -> dict[str, float]:
    """Scalar summaries of a gradient-cosine matrix, over its off-diagonal entries only.

    ``mean_abs_offdiag``: mean |C_ij| (i != j) — how coupled the per-sample updates are.
    ``frac_negative``: fraction of C_ij < 0 (i != j) — how often one sample's update opposes
    another's. Needs N >= 2.
    """
    c = np.asarray(cos, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"interference_summary: expected a square matrix, got shape {c.shape}")
    n = c.shape[0]
    if n < 2:
        raise ValueError("interference_summary: needs at least 2 samples (no off-diagonal entries)")
    off = c[~np.eye(n, dtype=bool)]
    return {"mean_abs_offdiag": float(np.abs(off).mean()), "frac_negative": float(np.mean(off < 0))}


def per_sample_grads(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree, batch: PyTree,
                     mask: PyTree | None = None) -> jax.Array:
    """``N x P`` matrix of flattened per-sample gradients ``∇_params loss_fn(params, example_i)``.

    ``loss_fn(params, example)`` returns a scalar for ONE example; ``example`` is the pytree slice
    ``batch[i]`` along every leaf's leading axis (``jax.vmap(jax.grad(loss_fn))``). The parameter
    pytree is flattened with ``jax.flatten_util.ravel_pytree`` (leaf order of ``jax.tree_util``).
    ``mask`` (the parameters' mask, see :func:`sparserl.sparsity.make_mask`): the gradients are taken
    over kept weights only — pruned coordinates are set to 0 (a masked step never applies them), so
    they add nothing to dot products or norms, as if they were dropped. Pure ``jnp`` — jittable with
    ``loss_fn`` closed over.
    """
    def flat_grad(example):
        grads = jax.grad(loss_fn)(params, example)
        if mask is not None:
            grads = sparsity.apply_mask(grads, mask)
        return ravel_pytree(grads)[0]

    return jax.vmap(flat_grad)(batch)


# ----------------------------------------------------------------------------------------------
# Norms


def tree_norm(tree: PyTree) -> float:
    """Global L2 norm ``sqrt(Σ x²)`` over every leaf of a pytree (parameters, gradients), float64.

    Growing parameter norms accompany the loss of plasticity; gradient norms show the update scale.
    """
    total = 0.0
    for x in jax.tree_util.tree_leaves(tree):
        a = np.asarray(x, dtype=np.float64)
        total += float(np.sum(a * a))
    return math.sqrt(total)


def layer_norms(tree: PyTree) -> dict[str, float]:
    """L2 norm of each leaf, keyed by its ``/``-joined path (``"block0/hidden/kernel"``).

    Names are those of :func:`sparserl.sparsity.named_leaves`, so they match the mask and
    :func:`sparserl.sparsity.stats` rows. Shows which layers grow or collapse.
    """
    return {name: tree_norm(x) for name, x in sparsity.named_leaves(tree)}


# ----------------------------------------------------------------------------------------------
# Simplicity score


def _complexity(values: np.ndarray, freqs: np.ndarray, window: np.ndarray | None = None) -> float:
    if window is None:
        values = values - values.mean()
    else:  # subtract the window-weighted mean, so the windowed signal has no DC to leak
        values = (values - (values * window).sum() / window.sum()) * window
    mag = np.abs(np.fft.fft2(values))
    mag[0, 0] = 0.0  # the DC term is removed by definition (mean subtracted)
    total = mag.sum()
    if not total > 0.0:
        return 0.0
    return float((mag * freqs).sum() / total)


def simplicity_score(apply_fn: Callable[[PyTree, jax.Array], jax.Array], init_fn: Callable[[jax.Array], PyTree],
                     key: jax.Array, num_inits: int = 5, grid: int = 64, low: float = -1.0,
                     high: float = 1.0, window: str | None = None) -> float:
    """Spectral simplicity of the functions a network represents at initialisation; higher = simpler.

    For each of ``num_inits`` initialisations ``params = init_fn(k)`` (``k`` from splitting
    ``key``), evaluates ``apply_fn(params, x)`` on the ``grid x grid`` points of ``[low, high]²``
    (``x`` shape ``(grid*grid, 2)``, row-major: ``x[i*grid + j] = (t_i, t_j)``), averages the output
    over its non-sample axes to one scalar per point, subtracts the mean and takes the magnitude of
    its 2-D FFT. Complexity = ``Σ|F(k)| ‖k‖ / Σ|F(k)|``, the magnitude-weighted mean radial
    frequency, with ``k`` from ``np.fft.fftfreq(grid, d=(high-low)/(grid-1))`` on both axes, i.e.
    in cycles per unit of input (so the score does not depend on ``grid`` for well-resolved
    functions). The score is the mean over initialisations of ``1 / complexity`` (SimBa after Teney
    et al. 2024: architectures whose random functions are low-frequency are biased toward simple
    solutions).

    A constant output (every grid value equal, so no non-DC spectrum) has complexity 0 and score
    ``inf`` for that initialisation; the mean is then ``inf`` too. A non-constant output scores at
    most ``1 / min‖k‖ = grid * spacing`` (about ``high - low``).

    ``window``: ``None`` (default, the definition above) or ``"hann"``. The FFT treats the grid as
    periodic, so a function whose values differ between opposite edges of the square (any
    non-periodic one, e.g. ``x0 + x1``) gets a wrap-around jump whose ``1/|k|`` spectral leakage
    dominates: unwindowed, ``x0 + x1`` scores *below* ``sin(5 x0)``. ``"hann"`` multiplies the
    signal (minus its window-weighted mean) by a separable Hann window first, which removes the
    jump; scores are then not comparable with unwindowed ones.
    """
    if grid < 2:
        raise ValueError("simplicity_score: grid must be >= 2")
    if window not in (None, "hann"):
        raise ValueError(f"simplicity_score: window={window!r}: must be None or 'hann'")
    win = np.outer(np.hanning(grid), np.hanning(grid)) if window == "hann" else None
    t = np.linspace(low, high, grid)
    xx, yy = np.meshgrid(t, t, indexing="ij")
    x = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    f = np.fft.fftfreq(grid, d=(high - low) / (grid - 1))
    radial = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    apply = jax.jit(apply_fn)
    scores = []
    for k in jax.random.split(key, num_inits):
        out = np.asarray(apply(init_fn(k), x), dtype=np.float64)
        out = out.reshape(grid * grid, -1).mean(-1).reshape(grid, grid)
        c = _complexity(out, radial, win)
        scores.append(math.inf if c == 0.0 else 1.0 / c)
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Plasticity probe


def plasticity_probe(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, inputs: jax.Array,
                     key: jax.Array, steps: int = 200, lr: float = 1e-3, mask: PyTree | None = None,
                     return_params: bool = False):
    """Final MSE of a copy of a network fitted to fresh random targets: lost plasticity, measured.

    Targets are ``jax.random.normal(key, out.shape, out.dtype)`` for ``out = apply_fn(params,
    inputs)`` (``(N, out)`` or ``(N,)``); the copy is trained full-batch on ``inputs`` with
    ``optax.adam(lr)`` for ``steps`` steps (a jitted ``lax.scan``), minimising
    ``mean((apply_fn(p, inputs) - targets)²)``. A network that has lost plasticity keeps a higher
    loss than a fresh one under the same budget. ``steps=0`` returns the initial loss.

    ``mask`` (the parameter pytree's mask, see :func:`sparserl.sparsity.make_mask`): masked weights
    are zeroed at the start and kept exactly zero (:func:`sparserl.sparsity.keep_masked`), so a
    sparse network is probed as the sparse network it is.

    Returns the final loss as a float, or ``(loss, fitted_params)`` with ``return_params=True``.
    ``params`` itself is never modified.
    """
    if steps < 0:
        raise ValueError("plasticity_probe: steps must be >= 0")
    inputs = jnp.asarray(inputs)
    if mask is not None:
        params = sparsity.apply_mask(params, mask)
        opt = optax.chain(optax.adam(lr), sparsity.keep_masked(mask))
    else:
        opt = optax.adam(lr)
    out_spec = jax.eval_shape(apply_fn, params, inputs)
    targets = jax.random.normal(key, out_spec.shape, out_spec.dtype)

    def loss_fn(p):
        return jnp.mean(jnp.square(apply_fn(p, inputs) - targets))

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, state = carry
            grads = jax.grad(loss_fn)(p)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return loss_fn(p), p

    loss, fitted = fit(params)
    loss = float(loss)
    return (loss, fitted) if return_params else loss
