"""Agents: each module exposes ``METRICS``, ``init(cfg, obs_dim, action_dim)``,
``act(policy_params, obs, key, deterministic, cfg)`` and ``update(state, batches, obs_stats, cfg)`` (K
gradient steps in one ``lax.scan``); ``stream_ac`` (streaming, no batches) has ``step`` and ``begin``
instead of ``update`` (see :mod:`sparserl.stream`). Their states hold ``actor`` and ``critic`` :class:`Module` s
(and ``encoder`` for the pixel agent ``drqv2``, whose ``act`` also takes the agent ``step``)."""

from types import ModuleType

from sparserl import sparsity
from sparserl.agents import common, ddpg, drqv2, sac, stream_ac

AGENTS: dict[str, ModuleType] = {"sac": sac, "ddpg": ddpg, "drqv2": drqv2}  # replay agents: batched ``update``
STREAMING: dict[str, ModuleType] = {"stream_ac": stream_ac}  # one transition per ``step``


def get(name: str) -> ModuleType:
    return AGENTS[name] if name in AGENTS else STREAMING[name]


def modules(state) -> dict:
    """The sparse modules of an agent state, by name: ``{name: Module}``."""
    out = {"encoder": state.encoder} if hasattr(state, "encoder") else {}
    out.update(actor=state.actor, critic=state.critic)
    return out


def policy_params(state):
    """The parameters ``act`` needs: the actor's, or for drqv2 its encoder's and actor's."""
    if hasattr(state, "encoder"):
        return drqv2.policy_params(state)
    return common.bound(state.actor)


def model_stats(state) -> dict:
    """Per module: total and non-zero parameters and per-tensor sparsity (``model.json``)."""
    return {name: sparsity.stats(m.params, m.mask) for name, m in modules(common.dense_state(state)).items()}
