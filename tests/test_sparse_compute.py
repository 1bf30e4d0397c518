"""sparsity.compute=sparse: the C++ kernel (sparserl/csrc/sparse_matmul.cc) computes what masked-dense
computes, to float rounding — forward, input and kernel gradients, every layer shape the agents use,
under vmap over seeds, at batch 1 — and whole agent updates do too, with checkpoints usable by either."""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparserl import agents, checkpoint, config, networks, sparse_kernel, sparsity
from sparserl.agents import common
from sparserl.errors import ConfigError

pytestmark = pytest.mark.skipif(not sparse_kernel.available(),
                                reason=f"sparse kernel not built: {sparse_kernel.unavailable_reason()}")

# (in, out) of every kernel kind the agents multiply: SimBa embed (humanoid obs+act -> H), block hidden
# (H -> 4H) and out (4H -> H), heads (H -> |A|, H -> 1), Stream AC layers, DrQ-v2's trunk.
SHAPES = [(88, 64), (64, 256), (256, 64), (64, 21), (64, 1), (18, 128), (128, 128), (800, 50)]
LEADS = [(), (1,), (5,), (256,), (3, 7)]


def masked_kernel(key, shape, density):
    k_mask, k_w = jax.random.split(key)
    mask = jax.random.bernoulli(k_mask, density, shape)
    return mask, jax.random.normal(k_w, shape) * mask


