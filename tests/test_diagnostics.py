"""sparserl.diagnostics against values computed independently here (PAPER.md §5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparserl import diagnostics, networks, sparsity


def orthogonal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n x k with orthonormal columns (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def with_singular_values(sigma, samples: int, dims: int, seed: int = 0) -> np.ndarray:
    """samples x dims matrix U diag(σ) V^T with random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    k = len(sigma)
    return orthogonal(rng, samples, k) @ np.diag(sigma) @ orthogonal(rng, dims, k).T


def srank_by_hand(sigma, delta: float) -> int:
    s = np.sort(np.asarray(sigma, np.float64))[::-1]
    cum = np.cumsum(s)
    return int(np.argmax(cum >= (1 - delta) * s.sum()) + 1)


# ----------------------------------------------------------------------------------------------
# srank


@pytest.mark.parametrize("k,delta", [(10, 0.01), (10, 0.1), (37, 0.01), (50, 0.05), (64, 0.2)])
def test_srank_equal_singular_values(k, delta):
    x = with_singular_values(np.ones(k), 80, 70, seed=k)
    expected = math.ceil((1 - delta) * k - 1e-9)  # exact-arithmetic ceil
    assert diagnostics.srank(x, delta) == expected
    assert int(diagnostics.srank_jax(jnp.asarray(x, jnp.float32), delta)) == expected


def test_srank_geometric_decay_matches_cumsum():
    for ratio in (0.5, 0.8, 0.9, 0.97):
        sigma = 3.0 * ratio ** np.arange(40)
        x = with_singular_values(sigma, 60, 50, seed=int(ratio * 100))
        for delta in (0.01, 0.1):
            expected = srank_by_hand(sigma, delta)
            assert diagnostics.srank(x, delta) == expected
            assert int(diagnostics.srank_jax(jnp.asarray(x, jnp.float32), delta)) == expected


def test_srank_not_capped_at_256():
    x = with_singular_values(np.ones(300), 600, 400, seed=1)
    assert diagnostics.srank(x) == 297 == math.ceil(0.99 * 300)
    assert int(jax.jit(diagnostics.srank_jax)(jnp.asarray(x, jnp.float32))) == 297


def test_srank_bounds_and_degenerate():
    assert diagnostics.srank(np.zeros((5, 4))) == 0
    assert int(diagnostics.srank_jax(jnp.zeros((5, 4)))) == 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 30))  # full rank 8 = min(samples, dims)
    assert 1 <= diagnostics.srank(x) <= 8
    assert diagnostics.srank(x, delta=0.0) == 8
    assert diagnostics.srank(np.outer(rng.standard_normal(20), rng.standard_normal(9))) == 1


def test_srank_jax_matches_numpy_on_random_features():
    rng = np.random.default_rng(3)
    feats = np.maximum(rng.standard_normal((200, 64)) @ rng.standard_normal((64, 64)), 0)
    assert int(jax.jit(diagnostics.srank_jax)(jnp.asarray(feats, jnp.float32))) == diagnostics.srank(feats)


# ----------------------------------------------------------------------------------------------
# dormant ratio


def both_dormant(acts, tau):
    """numpy and jitted JAX results (they must agree)."""
    jax_acts = [jnp.asarray(a, jnp.float32) for a in acts] if isinstance(acts, list) else jnp.asarray(acts, jnp.float32)
    value = diagnostics.dormant_ratio(acts, tau)
    value_jax = float(jax.jit(diagnostics.dormant_ratio_jax)(jax_acts, tau))
    assert value == pytest.approx(value_jax, abs=1e-7)
    return value


def test_dormant_three_dead_of_ten():
    rng = np.random.default_rng(0)
    h = np.abs(rng.standard_normal((64, 10))) + 0.5
    h[:, [1, 4, 7]] = 0.0
    assert both_dormant(h, 0.1) == pytest.approx(0.3)
    assert both_dormant(h, 0.0) == pytest.approx(0.3)


def test_dormant_score_exactly_at_tau_counts():
    # per-unit mean |h| = [0.25, 1.75, 1, 1] -> layer mean 1 -> scores [0.25, 1.75, 1, 1] exactly
    h = np.array([[0.25, 1.75, 1.0, -1.0], [-0.25, 1.75, -1.0, 1.0]])
    assert both_dormant(h, 0.25) == pytest.approx(0.25)       # s == tau is dormant
    assert both_dormant(h, 0.2) == 0.0                        # just below: not dormant
    assert both_dormant(h, 1.0) == pytest.approx(0.75)        # 0.25, 1, 1 <= 1
    # tau 0.1 with a score that is 0.1 in float64 arithmetic: [0.1, 1.9, 1, 1]
    h01 = np.array([[0.1, 1.9, 1.0, 1.0]])
    assert np.abs(h01).mean(0)[0] / np.abs(h01).mean() <= 0.1
    assert diagnostics.dormant_ratio(h01, 0.1) == pytest.approx(0.25)


