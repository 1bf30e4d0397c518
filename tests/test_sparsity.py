"""Static sparsity: ERK/uniform allocation, mask draws, seeds, and pruned weights staying at zero."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparserl import agents, networks, sparsity
from sparserl.agents import sac
from sparserl.agents.common import Batch, ObsStats

from conftest import small_config


# ----------------------------------------------------------------------------------------------
# helpers (independent of the package's own bookkeeping)


def shapes_of(params) -> dict[str, tuple[int, ...]]:
    return {n: tuple(x.shape) for n, x in sparsity.named_leaves(params)}


def kept_count(mask_leaf, shape) -> int:
    """Number of kept entries of one tensor given its mask leaf (scalar True = all kept)."""
    m = np.asarray(mask_leaf)
    if m.ndim == 0:
        assert bool(m), "a scalar mask leaf must be True"
        return math.prod(shape)
    assert m.shape == tuple(shape)
    assert m.dtype == np.bool_
    return int(m.sum())


def realised(params, mask) -> dict[str, tuple[int, int]]:
    """name -> (kept, size), counted from the mask itself."""
    out = {}
    for (name, x), (_, m) in zip(sparsity.named_leaves(params), sparsity.named_leaves(mask)):
        out[name] = (kept_count(m, x.shape), math.prod(x.shape))
    return out


def critic_group(name: str) -> str | None:
    if name.endswith("embed/kernel"):
        return "embed"
    if "/block" in name and name.endswith("/kernel"):
        return "block"
    if name.endswith("head/kernel"):
        return "head"
    return None


def actor_group(name: str) -> str | None:
    if name.endswith("embed/kernel"):
        return "embed"
    if "/block" in name and name.endswith("/kernel"):
        return "block"
    if name in ("mean/kernel", "log_std/kernel"):
        return "head"
    return None


OBS_DIM, ACT_DIM, BATCH = 5, 2, 8


def small_critic(num_q: int = 1):
    """The critic of the tiny agents below (7 inputs, width 16, 1 block): reusing these shapes
    lets the eager mask draws share compiled kernels across tests."""
    return networks.init_critic(jax.random.PRNGKey(0), OBS_DIM, ACT_DIM, 16, 1, "simba", num_q=num_q)


# ----------------------------------------------------------------------------------------------
# ERK reproduces the PAPER.md §2 table (reference semantics: budget over all parameters)

CRITIC_TABLE = {  # S -> (embedding, each block kernel, Q head) sparsity
    0.8: (0.00, 0.810, 0.00),
    0.9: (0.489, 0.906, 0.00),
    0.95: (0.750, 0.954, 0.00),
}


@pytest.mark.parametrize("S", sorted(CRITIC_TABLE))
def test_erk_humanoid_critic_matches_paper_table(humanoid_critic, S):
    params = humanoid_critic
    always_dense = networks.critic_always_dense(params)
    assert always_dense == ("q0/head",)
    shapes = shapes_of(params)
    expected = dict(zip(("embed", "block", "head"), CRITIC_TABLE[S]))

    density = sparsity.allocate(shapes, S, "erk", "all", always_dense)
    groups_seen = set()
    for name, shape in shapes.items():
        g = critic_group(name)
        if g is None:  # every 1-D tensor (bias, LayerNorm) stays dense
            assert len(shape) == 1
            assert density[name] == 1.0
            continue
        groups_seen.add(g)
        assert 1.0 - density[name] == pytest.approx(expected[g], abs=0.01), name
    assert groups_seen == {"embed", "block", "head"}
    assert sum(1 for n in shapes if critic_group(n) == "block") == 4

    # The realised mask (exact draw) has the same per-layer sparsity.
    mask = sparsity.make_mask(jax.random.PRNGKey(1), params, S, "erk", "all", "exact", always_dense)
    for name, (kept, size) in realised(params, mask).items():
        g = critic_group(name)
        want = 0.0 if g is None else expected[g]
        assert 1.0 - kept / size == pytest.approx(want, abs=0.01), name

    # kept total (1-D tensors included) is (1-S) of all parameters
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(k for k, _ in realised(params, mask).values())
    assert abs(kept - (1 - S) * total) <= 0.005 * (1 - S) * total


def test_erk_humanoid_actor_matches_paper_table(humanoid_actor):
    params = humanoid_actor
    shapes = shapes_of(params)
    assert shapes["encoder/embed/kernel"] == (67, 128)
    assert shapes["mean/kernel"] == shapes["log_std/kernel"] == (128, 21)
    expected = {"embed": 0.83, "block": 0.927, "head": 0.584}

    density = sparsity.allocate(shapes, 0.9, "erk", "all")
    mask = sparsity.make_mask(jax.random.PRNGKey(2), params, 0.9, "erk", "all", "exact")
    counts = realised(params, mask)
    for name, shape in shapes.items():
        g = actor_group(name)
        if g is None:
            assert len(shape) == 1 and density[name] == 1.0 and counts[name][0] == counts[name][1]
            continue
        assert 1.0 - density[name] == pytest.approx(expected[g], abs=0.01), name
        kept, size = counts[name]
        assert 1.0 - kept / size == pytest.approx(expected[g], abs=0.01), name


def test_erk_density_proportional_to_sum_over_prod(humanoid_actor):
    """ERK definition: unsaturated densities are eps * sum(shape)/prod(shape) with one eps."""
    shapes = shapes_of(humanoid_actor)
    density = sparsity.allocate(shapes, 0.9, "erk", "all")
    ratios = [density[n] / (sum(s) / math.prod(s)) for n, s in shapes.items() if len(s) >= 2]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)


@pytest.mark.parametrize("S", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_budget_all_keeps_fraction_of_total(humanoid_critic, S):
    params = humanoid_critic
    always_dense = networks.critic_always_dense(params)
    shapes = shapes_of(params)
    total = sum(math.prod(s) for s in shapes.values())
    density = sparsity.allocate(shapes, S, "erk", "all", always_dense)
    expected_kept = sum(density[n] * math.prod(s) for n, s in shapes.items())
    assert expected_kept == pytest.approx((1 - S) * total, rel=1e-6)
    assert all(0.0 < d <= 1.0 for d in density.values())


def test_erk_budget_all_realised_on_small_net():
    params = small_critic()
    ad = networks.critic_always_dense(params)
    S = 0.8
    mask = sparsity.make_mask(jax.random.PRNGKey(3), params, S, "erk", "all", "exact", ad)
    counts = realised(params, mask)
    total = sum(size for _, size in counts.values())
    kept = sum(k for k, _ in counts.values())
    n_prunable = sum(1 for n, x in sparsity.named_leaves(params) if x.ndim >= 2 and "head" not in n)
    assert abs(kept - (1 - S) * total) <= 0.5 * n_prunable  # only per-tensor rounding


@pytest.mark.parametrize("S", [0.5, 0.9, 0.99])
def test_erk_budget_kernels_keeps_fraction_of_kernel_weights(humanoid_critic, S):
    params = humanoid_critic
    always_dense = networks.critic_always_dense(params)
    shapes = shapes_of(params)
    kernel_total = sum(math.prod(s) for s in shapes.values() if len(s) >= 2)
    density = sparsity.allocate(shapes, S, "erk", "kernels", always_dense)
    kept_kernels = sum(density[n] * math.prod(s) for n, s in shapes.items() if len(s) >= 2)
    assert kept_kernels == pytest.approx((1 - S) * kernel_total, rel=1e-6)
    assert all(density[n] == 1.0 for n, s in shapes.items() if len(s) == 1)
    assert density["q0/head/kernel"] == 1.0


def test_erk_budget_kernels_realised_on_small_net():
    params = small_critic()
    always_dense = networks.critic_always_dense(params)
    shapes = shapes_of(params)
    S = 0.9
    mask = sparsity.make_mask(jax.random.PRNGKey(4), params, S, "erk", "kernels", "exact", always_dense)
    counts = realised(params, mask)
    kernel_total = sum(math.prod(s) for s in shapes.values() if len(s) >= 2)
    kernel_kept = sum(counts[n][0] for n, s in shapes.items() if len(s) >= 2)
    n_prunable = sum(1 for n, s in shapes.items() if len(s) >= 2 and "head" not in n)
    assert abs(kernel_kept - (1 - S) * kernel_total) <= 0.5 * n_prunable  # only per-tensor rounding
    assert all(counts[n][0] == counts[n][1] for n, s in shapes.items() if len(s) == 1)


# ----------------------------------------------------------------------------------------------
# uniform allocation


@pytest.mark.parametrize("S", [0.3, 0.9])
def test_uniform_every_prunable_tensor_at_S(S):
    params = small_critic(num_q=2)
    always_dense = networks.critic_always_dense(params)
    assert set(always_dense) == {"q0/head", "q1/head"}
    shapes = shapes_of(params)
    density = sparsity.allocate(shapes, S, "uniform", "all", always_dense)
    mask = sparsity.make_mask(jax.random.PRNGKey(5), params, S, "uniform", "all", "exact", always_dense)
    counts = realised(params, mask)
    mask_leaves = dict(sparsity.named_leaves(mask))
    for name, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) >= 2 and "/head/" not in name:
            assert density[name] == pytest.approx(1 - S)
            assert counts[name][0] == round((1 - S) * n), name
        else:  # 1-D tensors and the always-dense heads
            assert density[name] == 1.0
            assert counts[name][0] == n
            assert np.ndim(mask_leaves[name]) == 0 and bool(mask_leaves[name])


# ----------------------------------------------------------------------------------------------
# mask draws


@pytest.mark.parametrize("method", ["erk", "uniform"])
@pytest.mark.parametrize("S", [0.1, 0.5, 0.77, 0.9, 0.97])
def test_exact_draw_keeps_round_density_times_n(S, method):
    params = small_critic()
    always_dense = networks.critic_always_dense(params)
    shapes = shapes_of(params)
    density = sparsity.allocate(shapes, S, method, "kernels", always_dense)
    mask = sparsity.make_mask(jax.random.PRNGKey(6), params, S, method, "kernels", "exact", always_dense)
    for name, (kept, size) in realised(params, mask).items():
        assert kept == round(density[name] * size), name


def test_draw_exact_count_directly():
    for density in (0.0, 0.01, 0.333, 0.5, 0.999):
        m = sparsity.draw(jax.random.PRNGKey(0), (16, 64), density, "exact")
        assert m.shape == (16, 64) and m.dtype == jnp.bool_
        assert int(m.sum()) == round(density * 16 * 64)
    assert bool(sparsity.draw(jax.random.PRNGKey(0), (4, 5), 1.0, "exact").all())


@pytest.mark.parametrize("density", [0.05, 0.3, 0.8])
def test_bernoulli_draw_density_within_a_few_std(density):
    shape = (300, 400)
    n = math.prod(shape)
    for seed in range(3):
        m = sparsity.draw(jax.random.PRNGKey(seed), shape, density, "bernoulli")
        std = math.sqrt(n * density * (1 - density))
        assert abs(int(m.sum()) - density * n) <= 5 * std


def test_bernoulli_make_mask_per_layer_density(humanoid_critic):
    """Reference semantics (budget over all parameters, Bernoulli draws) on the humanoid critic."""
    params = humanoid_critic
    always_dense = networks.critic_always_dense(params)
    density = sparsity.allocate(shapes_of(params), 0.8, "erk", "all", always_dense)
    mask = sparsity.make_mask(jax.random.PRNGKey(7), params, 0.8, "erk", "all", "bernoulli", always_dense)
    for name, (kept, size) in realised(params, mask).items():
        p = density[name]
        assert abs(kept - p * size) <= 5 * math.sqrt(size * p * (1 - p)) + 1e-9, name


@pytest.mark.parametrize("draw_method", ["exact", "bernoulli"])
def test_keys_determine_masks(draw_method):
    params = small_critic()
    ad = networks.critic_always_dense(params)
    a = sparsity.make_mask(jax.random.PRNGKey(10), params, 0.7, "erk", "all", draw_method, ad)
    b = sparsity.make_mask(jax.random.PRNGKey(10), params, 0.7, "erk", "all", draw_method, ad)
    c = sparsity.make_mask(jax.random.PRNGKey(11), params, 0.7, "erk", "all", draw_method, ad)
    la, lb, lc = (jax.tree_util.tree_leaves(t) for t in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    arrays = [(x, z) for x, z in zip(la, lc) if np.ndim(x) >= 2]
    assert arrays and all(not np.array_equal(x, z) for x, z in arrays)


def test_tensors_in_one_mask_use_different_streams():
    """Two identically shaped tensors in one pytree must not get the same mask."""
    params = {"a": jnp.ones((16, 64)), "b": jnp.ones((16, 64))}
    mask = sparsity.make_mask(jax.random.PRNGKey(0), params, 0.5, "uniform")
    assert not np.array_equal(mask["a"], mask["b"])


# ----------------------------------------------------------------------------------------------
# never pruned: biases and LayerNorm; range checks


def test_layernorm_and_biases_never_pruned_at_extreme_sparsity(humanoid_critic):
    params = humanoid_critic
    ad = networks.critic_always_dense(params)
    shapes = shapes_of(params)
    one_d = [n for n, s in shapes.items() if len(s) == 1]
    assert any(n.endswith("norm/scale") for n in one_d) and any(n.endswith("/bias") for n in one_d)
    for S in (0.98, 0.99, 0.999):
        density = sparsity.allocate(shapes, S, "erk", "kernels", ad)
        assert all(density[n] == 1.0 for n in one_d), S

    params = small_critic()
    ad = networks.critic_always_dense(params)
    one_d = [n for n, x in sparsity.named_leaves(params) if x.ndim == 1]
    mask = sparsity.make_mask(jax.random.PRNGKey(8), params, 0.99, "erk", "kernels", "exact", ad)
    leaves = dict(sparsity.named_leaves(mask))
    for name in one_d:
        assert np.ndim(leaves[name]) == 0 and bool(leaves[name]), name
    # and the masked LayerNorm scales are still exactly 1
    masked = dict(sparsity.named_leaves(sparsity.apply_mask(params, mask)))
    for name in one_d:
        if name.endswith("scale"):
            assert np.all(np.asarray(masked[name]) == 1.0)


def test_layernorm_never_pruned_at_extreme_sparsity_uniform_small():
    params = small_critic()
    mask = sparsity.make_mask(jax.random.PRNGKey(0), params, 0.99, "uniform", "kernels", "exact")
    for name, m in sparsity.named_leaves(mask):
        if not name.endswith("kernel"):
            assert np.ndim(m) == 0 and bool(m)


@pytest.mark.parametrize("S", [1.0, 1.5, -0.1, -1e-9])
def test_out_of_range_sparsity_raises(S):
    shapes = {"k": (8, 8), "b": (8,)}
    with pytest.raises(ValueError, match="sparsity"):
        sparsity.allocate(shapes, S, "erk", "kernels")
    with pytest.raises(ValueError):
        sparsity.make_mask(jax.random.PRNGKey(0), {"k": jnp.ones((8, 8))}, S)


def test_budget_all_infeasible_raises_clear_error(humanoid_critic):
    shapes = shapes_of(humanoid_critic)
    ad = networks.critic_always_dense(humanoid_critic)
    total = sum(math.prod(s) for s in shapes.values())
    always = sum(math.prod(s) for n, s in shapes.items() if len(s) == 1 or n.startswith("q0/head"))
    S = 1 - 0.5 * always / total  # keep budget = half of the always-dense parameters
    with pytest.raises(ValueError, match="always-dense") as info:
        sparsity.allocate(shapes, S, "erk", "all", ad)
    assert "budget" in str(info.value) and "\n" not in str(info.value)
    # the same S is fine when the budget counts kernels only
    density = sparsity.allocate(shapes, S, "erk", "kernels", ad)
    assert density["q0/head/kernel"] == 1.0


# ----------------------------------------------------------------------------------------------
# seeds: module keys, mask seed vs init seed


def test_module_keys_differ_per_module_and_seed():
    a, c = sparsity.module_key(0, "actor"), sparsity.module_key(0, "critic")
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(c))
    assert not np.array_equal(jax.random.key_data(sparsity.module_key(0, "actor")),
                              jax.random.key_data(sparsity.module_key(1, "actor")))
    assert np.array_equal(jax.random.key_data(sparsity.module_key(3, "critic")),
                          jax.random.key_data(sparsity.module_key(3, "critic")))
    # the mask key is not simply the init key of the same seed
    assert not np.array_equal(jax.random.key_data(sparsity.module_key(0, "actor")),
                              jax.random.key_data(jax.random.PRNGKey(0)))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _kernel_masks(module):
    return [np.asarray(m) for m in jax.tree_util.tree_leaves(module.mask) if np.ndim(m) >= 2]


def test_mask_seed_changes_masks_not_init():
    kw = {"actor.sparsity": 0.5, "critic.sparsity": 0.5, "seed": 0}
    s1 = sac.init(small_config(**kw, **{"sparsity.seed": 1}), OBS_DIM, ACT_DIM)
    s2 = sac.init(small_config(**kw, **{"sparsity.seed": 2}), OBS_DIM, ACT_DIM)
    for m1, m2 in ((s1.actor, s2.actor), (s1.critic, s2.critic)):
        k1, k2 = _kernel_masks(m1), _kernel_masks(m2)
        assert k1 and any(not np.array_equal(a, b) for a, b in zip(k1, k2))
        # the dense init is the same: wherever both masks keep a weight, it is identical
        for p1, p2, a, b in zip(_leaves(m1.params), _leaves(m2.params),
                                _leaves(m1.mask), _leaves(m2.mask)):
            both = np.broadcast_to(a & b, p1.shape)
            assert both.any()
            np.testing.assert_array_equal(p1[both], p2[both])
    # the always-dense Q head is untouched by the mask, so it is bit-identical
    np.testing.assert_array_equal(s1.critic.params["q0"]["head"]["kernel"],
                                  s2.critic.params["q0"]["head"]["kernel"])


def test_init_seed_changes_init_not_masks():
    kw = {"actor.sparsity": 0.5, "critic.sparsity": 0.5, "sparsity.seed": 7}
    s1 = sac.init(small_config(seed=0, **kw), OBS_DIM, ACT_DIM)
    s2 = sac.init(small_config(seed=1, **kw), OBS_DIM, ACT_DIM)
    for m1, m2 in ((s1.actor, s2.actor), (s1.critic, s2.critic)):
        for a, b in zip(_leaves(m1.mask), _leaves(m2.mask)):
            np.testing.assert_array_equal(a, b)
        # the dense init differs
        assert any(not np.array_equal(a, b) for a, b in zip(_leaves(m1.params), _leaves(m2.params)))
    assert not np.array_equal(s1.critic.params["q0"]["head"]["kernel"], s2.critic.params["q0"]["head"]["kernel"])


def test_actor_and_critic_masks_from_different_keys():
    """Same module shapes must still get different masks for actor and critic."""
    params = {"w": jnp.ones((32, 32))}
    ma = sparsity.make_mask(sparsity.module_key(0, "actor"), params, 0.5, "uniform")
    mc = sparsity.make_mask(sparsity.module_key(0, "critic"), params, 0.5, "uniform")
    assert not np.array_equal(ma["w"], mc["w"])


def test_init_applies_mask_and_target_equals_masked_critic():
    s = sac.init(small_config(**{"actor.sparsity": 0.5, "critic.sparsity": 0.8}), OBS_DIM, ACT_DIM)
    for module in (s.actor, s.critic):
        for p, m in zip(_leaves(module.params), _leaves(module.mask)):
            assert np.all(p[~np.broadcast_to(m, p.shape)] == 0.0)
    for t, c in zip(_leaves(s.target), _leaves(s.critic.params)):
        np.testing.assert_array_equal(t, c)


# ----------------------------------------------------------------------------------------------
# critic sparsity is honoured even when the actor is dense (defect of the reference code)


@pytest.mark.parametrize("agent", ["sac", "ddpg"])
def test_critic_sparsity_applied_when_actor_dense(agent):
    cfg = small_config(**{"agent": agent, "actor.sparsity": 0.0, "critic.sparsity": 0.9})
    state = agents.get(agent).init(cfg, OBS_DIM, ACT_DIM)
    params = _leaves(state.critic.params)
    total = sum(p.size for p in params)
    kept = sum(kept_count(m, p.shape) for p, m in zip(params, _leaves(state.critic.mask)))
    assert 1 - kept / total == pytest.approx(0.9, abs=0.01)
    # kernel entries actually zeroed: at least 85% of all kernel weights are zero
    kernels = [p for p in params if p.ndim >= 2]
    zero_frac = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert zero_frac > 0.85
    # the actor is dense: every mask leaf is the scalar True, no kernel weight is zero
    assert all(np.ndim(m) == 0 and bool(m) for m in _leaves(state.actor.mask))
    assert all(np.all(p != 0) for p in _leaves(state.actor.params) if p.ndim >= 2)


# ----------------------------------------------------------------------------------------------
# statistics


def test_stats_totals_match_independent_counts():
    cfg = small_config(**{"actor.sparsity": 0.5, "critic.sparsity": 0.9})
    state = sac.init(cfg, OBS_DIM, ACT_DIM)
    for module in (state.actor, state.critic):
        s = sparsity.stats(module.params, module.mask)
        leaves = _leaves(module.params)
        assert s["total_params"] == sum(p.size for p in leaves)
        # kept entries: count the non-zeros of the mask applied to a tree of ones
        ones = jax.tree_util.tree_map(jnp.ones_like, module.params)
        kept = sum(int(np.count_nonzero(x)) for x in _leaves(sparsity.apply_mask(ones, module.mask)))
        assert s["nonzero_params"] == kept
        assert s["sparsity"] == pytest.approx(1 - kept / s["total_params"])
        assert sum(l["params"] for l in s["layers"]) == s["total_params"]
        # for kernels (non-zero at init almost surely), 'nonzero' is the count of non-zero entries
        named = dict(sparsity.named_leaves(module.params))
        for layer in s["layers"]:
            x = np.asarray(named[layer["name"]])
            assert layer["shape"] == list(x.shape)
            if x.ndim >= 2:
                assert layer["nonzero"] == int(np.count_nonzero(x)), layer["name"]
                assert layer["sparsity"] == pytest.approx(1 - np.count_nonzero(x) / x.size)


# ----------------------------------------------------------------------------------------------
# the optimizer keeps pruned weights exactly zero


def _sparse_problem():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w": jax.random.normal(k1, (16, 64)), "b": jax.random.normal(k2, (64,))}
    mask = sparsity.make_mask(jax.random.PRNGKey(1), params, 0.6, "uniform")
    assert np.ndim(mask["b"]) == 0 and np.ndim(mask["w"]) == 2
    return sparsity.apply_mask(params, mask), mask


@pytest.mark.parametrize("which", ["sparse_adamw", "chain_keep_masked"])
def test_pruned_weights_stay_zero_under_adamw_with_weight_decay(which):
    params, mask = _sparse_problem()
    pruned = ~np.asarray(mask["w"])
    if which == "sparse_adamw":
        opt = sparsity.sparse_adamw(1e-2, 0.1, mask)
    else:
        opt = optax.chain(optax.adamw(1e-2, weight_decay=0.1), sparsity.keep_masked(mask))
    state = opt.init(params)
    p = params
    for i in range(10):
        g = jax.tree_util.tree_map(lambda x: 1e3 * jax.random.normal(jax.random.PRNGKey(100 + i), x.shape), p)
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
    w = np.asarray(p["w"])
    assert np.all(w[pruned] == 0.0)
    assert np.all(w[~pruned] != np.asarray(params["w"])[~pruned])  # kept weights trained
    assert not np.array_equal(np.asarray(p["b"]), np.asarray(params["b"]))

    # control: plain AdamW (no keep_masked) would move the pruned weights
    plain = optax.adamw(1e-2, weight_decay=0.1)
    s = plain.init(params)
    g = jax.tree_util.tree_map(lambda x: 1e3 * jnp.ones_like(x), params)
    u, s = plain.update(g, s, params)
    assert np.all(np.asarray(optax.apply_updates(params, u)["w"])[pruned] != 0.0)


def test_keep_masked_zeroes_updates_of_pruned():
    mask = {"w": jnp.array([[True, False], [False, True]]), "b": jnp.ones((), bool)}
    tf = sparsity.keep_masked(mask)
    upd = {"w": jnp.full((2, 2), 3.0), "b": jnp.array([1.0, -2.0])}
    out, _ = tf.update(upd, tf.init(upd))
    np.testing.assert_array_equal(out["w"], np.array([[3.0, 0.0], [0.0, 3.0]]))
    np.testing.assert_array_equal(out["b"], np.array([1.0, -2.0]))


# ----------------------------------------------------------------------------------------------
# property: after agent updates, pruned weights are exactly zero in actor, critic and target


def _random_batches(key, k: int) -> Batch:
    ks = jax.random.split(key, 5)
    return Batch(obs=jax.random.normal(ks[0], (k, BATCH, OBS_DIM)),
                 action=jax.random.uniform(ks[1], (k, BATCH, ACT_DIM), minval=-1.0, maxval=1.0),
                 reward=jax.random.normal(ks[2], (k, BATCH)),
                 discount=(jax.random.uniform(ks[3], (k, BATCH)) > 0.1).astype(jnp.float32),
                 next_obs=jax.random.normal(ks[4], (k, BATCH, OBS_DIM)))


def _pruned_all_zero(params, mask) -> bool:
    for p, m in zip(_leaves(params), _leaves(mask)):
        if p[~np.broadcast_to(m, p.shape)].any():
            return False
    return True


def _kept_changed(before, after, mask) -> bool:
    for b, a, m in zip(_leaves(before), _leaves(after), _leaves(mask)):
        keep = np.broadcast_to(m, b.shape)
        if np.any(a[keep] != b[keep]):
            return True
    return False


_jitted_update = {name: jax.jit(mod.update, static_argnames="cfg") for name, mod in agents.AGENTS.items()}


@settings(max_examples=5, deadline=None)
@given(agent=st.sampled_from(["sac", "ddpg"]), actor_s=st.sampled_from([0.0, 0.5]),
       critic_s=st.sampled_from([0.5, 0.9]), cdq=st.booleans(), k=st.integers(1, 5),
       seed=st.integers(0, 1000))
def test_property_pruned_weights_stay_zero_after_updates(agent, actor_s, critic_s, cdq, k, seed):
    from sparserl import config

    cfg = config.build({"agent": agent, "actor.width": 16, "actor.blocks": 1, "critic.width": 16,
                        "critic.blocks": 1, "batch_size": BATCH, "actor.sparsity": actor_s,
                        "critic.sparsity": critic_s, "critic.cdq": cdq, "seed": seed, "lr": 1e-3},
                       check_env=False)
    mod = agents.get(agent)
    state = mod.init(cfg, OBS_DIM, ACT_DIM)
    assert len(state.critic.params) == (2 if cdq else 1)
    stats = ObsStats(jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM))
    new, metrics = _jitted_update[agent](state, _random_batches(jax.random.PRNGKey(seed), k), stats, cfg=cfg)
    for name in mod.METRICS:
        assert metrics[name].shape == (k,)
        assert np.all(np.isfinite(np.asarray(metrics[name])))

    # critic actually sparse at roughly the requested level
    crit = sparsity.stats(state.critic.params, state.critic.mask)
    assert crit["sparsity"] == pytest.approx(critic_s, abs=0.03)

    # masks are fixed
    for a, b in zip(_leaves(state.actor.mask) + _leaves(state.critic.mask),
                    _leaves(new.actor.mask) + _leaves(new.critic.mask)):
        np.testing.assert_array_equal(a, b)
    assert _pruned_all_zero(new.actor.params, new.actor.mask)
    assert _pruned_all_zero(new.critic.params, new.critic.mask)
    assert _pruned_all_zero(new.target, new.critic.mask)
    assert _kept_changed(state.actor.params, new.actor.params, new.actor.mask)
    assert _kept_changed(state.critic.params, new.critic.params, new.critic.mask)
    assert _kept_changed(state.target, new.target, new.critic.mask)
