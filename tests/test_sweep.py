"""Experiment presets and sweeps: grid expansion and naming, dry-run sizes, skip/resume, failures,
the local and Ray executors (end to end on tiny runs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparserl import config, inspection, sweep
from sparserl.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# Tiny runs: about 10 s each, dominated by compilation.
TINY = {"agent": "sac", "env": "cartpole-balance", "env_steps": 1000, "warmup_steps": 100, "batch_size": 16,
        "utd": 1, "eval_every": 1000, "eval_episodes": 1, "final_eval_episodes": 1, "checkpoint_every": 1000,
        "diag_every": 0, "actor.width": 8, "critic.width": 8, "critic.blocks": 1}


def write_preset(path: Path, grid: dict, base: dict | None = None, scales: dict | None = None) -> Path:
    data = {"description": "test", "base": {**TINY, **(base or {})}, "grid": grid}
    if scales:
        data["scales"] = scales
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# Expansion


def test_expand_is_the_cartesian_product_with_named_points(tmp_path):
    p = write_preset(tmp_path / "g.yaml", {
        "env": ["cartpole-balance", "gym:Pendulum-v1"],
        "model": [{"label": "small", "critic.width": 8}, {"label": "big", "critic.width": 32, "critic.blocks": 2}],
        "critic.sparsity": [0.0, 0.9],
        "seed": [3, 4]})
    s = sweep.expand(p)
    assert s.axes == ("env", "model", "critic.sparsity")
    assert len(s.points) == 8 and s.num_runs == 16
    names = [pt.name for pt in s.points]
    assert len(set(names)) == 8
    assert names[0] == "env=cartpole-balance,model=small,critic.sparsity=0"
    assert "env=gym_Pendulum-v1,model=big,critic.sparsity=0.9" in names  # ':' is not kept in directory names
    big = next(pt for pt in s.points if pt.labels["model"] == "big")
    assert big.values["critic.width"] == 32 and big.values["critic.blocks"] == 2
    assert all(pt.seeds == (3, 4) for pt in s.points)
    cfg = big.config(4, tmp_path)
    assert cfg.seed == 4 and cfg.critic.width == 32
    assert Path(cfg.run_dir) == tmp_path / big.name / "seed4"


def test_scales_merge_base_and_replace_or_remove_axes(tmp_path):
    p = write_preset(tmp_path / "g.yaml", {"critic.width": [8, 16, 32], "critic.sparsity": [0.0, 0.5], "seed": [0, 1, 2]},
                     scales={"smoke": {"base": {"env_steps": 500}, "grid": {"critic.width": [8], "critic.sparsity": None,
                                                                           "seed": [0]}}})
    full, smoke = sweep.expand(p, "full"), sweep.expand(p, "smoke")
    assert full.num_runs == 18
    assert smoke.num_runs == 1 and smoke.points[0].values["env_steps"] == 500
    assert "critic.sparsity" not in smoke.points[0].values and smoke.points[0].name == "default"
    with pytest.raises(ConfigError, match="scale=small"):
        sweep.expand(p, "small")


def test_overrides_apply_to_every_run_and_replace_axes(tmp_path):
    p = write_preset(tmp_path / "g.yaml", {"critic.width": [8, 16], "seed": [0, 1]})
    s = sweep.expand(p, "full", {"lr": "0.001", "critic.width": "[4, 8, 12]", "seeds": "5,6,7"})
    assert [pt.values["critic.width"] for pt in s.points] == [4, 8, 12]
    assert all(pt.values["lr"] == "0.001" and pt.seeds == (5, 6, 7) for pt in s.points)
    assert s.points[0].config(5, tmp_path).lr == 0.001
    one = sweep.expand(p, "full", {"critic.width": "16", "seed": "9"})
    assert len(one.points) == 1 and one.points[0].seeds == (9,)


@pytest.mark.parametrize("grid, overrides, match", [
    ({"critic.widht": [8]}, {}, "critic.widht: not a config key"),
    ({"model": [{"label": "a", "critic.width": 8}, {"label": "a", "critic.width": 16}]}, {}, "distinct labels"),
    ({"critic.width": []}, {}, "non-empty list"),
    ({"critic.width": [0]}, {}, "critic.width"),  # every run is validated before anything runs
    ({"seed": [1, 1]}, {}, "distinct non-negative"),
    ({"critic.width": [8]}, {"run_dir": "x"}, "sweep_dir="),
    ({"critic.width": [8]}, {"lr": "[0.1, 0.2]"}, "only allowed for an axis"),
    ({"critic.width": [8]}, {"nope": "1"}, "unknown key 'nope'"),
])
def test_bad_presets_and_overrides_are_one_line_errors(tmp_path, grid, overrides, match):
    p = write_preset(tmp_path / "g.yaml", grid)
    with pytest.raises(ConfigError, match=match) as e:
        sweep.expand(p, "full", overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("preset", sweep.bundled_presets(), ids=lambda p: p.stem)
def test_bundled_presets_expand_at_every_scale(preset):
    sizes = {}
    for scale in sweep.SCALES:
        s = sweep.expand(preset, scale)
        assert s.description and s.points
        sizes[scale] = s.num_runs
    assert sizes["smoke"] <= 8 and sizes["smoke"] <= sizes["small"] <= sizes["full"]  # smoke: about a minute


def test_scaling_preset_spans_the_papers_sizes():
    s = sweep.expand(sweep.resolve_preset("scaling_sac"), "full")
    assert {pt.values["env"] for pt in s.points} == {"humanoid-run", "humanoid-walk", "dog-run", "dog-trot"}
    humanoid = {pt.labels["model"]: pt for pt in s.points if pt.values["env"] == "humanoid-run"
                and pt.labels["sparsity"] == "dense"}
    assert inspection.abstract_cost(humanoid["4.5M"].config(0, Path(".")))["total_params"] == 4_394_923
    assert inspection.abstract_cost(humanoid["109M"].config(0, Path(".")))["total_params"] == 109_405_227


def test_abstract_cost_matches_the_built_model():
    cfg = config.build({**TINY, "critic.width": 64, "critic.sparsity": 0.8, "actor.sparsity": 0.5})
    cost = inspection.abstract_cost(cfg)
    built = inspection.inspect(cfg)
    assert cost["total_params"] == built["total_params"]
    assert cost["nonzero_params"] == built["nonzero_params"] < built["total_params"]
    # The lowered program counts a few fused elementwise ops differently: 2% on this tiny model, 0.03% at 109M.
    assert cost["flops_per_update"] == pytest.approx(built["flops_per_update"], rel=0.03)
    assert cost["updates"] == (cfg.agent_steps - cfg.warmup_steps) * cfg.utd
    assert cost["total_flops"] == pytest.approx(cost["flops_per_update"] * cost["updates"])


def test_dry_run_prints_sizes_before_anything_runs(tmp_path):
    p = write_preset(tmp_path / "g.yaml", {"critic.width": [8, 64], "seed": [0, 1]})
    out = subprocess.run([sys.executable, "-m", "sparserl.cli", "sweep", str(p), "--dry-run", "--device-gflops", "100",
                          f"sweep_dir={tmp_path / 'sw'}"], capture_output=True, text=True, check=True).stdout
    assert "critic.width=8" in out and "critic.width=64" in out and "est. hours" in out
    widths = {int(line.split()[0].split("=")[1]): int(line.split()[2].replace(",", ""))
              for line in out.splitlines() if line.startswith("critic.width=")}
    assert widths[64] == inspection.abstract_cost(config.build({**TINY, "critic.width": 64}))["total_params"]
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("args, match", [
    (["scalng_sac"], "did you mean scaling_sac"),
    (["scaling_sac", "scale=huge"], "scale='huge'"),
    (["scaling_sac", "executor=pbs"], "executor='pbs'"),
    (["scaling_sac", "slurm.time=60"], "only used with executor=slurm"),
    (["scaling_sac", "executor=slurm", "slurm.time=0"], "slurm.time='0'"),
    (["scaling_sac", "executor=slurm", "gpus_per_run=0.5"], "Slurm allocates whole GPUs"),
    (["scaling_sac", "workers=0"], "workers='0'"),
])
def test_sweep_cli_errors_exit_2_with_one_line(args, match):
    r = subprocess.run([sys.executable, "-m", "sparserl.cli", "sweep", *args], capture_output=True, text=True)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Execution


@pytest.fixture(scope="module")
def ray_sweep(tmp_path_factory):
    """Two tiny runs through a local Ray instance (the executor a cluster uses)."""
    tmp = tmp_path_factory.mktemp("ray")
    preset = write_preset(tmp / "tiny.yaml", {"critic.sparsity": [0.0, 0.5]})
    s = sweep.expand(preset)
    result = sweep.execute(s, tmp / "sweep", executor="ray", address="local", out=lambda m: None)
    return s, tmp / "sweep", result


def test_ray_local_sweep_completes(ray_sweep):
    s, sweep_dir, result = ray_sweep
    assert sorted(result["finished"]) == sorted(f"{pt.name}/seed0" for pt in s.points) and not result["failed"]
    for pt in s.points:
        summary = json.loads((pt.run_dir(sweep_dir, 0) / "summary.json").read_text())
        assert summary["env_steps"] == TINY["env_steps"]
        saved = yaml.safe_load((pt.run_dir(sweep_dir, 0) / "config.yaml").read_text())
        assert saved["critic"]["sparsity"] == pt.values["critic.sparsity"]
    manifest = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    assert [p["name"] for p in manifest["points"]] == [pt.name for pt in s.points]
    status = json.loads((sweep_dir / "sweep_status.json").read_text())
    assert len(status["finished"]) == 2


def test_rerun_skips_finished_and_resumes_interrupted(ray_sweep, monkeypatch):
    s, sweep_dir, _ = ray_sweep
    again = sweep.execute(s, sweep_dir, out=lambda m: None)
    assert len(again["skipped"]) == 2 and not again["finished"] and not again["failed"]
    # Losing the summary makes a run look killed before its end: the sweep resumes it (from the last
    # checkpoint) and leaves the finished one alone.
    interrupted = s.points[1].run_dir(sweep_dir, 0)
    before = json.loads((interrupted / "summary.json").read_text())
    (interrupted / "summary.json").unlink()
    resumed = sweep.execute(s, sweep_dir, out=lambda m: None)
    assert resumed["finished"] == [f"{s.points[1].name}/seed0"] and resumed["skipped"] == [f"{s.points[0].name}/seed0"]
    assert "resuming at env step 1000" in (sweep_dir / "logs" / f"{s.points[1].name}.seed0.log").read_text()
    assert json.loads((interrupted / "summary.json").read_text())["final_return"] == pytest.approx(before["final_return"])


def test_a_failing_run_does_not_stop_the_sweep(tmp_path, monkeypatch):
    preset = write_preset(tmp_path / "tiny.yaml", {"critic.width": [8, 9, 10]})
    s = sweep.expand(preset)
    real = sweep.Job.command

    def command(self, sweep_dir):  # the middle run crashes as a broken process would
        if self.point.values["critic.width"] == 9:
            return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        return real(self, sweep_dir)

    monkeypatch.setattr(sweep.Job, "command", command)
    lines = []
    result = sweep.execute(s, tmp_path / "sw", workers=2, out=lines.append)
    assert result["failed"] == ["critic.width=9/seed0"]
    assert sorted(result["finished"]) == ["critic.width=10/seed0", "critic.width=8/seed0"]
    log = tmp_path / "sw" / "logs" / "critic.width=9.seed0.log"
    assert "boom" in log.read_text()
    assert any("FAILED critic.width=9/seed0" in l and str(log) in l for l in lines)
    assert "1 failed" in lines[-2] and "2 finished" in lines[-2]
    assert json.loads((tmp_path / "sw" / "sweep_status.json").read_text())["failed_logs"] == {"critic.width=9/seed0": str(log)}


def test_seeds_of_a_point_can_share_one_process(tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml", {"seed": [0, 1]})
    s = sweep.expand(preset)
    jobs, skipped = sweep.plan(s, tmp_path / "sw", group_seeds=True, retry_failed=False)
    assert len(jobs) == 1 and jobs[0].seeds == (0, 1) and not any(skipped.values())
    cmd = jobs[0].command(tmp_path / "sw")
    assert "seeds=0,1" in cmd and f"run_dir={tmp_path / 'sw' / 'default'}" in cmd
    jobs, _ = sweep.plan(s, tmp_path / "sw", group_seeds=False, retry_failed=False)
    assert [j.seeds for j in jobs] == [(0,), (1,)]