def test_dormant_uses_absolute_values():
    # a unit that is large but negative is active (pre-activations may be negative)
    h = np.array([[-5.0, 0.0, 5.0], [-5.0, 0.0, 5.0]])
    assert both_dormant(h, 0.1) == pytest.approx(1 / 3)


def test_dormant_count_weighted_over_layers():
    rng = np.random.default_rng(1)
    a = np.abs(rng.standard_normal((32, 4))) + 1.0
    a[:, 0] = 0.0                         # 1 of 4 dormant
    b = np.abs(rng.standard_normal((32, 16))) + 1.0
    b[:, :8] = 0.0                        # 8 of 16 dormant
    expected = (1 + 8) / (4 + 16)         # 0.45, not the mean of fractions (0.25 + 0.5) / 2 = 0.375
    assert both_dormant([a, b], 0.1) == pytest.approx(expected)


def test_dormant_all_zero_layer():
    rng = np.random.default_rng(2)
    live = np.abs(rng.standard_normal((16, 6))) + 1.0
    dead = np.zeros((16, 10))
    assert both_dormant(dead, 0.1) == 1.0
    assert both_dormant(dead, 0.0) == 1.0
    assert both_dormant([live, dead], 0.1) == pytest.approx(10 / 16)
    assert not math.isnan(both_dormant([dead, dead], 0.0))


def test_dormant_tau_zero_counts_only_exactly_dead():
    h = np.ones((10, 5))
    h[:, 0] = 1e-9                        # tiny but alive
    h[:, 1] = 0.0                         # dead
    h[3, 2] = 0.0                         # zero on one sample only: alive
    assert both_dormant(h, 0.0) == pytest.approx(0.2)
    assert both_dormant(h, 0.1) == pytest.approx(0.4)


def test_dormant_matches_bruteforce_loop():
    rng = np.random.default_rng(4)
    layers = [np.maximum(rng.standard_normal((50, n)) * rng.uniform(0, 2, n), 0) for n in (7, 13, 5)]
    for tau in (0.0, 0.1, 0.2, 0.5):
        dormant = total = 0
        for h in layers:
            for i in range(h.shape[1]):
                unit = np.mean(np.abs(h[:, i]))
                layer = np.mean([np.mean(np.abs(h[:, k])) for k in range(h.shape[1])])
                dormant += unit / layer <= tau
                total += 1
        assert both_dormant(layers, tau) == pytest.approx(dormant / total)


# ----------------------------------------------------------------------------------------------
# gradient interference


def test_cosine_orthogonal_rows_identity():
    g = 3.0 * np.eye(5, 8)
    cos = np.asarray(diagnostics.gradient_cosine(g))
    np.testing.assert_allclose(cos, np.eye(5), atol=1e-6)
    summary = diagnostics.interference_summary(cos)
    assert summary["mean_abs_offdiag"] == pytest.approx(0.0, abs=1e-6)
    assert summary["frac_negative"] == 0.0


def test_cosine_identical_and_opposite_rows():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(20)
    same = np.stack([v, 2 * v, 0.5 * v, 7 * v])
    np.testing.assert_allclose(np.asarray(diagnostics.gradient_cosine(same)), np.ones((4, 4)), atol=1e-6)
    s = diagnostics.interference_summary(diagnostics.gradient_cosine(same))
    assert s["mean_abs_offdiag"] == pytest.approx(1.0, abs=1e-6) and s["frac_negative"] == 0.0

    opposite = np.stack([v, -3 * v])
    cos = np.asarray(diagnostics.gradient_cosine(opposite))
    np.testing.assert_allclose(cos, [[1, -1], [-1, 1]], atol=1e-6)
    s = diagnostics.interference_summary(cos)
    assert s["mean_abs_offdiag"] == pytest.approx(1.0, abs=1e-6) and s["frac_negative"] == 1.0

    mixed = np.stack([v, v, -v])  # off-diagonal: +1 (x2), -1 (x4)
    s = diagnostics.interference_summary(diagnostics.gradient_cosine(mixed))
    assert s["mean_abs_offdiag"] == pytest.approx(1.0, abs=1e-6)
    assert s["frac_negative"] == pytest.approx(4 / 6)


