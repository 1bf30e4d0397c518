"""Config defaults and validation, and the command line (exit codes, one-line errors, inspect JSON)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparserl import config, rundir, train
from sparserl.cli import main
from sparserl.config import Config, ConfigError

SPARSERL = Path(sys.executable).parent / "sparserl"


def run_main(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr lines)."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# defaults


def test_defaults_equal_paper_values():
    c = Config()
    assert c.lr == 1e-4
    assert c.weight_decay == 1e-2
    assert c.batch_size == 256
    assert c.utd == 2
    assert c.tau == 0.005
    assert c.gamma == 0.99
    assert c.sac.temperature_init == 0.01
    assert c.sac.target_entropy_scale == 0.5
    assert (c.sac.log_std_min, c.sac.log_std_max) == (-10.0, 2.0)
    assert c.ddpg.noise_std == 0.1
    assert c.warmup_steps == 5000
    assert c.action_repeat == 2
    assert c.env_steps == 1_000_000 and c.agent_steps == 500_000
    assert c.buffer_size == 1_000_000
    assert c.eval_every == 10_000 and c.eval_episodes == 10 and c.final_eval_episodes == 100
    assert c.critic.cdq is False
    assert c.sparsity.method == "erk"
    assert (c.actor.width, c.actor.blocks, c.critic.width, c.critic.blocks) == (128, 1, 512, 2)
    assert c.agent == "sac" and c.arch == "simba"
    # the mask seed defaults to the seed, and can be set separately
    assert c.mask_seed == c.seed == 0
    assert config.build({"seed": 4}, check_env=False).mask_seed == 4
    assert config.build({"seed": 4, "sparsity.seed": 9}, check_env=False).mask_seed == 9


def test_config_is_frozen_and_hashable():
    a = config.build({"critic.sparsity": 0.9}, check_env=False)
    b = config.build({"critic.sparsity": "0.9"}, check_env=False)
    assert a == b and hash(a) == hash(b)
    assert a != Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.lr = 1.0


def test_value_conversion():
    c = config.build({"env_steps": "1e6", "buffer_size": "1_000", "critic.cdq": "yes", "obs_norm": "off",
                      "sparsity.seed": "null", "lr": "3e-4", "actor.sparsity": 0.5}, check_env=False)
    assert c.env_steps == 1_000_000 and isinstance(c.env_steps, int)
    assert c.buffer_size == 1000
    assert c.critic.cdq is True and c.obs_norm is False
    assert c.sparsity.seed is None
    assert c.lr == 3e-4 and c.actor.sparsity == 0.5


def test_yaml_round_trip(tmp_path):
    cfg = config.build({"agent": "ddpg", "critic.width": 64, "critic.sparsity": 0.7, "seed": 3,
                        "sparsity.seed": 11}, check_env=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.build(config.load_preset(path), check_env=False) == cfg


def test_default_name_and_run_dir():
    cfg = config.build({"critic.sparsity": 0.9, "seed": 2}, check_env=False)
    assert cfg.default_name() == "sac-humanoid-run-a128x1s0-c512x2s0.9-seed2"
    assert cfg.resolved_run_dir == Path("runs") / cfg.default_name()
    assert config.build({"run_dir": "/tmp/x"}, check_env=False).resolved_run_dir == Path("/tmp/x")


@pytest.mark.parametrize("values,key", [
    ({"env_steps": 1, "action_repeat": 2}, "env_steps"),
    ({"sac.log_std_min": 2.0}, "sac.log_std_min"),
    ({"gamma": 1.5}, "gamma"),
    ({"lr": 0}, "lr"),
    ({"sparsity.method": "magnitude"}, "sparsity.method"),
    ({"sparsity.draw": "poisson"}, "sparsity.draw"),
    ({"sparsity.budget": "some"}, "sparsity.budget"),
    ({"critic.cdq": "maybe"}, "critic.cdq"),
    ({"seed": 1.5}, "seed"),
    ({"critic.width": None}, "critic.width"),
])
def test_build_rejects_bad_values(values, key):
    with pytest.raises(ConfigError) as info:
        config.build(values, check_env=False)
    msg = str(info.value)
    assert key in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------
# bad input on the command line: exit 2, one line naming the key, nothing written

BAD_INPUTS = [
    (["critic.widht=3"], ["critic.widht", "critic.width"]),
    (["env=cartpole-balanse"], ["env", "cartpole-balance"]),
    (["critic.sparsity=1.0"], ["critic.sparsity"]),
    (["actor.sparsity=-0.1"], ["actor.sparsity"]),
    (["critic.width=0"], ["critic.width"]),
    (["actor.blocks=-1"], ["actor.blocks"]),
    (["batch_size=abc"], ["batch_size"]),
    (["critic.sparsity=abc"], ["critic.sparsity"]),
    (["agent=ppo"], ["agent", "sac", "ddpg"]),
    (["foo"], ["foo", "no such file"]),
    (["sparsity.seed=-1"], ["sparsity.seed"]),
    (["=3"], ["=3"]),
]


@pytest.mark.parametrize("command", ["train", "inspect"])
@pytest.mark.parametrize("args,expected", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(args, expected, command, tmp_path, workdir, capsys):
    run_dir = tmp_path / "x"
    rc, out, err = run_main([command, *args, f"run_dir={run_dir}"], capsys)
    assert rc == 2
    assert out == ""
    assert len(err) == 1, err
    assert err[0].startswith("sparserl: error: ")
    for word in expected:
        assert word in err[0], (word, err[0])
    assert "Traceback" not in err[0]
    assert not run_dir.exists()
    assert list(workdir.iterdir()) == []


def test_unknown_gym_env_suggestions_all_have_gym_prefix(workdir, capsys):
    """Every suggested Gymnasium id must be usable as written, i.e. carry the gym: prefix."""
    rc, _, err = run_main(["train", "env=gym:HalfCheetah-v9"], capsys)
    assert rc == 2 and len(err) == 1
    assert "gym:HalfCheetah-v5" in err[0]
    suggestions = err[0].split("did you mean ", 1)[1].rstrip("?)").split(" or ")
    assert suggestions and all(s.startswith("gym:") for s in suggestions), err[0]


@pytest.mark.parametrize("args,word", [(["train", "critic.widht=3"], "critic.width"),
                                       (["inspect", "env=cartpole-balanse"], "cartpole-balance")])
def test_console_script_exit_code_and_no_traceback(args, word, tmp_path):
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    proc = subprocess.run([str(SPARSERL), *args, f"run_dir={tmp_path / 'x'}"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and word in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# presets


def test_preset_plus_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("seed: 3\ncritic:\n  width: 64\n  sparsity: 0.5\nsparsity:\n  method: uniform\n")
    cfg = config.from_args(str(preset), ["critic.width=32", "actor.sparsity=0.25"], check_env=False)
    assert cfg.critic.width == 32  # override wins
    assert cfg.critic.sparsity == 0.5 and cfg.seed == 3 and cfg.sparsity.method == "uniform"
    assert cfg.actor.sparsity == 0.25
    assert cfg.actor.width == 128  # untouched default


def test_preset_via_cli_inspect(tmp_path, workdir, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("env: cartpole-balance\nactor:\n  width: 16\ncritic:\n  width: 64\n  blocks: 1\n")
    rc, out, err = run_main(["inspect", "--json", "--no-flops", str(preset), "critic.width=32"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    layers = {l["name"]: l for l in report["critic"]["layers"]}
    assert layers["q0/encoder/embed/kernel"]["shape"] == [5 + 1, 32]
    assert report["flops_per_update"] is None


@pytest.mark.parametrize("text,words", [
    ("critic:\n  widht: 3\n", ["critic.widht", "critic.width"]),
    ("seed: 1\nbogus: 2\n", ["bogus"]),
    ("critic: [1, 2\n", ["invalid YAML"]),
    ("- 1\n- 2\n", ["mapping"]),
    ("critic:\n  sparsity: 1.0\n", ["critic.sparsity"]),
])
def test_bad_preset_exits_2(text, words, tmp_path, workdir, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    rc, out, err = run_main(["train", str(preset), f"run_dir={tmp_path / 'x'}"], capsys)
    assert rc == 2 and out == ""
    assert len(err) == 1, err
    for w in words:
        assert w in err[0]
    assert not (tmp_path / "x").exists()
    assert list(workdir.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# run directory


def test_occupied_run_dir_is_refused(tmp_path, workdir, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "dummy.txt").write_text("keep me")
    # small settings, in case the refusal is missing (the test must not train for long)
    rc, out, err = run_main(["train", "env=cartpole-balance", f"run_dir={run_dir}", "env_steps=4",
                             "action_repeat=1", "warmup_steps=100", "eval_every=100", "eval_episodes=1",
                             "final_eval_episodes=1", "progress=false", "actor.width=8", "critic.width=8"],
                            capsys)
    assert rc == 2
    # a directory that is not a run: the message must not suggest overwrite=true (which would not delete it either)
    assert len(err) == 1 and "run_dir" in err[0] and "not a sparserl run" in err[0] and "overwrite" not in err[0]
    assert [p.name for p in run_dir.iterdir()] == ["dummy.txt"]
    assert (run_dir / "dummy.txt").read_text() == "keep me"


def test_run_dir_status_rules(tmp_path):
    def status(**kw):
        return rundir.check(config.build(kw, check_env=False))

    empty = tmp_path / "empty"
    empty.mkdir()
    assert status(run_dir=str(empty)) == "new"
    assert status(run_dir=str(tmp_path / "missing")) == "new"
    full = tmp_path / "full"
    full.mkdir()
    (full / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a sparserl run"):
        status(run_dir=str(full))
    with pytest.raises(ConfigError, match="not a sparserl run"):  # overwrite only ever replaces a run
        status(run_dir=str(full), overwrite=True)
    own = tmp_path / "own"  # only sparserl's own files (a run killed before config.yaml was written)
    (own / "checkpoints").mkdir(parents=True)
    (own / "metrics.csv").write_text("env_step\n")
    with pytest.raises(ConfigError, match="incomplete sparserl run"):
        status(run_dir=str(own))
    assert status(run_dir=str(own), overwrite=True) == "new"


def test_run_dir_that_is_a_file_is_a_usage_error(tmp_path, workdir, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    rc, out, err = run_main(["train", "env=cartpole-balance", f"run_dir={target}"], capsys)
    assert rc == 2
    assert len(err) == 1 and "run_dir" in err[0]
    assert target.read_text() == "x"


# ----------------------------------------------------------------------------------------------
# help and inspect


@pytest.mark.parametrize("command", ["train", "inspect", "demo", "sweep", "report", "diagnose"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples" in out
    assert f"sparserl {command}" in out


def test_inspect_keys_lists_every_key(capsys):
    rc, out, _ = run_main(["inspect", "--keys"], capsys)
    assert rc == 0
    for key in config.schema():
        assert f"`{key}`" in out


def test_inspect_json_small_config(workdir, capsys):
    obs_dim, act_dim, width = 5, 1, 32  # cartpole-balance: position (3) + velocity (2); one action
    rc, out, err = run_main(["inspect", "--json", "env=cartpole-balance", f"actor.width={width}",
                             f"critic.width={width}", "critic.blocks=1", "critic.sparsity=0.5",
                             "batch_size=16"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["obs_dim"] == obs_dim and report["action_dim"] == act_dim
    for module in ("actor", "critic"):
        m = report[module]
        assert {"total_params", "nonzero_params", "layers"} <= set(m)
        for layer in m["layers"]:
            assert {"name", "shape", "sparsity"} <= set(layer)
            size = 1
            for d in layer["shape"]:
                size *= d
            assert layer["params"] == size
            assert layer["sparsity"] == pytest.approx(1 - layer["nonzero"] / size)
        assert m["total_params"] == sum(l["params"] for l in m["layers"])
        assert m["nonzero_params"] == sum(l["nonzero"] for l in m["layers"])

    critic = report["critic"]
    layers = {l["name"]: l for l in critic["layers"]}
    # kernels are (in, out)
    assert layers["q0/encoder/embed/kernel"]["shape"] == [obs_dim + act_dim, width]
    assert layers["q0/encoder/block0/hidden/kernel"]["shape"] == [width, 4 * width]
    assert layers["q0/encoder/block0/out/kernel"]["shape"] == [4 * width, width]
    assert layers["q0/head/kernel"]["shape"] == [width, 1] and layers["q0/head/kernel"]["sparsity"] == 0.0
    H, N, inp = width, 1, obs_dim + act_dim
    assert critic["total_params"] == (inp + 1) * H + N * (8 * H * H + 7 * H) + 2 * H + H + 1
    assert critic["nonzero_params"] < critic["total_params"]
    assert critic["nonzero_params"] == pytest.approx(0.5 * critic["total_params"], rel=0.01)
    assert report["actor"]["nonzero_params"] == report["actor"]["total_params"]
    assert report["total_params"] == report["actor"]["total_params"] + critic["total_params"]

    # FLOPs: at least the dense critic forward pass on the batch (2 flops per weight per sample)
    critic_kernels = sum(l["params"] for l in critic["layers"] if len(l["shape"]) == 2)
    assert report["flops_per_update"] > 2 * 16 * critic_kernels


def test_inspect_table_output(workdir, capsys):
    rc, out, _ = run_main(["inspect", "--no-flops", "env=cartpole-balance", "actor.width=16",
                           "critic.width=16", "critic.blocks=1"], capsys)
    assert rc == 0
    assert "sac on cartpole-balance (obs 5, action 1)" in out
    assert "q0/encoder/embed/kernel" in out and "6x16" in out


@pytest.mark.parametrize("argv", [
    ["train", "seeds=1,01", "env=cartpole-balance"],          # the same seed written twice
    ["train", "lr=inf", "env=cartpole-balance"],
    ["train", "weight_decay=nan", "env=cartpole-balance"],
    ["diagnose", "--simplicity", "--widths", "a,b"],
    ["diagnose", "--simplicity", "--widths", ","],
    ["diagnose", "--simplicity", "--sparsities", "a"],
    ["diagnose", "--simplicity", "--inits", "0"],
    ["diagnose", "--plasticity", "--plasticity-steps", "-3", "runs/x"],
])
def test_more_bad_input_is_one_line_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparserl: error:"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the glibc tunable only applies on Linux")
def test_command_restarts_once_with_huge_page_malloc_unless_disabled():
    """The `sparserl` entry point re-execs itself once with glibc.malloc.hugetlb=1 (sparserl/hugepages.py)."""
    code = ("import os; from sparserl import hugepages; print('start', flush=True); "
            "hugepages.restart_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SPARSERL_HUGE_PAGES")}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                                       text=True, timeout=120).stdout.split()
    assert run({}) == ["start", "start", "glibc.malloc.hugetlb=1"]
    assert run({"SPARSERL_HUGE_PAGES": "0"}) == ["start", "None"]
    assert run({"GLIBC_TUNABLES": "glibc.malloc.check=0"}) == ["start", "glibc.malloc.check=0"]  # never overridden
    from sparserl import hugepages, sweep
    assert sweep._child_env("local", 0.0)["GLIBC_TUNABLES"] == os.environ.get("GLIBC_TUNABLES", hugepages.TUNABLE)
