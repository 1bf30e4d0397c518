"""Environments: DeepMind Control tasks (``domain-task``) and Gymnasium ids (``gym:Id``).

Both come out with the same small interface: flat float32 observations, actions in [-1, 1]
(rescaled to the task's bounds), action repeat (rewards summed), and ``step`` returning
``(obs, reward, terminated, truncated)``. DMC episodes are 1000 env steps and end by time limit
(truncated, so the critic bootstraps); a DMC step with discount 0 is a true termination.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from sparserl.errors import ConfigError, suggest

# Headless rendering on a machine without a display; harmless for state-based tasks.
os.environ.setdefault("MUJOCO_GL", "egl")

GYM_PREFIX = "gym:"


@lru_cache(maxsize=1)
def dmc_task_names() -> tuple[str, ...]:
    from dm_control import suite

    return tuple(f"{domain}-{task}" for domain, task in suite.ALL_TASKS)


def gym_env_ids() -> list[str]:
    import gymnasium

    return list(gymnasium.envs.registry.keys())


def check_env_name(name: str) -> None:
    if name.startswith(GYM_PREFIX):
        ids = gym_env_ids()
        if name[len(GYM_PREFIX):] not in ids:
            hint = suggest(name, [GYM_PREFIX + i for i in ids])
            raise ConfigError(f"env={name!r}: unknown Gymnasium id{hint}")
        return
    tasks = dmc_task_names()
    if name not in tasks:
        hint = suggest(name, tasks) or " (DMC tasks are domain-task, e.g. cartpole-balance; Gymnasium ids are gym:Id)"
        raise ConfigError(f"env={name!r}: unknown environment{hint}")


def derive_seed(seed: int, stream: int) -> int:
    """Independent integer seeds for the train (stream 0) and evaluation (stream 1) environments."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class Env:
    """Action-repeated environment with flat observations and actions in [-1, 1]."""

    obs_dim: int
    action_dim: int
    time_limit: int  # agent steps after which an episode ends by time limit (the streaming time feature)

    def reset(self) -> np.ndarray:
        raise NotImplementedError

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        raise NotImplementedError

    def render(self, height: int, width: int) -> np.ndarray:
        """An RGB frame (height, width, 3) of the current state."""
        raise NotImplementedError

    def rng_state(self) -> dict:
        """JSON-able state of the randomness the next ``reset`` draws from (for exact resume)."""
        raise NotImplementedError

    def set_rng_state(self, state: dict) -> None:
        raise NotImplementedError

    def episode_state(self) -> dict[str, np.ndarray]:
        """Everything the rest of the current episode depends on besides the RNG of :meth:`rng_state`
        (simulator state, task state, step counters, frame stacks), as arrays: a checkpoint can be
        taken mid-episode and :meth:`restore_episode` on a fresh env of the same task continues it
        exactly. Raises :class:`EpisodeStateUnsupported` for envs whose state cannot be captured."""
        raise EpisodeStateUnsupported(type(self).__name__)

    def restore_episode(self, state: dict[str, np.ndarray]) -> None:
        raise EpisodeStateUnsupported(type(self).__name__)


class EpisodeStateUnsupported(NotImplementedError):
    """This env's mid-episode state cannot be saved: checkpoints wait for an episode end."""


def saves_episodes(env: Env) -> bool:
    """Whether ``env`` can save its mid-episode state (checkpoints at any step)."""
    try:
        env.episode_state()
    except EpisodeStateUnsupported:
        return False
    return True


# Model fields that dm_control tasks randomise per episode (target positions and sizes, colours,
# terrain, gains): restored with the simulator state, since the rest of the episode depends on them.
_EPISODE_MODEL_FIELDS = ("geom_size", "geom_pos", "geom_rgba", "site_size", "site_pos", "site_rgba", "mat_rgba",
                         "light_pos", "dof_damping", "jnt_stiffness", "jnt_range", "wrap_prm",
                         "actuator_ctrlrange", "body_subtreemass", "hfield_data")


def _mujoco_state(model, data) -> np.ndarray:
    """MuJoCo's full integration state: time, qpos, qvel, actuator state, controls, applied forces,
    mocap, and the solver's warm start (without it the next step differs in the last bits)."""
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(model, spec), np.float64)
    mujoco.mj_getState(model, data, state, spec)
    return state


