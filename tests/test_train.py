"""End-to-end: the train loop writes a well-formed run directory, and SAC/DDPG actually learn."""

import csv
import json
import time

import jax.monitoring
import numpy as np
import pytest
import yaml

from sparserl import config, envs, rundir, train

TINY = {"env": "cartpole-balance", "env_steps": 2000, "warmup_steps": 300, "eval_every": 1000,
        "eval_episodes": 1, "final_eval_episodes": 2, "batch_size": 32, "actor.width": 16,
        "critic.width": 16, "critic.blocks": 1, "progress": False}


def read_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_run_directory_contents(tmp_path):
    cfg = config.build({**TINY, "critic.sparsity": 0.5, "run_dir": str(tmp_path / "run")})
    summary = train.train(cfg)
    run_dir = tmp_path / "run"

    # config.yaml is the fully resolved config: loading it back gives the same Config
    saved = config.build(config.flatten(yaml.safe_load((run_dir / "config.yaml").read_text())))
    assert saved == cfg

    rows = read_rows(run_dir)
    # a row at env step 0 (the untrained policy, as the reference evaluates it), then every eval_every
    assert [int(r["env_step"]) for r in rows] == [0, 1000, 2000]
    assert [int(r["eval_episodes"]) for r in rows] == [1, 1, 2]  # the last row is the final evaluation
    assert list(rows[0]) == list(rundir.metric_columns(cfg))
    assert rows[0]["critic_loss"] == "" and rows[0]["agent_step"] == "0"
    # learning starts after 300 agent steps, so both later rows carry update metrics
    for r in rows[1:]:
        assert float(r["critic_loss"]) >= 0 and np.isfinite(float(r["critic_loss"]))
        assert 0 < float(r["temperature"])
        assert float(r["steps_per_s"]) > 0
    # a DMC episode is 1000 env steps = 500 agent steps with action repeat 2
    assert int(rows[-1]["episodes"]) == 2000 // 1000
    assert summary["final_return"] == pytest.approx(float(rows[-1]["eval_return"]))
    assert summary["final_eval_episodes"] == 2

    model = json.loads((run_dir / "model.json").read_text())
    assert model["critic"]["sparsity"] > 0.4 and model["actor"]["sparsity"] == 0.0
    saved_summary = json.loads((run_dir / "summary.json").read_text())
    assert saved_summary["params"]["critic"]["nonzero_params"] == model["critic"]["nonzero_params"]
    assert set(saved_summary["time_share"]) >= {"env", "act", "update", "eval"}


def test_everything_compiles_before_the_first_step(tmp_path):
    """The update and the policies compile ahead of the loop (its own time share): once the loop
    runs, XLA compiles neither again, so steps/s and the ETA measure training. JAX's compile log
    names each compiled function; only small helpers (the parameter norms) may compile later."""
    import logging

    import jax

    loop_started, compiled_in_loop = [], []
    original_compile = train.SeedGroup.compile

    def compile_then_mark(self, *args):
        original_compile(self, *args)
        loop_started.append(True)

    class CompileLog(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if loop_started and message.startswith("Compiling "):
                compiled_in_loop.append(message.split(" with ")[0])

    handler = CompileLog()
    logging.getLogger("jax").addHandler(handler)
    train.SeedGroup.compile = compile_then_mark
    try:
        with jax.log_compiles(True):
            # a network shape no other test uses, so nothing comes from an earlier test's cache
            summary = train.train(config.build({**TINY, "critic.width": 24, "env_steps": 1000, "eval_every": 1000,
                                                "run_dir": str(tmp_path / "run")}))
    finally:
        train.SeedGroup.compile = original_compile
        logging.getLogger("jax").removeHandler(handler)
    assert loop_started and summary["time_share"]["compile"] > 0
    assert not [name for name in compiled_in_loop if "_learn" in name or "_policy" in name], compiled_in_loop


def test_no_update_metrics_during_warmup(tmp_path):
    cfg = config.build({**TINY, "env_steps": 1000, "warmup_steps": 10_000, "run_dir": str(tmp_path / "r")})
    train.train(cfg)
    step0, row = read_rows(tmp_path / "r")  # the step-0 row and the final one
    assert int(step0["env_step"]) == 0 and int(row["env_step"]) == 1000
    assert row["critic_loss"] == "" and row["eval_return"] != ""


def random_policy_return(env_name: str, episodes: int) -> float:
    env = envs.make(env_name, 12345, 2)
    rng = np.random.default_rng(0)
    return float(train.evaluate(env, lambda obs: rng.uniform(-1, 1, env.action_dim), episodes).mean())


# Budget (2 CPU cores): SAC 40k env steps, DDPG 30k (one update per agent step, 64-wide networks),
# 30-100 s each depending on the machine's load (marked slow). Measured finals: SAC 914 / 955 / 935 (seeds 0-2), DDPG 966 / 960 / 956; SAC at 30k
# steps was still seed-dependent (505-998). A uniform random policy scores ~280-370 and doing nothing
# ~750, so we ask for more than both. DDPG runs without observation normalisation: with it, DDPG on
# cartpole-balance oscillated between seeds (final 510, 593, 423 for seeds 0-2; 293, 273, 279 with the
# reference's policy noise in the losses, issue 14); SAC is unaffected.
LEARN = {"env": "cartpole-balance", "env_steps": 30_000, "warmup_steps": 1000, "lr": 3e-4, "batch_size": 128,
         "utd": 1, "eval_every": 10_000, "eval_episodes": 2, "final_eval_episodes": 5, "actor.width": 64,
         "critic.width": 64, "critic.blocks": 1, "progress": False}


@pytest.mark.slow  # 1.5 minutes each on a loaded 2-core machine; run with -m slow
@pytest.mark.parametrize("agent,extra", [("sac", {"env_steps": 40_000}), ("ddpg", {"obs_norm": False})])
def test_agent_learns_cartpole_balance(tmp_path, agent, extra):
    cfg = config.build({**LEARN, **extra, "agent": agent, "run_dir": str(tmp_path / agent)})
    summary = train.train(cfg)
    random_return = random_policy_return("cartpole-balance", 5)
    assert summary["final_return"] > max(750.0, random_return + 400.0), (summary["final_return"], random_return)
