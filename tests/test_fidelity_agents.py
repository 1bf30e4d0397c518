"""Fidelity to the reference implementations (issue 14, items 5-9), pinned by value.

* DDPG (SparseNetwork4DRL ``ddpg_update.py``): the actor loss and the TD target see
  ``clip(pi(s) + N(0, 0.1^2), -1, 1)``.
* DrQ-v2 (facebookresearch/drqv2): the std schedule counts agent steps; the action clamp is
  straight-through; every Linear layer is orthogonal (gain 1, zero bias); updates every 2 agent steps.
* AdamW decays every parameter by default (``weight_decay_on=all``), kernels only as the option.
* The replay agents' metrics.csv starts with a row at env step 0 (the untrained policy).
"""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_config
from sparserl import config, networks, sparsity, train
from sparserl.agents import common, ddpg, drqv2
from sparserl.agents.common import Batch, ObsStats

# ----------------------------------------------------------------------------------------------
# DDPG: policy noise in the actor loss and the TD target


def np_mlp(p: dict, x: np.ndarray) -> np.ndarray:
    """The library's MLP encoder (``arch=mlp``) by hand: Dense+ReLU, then more Dense+ReLU layers."""
    relu = lambda h: np.maximum(h, 0.0)
    h = relu(x @ np.asarray(p["embed"]["kernel"]) + np.asarray(p["embed"]["bias"]))
    i = 0
    while f"layer{i}" in p:
        h = relu(h @ np.asarray(p[f"layer{i}"]["kernel"]) + np.asarray(p[f"layer{i}"]["bias"]))
        i += 1
    return h


def np_policy(actor: dict, obs: np.ndarray) -> np.ndarray:
    h = np_mlp(actor["encoder"], obs)
    return np.tanh(h @ np.asarray(actor["action"]["kernel"]) + np.asarray(actor["action"]["bias"]))


def np_q(critic: dict, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    q = critic["q0"]
    h = np_mlp(q["encoder"], np.concatenate([obs, action], -1))
    return (h @ np.asarray(q["head"]["kernel"]) + np.asarray(q["head"]["bias"]))[:, 0]


OBS_DIM, ACT_DIM, N = 5, 3, 6


@pytest.fixture(scope="module")
def ddpg_setup():
    cfg = small_config(agent="ddpg", arch="mlp", obs_norm=False, gamma=0.9)
    state = ddpg.init(cfg, OBS_DIM, ACT_DIM)
    # a target that differs from the online critic, and a policy pushed towards saturation so that
    # the clip at [-1, 1] acts on some dimensions
    target = jax.tree_util.tree_map(lambda x: x * 1.1 + 0.01, state.target)
    actor_params = jax.tree_util.tree_map(lambda x: x * 3.0, state.actor.params)
    state = state._replace(target=target, actor=state.actor._replace(params=actor_params))
    rng = np.random.default_rng(7)
    batch = Batch(obs=jnp.asarray(rng.normal(size=(N, OBS_DIM)), jnp.float32),
                  action=jnp.asarray(rng.uniform(-1, 1, (N, ACT_DIM)), jnp.float32),
                  reward=jnp.asarray([1.0, -0.5, 0.25, 2.0, 0.0, -1.0], jnp.float32),
                  discount=jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0, 0.0], jnp.float32),
                  next_obs=jnp.asarray(rng.normal(size=(N, OBS_DIM)), jnp.float32))
    return cfg, state, batch


def noise(key, shape, std=0.1) -> np.ndarray:
    return std * np.asarray(jax.random.normal(key, shape))


def test_ddpg_td_target_adds_clipped_policy_noise(ddpg_setup):
    cfg, state, b = ddpg_setup
    assert cfg.ddpg.policy_noise == 0.1  # the reference's: its exploration std
    key = jax.random.PRNGKey(42)
    got = np.asarray(ddpg.td_targets(state.target, state.actor.params, b.next_obs, b.reward, b.discount, key, cfg))
    next_obs = np.asarray(b.next_obs)
    pi = np_policy(state.actor.params, next_obs)
    action = np.clip(pi + noise(key, pi.shape), -1.0, 1.0)
    assert (np.abs(pi + noise(key, pi.shape)) > 1).any()  # the clip is exercised
    want = np.asarray(b.reward) + 0.9 * np.asarray(b.discount) * np_q(state.target, next_obs, action)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    noiseless = np.asarray(b.reward) + 0.9 * np.asarray(b.discount) * np_q(state.target, next_obs, pi)
    assert np.abs(got - noiseless).max() > 1e-3  # the noise matters at this batch
    # policy_noise=0: the noiseless target
    cfg0 = small_config(agent="ddpg", arch="mlp", obs_norm=False, gamma=0.9, **{"ddpg.policy_noise": 0.0})
    got0 = ddpg.td_targets(state.target, state.actor.params, b.next_obs, b.reward, b.discount, key, cfg0)
    np.testing.assert_allclose(np.asarray(got0), noiseless, rtol=1e-5, atol=1e-5)


