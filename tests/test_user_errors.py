"""Every user mistake: one line ``sparserl: error: ...`` (or ``sparserl: warning: ...``), exit 2, nothing written.

One test per class of mistake, parametrized over examples: files that are not UTF-8 or not YAML
mappings, outputs that cannot be written (files, dangling symlinks, symlink loops, paths under a
file, read-only or non-creatable filesystems), models that cannot fit in memory, values that pass
validation and overflow later, malformed overrides, W&B without credentials, and wrong input that was
accepted silently (conflicting keys, another agent's keys, duplicate YAML keys, unbounded options).
Property tests: arbitrary text/bytes either parse or raise ConfigError, never anything else.

Tests run as root here, where chmod stops nothing: an unwritable place is a path under a file,
``/proc`` or ``/sys``; an unreadable file is a directory in its place or bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparserl import config, preflight, runs, sweep
from sparserl.cli import main
from sparserl.config import ConfigError

TINY = ["env=cartpole-balance", "env_steps=200", "warmup_steps=50", "eval_every=100", "eval_episodes=1",
        "final_eval_episodes=1", "actor.width=8", "critic.width=8", "critic.blocks=1", "batch_size=8",
        "progress=false"]
SWEEP_PRESET = ("description: tiny\n"
                "base: {env: cartpole-balance, env_steps: 200, warmup_steps: 50, eval_every: 100, eval_episodes: 1,\n"
                "       final_eval_episodes: 1, actor.width: 8, critic.width: 8, critic.blocks: 1, batch_size: 8}\n"
                "grid: {seed: [0]}\n")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): kind, size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (st_.st_mode, st_.st_size if not p.is_dir() else 0, st_.st_mtime_ns)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """The CLI in-process: (exit code, stdout, non-empty stderr lines); argparse's exits included."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def assert_refused(argv: list[str], capsys, root: Path, *words: str) -> str:
    """Exit 2, exactly one stderr line ``sparserl: error: ...`` naming ``words``, no traceback,
    nothing under ``root`` changed. Returns the line."""
    before = snapshot(root)
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert len(err) == 1, err
    assert err[0].startswith("sparserl: error: "), err
    assert "Traceback" not in out + "".join(err)
    for w in words:
        assert w in err[0], (w, err[0])
    assert snapshot(root) == before, "something was written"
    return err[0]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace as the current directory: a tiny sweep preset, a file, symlinks that lead nowhere."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(SWEEP_PRESET)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path


def fake_run(d: Path, final: float = 10.0) -> Path:
    d.mkdir(parents=True)
    cfg = config.build({"env": "cartpole-balance", "critic.width": 16, "env_steps": 2000, "run_dir": str(d)})
    (d / "config.yaml").write_text(config.to_yaml(cfg))
    (d / "summary.json").write_text(json.dumps({
        "final_return": final, "params": {"critic": {"total_params": 100, "nonzero_params": 100, "sparsity": 0.0}}}))
    (d / "metrics.csv").write_text("env_step,eval_return\n1000,5.0\n2000,7.5\n")
    return d


# Ways a run's file can be garbage: (file, content); bytes are written as they are, None makes a directory.
GARBAGE = {
    "config-binary": ("config.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"),
    "config-list": ("config.yaml", "- 1\n- 2\n"),
    "config-invalid-yaml": ("config.yaml", "critic: [1, 2\n"),
    "config-duplicate-key": ("config.yaml", "seed: 1\nseed: 2\n"),
    "summary-truncated": ("summary.json", '{"final_return": 1'),
    "summary-list": ("summary.json", "[1, 2]"),
    "summary-binary": ("summary.json", b"\xff\xfe\x00\x01"),
    "metrics-binary": ("metrics.csv", b"\xff\xfe\x00\x00garbage"),
    "metrics-directory": ("metrics.csv", None),
}


def make_garbage(run_dir: Path, kind: str) -> None:
    name, content = GARBAGE[kind]
    path = run_dir / name
    path.unlink(missing_ok=True)
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


# ----------------------------------------------------------------------------------------------
# 6. Files that are not UTF-8, not YAML, not a mapping (or a directory in a file's place)


