"""Networks: parameter counts, SimBa/MLP forward passes against numpy, critic shapes, SAC policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparserl import backend, config, networks
from sparserl.agents import common, ddpg, sac

from conftest import HUMANOID_ACT, HUMANOID_OBS, small_config


# ----------------------------------------------------------------------------------------------
# independent numpy reference implementations


def np_layer_norm(x, scale, bias, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def np_dense(p, x):
    return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_simba(params, x, blocks):
    h = np_dense(params["embed"], x)
    for i in range(blocks):
        b = params[f"block{i}"]
        z = np_layer_norm(h, b["norm"]["scale"], b["norm"]["bias"])
        h = h + np_dense(b["out"], np.maximum(np_dense(b["hidden"], z), 0.0))
    return np_layer_norm(h, params["final_norm"]["scale"], params["final_norm"]["bias"])


def np_mlp(params, x, blocks):
    h = np.maximum(np_dense(params["embed"], x), 0.0)
    for i in range(blocks):
        h = np.maximum(np_dense(params[f"layer{i}"], h), 0.0)
    return h


def simba_count(in_dim, H, N):
    return (in_dim + 1) * H + N * (8 * H * H + 7 * H) + 2 * H


def critic_count(in_dim, H, N):
    """PAPER.md §3: critic = (in+1)H + N(8H^2+7H) + 2H + H+1."""
    return simba_count(in_dim, H, N) + H + 1


def randomize(params, seed, scale=0.3):
    """Perturb every leaf (incl. zero biases and unit LayerNorm scales) with random values."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), jnp.float32), params)


def rand(seed, shape, scale=1.0, shift=0.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape) + shift).astype(np.float32)


# jitted once per shape: much cheaper than compiling every eager op of a forward pass
encoder = jax.jit(networks.encoder)
critic = jax.jit(networks.critic)


# ----------------------------------------------------------------------------------------------
# parameter counts


def test_default_humanoid_sac_has_4394923_params(humanoid_actor, humanoid_critic):
    cfg = config.Config()
    assert (cfg.actor.width, cfg.actor.blocks, cfg.critic.width, cfg.critic.blocks) == (128, 1, 512, 2)
    assert not cfg.critic.cdq
    n_actor = networks.num_params(humanoid_actor)
    n_critic = networks.num_params(humanoid_critic)
    assert n_actor + n_critic == 4_394_923
    assert n_critic == critic_count(HUMANOID_OBS + HUMANOID_ACT, 512, 2)
    # actor: SimBa encoder + mean and log-std heads (H -> |A| each)
    assert n_actor == simba_count(HUMANOID_OBS, 128, 1) + 2 * (128 + 1) * HUMANOID_ACT
    # and with the state built by the agent itself (default config)
    shapes = jax.eval_shape(lambda: sac.init_actor_params(jax.random.PRNGKey(0), HUMANOID_OBS, HUMANOID_ACT, cfg))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == n_actor


@pytest.mark.parametrize("in_dim,H,N", [(7, 16, 1), (10, 8, 3), (88, 1024, 2)])
def test_critic_param_formula(in_dim, H, N):
    shapes = jax.eval_shape(lambda: networks.init_critic(jax.random.PRNGKey(0), in_dim - 2, 2, H, N, "simba"))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == critic_count(in_dim, H, N)


def test_critic_1024x2_is_about_17M():
    shapes = jax.eval_shape(lambda: networks.init_critic(jax.random.PRNGKey(0), HUMANOID_OBS, HUMANOID_ACT,
                                                         1024, 2, "simba"))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert 16.5e6 < n < 17.5e6


def test_cdq_doubles_critic_params():
    one = networks.init_critic(jax.random.PRNGKey(0), 5, 2, 16, 1, "simba", num_q=1)
    two = networks.init_critic(jax.random.PRNGKey(0), 5, 2, 16, 1, "simba", num_q=2)
    assert networks.num_params(two) == 2 * networks.num_params(one) == 2 * critic_count(7, 16, 1)


# ----------------------------------------------------------------------------------------------
# SimBa encoder


def test_simba_init_layout():
    p = networks.init_encoder(jax.random.PRNGKey(0), 7, 16, 2, "simba")
    assert p["embed"]["kernel"].shape == (7, 16)  # kernels are (in, out)
    assert p["block0"]["hidden"]["kernel"].shape == (16, 64)
    assert p["block0"]["out"]["kernel"].shape == (64, 16)
    for i in range(2):
        b = p[f"block{i}"]
        np.testing.assert_array_equal(b["hidden"]["bias"], 0.0)
        np.testing.assert_array_equal(b["out"]["bias"], 0.0)
        np.testing.assert_array_equal(b["norm"]["scale"], 1.0)
        np.testing.assert_array_equal(b["norm"]["bias"], 0.0)
    # orthogonal embedding: columns orthonormal (7 x 16 -> rows orthonormal)
    w = np.asarray(p["embed"]["kernel"], np.float64)
    np.testing.assert_allclose(w @ w.T, np.eye(7), atol=1e-5)
    # He-normal blocks: variance ~ 2 / fan_in
    hidden = np.asarray(networks.init_encoder(jax.random.PRNGKey(1), 7, 128, 1)["block0"]["hidden"]["kernel"])
    assert hidden.var() == pytest.approx(2.0 / 128, rel=0.1)


