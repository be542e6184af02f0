"""Batched torch environments (HANQ paper §11 "Environments") against gymnasium's own classic-control envs."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.envs.classic_control import acrobot
from gymnasium.envs.classic_control.pendulum import PendulumEnv

import sb3_hanq  # noqa: F401  (registers DiscretePendulum-v1)
from sb3_hanq.common.envs import PENDULUM_TORQUES
from sb3_hanq.population.envs import BATCHED_ENV_IDS, BatchedEnv, _wrap, evaluate_policy_batched, make_batched_env

N_ENVS = 16

#: Half-widths of gymnasium's reset distributions (pendulum.py, cartpole.py, acrobot.py).
RESET_HIGH = {
    "DiscretePendulum-v1": np.array([np.pi, 1.0]),
    "CartPole-v1": np.full(4, 0.05),
    "Acrobot-v1": np.full(4, 0.1),
}


def reference_env(env_id: str) -> gym.Env:
    """The unwrapped gymnasium env (no time limit); DiscretePendulum's torques are mapped in ``reference_action``."""
    env = PendulumEnv(g=10.0) if env_id == "DiscretePendulum-v1" else gym.make(env_id).unwrapped
    env.reset(seed=0)
    return env


def reference_action(env_id: str, action: int):
    if env_id == "DiscretePendulum-v1":
        # DiscreteActionWrapper feeds float32 torques, as Pendulum's Box(dtype=float32).
        return np.array([PENDULUM_TORQUES[action]], dtype=np.float32)
    return int(action)


def reference_obs(env_id: str, unwrapped: gym.Env) -> np.ndarray:
    if env_id == "DiscretePendulum-v1":
        return unwrapped._get_obs()
    if env_id == "Acrobot-v1":
        return unwrapped._get_ob()
    return np.array(unwrapped.state, dtype=np.float32)


def random_states(env_id: str, n: int, rng: np.random.Generator, velocity_scale: float = 0.5) -> np.ndarray:
    """States wider than the reset ranges, so that the whole of the dynamics (wrapping, clipping, ends) is used.

    Acrobot's velocities go up to ``velocity_scale`` times their bounds ``4 pi`` and ``9 pi``.
    """
    if env_id == "DiscretePendulum-v1":
        return np.stack([rng.uniform(-2 * np.pi, 2 * np.pi, n), rng.uniform(-8.0, 8.0, n)], axis=1)
    if env_id == "CartPole-v1":
        return np.stack(
            [rng.uniform(-2.0, 2.0, n), rng.uniform(-1.0, 1.0, n), rng.uniform(-0.15, 0.15, n), rng.uniform(-1, 1, n)],
            axis=1,
        )
    pi, v1, v2 = np.pi, 4 * np.pi * velocity_scale, 9 * np.pi * velocity_scale
    return np.stack(
        [rng.uniform(-pi, pi, n), rng.uniform(-pi, pi, n), rng.uniform(-v1, v1, n), rng.uniform(-v2, v2, n)], axis=1
    )


