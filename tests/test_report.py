"""``sparserl report``: statistics checked against independent computations, and the report's files
(summary.csv, report.html and its PNGs) on run directories written by the test."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sparserl import config, report
from sparserl.config import ConfigError

# ----------------------------------------------------------------------------------------------
# Statistics


def test_iqm_is_the_mean_of_the_middle_half():
    scores = [10, 1, 7, 3, 100, 5, 4, 6]  # sorted: 1 3 4 5 6 7 10 100 -> middle half 4 5 6 7
    assert report.iqm(scores) == pytest.approx(5.5)
    assert report.iqm(np.arange(12).reshape(3, 4)) == pytest.approx(np.mean([3, 4, 5, 6, 7, 8]))
    assert report.iqm([42.0]) == 42.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=60))
def test_iqm_matches_a_trimmed_mean_written_out(xs):
    n = len(xs)
    cut = n // 4  # floor(0.25 n) from each end, as scipy.stats.trim_mean(x, 0.25) and rliable do
    expected = sum(sorted(xs)[cut:n - cut]) / (n - 2 * cut)
    assert report.iqm(xs) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert min(xs) - 1e-9 <= report.iqm(xs) <= max(xs) + 1e-9  # a mean of equal floats may round up by an ulp


def test_mean_ci_uses_student_t():
    x = [1.0, 2.0, 3.0, 4.0, 10.0]
    mean, half = report.mean_ci(x)
    sd = math.sqrt(sum((v - 4.0) ** 2 for v in x) / 4)
    assert mean == 4.0 and half == pytest.approx(2.776 * sd / math.sqrt(5))
    assert report.mean_ci([3.0]) == (3.0, 0.0)
    assert report.t_critical(1) == pytest.approx(12.706) and report.t_critical(1000) == 1.96


def _bootstrap_by_loops(per_task, reps, rng):
    """Stratified bootstrap written plainly: per replicate, per task, draw that task's runs with replacement."""
    stats = []
    for _ in range(reps):
        pooled = []
        for task in per_task:
            pooled += [task[rng.integers(len(task))] for _ in range(len(task))]
        pooled.sort()
        cut = len(pooled) // 4
        middle = pooled[cut:len(pooled) - cut]
        stats.append(sum(middle) / len(middle))
    return np.quantile(stats, 0.025), np.quantile(stats, 0.975)


def test_stratified_bootstrap_ci_agrees_with_a_plain_implementation():
    rng = np.random.default_rng(1)
    per_task = [list(rng.normal(100, 20, 5)), list(rng.normal(500, 50, 5)), list(rng.normal(800, 10, 5))]
    point, lo, hi = report.stratified_bootstrap_ci(per_task, report.iqm, reps=4000, seed=0)
    assert point == pytest.approx(report.iqm(np.concatenate(per_task)))
    ref_lo, ref_hi = _bootstrap_by_loops(per_task, 4000, np.random.default_rng(123))
    # Two independent Monte-Carlo estimates of the same quantiles: agree to a few percent of the spread.
    spread = ref_hi - ref_lo
    assert lo == pytest.approx(ref_lo, abs=0.08 * spread) and hi == pytest.approx(ref_hi, abs=0.08 * spread)
    assert lo < point < hi


def test_stratified_bootstrap_keeps_tasks_apart():
    # Each task has a constant score: every stratified resample has the same pool, so the CI is a point.
    point, lo, hi = report.stratified_bootstrap_ci([[1.0] * 4, [5.0] * 4, [9.0] * 4, [20.0] * 4], report.iqm, reps=200)
    assert point == lo == hi == pytest.approx(7.0)


# ----------------------------------------------------------------------------------------------
# Report files, on run directories written here


