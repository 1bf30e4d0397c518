"""``sparserl report``: statistics checked against independent computations, and the report's files
(summary.csv, report.html and its PNGs) on run directories written by the test."""

import csv
import gzip
import html as html_lib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import scipy.stats
from rliable import library as rly
from rliable import metrics

from sparserl import baselines, config, report, runs
from sparserl.config import ConfigError

# ----------------------------------------------------------------------------------------------
# Statistics


def test_mean_ci_is_scipys_student_t_interval():
    x = [1.0, 2.0, 3.0, 4.0, 10.0]
    mean, half = report.mean_ci(x)
    sd = math.sqrt(sum((v - 4.0) ** 2 for v in x) / 4)
    assert mean == 4.0 and half == pytest.approx(2.7764451 * sd / math.sqrt(5))  # t(0.975, df=4) from tables
    low, high = scipy.stats.t.interval(0.95, 4, loc=np.mean(x), scale=scipy.stats.sem(x))
    assert (mean - half, mean + half) == pytest.approx((low, high), rel=1e-12)
    assert report.mean_ci([3.0]) == (3.0, 0.0)


def _rliable(score_dict, func, reps):
    """rliable called directly, on numpy's global generator seeded as the report seeds it."""
    state = np.random.get_state()
    np.random.seed(report.BOOTSTRAP_SEED)
    try:
        return rly.get_interval_estimates(score_dict, func, reps=reps)
    finally:
        np.random.set_state(state)


FIXED = np.random.default_rng(7).uniform(0, 1, size=(5, 4))  # 5 runs x 4 tasks
OTHER = np.random.default_rng(8).uniform(0.2, 1, size=(3, 4))


def test_aggregates_are_rliables_on_fixed_data():
    got = report.aggregates(FIXED, reps=200)
    for name, func in (("IQM", metrics.aggregate_iqm), ("mean", metrics.aggregate_mean),
                       ("median", metrics.aggregate_median), ("optimality gap", metrics.aggregate_optimality_gap)):
        point, ci = _rliable({"x": FIXED}, func, 200)
        assert got[name] == pytest.approx((point["x"], *np.ravel(ci["x"])), rel=1e-12), name
        assert got[name][1] <= got[name][0] <= got[name][2]
    # the definitions, written out: IQM = mean of the middle half of the 20 scores; median of task means
    middle = np.sort(FIXED.ravel())[5:15]
    assert got["IQM"][0] == pytest.approx(middle.mean())
    assert got["median"][0] == pytest.approx(np.median(FIXED.mean(axis=0)))
    assert got["optimality gap"][0] == pytest.approx(1 - np.minimum(FIXED, 1).mean())
    assert report.iqm(FIXED, reps=200) == pytest.approx(got["IQM"], rel=1e-12)


def test_probability_of_improvement_is_rliables():
    p, low, high = report.probability_of_improvement(FIXED, OTHER, reps=100)
    point, ci = _rliable({"x,y": (FIXED, OTHER)}, metrics.probability_of_improvement, 100)
    assert (p, low, high) == pytest.approx((point["x,y"], *np.ravel(ci["x,y"])), rel=1e-12)
    # Mann-Whitney form, written out: per task the share of (x, y) pairs with x > y (ties half), averaged
    per_task = [np.mean([(a > b) + 0.5 * (a == b) for a in FIXED[:, t] for b in OTHER[:, t]]) for t in range(4)]
    assert p == pytest.approx(np.mean(per_task))
    assert report.probability_of_improvement(OTHER + 10, OTHER, reps=100) == (1.0, 1.0, 1.0)


def test_iqm_curve_is_rliables_iqm_at_every_step():
    scores = np.random.default_rng(3).uniform(0, 1, size=(4, 3, 6))  # runs x tasks x steps
    m, low, high = report.iqm_curve(scores, reps=100)
    point, ci = _rliable({"x": scores}, lambda s: np.array([metrics.aggregate_iqm(s[..., t]) for t in range(6)]), 100)
    assert m == pytest.approx(point["x"], rel=1e-12)
    assert low == pytest.approx(ci["x"][0], rel=1e-12) and high == pytest.approx(ci["x"][1], rel=1e-12)