def _set_mujoco_state(model, data, state: np.ndarray) -> None:
    import mujoco

    mujoco.mj_setState(model, data, np.asarray(state, np.float64), mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(model, data)  # positions, velocities, sensors: what the next step starts from


def _numeric_attributes(obj) -> dict[str, np.ndarray]:
    """An object's numeric attributes (episode progress counters such as a task's ``_timeout_progress``)."""
    return {k: np.asarray(v) for k, v in vars(obj).items()
            if isinstance(v, (bool, int, float, np.number, np.ndarray)) and not k.startswith("__")}


class EnvFault(RuntimeError):
    """The simulation cannot go on: a non-finite action, a physics error (a NaN state, a diverging
    simulation) or a non-finite observation. The training loop turns it into a numerical fault."""


def _checked_action(action) -> np.ndarray:
    action = np.asarray(action, np.float64)
    if not np.isfinite(action).all():
        raise EnvFault("action (the policy output NaN/inf)")
    return action


def _checked_obs(obs: np.ndarray) -> np.ndarray:
    if not np.isfinite(obs).all():
        raise EnvFault("observation (the simulation returned NaN/inf)")
    return obs


def _flatten(observation) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float32).ravel() for v in observation.values()])


class DMCEnv(Env):
    def __init__(self, name: str, seed: int, action_repeat: int):
        from dm_control import suite

        domain, task = name.split("-", 1)
        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        spec = self._env.action_spec()
        self._low, self._high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.action_dim = int(spec.shape[0])
        self.obs_dim = int(sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values()))
        self.action_repeat = action_repeat
        limit = float(getattr(self._env, "_step_limit", 1000))
        self.time_limit = math.ceil((limit if math.isfinite(limit) else 1000) / action_repeat)

    @property
    def physics(self):
        return self._env.physics

    def reset(self) -> np.ndarray:
        return _flatten(self._env.reset().observation)

    def render(self, height: int, width: int) -> np.ndarray:
        return self._env.physics.render(height, width, camera_id=0)

    def rng_state(self) -> dict:
        name, keys, pos, has_gauss, cached = self._env.task.random.get_state()
        return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached)}

    def set_rng_state(self, state: dict) -> None:
        self._env.task.random.set_state((state["name"], np.asarray(state["keys"], np.uint32), state["pos"],
                                         state["has_gauss"], state["cached_gaussian"]))

    def episode_state(self) -> dict[str, np.ndarray]:
        physics, model = self._env.physics, self._env.physics.model
        state = {"physics": _mujoco_state(model.ptr, physics.data.ptr),
                 "step_count": np.asarray(self._env._step_count),
                 "reset_next_step": np.asarray(self._env._reset_next_step)}
        state.update({f"model/{f}": np.array(getattr(model, f)) for f in _EPISODE_MODEL_FIELDS
                      if np.size(getattr(model, f, ()))})
        state.update({f"task/{k}": v for k, v in _numeric_attributes(self._env.task).items()})
        return state

    def restore_episode(self, state: dict[str, np.ndarray]) -> None:
        physics, model = self._env.physics, self._env.physics.model
        rng = self.rng_state()
        self._env.reset()  # the task's per-episode set-up that is not numbers; its draws are undone below
        self.set_rng_state(rng)
        for key, value in state.items():
            if key.startswith("model/"):
                getattr(model, key[len("model/"):])[...] = value
            elif key.startswith("task/"):
                setattr(self._env.task, key[len("task/"):], value.item() if value.ndim == 0 else np.array(value))
        _set_mujoco_state(model.ptr, physics.data.ptr, state["physics"])
        self._env._step_count = int(state["step_count"])
        self._env._reset_next_step = bool(state["reset_next_step"])

    def step(self, action):
        from dm_control.rl.control import PhysicsError

        action = self._low + (_checked_action(action) + 1.0) * 0.5 * (self._high - self._low)
        reward = 0.0
        for _ in range(self.action_repeat):
            try:
                ts = self._env.step(action)
            except PhysicsError as e:
                raise EnvFault(f"physics state (MuJoCo: {str(e).splitlines()[0] if str(e) else 'PhysicsError'})") from None
            reward += ts.reward or 0.0
            if ts.last():
                terminated = ts.discount == 0.0
                return _checked_obs(_flatten(ts.observation)), reward, bool(terminated), not terminated
        return _checked_obs(_flatten(ts.observation)), reward, False, False


