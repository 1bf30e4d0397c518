"""``sparserl demo``: the random-policy bar it measures, its output and report, and (slow) that its
runs really learn: every final return far above a uniform random policy's."""

from __future__ import annotations

import csv
import re

import pytest

from sparserl import demo, sweep


def test_random_policy_bar_is_measured_and_reproducible():
    low = demo.random_policy_return("cartpole-swingup", 8, episodes=2)
    assert low == demo.random_policy_return("cartpole-swingup", 8, episodes=2)  # seeded: the same figure
    assert 50 < low < 200  # random actions never swing the pole up (measured 111 over 5 episodes)
    # held 8 steps, random actions build momentum: a higher bar than one-step random actions (~17)
    assert demo.random_policy_return("cartpole-swingup", 1, episodes=2) < low
    # balance starts upright, so flailing keeps it up for a while: a higher bar than swingup's
    assert low < demo.random_policy_return("cartpole-balance", 8, episodes=2) < 600


def test_demo_preset_is_the_demo_and_compares_dense_with_sparse():
    grid = sweep.expand(sweep.resolve_preset(demo.PRESET), "full")
    labels = {p.labels["sparsity"] for p in grid.points}
    assert labels == {"dense", "sparse"} and all(len(p.seeds) >= 2 for p in grid.points)
    assert {p.values["env"] for p in grid.points} == {"cartpole-swingup"}


def test_demo_prints_task_random_bar_headline_and_every_run(tmp_path, capsys):
    out = demo.run(["scale=smoke", "env_steps=1000", "warmup_steps=50", "eval_every=1000",
                    "final_eval_episodes=1", f"sweep_dir={tmp_path / 'demo'}"])
    assert out == tmp_path / "demo" / "report"
    html = (out / "report.html").read_text()
    for png in re.findall(r'<img src="([^"]+)"', html):
        assert (out / png).stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["sparsity"] for r in rows} == {"dense", "sparse"}
    assert all(r["status"] == "finished" and int(r["env_steps"]) == 1000 for r in rows)
    text = capsys.readouterr().out
    assert re.search(r"task: cartpole-swingup \(a uniform random policy scores \d+", text)
    headline = (out / "headline.txt").read_text().strip()
    assert headline and f"headline (the report's): {headline}" in text
    finals = re.findall(r"sparsity=(dense|sparse)/seed0: final return ([\d.]+)\s+\(([+-]\d+) vs random (\d+)\)", text)
    assert sorted(f[0] for f in finals) == ["dense", "sparse"]
    for _, final, gap, bar in finals:  # the gap printed is the final return minus the bar printed
        assert abs(float(final) - float(bar) - float(gap)) <= 1.0
    assert "open the report" in text


@pytest.mark.slow
def test_demo_runs_learn_far_above_random(tmp_path, capsys):
    demo.run([f"sweep_dir={tmp_path / 'demo'}"])
    text = capsys.readouterr().out
    finals = re.findall(r"final return ([\d.]+)\s+\([+-]\d+ vs random (\d+)\)", text)
    assert len(finals) == 4
    # measured: 537-829 (width 64, 50k env steps), where random actions held 8 steps score ~110
    assert all(float(final) > float(bar) + 300 for final, bar in finals), finals
