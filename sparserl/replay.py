"""Uniform replay of agent transitions, in host (numpy) memory.

Sampling draws all K minibatches of one agent step at once, so the K gradient steps run in one
jitted call with a single host-to-device transfer.
"""

from __future__ import annotations

import numpy as np

from sparserl.agents.common import Batch


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

    def add(self, obs, action, reward: float, discount: float, next_obs) -> None:
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
