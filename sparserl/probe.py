"""Diagnostics of an agent state on a probe set of transitions (PAPER.md §5).

:func:`measure` is one jitted computation per agent state: for the actor and the critic, the
stable rank of the features before the final LayerNorm and after it, two dormant-unit ratios —
sparserl's (``*_dormant_post_act_tau{0,0.1,0.2}``: ReDo's definition on the ReLU outputs) and the
paper's code's (``*_dormant_ref_tau{0.1,0.2}``: its formula on the outputs of every Dense layer
but the heads, before any activation or LayerNorm, see :func:`reference_dormant_layers`) — the mean
feature norm before the final LayerNorm (after it, it is always about sqrt(H)), parameter norms,
and the cosine matrix of per-sample gradients (over kept weights only) of the critic's TD loss and
of the actor's loss on ``grad_samples`` examples. It reads the state and never changes it, and
draws no randomness from the training streams.

The probe set (:func:`draw_probe_set`, ``diag_probe``): ``fresh`` (default, as the reference) draws
``diag_probe_size`` stored transitions anew at every diagnostic from a stream derived from
``(seed, env_step)``, so a resumed run draws the same; ``fixed`` draws once, at the first
diagnostic, and reuses that set (it is kept in the checkpoints).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import agents, diagnostics, envs, networks, topology
from sparserl.agents import common
from sparserl.agents.common import Batch, ObsStats
from sparserl.config import Config

TAUS = (0.0, 0.1, 0.2)  # sparserl's dormant ratio (post-activation; PAPER.md: tau 0.1, also 0 and 0.2)
REF_TAUS = (0.1, 0.2)  # the paper's code's dormant ratio (its sac_update.py / ddpg_update.py log DR0.1, DR0.2)


def reference_dormant_layers(enc_params, x, capture: dict) -> list:
    """The layers of the paper's code's dormant ratio: the output of every Dense layer of the encoder
    (its ``get_dormant_ratio`` keeps flax intermediates named ``Dense`` and drops the ``predictor``
    heads), before any activation or LayerNorm. SimBa: the embedding (H units), then per block its
    hidden (4H) and output (H) layers (the output before the residual add); MLP: every layer.

    ``capture``: what :func:`sparserl.networks.encoder` stored for ``x``; the embedding and block
    outputs, which it does not capture, are recomputed from ``x`` and the captured ReLU outputs."""
    if "final_norm" not in enc_params:  # MLP: every Dense feeds a ReLU
        return [v for k, v in capture.items() if k.startswith("pre_act/")]
    layers = [networks.dense(enc_params["embed"], x)]
    i = 0
    while f"block{i}" in enc_params:
        block = enc_params[f"block{i}"]
        layers += [capture[f"pre_act/block{i}"], networks.dense(block["out"], capture[f"post_act/block{i}"])]
        i += 1
    return layers


def _feature_metrics(prefix: str, enc_params, x) -> dict:
    capture: dict = {}
    post_ln = networks.encoder(enc_params, x, capture)
    pre_ln = capture["features_pre_norm"]
    post_acts = [v for k, v in capture.items() if k.startswith("post_act/")]
    ref_layers = reference_dormant_layers(enc_params, x, capture)
    out = {f"{prefix}_srank_pre_ln": diagnostics.srank_jax(pre_ln),
           f"{prefix}_srank_post_ln": diagnostics.srank_jax(post_ln),
           f"{prefix}_feature_norm_pre_ln": jnp.linalg.norm(pre_ln, axis=-1).mean()}
    for tau in TAUS:
        out[f"{prefix}_dormant_post_act_tau{tau:g}"] = diagnostics.dormant_ratio_jax(post_acts, tau)
    for tau in REF_TAUS:
        out[f"{prefix}_dormant_ref_tau{tau:g}"] = diagnostics.dormant_ratio_reference_jax(ref_layers, tau)
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
    scalars.update(topology.diagnostics(state))  # dynamic modules: replaced and ever-active fractions

    small = jax.tree_util.tree_map(lambda x: x[:grad_samples], batch)
    actor_fn, critic_fn, examples = agent.diagnostic_losses(state, small, stats, key, cfg)
    cosines = {name: diagnostics.gradient_cosine(diagnostics.per_sample_grads(fn, module.params, examples,
                                                                              module.mask))
               for name, fn, module in (("actor", actor_fn, state.actor), ("critic", critic_fn, state.critic))}
    return scalars, cosines


def probe_rng(seed: int, env_step: int | None = None) -> np.random.Generator:
    """The diagnostics' own RNG stream (never a training stream, so diagnostics never change what
    training samples): ``env_step=None``, the one draw of a ``fixed`` probe set; otherwise the
    ``fresh`` draw at that env step, a function of ``(seed, env_step)`` alone (no state to checkpoint)."""
    if env_step is None:
        return np.random.default_rng(envs.derive_seed(seed, 4))
    return np.random.default_rng(np.random.SeedSequence([seed, 4, 1, int(env_step)]))


def draw_probe_set(transitions, size: int, seed: int, env_step: int | None = None) -> Batch:
    """A probe set: ``size`` distinct stored transitions, uniformly from all of them (a :class:`Batch`
    of them or a replay buffer), drawn from :func:`probe_rng` ``(seed, env_step)``: ``env_step=None``
    for the ``fixed`` set, the diagnostic's env step for a ``fresh`` one. The same stored transitions
    and arguments always give the same set."""
    rng = probe_rng(seed, env_step)
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