class GymEnv(Env):
    def __init__(self, name: str, seed: int, action_repeat: int, render: bool = False):
        import gymnasium

        self._env = gymnasium.make(name[len(GYM_PREFIX):], **({"render_mode": "rgb_array"} if render else {}))
        space = self._env.action_space
        self._low, self._high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.action_dim = int(np.prod(space.shape))
        self.obs_dim = int(np.prod(self._env.observation_space.shape))
        self.action_repeat = action_repeat
        limit = self._env.spec.max_episode_steps if self._env.spec is not None else None
        self.time_limit = math.ceil((limit or 1000) / action_repeat)
        self._seed = seed

    def reset(self) -> np.ndarray:
        seed, self._seed = self._seed, None  # seed the first reset only; later resets continue its stream
        obs, _ = self._env.reset(seed=seed)
        return np.asarray(obs, np.float32).ravel()

    def render(self, height: int, width: int) -> np.ndarray:
        frame = self._env.render()  # the env's own resolution; resized by nearest neighbour
        rows = np.linspace(0, frame.shape[0] - 1, height).astype(int)
        cols = np.linspace(0, frame.shape[1] - 1, width).astype(int)
        return frame[rows][:, cols]

    def rng_state(self) -> dict:
        return {"first_reset_seed": self._seed, "np_random": self._env.unwrapped.np_random.bit_generator.state}

    def set_rng_state(self, state: dict) -> None:
        self._seed = state["first_reset_seed"]
        if self._seed is None:
            self._env.unwrapped.np_random.bit_generator.state = state["np_random"]

    def _mujoco(self):
        inner = self._env.unwrapped
        if not (hasattr(inner, "model") and hasattr(inner, "data")):
            raise EpisodeStateUnsupported(f"{type(inner).__name__} (not a MuJoCo env)")
        return inner.model, inner.data

    def episode_state(self) -> dict[str, np.ndarray]:
        model, data = self._mujoco()
        return {"physics": _mujoco_state(model, data), "elapsed_steps": np.asarray(self._time_limit()._elapsed_steps)}

    def restore_episode(self, state: dict[str, np.ndarray]) -> None:
        model, data = self._mujoco()
        rng = self._env.unwrapped.np_random.bit_generator.state
        self._env.reset()  # the wrappers' own checks want a reset before a step; its draws are undone below
        self._env.unwrapped.np_random.bit_generator.state = rng
        _set_mujoco_state(model, data, state["physics"])
        self._time_limit()._elapsed_steps = int(state["elapsed_steps"])

    def _time_limit(self):
        env = self._env
        while not hasattr(env, "_elapsed_steps"):
            if not hasattr(env, "env"):
                raise EpisodeStateUnsupported("a Gymnasium env without a TimeLimit wrapper")
            env = env.env
        return env

    def step(self, action):
        action = self._low + (_checked_action(action) + 1.0) * 0.5 * (self._high - self._low)
        reward = 0.0
        for _ in range(self.action_repeat):
            obs, r, terminated, truncated, _ = self._env.step(action)
            reward += float(r)
            if terminated or truncated:
                break
        return _checked_obs(np.asarray(obs, np.float32).ravel()), reward, bool(terminated), bool(truncated)