def test_performance_profile_is_rliables_score_distribution():
    taus = np.linspace(0, 1, 21)
    state = np.random.get_state()
    np.random.seed(report.BOOTSTRAP_SEED)
    expected, expected_ci = rly.create_performance_profile({"a": FIXED, "b": OTHER}, taus, reps=200)
    np.random.set_state(state)
    got, got_ci = report.performance_profile({"a": FIXED, "b": OTHER}, taus, reps=200)
    for k in ("a", "b"):
        assert got[k] == pytest.approx(expected[k]) and got_ci[k] == pytest.approx(expected_ci[k])
    assert got["a"][0] == 1.0 and got["a"][-1] == 0.0  # all above 0, none above 1


def test_bootstrap_leaves_the_callers_random_state_alone():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    report.aggregates(FIXED, reps=100)
    assert np.random.random() == before


def test_stratified_bootstrap_keeps_tasks_apart():
    # Each task has a constant score: every stratified resample has the same pool, so the CI is a point.
    scores = np.array([[0.1, 0.5, 0.9, 0.2]] * 4)
    point, low, high = report.iqm(scores, reps=200)
    assert point == low == high == pytest.approx(np.mean([0.2, 0.5]))


def test_score_matrix_takes_equal_runs_per_task():
    m = report.score_matrix({"b": [1, 2, 3], "a": [4, 5]})
    assert m.tolist() == [[4, 1], [5, 2]]  # tasks sorted; the third run of b dropped
    assert report.score("cartpole-balance", 750.0) == 0.75 and report.score("gym:Hopper-v5", 750.0) == 750.0


# ----------------------------------------------------------------------------------------------
# Report files, on run directories written here


