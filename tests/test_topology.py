"""Dynamic sparse topology (SET, RigL) by value: the drop/grow rule on hand-built tensors, invariants
through training (per-layer density, pruned weights and the target exactly zero, masks moving only at
topology steps, grown weights' moments zero), the schedule, config errors and an exact resume."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparserl import checkpoint, config, networks, sparsity, topology, train
from sparserl.agents import common, sac
from sparserl.seedgroup import SeedGroup

SMALL = {"critic.width": 16, "actor.width": 8, "critic.blocks": 1, "actor.sparsity": 0.6, "critic.sparsity": 0.8,
         "actor.topology": "set", "critic.topology": "rigl", "topology.every": 4, "utd": 2, "warmup_steps": 10,
         "env_steps": 400, "batch_size": 16, "lr": 1e-3}
OBS, ACT = 5, 2


def small_cfg(**over) -> config.Config:
    return config.build({**SMALL, **over}, check_env=False)


def random_batches(key, k: int, n: int) -> common.Batch:
    ks = jax.random.split(key, 3)
    obs = jax.random.normal(ks[0], (k, n, OBS))
    return common.Batch(obs, jax.random.uniform(ks[1], (k, n, ACT), minval=-1, maxval=1),
                        jax.random.normal(ks[2], (k, n)), jnp.ones((k, n)), obs * 0.9)


STATS = common.ObsStats(jnp.zeros(OBS), jnp.ones(OBS))


@pytest.fixture(scope="module")
def initial():
    """The initial SAC state of :func:`small_cfg` on the host (shared: an eager init takes a while)."""
    return jax.device_get(sac.init(small_cfg(), OBS, ACT))


def sparse_masks(module) -> dict:
    return {n: np.asarray(m) for n, m in sparsity.named_leaves(module.mask) if np.ndim(m)}


# ----------------------------------------------------------------------------------------------
# The rule on hand-built tensors


def test_rewire_tensor_drops_smallest_kept_and_grows_largest_pruned_score():
    w = jnp.array([[0.5, -0.1, 0.0, 0.9], [0.0, 0.2, -0.05, 0.0]])
    m = jnp.array([[True, True, False, True], [False, True, True, False]])
    score = jnp.array([[9.0, 9.0, 0.3, 9.0], [0.7, 9.0, 9.0, 0.1]])  # kept positions' scores must not matter
    new, n = topology.rewire_tensor(w, m, score, 0.4)  # floor(0.4 * 5) = 2 replaced
    assert int(n) == 2
    # dropped: -0.05 (1,2) and -0.1 (0,1), the two smallest |w| kept; grown: (1,0) 0.7 and (0,2) 0.3
    want = jnp.array([[True, False, True, True], [True, True, False, False]])
    np.testing.assert_array_equal(new, want)


def test_rewire_tensor_replaces_at_most_the_pruned_count_and_breaks_ties_by_index():
    m = jnp.array([True] * 5 + [False] * 2)
    w = jnp.array([1.0, 1.0, 1.0, 2.0, 3.0, 0.0, 0.0])
    new, n = topology.rewire_tensor(w, m, jnp.zeros(7), 0.9)  # floor(4.5) = 4, but only 2 were pruned
    assert int(n) == 2 and int(new.sum()) == 5
    np.testing.assert_array_equal(new, [False, False, True, True, True, True, True])  # ties: lower index first
    same, none = topology.rewire_tensor(w, m, jnp.zeros(7), 0.1)  # floor(0.5) = 0: nothing moves
    assert int(none) == 0 and bool((same == m).all())


def test_rewire_module_keeps_density_zeroes_pruned_weights_and_grown_moments(initial):
    cfg = small_cfg()
    critic = initial.critic
    grads = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), critic.params)
    critic, _ = jax.jit(common.step_module, static_argnums=0)(cfg, critic, grads)  # dense grads: non-zero moments
    scores = jax.tree_util.tree_map(lambda x: jax.random.uniform(jax.random.PRNGKey(2), x.shape), critic.params)
    new = jax.jit(topology.rewire_module)(critic, scores, 0.5)
    old_masks, new_masks = sparse_masks(critic), sparse_masks(new)
    assert old_masks
    adam = new.opt_state[0][0]  # chain(adamw = chain(scale_by_adam, ...), keep_masked)
    old_adam = critic.opt_state[0][0]
    for (name, m_old), m_new in zip(old_masks.items(), new_masks.values()):
        assert m_new.sum() == m_old.sum(), name  # per-layer density unchanged
        grown, dropped = m_new & ~m_old, m_old & ~m_new
        assert grown.sum() == dropped.sum() == np.floor(0.5 * m_old.sum())
        params = dict(sparsity.named_leaves(new.params))[name]
        assert np.all(np.asarray(params)[~m_new] == 0)  # dropped (and never kept) weights exactly zero
        mu = dict(sparsity.named_leaves(adam.mu))[name]
        nu = dict(sparsity.named_leaves(adam.nu))[name]
        assert np.all(np.asarray(mu)[grown] == 0) and np.all(np.asarray(nu)[grown] == 0)
        old_mu = np.asarray(dict(sparsity.named_leaves(old_adam.mu))[name])
        kept = m_old & m_new
        np.testing.assert_array_equal(np.asarray(mu)[kept], old_mu[kept])  # surviving weights keep their moments
        assert np.any(old_mu[grown] != 0)  # (the dense gradient had filled them: the reset is real)
    ever = [np.asarray(e) for e in jax.tree_util.tree_leaves(new.tracking.ever_active) if np.ndim(e)]
    assert all(e.sum() == m_old.sum() + (m_new & ~m_old).sum()
               for e, m_old, m_new in zip(ever, old_masks.values(), new_masks.values()))
    assert int(new.tracking.updates) == 1
    # sparse compute's layouts follow the new mask: equal to those built from it afresh
    fresh = sparsity.layouts(new.params, new.mask)
    assert jax.tree_util.tree_leaves(fresh)
    for a, b in zip(jax.tree_util.tree_leaves(new.layout), jax.tree_util.tree_leaves(fresh)):
        np.testing.assert_array_equal(a, b)
    assert float(new.tracking.replaced) == pytest.approx(
        sum((new_masks[k] & ~old_masks[k]).sum() for k in old_masks) / sum(m.sum() for m in old_masks.values()))


def test_rigl_grows_where_the_dense_gradient_is_largest_and_the_target_follows(initial):
    cfg = small_cfg()
    state = initial
    batch = jax.tree_util.tree_map(lambda x: x[0], random_batches(jax.random.PRNGKey(3), 1, 16))
    key = topology.seed_key(cfg)
    grads = jax.jit(lambda st: topology.dense_grads(sac, st, batch, STATS, jax.random.fold_in(key, 8), cfg))(state)
    new = jax.jit(lambda st: topology.update_state(sac, st, batch, STATS, key, 8, cfg))(state)
    grads = grads["critic"]
    fraction = float(topology.drop_fraction(cfg, 8))
    for (name, m_old), m_new in zip(sparse_masks(state.critic).items(), sparse_masks(new.critic).values()):
        g = np.abs(np.asarray(dict(sparsity.named_leaves(grads))[name]))
        grown = m_new & ~m_old
        n = int(np.floor(fraction * m_old.sum()))
        assert grown.sum() == n
        if n:  # every grown position's |grad| is at least every non-grown pruned one's
            assert g[grown].min() >= g[~m_old & ~grown].max()
        target = np.asarray(dict(sparsity.named_leaves(new.target))[name])
        assert np.all(target[~m_new] == 0)  # dropped weights leave the target too
        kept = m_old & m_new
        np.testing.assert_array_equal(target[kept], np.asarray(dict(sparsity.named_leaves(state.target))[name])[kept])


def test_rigl_on_the_pixel_encoder_grows_where_its_critic_loss_gradient_is_largest():
    """DrQ-v2's conv encoder (trained by the critic's loss alone): RigL regrows its kernels where the
    dense gradient of that loss with respect to the encoder is largest; kept counts never change."""
    from sparserl.agents import drqv2

    cfg = config.build({"agent": "drqv2", "render.size": 24, "encoder.channels": 8, "encoder.layers": 2,
                        "encoder.feature_dim": 16, "actor.width": 16, "critic.width": 16, "batch_size": 8,
                        "encoder.sparsity": 0.7, "encoder.topology": "rigl", "topology.every": 4}, check_env=False)
    state = drqv2.init(cfg, 0, 2)
    rng = np.random.default_rng(0)
    frames = lambda: jnp.asarray(rng.integers(0, 256, (8,) + drqv2.obs_shape(cfg)), jnp.uint8)  # noqa: E731
    batch = common.Batch(frames(), jnp.asarray(rng.uniform(-1, 1, (8, 2)), jnp.float32),
                         jnp.asarray(rng.normal(size=8), jnp.float32), jnp.full((8,), 0.97, jnp.float32), frames())
    stats = common.ObsStats(jnp.zeros(1), jnp.ones(1))
    key = topology.seed_key(cfg)
    grads = topology.dense_grads(drqv2, state, batch, stats, jax.random.fold_in(key, 4), cfg)["encoder"]
    new = topology.update_state(drqv2, state, batch, stats, key, 4, cfg)
    fraction = float(topology.drop_fraction(cfg, 4))
    checked = 0
    for (name, m_old), m_new in zip(sparse_masks(state.encoder).items(), sparse_masks(new.encoder).values()):
        g = np.abs(np.asarray(dict(sparsity.named_leaves(grads))[name]))
        grown = m_new & ~m_old
        assert m_new.sum() == m_old.sum() and grown.sum() == int(np.floor(fraction * m_old.sum()))
        assert g[grown].min() >= g[~m_old & ~grown].max() and g[~m_old].max() > 0
        assert np.all(np.asarray(dict(sparsity.named_leaves(new.encoder.params))[name])[~m_new] == 0)
        checked += 1
    assert checked == 2  # both conv kernels are sparse and rewired


def test_sparse_compute_multiplies_with_the_rewired_masks(initial):
    """sparsity.compute=sparse reads and trains the kept weights through each kernel's layout: after a
    topology update the layouts must follow the new masks, or grown weights would get no gradient (the
    forward alone cannot tell: grown weights start at 0, dropped ones are 0)."""
    cfg = small_cfg(**{"sparsity.compute": "sparse"})
    batch = jax.tree_util.tree_map(lambda x: x[0], random_batches(jax.random.PRNGKey(4), 1, 16))
    new = jax.jit(lambda st: topology.update_state(sac, st, batch, STATS, topology.seed_key(cfg), 4, cfg))(initial)
    assert any((a != b).any() for a, b in zip(sparse_masks(initial.critic).values(), sparse_masks(new.critic).values()))

    def q_sum(params, bound: bool):
        used = common.bind(cfg, params, new.critic) if bound else params
        return networks.critic(used, batch.obs, batch.action).sum()

    grads = jax.jit(jax.grad(q_sum), static_argnums=1)
    sparse_grads, masked_grads = grads(new.critic.params, True), grads(new.critic.params, False)
    for g_sparse, g_masked, m in zip(*(jax.tree_util.tree_leaves(t) for t in (sparse_grads, masked_grads,
                                                                                new.critic.mask))):
        np.testing.assert_allclose(g_sparse, np.where(m, g_masked, 0), rtol=1e-4, atol=1e-6)


def test_schedule_cosine_decay_due_steps_and_stop():
    cfg = small_cfg(**{"topology.every": 4, "utd": 2, "warmup_steps": 10, "topology.drop_fraction": 0.4,
                       "topology.stop": 12, "topology.decay_end": 16})
    assert float(topology.drop_fraction(cfg, 0)) == pytest.approx(0.4)
    assert float(topology.drop_fraction(cfg, 8)) == pytest.approx(0.2)
    assert float(topology.drop_fraction(cfg, 16)) == 0.0 and float(topology.drop_fraction(cfg, 40)) == 0.0
    # gradient steps after the call at agent step s: 2 * (s - 10 + 1); due when a multiple of 4 is reached
    assert [s for s in range(30) if topology.due(cfg, s)] == [11, 13, 15]  # grad steps 4, 8, 12; stop at 12
    const = small_cfg(**{"topology.schedule": "constant"})
    assert float(topology.drop_fraction(const, 10_000)) == pytest.approx(0.3)
    default = small_cfg()  # stop = 75% of (200 - 10) update calls * utd 2
    assert topology.stop_step(default) == int(0.75 * 380) and topology.decay_end(default) == topology.stop_step(default)
    assert not topology.due(small_cfg(**{"actor.topology": "static", "critic.topology": "static",
                                         "topology.every": 1000}), 11)


# ----------------------------------------------------------------------------------------------
# Through training: SeedGroup updates and topology updates


def train_group(cfg, calls: int, seed_cfgs=None, vmapped=False, states=None):
    """A SeedGroup of real SAC states updated ``calls`` times from agent step warmup; the masks and
    targets after each call, and whether a topology update was due."""
    seed_cfgs = seed_cfgs or [cfg]
    states = states or [sac.init(c, OBS, ACT) for c in seed_cfgs]
    group = SeedGroup(sac, cfg, seed_cfgs, states, vmapped)
    history = []
    for i in range(calls):
        step = cfg.warmup_steps + i
        batches = [random_batches(jax.random.PRNGKey(100 + i + 7 * j), cfg.utd, cfg.batch_size)
                   for j in range(len(seed_cfgs))]
        group.learn(batches, [STATS] * len(seed_cfgs), step)
        history.append((topology.due(cfg, step), jax.device_get(group.state(0))))  # (states are donated)
    return group, history


@pytest.fixture(scope="module")
def trained(initial):
    """One SeedGroup trained for 12 update calls (5 topology updates), and its history."""
    return train_group(small_cfg(), 12, states=[initial])


def test_masks_change_only_at_topology_steps_and_pruned_weights_stay_zero(trained, initial):
    _, history = trained
    previous = initial
    changes = []
    for due, state in history:
        for name in ("actor", "critic"):
            old, new = sparse_masks(getattr(previous, name)), sparse_masks(getattr(state, name))
            changed = any((old[k] != new[k]).any() for k in old)
            changes.append((due, changed))
            for k, m in new.items():
                assert m.sum() == old[k].sum()  # per-layer density invariant
                w = np.asarray(dict(sparsity.named_leaves(getattr(state, name).params))[k])
                assert np.all(w[~m] == 0), (name, k)
                if name == "critic":
                    assert np.all(np.asarray(dict(sparsity.named_leaves(state.target))[k])[~m] == 0)
        previous = state
    assert [c for due, c in changes if not due] and not any(c for due, c in changes if not due)
    assert [c for due, c in changes if due] and all(c for due, c in changes if due)
    assert int(history[-1][1].critic.tracking.updates) == sum(due for due, _ in history)


def test_state_checkpoint_roundtrip_resumes_identically(trained, initial):
    """Masks, ever-active trees and counters are agent state: a checkpointed state continues exactly."""
    cfg = small_cfg()
    group, _ = trained
    arrays = checkpoint.flatten_tree(jax.device_get(group.state(0)), "state")
    restored = checkpoint.unflatten_like(initial, arrays, "state")
    assert "state/critic/tracking/ever_active/q0/encoder/embed/kernel" in arrays
    other = SeedGroup(sac, cfg, [cfg], [restored], False)
    for i in range(12, 16):
        batches = [random_batches(jax.random.PRNGKey(100 + i), cfg.utd, cfg.batch_size)]
        group.learn(batches, [STATS], cfg.warmup_steps + i)
        other.learn(batches, [STATS], cfg.warmup_steps + i)
    for a, b in zip(jax.tree_util.tree_leaves(group.state(0)), jax.tree_util.tree_leaves(other.state(0))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_vmapped_seeds_rewire_like_single_seeds():
    cfg = small_cfg()
    seed_cfgs = [small_cfg(seed=s) for s in (0, 1)]
    group, _ = train_group(cfg, 4, seed_cfgs, vmapped=True)
    loop, _ = train_group(cfg, 4, seed_cfgs, vmapped=False)
    for i in range(2):  # masks are exact (the same draws); SET scores and RigL gradients agree
        for name in ("actor", "critic"):
            for a, b in zip(sparse_masks(getattr(group.state(i), name)).values(),
                            sparse_masks(getattr(loop.state(i), name)).values()):
                assert (a != b).mean() < 0.02
    assert not all((a == b).all() for a, b in zip(sparse_masks(group.state(0).actor).values(),
                                                  sparse_masks(group.state(1).actor).values()))


# ----------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("values, message", [
    ({"critic.topology": "rigl"}, "critic.topology=rigl: rewires a sparse mask, but critic.sparsity=0"),
    ({"topology.every": 5}, "topology.every=5: applies only when a module's topology is set or rigl"),
    ({"critic.topology": "set", "critic.sparsity": 0.5, "reset.every": 100}, "reset.every=100:"),
    ({"critic.topology": "set", "critic.sparsity": 0.5, "topology.schedule": "constant", "topology.decay_end": 4},
     "topology.decay_end=4: applies to topology.schedule=cosine only"),
    ({"critic.topology": "dynamic"}, "critic.topology='dynamic': must be one of static, set, rigl"),
    ({"critic.topology": "set", "critic.sparsity": 0.5, "topology.drop_fraction": 1.0}, "topology.drop_fraction=1.0"),
    ({"agent": "stream_ac", "critic.topology": "set", "critic.sparsity": 0.5}, "not supported by agent=stream_ac"),
    ({"agent": "drqv2", "encoder.topology": "rigl"}, "encoder.topology=rigl: rewires a sparse mask"),
])
def test_config_errors_are_one_line(values, message):
    with pytest.raises(config.ConfigError) as e:
        config.build(values, check_env=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_run_names_tell_topologies_apart():
    static = config.build({"critic.sparsity": 0.9}, check_env=False).default_name()
    rigl = config.build({"critic.sparsity": 0.9, "critic.topology": "rigl"}, check_env=False).default_name()
    assert rigl == static.replace("s0.9-seed", "s0.9rigl-seed") and rigl != static


# ----------------------------------------------------------------------------------------------
# A run killed mid-way resumes with identical metrics and diagnostics


@pytest.mark.slow
def test_killed_dynamic_run_resumes_with_identical_metrics(tmp_path):
    args = ["env=cartpole-balance", "env_steps=2000", "checkpoint_every=1000", "keep_checkpoints=10",
            "eval_every=1000", "warmup_steps=250", "eval_episodes=1", "final_eval_episodes=2", "batch_size=32",
            "actor.width=16", "critic.width=16", "critic.blocks=1", "actor.sparsity=0.5", "critic.sparsity=0.7",
            "actor.topology=set", "critic.topology=rigl", "topology.every=50", "diag_every=1000",
            "diag_probe_size=64", "diag_grad_samples=4", "progress=false"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train.train(config.from_args(None, args + [f"run_dir={ref_dir}"]), log=lambda m: None)
    assert checkpoint.complete_steps(ref_dir / "checkpoints") == [500, 1000]
    diag = (ref_dir / "diagnostics.csv").read_text()
    assert "critic_replaced" in diag and "actor_ever_active" in diag

    shutil.copytree(ref_dir, run_dir)  # as if killed right after the checkpoint at agent step 500
    for suffix in (".npz", ".json"):
        (run_dir / "checkpoints" / f"step_0000001000{suffix}").unlink()
    (run_dir / "summary.json").unlink()
    messages = []
    train.train(config.from_args(None, args + [f"run_dir={run_dir}"]), log=messages.append)
    assert any("resuming at env step 1000" in m for m in messages), messages
    assert (run_dir / "diagnostics.csv").read_text() == diag

    def without_timing(path):
        import csv
        rows = list(csv.DictReader(open(path / "metrics.csv")))
        return [{k: v for k, v in r.items() if k not in ("steps_per_s", "wall_time")} for r in rows]

    assert without_timing(run_dir) == without_timing(ref_dir)