def test_simba_output_is_layer_normalised():
    p = networks.init_encoder(jax.random.PRNGKey(0), 7, 32, 2, "simba")
    x = rand(1, (10, 7), 3.0, 1.0)
    y = np.asarray(encoder(p, x), np.float64)
    assert y.shape == (10, 32)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)


def test_simba_matches_numpy_forward():
    p = randomize(networks.init_encoder(jax.random.PRNGKey(0), 7, 16, 2, "simba"), 3)
    x = rand(1, (6, 7))
    np.testing.assert_allclose(np.asarray(encoder(p, x)), np_simba(p, np.asarray(x), 2),
                               rtol=1e-4, atol=1e-4)


def test_simba_residual_structure():
    """With every block's 'out' kernel zeroed, the encoder is layer_norm(embed(x))."""
    p = networks.init_encoder(jax.random.PRNGKey(0), 7, 16, 3, "simba")
    p = jax.tree_util.tree_map(lambda x: x, p)  # copy
    for i in range(3):
        p[f"block{i}"]["out"]["kernel"] = jnp.zeros_like(p[f"block{i}"]["out"]["kernel"])
    x = rand(2, (5, 7))
    expected = np_layer_norm(np_dense(p["embed"], x), 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(encoder(p, x)), expected, rtol=1e-4, atol=1e-5)
    # ... and the blocks do matter when the 'out' kernels are not zero
    p2 = networks.init_encoder(jax.random.PRNGKey(0), 7, 16, 3, "simba")
    assert np.abs(np.asarray(encoder(p2, x)) - expected).max() > 1e-2


# ----------------------------------------------------------------------------------------------
# MLP baseline


@pytest.mark.parametrize("in_dim,H,N", [(7, 16, 1), (5, 8, 3)])
def test_mlp_encoder(in_dim, H, N):
    p = networks.init_encoder(jax.random.PRNGKey(0), in_dim, H, N, "mlp")
    assert networks.num_params(p) == (in_dim + 1) * H + N * (H + 1) * H
    assert "final_norm" not in p
    x = rand(1, (20, in_dim), 2.0)
    y = np.asarray(encoder(p, x))
    assert y.shape == (20, H)
    assert (y >= 0).all() and (y == 0).any() and (y > 0).any()
    pr = randomize(p, 4)
    np.testing.assert_allclose(np.asarray(encoder(pr, x)), np_mlp(pr, np.asarray(x), N),
                               rtol=1e-4, atol=1e-4)


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="arch"):
        networks.init_encoder(jax.random.PRNGKey(0), 3, 4, 1, "transformer")


# ----------------------------------------------------------------------------------------------
# critic


def test_critic_shapes_and_values_num_q_2():
    p = randomize(networks.init_critic(jax.random.PRNGKey(0), 5, 2, 16, 1, "simba", num_q=2),
                  5)
    assert set(p) == {"q0", "q1"}
    obs = rand(1, (9, 5))
    act = np.tanh(rand(2, (9, 2)))
    q = np.asarray(critic(p, obs, act))
    assert q.shape == (2, 9)
    x = np.concatenate([obs, act], -1)
    for i in range(2):
        expected = np_dense(p[f"q{i}"]["head"], np_simba(p[f"q{i}"]["encoder"], x, 1))[:, 0]
        np.testing.assert_allclose(q[i], expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(q[0], q[1])
    np.testing.assert_allclose(np.asarray(common.q_value(p, obs, act)), q.min(0), rtol=1e-6)


def test_critic_single_q_shape():
    p = networks.init_critic(jax.random.PRNGKey(0), 5, 2, 16, 1, "simba")
    q = critic(p, jnp.zeros((4, 5)), jnp.zeros((4, 2)))
    assert q.shape == (1, 4)


# ----------------------------------------------------------------------------------------------
# SAC policy


def _np_tanh_gaussian_logp(mean, log_std, noise):
    mean, log_std, noise = (np.asarray(a, np.float64) for a in (mean, log_std, noise))
    std = np.exp(log_std)
    u = mean + std * noise
    normal = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    # change of variables a = tanh(u): log|da/du| = log(1 - tanh(u)^2) = -2 log cosh(u)
    return np.tanh(u), (normal + 2.0 * np.log(np.cosh(u))).sum(-1)


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_sac_sample_action_logprob_matches_numpy(scale):
    cfg = small_config()
    params = sac.init_actor_params(jax.random.PRNGKey(0), 5, 2, cfg)
    params = randomize(params, 6, scale)  # scale 3 -> large |u|, saturated tanh
    obs = rand(1, (64, 5))
    key = jax.random.PRNGKey(7)

    mean, log_std = sac._distribution(params, obs, cfg)
    mean, log_std = np.asarray(mean, np.float64), np.asarray(log_std, np.float64)
    assert mean.shape == log_std.shape == (64, 2)
    # log-std squashed into [log_std_min, log_std_max] = [-10, 2]
    h = np.asarray(encoder(params["encoder"], obs), np.float64)
    raw = np_dense(params["log_std"], h)
    np.testing.assert_allclose(log_std, -10 + 0.5 * 12 * (np.tanh(raw) + 1), rtol=1e-4, atol=1e-4)
    assert (log_std >= -10).all() and (log_std <= 2).all()

    noise = np.asarray(jax.random.normal(key, mean.shape))  # the same noise sample_action draws
    action, logp = sac.sample_action(params, obs, key, cfg)
    action, logp = np.asarray(action), np.asarray(logp)
    want_action, want_logp = _np_tanh_gaussian_logp(mean, log_std, noise)
    assert action.shape == (64, 2) and logp.shape == (64,)
    assert np.all(np.isfinite(logp))
    np.testing.assert_allclose(action, want_action, atol=1e-5)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-3, atol=1e-2 if scale > 1 else 1e-3)