def _fake_run(root: Path, name: str, env: str, seed: int, width: int, sparsity: float, final: float,
              params: int, diagnostics: bool = False, env_steps: int = 20_000) -> Path:
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = config.build({"env": env, "seed": seed, "critic.width": width, "critic.sparsity": sparsity,
                        "env_steps": env_steps, "run_dir": str(d)})
    (d / "config.yaml").write_text(config.to_yaml(cfg))
    nonzero = int(params * (1 - sparsity))
    (d / "summary.json").write_text(json.dumps({
        "final_return": final, "final_return_std": 1.0, "env_steps": env_steps, "seed": seed, "wall_time": 12.0,
        "params": {"actor": {"total_params": 1000, "nonzero_params": 1000, "sparsity": 0.0},
                   "critic": {"total_params": params - 1000, "nonzero_params": nonzero - 1000, "sparsity": sparsity}}}))
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env_step", "eval_return", "train_return"])
        for step in (env_steps // 2, env_steps):
            w.writerow([step, final * step / env_steps, 0])
    if diagnostics:
        with open(d / "diagnostics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["env_step", "critic_srank_post_ln", "critic_param_norm"])
            w.writerow([10_000, 50 + seed, 10.0])
            w.writerow([20_000, 40 + seed, 12.0])
        np.save(d / "cosine_critic.npy", np.eye(8))
        np.save(d / "cosine_actor.npy", -np.eye(8))
    return d


def _make_sweep(root: Path) -> dict:
    """Two tasks x two sizes x dense/sparse x three seeds, with a sweep manifest; returns the final returns."""
    points, finals = [], {}
    for env in ("cartpole-balance", "cartpole-swingup"):
        for width, params in ((64, 50_000), (256, 600_000)):
            for label, sp in (("dense", 0.0), ("sparse", 0.9)):
                name = f"env={env},width={width},sparsity={label}"
                points.append({"name": name, "labels": {"env": env, "width": str(width), "sparsity": label}})
                for seed in range(3):
                    final = 100.0 * (1 + (width == 256)) + 50 * sp * (width == 256) + seed + (env == "cartpole-swingup") * 300
                    finals[(name, seed)] = final
                    _fake_run(root, name, env, seed, width, sp, final, params, diagnostics=(width == 64))
    (root / "sweep.yaml").write_text(yaml.safe_dump({"preset": "fake", "points": points}, sort_keys=False))
    return finals


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The fake sweep and its report with two published baselines, written once for the tests below."""
    root = tmp_path_factory.mktemp("report") / "sweep"
    finals = _make_sweep(root)
    out = report.write_report([root], reps=100, baseline_names=["simba", "bro"])
    return root, finals, out


def test_report_files(written):
    root, finals, out = written
    assert out == root / "report"
    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert set(pngs) == {"scaling_total.png", "scaling_nonzero.png", "sparsity.png", "curves.png", "diagnostics.png",
                         "gradient_cosines.png", "aggregate_curves.png", "profiles.png"}
    assert sorted(re.findall(r'<img src="([^"]+)"', html)) == pngs  # every figure is on the page, no broken links
    import matplotlib.image

    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # drawn, not blank

    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == len(finals) == 24
    for r in rows:
        name = Path(r["run_dir"]).parent.name
        assert float(r["final_return"]) == pytest.approx(finals[(name, int(r["seed"]))])
        assert r["variant"] == name.split(",", 1)[1]  # the task is not part of the variant
        assert r["width"] in ("64", "256") and r["status"] == "finished"
    assert rows[0]["total_params"] in ("50000", "600000")


def test_report_tables_hold_the_numbers(written):
    root, finals, out = written
    runs_ = report.load_runs([root])
    tasks = {(t["variant"], t["env"]): t for t in report.task_table(runs_)}
    v = "width=256,sparsity=sparse"
    expected = [finals[(f"env=cartpole-balance,{v}", s)] for s in range(3)]
    assert tasks[(v, "cartpole-balance")]["mean"] == pytest.approx(np.mean(expected))
    assert tasks[(v, "cartpole-balance")]["ci95"] == pytest.approx(4.302653 * np.std(expected, ddof=1) / math.sqrt(3))
    agg = {a["variant"]: a for a in report.aggregate_table(runs_, reps=100)}
    pooled = [finals[(f"env={e},{v}", s)] / 1000 for e in ("cartpole-balance", "cartpole-swingup") for s in range(3)]
    assert agg[v]["IQM"][0] == pytest.approx(scipy.stats.trim_mean(pooled, 0.25))
    assert agg[v]["mean"][0] == pytest.approx(np.mean(pooled)) and agg[v]["tasks"] == 2 and agg[v]["runs"] == 6
    assert agg[v]["IQM"][1] <= agg[v]["IQM"][0] <= agg[v]["IQM"][2]
    html = (out / "report.html").read_text()
    assert f"{np.mean(expected):.1f}" in html and v in html and f"{agg[v]['IQM'][0]:.3f}" in html


def test_headline_compares_sparse_with_dense_at_each_size(written):
    root, finals, out = written
    rows = report.comparison_table(report.load_runs([root]), reps=100)
    assert [r["label"] for r in rows] == ["sac critic 49k", "sac critic 599k"]  # critic = total - 1,000 actor
    big = rows[1]
    sparse = [finals[(f"env={e},width=256,sparsity=sparse", s)] / 1000 for e in ("cartpole-balance", "cartpole-swingup")
              for s in range(3)]
    dense = [finals[(f"env={e},width=256,sparsity=dense", s)] / 1000 for e in ("cartpole-balance", "cartpole-swingup")
             for s in range(3)]
    assert big["sparse_iqm"][0] == pytest.approx(scipy.stats.trim_mean(sparse, 0.25))
    assert big["dense_iqm"][0] == pytest.approx(scipy.stats.trim_mean(dense, 0.25))
    assert big["p_improvement"] == (1.0, 1.0, 1.0)  # every sparse run beats every dense run on both tasks here
    assert rows[0]["p_improvement"][0] == pytest.approx(0.5)  # same returns at width 64: ties count half
    sentence = report.headline(big)
    assert sentence.startswith("sac critic 599k: sparse 0.9 IQM ") and "P(sparse > dense) = 1.00 [1.00, 1.00]" in sentence
    html = (out / "report.html").read_text()
    section = re.search(r'<section id="headline">(.*?)</section>', html).group(1)
    assert html.index('id="headline"') < html.index("<table")  # at the top, before every table
    assert all(report.headline(r).replace(">", "&gt;") in section for r in rows)
    assert (out / "headline.txt").read_text().splitlines() == [report.headline(r) for r in rows]


def test_no_pair_no_comparison(tmp_path):
    _fake_run(tmp_path, "a", "cartpole-balance", 0, 64, 0.0, 10.0, 5000)
    _fake_run(tmp_path, "b", "cartpole-balance", 0, 128, 0.0, 20.0, 9000)
    _fake_run(tmp_path, "c", "cartpole-balance", 0, 256, 0.9, 30.0, 20000)  # sparse, but no dense of its size
    rows = report.comparison_table(report.load_runs([tmp_path]), reps=100)
    assert rows == [] and report.headlines(rows) == [report.NO_COMPARISON]


def test_equal_nonzero_comparison(tmp_path):
    # the sparse critic of 110,000 weights keeps 10,100 (the fake's actor has 1,000 dense weights); a dense critic
    # of 10,500 weights matches it (within 15%), one of 20,000 does not
    for seed in range(2):
        _fake_run(tmp_path, "sparse", "cartpole-balance", seed, 512, 0.9, 300.0 + seed, 111_000)
        _fake_run(tmp_path, "dense-small", "cartpole-balance", seed, 32, 0.0, 200.0 + seed, 11_500)
        _fake_run(tmp_path, "dense-mid", "cartpole-balance", seed, 64, 0.0, 250.0 + seed, 21_000)
    rows = report.comparison_table(report.load_runs([tmp_path]), reps=100)
    assert [r["label"] for r in rows] == ["sac critic 110k sparse vs critic 10.5k dense (equal non-zeros)"]
    assert rows[0]["sparse_iqm"][0] == pytest.approx(0.3005) and rows[0]["dense_iqm"][0] == pytest.approx(0.2005)
    assert rows[0]["p_improvement"] == (1.0, 1.0, 1.0)


def test_evaluations_export_has_the_published_schema(written):
    root, finals, out = written
    with open(out / "evaluations.csv", newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert header == ["exp_name", "env_name", "seed", "metric", "env_step", "value"] == list(baselines.COLUMNS)
    assert len(rows) == 24 * 2  # every run's two evaluations
    by_run = {(r["exp_name"], r["env_name"], int(r["seed"]), int(r["env_step"])): float(r["value"]) for r in rows}
    for (name, seed), final in finals.items():
        env, variant = name.split(",", 1)
        assert by_run[(variant, env.removeprefix("env="), seed, 20_000)] == final
        assert by_run[(variant, env.removeprefix("env="), seed, 10_000)] == final / 2
    assert {r["metric"] for r in rows} == {"avg_return"}


def test_report_without_a_manifest_names_variants_by_differing_keys(tmp_path):
    _fake_run(tmp_path, "a", "cartpole-balance", 0, 64, 0.0, 10.0, 5000)
    _fake_run(tmp_path, "b", "cartpole-balance", 0, 64, 0.8, 20.0, 5000)
    (tmp_path / "b" / "seed1").mkdir()  # an unfinished run: listed, not aggregated
    cfg = config.build({"env": "cartpole-balance", "seed": 1, "critic.width": 64, "critic.sparsity": 0.8, "env_steps": 20_000})
    (tmp_path / "b" / "seed1" / "config.yaml").write_text(config.to_yaml(cfg))
    runs_ = report.load_runs([tmp_path])
    assert sorted({r.variant for r in runs_}) == ["critic.sparsity=0.0", "critic.sparsity=0.8"]
    out = report.write_report([tmp_path], tmp_path / "out", reps=100)
    html = (out / "report.html").read_text()
    assert "2 finished" in html and "1 interrupted" in html
    # dense and sparse runs of one size, but two variants differ in sparsity only: one comparison
    assert (out / "headline.txt").read_text().startswith("sac critic 4k: sparse 0.8 IQM 0.02")
    assert not (out / "scaling_total.png").exists()  # one size only: no scaling plot


def test_report_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparserl.cli", "report", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such directory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sparserl.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no run directories" in r.stderr
    with pytest.raises(ConfigError, match="bootstrap"):
        report.write_report([tmp_path], reps=10)
    r = subprocess.run([sys.executable, "-m", "sparserl.cli", "report", str(tmp_path), "baselines=simba,nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "unknown baseline 'nope' (available: simba, simbav2, simbav2_utd8, bro," in r.stderr


# ----------------------------------------------------------------------------------------------
# Published baselines: the shipped file, and the report's use of it


def _shipped_rows() -> list[dict]:
    """The shipped data file, read here with the csv module alone (not through sparserl.baselines)."""
    with gzip.open(baselines.DATA_FILE, "rt", newline="") as f:
        return list(csv.DictReader(f))


def test_shipped_baselines_file_is_compact_licensed_and_named_like_sparserl():
    from sparserl import envs

    assert baselines.DATA_FILE.stat().st_size < 500_000
    rows = _shipped_rows()
    assert list(rows[0]) == list(baselines.COLUMNS)
    assert {r["exp_name"] for r in rows} == set(baselines.SOURCES)
    assert {r["env_name"] for r in rows} <= set(envs.dmc_task_names())  # sparserl's own DMC names
    assert {"humanoid-run", "dog-trot", "ball_in_cup-catch", "cartpole-balance"} <= {r["env_name"] for r in rows}
    assert {r["metric"] for r in rows} == {"avg_return"}
    notice = baselines.LICENSE_FILE.read_text()
    assert "Apache License" in notice and "Version 2.0" in notice and "dojeon-ai/SimbaV2" in notice


# Published aggregates over DMC-hard at 1M env steps (score = return / 1000, IQM over all task x seed runs),
# as stated with the released results: the shipped file must reproduce them.
DMC_HARD = ("humanoid-stand", "humanoid-walk", "humanoid-run", "dog-stand", "dog-walk", "dog-run", "dog-trot")
PUBLISHED = {"simba": (706, 0.773), "simbav2": (729, 0.808), "bro": (767, 0.864), "mrq": (723, None),
             "tdmpc2": (491, None), "simba_cwidth1024": (713, None)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_baselines_reproduce_the_published_aggregates(name):
    mean, iqm = PUBLISHED[name]
    scores = np.concatenate([baselines.scores_at(name, t, 1_000_000) for t in DMC_HARD])
    assert round(scores.mean()) == mean
    if iqm is not None:
        assert round(scipy.stats.trim_mean(scores / 1000, 0.25), 3) == iqm


def test_loader_returns_the_files_values():
    rows = [r for r in _shipped_rows() if r["exp_name"] == "simba" and r["env_name"] == "humanoid-run"]
    at_1m = {int(r["seed"]): float(r["value"]) for r in rows if int(r["env_step"]) == 1_000_000}
    assert baselines.scores_at("simba", "humanoid-run", 1_000_000).tolist() == [at_1m[s] for s in sorted(at_1m)]
    assert baselines.scores_at("simba", "humanoid-run", 1_010_000).tolist() == [at_1m[s] for s in sorted(at_1m)]
    steps, values = baselines.curve("simba", "humanoid-run", 120_000)
    assert steps.tolist() == [0, 50_000, 100_000, 150_000]  # up to the budget, and the first evaluation beyond
    for j, step in enumerate(steps):
        col = {int(r["seed"]): float(r["value"]) for r in rows if int(r["env_step"]) == step}
        assert values[:, j].tolist() == [col[s] for s in sorted(col)]
    assert baselines.scores_at("simba", "cartpole-two_poles", 1000).size == 0


@pytest.fixture(scope="module")
def with_baselines(tmp_path_factory):
    """Dense and sparse runs on humanoid-run (1M env steps) and cartpole-two_poles (no published results)."""
    root = tmp_path_factory.mktemp("baselines")
    for seed in range(2):
        for env in ("humanoid-run", "cartpole-two_poles"):
            _fake_run(root, f"dense-{env}", env, seed, 64, 0.0, 100.0 + seed, 50_000, env_steps=1_000_000)
            _fake_run(root, f"sparse-{env}", env, seed, 64, 0.9, 150.0 + seed, 50_000, env_steps=1_000_000)
    return root, report.load_runs([root])


def test_baseline_scores_cover_the_users_tasks_and_budget(with_baselines):
    root, runs_ = with_baselines
    scores, notes = report.baseline_final_scores(["simba", "tdmpc2"], runs_)
    for name in ("simba", "tdmpc2"):
        assert list(scores[name]) == ["humanoid-run"]  # the task the baseline has
        expected = [float(r["value"]) / 1000 for r in _shipped_rows() if r["exp_name"] == name
                    and r["env_name"] == "humanoid-run" and int(r["env_step"]) == 1_000_000]
        assert sorted(scores[name]["humanoid-run"]) == pytest.approx(sorted(expected))
        assert any(n.startswith(f"{name} has no published results on cartpole-two_poles") for n in notes)
    assert not any("budgets differ" in n for n in notes)  # both evaluated at exactly 1M
    agg = {a["variant"]: a for a in report.aggregate_table(runs_, 100, scores)}
    assert agg["baseline: simba"]["IQM"][0] == pytest.approx(scipy.stats.trim_mean(scores["simba"]["humanoid-run"], 0.25))
    assert agg["baseline: simba"]["tasks"] == 1 and agg["baseline: simba"]["runs"] == len(scores["simba"]["humanoid-run"])


def test_differing_budgets_are_said(tmp_path):
    _fake_run(tmp_path, "a", "humanoid-run", 0, 64, 0.0, 1.0, 50_000, env_steps=20_000)
    _, notes = report.baseline_final_scores(["simba"], report.load_runs([tmp_path]))
    assert notes == ["simba on humanoid-run: budgets differ: your runs end at 20,000 env steps, its nearest "
                     "evaluation is at 0 (it has evaluations every 50,000 env steps from 0 to 1,000,000)"]


def test_overlay_draws_the_files_means(with_baselines):
    plt = runs.pyplot()
    fig, ax = plt.subplots()
    report.plot_baseline_overlay(ax, ["simba"], "humanoid-run", 100_000)
    line = ax.lines[0]
    rows = [r for r in _shipped_rows() if r["exp_name"] == "simba" and r["env_name"] == "humanoid-run"]
    for x, y in zip(line.get_xdata(), line.get_ydata()):
        assert y == pytest.approx(np.mean([float(r["value"]) for r in rows if int(r["env_step"]) == x]))
    assert line.get_xdata().tolist() == [0, 50_000, 100_000] and "simba" in line.get_label()
    plt.close(fig)


def test_aggregate_baseline_curve_holds_the_files_scores():
    steps, scores = report.baseline_curve_scores("simba", ["dog-run", "humanoid-run"], 100_000)
    assert steps.tolist() == [0, 50_000, 100_000] and scores.shape == (15, 2, 3)  # seeds x tasks x steps
    rows = _shipped_rows()
    for i, env in enumerate(["dog-run", "humanoid-run"]):
        for j, step in enumerate(steps):
            by_seed = {int(r["seed"]): float(r["value"]) / 1000 for r in rows if r["exp_name"] == "simba"
                       and r["env_name"] == env and int(r["env_step"]) == step}
            assert scores[:, i, j].tolist() == pytest.approx([by_seed[s] for s in sorted(by_seed)])
    assert report.baseline_curve_scores("simba", ["humanoid-run", "cartpole-two_poles"], 100_000) is None


def test_report_with_baselines_on_the_page(with_baselines, tmp_path):
    root, _ = with_baselines
    out = report.write_report([root], tmp_path / "out", reps=100, baseline_names=["simba"])
    html = (out / "report.html").read_text()
    assert "baseline: simba" in html and "has no published results on cartpole-two_poles" in html
    assert "sac critic 49k: sparse 0.9 IQM 0.15" in html  # the headline (150 vs 100 on both tasks)


def test_report_options_are_checked():
    with pytest.raises(ConfigError, match=r"unknown baseline 'simbaa' \(available: simba, simbav2"):
        report.parse_args(["runs/x", "baselines=simba,simbaa"])
    with pytest.raises(ConfigError, match="unknown report option 'basline'"):
        report.parse_args(["runs/x", "basline=simba"])
    assert report.parse_args(["runs/x", "baselines=simba, bro"]) == ([Path("runs/x")], ["simba", "bro"])
    assert report.parse_args(["runs/env=a,width=64"])[0] == [Path("runs/env=a,width=64")]  # a sweep point folder


# ----------------------------------------------------------------------------------------------
# The page as a reader sees it: report.html rendered by headless Chromium

CHROMIUM = "/usr/bin/chromium"
# Appended to a copy of the page (beside it, so that relative image paths resolve): once everything has
# loaded, write each image's natural size and whether the headline is there into the DOM that Chromium dumps.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(i => [i.getAttribute("src"), i.complete, i.naturalWidth]);
  const headline = document.getElementById("headline");
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images: images, headline: headline ? headline.innerText : null});
  document.body.appendChild(pre);
});
</script>"""


def _chromium(args: list[str], user_data: Path) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).is_file(), (f"{CHROMIUM} not found: the browser test renders report.html in headless "
                                      "Chromium; `make install` installs it (scripts/system_deps.sh, Debian's chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_data}", "--virtual-time-budget=10000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_browser(written, tmp_path):
    root, finals, out = written
    page = (out / "report.html").read_text()
    check = out / "browser_check.html"
    check.write_text(page.replace("</body>", PROBE + "</body>"))
    try:
        r = _chromium(["--dump-dom", check.as_uri()], tmp_path / "profile")
    finally:
        check.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert found, f"Chromium rendered no probe (exit {r.returncode}): {r.stderr[-2000:]}"
    probe = json.loads(html_lib.unescape(found.group(1)))
    assert sorted(src for src, _, _ in probe["images"]) == sorted(p.name for p in out.glob("*.png"))
    assert all(done and width > 100 for _, done, width in probe["images"]), probe["images"]  # every image loaded
    headline = probe["headline"]
    assert headline and "sac critic 599k: sparse 0.9 IQM" in headline and "P(sparse > dense)" in headline


def test_dynamic_topology_is_compared_with_static_at_the_same_size_and_sparsity(tmp_path):
    """static_vs_dynamic: each SET/RigL variant against the static one of its size and sparsity, besides dense."""
    for seed in range(2):
        for name, final in (("dense", 100.0), ("static", 200.0), ("rigl", 300.0), ("static-0.8", 150.0)):
            d = _fake_run(tmp_path, name, "cartpole-balance", seed, 64, 0.0 if name == "dense" else 0.9, final + seed,
                          50_000)
            if name in ("rigl", "static-0.8"):  # the fake's config, with the topology or sparsity of this variant
                cfg = config.read_yaml(d / "config.yaml", "config")
                cfg["critic"].update({"topology": "rigl"} if name == "rigl" else {"sparsity": 0.8})
                (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows = report.comparison_table(report.load_runs([tmp_path]), reps=100)
    topo = [r for r in rows if r["names"] != ("sparse", "dense")]
    assert [r["label"] for r in topo] == ["sac critic 49k sparse 0.9: rigl vs static"]  # not vs static 0.8
    assert topo[0]["names"] == ("rigl", "static") and topo[0]["p_improvement"] == (1.0, 1.0, 1.0)
    assert topo[0]["sparse_iqm"][0] == pytest.approx(0.3005) and topo[0]["dense_iqm"][0] == pytest.approx(0.2005)
    assert report.headline(topo[0]).startswith("sac critic 49k sparse 0.9: rigl vs static: rigl IQM 0.30")
    assert "P(rigl > static) = 1.00" in report.headline(topo[0])
    assert sum(r["names"] == ("sparse", "dense") for r in rows) == 3  # static 0.9, rigl, static 0.8 vs dense
