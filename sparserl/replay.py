"""Uniform replay of agent transitions, in host (numpy) memory.

Sampling draws all K minibatches of one agent step at once, so the K gradient steps run in one
jitted call with a single host-to-device transfer.

* :class:`ReplayBuffer`: flat float32 observations, one-step transitions.
* :class:`FrameReplay`: pixel observations (uint8 frames, each stored once), frame stacks rebuilt
  at sample time, n-step returns.
"""

from __future__ import annotations

import numpy as np

from sparserl.agents.common import Batch
from sparserl.config import ConfigError


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, action_dim: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, action_dim), np.float32)
        self.reward = np.zeros((capacity,), np.float32)
        self.discount = np.zeros((capacity,), np.float32)
        self.size = 0
        self.cursor = 0

    def add(self, obs, action, reward: float, discount: float, next_obs, episode_end: bool = False) -> None:
        del episode_end  # every transition is stored whole
        i = self.cursor
        self.obs[i], self.action[i], self.reward[i] = obs, action, reward
        self.discount[i], self.next_obs[i] = discount, next_obs
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, num_batches: int, batch_size: int) -> Batch:
        """``num_batches`` minibatches stacked on a leading axis: arrays of shape (K, B, ...)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = rng.integers(0, self.size, size=(num_batches, batch_size))
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.discount[idx], self.next_obs[idx])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.obs, self.next_obs, self.action, self.reward, self.discount))

    def gather(self, idx: np.ndarray) -> Batch:
        """Transitions ``idx`` (numbers in ``[0, size)``)."""
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.discount[idx], self.next_obs[idx])

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        n = self.size
        return {name: getattr(self, name)[:n] for name in ("obs", "action", "reward", "discount", "next_obs")}

    def checkpoint_meta(self) -> dict:
        return {"buffer_size": self.size, "buffer_cursor": self.cursor}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        n = meta["buffer_size"]
        for name in ("obs", "action", "reward", "discount", "next_obs"):
            getattr(self, name)[:n] = arrays[name]
        self.size, self.cursor = n, meta["buffer_cursor"]


def mem_available() -> int | None:
    """Bytes of MemAvailable in /proc/meminfo, or None where that is not readable (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class FrameReplay:
    """Replay of pixel transitions that stores every rendered frame once, as uint8.

    Frames live in a ring of ``capacity + frame_stack`` slots, addressed by a global frame number
    ``g`` (slot ``g % slots``). An episode of T agent steps stores T + 1 frames (the reset frame and
    one per step) and T actions, rewards and discounts, attached to the frame they lead to. The
    stacked observation at frame ``g`` is frames ``g-k+1 .. g`` with positions before the episode's
    first frame clamped to it (a reset fills the stack with the first frame, as :class:`PixelEnv`).

    A transition starts at any stored frame that is not its episode's last and whose stack is still
    in the ring. Its n-step return sums ``gamma^m r`` over up to ``n`` steps, stopping at the
    episode's end; ``discount`` is ``gamma^m`` times 0 if a true terminal state was reached, so the
    agent's target is ``reward + discount * Q(next_obs)`` (the buffer applies gamma, unlike
    :class:`ReplayBuffer`, whose ``discount`` is only the terminal flag).

    ``add`` has :class:`ReplayBuffer`'s signature; the ``obs`` it is given is only read when it opens
    an episode (its last frame is the reset frame), after that only ``next_obs``'s last frame is new.
    """

    def __init__(self, capacity: int, frame_shape: tuple[int, int, int], frame_stack: int, action_dim: int,
                 n_step: int = 1, gamma: float = 0.99):
        self.capacity, self.frame_stack, self.n_step, self.gamma = capacity, frame_stack, n_step, gamma
        self.frame_shape = tuple(frame_shape)
        self.slots = capacity + frame_stack
        self.frames = np.zeros((self.slots, *self.frame_shape), np.uint8)
        self.action = np.zeros((self.slots, action_dim), np.float32)  # the action that led to the frame
        self.reward = np.zeros((self.slots,), np.float32)
        self.discount = np.zeros((self.slots,), np.float32)  # 0: the frame is a true terminal state
        self.episode_start = np.zeros((self.slots,), np.int64)  # global number of the episode's first frame
        self.is_last = np.zeros((self.slots,), bool)  # the frame ends its episode (no transition from it)
        self.total = 0  # frames ever stored
        self.open = False  # an episode is being written

    @staticmethod
    def bytes_per_transition(frame_shape, action_dim: int) -> int:
        return int(np.prod(frame_shape)) + 4 * action_dim + 4 + 4 + 8 + 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.frames, self.action, self.reward, self.discount, self.episode_start,
                                      self.is_last))

    def _store(self, frame, action, reward, discount, start: int, last: bool) -> None:
        i = self.total % self.slots
        self.frames[i] = frame
        self.action[i], self.reward[i], self.discount[i] = action, reward, discount
        self.episode_start[i], self.is_last[i] = start, last
        self.total += 1

    def add(self, obs, action, reward: float, discount: float, next_obs, episode_end: bool = False) -> None:
        c = self.frame_shape[-1]
        if not self.open:
            self._store(np.asarray(obs)[..., -c:], 0.0, 0.0, 1.0, self.total, False)
            self._start = self.total - 1
            self.open = True
        self._store(np.asarray(next_obs)[..., -c:], action, reward, discount, self._start, episode_end)
        if episode_end:
            self.open = False

    def _oldest(self) -> int:
        return max(0, self.total - self.slots)

    def valid_starts(self) -> np.ndarray:
        """Global frame numbers from which a transition can be sampled now."""
        g = np.arange(self._oldest(), self.total)
        slot = g % self.slots
        ok = ~self.is_last[slot] & (g < self.total - 1)
        # the whole stack (clamped at the episode start) must still be in the ring
        ok &= np.maximum(g - self.frame_stack + 1, self.episode_start[slot]) >= self._oldest()
        return g[ok]

    @property
    def size(self) -> int:
        """Transitions available for sampling."""
        return int(self.valid_starts().shape[0]) if self.total else 0

    def _stack(self, g: np.ndarray) -> np.ndarray:
        start = self.episode_start[g % self.slots]
        pos = np.maximum(g[..., None] - np.arange(self.frame_stack - 1, -1, -1), start[..., None])
        frames = self.frames[pos % self.slots]  # (..., k, H, W, C)
        frames = np.moveaxis(frames, -4, -2)  # (..., H, W, k, C)
        return frames.reshape(*frames.shape[:-2], -1)

    def gather(self, g: np.ndarray) -> Batch:
        """Transitions starting at global frame numbers ``g`` (from :meth:`valid_starts`)."""
        g = np.asarray(g, np.int64)
        reward = np.zeros(g.shape, np.float32)
        discount = np.ones(g.shape, np.float32)
        end = g.copy()
        running = np.ones(g.shape, bool)  # not yet past the episode's end
        for m in range(self.n_step):
            nxt = g + m + 1
            take = running & (nxt < self.total)
            slot = nxt % self.slots
            reward += np.where(take, discount * self.reward[slot], 0.0).astype(np.float32)
            discount = np.where(take, discount * self.gamma * self.discount[slot], discount).astype(np.float32)
            end = np.where(take, nxt, end)
            running = take & ~self.is_last[slot]
        return Batch(self._stack(g), self.action[(g + 1) % self.slots], reward, discount, self._stack(end))

    def sample(self, rng: np.random.Generator, num_batches: int, batch_size: int) -> Batch:
        starts = self.valid_starts()
        if starts.shape[0] == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return self.gather(starts[rng.integers(0, starts.shape[0], size=(num_batches, batch_size))])

    # checkpoints: the stored frames and per-frame arrays, oldest first
    _ARRAYS = ("frames", "action", "reward", "discount", "episode_start", "is_last")

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        slots = np.arange(self._oldest(), self.total) % self.slots
        return {name: getattr(self, name)[slots] for name in self._ARRAYS}

    def checkpoint_meta(self) -> dict:
        return {"buffer_size": self.size, "buffer_total": self.total, "buffer_open": self.open,
                "buffer_episode_start": int(getattr(self, "_start", 0))}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.total, self.open = meta["buffer_total"], meta["buffer_open"]
        self._start = meta["buffer_episode_start"]
        slots = np.arange(self._oldest(), self.total) % self.slots
        for name in self._ARRAYS:
            getattr(self, name)[slots] = arrays[name]


def capacity(cfg) -> int:
    """Transitions a run's buffer holds: ``buffer_size``, or fewer when the run is shorter."""
    return min(cfg.buffer_size, cfg.agent_steps)


def for_config(cfg, obs_dim: int, action_dim: int) -> ReplayBuffer | FrameReplay:
    """The replay buffer of a run: frames for pixel agents, flat observations otherwise."""
    if cfg.pixels:
        size = cfg.render.size
        return FrameReplay(capacity(cfg), (size, size, 3), cfg.frame_stack, action_dim, cfg.n_step, cfg.gamma)
    return ReplayBuffer(capacity(cfg), obs_dim, action_dim)


def check_fits(nbytes: int, what: str, key: str = "buffer_size", available: int | None = None) -> int | None:
    """Raise ConfigError when a buffer of ``nbytes`` cannot fit in MemAvailable (before training)."""
    available = mem_available() if available is None else available
    if available is not None and nbytes > available:
        raise ConfigError(f"{key}: the {what} needs {nbytes / 1e9:.1f} GB but only {available / 1e9:.1f} GB of memory "
                          f"is available; lower {key}")
    return available
