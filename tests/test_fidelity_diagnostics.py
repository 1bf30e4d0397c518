"""Issue 14, items 1-4: the diagnostics measure what the paper's code measures, pinned by value.

1. gradient norms are over kept weights (the applied gradient); 2. gradient-interference matrices
come from masked per-sample gradients; 3. the reference dormant ratio covers every Dense output but
the heads, pre-activation, pooled over layers; 4. the probe set is fresh per (seed, env step) or fixed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from sparserl import agents, checkpoint, config, diagnose, diagnostics, probe, replay, train
from sparserl.agents import common, sac
from sparserl.agents.common import Batch, ObsStats

OBS, ACT, N = 5, 2, 64


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def masked_flat(grads, mask) -> np.ndarray:
    """Flattened gradient with pruned coordinates zeroed, in numpy."""
    return np.concatenate([np.where(np.broadcast_to(np.asarray(m), g.shape), g, 0.0).ravel()
                           for g, m in zip(leaves(grads), jax.tree_util.tree_leaves(mask))])


def dense_flat(grads) -> np.ndarray:
    return np.concatenate([g.ravel() for g in leaves(grads)])


def cosine(g: np.ndarray) -> np.ndarray:
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    return unit @ unit.T


def random_batch(n: int = N, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    return Batch(rng.normal(size=(n, OBS)).astype(np.float32), rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
                 rng.normal(size=n).astype(np.float32), np.ones(n, np.float32), rng.normal(size=(n, OBS)).astype(np.float32))


STATS = ObsStats(np.zeros(OBS, np.float32), np.ones(OBS, np.float32))


# ----------------------------------------------------------------------------------------------
# 1. gradient norms


def test_masked_global_norm_is_the_norm_over_kept_weights():
    cfg = small_config(**{"critic.sparsity": 0.7})
    module = common.init_critic(cfg, jax.random.PRNGKey(0), OBS, ACT)
    rng = np.random.default_rng(1)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), module.params)
    expected = np.linalg.norm(masked_flat(grads, module.mask))
    dense = np.linalg.norm(dense_flat(grads))
    assert float(common.masked_global_norm(grads, module.mask)) == pytest.approx(expected, rel=1e-5)
    assert dense > 1.2 * expected  # 70% of the kernels pruned: the dense norm is far larger
    _, norm = jax.jit(common.step_module, static_argnums=0)(cfg, module, grads)
    assert float(norm) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("agent_name", ["sac", "ddpg"])
def test_agent_reports_the_norm_of_the_applied_gradient(agent_name, monkeypatch):
    cfg = small_config(**{"agent": agent_name, "actor.sparsity": 0.6, "critic.sparsity": 0.6})
    agent = agents.get(agent_name)
    state = agent.init(cfg, OBS, ACT)
    seen = []
    original = common.step_module

    def recording(cfg_, module, grads):
        seen.append(grads)
        return original(cfg_, module, grads)

    def update_and_grads(state, batch):  # the gradients step_module received, as outputs
        seen.clear()
        _, metrics = agent.update_step(state, batch, STATS, cfg)
        return metrics, list(seen)

    monkeypatch.setattr(common, "step_module", recording)
    metrics, grads_seen = jax.jit(update_and_grads)(state, random_batch(cfg.batch_size))
    assert len(grads_seen) == 2  # actor, then critic
    for name, grads in zip(("actor", "critic"), grads_seen):
        expected = np.linalg.norm(masked_flat(grads, getattr(state, name).mask))
        assert float(metrics[f"{name}_grad_norm"]) == pytest.approx(expected, rel=1e-5), name
        assert np.linalg.norm(dense_flat(grads)) > 1.05 * expected, name  # would fail on the dense norm


# ----------------------------------------------------------------------------------------------
# 2 and 3: one measurement of a sparse SAC state with planted dormant units


def plant_units(enc: dict) -> dict:
    """Units that tell the layer sets and definitions apart: a silent embedding unit (dead for the
    reference, not a ReLU unit), two hidden units with a large negative bias (dead after ReLU, alive
    before it), and three silent block-output units (dead for the reference only)."""
    enc = jax.tree_util.tree_map(lambda x: np.array(x), enc)
    enc["embed"]["kernel"][:, 0] = 0.0
    enc["embed"]["bias"][0] = 0.0
    enc["block0"]["hidden"]["bias"][:2] = -50.0
    enc["block1"]["out"]["kernel"][:, :3] = 0.0
    enc["block1"]["out"]["bias"][:3] = 0.0
    return jax.tree_util.tree_map(jnp.asarray, enc)


def layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def dense_outputs_by_hand(enc: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """The SimBa encoder in float64 numpy: every Dense layer's output (and the ReLU outputs)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), enc)
    out = {"embed": x @ p["embed"]["kernel"] + p["embed"]["bias"]}
    h = out["embed"]
    i = 0
    while f"block{i}" in p:
        b = p[f"block{i}"]
        pre = layer_norm(b["norm"], h) @ b["hidden"]["kernel"] + b["hidden"]["bias"]
        out[f"hidden{i}"], out[f"relu{i}"] = pre, np.maximum(pre, 0.0)
        out[f"out{i}"] = out[f"relu{i}"] @ b["out"]["kernel"] + b["out"]["bias"]
        h = h + out[f"out{i}"]
        i += 1
    return out