def _bad_file_cases():
    binary = b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"
    return {
        "train-binary-preset": (lambda d: (d / "p.yaml").write_bytes(binary), ["train", "p.yaml"], ["p.yaml", "UTF-8"]),
        "inspect-binary-preset": (lambda d: (d / "p.yaml").write_bytes(binary), ["inspect", "p.yaml"], ["UTF-8"]),
        "sweep-binary-preset": (lambda d: (d / "p.yaml").write_bytes(binary), ["sweep", "p.yaml"], ["UTF-8"]),
        "train-preset-is-directory": (lambda d: (d / "p.yaml").mkdir(), ["train", "p.yaml"], ["directory"]),
        "train-preset-list": (lambda d: (d / "p.yaml").write_text("- 1\n"), ["train", "p.yaml"], ["mapping"]),
        "train-preset-scalar": (lambda d: (d / "p.yaml").write_text("7\n"), ["train", "p.yaml"], ["mapping"]),
        "train-preset-bad-date": (lambda d: (d / "p.yaml").write_text("seed: 2024-13-45\n"), ["train", "p.yaml"],
                                  ["invalid YAML"]),
        "train-preset-dangling": (lambda d: None, ["train", "dangling.yaml"], ["no such file"]),
        "sweep-preset-scalar": (lambda d: (d / "p.yaml").write_text("7\n"), ["sweep", "p.yaml"], ["mapping"]),
        "sweep-preset-grid-list": (lambda d: (d / "p.yaml").write_text("grid: [1, 2]\n"), ["sweep", "p.yaml"],
                                   ["grid", "mapping"]),
        "sweep-preset-scale-list": (lambda d: (d / "p.yaml").write_text(SWEEP_PRESET + "scales: {smoke: [1]}\n"),
                                    ["sweep", "p.yaml", "scale=smoke"], ["scales.smoke"]),
        "sweep-bench-binary": (lambda d: (d / "b.json").write_bytes(binary),
                               ["sweep", "tiny.yaml", "--dry-run", "--bench", "b.json"], ["--bench"]),
        "sweep-bench-empty": (lambda d: (d / "b.json").write_text('{"updates": []}'),
                              ["sweep", "tiny.yaml", "--dry-run", "--bench", "b.json"], ["--bench"]),
        "diagnose-config-list": (lambda d: (d / "r").mkdir() or (d / "r" / "config.yaml").write_text("- 1\n"),
                                 ["diagnose", "r"], ["config.yaml", "mapping"]),
        "diagnose-config-binary": (lambda d: (d / "r").mkdir() or (d / "r" / "config.yaml").write_bytes(binary),
                                   ["diagnose", "r"], ["config.yaml", "UTF-8"]),
        "report-only-garbage": (lambda d: (d / "r").mkdir() or (d / "r" / "config.yaml").write_text("- 1\n"),
                                ["report", "r"], ["no readable run", "config.yaml"]),
    }


@pytest.mark.parametrize("case", sorted(_bad_file_cases()))
def test_unreadable_or_non_mapping_files_are_one_line(case, ws, capsys):
    setup, argv, words = _bad_file_cases()[case]
    if case == "train-preset-dangling":
        (ws / "dangling.yaml").symlink_to(ws / "missing.yaml")
    setup(ws)
    assert_refused(argv, capsys, ws, *words)


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_ls_lists_a_garbage_run_as_unreadable_and_the_others_as_before(kind, ws, capsys):
    fake_run(ws / "runs" / "good")
    make_garbage(fake_run(ws / "runs" / "bad"), kind)
    before = snapshot(ws)
    rc, out, err = run_cli(["ls", "runs"], capsys)
    assert rc == 0 and err == [], err
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert rows == {"good": "finished", "bad": "unreadable"}, out
    assert snapshot(ws) == before


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_report_skips_a_garbage_run_with_one_warning(kind, ws, capsys):
    fake_run(ws / "runs" / "good")
    make_garbage(fake_run(ws / "runs" / "bad"), kind)
    rc, out, err = run_cli(["report", "runs", "--bootstrap", "100"], capsys)
    assert rc == 0, err
    assert len(err) == 1 and err[0].startswith("sparserl: warning: ") and "bad" in err[0], err
    assert GARBAGE[kind][0] in err[0]
    assert "Traceback" not in out
    summary = (ws / "runs" / "report" / "summary.csv").read_text()
    assert "good" in summary and str(ws / "runs" / "bad") not in summary


# ----------------------------------------------------------------------------------------------
# 6. Outputs that cannot be written: a file, a path under a file, dangling symlinks, symlink loops,
#    filesystems where nothing can be created (checked before any work)


