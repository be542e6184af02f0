"""DiscretePendulum-v1 against an independently built Pendulum-v1 (HANQ paper §11 "Environments")."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.envs.classic_control.pendulum import PendulumEnv

import sb3_hanq  # noqa: F401  (registers DiscretePendulum-v1)
from sb3_hanq.common.envs import DiscreteActionWrapper, DiscretePendulumEnv, register_envs

TORQUES = (-2.0, 0.0, 2.0)


def test_registered_spec():
    env = gym.make("DiscretePendulum-v1")
    assert env.spec.id == "DiscretePendulum-v1"
    assert env.spec.max_episode_steps == 200
    assert env.action_space == spaces.Discrete(3)
    assert env.observation_space == gym.make("Pendulum-v1").observation_space
    assert isinstance(env.unwrapped, PendulumEnv)
    # an environment of its own, not a wrapper: the checkers (which look at env.unwrapped) see Discrete(3)
    assert isinstance(env.unwrapped, DiscretePendulumEnv)
    assert env.unwrapped.action_space == spaces.Discrete(3)


def test_passes_gymnasium_and_sb3_checkers_without_warnings(monkeypatch):
    import importlib.util
    import warnings

    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # "human" rendering without a display
    has_pygame = importlib.util.find_spec("pygame") is not None  # Pendulum renders with pygame
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(gym.make("DiscretePendulum-v1").unwrapped, skip_render_check=not has_pygame)
        sb3_check_env(gym.make("DiscretePendulum-v1").unwrapped)
        sb3_check_env(gym.make("DiscretePendulum-v1"))
    assert [str(w.message) for w in caught] == []


def test_rejects_invalid_actions():
    env = gym.make("DiscretePendulum-v1").unwrapped
    env.reset(seed=0)
    for bad in (3, -1, 1.5, np.array([0.0, 1.0])):
        with pytest.raises(ValueError, match="action must be an integer in"):
            env.step(bad)
    env.step(np.array([2]))  # a vectorised env's single action
    np.testing.assert_array_equal(env.torque(np.int64(0)), np.array([-2.0], dtype=np.float32))


def test_register_envs_is_idempotent():
    spec = gym.spec("DiscretePendulum-v1")
    register_envs()
    register_envs()
    assert gym.spec("DiscretePendulum-v1") is spec


@pytest.mark.parametrize("action", [0, 1, 2])
def test_action_matches_pendulum_torque(action):
    """Same start state, action i vs torque {-2, 0, 2}[i] in a separately made Pendulum-v1: identical step."""
    rng = np.random.default_rng(action)
    discrete, reference = gym.make("DiscretePendulum-v1"), gym.make("Pendulum-v1")
    np.testing.assert_array_equal(discrete.reset(seed=action)[0], reference.reset(seed=action)[0])  # same resets
    for _ in range(20):
        state = np.array([rng.uniform(-np.pi, np.pi), rng.uniform(-8.0, 8.0)])
        discrete.unwrapped.state = state.copy()
        reference.unwrapped.state = state.copy()
        obs, reward, terminated, truncated, _ = discrete.step(action)
        ref_obs, ref_reward, ref_terminated, ref_truncated, _ = reference.step(
            np.array([TORQUES[action]], dtype=np.float32)
        )
        np.testing.assert_array_equal(obs, ref_obs)
        assert reward == ref_reward
        assert (terminated, truncated) == (ref_terminated, ref_truncated)
        np.testing.assert_array_equal(discrete.unwrapped.state, reference.unwrapped.state)


def test_torques_have_opposite_effects():
    """From rest at the bottom (theta = pi), torque -2 / 0 / +2 gives angular velocity -, 0, +."""
    env = gym.make("DiscretePendulum-v1")
    env.reset(seed=0)
    velocities = []
    for action in range(3):
        env.unwrapped.state = np.array([np.pi, 0.0])
        obs, *_ = env.step(action)
        velocities.append(obs[2])
    # dtheta = 3 u dt (sin(pi) ~ 0): +-0.3 for u = +-2
    np.testing.assert_allclose(velocities, [-0.3, 0.0, 0.3], atol=1e-6)


def test_episode_truncates_after_200_steps():
    env = gym.make("DiscretePendulum-v1")
    env.reset(seed=0)
    for step in range(1, 201):
        _, _, terminated, truncated, _ = env.step(step % 3)
        assert not terminated
        assert truncated == (step == 200)


def test_wrapper_rejects_bad_input():
    with pytest.raises(ValueError, match="outside the action space"):
        DiscreteActionWrapper(PendulumEnv(), [-3.0, 0.0])
    with pytest.raises(ValueError, match="Box action space"):
        DiscreteActionWrapper(gym.make("CartPole-v1"), [0.0])
    with pytest.raises(ValueError, match="shape"):
        DiscreteActionWrapper(PendulumEnv(), [[0.0, 1.0]])
    env = DiscreteActionWrapper(PendulumEnv(), TORQUES)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="Invalid action"):
        env.step(3)


def test_wrapper_action_table():
    env = DiscreteActionWrapper(PendulumEnv(), [-1.5, 0.5])
    assert env.action_space == spaces.Discrete(2)
    np.testing.assert_array_equal(env.action(np.int64(0)), np.array([-1.5], dtype=np.float32))
    np.testing.assert_array_equal(env.action(1), np.array([0.5], dtype=np.float32))
    assert env.action(1).dtype == np.float32