def dormant_mask_by_hand(h: np.ndarray, tau: float) -> np.ndarray:
    score = np.abs(h).mean(0)
    return score / (score.mean() + 1e-9) <= tau


@pytest.fixture(scope="module")
def measured():
    cfg = small_config(**{"critic.blocks": 2, "actor.sparsity": 0.5, "critic.sparsity": 0.6})
    state = sac.init(cfg, OBS, ACT)
    q0 = dict(state.critic.params["q0"], encoder=plant_units(state.critic.params["q0"]["encoder"]))
    state = state._replace(critic=state.critic._replace(params=dict(state.critic.params, q0=q0)))
    batch, key = random_batch(), jax.random.PRNGKey(3)
    scalars, cosines = probe.measure(state, batch, STATS, key, cfg, grad_samples=8)
    return cfg, state, batch, key, scalars, cosines


def test_interference_matrix_is_over_kept_weights(measured):
    cfg, state, batch, key, _, cosines = measured
    small = jax.tree_util.tree_map(lambda x: x[:8], batch)
    actor_fn, critic_fn, examples = sac.diagnostic_losses(state, small, STATS, key, cfg)
    for name, fn, module in (("actor", actor_fn, state.actor), ("critic", critic_fn, state.critic)):
        grad = jax.jit(jax.grad(fn))
        per_sample = [grad(module.params, jax.tree_util.tree_map(lambda x, i=i: x[i], examples)) for i in range(8)]
        masked = cosine(np.stack([masked_flat(g, module.mask) for g in per_sample]))
        dense = cosine(np.stack([dense_flat(g) for g in per_sample]))
        np.testing.assert_allclose(cosines[name], masked, atol=2e-5, err_msg=name)
        assert np.abs(dense - masked).max() > 1e-3, name  # the dense matrix is measurably different


def test_reference_dormant_ratio_over_the_reference_layer_set(measured):
    _, state, batch, _, scalars, _ = measured
    x = np.concatenate([batch.obs, batch.action], -1).astype(np.float64)  # obs normalised by mean 0, std 1
    out = dense_outputs_by_hand(state.critic.params["q0"]["encoder"], x)
    ref_layers = [out["embed"], out["hidden0"], out["out0"], out["hidden1"], out["out1"]]
    for tau in (0.1, 0.2):
        masks = [dormant_mask_by_hand(h, tau) for h in ref_layers]
        pooled = sum(m.sum() for m in masks) / sum(m.size for m in masks)
        assert scalars[f"critic_dormant_ref_tau{tau:g}"] == pytest.approx(pooled, abs=1e-7), tau
        # the planted units are what a wrong layer set or definition would miss or miscount
        assert masks[0][0] and masks[4][:3].all() and not masks[1][:2].any()
        hidden_only = np.concatenate([masks[1], masks[3]]).mean()
        per_layer_mean = np.mean([m.mean() for m in masks])
        assert pooled not in (pytest.approx(hidden_only), pytest.approx(per_layer_mean))
        # sparserl's own measure: the ReLU outputs, where the two biased-down units are dead
        relu = [out["relu0"], out["relu1"]]
        post = sum(dormant_mask_by_hand(h, tau).sum() for h in relu) / sum(h.shape[1] for h in relu)
        assert scalars[f"critic_dormant_post_act_tau{tau:g}"] == pytest.approx(post, abs=1e-7)
        assert post >= 2 / 128 and post != pytest.approx(pooled)
    assert "critic_dormant_pre_act_tau0.1" not in scalars  # the old, mislabelled column is gone