UNWRITABLE = {
    "is-a-file": ("afile", "a file"),
    "under-a-file": ("afile/sub", "a file"),
    "dangling-symlink": ("dangling", "dangling"),
    "under-dangling-symlink": ("dangling/sub", "dangling"),
    "symlink-loop": ("loop", "loop"),
    "proc": ("/proc/sparserl-test/out", "cannot be written"),
    "sys": ("/sys/sparserl-test", "cannot be written"),
}


def _out_command(command: str, target: str, ws: Path) -> tuple[list[str], str]:
    if command == "sweep":
        return ["sweep", "tiny.yaml", f"sweep_dir={target}"], "sweep_dir"
    if command == "report":
        fake_run(ws / "runs" / "good")
        return ["report", "runs", "--out", target], "--out"
    if command == "diagnose-simplicity":
        return ["diagnose", "--simplicity", "--widths", "8", "--sparsities", "0", "--inits", "1", "--out", target], "--out"
    raise AssertionError(command)


@pytest.mark.parametrize("where", sorted(UNWRITABLE))
@pytest.mark.parametrize("command", ["sweep", "report", "diagnose-simplicity"])
def test_unwritable_outputs_are_refused_before_any_work(command, where, ws, capsys, monkeypatch):
    from sparserl import diagnose, report

    target, word = UNWRITABLE[where]
    argv, key = _out_command(command, target, ws)

    def no_work(*a, **k):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(diagnose, "simplicity_grid", no_work)
    monkeypatch.setattr(report, "load_runs", no_work)
    monkeypatch.setattr(sweep, "plan", no_work)
    assert_refused(argv, capsys, ws, key, word)


def test_diagnose_run_dir_output_that_is_a_file_is_refused(ws, capsys):
    run_dir = fake_run(ws / "r")
    (run_dir / "diagnose").write_text("not a directory")
    assert_refused(["diagnose", "r"], capsys, ws, "diagnose", "a file")


def test_output_dir_check_writes_nothing_and_accepts_good_paths(tmp_path):
    preflight.check_output_dir(tmp_path / "new" / "deeper", "--out")  # creatable
    preflight.check_output_dir(tmp_path, "--out")  # existing
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="longer than 255"):
        preflight.check_output_dir(tmp_path / ("x" * 300), "--out")


# ----------------------------------------------------------------------------------------------
# 6. Sizes that cannot fit in memory: refused from the config's abstract shapes before allocating


@pytest.mark.parametrize("argv,words", [
    (["train", "env=cartpole-balance", "critic.width=200000", "run_dir=r"], ["critic.width=200000", "GB", "available"]),
    (["inspect", "env=cartpole-balance", "critic.width=200000"], ["critic.width=200000", "GB", "available"]),
    (["diagnose", "--simplicity", "--widths", "8,200000", "--out", "s"], ["--widths", "200000", "GB", "available"]),
    (["train", "env=cartpole-balance", "actor.width=100000", "critic.width=100000", "seeds=0,1", "run_dir=r"],
     ["actor.width=100000", "2 seeds"]),
    (["inspect", "env=cartpole-balance", "critic.width=200000", "critic.sparsity=0.9"],
     ["critic.sparsity", "sparsity.draw=exact"]),
    (["sweep", "tiny.yaml", "--dry-run", "critic.width=200000", "critic.sparsity=0.9"],
     ["critic.sparsity", "sparsity.draw=exact"]),
], ids=["train", "inspect", "diagnose-simplicity", "train-seeds", "inspect-sparse-mask", "sweep-dry-run-sparse-mask"])
def test_models_that_cannot_fit_are_refused(argv, words, ws, capsys):
    assert_refused(argv, capsys, ws, *words)