def test_ddpg_actor_loss_and_update_use_the_policy_noise(ddpg_setup):
    cfg, state, b = ddpg_setup
    key = jax.random.PRNGKey(3)
    obs = np.asarray(b.obs)
    pi = np_policy(state.actor.params, obs)
    want = -np_q(state.critic.params, obs, np.clip(pi + noise(key, pi.shape), -1.0, 1.0))
    got = np.asarray(ddpg.actor_losses(state.actor.params, state.critic.params, b.obs, key, cfg))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # one update step: the actor loss is taken at the state's key (split into update, actor, target keys)
    _, k_actor, _ = jax.random.split(state.key, 3)
    update_step = jax.jit(ddpg.update_step, static_argnums=3)
    _, metrics = update_step(state, b, ObsStats(jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM)), cfg)
    want_loss = -np_q(state.critic.params, obs, np.clip(pi + noise(k_actor, pi.shape), -1.0, 1.0)).mean()
    assert float(metrics["actor_loss"]) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-5)
    assert float(metrics["actor_loss"]) != pytest.approx(float(-np_q(state.critic.params, obs, pi).mean()), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# DrQ-v2: std schedule in agent steps, straight-through clamp, orthogonal init


def drq_config(**overrides):
    values = {"agent": "drqv2", "render.size": 16, "encoder.channels": 8, "encoder.layers": 2,
              "encoder.feature_dim": 12, "actor.width": 32, "critic.width": 32, "batch_size": 4}
    values.update(overrides)
    return config.build(values, check_env=False)


def test_drqv2_std_schedule_counts_agent_steps():
    cfg = drq_config()
    assert cfg.drqv2.std_steps == 500_000 and cfg.update_every == 2 and cfg.final_eval_episodes == 10
    for agent_step, std in ((0, 1.0), (100_000, 0.82), (250_000, 0.55), (500_000, 0.1), (2_000_000, 0.1)):
        assert float(drqv2.schedule_std(cfg, agent_step)) == pytest.approx(std, abs=1e-6), agent_step
    # the update's agent step: calls at warmup_steps + k * update_every (utd steps each)
    cfg3 = drq_config(utd=3)
    state = drqv2.DrQv2State(None, None, None, None, None, jnp.int32(3 * 10))  # 10 calls done
    assert int(drqv2.update_agent_step(state, cfg3)) == 2000 + 10 * 2
    assert float(drqv2._train_std(state, cfg3)) == pytest.approx(1.0 - 0.9 * 2020 / 500_000, abs=1e-6)


def test_straight_through_clamp_passes_the_gradient():
    x = jnp.array([-3.0, -0.5, 0.2, 0.999999, 1.7])
    y = drqv2.straight_through_clamp(x)
    np.testing.assert_array_equal(np.asarray(y), np.clip(np.asarray(x), -1 + 1e-6, 1 - 1e-6).astype(np.float32))
    weights = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    grad = jax.grad(lambda v: jnp.sum(weights * drqv2.straight_through_clamp(v)))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))  # saturated dims too
    # in the actor loss: a saturated noisy action still moves the mean
    mu = jnp.array([[0.95, -0.2]])
    g = jax.grad(lambda m: jnp.sum(drqv2._noisy(m, 1.0, jax.random.PRNGKey(0), 0.3)))(mu)
    np.testing.assert_array_equal(np.asarray(g), np.ones((1, 2)))


def orthogonality_error(kernel: np.ndarray, gain: float = 1.0) -> float:
    k = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]) / gain
    gram = k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T
    return float(np.abs(gram - np.eye(gram.shape[0])).max())


@pytest.mark.parametrize("blocks", [1, 2])
def test_drqv2_linear_layers_are_orthogonal_with_zero_bias(blocks):
    cfg = drq_config(**{"actor.blocks": blocks, "critic.blocks": blocks})
    state = drqv2.init(cfg, 0, 2)
    checked = []
    for module in ("actor", "critic"):
        for name, x in sparsity.named_leaves(getattr(state, module).params):
            if name.endswith("kernel"):
                assert orthogonality_error(x) < 1e-4, f"{module}/{name}"
                checked.append(f"{module}/{name}")
            elif name.endswith("/bias") and "norm" not in name:
                assert not np.asarray(x).any(), f"{module}/{name}"
    assert "actor/encoder/layer0/kernel" in checked and "critic/q1/encoder/layer0/kernel" in checked
    # actor: trunk, embed, layers, mean; critic: trunk and 2 x (embed, layers, head)
    assert len(checked) == (3 + blocks) + 1 + 2 * (2 + blocks)
    for name, x in sparsity.named_leaves(state.encoder.params):  # conv: orthogonal, gain sqrt(2) (ReLU)
        if name.endswith("kernel"):
            assert orthogonality_error(x, np.sqrt(2.0)) < 1e-4, name
    # the library's He-normal hidden layer (what drqv2 used before) fails the same check
    he = networks.init_encoder(jax.random.PRNGKey(0), 12, 32, 1, "mlp")["layer0"]["kernel"]
    assert orthogonality_error(he) > 0.3