def test_reference_dormant_function_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    layers = [np.abs(rng.normal(size=(50, 8))) * rng.uniform(0, 1, 8), rng.normal(size=(50, 3)), np.zeros((50, 4))]
    layers[0][:, 2] *= 0.05  # dormant at 0.1
    for tau in (0.0, 0.1, 0.2):
        masks = [dormant_mask_by_hand(h, tau) if tau else np.abs(np.abs(h).mean(0)) <= 1e-8 for h in layers]
        expected = sum(m.sum() for m in masks) / 15
        assert diagnostics.dormant_ratio_reference(layers, tau) == pytest.approx(expected)
        as_f32 = [jnp.asarray(h, jnp.float32) for h in layers]
        assert float(jax.jit(diagnostics.dormant_ratio_reference_jax)(as_f32, tau)) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# 4. probe set


def filled_buffer(n: int = 200) -> replay.ReplayBuffer:
    buf = replay.ReplayBuffer(n, OBS, ACT)
    b = random_batch(n, seed=1)
    for i in range(n):
        buf.add(b.obs[i], b.action[i], b.reward[i], b.discount[i], b.next_obs[i])
    return buf


def test_fresh_probe_draws_are_a_function_of_seed_and_env_step():
    buf = filled_buffer()
    draw = lambda seed, step: probe.draw_probe_set(buf, 32, seed, step)  # noqa: E731
    a, again, later, other_seed = draw(0, 10_000), draw(0, 10_000), draw(0, 20_000), draw(1, 10_000)
    for x, y in zip(a, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.obs, later.obs) and not np.array_equal(a.obs, other_seed.obs)
    assert len({tuple(r) for r in a.obs}) == 32  # distinct transitions
    fixed = probe.draw_probe_set(buf, 32, 0)
    np.testing.assert_array_equal(fixed.obs, probe.draw_probe_set(buf, 32, 0).obs)
    assert not np.array_equal(fixed.obs, a.obs)  # the fixed draw is its own stream


def test_training_reuses_the_fixed_probe_set(tmp_path, monkeypatch):
    """diag_probe=fixed: one draw, reused and checkpointed (fresh, the default, is covered through
    training by tests/test_probes.py: no probe set in its checkpoints, diagnose recomputes its rows)."""
    seen = []
    monkeypatch.setattr(probe, "measure", lambda state, batch, *a, **k: (seen.append(batch), ({}, {}))[1])
    run_dir = tmp_path / "fixed"
    cfg = config.from_args(None, [
        "env=cartpole-balance", "env_steps=600", "warmup_steps=100", "eval_every=600", "eval_episodes=1",
        "final_eval_episodes=1", "checkpoint_every=600", "batch_size=8", "actor.width=8", "critic.width=8",
        "actor.blocks=1", "critic.blocks=1", "progress=false", "diag_every=200", "diag_probe_size=16",
        "diag_grad_samples=2", "diag_probe=fixed", f"run_dir={run_dir}"])
    train.train(cfg, log=lambda m: None)
    assert len(seen) >= 2 and all(np.array_equal(s.obs, seen[0].obs) for s in seen)
    arrays, _ = checkpoint.latest_valid(run_dir / "checkpoints", log=lambda m: None)
    np.testing.assert_array_equal(arrays["probe/obs"], seen[0].obs)
    _, _, batch, _, _ = diagnose.load_run(run_dir)  # `sparserl diagnose` measures on the same set
    np.testing.assert_array_equal(np.asarray(batch.obs), seen[0].obs)


def test_diag_probe_key_is_validated():
    assert config.build({}, check_env=False).diag_probe == "fresh"
    with pytest.raises(config.ConfigError):
        config.build({"diag_probe": "sometimes"}, check_env=False)


def test_per_sample_grads_mask_zeroes_exactly_the_pruned_coordinates():
    params = {"b": jnp.ones(3), "w": jnp.arange(6.0).reshape(2, 3)}
    mask = {"b": jnp.ones((), bool), "w": jnp.array([[True, False, True], [False, True, True]])}
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)), jnp.float32)
    g = diagnostics.per_sample_grads(lambda p, x: jnp.sum(p["w"] * x) + 2 * jnp.sum(p["b"]), params, xs, mask)
    for i in range(4):  # d/db = 2, d/dw = x, pruned entries 0; leaves in tree order (b, then w)
        expected = np.concatenate([np.full(3, 2.0), np.where(np.asarray(mask["w"]), np.asarray(xs[i]), 0).ravel()])
        np.testing.assert_array_equal(np.asarray(g[i]), expected)
