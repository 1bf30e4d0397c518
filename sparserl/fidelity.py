"""Fidelity to the reference code: where sparserl offers a behaviour the reference does not have.

The reference is the paper's released code (matharg7/SparseNetwork4DRL, commit 613a2b9) for SAC and
DDPG, DrQ-v2 (facebookresearch/drqv2) for ``agent=drqv2`` and Stream AC(λ) (Elsayed et al. 2024,
mohmdelsayed/streaming-drl) for ``agent=stream_ac``. :data:`BEHAVIOURS` is the one table of every
config key whose value can differ from that reference: the reference's value, sparserl's default,
what the key means and why sparserl has the other value. :func:`non_reference_options` lists the keys
of a config that are set away from the reference (``sparserl inspect`` prints them); docs/fidelity.md
is the same table for people, with the reference's defects that sparserl does not copy.

A behaviour only counts where it has an effect: ``sparsity.draw`` on a dense model, ``ddpg.*`` for
SAC or ``render.fast`` for state observations are never reported. Keys missing from the config
schema are ignored here (and caught by tests/test_fidelity_protocol.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sparserl.config import Config, format_value

SAC_DDPG = "matharg7/SparseNetwork4DRL@613a2b9"
DRQV2 = "facebookresearch/drqv2"
STREAM = "mohmdelsayed/streaming-drl"


def _sparse(cfg: Config) -> bool:
    return any(getattr(getattr(cfg, m), "sparsity", 0.0) > 0 for m in ("actor", "critic", "encoder"))


def _agents(*names: str) -> Callable[[Config], bool]:
    return lambda cfg: cfg.agent in names


def _always(cfg: Config) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """One config key whose value can differ from the reference's."""

    key: str  # dotted config key
    reference: Any  # the reference's value; {agent: value, "*": other agents} where it depends on the agent
    default: Any  # sparserl's default, in the same form
    meaning: str  # what the key does
    reason: str  # why sparserl offers the non-reference value (or has it as default)
    source: str  # where the reference does it
    applies: Callable[[Config], bool] = _always  # whether the key has an effect on this config
    differs: Callable[[Config], bool] | None = None  # a test replacing `value != reference`

    def reference_for(self, agent: str) -> Any:
        return _for_agent(self.reference, agent)

    def default_for(self, agent: str) -> Any:
        return _for_agent(self.default, agent)


def _for_agent(value: Any, agent: str) -> Any:
    return value.get(agent, value.get("*")) if isinstance(value, dict) else value


def _critic_only(cfg: Config) -> bool:
    return cfg.critic.sparsity > 0 and cfg.actor.sparsity == 0