@pytest.mark.parametrize("env_id", BATCHED_ENV_IDS)
def test_step_matches_gymnasium(env_id):
    """Same states, same random actions for 100 steps: same observations, rewards and terminations as gymnasium.

    Terminated envs keep stepping on both sides (gymnasium integrates on), which also checks CartPole's reward 0
    after termination.
    """
    rng = np.random.default_rng(0)
    states = random_states(env_id, N_ENVS, rng)
    refs = [reference_env(env_id) for _ in range(N_ENVS)]
    for ref, state in zip(refs, states):
        ref.state = state.copy()
    env = make_batched_env(env_id, N_ENVS)
    obs = env.set_state(th.as_tensor(states))
    assert obs.dtype == th.float32 and obs.shape == (N_ENVS, env.observation_dim)
    np.testing.assert_allclose(obs.numpy(), np.stack([reference_obs(env_id, r) for r in refs]), atol=1e-6)
    ever_terminated = np.zeros(N_ENVS, dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CartPole warns about stepping after termination
        for _ in range(100):
            actions = rng.integers(0, env.n_actions, N_ENVS)
            obs, reward, terminated = env.step(th.as_tensor(actions))
            assert obs.dtype == th.float32 and reward.dtype == th.float64 and terminated.dtype == th.bool
            assert reward.shape == terminated.shape == (N_ENVS,)
            ref_steps = [ref.step(reference_action(env_id, a)) for ref, a in zip(refs, actions)]
            np.testing.assert_allclose(obs.numpy(), np.stack([s[0] for s in ref_steps]), rtol=0, atol=1e-5)
            np.testing.assert_allclose(reward.numpy(), [s[1] for s in ref_steps], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(terminated.numpy(), [s[2] for s in ref_steps])
            np.testing.assert_allclose(env.state.numpy(), np.stack([ref.state for ref in refs]), rtol=0, atol=1e-5)
            ever_terminated |= terminated.numpy()
    if env_id == "DiscretePendulum-v1":
        assert not ever_terminated.any()
    else:  # terminations were exercised
        assert ever_terminated.any()


@pytest.mark.parametrize("env_id", BATCHED_ENV_IDS)
def test_single_steps_match_gymnasium_tightly(env_id):
    """One step at a time from gymnasium's state (no chaotic drift), velocities up to their bounds: equal to 1e-12."""
    rng = np.random.default_rng(1)
    refs = [reference_env(env_id) for _ in range(N_ENVS)]
    for ref, state in zip(refs, random_states(env_id, N_ENVS, rng, velocity_scale=1.0)):
        ref.state = state.copy()
    env = make_batched_env(env_id, N_ENVS)
    ended = np.zeros(N_ENVS, dtype=bool)  # set_state starts new episodes; gymnasium's envs are not reset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(50):
            env.set_state(th.as_tensor(np.stack([ref.state for ref in refs])))
            actions = rng.integers(0, env.n_actions, N_ENVS)
            obs, reward, terminated = env.step(th.as_tensor(actions))
            ref_steps = [ref.step(reference_action(env_id, a)) for ref, a in zip(refs, actions)]
            np.testing.assert_allclose(env.state.numpy(), np.stack([ref.state for ref in refs]), rtol=0, atol=1e-12)
            np.testing.assert_allclose(obs.numpy(), np.stack([s[0] for s in ref_steps]), rtol=0, atol=1e-6)
            ref_reward = np.array([s[1] for s in ref_steps])
            np.testing.assert_allclose(reward.numpy()[~ended], ref_reward[~ended], rtol=0, atol=1e-12)
            np.testing.assert_array_equal(terminated.numpy(), [s[2] for s in ref_steps])
            ended |= terminated.numpy()


def test_wrap_matches_gymnasium_several_periods_away():
    values = np.concatenate([np.linspace(-7 * np.pi, 7 * np.pi, 1001), [-np.pi, np.pi, 3 * np.pi, -3 * np.pi]])
    wrapped = _wrap(th.as_tensor(values), -np.pi, np.pi).numpy()
    expected = np.array([acrobot.wrap(v, -np.pi, np.pi) for v in values])
    assert np.all(wrapped >= -np.pi) and np.all(wrapped <= np.pi)
    np.testing.assert_allclose(wrapped, expected, rtol=0, atol=1e-12)
    inside = np.abs(values) <= 3 * np.pi  # at most one period away: gymnasium's single shift, bit for bit
    np.testing.assert_array_equal(wrapped[inside], expected[inside])


@pytest.mark.parametrize("env_id", BATCHED_ENV_IDS)
def test_reset_draws_like_gymnasium(env_id):
    env = make_batched_env(env_id, 512)
    obs = env.reset(th.Generator().manual_seed(0))
    state = env.state.numpy()
    high = RESET_HIGH[env_id]
    assert state.dtype == np.float64 and state.shape == (512, env.state_dim)
    assert np.all(state >= -high) and np.all(state <= high)
    # Uniform over the whole range: the extremes come close to the bounds and the mean is near 0.
    np.testing.assert_array_less(-0.95 * high, state.max(axis=0))
    np.testing.assert_array_less(state.min(axis=0), 0.95 * -high)
    assert np.all(np.abs(state.mean(axis=0)) < 0.15 * high)
    assert len(np.unique(state, axis=0)) == 512  # every env draws its own state
    if env_id == "Acrobot-v1":  # gymnasium stores Acrobot's initial state as float32
        np.testing.assert_array_equal(state.astype(np.float32).astype(np.float64), state)
    # The observations are gymnasium's observations of those states.
    ref = reference_env(env_id)
    ref_obs = []
    for s in state[:8]:
        ref.state = s.copy()
        ref_obs.append(reference_obs(env_id, ref))
    np.testing.assert_array_equal(obs[:8].numpy(), np.stack(ref_obs))


@pytest.mark.parametrize("env_id", BATCHED_ENV_IDS)
def test_reset_is_reproducible(env_id):
    env = make_batched_env(env_id, 8)
    first = env.reset(th.Generator().manual_seed(3)).clone()
    first_state = env.state.clone()
    again = env.reset(th.Generator().manual_seed(3))
    assert th.equal(first, again) and th.equal(first_state, env.state)
    env.reset(th.Generator().manual_seed(4))
    assert not th.equal(first_state, env.state)


# Fixed policies (observation layouts: Pendulum (cos, sin, thetadot), CartPole (x, x_dot, theta, theta_dot),
# Acrobot (cos1, sin1, cos2, sin2, dtheta1, dtheta2)).
def pendulum_max_torque(obs):
    return th.full((obs.shape[0],), 2, dtype=th.long)


def pendulum_bang_bang(obs):
    return th.where(obs[:, 2] > 0, 2, 0)


def cartpole_left(obs):
    return th.zeros(obs.shape[0], dtype=th.long)


def cartpole_linear(obs):
    """Balances some episodes to the 500-step limit, drops the pole in others."""
    return (obs[:, 2] + 0.5 * obs[:, 3] + 0.2 * obs[:, 0] > 0).long()


def acrobot_no_torque(obs):
    return th.ones(obs.shape[0], dtype=th.long)


def acrobot_pump(obs):
    """Torque along the second joint's velocity: reaches the goal within ~120 steps."""
    return th.where(obs[:, 5] > 0, 2, 0)


POLICY_CASES = [
    ("DiscretePendulum-v1", pendulum_max_torque),
    ("DiscretePendulum-v1", pendulum_bang_bang),
    ("CartPole-v1", cartpole_left),
    ("CartPole-v1", cartpole_linear),
    ("Acrobot-v1", acrobot_no_torque),
    ("Acrobot-v1", acrobot_pump),
]


def gymnasium_returns(env_id, policy, initial_states):
    """Undiscounted returns from ``gym.make(env_id)`` (with its TimeLimit), one episode at a time."""
    returns = []
    env = gym.make(env_id)
    for state in initial_states:
        env.reset(seed=0)
        env.unwrapped.state = state.copy()
        obs = reference_obs(env_id, env.unwrapped)
        total, done = 0.0, False
        while not done:
            action = int(policy(th.as_tensor(obs)[None])[0])
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    return np.array(returns)


@pytest.mark.parametrize("env_id, policy", POLICY_CASES, ids=[p.__name__ for _, p in POLICY_CASES])
def test_evaluate_matches_gymnasium_episodes(env_id, policy):
    n_episodes = 8
    initial = make_batched_env(env_id, n_episodes)
    initial.reset(th.Generator().manual_seed(7))
    returns = evaluate_policy_batched(env_id, policy, n_episodes, th.Generator().manual_seed(7))
    assert returns.dtype == th.float64 and returns.shape == (n_episodes,)
    expected = gymnasium_returns(env_id, policy, initial.state.numpy())
    np.testing.assert_allclose(returns.numpy(), expected, rtol=0, atol=1e-6)


class CountingPolicy:
    def __init__(self, policy):
        self.policy, self.calls = policy, 0

    def __call__(self, obs):
        self.calls += 1
        return self.policy(obs)


def test_evaluate_pendulum_covers_exactly_200_steps():
    policy = CountingPolicy(pendulum_bang_bang)
    returns = evaluate_policy_batched("DiscretePendulum-v1", policy, 4, th.Generator().manual_seed(1))
    assert policy.calls == 200
    # Same as summing 200 steps of the batched env by hand: the 201st reward is not counted.
    env = make_batched_env("DiscretePendulum-v1", 4)
    obs = env.reset(th.Generator().manual_seed(1))
    rewards = []
    for _ in range(201):
        obs, reward, _ = env.step(pendulum_bang_bang(obs))
        rewards.append(reward)
    rewards = th.stack(rewards)
    th.testing.assert_close(returns, rewards[:200].sum(dim=0), rtol=0, atol=1e-9)
    assert not th.allclose(returns, rewards.sum(dim=0))


@pytest.mark.parametrize(
    "env_id, policy, max_calls",
    [("CartPole-v1", cartpole_linear, 500), ("CartPole-v1", cartpole_left, 20), ("Acrobot-v1", acrobot_no_torque, 500)],
    ids=["cartpole_linear", "cartpole_left", "acrobot_no_torque"],
)
def test_evaluate_truncates_and_stops_early(env_id, policy, max_calls):
    counting = CountingPolicy(policy)
    returns = evaluate_policy_batched(env_id, counting, 16, th.Generator().manual_seed(2))
    assert counting.calls <= max_calls
    if env_id == "CartPole-v1":
        # Reward 1 per step: the returns are the episode lengths, the last episode ends at the last call.
        assert returns.max() <= 500 and returns.min() >= 1
        assert counting.calls == int(returns.max())
        th.testing.assert_close(returns, returns.round())
    else:  # no torque never reaches the goal: every episode is cut at 500 steps
        assert counting.calls == 500
        assert th.all(returns == -500.0)


def test_make_batched_env_unknown_id():
    with pytest.raises(ValueError, match="Pendulum-v1.*DiscretePendulum-v1.*CartPole-v1.*Acrobot-v1"):
        make_batched_env("Pendulum-v1", 4)
    with pytest.raises(ValueError, match="env_id"):
        evaluate_policy_batched("MountainCar-v0", cartpole_left, 4, th.Generator())


@pytest.mark.parametrize("n_envs", [0, -3, 2.5, True])
def test_bad_n_envs(n_envs):
    with pytest.raises(ValueError, match="n_envs"):
        make_batched_env("CartPole-v1", n_envs)


@pytest.mark.parametrize("n_episodes", [0, -1])
def test_bad_n_episodes(n_episodes):
    with pytest.raises(ValueError, match="n_episodes"):
        evaluate_policy_batched("CartPole-v1", cartpole_left, n_episodes, th.Generator())


@pytest.mark.parametrize("env_id", BATCHED_ENV_IDS)
@pytest.mark.parametrize(
    "make_actions",
    [
        lambda n, k: th.full((n,), k, dtype=th.long),  # one past the last action
        lambda n, k: th.full((n,), -1, dtype=th.long),
        lambda n, k: th.zeros(n, dtype=th.float32),
        lambda n, k: th.zeros(n + 1, dtype=th.long),
        lambda n, k: [0] * n,
    ],
    ids=["too_high", "negative", "float", "wrong_shape", "not_tensor"],
)
def test_bad_actions(env_id, make_actions):
    env = make_batched_env(env_id, 4)
    env.reset(th.Generator().manual_seed(0))
    state = env.state.clone()
    with pytest.raises(ValueError, match="actions"):
        env.step(make_actions(4, env.n_actions))
    assert th.equal(env.state, state)  # a rejected step leaves the state alone


def test_bad_state_and_step_before_reset():
    env = make_batched_env("Acrobot-v1", 4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(th.zeros(4, dtype=th.long))
    with pytest.raises(ValueError, match="state"):
        env.set_state(th.zeros(4, 3))
    assert isinstance(env, BatchedEnv) and env.max_episode_steps == 500


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("env_id, policy", POLICY_CASES, ids=[p.__name__ for _, p in POLICY_CASES])
def test_cuda_matches_cpu(env_id, policy):
    cpu = evaluate_policy_batched(env_id, policy, 8, th.Generator().manual_seed(5))
    cuda = evaluate_policy_batched(env_id, policy, 8, th.Generator().manual_seed(5), device="cuda")
    assert cuda.device.type == "cuda"
    th.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-6)
