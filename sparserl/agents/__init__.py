"""Agents: each module exposes ``METRICS``, ``init(cfg, obs_dim, action_dim)``,
``act(actor_params, obs, key, deterministic, cfg)`` and ``update(state, batches, obs_stats, cfg)`` (K
gradient steps in one ``lax.scan``); ``stream_ac`` (streaming, no batches) has ``step`` and ``begin``
instead of ``update`` (see :mod:`sparserl.stream`). Their states hold ``actor`` and ``critic`` :class:`Module` s."""

from types import ModuleType

from sparserl.agents import ddpg, sac, stream_ac

AGENTS: dict[str, ModuleType] = {"sac": sac, "ddpg": ddpg}  # replay agents: batched ``update``
STREAMING: dict[str, ModuleType] = {"stream_ac": stream_ac}  # one transition per ``step``


def get(name: str) -> ModuleType:
    return AGENTS[name] if name in AGENTS else STREAMING[name]


def modules(state) -> dict:
    """The sparse modules of an agent state, by name: ``{name: Module}``."""
    return {"actor": state.actor, "critic": state.critic}