# ----------------------------------------------------------------------------------------------
# Weight decay: every parameter by default, kernels only as the option


def _decayed(decay_on: str):
    params = networks.init_critic(jax.random.PRNGKey(0), 4, 2, 8, 1, "simba")
    params = jax.tree_util.tree_map(lambda x: x + 0.5, params)  # non-zero biases and LayerNorm biases
    mask = sparsity.make_mask(jax.random.PRNGKey(1), params, 0.5, always_dense=networks.critic_always_dense(params))
    params = sparsity.apply_mask(params, mask)
    cfg = small_config(lr=0.1, weight_decay=0.5, weight_decay_on=decay_on)
    tx = common.optimizer(cfg, mask)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)  # Adam's step is 0: only the decay moves
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    return params, optax.apply_updates(params, updates), mask


@pytest.mark.parametrize("decay_on", ["all", "kernels"])
def test_weight_decay_on_every_parameter_by_default(decay_on):
    assert config.Config().weight_decay_on == "all"
    before, after, mask = _decayed(decay_on)
    factor = 1.0 - 0.1 * 0.5
    names = dict(sparsity.named_leaves(mask))
    seen = set()
    for (name, b), (_, a) in zip(sparsity.named_leaves(before), sparsity.named_leaves(after)):
        b, a = np.asarray(b), np.asarray(a)
        if b.ndim >= 2 or decay_on == "all":
            np.testing.assert_allclose(a, factor * b, rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)  # biases, LayerNorm scale/bias untouched
        m = np.asarray(names[name])
        if m.ndim:
            assert not a[~m].any(), f"{name}: a pruned weight moved"
        seen.add(name.rsplit("/", 1)[-1] if "norm" not in name else "norm/" + name.rsplit("/", 1)[-1])
    assert {"kernel", "bias", "norm/scale", "norm/bias"} <= seen


# ----------------------------------------------------------------------------------------------
# The loop: update_every, and the step-0 row


def test_update_every_and_the_step_zero_row(tmp_path, monkeypatch):
    calls = []
    original = train.SeedGroup.learn

    def counting_learn(self, batches, stats, step):
        calls.append(step)
        return original(self, batches, stats, step)

    monkeypatch.setattr(train.SeedGroup, "learn", counting_learn)
    cfg = config.build({"env": "gym:Pendulum-v1", "env_steps": 600, "warmup_steps": 101, "update_every": 2,
                        "utd": 1, "eval_every": 400, "eval_episodes": 1, "final_eval_episodes": 1, "batch_size": 8,
                        "actor.width": 8, "critic.width": 8, "critic.blocks": 1, "diag_every": 0,
                        "progress": False, "run_dir": str(tmp_path / "run")})
    train.train(cfg, log=lambda m: None)
    assert calls == list(range(101, 300, 2))  # agent steps 101, 103, ..., 299: 100 update calls
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_step"]) for r in rows] == [0, 400, 600]
    first = rows[0]
    assert int(first["agent_step"]) == 0 and int(first["episodes"]) == 0 and int(first["eval_episodes"]) == 1
    assert first["critic_loss"] == first["actor_loss"] == first["train_return"] == first["steps_per_s"] == ""
    assert np.isfinite(float(first["eval_return"])) and float(first["critic_param_norm"]) > 0
    assert all(r["critic_loss"] != "" for r in rows[1:])  # both later rows saw updates


# ----------------------------------------------------------------------------------------------
# Stream AC(λ): adaptive ObGD divides by sqrt(v̂ + ε) (the reference's AdaptiveObGD)


def test_adaptive_obgd_puts_eps_inside_the_square_root():
    from sparserl import obgd

    g, delta, beta2, eps = 1e-6, 1.0, 0.999, 1e-8
    tx = obgd.adaptive_obgd(alpha=1.0, kappa=2.0, gamma=0.99, lamda=0.8, beta2=beta2, eps=eps)
    params = {"w": jnp.zeros((1,))}
    updates, state = tx.update({"w": jnp.full((1,), g)}, tx.init(params), params, delta=jnp.float32(delta))
    v_hat = (1 - beta2) * (delta * g) ** 2 / (1 - beta2)  # = (δg)² after one step: 1e-12, far below ε
    scaled = g / np.sqrt(v_hat + eps)  # ≈ 0.01; with ε outside the root it would be ≈ 0.99
    step = 1.0 / (1.0 * 2.0 * 1.0 * scaled) if 2.0 * scaled > 1 else 1.0  # the bound is inactive here
    assert float(updates["w"][0]) == pytest.approx(step * delta * scaled, rel=1e-4)
    assert float(updates["w"][0]) == pytest.approx(0.0099995, rel=1e-4)
