"""Diagnostics wired into training and `sparserl diagnose`; periodic resets."""

import csv
import json

import jax
import numpy as np
import pytest

from sparserl import agents, checkpoint, config, seed, sparsity, train
from sparserl.cli import main

TINY = ["env=cartpole-balance", "env_steps=3000", "checkpoint_every=3000", "eval_every=1000", "warmup_steps=500",
        "eval_episodes=1", "final_eval_episodes=1", "batch_size=32", "actor.width=16", "critic.width=32",
        "critic.blocks=1", "critic.sparsity=0.5", "progress=false", "diag_probe_size=300", "diag_grad_samples=8"]
TIMING = ("steps_per_s", "wall_time")


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def deterministic(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(path)]


@pytest.fixture(scope="module")
def diag_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    cfg = config.from_args(None, TINY + ["diag_every=1000", f"run_dir={root / 'on'}"])
    train.train(cfg, log=lambda m: None)
    return root


def test_diagnostics_do_not_change_training(diag_run):
    off = diag_run / "off"
    train.train(config.from_args(None, TINY + ["diag_every=0", f"run_dir={off}"]), log=lambda m: None)
    assert not (off / "diagnostics.csv").exists()
    assert deterministic(diag_run / "on" / "metrics.csv") == deterministic(off / "metrics.csv")


def test_diagnostics_csv_rows_and_ranges(diag_run):
    diag = rows(diag_run / "on" / "diagnostics.csv")
    assert [int(r["env_step"]) for r in diag] == [2000, 3000]  # learning starts after env step 1000
    for r in diag:
        for module, width, max_rank in (("actor", 16, 16), ("critic", 32, 32)):
            for where in ("pre_ln", "post_ln"):
                rank = float(r[f"{module}_srank_{where}"])
                assert 1 <= rank <= max_rank and rank == int(rank)
            post = [float(r[f"{module}_dormant_post_act_tau{tau}"]) for tau in ("0", "0.1", "0.2")]
            ref = [float(r[f"{module}_dormant_ref_tau{tau}"]) for tau in ("0.1", "0.2")]
            for ratios in (post, ref):  # a larger threshold can only add dormant units
                assert 0.0 <= ratios[0] and ratios == sorted(ratios) and ratios[-1] <= 1.0
            assert f"{module}_dormant_pre_act_tau0.1" not in r
            assert float(r[f"{module}_feature_norm_pre_ln"]) > 0
            assert 0 <= float(r[f"{module}_grad_cos_mean_abs"]) <= 1
            assert 0 <= float(r[f"{module}_grad_cos_frac_negative"]) <= 1
    # the parameter norm column matches the training metrics' norm at the same step
    metrics = {int(r["env_step"]): r for r in rows(diag_run / "on" / "metrics.csv")}
    for r in diag:
        m = metrics[int(r["env_step"])]
        assert float(r["critic_param_norm"]) == pytest.approx(float(m["critic_param_norm"]), rel=1e-5)


def test_diagnose_recomputes_last_row_and_writes_heatmaps(diag_run, capsys):
    run_dir = diag_run / "on"
    # diag_probe=fresh (default): no probe set is kept; diagnose draws the last row's from (seed, env step)
    arrays, _ = checkpoint.latest_valid(run_dir / "checkpoints", log=lambda m: None)
    assert "probe/obs" not in arrays
    assert main(["diagnose", str(run_dir), "--plasticity", "--plasticity-steps", "50"]) == 0
    result = json.loads((run_dir / "diagnose" / "metrics.json").read_text())
    last = rows(run_dir / "diagnostics.csv")[-1]
    assert result["env_step"] == int(last["env_step"]) == 3000
    for key, value in last.items():
        if key != "env_step":
            assert result[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    for name in ("actor", "critic"):
        cos = np.load(run_dir / "diagnose" / f"cosine_{name}.npy")
        assert cos.shape == (8, 8)
        np.testing.assert_allclose(cos, cos.T, atol=1e-6)
        assert np.all(np.abs(cos) <= 1.0)
        assert (run_dir / "diagnose" / f"cosine_{name}.png").stat().st_size > 1000
    assert np.isfinite(result["critic_plasticity_loss"]) and result["critic_plasticity_loss"] >= 0
    norms = json.loads((run_dir / "diagnose" / "layer_norms.json").read_text())
    total = np.sqrt(sum(v ** 2 for v in norms["critic"].values()))
    assert total == pytest.approx(result["critic_param_norm"], rel=1e-4)
    assert "critic_srank_pre_ln" in capsys.readouterr().out


def test_diagnose_bad_input(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "missing")]) == 2
    assert main(["diagnose", str(tmp_path)]) == 2  # exists, but no config.yaml
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("sparserl: error:") for line in err)