def test_cosine_zero_rows_and_random_against_numpy():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((6, 30))
    g[2] = 0.0
    cos = np.asarray(jax.jit(diagnostics.gradient_cosine)(g))
    assert np.isfinite(cos).all()
    assert (cos[2] == 0).all() and (cos[:, 2] == 0).all()
    live = [0, 1, 3, 4, 5]
    n = g[live] / np.linalg.norm(g[live], axis=1, keepdims=True)
    np.testing.assert_allclose(cos[np.ix_(live, live)], n @ n.T, atol=1e-5)
    np.testing.assert_allclose(cos, cos.T, atol=1e-7)


def test_interference_summary_hand_matrix():
    c = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.0], [-0.2, 0.0, 1.0]])
    s = diagnostics.interference_summary(c)
    assert s["mean_abs_offdiag"] == pytest.approx((0.5 + 0.2 + 0) * 2 / 6)
    assert s["frac_negative"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        diagnostics.interference_summary(np.ones((1, 1)))


def test_per_sample_grads_linear_model():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal(3), jnp.float32)
    b = jnp.asarray(0.7, jnp.float32)
    params = {"b": b, "w": w}  # ravel_pytree order: sorted dict keys -> b, then w
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = rng.standard_normal(5).astype(np.float32)

    def loss_fn(p, ex):
        xi, yi = ex
        return 0.5 * (xi @ p["w"] + p["b"] - yi) ** 2

    grads = np.asarray(diagnostics.per_sample_grads(loss_fn, params, (jnp.asarray(x), jnp.asarray(y))))
    residual = x @ np.asarray(w) + 0.7 - y          # d/dw = r x_i, d/db = r
    expected = np.concatenate([residual[:, None], residual[:, None] * x], axis=1)
    assert grads.shape == (5, 4)
    np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda p, bt: diagnostics.per_sample_grads(loss_fn, p, bt))(params, (x, y))
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# norms


def test_tree_norm_and_layer_norms():
    params = networks.init_encoder(jax.random.PRNGKey(0), 5, 8, 1, "simba")
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(params)]
    assert diagnostics.tree_norm(params) == pytest.approx(math.sqrt(sum(float((x ** 2).sum()) for x in leaves)))
    assert diagnostics.tree_norm({"a": jnp.array([3.0]), "b": {"c": jnp.array([[4.0]])}}) == pytest.approx(5.0)
    assert diagnostics.tree_norm({}) == 0.0

    norms = diagnostics.layer_norms(params)
    assert set(norms) == {"embed/kernel", "embed/bias", "block0/norm/scale", "block0/norm/bias",
                          "block0/hidden/kernel", "block0/hidden/bias", "block0/out/kernel",
                          "block0/out/bias", "final_norm/scale", "final_norm/bias"}
    assert norms["block0/norm/scale"] == pytest.approx(math.sqrt(8))  # LayerNorm scale init = ones(8)
    assert norms["embed/bias"] == 0.0
    k = np.asarray(params["block0"]["hidden"]["kernel"], np.float64)
    assert norms["block0/hidden/kernel"] == pytest.approx(np.linalg.norm(k))
    assert math.sqrt(sum(v ** 2 for v in norms.values())) == pytest.approx(diagnostics.tree_norm(params))


# ----------------------------------------------------------------------------------------------
# simplicity score


def test_simplicity_orders_smooth_above_high_frequency():
    dummy_init = lambda key: {"unused": jnp.zeros(())}  # noqa: E731
    key = jax.random.PRNGKey(0)
    smooth = diagnostics.simplicity_score(lambda p, x: x.sum(-1), dummy_init, key, num_inits=2)
    wiggly = diagnostics.simplicity_score(lambda p, x: jnp.sin(20 * x[:, 0]) * jnp.cos(20 * x[:, 1]),
                                          dummy_init, key, num_inits=2)
    assert np.isfinite(smooth) and np.isfinite(wiggly) and smooth > 0 and wiggly > 0
    assert smooth > 1.2 * wiggly  # unwindowed: the ramp's wrap-around jump leaks (see the docstring)

    hann = dict(num_inits=1, window="hann")
    smooth_h = diagnostics.simplicity_score(lambda p, x: x.sum(-1), dummy_init, key, **hann)
    medium_h = diagnostics.simplicity_score(lambda p, x: jnp.sin(5 * x[:, 0]), dummy_init, key, **hann)
    wiggly_h = diagnostics.simplicity_score(lambda p, x: jnp.sin(20 * x[:, 0]) * jnp.cos(20 * x[:, 1]),
                                            dummy_init, key, **hann)
    assert smooth_h > medium_h > 3 * wiggly_h
    with pytest.raises(ValueError):
        diagnostics.simplicity_score(lambda p, x: x.sum(-1), dummy_init, key, window="hamming")


