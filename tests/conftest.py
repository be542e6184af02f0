"""Shared test settings and helpers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces

# Small networks run fastest on one thread, and a loaded machine makes multi-threaded small ops erratic.
th.set_num_threads(1)


class MatrixActionEnv(gym.Env):
    """A 10-step task with a (2, 2) Box action: reward -||a - target||^2 (a multi-dimensional Box action space)."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (2, 2), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample() * 0, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert action.shape == (2, 2)
        self.t += 1
        obs = np.full(3, self.t / 10, np.float32)
        return obs, -float(((action - 0.5) ** 2).sum()), False, self.t >= 10, {}
