"""Agents: each module exposes ``METRICS``, ``init(cfg, obs_dim, action_dim)``,
``act(actor_params, obs, key, deterministic, cfg)`` and ``update(state, batches, obs_stats, cfg)`` (K
gradient steps in one ``lax.scan``). Their states hold ``actor`` and ``critic`` :class:`Module` s."""

from types import ModuleType

from sparserl.agents import ddpg, sac

AGENTS: dict[str, ModuleType] = {"sac": sac, "ddpg": ddpg}


def get(name: str) -> ModuleType:
    return AGENTS[name]


def modules(state) -> dict:
    """The sparse modules of an agent state, by name: ``{name: Module}``."""
    return {"actor": state.actor, "critic": state.critic}