def test_sac_actions_inside_bounds():
    """Actions lie in (-1, 1); only where float32 tanh saturates (|u| > ~9, reachable at init since
    log-std spans [-10, 2]) may they round to exactly +-1, and the log-prob stays finite there."""
    cfg = small_config()
    params = sac.init_actor_params(jax.random.PRNGKey(0), 5, 2, cfg)
    obs = rand(1, (256, 5))
    key = jax.random.PRNGKey(2)
    a = np.asarray(sac.act(params, obs, key, False, cfg))
    assert a.shape == (256, 2)
    assert (np.abs(a) <= 1).all()
    mean, log_std = (np.asarray(t, np.float64) for t in sac._distribution(params, obs, cfg))
    u = mean + np.exp(log_std) * np.asarray(jax.random.normal(key, mean.shape))
    unsaturated = np.abs(u) < 8
    assert unsaturated.mean() > 0.5
    assert (np.abs(a[unsaturated]) < 1).all()
    assert np.isfinite(np.asarray(sac.sample_action(params, obs, key, cfg)[1])).all()
    # deterministic action is tanh(mean)
    mean, _ = sac._distribution(params, obs, cfg)
    np.testing.assert_allclose(np.asarray(sac.act(params, obs, None, True, cfg)), np.tanh(np.asarray(mean)),
                               atol=1e-6)


def test_ddpg_policy_and_noise():
    cfg = small_config(agent="ddpg")
    params = ddpg.init_actor_params(jax.random.PRNGKey(0), 5, 2, cfg)
    obs = rand(1, (512, 5))
    h = np_simba(params["encoder"], np.asarray(obs), 1)
    det = np.asarray(ddpg.act(params, obs, None, True, cfg))
    np.testing.assert_allclose(det, np.tanh(np_dense(params["action"], h)), atol=1e-5)
    noisy = np.asarray(ddpg.act(params, obs, jax.random.PRNGKey(3), False, cfg))
    assert (np.abs(noisy) <= 1).all()
    inside = np.abs(det) < 0.5  # away from the clip, the noise is N(0, 0.1^2)
    assert np.std((noisy - det)[inside]) == pytest.approx(0.1, rel=0.15)


# ----------------------------------------------------------------------------------------------
# The CPU speed choices of the update (docs/agents.md): same values as plain autodiff. The backend is
# forced to ``cpu`` so that the tuned forms are tested on any platform (tests/test_backend.py: the rest).


@pytest.mark.parametrize("x_shape, kernel_shape", [((256, 512), (512, 2048)), ((3, 7), (7, 5)),
                                                    ((4, 32, 88), (88, 48)), ((24, 40), (40, 16))])
def test_dense_gradients_match_plain_autodiff(x_shape, kernel_shape):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape)
    p = {"kernel": jax.random.normal(kk, kernel_shape), "bias": jnp.linspace(-1, 1, kernel_shape[1])}
    g = jax.random.normal(kg, (*x_shape[:-1], kernel_shape[1]))

    def loss(dense_fn):
        return lambda p, x: jnp.sum(jnp.tanh(dense_fn(p, x)) * g)

    with backend.use("cpu"):
        ours = jax.grad(loss(networks.dense), argnums=(0, 1))(p, x)
        # and under vmap (stacked seeds)
        xs, ps = jnp.stack([x, 2 * x]), jax.tree_util.tree_map(lambda a: jnp.stack([a, -a]), p)
        batched = jax.vmap(jax.grad(loss(networks.dense)))(ps, xs)
    plain = jax.grad(loss(lambda p, x: x @ p["kernel"] + p["bias"]), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batched["kernel"][0]), np.asarray(ours[0]["kernel"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(256, 2048), (16, 8), (88, 256), (7, 3)])
def test_tiled_transpose_is_the_transpose(shape):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    assert np.array_equal(np.asarray(networks._tiled_transpose(x)), np.asarray(x).T)


def test_global_norm_is_the_euclidean_norm_of_all_leaves():
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": [jnp.float32(-2.0), jnp.ones(5)]}
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in jax.tree_util.tree_leaves(tree)))
    assert float(common.global_norm(tree)) == pytest.approx(expected, rel=1e-6)
