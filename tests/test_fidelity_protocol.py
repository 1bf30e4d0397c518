"""Fidelity to the paper's protocol: sparse presets sparsify actor and critic together (as the paper's
code must), the critic-only ablation keeps the actor dense, tied sweep axes, and the table of
non-reference options (sparserl/fidelity.py) with what `sparserl inspect` prints from it."""

import functools
import json
import re
from pathlib import Path

import pytest
import yaml

from sparserl import cli, config, fidelity, inspection, sweep
from sparserl.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = {"sparsity_sweep_critic_only"}  # presets that sparsify the critic alone on purpose
TIED = ("scaling_sac", "scaling_ddpg", "width_scaling", "depth_scaling", "sparsity_sweep", "equal_nonzero",
        "diagnostics", "reset_probe", "visual", "streaming", "static_vs_dynamic", "demo")


@functools.lru_cache(maxsize=None)
def _expand(preset: str, scale: str) -> sweep.Sweep:
    return sweep.expand(sweep.resolve_preset(preset), scale)


def _sparsities(preset: str, scale: str) -> list[tuple[float, float]]:
    s = _expand(preset, scale)
    out = []
    for pt in s.points:
        cfg = pt.config(pt.seeds[0], Path("."))
        out.append((cfg.actor.sparsity, cfg.critic.sparsity))
    return out


# ----------------------------------------------------------------------------------------------
# Presets


def test_every_bundled_preset_is_checked_here():
    bundled = {p.stem for p in sweep.bundled_presets()}
    assert bundled == set(TIED) | ABLATIONS


@pytest.mark.parametrize("scale", sweep.SCALES)
@pytest.mark.parametrize("preset", TIED)
def test_sparse_points_have_actor_as_sparse_as_critic(preset, scale):
    pairs = _sparsities(preset, scale)
    sparse = [(a, c) for a, c in pairs if a > 0 or c > 0]
    assert all(a == c for a, c in sparse), sorted(set(sparse))
    if scale == "full":  # every full grid compares dense with sparse
        assert sparse and any(c == 0 for _, c in pairs)


def test_sparsity_sweep_ties_actor_and_critic_at_every_level():
    levels = [round(0.1 * i, 1) for i in range(10)]
    s = _expand("sparsity_sweep", "full")
    assert len(s.points) == 40 and s.num_runs == 200
    assert "actor.sparsity+critic.sparsity" in s.axes
    pairs = _sparsities("sparsity_sweep", "full")
    assert sorted(set(pairs)) == [(x, x) for x in levels]
    assert sorted(set(_sparsities("sparsity_sweep", "small"))) == [(0.0, 0.0), (0.5, 0.5), (0.8, 0.8), (0.9, 0.9)]
    assert sorted(set(_sparsities("sparsity_sweep", "smoke"))) == [(0.0, 0.0), (0.9, 0.9)]
    names = {pt.name for pt in s.points}
    assert "env=dog-run,model=109M,actor.sparsity+critic.sparsity=0.9" in names


@pytest.mark.parametrize("scale", sweep.SCALES)
def test_critic_only_ablation_keeps_the_actor_dense(scale):
    pairs = _sparsities("sparsity_sweep_critic_only", scale)
    assert all(a == 0.0 for a, _ in pairs)
    assert any(c > 0 for _, c in pairs) and any(c == 0 for _, c in pairs)
    s = _expand("sparsity_sweep_critic_only", scale)
    flagged = [pt for pt in s.points if "critic.sparsity" in fidelity.non_reference_options(pt.config(0, Path(".")))]
    assert len(flagged) == sum(c > 0 for _, c in pairs)


def test_full_ablation_has_the_same_grid_as_the_sweep():
    tied = _expand("sparsity_sweep", "full")
    ablation = _expand("sparsity_sweep_critic_only", "full")
    assert ablation.num_runs == tied.num_runs == 200
    assert sorted({c for _, c in _sparsities("sparsity_sweep_critic_only", "full")}) == \
        sorted({c for _, c in _sparsities("sparsity_sweep", "full")})


@pytest.mark.parametrize("preset", sorted(config.PRESET_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_single_run_presets_sparsify_actor_with_critic(preset):
    cfg = config.from_args(str(preset), [])
    if cfg.critic.sparsity > 0:
        assert cfg.actor.sparsity == cfg.critic.sparsity
        assert "critic.sparsity" not in fidelity.non_reference_options(cfg)


def test_equal_nonzero_small_points_match_in_non_zeros():
    from sparserl import inspection

    s = _expand("equal_nonzero", "small")
    counts = {pt.labels["model"]: inspection.abstract_cost(pt.config(0, Path(".")))["nonzero_params"]
              for pt in s.points}
    assert counts == {"sparse-2.1M": 213_972, "dense-214k": 214_000}


# ----------------------------------------------------------------------------------------------
# Tied axes


def _write(tmp_path, grid):
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"description": "t", "base": {"env": "cartpole-balance", "env_steps": 100,
                                                                "actor.width": 4, "critic.width": 4},
                                 "grid": grid}))
    return p


