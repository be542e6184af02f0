"""OfflineDataset <-> Minari (Farama's offline-RL format), on small datasets created locally (no download)."""

from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
import pytest

from sb3_hanq.common.extras import MissingExtraError
from sb3_hanq.offline import OfflineDataset, collect_dataset

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminations")


@pytest.fixture
def minari(tmp_path, monkeypatch):
    module = pytest.importorskip("minari", reason="needs the 'minari' extra: pip install -e '.[minari]'")
    pytest.importorskip("h5py", reason="Minari writes datasets with h5py (minari[hdf5])")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))  # a private local store
    return module


def _assert_same(a: OfflineDataset, b: OfflineDataset) -> None:
    assert a.env_id == b.env_id
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_episodes_round_trip_through_minari(minari):
    """CartPole with a 15-step limit: episodes end by termination and by truncation; both survive the trip."""
    data = collect_dataset("CartPole-v1", 300, seed=0, env_kwargs={"max_episode_steps": 15})
    stored = data.to_minari("sb3hanq/cartpole/random-v0", algorithm_name="uniform random")
    loaded = minari.load_dataset("sb3hanq/cartpole/random-v0")
    assert loaded.total_steps == 300 and stored.total_episodes == loaded.total_episodes
    episodes = list(loaded.iterate_episodes())
    assert len(episodes) == len(data.episode_ends())
    terminated = sum(bool(ep.terminations[-1]) for ep in episodes)
    truncated = sum(bool(ep.truncations[-1]) for ep in episodes)
    assert terminated > 0 and truncated > 0 and terminated + truncated == len(episodes)
    assert int(data.terminations.sum()) == terminated
    for ep in episodes:  # T + 1 observations for T steps; only the last step ends the episode
        assert len(ep.observations) == len(ep.actions) + 1
        assert not (ep.terminations[:-1].any() or ep.truncations[:-1].any())
        assert len(ep) <= 15
    _assert_same(OfflineDataset.from_minari(loaded), data)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_from_minari_reads_a_hand_built_dataset(minari):
    """Two episodes written directly with Minari's own API give the transitions read off by hand."""
    from minari.data_collector import EpisodeBuffer

    obs = [np.full(4, k, dtype=np.float32) for k in range(6)]
    buffers = [
        EpisodeBuffer(id=0, observations=obs[:3], actions=[0, 1], rewards=[1.0, 2.0],
                      terminations=[False, True], truncations=[False, False], infos={}),
        EpisodeBuffer(id=1, observations=obs[3:], actions=[1, 1], rewards=[3.0, 4.0],
                      terminations=[False, False], truncations=[False, True], infos={}),
    ]  # fmt: skip
    dataset = minari.create_dataset_from_buffers("sb3hanq/hand/built-v0", buffers, env="CartPole-v1")
    data = OfflineDataset.from_minari(dataset)
    np.testing.assert_array_equal(data.observations[:, 0], [0, 1, 3, 4])
    np.testing.assert_array_equal(data.next_observations[:, 0], [1, 2, 4, 5])
    np.testing.assert_array_equal(data.actions, [0, 1, 1, 1])
    np.testing.assert_array_equal(data.rewards, [1, 2, 3, 4])
    np.testing.assert_array_equal(data.terminations, [0, 1, 0, 0])  # a truncation still bootstraps
    assert data.env_id == "CartPole-v1"
    np.testing.assert_array_equal(data.episode_ends(), [1, 3])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_uniform_state_pendulum_data_is_refused_or_one_step_episodes(minari):
    data = collect_dataset("DiscretePendulum-v1", 40, seed=0, pendulum_start="uniform")
    assert len(data.episode_ends()) == 40  # every transition starts from its own uniformly drawn state
    with pytest.raises(ValueError, match="has no episodes.*one_step_episodes=True"):
        data.to_minari("sb3hanq/pendulum/uniform-v0")
    stored = data.to_minari("sb3hanq/pendulum/uniform-v0", one_step_episodes=True)
    assert stored.total_episodes == 40 and stored.total_steps == 40
    assert all(ep.truncations[-1] and not ep.terminations[-1] for ep in stored.iterate_episodes())
    loaded = OfflineDataset.from_minari(minari.load_dataset("sb3hanq/pendulum/uniform-v0"))
    _assert_same(loaded, data)
    assert isinstance(gym.make(loaded.env_id).action_space, gym.spaces.Discrete)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_default_pendulum_data_has_episodes_for_minari(minari):
    """The default ("episodes") Pendulum data: 200-step random-action episodes, stored without one_step_episodes."""
    data = collect_dataset("DiscretePendulum-v1", 400, seed=0)
    stored = data.to_minari("sb3hanq/pendulum/episodes-v0")
    assert stored.total_episodes == 2 and stored.total_steps == 400
    assert all(len(ep.actions) == 200 and ep.truncations[-1] for ep in stored.iterate_episodes())
    _assert_same(OfflineDataset.from_minari(minari.load_dataset("sb3hanq/pendulum/episodes-v0")), data)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_minari_dataset_trains_offline(minari):
    from stable_baselines3 import DQN

    from sb3_hanq.offline import train_offline

    collect_dataset("CartPole-v1", 200, seed=1).to_minari("sb3hanq/cartpole/train-v0")
    data = OfflineDataset.from_minari(minari.load_dataset("sb3hanq/cartpole/train-v0"))
    model = DQN("MlpPolicy", "CartPole-v1", batch_size=32, seed=0)
    train_offline(model, data, gradient_steps=20)
    assert model._n_updates == 20


def test_bad_input(minari):
    with pytest.raises(TypeError, match="dataset: expected a minari.MinariDataset"):
        OfflineDataset.from_minari("cartpole/random-v0")
    data = collect_dataset("CartPole-v1", 10, seed=0)
    with pytest.raises(ValueError, match="dataset_id"):
        data.to_minari("")
    with pytest.raises(TypeError, match="'env' is set by to_minari"):
        data.to_minari("sb3hanq/x/y-v0", env="CartPole-v1")


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "minari", None)  # as if minari were not installed
    data = collect_dataset("CartPole-v1", 10, seed=0)
    with pytest.raises(MissingExtraError, match=r"'minari' extra \(missing: minari\).*sb3-hanq\[minari\]") as info:
        data.to_minari("sb3hanq/x/y-v0")
    assert "\n" not in str(info.value)
    with pytest.raises(MissingExtraError, match="'minari' extra"):
        OfflineDataset.from_minari(object())