BEHAVIOURS: tuple[Behaviour, ...] = (
    Behaviour(
        "critic.sparsity", "ignored when actor.sparsity = 0 (the critic stays dense)", 0.0,
        "a sparse critic with a dense actor (critic-only ablation)",
        "the reference decides whether the critic is sparse from the actor's sparsity, so every sparse "
        "result of the paper has both modules sparse; sparserl applies each module's sparsity as given",
        f"{SAC_DDPG} scale_rl/agents/sac/sac_agent.py:145 and ddpg/ddpg_agent.py:142 "
        "(`critic_sparse = cfg.actor_sparsity > 0.0`)",
        applies=_agents("sac", "ddpg"), differs=_critic_only),
    Behaviour(
        "sparsity.draw", "bernoulli", "exact",
        "how a mask is drawn: i.i.d. Bernoulli keeps, or exactly round(density*n) kept weights per tensor",
        "exact makes the realised sparsity equal the allocation in every seed (no count noise between "
        "seeds or between dense/sparse comparisons); bernoulli reproduces the reference",
        f"{SAC_DDPG} scale_rl/agents/sparse.py create_mask (`jax.random.bernoulli`)", applies=_sparse),
    Behaviour(
        "sparsity.budget", "all", "all",
        "what the sparsity budget counts: every parameter (biases, LayerNorm) or kernels only",
        "kernels keeps exactly (1-S) of the kernel weights; all reproduces the paper's per-layer densities",
        f"{SAC_DDPG} scale_rl/agents/sparse.py get_var_shape_dict + get_sparsities_erdos_renyi "
        "(every parameter is in the ERK budget)", applies=_sparse),
    Behaviour(
        "sparsity.method", "erk", "erk",
        "per-layer allocation: Erdős–Rényi-Kernel or uniform",
        "uniform is the alternative allocation of PAPER §2, an ablation",
        f"{SAC_DDPG} scale_rl/agents/sac/sac_agent.py:110,151 (always get_sparsities_erdos_renyi)",
        applies=_sparse),
    Behaviour(
        "weight_decay_on", "all", "all",
        "which parameters AdamW's decoupled weight decay acts on: all, or kernels only",
        "kernels-only decay is the common practice (no decay of biases and LayerNorm scales)",
        f"{SAC_DDPG} scale_rl/agents/sac/sac_agent.py:119,164 (`optax.adamw` with no mask)",
        applies=lambda cfg: cfg.agent in ("sac", "ddpg") and cfg.weight_decay > 0),
    Behaviour(
        "ddpg.policy_noise", 0.1, 0.1,
        "std of the Gaussian noise on the policy's action in the actor loss and the TD target",
        "0 gives textbook DDPG (deterministic policy gradient, noiseless target)",
        f"{SAC_DDPG} scale_rl/agents/ddpg/ddpg_update.py update_actor / update_critic (`noise_std`)",
        applies=_agents("ddpg")),
    Behaviour(
        "update_every", {"drqv2": 2, "*": 1}, {"drqv2": 2, "*": 1},
        "agent steps between two update calls (of utd gradient steps each)",
        "a free knob of the update-to-data ratio",
        f"{DRQV2} cfgs/config.yaml (`update_every_steps: 2`); {SAC_DDPG} run.py (updates every step)",
        applies=_agents("sac", "ddpg", "drqv2")),
    Behaviour(
        "critic.cdq", {"drqv2": True, "*": False}, {"drqv2": True, "*": False},
        "clipped double-Q (two critics, min target)",
        "the option the reference uses on episodic tasks; PAPER §3 asks for it",
        f"{SAC_DDPG} configs/agent/sac_simba.yaml (`critic_use_cdq: ${{env.episodic}}`) with "
        f"configs/env/dmc_hard.yaml (`episodic: false`); {DRQV2} drqv2.py Critic (Q1, Q2, min)",
        applies=lambda cfg: cfg.agent in ("sac", "ddpg", "drqv2") and not cfg.env.startswith("gym:")),
    Behaviour(
        "obs_norm", {"drqv2": False, "*": True}, {"drqv2": False, "*": True},
        "normalise observations by running mean/std",
        "off for DDPG on cartpole at small scale, where it oscillates (docs/agents.md)",
        f"{SAC_DDPG} configs/agent/sac_simba.yaml (`normalize_observation: true`); {STREAM} "
        "NormalizeObservation wrapper"),
    Behaviour(
        "diag_probe", "fresh", "fresh",
        "the batch diagnostics are measured on: a fresh replay sample each time, or one fixed probe set",
        "a fixed probe set makes diagnostics comparable over training and across runs; fresh reproduces "
        "the reference's curves",
        f"{SAC_DDPG} run.py:144-146 (`buffer.sample()` every 5,000 interaction steps)",
        applies=lambda cfg: cfg.agent in ("sac", "ddpg", "drqv2") and cfg.diag_every > 0),
    Behaviour(
        "render.fast", False, False,
        "render pixel observations without shadows and reflections",
        "about 8x faster rendering on a CPU; frames differ slightly (docs/visual.md)",
        f"{DRQV2} dmc.py (MuJoCo's default rendering)", applies=lambda cfg: cfg.pixels),
    Behaviour(
        "init", {"stream_ac": "sparse_init", "*": "dense"}, "dense",
        "stream_ac weight init: dense, or 90% of each unit's fan-in zeroed at init (then trainable)",
        "the streaming experiment compares dense, the sparse init and a static mask; dense is the "
        "plain baseline (the bundled stream_ac preset, the reference method, sets sparse_init)",
        f"{STREAM} stream_ac_continuous.py initialize_weights (`sparse_init(m.weight, sparsity=0.9)`)",
        applies=_agents("stream_ac")),
    Behaviour(
        "stream.adaptive", False, False,
        "adaptive ObGD (trace scaled by a running RMS of δe)",
        "the variant of Elsayed et al. 2024; the paper's streaming runs use ObGD",
        f"{STREAM} optim.py (ObGD used by stream_ac_continuous.py)", applies=_agents("stream_ac")),
    Behaviour(
        "stream.reward_scale", True, True,
        "divide rewards by the running std of the discounted return",
        "off for tasks whose rewards are already well scaled",
        f"{STREAM} normalization_wrappers.py ScaleReward", applies=_agents("stream_ac")),
)


_MISSING = object()


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _differs(b: Behaviour, cfg: Config) -> bool:
    value = _value(cfg, b.key)
    if value is _MISSING or not b.applies(cfg):
        return False
    if b.differs is not None:
        return b.differs(cfg)
    return value != b.reference_for(cfg.agent)


def non_reference_options(cfg: Config) -> list[str]:
    """Keys of ``cfg`` set away from the reference's value, where they have an effect (table order)."""
    return [b.key for b in BEHAVIOURS if _differs(b, cfg)]


def describe(cfg: Config) -> list[str]:
    """One short line per non-reference option, e.g. ``sparsity.draw=exact (reference: bernoulli)``."""
    out = []
    for b in BEHAVIOURS:
        if not _differs(b, cfg):
            continue
        if b.key == "critic.sparsity":
            out.append(f"critic.sparsity={cfg.critic.sparsity:g} with actor.sparsity=0 "
                       f"(critic-only; the reference keeps the critic dense then)")
        else:
            out.append(f"{b.key}={format_value(_value(cfg, b.key))} (reference: {format_value(b.reference_for(cfg.agent))})")
    return out


def keys() -> list[str]:
    """Every config key named in :data:`BEHAVIOURS`."""
    return [b.key for b in BEHAVIOURS]
