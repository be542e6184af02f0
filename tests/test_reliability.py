"""Defects found by running the peers' test suites and bad input against our algorithms (issue #15, part)."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import Logger, make_output_format

from sb3_hanq import HANQ, SSAQ, CrossQWN, PreQN
from sb3_hanq.offline import OfflineDataset, collect_dataset, train_offline


@pytest.mark.parametrize("cls", [HANQ, SSAQ])
def test_policy_saved_alone_loads(cls, tmp_path):
    """SB3 rebuilds a loaded policy with learning rate 0; HyperAdam accepts it and predictions are the same."""
    model = cls("MlpPolicy", "CartPole-v1", seed=0, device="cpu")
    model.policy.save(tmp_path / "p.pkl")
    loaded = type(model.policy).load(tmp_path / "p.pkl", device="cpu")
    obs = th.randn(5, 4)
    th.testing.assert_close(loaded.q_net(obs), model.policy.q_net(obs))


@pytest.mark.parametrize(
    "cls, env_id", [(HANQ, "CartPole-v1"), (SSAQ, "CartPole-v1"), (CrossQWN, "Pendulum-v1"), (PreQN, "Pendulum-v1")]
)
@pytest.mark.parametrize("gamma", [1.5, 2, -0.1, True])
def test_gamma_is_validated(cls, env_id, gamma):
    with pytest.raises(ValueError, match="gamma"):
        cls("MlpPolicy", env_id, gamma=gamma, device="cpu")


@pytest.mark.parametrize("field", ["observations", "rewards", "next_observations"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_dataset_with_non_finite_values_is_refused(field, value, tmp_path):
    data = collect_dataset("DiscretePendulum-v1", 20, seed=0)
    getattr(data, field).reshape(20, -1)[3, 0] = value
    with pytest.raises(ValueError, match=f"{field}: 1 sample"):
        OfflineDataset(
            data.observations, data.actions, data.rewards, data.next_observations, data.terminations, env_id=data.env_id
        )
    # a file holding such values is refused at load time
    np.savez_compressed(
        tmp_path / "bad.npz",
        metadata=np.array('{"format_version": 1, "env_id": "DiscretePendulum-v1", "n_samples": 20}'),
        observations=data.observations,
        actions=data.actions,
        rewards=data.rewards,
        next_observations=data.next_observations,
        terminations=data.terminations,
    )
    with pytest.raises(ValueError, match=field):
        OfflineDataset.load(tmp_path / "bad.npz")


def test_loading_another_algorithms_file_is_refused(tmp_path):
    HANQ("MlpPolicy", "CartPole-v1", device="cpu").save(tmp_path / "hanq.zip")
    SSAQ("MlpPolicy", "CartPole-v1", device="cpu").save(tmp_path / "ssaq.zip")
    with pytest.raises(ValueError, match="saved by HANQ"):
        SSAQ.load(tmp_path / "hanq.zip", device="cpu")
    with pytest.raises(ValueError, match="saved by SSAQ"):
        HANQ.load(tmp_path / "ssaq.zip", device="cpu")
    assert isinstance(HANQ.load(tmp_path / "hanq.zip", device="cpu"), HANQ)


def test_load_with_an_env_id_gives_sb3s_error(tmp_path):
    HANQ("MlpPolicy", "CartPole-v1", device="cpu").save(tmp_path / "m.zip")
    with pytest.raises(ValueError, match="not a Gymnasium environment"):
        HANQ.load(tmp_path / "m.zip", env="CartPole-v1")


def test_train_offline_dumps_the_last_steps_without_exploration_rate(tmp_path):
    """Fewer gradient steps than log_interval still write the scalars once; epsilon is not logged offline."""
    model = HANQ("MlpPolicy", "DiscretePendulum-v1", batch_size=16, device="cpu")
    model.set_logger(Logger(folder=str(tmp_path), output_formats=[make_output_format("csv", str(tmp_path))]))
    train_offline(model, collect_dataset("DiscretePendulum-v1", 50, seed=0), 5, log_interval=1000)
    header, *rows = (tmp_path / "progress.csv").read_text().strip().splitlines()
    assert len(rows) == 1 and "train/loss" in header and "time/gradient_steps" in header
    assert "rollout/exploration_rate" not in header