def test_simplicity_complexity_by_hand():
    # a single pure Fourier mode on the periodic grid has complexity |k| exactly
    grid, low, high = 32, -1.0, 1.0
    d = (high - low) / (grid - 1)
    m = 3                                  # 3 cycles over the grid along axis 0

    def apply_fn(p, x):
        i = jnp.round((x[:, 0] - low) / d)
        return jnp.cos(2 * jnp.pi * m * i / grid)[:, None] * jnp.ones((1, 3))  # 3 equal output dims

    score = diagnostics.simplicity_score(apply_fn, lambda k: {}, jax.random.PRNGKey(0), num_inits=1,
                                         grid=grid, low=low, high=high)
    freq = np.fft.fftfreq(grid, d=d)[m]
    assert score == pytest.approx(1.0 / freq, rel=1e-4)


def test_simplicity_constant_output_is_inf():
    score = diagnostics.simplicity_score(lambda p, x: jnp.full((x.shape[0],), 2.5), lambda k: {},
                                         jax.random.PRNGKey(0), num_inits=2, grid=16)
    assert score == math.inf


def test_simplicity_real_simba_encoder_with_head():
    def init_fn(key):
        k_enc, k_head = jax.random.split(key)
        return {"encoder": networks.init_encoder(k_enc, 2, 32, 1, "simba"),
                "head": networks.init_dense(k_head, 32, 1)}

    def apply_fn(params, x):
        return networks.dense(params["head"], networks.encoder(params["encoder"], x))

    score = diagnostics.simplicity_score(apply_fn, init_fn, jax.random.PRNGKey(0), num_inits=3, grid=32)
    assert np.isfinite(score) and score > 0


# ----------------------------------------------------------------------------------------------
# plasticity probe


def small_mlp(key, in_dim=4, width=32, out=3):
    k1, k2 = jax.random.split(key)
    return {"l1": networks.init_dense(k1, in_dim, width, jax.nn.initializers.he_normal()),
            "l2": networks.init_dense(k2, width, out)}


def mlp_apply(p, x):
    return networks.dense(p["l2"], jax.nn.relu(networks.dense(p["l1"], x)))


def test_plasticity_probe_reduces_loss():
    params = small_mlp(jax.random.PRNGKey(0))
    inputs = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    key = jax.random.PRNGKey(2)
    targets = jax.random.normal(key, (64, 3))
    initial_by_hand = float(jnp.mean((mlp_apply(params, inputs) - targets) ** 2))
    initial = diagnostics.plasticity_probe(mlp_apply, params, inputs, key, steps=0)
    assert initial == pytest.approx(initial_by_hand, rel=1e-5)
    final = diagnostics.plasticity_probe(mlp_apply, params, inputs, key, steps=200, lr=1e-2)
    assert final < 0.7 * initial_by_hand
    # the input params are untouched, and the result is deterministic
    assert diagnostics.plasticity_probe(mlp_apply, params, inputs, key, steps=200, lr=1e-2) == final

    # (N,)-shaped outputs work too
    scalar_apply = lambda p, x: mlp_apply(p, x)[:, 0]  # noqa: E731
    first = diagnostics.plasticity_probe(scalar_apply, params, inputs, key, steps=0)
    assert diagnostics.plasticity_probe(scalar_apply, params, inputs, key, steps=100, lr=1e-2) < first


def test_plasticity_probe_keeps_masked_weights_zero():
    params = small_mlp(jax.random.PRNGKey(3))
    mask = sparsity.make_mask(jax.random.PRNGKey(4), params, 0.6, "uniform")
    assert np.ndim(mask["l1"]["bias"]) == 0  # biases: scalar True leaves
    inputs = jax.random.normal(jax.random.PRNGKey(5), (64, 4))
    # params NOT pre-masked: the probe must zero the masked weights itself and keep them zero
    loss, fitted = diagnostics.plasticity_probe(mlp_apply, params, inputs, jax.random.PRNGKey(6), steps=100,
                                                lr=1e-2, mask=mask, return_params=True)
    assert np.isfinite(loss)
    for layer in ("l1", "l2"):
        m = np.asarray(mask[layer]["kernel"])
        k_new, k_old = np.asarray(fitted[layer]["kernel"]), np.asarray(params[layer]["kernel"])
        assert 0 < m.sum() < m.size
        assert (k_new[~m] == 0).all()
        assert (k_new[m] != k_old[m]).mean() > 0.5       # the kept weights did train (some ReLUs are dead)
    initial = diagnostics.plasticity_probe(mlp_apply, sparsity.apply_mask(params, mask), inputs,
                                           jax.random.PRNGKey(6), steps=0)
    assert loss < initial