def test_tied_axis_sets_every_named_key(tmp_path):
    p = _write(tmp_path, {"actor.sparsity+critic.sparsity": [0.0, 0.5], "critic.width": [4, 8]})
    s = sweep.expand(p, "full")
    assert [(pt.values["actor.sparsity"], pt.values["critic.sparsity"]) for pt in s.points] == \
        [(0.0, 0.0), (0.0, 0.0), (0.5, 0.5), (0.5, 0.5)]
    assert s.points[2].name == "actor.sparsity+critic.sparsity=0.5,critic.width=4"
    assert s.points[2].labels == {"actor.sparsity+critic.sparsity": "0.5", "critic.width": "4"}


def test_tied_axis_is_replaced_from_the_command_line(tmp_path):
    p = _write(tmp_path, {"actor.sparsity+critic.sparsity": [0.0, 0.5]})
    s = sweep.expand(p, "full", {"actor.sparsity+critic.sparsity": "[0.3, 0.95]"})
    assert [(pt.config(0, tmp_path).actor.sparsity, pt.config(0, tmp_path).critic.sparsity) for pt in s.points] == \
        [(0.3, 0.3), (0.95, 0.95)]


@pytest.mark.parametrize("grid, overrides, match", [
    ({"actor.sparsity+critic.sparsty": [0.5]}, {}, "'critic.sparsty' is not a config key"),
    ({"actor.sparsity+critic.sparsity": [0.5]}, {"critic.sparsity": "0.9"}, "set together with actor.sparsity"),
    ({"actor.sparsity+critic.sparsity": [1.5]}, {}, "must be in"),
])
def test_tied_axis_mistakes_are_one_line_errors(tmp_path, grid, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        sweep.expand(_write(tmp_path, grid), "full", overrides)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# The table of non-reference options


def test_every_key_of_the_fidelity_table_is_a_config_key():
    keys = set(config.schema())
    assert [k for k in fidelity.keys() if k not in keys] == []
    assert len(set(fidelity.keys())) == len(fidelity.keys())


DEFAULTS = {  # agent -> (a config of its defaults, the non-reference options they have on purpose)
    "sac": ({}, []),  # every default of the replay agents is the reference's
    "ddpg": ({"agent": "ddpg"}, []),
    "drqv2": ({"agent": "drqv2", "env": "cartpole-balance"}, []),
    "stream_ac": ({"agent": "stream_ac", "env": "gym:Hopper-v5", "action_repeat": 1}, ["init"]),
}


@pytest.mark.parametrize("agent", DEFAULTS)
def test_default_config_differs_only_where_documented(agent):
    values, expected = DEFAULTS[agent]
    schema = config.schema()  # a key not in the schema yet fails test_every_key_of_the_fidelity_table_...
    expected = [k for k in expected if k in schema]
    cfg = config.build(values)
    assert fidelity.non_reference_options(cfg) == expected
    assert fidelity.non_reference_options(config.build({**values, "diag_every": 0})) == \
        [k for k in expected if k != "diag_probe"]
    # The table's `default` column is the config's real default for this agent.
    for b in fidelity.BEHAVIOURS:
        if b.differs is None and b.key in schema:
            assert fidelity._value(cfg, b.key) == b.default_for(agent), b.key


def test_dense_defaults_are_reference_and_sparse_ones_name_the_draw():
    dense = config.build({"diag_every": 0})
    assert fidelity.non_reference_options(dense) == [] and fidelity.describe(dense) == []
    sparse = config.build({"diag_every": 0, "actor.sparsity": 0.9, "critic.sparsity": 0.9})
    assert fidelity.non_reference_options(sparse) == ["sparsity.draw"]
    assert fidelity.describe(sparse) == ["sparsity.draw=exact (reference: bernoulli)"]
    assert fidelity.non_reference_options(config.build({"diag_every": 0, "actor.sparsity": 0.9,
                                                        "critic.sparsity": 0.9, "sparsity.draw": "bernoulli"})) == []


SPARSE = {"diag_every": 0, "actor.sparsity": 0.8, "critic.sparsity": 0.8, "sparsity.draw": "bernoulli"}


@pytest.mark.parametrize("values, key", [
    ({"critic.sparsity": 0.9, "sparsity.draw": "bernoulli"}, "critic.sparsity"),
    ({**SPARSE, "sparsity.draw": "exact"}, "sparsity.draw"),
    ({**SPARSE, "sparsity.budget": "kernels"}, "sparsity.budget"),
    ({**SPARSE, "sparsity.method": "uniform"}, "sparsity.method"),
    ({"weight_decay_on": "kernels"}, "weight_decay_on"),
    ({"agent": "ddpg", "ddpg.policy_noise": 0.0}, "ddpg.policy_noise"),
    ({"update_every": 2}, "update_every"),
    ({"agent": "drqv2", "env": "cartpole-balance", "update_every": 1}, "update_every"),
    ({"critic.cdq": True}, "critic.cdq"),
    ({"agent": "drqv2", "env": "cartpole-balance", "critic.cdq": False}, "critic.cdq"),
    ({"obs_norm": False}, "obs_norm"),
    ({"diag_every": 1000, "diag_probe": "fixed"}, "diag_probe"),
    ({"agent": "drqv2", "env": "cartpole-balance", "render.fast": True}, "render.fast"),
    ({"agent": "stream_ac", "env": "gym:Hopper-v5", "action_repeat": 1, "stream.adaptive": True}, "stream.adaptive"),
    ({"agent": "stream_ac", "env": "gym:Hopper-v5", "action_repeat": 1, "stream.reward_scale": False},
     "stream.reward_scale"),
])
def test_a_non_reference_value_is_named(values, key):
    cfg = config.build({"diag_every": 0, **values})
    assert key in fidelity.non_reference_options(cfg)
    line = next(d for d in fidelity.describe(cfg) if d.startswith(key + "="))
    assert "reference" in line


@pytest.mark.parametrize("values", [
    {"actor.sparsity": 0.9, "critic.sparsity": 0.9},      # both sparse: what the paper ran
    {"actor.sparsity": 0.9, "critic.sparsity": 0.5},      # different levels: the reference allows it
    {"actor.sparsity": 0.9},                              # sparse actor, dense critic: allowed too
    {"sparsity.budget": "kernels", "sparsity.method": "uniform", "sparsity.draw": "exact"},  # no effect: dense
    {"agent": "ddpg", "ddpg.policy_noise": 0.1, "update_every": 1},
    {"weight_decay": 0.0, "weight_decay_on": "kernels"},  # no decay: nothing to decay differently
])
def test_reference_behaviour_is_not_named(values):
    cfg = config.build({"diag_every": 0, "sparsity.draw": "bernoulli", **values})
    names = fidelity.non_reference_options(cfg)
    assert not set(names) & {"critic.sparsity", "sparsity.budget", "sparsity.method", "ddpg.policy_noise",
                             "update_every", "weight_decay_on"}, names


def test_fidelity_doc_names_every_key():
    doc = (ROOT / "docs" / "fidelity.md").read_text()
    for key in fidelity.keys():  # as `key` or `key=value`
        assert re.search(rf"`{re.escape(key)}[`=]", doc), key
    readme = (ROOT / "README.md").read_text()
    assert "docs/fidelity.md" in readme


# ----------------------------------------------------------------------------------------------
# sparserl inspect


TINY = ["--no-flops", "env=cartpole-balance", "actor.width=8", "critic.width=8", "critic.blocks=1", "diag_every=0"]


def test_inspect_prints_the_non_reference_options(capsys):
    assert cli.main(["inspect", "--json", *TINY, "critic.sparsity=0.5", "weight_decay_on=kernels"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["non_reference_options"] == ["critic.sparsity", "sparsity.draw", "weight_decay_on"]
    assert report["non_reference_details"][1:] == ["sparsity.draw=exact (reference: bernoulli)",
                                                   "weight_decay_on=kernels (reference: all)"]
    # The table `sparserl inspect` prints ends with the same, on one line.
    line = inspection.format_table(report).splitlines()[-1]
    assert line.startswith("non-reference options: critic.sparsity=0.5 with actor.sparsity=0")
    assert "sparsity.draw=exact (reference: bernoulli); weight_decay_on=kernels (reference: all)" in line
    reference = {"agent": "sac", "env": "cartpole-balance", "obs_dim": 5, "action_dim": 1, "total_params": 0,
                 "nonzero_params": 0, "non_reference_options": [], "non_reference_details": []}
    assert inspection.format_table(reference).splitlines()[-1] == "non-reference options: none"


def test_docs_mention_the_tied_axis_and_the_ablation():
    doc = (ROOT / "docs" / "experiments.md").read_text()
    assert "actor.sparsity+critic.sparsity" in doc and "sparsity_sweep_critic_only" in doc
    assert re.search(r"docs/fidelity\.md|fidelity\.md", doc)