class PixelEnv(Env):
    """A DMC task observed through rendered RGB frames: ``(size, size, 3 * frame_stack)`` uint8, the
    last ``frame_stack`` frames stacked on the channel axis, oldest first (NHWC, as the encoder wants).
    At a reset the first frame fills every stack position. Action repeat as in :class:`DMCEnv`.

    One MuJoCo camera is kept for the env's life (building one per frame costs ~15%). ``fast``
    turns off shadows and reflections in the scene (a deviation from DrQ-v2's renders; about 8x
    faster on a CPU with EGL/OSMesa).
    """

    def __init__(self, name: str, seed: int, action_repeat: int, size: int = 84, frame_stack: int = 3,
                 fast: bool = False):
        self._inner = DMCEnv(name, seed, action_repeat)
        self.action_dim = self._inner.action_dim
        self.action_repeat = action_repeat
        self.size, self.frame_stack, self.fast = size, frame_stack, fast
        self.obs_shape = (size, size, 3 * frame_stack)
        self.obs_dim = int(np.prod(self.obs_shape))
        self._camera_id = 2 if name.startswith("quadruped-") else 0  # DrQ-v2's choice of camera
        self._camera = None
        self._frames: list[np.ndarray] = []

    @property
    def physics(self):
        return self._inner.physics

    def _render_frame(self) -> np.ndarray:
        if self._camera is None:
            from dm_control.mujoco.engine import Camera

            callback = _fast_scene if self.fast else None
            self._camera = Camera(self.physics, self.size, self.size, self._camera_id, scene_callback=callback)
        return np.array(self._camera.render())  # a copy: the camera reuses its pixel buffer

    def _stacked(self) -> np.ndarray:
        return np.concatenate(self._frames, axis=-1)

    def reset(self) -> np.ndarray:
        self._inner.reset()
        frame = self._render_frame()
        self._frames = [frame] * self.frame_stack
        return self._stacked()

    def step(self, action):
        _, reward, terminated, truncated = self._inner.step(action)
        self._frames = self._frames[1:] + [self._render_frame()]
        return self._stacked(), reward, terminated, truncated

    def render(self, height: int, width: int) -> np.ndarray:
        return self._inner.render(height, width)

    def rng_state(self) -> dict:
        return self._inner.rng_state()

    def set_rng_state(self, state: dict) -> None:
        self._inner.set_rng_state(state)

    def episode_state(self) -> dict[str, np.ndarray]:
        frames = np.stack(self._frames) if self._frames else np.zeros((0, self.size, self.size, 3), np.uint8)
        return {**self._inner.episode_state(), "frames": frames}

    def restore_episode(self, state: dict[str, np.ndarray]) -> None:
        self._inner.restore_episode({k: v for k, v in state.items() if k != "frames"})
        self._frames = list(np.asarray(state["frames"], np.uint8))


def _fast_scene(physics, scene) -> None:
    import mujoco

    scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def gl_backend() -> str:
    """The MuJoCo OpenGL backend in use (``MUJOCO_GL``: egl by default, osmesa as the fallback)."""
    return os.environ.get("MUJOCO_GL", "")


def make_for(cfg, seed: int, render: bool = False) -> Env:
    """The env a config trains on: pixel observations when ``cfg.pixels``, else :func:`make`."""
    if cfg.pixels:
        check_env_name(cfg.env)
        return PixelEnv(cfg.env, seed, cfg.action_repeat, cfg.render.size, cfg.frame_stack, cfg.render.fast)
    return make(cfg.env, seed, cfg.action_repeat, render)


def make(name: str, seed: int, action_repeat: int = 1, render: bool = False) -> Env:
    """``render=True`` prepares the env for :meth:`Env.render` (Gymnasium needs it at creation)."""
    check_env_name(name)
    if name.startswith(GYM_PREFIX):
        return GymEnv(name, seed, action_repeat, render)
    return DMCEnv(name, seed, action_repeat)


class ObsStats(NamedTuple):
    """Observation statistics the agents normalise by: ``(obs - mean) / std``."""

    mean: Any
    std: Any


class RunningMeanStd:
    """Running mean/variance of observations (parallel-Welford update), kept on the host."""

    def __init__(self, dim: int, eps: float = 1e-8):
        self.mean = np.zeros(dim, np.float64)
        self.var = np.ones(dim, np.float64)
        self.count = 1e-4  # a tiny prior (mean 0, var 1) so the first update is well defined
        self.eps = eps

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, self.mean.shape[0])
        n, batch_mean, batch_var = x.shape[0], x.mean(0), x.var(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var + self.eps)

    def obs_stats(self, enabled: bool = True):
        """float32 ``ObsStats`` for the networks; identity (0, 1) when normalisation is off."""

        if not enabled:
            return ObsStats(np.zeros(self.mean.shape, np.float32), np.ones(self.mean.shape, np.float32))
        return ObsStats(self.mean.astype(np.float32), self.std.astype(np.float32))
