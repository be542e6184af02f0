"""Offline datasets, offline training and scores (HANQ paper §3.1, §4, §11, §11.1) against independent references."""

import csv
import json
import os

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_hanq  # noqa: F401  (registers DiscretePendulum-v1)
from sb3_hanq.offline import (
    RETURN_RANGES,
    OfflineDataset,
    ScoreCallback,
    collect_dataset,
    dataset_to_replay_buffer,
    normalized_score,
    train_offline,
    validate_dataset,
)

th.set_num_threads(1)
TORQUES = np.array([-2.0, 0.0, 2.0])


@pytest.fixture(scope="module")
def pendulum_data() -> OfflineDataset:
    return collect_dataset("DiscretePendulum-v1", 1000, seed=0)


def _ks_uniform(x: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``x`` and U[low, high]."""
    x = np.sort((x - low) / (high - low))
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - x).max(), (x - np.arange(n) / n).max()))


def _tiny_dataset(n: int = 64, seed: int = 0) -> OfflineDataset:
    return collect_dataset("DiscretePendulum-v1", n, seed=seed)


def _dqn(env="DiscretePendulum-v1", **kwargs) -> DQN:
    kwargs = {"learning_starts": 0, "batch_size": 16, "policy_kwargs": {"net_arch": [16]}, "seed": 0, **kwargs}
    return DQN("MlpPolicy", env, **kwargs)


# --- collect_dataset ------------------------------------------------------------------------------


def test_pendulum_dataset_layout(pendulum_data):
    d = pendulum_data
    assert len(d) == 1000 and d.env_id == "DiscretePendulum-v1"
    assert d.observations.shape == d.next_observations.shape == (1000, 3)
    assert d.actions.shape == (1000,) and d.actions.dtype == np.int64
    assert d.rewards.dtype == d.terminations.dtype == np.float32
    assert (d.terminations == 0).all()  # Pendulum never terminates
    np.testing.assert_allclose(d.observations[:, 0] ** 2 + d.observations[:, 1] ** 2, 1.0, atol=1e-5)


def test_pendulum_start_states_are_uniform():
    """``pendulum_start="uniform"``: one independent uniform start state per transition (§11),
    theta ~ U[-pi, pi), theta_dot ~ U[-8, 8]."""
    uniform = collect_dataset("DiscretePendulum-v1", 1000, seed=0, pendulum_start="uniform")
    obs = uniform.observations
    theta = np.arctan2(obs[:, 1], obs[:, 0])
    theta_dot = obs[:, 2]
    # KS critical value at alpha = 0.001 for n = 1000 is 1.95 / sqrt(1000) ~ 0.062
    assert _ks_uniform(theta, -np.pi, np.pi) < 0.062
    assert _ks_uniform(theta_dot, -8.0, 8.0) < 0.062
    assert theta.min() < -3.0 and theta.max() > 3.0
    assert theta_dot.min() < -7.8 and theta_dot.max() > 7.8
    quadrants = np.histogram2d(obs[:, 0], obs[:, 1], bins=[[-1, 0, 1], [-1, 0, 1]])[0]
    assert (quadrants > 200).all(), quadrants
    # consecutive rows are independent starts, not one trajectory
    assert not np.allclose(uniform.next_observations[:-1], obs[1:], atol=1e-3)


def test_pendulum_start_readings(pendulum_data):
    """``pendulum_start="reset"``: one transition from each standard reset (theta_dot ~ U[-1, 1]);
    ``"episodes"`` (the default): random-action trajectories of 200 steps from standard resets; ``"trajectory"``:
    one 1000-step trajectory from one standard reset; ``"uniform_episodes"``: 200-step episodes from uniform start
    states (theta_dot ~ U[-8, 8]); anything else is refused."""
    reset = collect_dataset("DiscretePendulum-v1", 1000, seed=0, pendulum_start="reset")
    theta = np.arctan2(reset.observations[:, 1], reset.observations[:, 0])
    assert _ks_uniform(theta, -np.pi, np.pi) < 0.062
    assert _ks_uniform(reset.observations[:, 2], -1.0, 1.0) < 0.062
    assert not np.allclose(reset.next_observations[:-1], reset.observations[1:], atol=1e-3)
    episodes = collect_dataset("DiscretePendulum-v1", 1000, seed=0, pendulum_start="episodes")
    chained = np.isclose(episodes.next_observations[:-1], episodes.observations[1:], atol=1e-6).all(axis=1)
    assert np.flatnonzero(~chained).tolist() == [199, 399, 599, 799]  # a new episode every 200 steps
    starts = episodes.observations[[0, 200, 400, 600, 800], 2]
    assert (np.abs(starts) <= 1.0).all()
    assert np.abs(episodes.observations[:, 2]).max() > 1.0  # the trajectories leave the reset's speeds
    for name in ("observations", "actions", "rewards", "next_observations", "terminations"):
        np.testing.assert_array_equal(getattr(pendulum_data, name), getattr(episodes, name), err_msg=name)
    trajectory = collect_dataset("DiscretePendulum-v1", 1000, seed=0, pendulum_start="trajectory")
    np.testing.assert_allclose(trajectory.next_observations[:-1], trajectory.observations[1:], atol=1e-6)  # one
    np.testing.assert_array_equal(trajectory.observations[:200], episodes.observations[:200])  # same start, actions
    assert abs(trajectory.observations[0, 2]) <= 1.0 and not np.array_equal(
        trajectory.observations, episodes.observations
    )
    assert trajectory.episode_ends().tolist() == [999]
    uniform_episodes = collect_dataset("DiscretePendulum-v1", 1000, seed=0, pendulum_start="uniform_episodes")
    chained = np.isclose(uniform_episodes.next_observations[:-1], uniform_episodes.observations[1:], atol=1e-6)
    assert np.flatnonzero(~chained.all(axis=1)).tolist() == [199, 399, 599, 799]  # 200-step episodes, as "episodes"
    np.testing.assert_array_equal(uniform_episodes.actions, episodes.actions)  # the same action stream
    speeds = collect_dataset("DiscretePendulum-v1", 4000, seed=1, pendulum_start="uniform_episodes").observations
    starts = speeds[::200, 2]  # 20 episode starts, theta_dot ~ U[-8, 8]: P(all 20 within [-1, 1]) = 8^-20
    assert np.abs(starts).max() > 1.0 and (np.abs(starts) <= 8.0).all()
    assert _ks_uniform(starts, -8.0, 8.0) < 0.43  # KS critical value at alpha = 0.001 for n = 20 (1.95 / sqrt(20))
    with pytest.raises(ValueError, match="pendulum_start"):
        collect_dataset("DiscretePendulum-v1", 10, pendulum_start="full")


def test_pendulum_actions_are_uniform(pendulum_data):
    counts = np.bincount(pendulum_data.actions, minlength=3)
    assert counts.sum() == 1000 and (counts > 280).all() and (counts < 390).all(), counts


def test_pendulum_rewards_and_dynamics_by_hand(pendulum_data):
    """Reward and next state recomputed from (theta, theta_dot, torque) with Pendulum's equations."""
    d = pendulum_data
    theta = np.arctan2(d.observations[:, 1], d.observations[:, 0]).astype(np.float64)
    theta_dot = d.observations[:, 2].astype(np.float64)
    u = TORQUES[d.actions]
    expected_reward = -(theta**2 + 0.1 * theta_dot**2 + 0.001 * u**2)  # theta already in [-pi, pi]
    np.testing.assert_allclose(d.rewards, expected_reward, rtol=1e-5, atol=1e-4)
    g, dt = 10.0, 0.05
    new_theta_dot = np.clip(theta_dot + (3 * g / 2 * np.sin(theta) + 3.0 * u) * dt, -8.0, 8.0)
    new_theta = theta + new_theta_dot * dt
    expected_next = np.stack([np.cos(new_theta), np.sin(new_theta), new_theta_dot], axis=1)
    np.testing.assert_allclose(d.next_observations, expected_next, atol=1e-4)


def test_collect_is_deterministic():
    for env_id in ("DiscretePendulum-v1", "CartPole-v1"):
        a, b = collect_dataset(env_id, 300, seed=3), collect_dataset(env_id, 300, seed=3)
        for name in ("observations", "actions", "rewards", "next_observations", "terminations"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{env_id} {name}")
        c = collect_dataset(env_id, 300, seed=4)
        assert not np.array_equal(a.observations, c.observations)


def test_episodic_dataset_matches_replay_with_truncation():
    """CartPole with a 7-step limit: replaying the dataset's actions in a fresh env reproduces every row,
    truncations keep the real final observation with termination 0, and the next row starts a new episode."""
    d = collect_dataset("CartPole-v1", 400, seed=5, env_kwargs={"max_episode_steps": 7})
    env = gym.make("CartPole-v1", max_episode_steps=7)
    obs, _ = env.reset(seed=5)
    n_truncated = n_terminated = 0
    for i in range(len(d)):
        np.testing.assert_array_equal(d.observations[i], obs)
        next_obs, reward, terminated, truncated, _ = env.step(int(d.actions[i]))
        np.testing.assert_array_equal(d.next_observations[i], next_obs)
        assert d.rewards[i] == reward and d.terminations[i] == float(terminated)
        n_truncated += truncated and not terminated
        n_terminated += terminated
        obs = env.reset()[0] if terminated or truncated else next_obs
        if (terminated or truncated) and i + 1 < len(d):
            assert not np.array_equal(d.observations[i + 1], next_obs)
    assert n_truncated > 10  # random CartPole episodes mostly outlive 7 steps


def test_terminations_are_true_terminations_only():
    """CartPole terminates when |x| > 2.4 or |theta| > 12 degrees: exactly the rows flagged 1."""
    d = collect_dataset("CartPole-v1", 600, seed=1)
    x, angle = d.next_observations[:, 0], d.next_observations[:, 2]
    out_of_bounds = (np.abs(x) > 2.4) | (np.abs(angle) > 12 * 2 * np.pi / 360)
    np.testing.assert_array_equal(d.terminations, out_of_bounds.astype(np.float32))
    assert d.terminations.sum() > 5


def test_collect_box_actions():
    d = collect_dataset("Pendulum-v1", 50, seed=0)
    assert d.actions.shape == (50, 1) and d.actions.dtype == np.float32
    assert np.abs(d.actions).max() <= 2.0
    theta = np.arctan2(d.observations[:, 1], d.observations[:, 0])
    expected = -(theta**2 + 0.1 * d.observations[:, 2] ** 2 + 0.001 * d.actions[:, 0] ** 2)
    np.testing.assert_allclose(d.rewards, expected, rtol=1e-5, atol=1e-4)


# --- OfflineDataset: validation, save/load ---------------------------------------------------------


def test_constructor_names_bad_field():
    d = _tiny_dataset(10)
    fields = {k: getattr(d, k) for k in ("observations", "actions", "rewards", "next_observations", "terminations")}
    with pytest.raises(ValueError, match="rewards: expected 10 samples.*got 9"):
        OfflineDataset(**{**fields, "rewards": fields["rewards"][:9]}, env_id="x")
    with pytest.raises(ValueError, match=r"next_observations: expected shape \(10, 3\).*got \(10, 2\)"):
        OfflineDataset(**{**fields, "next_observations": fields["next_observations"][:, :2]}, env_id="x")
    with pytest.raises(ValueError, match="terminations: expected only 0.0 and 1.0"):
        OfflineDataset(**{**fields, "terminations": np.full(10, 0.5)}, env_id="x")
    with pytest.raises(ValueError, match=r"rewards: expected shape \(10,\)"):
        OfflineDataset(**{**fields, "rewards": np.zeros((10, 1))}, env_id="x")


def test_save_load_round_trip(tmp_path, pendulum_data):
    path = pendulum_data.save(tmp_path / "data")
    assert path.endswith(".npz") and os.path.exists(path)
    loaded = OfflineDataset.load(path)
    assert loaded.env_id == pendulum_data.env_id and len(loaded) == len(pendulum_data)
    for name in ("observations", "actions", "rewards", "next_observations", "terminations"):
        original, copy = getattr(pendulum_data, name), getattr(loaded, name)
        np.testing.assert_array_equal(copy, original)
        assert copy.dtype == original.dtype
    with np.load(path, allow_pickle=False) as raw:  # plain arrays only
        assert json.loads(str(raw["metadata"])) == {
            "format_version": 1,
            "env_id": "DiscretePendulum-v1",
            "n_samples": 1000,
        }


def _write(path, data: OfflineDataset, drop=(), **override):
    arrays = {k: getattr(data, k) for k in ("observations", "actions", "rewards", "next_observations", "terminations")}
    arrays["metadata"] = np.array(json.dumps({"format_version": 1, "env_id": data.env_id, "n_samples": len(data)}))
    arrays.update(override)
    for key in drop:
        arrays.pop(key)
    np.savez(path, **arrays)
    return path


def test_load_rejects_bad_files(tmp_path):
    d = _tiny_dataset(10)
    with pytest.raises(ValueError, match="missing key.*rewards"):
        OfflineDataset.load(_write(tmp_path / "a.npz", d, drop=("rewards",)))
    with pytest.raises(ValueError, match="format_version"):
        bad = json.dumps({"format_version": 99, "env_id": "x", "n_samples": 10})
        OfflineDataset.load(_write(tmp_path / "b.npz", d, metadata=np.array(bad)))
    with pytest.raises(ValueError, match="actions: expected 10 samples"):
        OfflineDataset.load(_write(tmp_path / "c.npz", d, actions=d.actions[:5]))
    with pytest.raises(ValueError, match="n_samples"):
        bad = json.dumps({"format_version": 1, "env_id": "x", "n_samples": 11})
        OfflineDataset.load(_write(tmp_path / "d.npz", d, metadata=np.array(bad)))
    with pytest.raises(ValueError, match="metadata"):
        OfflineDataset.load(_write(tmp_path / "e.npz", d, metadata=np.zeros(3)))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip file")
    with pytest.raises(ValueError, match="not an OfflineDataset"):
        OfflineDataset.load(garbage)


UNPICKLED: list[bool] = []


def _record_unpickling() -> list[bool]:
    UNPICKLED.append(True)
    return UNPICKLED


class _Marker:
    """Unpickling this object calls ``_record_unpickling``: proof that pickle code ran."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_load_never_unpickles(tmp_path):
    d = _tiny_dataset(10)
    UNPICKLED.clear()
    with pytest.raises(ValueError, match="'rewards' cannot be read"):
        OfflineDataset.load(_write(tmp_path / "evil.npz", d, rewards=np.array([_Marker()] * 10, dtype=object)))
    assert UNPICKLED == []


def test_validate_dataset(pendulum_data):
    cartpole = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match=r"observations: expected per-sample shape \(4,\).*got \(3,\)"):
        validate_dataset(pendulum_data, cartpole.observation_space, cartpole.action_space)
    env = gym.make("DiscretePendulum-v1")
    validate_dataset(pendulum_data, env.observation_space, env.action_space)  # fits
    with pytest.raises(ValueError, match=r"actions: expected values in \[0, 1\].*got range \[0, 2\]"):
        validate_dataset(pendulum_data, env.observation_space, gym.spaces.Discrete(2))
    box = gym.make("Pendulum-v1").action_space
    with pytest.raises(ValueError, match=r"actions: expected per-sample shape \(1,\)"):
        validate_dataset(pendulum_data, env.observation_space, box)
    continuous = collect_dataset("Pendulum-v1", 20, seed=0)
    with pytest.raises(ValueError, match="actions: .*outside"):
        validate_dataset(continuous, env.observation_space, gym.spaces.Box(-1.0, 1.0, (1,)))
    with pytest.raises(TypeError, match="OfflineDataset"):
        validate_dataset({"observations": None}, env.observation_space, env.action_space)


# --- replay buffer ---------------------------------------------------------------------------------


def test_replay_buffer_samples_only_dataset_rows():
    d = _tiny_dataset(50)
    env = gym.make("DiscretePendulum-v1")
    buffer = dataset_to_replay_buffer(d, env.observation_space, env.action_space, "cpu")
    assert buffer.buffer_size == 50 and buffer.full and buffer.pos == 0 and buffer.size() == 50
    batch = buffer.sample(2000)
    obs = batch.observations.numpy()
    # each sampled row is one dataset row (observations are distinct floats, so they identify the row)
    index = np.array([np.flatnonzero((d.observations == row).all(axis=1)) for row in obs]).squeeze(1)
    np.testing.assert_array_equal(batch.actions.numpy()[:, 0], d.actions[index])
    np.testing.assert_array_equal(batch.next_observations.numpy(), d.next_observations[index])
    np.testing.assert_array_equal(batch.rewards.numpy()[:, 0], d.rewards[index])
    np.testing.assert_array_equal(batch.dones.numpy()[:, 0], d.terminations[index])
    assert len(np.unique(index)) == 50  # every row reachable


def test_replay_buffer_keeps_terminations():
    d = collect_dataset("CartPole-v1", 300, seed=1, env_kwargs={"max_episode_steps": 7})
    env = gym.make("CartPole-v1")
    buffer = dataset_to_replay_buffer(d, env.observation_space, env.action_space, "cpu")
    samples = buffer._get_samples(np.arange(300))
    np.testing.assert_array_equal(samples.dones.numpy()[:, 0], d.terminations)
    np.testing.assert_array_equal(samples.observations.numpy(), d.observations)


# --- train_offline ---------------------------------------------------------------------------------


class _StepCounter(gym.Wrapper):
    steps = 0

    def step(self, action):
        _StepCounter.steps += 1
        return super().step(action)


class _CountCalls(BaseCallback):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def _on_step(self) -> bool:
        self.calls += 1
        return True


def test_train_offline_counts_gradient_steps_and_evaluations():
    _StepCounter.steps = 0
    train_env = DummyVecEnv([lambda: _StepCounter(gym.make("DiscretePendulum-v1"))])
    model = _dqn(env=train_env)
    after_eval = _CountCalls()
    eval_env = gym.make("DiscretePendulum-v1", max_episode_steps=5)
    eval_cb = EvalCallback(
        eval_env, callback_after_eval=after_eval, n_eval_episodes=1, eval_freq=6, verbose=0, warn=False
    )
    train_offline(model, _tiny_dataset(), gradient_steps=20, callback=eval_cb)
    assert model._n_updates == 20 and model.num_timesteps == 20
    assert after_eval.calls == 20 // 6
    assert model._current_progress_remaining == pytest.approx(0.0)
    assert _StepCounter.steps == 0  # the training env is never stepped
    assert model.replay_buffer.buffer_size == 64
    # continuing a run counts on from the previous total
    train_offline(model, _tiny_dataset(), gradient_steps=7, callback=eval_cb, reset_num_timesteps=False)
    assert model._n_updates == 27 and model.num_timesteps == 27


class _TargetEqualsOnline(BaseCallback):
    def __init__(self):
        super().__init__()
        self.history: list[bool] = []

    def _on_step(self) -> bool:
        online, target = self.model.q_net.parameters(), self.model.q_net_target.parameters()
        self.history.append(all(th.equal(p, q) for p, q in zip(online, target, strict=True)))
        return True


def test_target_update_interval_counts_gradient_steps():
    model = _dqn(target_update_interval=5, tau=1.0, learning_rate=1e-2)
    tracker = _TargetEqualsOnline()
    train_offline(model, _tiny_dataset(), gradient_steps=10, callback=tracker)
    assert tracker.history == [False] * 4 + [True] + [False] * 4 + [True]


def test_callback_can_stop_training():
    class StopAt3(_CountCalls):
        def _on_step(self) -> bool:
            super()._on_step()
            return self.calls < 3

    model = _dqn()
    train_offline(model, _tiny_dataset(), gradient_steps=50, callback=StopAt3())
    assert model._n_updates == 3


def test_logger_dumps_every_log_interval(tmp_path):
    model = _dqn()
    model.set_logger(configure(str(tmp_path), ["csv"]))
    train_offline(model, _tiny_dataset(), gradient_steps=10, log_interval=4)
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["time/gradient_steps"]) for r in rows] == [4, 8, 10]  # and once at the end (issue #15)
    assert [int(r["train/n_updates"]) for r in rows] == [4, 8, 10]


def test_train_offline_box_actions_with_sac():
    model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=0, batch_size=8, policy_kwargs={"net_arch": [8]}, seed=0)
    train_offline(model, collect_dataset("Pendulum-v1", 32, seed=0), gradient_steps=3)
    assert model._n_updates == 3


def test_train_offline_rejects_bad_input():
    d = _tiny_dataset(16)
    with pytest.raises(TypeError, match="OffPolicyAlgorithm"):
        train_offline(PPO("MlpPolicy", "DiscretePendulum-v1", n_steps=16, batch_size=16), d, 1)
    model = _dqn()
    with pytest.raises(ValueError, match="gradient_steps"):
        train_offline(model, d, 0)
    with pytest.raises(ValueError, match="observations"):
        train_offline(model, collect_dataset("CartPole-v1", 16, seed=0), 1)
    assert model._n_updates == 0


# --- scores ----------------------------------------------------------------------------------------


def test_normalized_score_table_10():
    assert normalized_score(-200.0, "DiscretePendulum-v1") == pytest.approx(100.0)
    assert normalized_score(-1500.0, "Pendulum-v1") == pytest.approx(0.0)
    assert normalized_score(-850.0, "DiscretePendulum-v1") == pytest.approx(50.0)
    assert normalized_score(-300.0, "Acrobot-v1") == pytest.approx(50.0)
    assert normalized_score(-100.0, "Acrobot-v1") == pytest.approx(100.0)
    assert normalized_score(125.0, "CartPole-v1") == pytest.approx(25.0)
    assert normalized_score(150.0, "SeaquestNoFrameskip-v4") == pytest.approx(50.0)
    assert normalized_score(600.0, "ALE/Seaquest-v5") == pytest.approx(200.0)
    np.testing.assert_allclose(normalized_score([0.0, 250.0, 500.0], "CartPole-v1"), [0.0, 50.0, 100.0])
    assert isinstance(normalized_score(1.0, "CartPole-v1"), float)
    assert set(RETURN_RANGES) >= {"Pendulum-v1", "DiscretePendulum-v1", "Acrobot-v1", "CartPole-v1"}
    with pytest.raises(ValueError, match="known environments.*CartPole-v1"):
        normalized_score(0.0, "MountainCar-v0")


def test_score_callback(tmp_path):
    eval_env = gym.make("DiscretePendulum-v1", max_episode_steps=5)
    callback = ScoreCallback(eval_env, n_eval_episodes=2, eval_freq=4, log_path=str(tmp_path), verbose=0, warn=False)
    assert callback.env_id == "DiscretePendulum-v1"  # inferred from the spec
    assert np.isnan(callback.average_score)
    model = _dqn()
    model.set_logger(configure(str(tmp_path), ["csv"]))
    train_offline(model, _tiny_dataset(), gradient_steps=12, callback=callback, log_interval=0)
    assert [t for t, _ in callback.scores] == [4, 8, 12]
    # independent reference: EvalCallback's own saved returns, normalised by hand with Table 10
    expected = [100 * (np.mean(r) + 1500) / 1300 for r in callback.evaluations_results]
    np.testing.assert_allclose([s for _, s in callback.scores], expected)
    assert callback.average_score == pytest.approx(np.mean(expected))
    with open(tmp_path / "progress.csv") as f:
        logged = [float(r["eval/score"]) for r in csv.DictReader(f) if r.get("eval/score")]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)


def test_score_callback_env_id():
    cartpole = gym.make("CartPole-v1")
    assert ScoreCallback(cartpole, env_id="CartPole-v1").env_id == "CartPole-v1"
    with pytest.raises(ValueError, match="known environments"):
        ScoreCallback(gym.make("MountainCar-v0"))
