"""Shared fixtures: small configs, and the default humanoid-size parameter pytrees (built once)."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; must be set before dm_control is imported

import jax
import pytest

from sparserl import config, networks

# Humanoid (DMC humanoid-run) sizes used throughout PAPER.md.
HUMANOID_OBS, HUMANOID_ACT = 67, 21


def small_config(**overrides):
    """A tiny, fully validated config (no env check): widths 16, one block, batch 8."""
    values = {"actor.width": 16, "actor.blocks": 1, "critic.width": 16, "critic.blocks": 1,
              "batch_size": 8}
    values.update(overrides)
    return config.build(values, check_env=False)


@pytest.fixture(scope="session")
def make_config():
    """Factory fixture: ``make_config(**{'critic.sparsity': 0.5})`` -> a small Config."""
    return small_config


@pytest.fixture(scope="session")
def humanoid_critic():
    """Default humanoid critic (88 inputs, width 512, 2 SimBa blocks, one Q)."""
    return networks.init_critic(jax.random.PRNGKey(0), HUMANOID_OBS, HUMANOID_ACT, 512, 2, "simba")


@pytest.fixture(scope="session")
def humanoid_actor():
    """Default humanoid SAC actor (67 inputs, width 128, 1 block, two 128x21 heads)."""
    from sparserl.agents import sac

    cfg = config.build({"actor.width": 128, "actor.blocks": 1}, check_env=False)
    return sac.init_actor_params(jax.random.PRNGKey(0), HUMANOID_OBS, HUMANOID_ACT, cfg)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory, so anything written by mistake (e.g. runs/) is seen."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d