def test_simplicity_grid_command(tmp_path, capsys):
    out = tmp_path / "simp"
    assert main(["diagnose", "--simplicity", "critic.blocks=1", "--widths", "8,32", "--sparsities", "0,0.5",
                 "--inits", "2", "--out", str(out)]) == 0
    table = json.loads((out / "simplicity.json").read_text())
    assert [(r["width"], r["sparsity"]) for r in table] == [(8, 0.0), (8, 0.5), (32, 0.0), (32, 0.5)]
    assert all(np.isfinite(r["simplicity"]) and r["simplicity"] > 0 for r in table)
    assert (out / "simplicity.png").stat().st_size > 1000
    assert main(["diagnose", "--simplicity", "--sparsities", "1.0", "--out", str(out)]) == 2


@pytest.mark.parametrize("agent_name", ["sac", "ddpg"])
def test_reset_restores_initial_distribution_and_keeps_masks(agent_name):
    cfg = config.build({"agent": agent_name, "actor.width": 16, "critic.width": 16, "critic.blocks": 1,
                        "actor.sparsity": 0.5, "critic.sparsity": 0.8}, check_env=False)
    agent = agents.get(agent_name)
    state = agent.init(cfg, 5, 2)
    # train a little so that the state is far from its init
    rng = np.random.default_rng(0)
    batches = agents.common.Batch(*(rng.normal(size=s).astype(np.float32) for s in
                                    [(20, 8, 5), (20, 8, 2), (20, 8), (20, 8), (20, 8, 5)]))
    stats = agents.common.ObsStats(np.zeros(5, np.float32), np.ones(5, np.float32))
    trained, _ = jax.jit(agent.update, static_argnames="cfg")(state, batches, stats, cfg=cfg)
    reset = seed.reset_state(cfg, trained, 1, 5, 2)
    for name in ("actor", "critic"):
        before, after, init = getattr(trained, name), getattr(reset, name), getattr(state, name)
        # masks identical, pruned weights exactly zero
        for m0, m1 in zip(jax.tree_util.tree_leaves(init.mask), jax.tree_util.tree_leaves(after.mask)):
            assert np.array_equal(np.asarray(m0), np.asarray(m1))
        for (n, p), (_, m) in zip(sparsity.named_leaves(after.params), sparsity.named_leaves(after.mask)):
            assert np.all(np.asarray(p)[~np.broadcast_to(np.asarray(m), p.shape)] == 0), n
        # new parameters: not the trained ones, not the original init, but from the same distribution
        for (n, p0), (_, p1), (_, p2) in zip(sparsity.named_leaves(init.params), sparsity.named_leaves(after.params),
                                             sparsity.named_leaves(before.params)):
            if p0.ndim == 2 and p0.size >= 64:
                assert not np.allclose(p1, p0) and not np.allclose(p1, p2), n
                kept = np.asarray(p1)[np.asarray(p1) != 0]
                ref = np.asarray(p0)[np.asarray(p0) != 0]
                assert np.std(kept) == pytest.approx(np.std(ref), rel=0.35), n
        # optimizer state is fresh: Adam's step count back to 0
        counts = [np.asarray(x) for x in jax.tree_util.tree_leaves(after.opt_state) if np.ndim(x) == 0]
        assert counts and all(c == 0 for c in counts)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(reset.target)[0], jax.tree_util.tree_leaves(reset.critic.params)[0])
