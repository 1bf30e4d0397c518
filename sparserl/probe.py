"""Diagnostics of an agent state on a fixed probe set of transitions (PAPER.md §5).

:func:`measure` is one jitted computation per agent state: for the actor and the critic, the
stable rank of the features before the final LayerNorm and after it, the dormant-unit ratio
(tau 0 and 0.1) on post-activation and on pre-activation outputs, the mean feature norm before the
final LayerNorm (after it, it is always about sqrt(H)), parameter norms, and the cosine matrix of
per-sample gradients of the critic's TD loss and of the actor's loss on ``grad_samples`` examples.
It reads the state and never changes it, and draws no randomness from the training streams.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import agents, diagnostics, envs, networks
from sparserl.agents import common
from sparserl.agents.common import Batch, ObsStats
from sparserl.config import Config

TAUS = (0.0, 0.1)


def _feature_metrics(prefix: str, enc_params, x) -> dict:
    capture: dict = {}
    post_ln = networks.encoder(enc_params, x, capture)
    pre_ln = capture["features_pre_norm"]
    post_acts = [v for k, v in capture.items() if k.startswith("post_act/")]
    pre_acts = [v for k, v in capture.items() if k.startswith("pre_act/")]
    out = {f"{prefix}_srank_pre_ln": diagnostics.srank_jax(pre_ln),
           f"{prefix}_srank_post_ln": diagnostics.srank_jax(post_ln),
           f"{prefix}_feature_norm_pre_ln": jnp.linalg.norm(pre_ln, axis=-1).mean()}
    for tau in TAUS:
        out[f"{prefix}_dormant_post_act_tau{tau:g}"] = diagnostics.dormant_ratio_jax(post_acts, tau)
        out[f"{prefix}_dormant_pre_act_tau{tau:g}"] = diagnostics.dormant_ratio_jax(pre_acts, tau)
    return out


@partial(jax.jit, static_argnames=("cfg", "grad_samples"))
def _measure(state, batch: Batch, stats: ObsStats, key, cfg: Config, grad_samples: int):
    agent = agents.get(cfg.agent)
    scalars = {}
    if hasattr(agent, "diagnostic_features"):  # pixels: features after the conv encoder and trunks
        inputs = agent.diagnostic_features(state, batch)
        capture, trunk_out = inputs.pop("encoder")
        post = [v for k, v in capture.items() if k.startswith("post_act/")]  # a unit is a channel
        pre = [v for k, v in capture.items() if k.startswith("pre_act/")]
        scalars["encoder_srank_trunk"] = diagnostics.srank_jax(trunk_out)
        for tau in TAUS:
            scalars[f"encoder_dormant_post_act_tau{tau:g}"] = diagnostics.dormant_ratio_jax(post, tau)
            scalars[f"encoder_dormant_pre_act_tau{tau:g}"] = diagnostics.dormant_ratio_jax(pre, tau)
    else:
        obs = common.normalize(batch.obs, stats)
        inputs = {"actor": (state.actor.params["encoder"], obs),
                  "critic": (state.critic.params["q0"]["encoder"], jnp.concatenate([obs, batch.action], -1))}
    for prefix, (enc_params, x) in inputs.items():
        scalars.update(_feature_metrics(prefix, enc_params, x))
    for name, module in agents.modules(state).items():
        scalars[f"{name}_param_norm"] = common.global_norm(module.params)

    small = jax.tree_util.tree_map(lambda x: x[:grad_samples], batch)
    actor_fn, critic_fn, examples = agent.diagnostic_losses(state, small, stats, key, cfg)
    cosines = {name: diagnostics.gradient_cosine(diagnostics.per_sample_grads(fn, params, examples))
               for name, fn, params in (("actor", actor_fn, state.actor.params),
                                        ("critic", critic_fn, state.critic.params))}
    return scalars, cosines


def draw_probe_set(transitions, size: int, seed: int) -> Batch:
    """The fixed probe set: ``size`` distinct stored transitions (from a :class:`Batch` of them or a
    replay buffer), drawn from the diagnostics' own RNG stream so that diagnostics never change what
    training samples."""
    rng = np.random.default_rng(envs.derive_seed(seed, 4))
    if isinstance(transitions, Batch):
        n = transitions.obs.shape[0]
        idx = rng.choice(n, size=min(size, n), replace=False)
        return Batch(*(np.asarray(x)[idx] for x in transitions))
    if hasattr(transitions, "valid_starts"):  # frame replay: transitions are named by their first frame
        starts = transitions.valid_starts()
        return transitions.gather(starts[rng.choice(len(starts), size=min(size, len(starts)), replace=False)])
    n = transitions.size
    return transitions.gather(rng.choice(n, size=min(size, n), replace=False))


def measure(state, batch: Batch, stats: ObsStats, key, cfg: Config,
            grad_samples: int = 32) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Scalars by name and the gradient-cosine matrices ``{"actor": NxN, "critic": NxN}``."""
    scalars, cosines = jax.device_get(_measure(state, batch, stats, key, cfg, grad_samples))
    out = {k: float(v) for k, v in scalars.items()}
    for name, cos in cosines.items():
        summary = diagnostics.interference_summary(cos)
        out[f"{name}_grad_cos_mean_abs"] = summary["mean_abs_offdiag"]
        out[f"{name}_grad_cos_frac_negative"] = summary["frac_negative"]
    return out, {k: np.asarray(v) for k, v in cosines.items()}
