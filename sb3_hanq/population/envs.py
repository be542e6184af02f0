"""Batched torch versions of three classic-control environments, to evaluate many agents at once.

HANQ paper §11 "Environments": the population experiments score many agents on ``DiscretePendulum-v1``,
``CartPole-v1`` and ``Acrobot-v1``. Stepping thousands of gymnasium environments one at a time in Python is
the bottleneck there, so this module steps ``n_envs`` copies of an environment as one batch of tensor
operations, on any torch device.

Each class mirrors gymnasium's dynamics (``gymnasium.envs.classic_control``) formula for formula, with the
same constants and the same order of floating-point operations. The state is kept in ``float64`` (like
gymnasium's numpy state) and observations are returned as ``float32`` (like gymnasium's observations).
What differs from gymnasium:

- :class:`BatchedEnv` has no time limit: :meth:`BatchedEnv.step` never truncates. :func:`evaluate_policy_batched`
  applies :attr:`BatchedEnv.max_episode_steps` (gymnasium's ``TimeLimit``).
- There is no per-environment reset: an environment that has terminated keeps stepping. Its observations and
  rewards then mean nothing (gymnasium calls this undefined behaviour); mask them with ``terminated``.
- Random draws come from a ``torch.Generator`` instead of gymnasium's ``np_random``: same distributions, other
  numbers.
- Not always bit-identical: torch's vectorised ``sin``/``cos`` differ from numpy's (libm) by an ulp on some
  inputs, and gymnasium squares numpy scalars with ``x**2`` (libm ``pow``, an ulp off ``x * x`` on some inputs)
  where this module uses ``x * x``. One step agrees to ``1e-12``; Acrobot is chaotic and amplifies the ulps over
  an episode (measured after 100 random-action steps: ``1e-9`` to ``2e-4`` on the state, fast spins drifting most).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from numbers import Integral

import numpy as np
import torch as th

from sb3_hanq.common.envs import PENDULUM_MAX_EPISODE_STEPS, PENDULUM_TORQUES

#: Environment ids that :func:`make_batched_env` builds.
BATCHED_ENV_IDS: tuple[str, ...] = ("DiscretePendulum-v1", "CartPole-v1", "Acrobot-v1")


class BatchedEnv(abc.ABC):
    """``n_envs`` copies of one environment stepped together (HANQ paper §11 "Environments").

    Subclasses mirror gymnasium's dynamics for one environment id. Call :meth:`reset` or :meth:`set_state`
    before :meth:`step`.

    :param n_envs: Number of environments in the batch (``>= 1``).
    :param device: Torch device holding the state and every returned tensor.
    """

    #: Gymnasium id of the mirrored environment.
    env_id: str = ""
    #: Length of one observation.
    observation_dim: int = 0
    #: Actions are the integers ``0 .. n_actions - 1``.
    n_actions: int = 0
    #: Gymnasium's ``TimeLimit`` for this environment (applied by :func:`evaluate_policy_batched`).
    max_episode_steps: int = 0
    #: Length of one raw state (as gymnasium's ``env.unwrapped.state``).
    state_dim: int = 0
    #: Half-widths of gymnasium's uniform initial-state distribution, one per state entry.
    _reset_high: tuple[float, ...] = ()

    def __init__(self, n_envs: int, device: th.device | str = "cpu") -> None:
        if isinstance(n_envs, bool) or not isinstance(n_envs, Integral):
            raise ValueError(f"n_envs must be an integer >= 1, got {n_envs!r}")
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.n_envs: int = int(n_envs)
        self.device: th.device = th.device(device)
        self._state: th.Tensor | None = None

    @property
    def state(self) -> th.Tensor:
        """Raw state ``[n_envs, state_dim]``, ``float64`` on :attr:`device` (as gymnasium's ``unwrapped.state``)."""
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__}: call reset() or set_state() before using the state")
        return self._state

    def reset(self, generator: th.Generator) -> th.Tensor:
        """Draw every environment's initial state as gymnasium's ``reset()`` does; return the observations.

        :param generator: Source of the random draws (a CPU generator; the draws are moved to :attr:`device`).
        :return: Observations ``[n_envs, observation_dim]``, ``float32``.
        """
        high = th.tensor(self._reset_high, dtype=th.float64, device=generator.device)
        low = -high
        u = th.rand(self.n_envs, self.state_dim, generator=generator, dtype=th.float64, device=generator.device)
        # Same formula as numpy's Generator.uniform: low + (high - low) * U[0, 1).
        draws = low + (high - low) * u
        return self.set_state(self._round_initial_state(draws).to(self.device))

    def set_state(self, state: th.Tensor) -> th.Tensor:
        """Set the raw state of every environment; return the observations.

        :param state: ``[n_envs, state_dim]``, in gymnasium's layout; stored as ``float64`` on :attr:`device`.
        :return: Observations ``[n_envs, observation_dim]``, ``float32``.
        """
        state = th.as_tensor(state)
        if state.shape != (self.n_envs, self.state_dim):
            raise ValueError(
                f"state must have shape ({self.n_envs}, {self.state_dim}) for {self.env_id}, got {tuple(state.shape)}"
            )
        self._state = state.to(device=self.device, dtype=th.float64).clone()
        self._on_set_state()
        return self._observe(self._state)

    def step(self, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Advance every environment by one step.

        :param actions: Integer tensor ``[n_envs]`` with values in ``0 .. n_actions - 1``.
        :return: ``(observations [n_envs, observation_dim] float32, rewards [n_envs] float64,
            terminated [n_envs] bool)``, all on :attr:`device`.
        """
        state = self.state
        actions = self._check_actions(actions)
        new_state, reward, terminated = self._step(state, actions)
        self._state = new_state
        return self._observe(new_state), reward, terminated

    def _check_actions(self, actions: th.Tensor) -> th.Tensor:
        """Validate ``actions`` (one device synchronisation per call) and return them as ``long`` on the device."""
        if not isinstance(actions, th.Tensor):
            raise ValueError(f"actions must be a torch.Tensor, got {type(actions).__name__}")
        if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == th.bool:
            raise ValueError(f"actions must be an integer tensor, got dtype {actions.dtype}")
        if actions.shape != (self.n_envs,):
            raise ValueError(f"actions must have shape ({self.n_envs},), got {tuple(actions.shape)}")
        actions = actions.to(device=self.device, dtype=th.long)
        if bool(((actions < 0) | (actions >= self.n_actions)).any()):
            raise ValueError(
                f"actions must lie in [0, {self.n_actions - 1}] for {self.env_id}, got values in "
                f"[{int(actions.min())}, {int(actions.max())}]"
            )
        return actions

    def _round_initial_state(self, draws: th.Tensor) -> th.Tensor:
        """Hook: round the initial draws like gymnasium stores them (identity by default)."""
        return draws

    def _on_set_state(self) -> None:
        """Hook called after the state has been set (by :meth:`reset` or :meth:`set_state`); nothing by default."""
        return None

    @abc.abstractmethod
    def _observe(self, state: th.Tensor) -> th.Tensor:
        """Observations (float32) of raw states."""

    @abc.abstractmethod
    def _step(self, state: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """(next state, reward, terminated) of raw states and actions."""


def _angle_normalize(x: th.Tensor) -> th.Tensor:
    """Map angles to ``[-pi, pi)`` with floor-modulo, as gymnasium's ``pendulum.angle_normalize``."""
    return th.remainder(x + np.pi, 2 * np.pi) - np.pi


class BatchedDiscretePendulum(BatchedEnv):
    """Batched ``DiscretePendulum-v1`` (HANQ paper §3.1, §11): Pendulum-v1 (``g = 10``) with torques ``{-2, 0, 2}``.

    Mirrors gymnasium's ``PendulumEnv.step`` fed by :class:`sb3_hanq.common.envs.DiscreteActionWrapper`. State
    ``(theta, thetadot)``; observation ``(cos theta, sin theta, thetadot)``; reward
    ``-(angle_normalize(theta)**2 + 0.1 thetadot**2 + 0.001 u**2)``; never terminates (200-step time limit).
    The torque cost ``0.001 u**2`` is computed in ``float32`` as in the wrapped env, whose torques are ``float32``.
    """

    env_id = "DiscretePendulum-v1"
    observation_dim = 3
    n_actions = len(PENDULUM_TORQUES)
    max_episode_steps = PENDULUM_MAX_EPISODE_STEPS
    state_dim = 2
    _reset_high = (np.pi, 1.0)

    max_speed = 8.0
    dt = 0.05
    g = 10.0
    m = 1.0
    l = 1.0  # noqa: E741  (gymnasium's name for the pole length)

    def __init__(self, n_envs: int, device: th.device | str = "cpu") -> None:
        super().__init__(n_envs, device)
        torques32 = np.asarray(PENDULUM_TORQUES, dtype=np.float32)
        self._torques = th.tensor(torques32.astype(np.float64), device=self.device)
        # python float * float32 scalar stays float32 in numpy >= 2, so gymnasium's torque cost is a float32 product.
        self._torque_costs = th.tensor((np.float32(0.001) * torques32**2).astype(np.float64), device=self.device)

    def _observe(self, state: th.Tensor) -> th.Tensor:
        theta, thetadot = state[:, 0], state[:, 1]
        return th.stack((th.cos(theta), th.sin(theta), thetadot), dim=1).to(th.float32)

    def _step(self, state: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        theta, thetadot = state[:, 0], state[:, 1]
        u = self._torques[actions]
        costs = th.square(_angle_normalize(theta)) + 0.1 * th.square(thetadot) + self._torque_costs[actions]
        gain = 3 * self.g / (2 * self.l)
        torque_gain = 3.0 / (self.m * self.l**2)
        new_thetadot = thetadot + (gain * th.sin(theta) + torque_gain * u) * self.dt
        new_thetadot = th.clamp(new_thetadot, -self.max_speed, self.max_speed)
        new_theta = theta + new_thetadot * self.dt
        terminated = th.zeros(self.n_envs, dtype=th.bool, device=self.device)
        return th.stack((new_theta, new_thetadot), dim=1), -costs, terminated


class BatchedCartPole(BatchedEnv):
    """Batched ``CartPole-v1`` (HANQ paper §11 "Environments"), mirroring gymnasium's ``CartPoleEnv`` (Euler).

    State ``(x, x_dot, theta, theta_dot)`` is also the observation. Reward ``1`` per step, the terminating step
    included; like gymnasium, ``0`` for a terminal state reached after the first termination (stepping on is
    undefined behaviour there). Terminates when ``|x| > 2.4`` or ``|theta| > 12 degrees``; 500-step time limit.
    """

    env_id = "CartPole-v1"
    observation_dim = 4
    n_actions = 2
    max_episode_steps = 500
    state_dim = 4
    _reset_high = (0.05, 0.05, 0.05, 0.05)

    gravity = 9.8
    masscart = 1.0
    masspole = 0.1
    total_mass = masspole + masscart
    length = 0.5  # half the pole's length
    polemass_length = masspole * length
    force_mag = 10.0
    tau = 0.02
    theta_threshold_radians = 12 * 2 * math.pi / 360
    x_threshold = 2.4

    def __init__(self, n_envs: int, device: th.device | str = "cpu") -> None:
        super().__init__(n_envs, device)
        self._forces = th.tensor((-self.force_mag, self.force_mag), dtype=th.float64, device=self.device)
        self._was_terminated = th.zeros(self.n_envs, dtype=th.bool, device=self.device)

    def _on_set_state(self) -> None:
        self._was_terminated = th.zeros(self.n_envs, dtype=th.bool, device=self.device)

    def _observe(self, state: th.Tensor) -> th.Tensor:
        return state.to(th.float32)

    def _step(self, state: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        x, x_dot, theta, theta_dot = state.unbind(dim=1)
        force = self._forces[actions]
        costheta = th.cos(theta)
        sintheta = th.sin(theta)
        temp = (force + self.polemass_length * th.square(theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * th.square(costheta) / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        x = x + self.tau * x_dot
        x_dot = x_dot + self.tau * xacc
        theta = theta + self.tau * theta_dot
        theta_dot = theta_dot + self.tau * thetaacc
        terminated = (
            (x < -self.x_threshold)
            | (x > self.x_threshold)
            | (theta < -self.theta_threshold_radians)
            | (theta > self.theta_threshold_radians)
        )
        # 1 unless the state is terminal and an earlier step already terminated (gymnasium's steps_beyond_terminated).
        reward = (~(terminated & self._was_terminated)).to(th.float64)
        self._was_terminated = self._was_terminated | terminated
        return th.stack((x, x_dot, theta, theta_dot), dim=1), reward, terminated


def _wrap(x: th.Tensor, low: float, high: float) -> th.Tensor:
    """Shift ``x`` by multiples of ``high - low`` into ``[low, high]``, as gymnasium's ``acrobot.wrap``.

    Gymnasium subtracts (adds) one period at a time while above (below) the range. One period is exact; the rare
    values more than one period away are shifted in one go, which may differ from gymnasium by an ulp.
    """
    diff = high - low
    x = th.where(x > high, x - diff, x)
    x = th.where(x > high, x - th.ceil((x - high) / diff) * diff, x)
    x = th.where(x < low, x + diff, x)
    return th.where(x < low, x + th.ceil((low - x) / diff) * diff, x)


class BatchedAcrobot(BatchedEnv):
    """Batched ``Acrobot-v1`` (HANQ paper §11 "Environments"), mirroring gymnasium's ``AcrobotEnv``.

    "book" dynamics, one RK4 step over ``dt = 0.2``, angles wrapped to ``[-pi, pi]``, velocities clipped to
    ``4 pi`` and ``9 pi``, torques ``{-1, 0, 1}`` without noise. State ``(theta1, theta2, dtheta1, dtheta2)``;
    observation ``(cos theta1, sin theta1, cos theta2, sin theta2, dtheta1, dtheta2)``. Reward ``-1`` per step,
    ``0`` on a terminal state (``-cos theta1 - cos(theta1 + theta2) > 1``); 500-step time limit. Initial states
    are rounded to ``float32`` as gymnasium's ``reset`` stores them.
    """

    env_id = "Acrobot-v1"
    observation_dim = 6
    n_actions = 3
    max_episode_steps = 500
    state_dim = 4
    _reset_high = (0.1, 0.1, 0.1, 0.1)

    dt = 0.2
    LINK_LENGTH_1 = 1.0
    LINK_LENGTH_2 = 1.0
    LINK_MASS_1 = 1.0
    LINK_MASS_2 = 1.0
    LINK_COM_POS_1 = 0.5
    LINK_COM_POS_2 = 0.5
    LINK_MOI = 1.0
    MAX_VEL_1 = 4 * math.pi
    MAX_VEL_2 = 9 * math.pi
    AVAIL_TORQUE = (-1.0, 0.0, 1.0)
    g = 9.8

    def __init__(self, n_envs: int, device: th.device | str = "cpu") -> None:
        super().__init__(n_envs, device)
        self._torques = th.tensor(self.AVAIL_TORQUE, dtype=th.float64, device=self.device)

    def _round_initial_state(self, draws: th.Tensor) -> th.Tensor:
        return draws.to(th.float32).to(th.float64)

    def _observe(self, state: th.Tensor) -> th.Tensor:
        theta1, theta2, dtheta1, dtheta2 = state.unbind(dim=1)
        return th.stack((th.cos(theta1), th.sin(theta1), th.cos(theta2), th.sin(theta2), dtheta1, dtheta2), dim=1).to(
            th.float32
        )

    def _dsdt(self, s: th.Tensor, a: th.Tensor) -> th.Tensor:
        """Time derivative of the state ``[n, 4]`` under torques ``a`` ("book" equations of motion)."""
        m1 = self.LINK_MASS_1
        m2 = self.LINK_MASS_2
        l1 = self.LINK_LENGTH_1
        lc1 = self.LINK_COM_POS_1
        lc2 = self.LINK_COM_POS_2
        I1 = self.LINK_MOI  # noqa: N806
        I2 = self.LINK_MOI  # noqa: N806
        g = self.g
        pi = math.pi
        theta1, theta2, dtheta1, dtheta2 = s.unbind(dim=1)
        sin2 = th.sin(theta2)
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * th.cos(theta2)) + I1 + I2
        d2 = m2 * (lc2**2 + l1 * lc2 * th.cos(theta2)) + I2
        phi2 = m2 * lc2 * g * th.cos(theta1 + theta2 - pi / 2.0)
        phi1 = (
            -m2 * l1 * lc2 * th.square(dtheta2) * sin2
            - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * sin2
            + (m1 * lc1 + m2 * l1) * g * th.cos(theta1 - pi / 2)
            + phi2
        )
        ddtheta2 = (a + d2 / d1 * phi1 - m2 * l1 * lc2 * th.square(dtheta1) * sin2 - phi2) / (
            m2 * lc2**2 + I2 - th.square(d2) / d1
        )
        ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
        return th.stack((dtheta1, dtheta2, ddtheta1, ddtheta2), dim=1)

    def _step(self, state: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        torque = self._torques[actions]
        # One classic RK4 step over [0, dt]; the torque is held constant (its derivative is 0).
        dt = self.dt
        dt2 = dt / 2.0
        k1 = self._dsdt(state, torque)
        k2 = self._dsdt(state + dt2 * k1, torque)
        k3 = self._dsdt(state + dt2 * k2, torque)
        k4 = self._dsdt(state + dt * k3, torque)
        ns = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        theta1 = _wrap(ns[:, 0], -math.pi, math.pi)
        theta2 = _wrap(ns[:, 1], -math.pi, math.pi)
        dtheta1 = th.clamp(ns[:, 2], -self.MAX_VEL_1, self.MAX_VEL_1)
        dtheta2 = th.clamp(ns[:, 3], -self.MAX_VEL_2, self.MAX_VEL_2)
        terminated = -th.cos(theta1) - th.cos(theta2 + theta1) > 1.0
        reward = th.where(terminated, 0.0, -1.0).to(th.float64)
        return th.stack((theta1, theta2, dtheta1, dtheta2), dim=1), reward, terminated


_ENV_CLASSES: dict[str, type[BatchedEnv]] = {
    cls.env_id: cls for cls in (BatchedDiscretePendulum, BatchedCartPole, BatchedAcrobot)
}
assert tuple(_ENV_CLASSES) == BATCHED_ENV_IDS


def make_batched_env(env_id: str, n_envs: int, device: th.device | str = "cpu") -> BatchedEnv:
    """Build ``n_envs`` batched copies of ``env_id`` (HANQ paper §11; dynamics mirror gymnasium's).

    :param env_id: One of :data:`BATCHED_ENV_IDS`.
    :param n_envs: Number of environments (``>= 1``).
    :param device: Torch device for the state and the returned tensors.
    :raises ValueError: For an unknown ``env_id`` or ``n_envs < 1``.
    """
    if env_id not in _ENV_CLASSES:
        raise ValueError(f"Unknown env_id {env_id!r}: batched environments exist for {BATCHED_ENV_IDS}")
    return _ENV_CLASSES[env_id](n_envs, device)


def evaluate_policy_batched(
    env_id: str,
    policy: Callable[[th.Tensor], th.Tensor],
    n_episodes: int,
    generator: th.Generator,
    device: th.device | str = "cpu",
) -> th.Tensor:
    """Undiscounted returns of ``n_episodes`` episodes of ``policy``, all run in parallel (HANQ paper §11).

    One environment per episode, initial states drawn by :meth:`BatchedEnv.reset` from ``generator``. An episode
    ends when it terminates or after :attr:`BatchedEnv.max_episode_steps` steps (gymnasium's time limit); rewards
    after its end are not counted. Stops as soon as every episode has ended. The policy runs under
    ``torch.no_grad()``.

    :param env_id: One of :data:`BATCHED_ENV_IDS`.
    :param policy: Maps observations ``[n, observation_dim]`` (``float32``) to integer actions ``[n]``.
    :param n_episodes: Number of episodes (``>= 1``).
    :param generator: CPU generator for the initial states.
    :param device: Torch device to run on.
    :return: Returns ``[n_episodes]``, ``float64`` on ``device``.
    """
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, Integral) or n_episodes < 1:
        raise ValueError(f"n_episodes must be an integer >= 1, got {n_episodes!r}")
    env = make_batched_env(env_id, int(n_episodes), device)
    returns = th.zeros(env.n_envs, dtype=th.float64, device=env.device)
    done = th.zeros(env.n_envs, dtype=th.bool, device=env.device)
    with th.no_grad():
        obs = env.reset(generator)
        for _ in range(env.max_episode_steps):
            obs, reward, terminated = env.step(policy(obs))
            returns += th.where(done, 0.0, reward)
            done |= terminated
            if bool(done.all()):
                break
    return returns