def _fake_run(root: Path, name: str, env: str, seed: int, width: int, sparsity: float, final: float,
              params: int, diagnostics: bool = False) -> Path:
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = config.build({"env": env, "seed": seed, "critic.width": width, "critic.sparsity": sparsity,
                        "env_steps": 20_000, "run_dir": str(d)})
    (d / "config.yaml").write_text(config.to_yaml(cfg))
    nonzero = int(params * (1 - sparsity))
    (d / "summary.json").write_text(json.dumps({
        "final_return": final, "final_return_std": 1.0, "env_steps": 20_000, "seed": seed, "wall_time": 12.0,
        "params": {"actor": {"total_params": 1000, "nonzero_params": 1000, "sparsity": 0.0},
                   "critic": {"total_params": params - 1000, "nonzero_params": nonzero - 1000, "sparsity": sparsity}}}))
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env_step", "eval_return", "train_return"])
        for step in (10_000, 20_000):
            w.writerow([step, final * step / 20_000, 0])
    if diagnostics:
        with open(d / "diagnostics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["env_step", "critic_srank_post_ln", "critic_param_norm"])
            w.writerow([10_000, 50 + seed, 10.0])
            w.writerow([20_000, 40 + seed, 12.0])
        np.save(d / "cosine_critic.npy", np.eye(8))
        np.save(d / "cosine_actor.npy", -np.eye(8))
    return d


@pytest.fixture
def fake_sweep(tmp_path):
    """Two tasks x two sizes x dense/sparse x three seeds, with a sweep manifest."""
    root = tmp_path / "sweep"
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
    return root, finals


def test_report_files(fake_sweep):
    root, finals = fake_sweep
    out = report.write_report([root], reps=300)
    assert out == root / "report"
    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert set(pngs) == {"scaling_total.png", "scaling_nonzero.png", "sparsity.png", "curves.png", "diagnostics.png",
                         "gradient_cosines.png"}
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


def test_report_tables_hold_the_numbers(fake_sweep):
    root, finals = fake_sweep
    runs_ = report.load_runs([root])
    tasks = {(t["variant"], t["env"]): t for t in report.task_table(runs_)}
    v = "width=256,sparsity=sparse"
    expected = [finals[(f"env=cartpole-balance,{v}", s)] for s in range(3)]
    assert tasks[(v, "cartpole-balance")]["mean"] == pytest.approx(np.mean(expected))
    assert tasks[(v, "cartpole-balance")]["ci95"] == pytest.approx(4.303 * np.std(expected, ddof=1) / math.sqrt(3))
    agg = {a["variant"]: a for a in report.aggregate_table(runs_, reps=300)}
    pooled = [finals[(f"env={e},{v}", s)] for e in ("cartpole-balance", "cartpole-swingup") for s in range(3)]
    assert agg[v]["iqm"] == pytest.approx(report.iqm(pooled)) and agg[v]["tasks"] == 2 and agg[v]["runs"] == 6
    assert agg[v]["lo"] <= agg[v]["iqm"] <= agg[v]["hi"]
    html = (report.write_report([root], reps=300) / "report.html").read_text()
    assert f"{np.mean(expected):.1f}" in html and v in html


def test_report_without_a_manifest_names_variants_by_differing_keys(tmp_path):
    _fake_run(tmp_path, "a", "cartpole-balance", 0, 64, 0.0, 10.0, 5000)
    _fake_run(tmp_path, "b", "cartpole-balance", 0, 64, 0.8, 20.0, 5000)
    (tmp_path / "b" / "seed1").mkdir()  # an unfinished run: listed, not aggregated
    cfg = config.build({"env": "cartpole-balance", "seed": 1, "critic.width": 64, "critic.sparsity": 0.8, "env_steps": 20_000})
    (tmp_path / "b" / "seed1" / "config.yaml").write_text(config.to_yaml(cfg))
    runs_ = report.load_runs([tmp_path])
    assert sorted({r.variant for r in runs_}) == ["critic.sparsity=0.0", "critic.sparsity=0.8"]
    out = report.write_report([tmp_path], tmp_path / "out", reps=200)
    html = (out / "report.html").read_text()
    assert "2 finished" in html and "1 interrupted" in html
    assert not (out / "scaling_total.png").exists()  # one size only: no scaling plot


def test_report_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparserl.cli", "report", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such directory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sparserl.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no run directories" in r.stderr
    with pytest.raises(ConfigError, match="bootstrap"):
        report.write_report([tmp_path], reps=10)
