"""The device side of a training run: the agent states of all seeds, their policy and update.

:class:`SeedGroup` keeps one agent state per seed (or the states stacked, ``vmap``-ped), compiles
the policy and the ``utd``-step update once, and accumulates each update's metrics on the device
(with the first numerical fault noted there; see :func:`sparserl.agents.common.accumulate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import agents, topology
from sparserl.agents import common
from sparserl.agents.common import ObsStats, accumulate, fresh_sums, normalize
from sparserl.config import Config


def stack(trees):
    """One pytree of stacked leaves from a list of same-shaped pytrees (seeds on axis 0)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def take(tree, i: int):
    """Seed ``i`` of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


class SeedGroup:
    """Agent states of all seeds, acted and updated together.

    ``vmapped=True`` stacks the states and ``vmap``s policy and update (one call for all seeds: the
    throughput mode on accelerators). ``vmapped=False`` keeps one state per seed and calls the same
    jitted single-seed functions in turn: every seed then computes bit-for-bit what a single-seed
    run computes (vmapped XLA kernels may round differently), which is the default on CPU.
    """

    def __init__(self, agent, cfg: Config, seed_cfgs: list[Config], states: list, vmapped: bool):
        self.agent, self.cfg, self.vmapped, self.n = agent, cfg, vmapped, len(states)
        keys = [jax.random.fold_in(jax.random.PRNGKey(c.seed), 0xAC7) for c in seed_cfgs]
        sums = [fresh_sums(self.agent) for _ in states]
        norms = lambda st: {f"{n}_param_norm": common.global_norm(m.params) for n, m in agents.modules(st).items()}
        self.pass_step = getattr(agent, "SCHEDULED_EXPLORATION", False)
        self.norms_fn = jax.jit(jax.vmap(norms) if vmapped else norms)
        policy = self.single_policy = jax.jit(self._policy, static_argnums=5)
        learn = jax.jit(self._learn, donate_argnums=(0, 1))
        # dynamic topology (sparserl.topology): its own jitted function, called only at topology updates
        self.topology_keys = [topology.seed_key(c) for c in seed_cfgs]
        if vmapped:
            self.states, self.sums, self.keys = stack(states), stack(sums), jnp.stack(keys)
            self.policy = jax.jit(jax.vmap(self._policy, in_axes=(0, 0, 0, 0, None, None)), static_argnums=5)
            self.learn_fn = jax.jit(jax.vmap(self._learn, in_axes=(0, 0, 0, 0, None)), donate_argnums=(0, 1))
            self.rewire_fn = jax.jit(jax.vmap(self._rewire, in_axes=(0, 0, 0, 0, None)), donate_argnums=0)
            self.topology_keys = jnp.stack(self.topology_keys)
        else:
            self.states, self.sums, self.keys = list(states), sums, keys
            self.policy, self.learn_fn = policy, learn
            self.rewire_fn = jax.jit(self._rewire, donate_argnums=0)

    def _policy(self, actor_params, obs, obs_stats, act_key, step, deterministic):
        key = jax.random.fold_in(act_key, step)
        if self.cfg.pixels:  # uint8 frames, scaled inside the encoder
            return self.agent.act(actor_params, obs[None], key, deterministic, self.cfg, step=step)[0]
        extra = {"step": step} if self.pass_step else {}
        return self.agent.act(actor_params, normalize(obs, obs_stats)[None], key, deterministic, self.cfg, **extra)[0]

    def _learn(self, state, sums, batches, obs_stats, first_step):
        state, metrics = self.agent.update(state, batches, obs_stats, self.cfg)
        return state, accumulate(sums, metrics, self.agent.METRICS, first_step)

    def _rewire(self, state, batch, obs_stats, key, grad_step):
        # masked-dense during the update (dense gradients, new masks), compact again after (new layouts)
        state = topology.update_state(self.agent, common.dense_state(state), batch, obs_stats, key, grad_step, self.cfg)
        return common.stored_state(state, self.cfg)

    def act(self, obs: np.ndarray, stats: list[ObsStats], step: int, deterministic: bool) -> np.ndarray:
        if self.vmapped:
            return np.asarray(self.policy(agents.policy_params(self.states), obs, stack(stats), self.keys, step,
                                          deterministic))
        actions = [self.policy(agents.policy_params(st), o, ss, k, step, deterministic)
                   for st, o, ss, k in zip(self.states, obs, stats, self.keys)]
        return np.stack([np.asarray(a) for a in actions])

    def act_one(self, i: int, obs: np.ndarray, stats: ObsStats, deterministic: bool) -> np.ndarray:
        """The action of seed ``i`` alone (videos)."""
        return np.asarray(self.single_policy(self.actor_params(i), obs, stats, self.keys[i], 0, deterministic))

    def compile(self, batches: list, stats: list[ObsStats]) -> None:
        """Compile the update and both policies for these argument shapes (example ``batches``, one per
        seed) ahead of the first step, so that steps/s, the ETA and the time shares measure training,
        not XLA compilation (seconds, more for large networks). Nothing runs and nothing is donated:
        the later calls find the executables in JAX's cache."""
        step, obs = jnp.int32(0), [b.obs[0, 0] for b in batches]  # one observation as the env gives it
        if self.vmapped:
            self.learn_fn.lower(self.states, self.sums, stack(batches), stack(stats), step).compile()
            policy_args = (agents.policy_params(self.states), np.stack(obs), stack(stats), self.keys)
        else:  # every seed has the same shapes: one compilation serves them all
            self.learn_fn.lower(self.states[0], self.sums[0], batches[0], stats[0], step).compile()
            policy_args = (agents.policy_params(self.states[0]), obs[0], stats[0], self.keys[0])
        for deterministic in (False, True):
            self.policy.lower(*policy_args, 0, deterministic).compile()
        if topology.dynamic_modules(self.cfg):  # the topology update too, else its first call compiles it
            last = [jax.tree_util.tree_map(lambda x: x[-1], b) for b in batches]
            rewire_args = ((self.states, stack(last), stack(stats), self.topology_keys) if self.vmapped
                           else (self.states[0], last[0], stats[0], self.topology_keys[0]))
            self.rewire_fn.lower(*rewire_args, step).compile()

    def learn(self, batches: list, stats: list[ObsStats], step: int) -> None:
        rewire = topology.due(self.cfg, step)
        step = jnp.int32(step)
        if self.vmapped:
            self.states, self.sums = self.learn_fn(self.states, self.sums, stack(batches), stack(stats), step)
        else:
            for i in range(self.n):
                self.states[i], self.sums[i] = self.learn_fn(self.states[i], self.sums[i], batches[i], stats[i], step)
        if rewire:
            self.rewire(batches, stats, int(step))
        # The next action needs the new actor anyway; waiting here costs nothing and charges the
        # update's time to "update" rather than to the next "act" in the time shares.
        jax.block_until_ready(self.sums)

    def rewire(self, batches: list, stats: list[ObsStats], agent_step: int) -> None:
        """One topology update of every seed's dynamic modules, after the update call at ``agent_step``
        (RigL's dense gradient on the last minibatch of that call's ``batches``)."""
        grad_step = jnp.int32(topology.grad_steps_done(self.cfg, agent_step))
        last = [jax.tree_util.tree_map(lambda x: x[-1], b) for b in batches]
        if self.vmapped:
            self.states = self.rewire_fn(self.states, stack(last), stack(stats), self.topology_keys, grad_step)
        else:
            self.states = [self.rewire_fn(st, b, ss, k, grad_step)
                           for st, b, ss, k in zip(self.states, last, stats, self.topology_keys)]

    def reset_sums(self) -> None:
        sums = [fresh_sums(self.agent) for _ in range(self.n)]
        self.sums = stack(sums) if self.vmapped else sums

    def host_sums(self) -> list[dict]:
        host = jax.device_get(self.sums)
        return [take(host, i) for i in range(self.n)] if self.vmapped else host

    def host_states(self) -> list:
        host = jax.device_get(self.states)
        return [take(host, i) for i in range(self.n)] if self.vmapped else host

    def param_norms(self) -> list[dict]:
        if self.vmapped:
            host = jax.device_get(self.norms_fn(self.states))
            return [take(host, i) for i in range(self.n)]
        return jax.device_get([self.norms_fn(st) for st in self.states])

    def state(self, i: int):
        return take(self.states, i) if self.vmapped else self.states[i]

    def replace_state(self, i: int, new_state) -> None:
        if self.vmapped:
            self.states = jax.tree_util.tree_map(lambda x, y: x.at[i].set(y), self.states, new_state)
        else:
            self.states[i] = new_state

    def actor_params(self, i: int):
        return agents.policy_params(self.state(i))