def test_memory_estimate_counts_the_model_and_the_flat_replay():
    cfg = config.build({"env": "humanoid-run"}, check_env=False)
    est = preflight.model_memory(cfg, 67, 21)
    assert est["params"] == 4_394_923  # README / `sparserl inspect` default
    # parameters, gradients, two Adam moments and the critic's target: at least 4 float32 copies
    assert est["model"] >= 4 * 4 * est["params"]
    assert est["replay"] == 500_000 * (2 * 67 + 21 + 2) * 4  # capacity = agent steps
    with pytest.raises(ConfigError, match="buffer_size"):
        preflight.check_model_fits(cfg, 67, 21, available=est["model"] + est["replay"] // 2)
    with pytest.raises(ConfigError, match="critic.width"):
        preflight.check_model_fits(cfg, 67, 21, available=est["model"] // 2)
    assert preflight.check_model_fits(cfg, 67, 21, available=10 * (est["model"] + est["replay"]))["params"] > 0
    sparse = config.build({"env": "humanoid-run", "critic.sparsity": 0.9, "critic.width": 200000}, check_env=False)
    assert preflight.model_memory(sparse, 67, 21)["model"] > 1e12  # no int32 overflow drawing huge masks


# ----------------------------------------------------------------------------------------------
# 6. Values that pass validation and overflow later, malformed overrides, W&B without credentials


@pytest.mark.parametrize("argv,words", [
    (["train", *TINY, "seed=99999999999999999999"], ["seed=99999999999999999999", "2147483647"]),
    (["train", *TINY, "sparsity.seed=2147483648"], ["sparsity.seed"]),
    (["train", *TINY, "seeds=0,4294967296"], ["seeds"]),
    (["train", *TINY, "seed=2147483647", "num_seeds=2"], ["num_seeds"]),
    (["train", *TINY, "num_seeds=100000"], ["num_seeds"]),
    (["train", *TINY, "env=[cartpole-balance"], ["env=[cartpole-balance", "unterminated"]),
    (["train", *TINY, "critic.width={a: 1"], ["unterminated"]),
    (["sweep", "tiny.yaml", "env=[cartpole-balance"], ["env=[cartpole-balance", "unterminated"]),
    (["sweep", "tiny.yaml", "env=[cartpole-balance, [x]"], ["unterminated"]),
    (["train", *TINY, "env=cartpole\nbalance"], ["control character"]),
    (["inspect", "log.wandb_project=a\x00b"], ["control character"]),
    (["train", *TINY, "critic.width=1e400"], ["critic.width"]),
    (["report", "runs", "--bootstrap", "many"], ["--bootstrap"]),
    (["sweep", "tiny.yaml", "workers=1e999"], ["workers"]),
    (["sweep", "tiny.yaml", "cpus_per_run=nan"], ["cpus_per_run"]),
    (["diagnose", "r", "--plasticity", "--plasticity-steps", "99999999999"], ["--plasticity-steps"]),
    (["diagnose", "--simplicity", "--inits", "10000000"], ["--inits"]),
])
def test_overflowing_and_malformed_values(argv, words, ws, capsys):
    assert_refused(argv, capsys, ws, *words)


@pytest.fixture
def no_wandb_login(ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb") or types.ModuleType("wandb"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(ws))
    monkeypatch.setenv("NETRC", str(ws / "no-netrc"))


@pytest.mark.parametrize("argv", [["train", *TINY, "log.wandb=true", "run_dir=r"],
                                  ["sweep", "tiny.yaml", "log.wandb=true", "sweep_dir=s"]], ids=["train", "sweep"])
def test_wandb_without_credentials_is_refused_before_the_run_directory(argv, ws, capsys, no_wandb_login):
    assert_refused(argv, capsys, ws, "log.wandb", "WANDB_API_KEY", "offline")


def test_wandb_credentials_from_the_environment_or_netrc(ws, no_wandb_login, monkeypatch):
    from sparserl import loggers

    assert not loggers.wandb_credentials()
    (ws / "no-netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    os.chmod(ws / "no-netrc", 0o600)
    assert loggers.wandb_credentials()
    (ws / "no-netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert loggers.wandb_credentials()
    offline = config.build({"log.wandb": True, "log.wandb_mode": "offline"}, check_env=False)
    monkeypatch.delenv("WANDB_API_KEY")
    loggers.check_available(offline)  # offline needs no login


# ----------------------------------------------------------------------------------------------
# 7. Wrong input that used to be accepted silently


@pytest.mark.parametrize("argv,words", [
    (["train", *TINY, "seeds=5,6", "num_seeds=4"], ["seeds=5,6", "num_seeds=4"]),
    (["train", *TINY, "buffer_size=4", "batch_size=8"], ["buffer_size=4", "batch_size=8"]),
    (["sweep", "tiny.yaml", "--dry-run", "--device-gflops", "-5"], ["--device-gflops"]),
    (["sweep", "tiny.yaml", "--dry-run", "--device-gflops", "0"], ["--device-gflops"]),
    (["sweep", "tiny.yaml", "--dry-run", "--device-gflops", "nan"], ["--device-gflops"]),
    (["sweep", "tiny.yaml", "--dry-run", "--device-gflops", "inf"], ["--device-gflops"]),
    (["sweep", "tiny.yaml", "--device-gflops", "100"], ["--device-gflops", "--dry-run"]),
    (["report", "runs", "--bootstrap", "10"], ["--bootstrap=10"]),
    (["report", "runs", "--bootstrap", "100000000"], ["--bootstrap=100000000"]),
    (["train", *TINY, "agent=ddpg", "sac.temperature_init=0.5"], ["sac.temperature_init", "agent=ddpg"]),
    (["train", *TINY, "ddpg.noise_std=0.3"], ["ddpg.noise_std", "agent=sac"]),
    (["train", *TINY, "drqv2.std_end=0.05"], ["drqv2.std_end"]),
    (["train", *TINY, "encoder.channels=16"], ["encoder.channels"]),
    (["inspect", "agent=ddpg", "render.size=64"], ["render.size"]),
    (["train", *TINY, "stream.alpha=0.5"], ["stream.alpha", "stream_ac"]),
    (["train", *TINY, "agent=stream_ac", "sac.log_std_min=-5"], ["sac.log_std_min"]),
    (["diagnose", "--simplicity", "critic.width=200000"], ["critic.width", "--widths"]),
    (["train", *TINY, "diag_probe_size=16", "diag_grad_samples=32"], ["diag_grad_samples=32"]),
    (["sweep", "tiny.yaml", "--bench", "b.json"], ["--bench", "--dry-run"]),
    (["ls", "afile"], ["afile", "not a directory"]),
])
def test_wrong_input_is_refused(argv, words, ws, capsys):
    fake_run(ws / "runs" / "good")
    assert_refused(argv, capsys, ws, *words)


@pytest.mark.parametrize("text,words", [
    ("seed: 1\nseed: 2\n", ["duplicate key 'seed'", "at line"]),
    ("critic:\n  width: 8\n  width: 16\n", ["duplicate key 'width'"]),
    ("critic:\n  width: 8\ncritic.width: 16\n", ["twice"]),
], ids=["top", "nested", "nested-and-dotted"])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_duplicate_yaml_keys_are_refused(command, text, words, ws, capsys):
    if command == "sweep":
        indented = "".join(f"  {line}\n" for line in text.splitlines())
        (ws / "p.yaml").write_text("description: dup\nbase:\n" + indented)
    else:
        (ws / "p.yaml").write_text(text)
    assert_refused([command, "p.yaml", *(["run_dir=r"] if command == "train" else [])], capsys, ws, *words)


def test_the_agent_keys_of_a_saved_config_still_load():
    """Defaults of every section are in a saved config.yaml: only values that differ are refused."""
    for agent in ("sac", "ddpg", "stream_ac"):
        saved = config.build({"agent": agent}, check_env=False).to_dict()
        assert config.build(config.flatten(saved), check_env=False).agent == agent


# ----------------------------------------------------------------------------------------------
# Properties: any text or bytes either parse or raise ConfigError, never anything else


KEYS = sorted(config.schema())
YAMLISH = st.text(alphabet=":-[]{}#&*!|>'\"%@`,?= \n\t0123456789abcxyz._<\x00\x85\u2028é", max_size=60)
OVERRIDE = st.one_of(st.text(max_size=30), st.builds("{}={}".format, st.sampled_from(KEYS + ["", " x"]), YAMLISH))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
                   st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.lists(OVERRIDE, max_size=5))
def test_parse_overrides_parses_or_raises_config_error(args):
    try:
        out = config.parse_overrides(args)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1, str(e)
        return
    assert isinstance(out, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode), YAMLISH.map(str.encode)))
def test_load_preset_and_sweep_load_parse_or_raise_config_error(tmp_path, data):
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    try:
        assert isinstance(config.load_preset(path), dict)
    except ConfigError:
        pass
    try:
        assert isinstance(sweep.load(path), dict)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_any_preset_of_known_keys_builds_or_raises_config_error(tmp_path, values):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        cfg = config.from_args(str(path), [], check_env=False)
    except ConfigError:
        return
    assert cfg.seed <= config.MAX_SEED and all(s <= config.MAX_SEED for s in cfg.seed_list)


def test_runs_readers_raise_config_error_on_garbage(tmp_path):
    for kind in GARBAGE:
        d = tmp_path / kind
        make_garbage(fake_run(d), kind)
        with pytest.raises(ConfigError):
            runs.read_config(d), runs.read_summary(d), runs.read_metrics(d)
        assert runs.describe(d, tmp_path)["status"] == "unreadable"
