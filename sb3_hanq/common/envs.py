"""Environments used by the papers that gymnasium does not ship.

``DiscretePendulum-v1`` (HANQ paper §3.1 and §11 "Environments"): gymnasium's ``Pendulum-v1`` with the
three actions ``{-2, 0, 2}`` (torques), as an environment of its own (:class:`DiscretePendulumEnv`), after
Xiao et al. (2022) and Snyder et al. (2023). It is the paper's main offline
benchmark; see :func:`sb3_hanq.common.offline.collect_dataset` for its dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.pendulum import PendulumEnv

#: Torques of ``DiscretePendulum-v1``'s actions 0, 1, 2 (HANQ paper §11: action space {-2, 0, 2}).
PENDULUM_TORQUES: tuple[float, ...] = (-2.0, 0.0, 2.0)

#: Same time limit as gymnasium's ``Pendulum-v1``.
PENDULUM_MAX_EPISODE_STEPS = 200


class DiscreteActionWrapper(gym.ActionWrapper):
    """Replace a ``Box`` action space by ``Discrete(len(actions))``: action ``i`` plays ``actions[i]``.

    :param env: Environment with a ``Box`` action space.
    :param actions: One continuous action per discrete action. A scalar is broadcast to the
        ``Box``'s shape (e.g. a torque for Pendulum's ``Box(-2, 2, (1,))``). Each must lie inside the
        ``Box`` bounds.
    """

    def __init__(self, env: gym.Env, actions: Sequence[float | Sequence[float] | np.ndarray]) -> None:
        super().__init__(env)
        box = env.action_space
        if not isinstance(box, spaces.Box):
            raise ValueError(f"DiscreteActionWrapper needs a Box action space, got {box}")
        if len(actions) < 1:
            raise ValueError("DiscreteActionWrapper needs at least one action, got an empty list")
        table = []
        for i, action in enumerate(actions):
            arr = np.asarray(action, dtype=box.dtype)
            try:
                arr = np.broadcast_to(arr, box.shape).copy()
            except ValueError as err:
                raise ValueError(f"actions[{i}] has shape {arr.shape}, expected {box.shape} or a scalar") from err
            if not box.contains(arr):
                raise ValueError(f"actions[{i}]={arr.tolist()} is outside the action space {box}")
            table.append(arr)
        self.actions = np.stack(table)
        self.action_space = spaces.Discrete(len(table))

    def action(self, action: Any) -> np.ndarray:
        """The continuous action played for discrete action ``action`` (a copy, safe to modify)."""
        if not self.action_space.contains(action):
            raise ValueError(f"Invalid action {action!r} for {self.action_space}")
        return self.actions[int(action)].copy()


class DiscretePendulumEnv(PendulumEnv):
    """``DiscretePendulum-v1``: gymnasium's ``PendulumEnv`` whose own action space is ``Discrete(3)``.

    Action ``i`` applies the torque :data:`PENDULUM_TORQUES` ``[i]`` (HANQ paper §11: {-2, 0, 2}); dynamics,
    rewards, observations, resets and rendering are ``PendulumEnv``'s, fed the same ``float32`` torque that
    ``Pendulum-v1`` receives from a ``Box(-2, 2, (1,), float32)`` action. Being the environment itself rather
    than a wrapper, ``env.unwrapped.action_space`` is ``Discrete(3)`` and gymnasium's and SB3's checkers see it.

    :param render_mode: as ``Pendulum-v1`` (``"human"``, ``"rgb_array"`` or ``None``).
    :param g: gravity, as ``Pendulum-v1`` (default 10.0).
    """

    def __init__(self, render_mode: str | None = None, g: float = 10.0) -> None:
        super().__init__(render_mode=render_mode, g=g)
        self._torques = np.array(PENDULUM_TORQUES, dtype=np.float32).reshape(-1, 1)
        self.action_space = spaces.Discrete(len(PENDULUM_TORQUES))

    def torque(self, action: Any) -> np.ndarray:
        """The ``Box`` action (shape ``(1,)``, ``float32``) that discrete ``action`` plays."""
        if isinstance(action, np.ndarray) and action.shape == (1,):  # a VecEnv's single action
            action = action[0]
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an integer in [0, {len(PENDULUM_TORQUES)}), got {action!r}")
        return self._torques[int(action)].copy()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:  # type: ignore[override]
        """One ``PendulumEnv`` step with the torque of ``action``."""
        return super().step(self.torque(action))


def make_discrete_pendulum(render_mode: str | None = None, g: float = 10.0) -> gym.Env:
    """``DiscretePendulumEnv(render_mode, g)``; kept for code that called the former entry point."""
    return DiscretePendulumEnv(render_mode=render_mode, g=g)


def register_envs() -> None:
    """Register ``DiscretePendulum-v1`` with gymnasium (idempotent; called when importing ``sb3_hanq``)."""
    if "DiscretePendulum-v1" not in gym.registry:
        gym.register(
            id="DiscretePendulum-v1",
            entry_point="sb3_hanq.common.envs:DiscretePendulumEnv",
            max_episode_steps=PENDULUM_MAX_EPISODE_STEPS,
        )