def assert_close(a, b, scale=1.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.01])
def test_layer_forward_and_gradients_equal_masked_dense(shape, density):
    """Sparsity 0 to 0.99; leading axes cycle over the cases (none, batch 1, 5, 256, two axes)."""
    key = jax.random.fold_in(jax.random.PRNGKey(0), shape[0] * 1000 + shape[1])
    mask, kernel = masked_kernel(key, shape, density)
    lay = sparse_kernel.layout(mask)
    params = {"kernel": kernel, "bias": jax.random.normal(key, shape[-1:])}
    case = SHAPES.index(shape) + int(density * 100)
    for lead in (LEADS[case % len(LEADS)], LEADS[(case + 2) % len(LEADS)]):
        x = jax.random.normal(jax.random.fold_in(key, len(lead)), (*lead, shape[0]))
        g = jax.random.normal(jax.random.fold_in(key, 7), (*lead, shape[1]))

        def loss(p, x_, bound):
            p = sparsity.bind(p, {"kernel": lay, "bias": None}, "sparse") if bound else p
            return jnp.vdot(networks.dense(p, x_), g)

        y_sparse = networks.dense(sparsity.bind(params, {"kernel": lay, "bias": None}, "sparse"), x)
        assert y_sparse.shape == (*lead, shape[1])
        assert_close(y_sparse, networks.dense(params, x), scale=np.sqrt(shape[0]))
        gp_s, gx_s = jax.grad(loss, (0, 1))(params, x, True)
        gp_d, gx_d = jax.grad(loss, (0, 1))(params, x, False)
        assert_close(gx_s, gx_d, scale=np.sqrt(shape[1]))
        assert_close(gp_s["kernel"], jnp.where(mask, gp_d["kernel"], 0), scale=np.sqrt(max(1, x.size // shape[0])))
        assert_close(gp_s["bias"], gp_d["bias"])
        assert np.all(np.asarray(gp_s["kernel"])[~np.asarray(mask)] == 0)  # never computed at pruned positions


def test_fixed_kernel_gives_the_input_gradient_only():
    """``bind(..., fixed=True)`` (the critic inside the actor's loss): the same products and input
    gradient, and a zero kernel gradient (never computed)."""
    mask, kernel = masked_kernel(jax.random.PRNGKey(5), (96, 160), 0.1)
    lay = {"kernel": sparse_kernel.layout(mask), "bias": None}
    params = sparsity.to_storage({"kernel": kernel, "bias": jnp.ones(160)}, lay, "sparse")
    x = jax.random.normal(jax.random.PRNGKey(6), (40, 96))

    def loss(p, x_, fixed):
        return jnp.sum(jnp.tanh(networks.dense(sparsity.bind(p, lay, "sparse", fixed), x_)))

    bound = sparsity.bind(params, lay, "sparse", fixed=True)
    assert isinstance(bound["kernel"], sparsity.FixedSparseKernel)
    (gp_fixed, gx_fixed), (gp, gx) = (jax.grad(loss, (0, 1))(params, x, f) for f in (True, False))
    np.testing.assert_array_equal(gx_fixed, gx)
    assert np.all(np.asarray(gp_fixed["kernel"]) == 0) and np.any(np.asarray(gp["kernel"]) != 0)
    assert_close(gx, jax.grad(lambda x_: jnp.sum(jnp.tanh(x_ @ kernel + 1.0)))(x), scale=10)


def test_layout_round_trips_and_handles_empty_rows_and_columns():
    mask = np.zeros((6, 5), bool)
    mask[0, 4] = mask[3, 0] = mask[3, 2] = mask[5, 4] = True  # rows 1, 2, 4 and columns 1, 3 empty
    kernel = jnp.where(mask, jnp.arange(30.0).reshape(6, 5) + 1, 0)
    lay = sparse_kernel.layout(jnp.asarray(mask))
    values = sparse_kernel.compact(kernel, lay)
    np.testing.assert_array_equal(values, [16.0, 18.0, 5.0, 30.0])  # CSC order: (3,0) (3,2) (0,4) (5,4)
    np.testing.assert_array_equal(sparse_kernel.expand(values, lay), kernel)
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 6))
    assert_close(sparse_kernel.matmul(values, lay, x), x @ kernel)
    # jittable with the count given: a changing mask of fixed count re-lays out without recompiling
    relay = jax.jit(sparse_kernel.layout, static_argnums=1)
    for seed in range(3):
        m = jax.random.permutation(jax.random.PRNGKey(seed), jnp.arange(30) < 7).reshape(6, 5)
        np.testing.assert_array_equal(sparse_kernel.expand(sparse_kernel.compact(kernel + 1, relay(m, 7)), relay(m, 7)),
                                      jnp.where(m, kernel + 1, 0))
    assert relay._cache_size() == 1


@pytest.mark.parametrize("batch", [1, 32])
def test_vmap_over_seeds_equals_each_seed_alone(batch):
    shape, seeds, nnz = (64, 256), 3, 1600
    masks = jnp.stack([jax.random.permutation(jax.random.PRNGKey(s), jnp.arange(64 * 256) < nnz).reshape(shape)
                       for s in range(seeds)])
    kernels = jax.random.normal(jax.random.PRNGKey(9), (seeds, *shape)) * masks
    lays = jax.vmap(lambda m: sparse_kernel.layout(m, nnz))(masks)
    values = jax.vmap(sparse_kernel.compact)(kernels, lays)
    xs = jax.random.normal(jax.random.PRNGKey(2), (seeds, batch, 64))
    g = jax.random.normal(jax.random.PRNGKey(3), (seeds, batch, 256))

    def fwd_bwd(v, lay, x, g_):
        y, pull = jax.vjp(lambda v_, x_: sparse_kernel.matmul(v_, lay, x_), v, x)
        return (y, *pull(g_))

    stacked = jax.jit(jax.vmap(fwd_bwd))(values, lays, xs, g)
    shared_x = jax.jit(jax.vmap(fwd_bwd, in_axes=(0, 0, None, 0)))(values, lays, xs[0], g)  # one x for all seeds
    for s in range(seeds):
        lay = jax.tree_util.tree_map(lambda a: a[s], lays)
        alone = fwd_bwd(values[s], lay, xs[s], g[s])
        for a, b in zip(alone, stacked):
            np.testing.assert_array_equal(a, b[s])  # the same code per seed: bit for bit
        y_ref = xs[s] @ kernels[s]
        assert_close(stacked[0][s], y_ref, scale=8)
        alone0 = fwd_bwd(values[s], lay, xs[0], g[s])
        for a, b in zip(alone0, shared_x):
            np.testing.assert_array_equal(a, b[s])


def _batch(key, batch, obs_dim, action_dim):
    ks = jax.random.split(key, 5)
    return common.Batch(jax.random.normal(ks[0], (1, batch, obs_dim)),
                        jax.random.uniform(ks[1], (1, batch, action_dim), minval=-1, maxval=1),
                        jax.random.normal(ks[2], (1, batch)), jnp.ones((1, batch)),
                        jax.random.normal(ks[3], (1, batch, obs_dim)))


def _kept_view(state):
    """The state with AdamW's moments masked: at pruned positions masked mode accumulates the dense
    gradient there, sparse mode never computes it; neither is ever applied to a weight."""
    def module_view(m):
        def moments(node):
            if isinstance(node, optax.ScaleByAdamState):
                return node._replace(mu=sparsity.apply_mask(node.mu, m.mask), nu=sparsity.apply_mask(node.nu, m.mask))
            return node
        opt = jax.tree_util.tree_map(moments, m.opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
        return m._replace(opt_state=opt)
    return state._replace(**{name: module_view(m) for name, m in agents.modules(state).items()})


@functools.lru_cache(maxsize=None)
def _update_fn(agent_name, cfg):
    return jax.jit(lambda s, b, stats: agents.get(agent_name).update(s, b, stats, cfg))


def _run(agent_name, cfg, state, steps, obs_dim, action_dim, stats, first=0):
    """``steps`` updates on the batches numbered ``first``, ``first+1``, ..."""
    update = _update_fn(agent_name, cfg)
    metrics = []
    for i in range(first, first + steps):
        state, m = update(state, _batch(jax.random.PRNGKey(100 + i), cfg.batch_size, obs_dim, action_dim), stats)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("agent_name", ["sac", "ddpg"])
def test_whole_updates_equal_masked_and_checkpoints_interchange(agent_name, make_config, tmp_path):
    obs_dim, action_dim, steps = 17, 6, 4
    stats = common.ObsStats(jnp.zeros(obs_dim), jnp.ones(obs_dim))
    base = {"agent": agent_name, "critic.width": 64, "critic.blocks": 2, "actor.width": 32, "batch_size": 16,
            "critic.sparsity": 0.9, "actor.sparsity": 0.8}
    masked = make_config(**base, **{"sparsity.compute": "masked"})
    sparse = make_config(**base, **{"sparsity.compute": "sparse"})
    state0 = agents.get(agent_name).init(masked, obs_dim, action_dim)
    sparse0 = agents.get(agent_name).init(sparse, obs_dim, action_dim)
    # sparse mode stores the pruned kernels compact: the parameters, AdamW's moments and the target
    # critic all hold the kept values only; masked-dense again, they are the masked-mode state exactly
    compact = [x for x, m in zip(jax.tree_util.tree_leaves(sparse0.critic.params),
                                 jax.tree_util.tree_leaves(sparse0.critic.mask)) if sparsity.is_compact(x, m)]
    assert compact and all(x.ndim == 1 for x in compact)
    assert sum(x.size for x in jax.tree_util.tree_leaves(sparse0.target)) < 0.5 * sum(
        x.size for x in jax.tree_util.tree_leaves(state0.target))
    for a, b in zip(jax.tree_util.tree_leaves(common.dense_state(sparse0)), jax.tree_util.tree_leaves(state0)):
        np.testing.assert_array_equal(a, b)
    assert sparse0.critic.params["q0"]["encoder"]["block0"]["hidden"]["kernel"].ndim == 1
    ref, ref_metrics = _run(agent_name, masked, state0, steps, obs_dim, action_dim, stats)
    out, out_metrics = _run(agent_name, sparse, sparse0, steps, obs_dim, action_dim, stats)
    out = common.dense_state(out)
    for a, b in zip(jax.tree_util.tree_leaves(_kept_view(ref)), jax.tree_util.tree_leaves(_kept_view(out))):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(a, b)
    for m_ref, m_out in zip(ref_metrics, out_metrics):
        for k in m_ref:
            np.testing.assert_allclose(m_ref[k], m_out[k], rtol=1e-4, atol=1e-5)
    for module in (out.actor, out.critic):  # pruned weights stay exactly zero
        for x, m in zip(jax.tree_util.tree_leaves(module.params), jax.tree_util.tree_leaves(module.mask)):
            if jnp.ndim(m) == 2:
                assert np.all(np.asarray(x)[~np.asarray(m)] == 0.0)
    # a checkpoint written in sparse mode resumes in masked mode (and back): same arrays, same names
    # (checkpoints hold the masked-dense form, as the training loops write it)
    def save_load(state, directory):
        checkpoint.save(directory, 2, checkpoint.flatten_tree(common.dense_state(state), "state"), {})
        arrays, _ = checkpoint.load(directory, 2)
        return checkpoint.unflatten_like(state0, arrays, "state")

    half, _ = _run(agent_name, sparse, sparse0, 2, obs_dim, action_dim, stats)
    tails = [_run(agent_name, masked, save_load(half, tmp_path / "a"), 2, obs_dim, action_dim, stats, first=2)[0]]
    half_masked, _ = _run(agent_name, masked, state0, 2, obs_dim, action_dim, stats)
    resumed = common.stored_state(save_load(half_masked, tmp_path / "b"), sparse)
    tails.append(common.dense_state(_run(agent_name, sparse, resumed, 2, obs_dim, action_dim, stats, first=2)[0]))
    for tail in tails:
        for a, b in zip(jax.tree_util.tree_leaves(ref.critic.params), jax.tree_util.tree_leaves(tail.critic.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_stream_ac_steps_equal_masked():
    """Stream AC(λ) at batch 1: sparse mode (compact parameters and ObGD traces) steps as masked mode
    does, through an episode end (traces reset), for every module and trace."""
    from sparserl.agents import stream_ac

    obs_dim, action_dim, time_limit = 5, 2, 50
    states, rng = {}, np.random.default_rng(0)
    transitions = [np.concatenate([rng.normal(size=obs_dim), [rng.normal(), float(i == 7), 0.0]]).astype(np.float32)
                   for i in range(12)]
    first_obs = jnp.asarray(rng.normal(size=obs_dim), jnp.float32)
    for compute in ("masked", "sparse"):
        cfg = config.build({"agent": "stream_ac", "action_repeat": 1, "actor.width": 48, "critic.width": 48,
                            "actor.sparsity": 0.9, "critic.sparsity": 0.8, "sparsity.compute": compute,
                            "progress": False}, check_env=False)
        step = jax.jit(lambda s, tr, cfg=cfg: stream_ac.step(s, tr, cfg, time_limit))
        state, _ = jax.jit(lambda s, o, cfg=cfg: stream_ac.begin(s, o, cfg, time_limit))(
            stream_ac.init(cfg, obs_dim, action_dim), first_obs)
        if compute == "sparse":
            kernel = state.critic.params["layer1"]["kernel"]
            assert kernel.ndim == 1 and kernel.size == int(np.asarray(state.critic.mask["layer1"]["kernel"]).sum())
        for tr in transitions:
            state, _, _ = step(state, jnp.asarray(tr))
        states[compute] = common.dense_state(state)
    for a, b in zip(jax.tree_util.tree_leaves(states["masked"]), jax.tree_util.tree_leaves(states["sparse"])):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


def test_topology_update_of_a_compact_state_equals_the_masked_one():
    """RigL through the SeedGroup: the compact training state goes masked-dense for the update (dense
    gradients, new masks) and compact again under the new layouts; masks and weights equal masked mode's."""
    from sparserl.agents import sac
    from sparserl.seedgroup import SeedGroup

    obs_dim, action_dim = 6, 2
    stats = common.ObsStats(jnp.zeros(obs_dim), jnp.ones(obs_dim))
    batches = _batch(jax.random.PRNGKey(3), 16, obs_dim, action_dim)
    groups = {}
    for compute in ("masked", "sparse"):
        cfg = config.build({"critic.width": 32, "critic.blocks": 1, "actor.width": 16, "batch_size": 16, "utd": 1,
                            "critic.sparsity": 0.9, "actor.sparsity": 0.8, "critic.topology": "rigl",
                            "topology.drop_fraction": 0.3, "sparsity.compute": compute}, check_env=False)
        group = SeedGroup(sac, cfg, [cfg], [sac.init(cfg, obs_dim, action_dim)], vmapped=False)
        group.learn([batches], [stats], 0)
        group.rewire([batches], [stats], 10)
        group.learn([batches], [stats], 11)  # trains through the new layouts
        groups[compute] = common.dense_state(group.states[0])
    masked, sparse = groups["masked"], groups["sparse"]
    for a, b in zip(jax.tree_util.tree_leaves(masked.critic.mask), jax.tree_util.tree_leaves(sparse.critic.mask)):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(masked.critic.mask), jax.tree_util.tree_leaves(masked.critic.tracking.ever_active)))
    for a, b in zip(jax.tree_util.tree_leaves(masked.critic.params), jax.tree_util.tree_leaves(sparse.critic.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_chooses_sparse_only_where_it_pays():
    assert sparsity.sparse_layer((1024, 4096), int(0.1 * 1024 * 4096), "auto")
    assert sparsity.sparse_layer((2048, 8192), int(0.2 * 2048 * 8192), "auto")
    assert sparsity.sparse_layer((256, 256), int(0.05 * 256 * 256), "auto")
    assert not sparsity.sparse_layer((1024, 4096), int(0.5 * 1024 * 4096), "auto")  # too dense to pay
    assert not sparsity.sparse_layer((2048, 8192), int(0.3 * 2048 * 8192), "auto")
    assert not sparsity.sparse_layer((16, 64), 100, "auto")                           # too small to pay
    assert not sparsity.sparse_layer((128, 128), 1600, "auto")  # Stream AC's default width: masked
    assert not sparsity.sparse_layer((1024, 4096), 1000, "masked")
    assert sparsity.sparse_layer((16, 64), 100, "sparse")


def test_compute_key_is_validated(make_config):
    with pytest.raises(ConfigError, match="sparsity.compute"):
        config.from_args(None, ["sparsity.compute=fast"], check_env=False)
    assert make_config(**{"sparsity.compute": "auto"}).sparsity.compute == "auto"
    # compact kernels of i.i.d. masks differ in length between seeds: they cannot be vmapped together
    with pytest.raises(ConfigError, match="sparsity.draw=bernoulli"):
        config.from_args(None, ["sparsity.compute=sparse", "sparsity.draw=bernoulli", "num_seeds=2",
                                "seed_parallel=vmap"], check_env=False)
    assert config.from_args(None, ["sparsity.compute=sparse", "sparsity.draw=bernoulli", "num_seeds=2",
                                   "seed_parallel=loop"], check_env=False).num_seeds == 2


def test_failed_build_is_one_line(tmp_path):
    """A missing compiler: the first-use build fails with one line naming the failure (callers then
    warn once and compute masked)."""
    code = ("import os, sys; from sparserl import sparse_kernel as sk\n"
            "try:\n    sk.build_into_cache()\nexcept OSError as e:\n    print('ERR', e)\n")
    env = {**__import__("os").environ, "CXX": "/nonexistent/c++", "SPARSERL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERR"), out.stdout + out.stderr


def test_plain_backend_computes_masked(recwarn):
    """The plain backend (GPU/TPU's choices) has no custom kernels: auto is masked, sparse warns once
    and is masked — the same numbers as masked by construction."""
    from sparserl import backend

    with backend.use("plain"):
        assert not sparsity.sparse_layer((1024, 4096), 1000, "auto")
        assert not sparsity.sparse_layer((1024, 4096), 1000, "sparse")
        assert not sparsity.sparse_layer((512, 2048), 1000, "sparse")
    assert sum("falls back to masked" in str(w.message) for w in recwarn.list) == 1


def test_inspected_flops_are_the_same_in_every_mode():
    """XLA cannot count a custom kernel's FLOPs: the update's FLOPs are reported as masked-dense compute
    whatever sparsity.compute, instead of dropping the sparse products."""
    from sparserl import inspection

    flops = {}
    for compute in ("masked", "sparse"):
        cfg = config.build({"critic.width": 64, "actor.width": 32, "critic.sparsity": 0.9, "actor.sparsity": 0.9,
                            "sparsity.compute": compute}, check_env=False)
        state = jax.eval_shape(lambda cfg=cfg: agents.get("sac").init(cfg, 17, 6))
        flops[compute] = inspection.update_flops(cfg, state, 17, 6, compile=False)
    assert flops["masked"] > 0 and flops["sparse"] == flops["masked"]


def test_training_loop_in_sparse_mode_checkpoints_and_resumes_exactly(tmp_path):
    """The replay loop with compact kernels: acting (batch-1 sparse products), evaluation, masked-dense
    checkpoints mid-run, and a resume from the middle one that writes the uninterrupted run's rows."""
    import csv
    import shutil

    from sparserl import train

    def run(run_dir):
        cfg = config.build({"env": "cartpole-balance", "env_steps": 1200, "warmup_steps": 200, "eval_every": 400,
                            "eval_episodes": 1, "final_eval_episodes": 1, "batch_size": 16, "actor.width": 32,
                            "critic.width": 32, "critic.blocks": 1, "actor.sparsity": 0.8, "critic.sparsity": 0.9,
                            "sparsity.compute": "sparse", "checkpoint_every": 400, "keep_checkpoints": 10,
                            "progress": False, "run_dir": str(run_dir)})
        train.train(cfg, log=lambda m: None)

    def rows(run_dir):
        with open(run_dir / "metrics.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k not in ("steps_per_s", "wall_time")} for r in csv.DictReader(f)]

    ref = tmp_path / "ref"
    run(ref)
    steps = checkpoint.complete_steps(ref / "checkpoints")
    assert len(steps) >= 2
    arrays, _ = checkpoint.load(ref / "checkpoints", steps[0])
    kernel = next(v for k, v in arrays.items() if k.startswith("state/") and "critic" in k and k.endswith("kernel")
                  and v.ndim == 2 and v.size > 32 * 32)
    assert 0.85 < float(np.mean(kernel == 0)) < 0.95  # written masked-dense, pruned entries 0
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "summary.json").unlink()
    for step in steps[1:]:
        for suffix in (".npz", ".json"):
            (resumed / "checkpoints" / f"step_{step:010d}{suffix}").unlink()
    run(resumed)
    assert rows(resumed) == rows(ref) and len(rows(ref)) == 4
