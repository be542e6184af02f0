"""Defects found by running the peers' test suites and bad input against our algorithms (issue #15, part)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch as th
from conftest import MatrixActionEnv
from gymnasium import spaces
from stable_baselines3 import TD3
from stable_baselines3.common.logger import Logger, make_output_format
from stable_baselines3.common.torch_layers import FlattenExtractor

from sb3_hanq import HANQ, SSAQ, STAC, CrossQWN, PreQN
from sb3_hanq.common.utils import NonFiniteLossError, divergence_hint
from sb3_hanq.offline import OfflineDataset, collect_dataset, train_offline
from sb3_hanq.stac import STACX


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


# --- issue #15, remaining items -------------------------------------------------------------------------------


def test_preqn_default_noise_has_the_action_shape_and_trains_like_td3():
    """Item 2: Appendix B's N(0, 0.1) noise is shaped like the actions; PreQN trains on a (2, 2) Box as TD3 does."""
    tiny = dict(learning_starts=10, batch_size=8, train_freq=5, gradient_steps=1, device="cpu", seed=0)
    model = PreQN("MlpPolicy", MatrixActionEnv(), policy_kwargs=dict(net_arch=[8]), **tiny)
    assert model.action_noise is not None and model.action_noise().shape == (2, 2)
    model.learn(30)
    assert model._n_updates == 4 and model.predict(np.zeros(3, np.float32))[0].shape == (2, 2)
    reference = TD3("MlpPolicy", MatrixActionEnv(), policy_kwargs=dict(net_arch=[8]), **tiny).learn(30)
    assert reference._n_updates == model._n_updates


ORIGINAL_KWARGS = {
    HANQ: ("CartPole-v1", dict(net_arch=[16])),
    SSAQ: ("CartPole-v1", dict(net_arch=[16], main_norm="layer")),
    CrossQWN: ("Pendulum-v1", dict(net_arch=[16], n_critics=2)),
    STAC: ("CartPole-v1", dict(net_arch=[16], head_arch=[8])),
    STACX: ("CartPole-v1", dict(net_arch=[16], head_arch=[8], optimizer_kwargs=dict(alpha=0.9))),
    PreQN: ("Pendulum-v1", dict(net_arch=[16], critic_activation="tanh")),
}


@pytest.mark.parametrize("cls", list(ORIGINAL_KWARGS), ids=lambda c: c.__name__)
def test_load_accepts_the_policy_kwargs_given_at_construction(cls, tmp_path):
    """Item 3: the constructors add keys to the stored policy_kwargs; load accepts the user's original dict,
    gives the same policy, and still refuses a dict that differs in a key the user set."""
    env_id, kwargs = ORIGINAL_KWARGS[cls]
    model = cls("MlpPolicy", env_id, policy_kwargs=dict(kwargs), seed=0, device="cpu")
    model.save(tmp_path / "m.zip")
    stored = dict(model.policy_kwargs)
    loaded = cls.load(tmp_path / "m.zip", policy_kwargs=dict(kwargs), device="cpu")
    assert loaded.policy_kwargs == stored  # the completed dict, exactly as a load without policy_kwargs gives
    for key, value in model.policy.state_dict().items():
        th.testing.assert_close(loaded.policy.state_dict()[key], value)
    # the stored (completed) dict itself is accepted too, and a file object is read twice without harm
    with open(tmp_path / "m.zip", "rb") as file:
        cls.load(file, policy_kwargs=stored, device="cpu")
    with pytest.raises(ValueError, match="policy kwargs"):
        cls.load(tmp_path / "m.zip", policy_kwargs={**kwargs, "net_arch": [17]}, device="cpu")


class BatchNormExtractor(FlattenExtractor):
    """Flattened observations through BatchNorm1d (running statistics)."""

    def __init__(self, observation_space: spaces.Space) -> None:
        super().__init__(observation_space)
        self.norm = th.nn.BatchNorm1d(self.features_dim)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.norm(super().forward(observations))


def test_preqn_refuses_a_batch_norm_features_extractor():
    """Item 4: the NTK is computed with torch.func, which forbids BatchNorm's in-place statistics updates:
    refused at construction, naming the argument, instead of a functorch error inside train()."""
    with pytest.raises(ValueError, match="features_extractor_class=BatchNormExtractor"):
        PreQN("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(features_extractor_class=BatchNormExtractor))
    # TD3 (with target networks and no NTK) takes the same extractor
    TD3("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(features_extractor_class=BatchNormExtractor, net_arch=[8]))


def _filled(cls, env_id: str, n: int = 64, **kwargs):
    """A model whose replay buffer holds ``n`` random transitions and which has not trained yet."""
    model = cls("MlpPolicy", env_id, learning_starts=10**6, batch_size=16, seed=0, device="cpu", **kwargs)
    model.learn(n)
    assert model._n_updates == 0
    return model


CONTINUOUS_TINY = {
    CrossQWN: dict(policy_kwargs=dict(net_arch=[16]), policy_delay=1),
    PreQN: dict(policy_kwargs=dict(net_arch=[16]), train_freq=1),
}


@pytest.mark.parametrize("cls", [CrossQWN, PreQN], ids=lambda c: c.__name__)
def test_continuous_algorithms_detect_a_non_finite_critic_loss_from_huge_rewards(cls):
    """Item 7: rewards x 1e30 make the squared TD error infinite at the first step: a NonFiniteLossError naming
    the algorithm, the loss, the step and the reward scale (not the learning rate); the model is restored,
    CrossQWN's batch-norm running statistics (updated by the failing forward pass) included."""
    model = _filled(cls, "Pendulum-v1", **CONTINUOUS_TINY[cls])
    model.replay_buffer.rewards *= 1e30
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(
        NonFiniteLossError, match=rf"{cls.__name__}: non-finite critic loss.* at gradient step 1\b"
    ) as err:
        model.train(gradient_steps=3, batch_size=16)
    assert "rewards of magnitude" in str(err.value) and "learning_rate" not in str(err.value)
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, before[key]), key


@pytest.mark.parametrize("cls", [CrossQWN, PreQN], ids=lambda c: c.__name__)
def test_continuous_algorithms_detect_non_finite_parameters(cls):
    """Item 7: a step that leaves non-finite weights (forced here after step 1) is reported within the same
    train() call as a NonFiniteLossError naming the step and the learning rate, not as an error deep inside
    torch.distributions (CrossQWN) or as an infinite logged loss (PreQN)."""
    model = _filled(cls, "Pendulum-v1", **CONTINUOUS_TINY[cls])
    actor_step = model.actor.optimizer.step

    def poisoning_step(*args, **kwargs):
        result = actor_step(*args, **kwargs)
        with th.no_grad():
            next(model.actor.parameters()).fill_(float("nan"))
        return result

    model.actor.optimizer.step = poisoning_step
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=rf"{cls.__name__}: non-finite .*gradient step 2.*learning_rate"):
        model.train(gradient_steps=5, batch_size=16)
    for key, value in model.policy.state_dict().items():  # the poisoned weights were not kept
        assert th.equal(value, weights[key]), key


def _optimizer_states(model) -> list[dict]:
    optimizers = [
        model.actor.optimizer,
        getattr(model.critic, "optimizer", None),
        getattr(model, "ent_coef_optimizer", None),
    ]
    return [copy.deepcopy(opt.state_dict()) for opt in optimizers if opt is not None]


def _assert_same_optimizer_states(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["param_groups"] == y["param_groups"]
        assert x["state"].keys() == y["state"].keys()
        for index, state in x["state"].items():
            for name, value in state.items():
                assert th.equal(th.as_tensor(y["state"][index][name]), th.as_tensor(value)), name


@pytest.mark.parametrize("cls", [CrossQWN, PreQN], ids=lambda c: c.__name__)
def test_continuous_divergence_error_leaves_the_model_as_before_the_call(cls):
    """Item 8 for the continuous algorithms: one NaN reward, drawn after some applied steps of a call, makes
    the error restore weights, batch-norm statistics, target critic, optimiser states, temperature, the update
    counter and PreQN's rejected-step count to their values at the start of the call."""
    model = _filled(cls, "Pendulum-v1", **CONTINUOUS_TINY[cls])
    model.train(gradient_steps=1, batch_size=16)  # a finite first step: the optimisers now have state
    model.replay_buffer.rewards[7] = np.nan  # drawn with probability 1 - (63/64)^16 ~ 0.22 per step
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    optimizers = _optimizer_states(model)
    temperature = None if getattr(model, "log_ent_coef", None) is None else model.log_ent_coef.detach().clone()
    rejected = getattr(model, "rejected_steps", None)
    with pytest.raises(NonFiniteLossError, match=r"restored to its state before gradient step 2 \(the start") as err:
        model.train(gradient_steps=200, batch_size=16)
    assert "at gradient step 2 " not in str(err.value)  # the failing step came later: applied steps were undone
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, weights[key]), key
    _assert_same_optimizer_states(_optimizer_states(model), optimizers)
    if temperature is not None:
        assert th.equal(model.log_ent_coef.detach(), temperature)
    assert model._n_updates == 1 and getattr(model, "rejected_steps", None) == rejected
    model.replay_buffer.rewards[7] = 0.0  # training goes on from the restored state
    model.train(gradient_steps=3, batch_size=16)
    assert model._n_updates == 4


@pytest.mark.parametrize("cls", [HANQ, SSAQ])
def test_divergence_error_leaves_the_model_as_before_the_call(cls):
    """Item 8: one NaN reward in the buffer is drawn after some applied steps of a call; the error restores
    weights, optimiser state and adapted learning rate to their values at the start of the call (after one good
    step), so the model holds no NaN."""
    model = _filled(cls, "CartPole-v1", hyper_lr=0.0 if cls is SSAQ else 0.1)
    model.replay_buffer.rewards[:] = 0.0
    model.train(gradient_steps=1, batch_size=16)  # a finite first step: the optimiser now has state
    model.replay_buffer.rewards[7] = np.nan  # drawn with probability 1 - (63/64)^16 ~ 0.22 per step
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    opt_state = copy.deepcopy(model.policy.optimizer.state_dict())
    with pytest.raises(NonFiniteLossError, match=rf"{cls.__name__}: non-finite loss .* restored") as err:
        model.train(gradient_steps=200, batch_size=16)
    assert "gradient step 2 (the start of this train() call)" in str(err.value)
    assert "at gradient step 2 " not in str(err.value)  # the failing step came later: applied steps were undone
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, weights[key]), key
    restored = model.policy.optimizer.state_dict()
    assert restored["param_groups"] == opt_state["param_groups"]  # includes HyperAdam's adapted lr
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            assert th.equal(th.as_tensor(restored["state"][index][name]), th.as_tensor(value)), name
    assert model._n_updates == 1
    # training goes on from there (and fails again the same way): the restored state is a usable one
    with pytest.raises(NonFiniteLossError):
        model.train(gradient_steps=200, batch_size=16)


def test_snapshot_of_an_optimiser_without_state_restores_an_empty_state():
    """Item 8: a failure in the very first call leaves Adam's state empty, as before any step."""
    model = _filled(HANQ, "CartPole-v1")
    model.replay_buffer.rewards[:] = np.nan
    with pytest.raises(NonFiniteLossError):
        model.train(gradient_steps=3, batch_size=16)
    assert len(model.policy.optimizer.state) == 0 and model.current_learning_rate == pytest.approx(10**-2.5)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (HANQ, dict(batch_size=0), "batch_size=0"),
        (SSAQ, dict(batch_size=0), "batch_size=0"),
        (CrossQWN, dict(batch_size=0), "batch_size=0"),
        (PreQN, dict(batch_size=0), "batch_size=0"),
        (CrossQWN, dict(policy_delay=0), "policy_delay=0"),
        (CrossQWN, dict(actor_weight_norm="yes"), "actor_weight_norm='yes'.*bool"),
        (STAC, dict(n_steps=0), "n_steps=0"),
        (STAC, dict(eta_init=float("nan")), "eta_init=nan"),
        (HANQ, dict(policy_kwargs=dict(net_arch=[0])), r"net_arch=\[0\]"),
        (SSAQ, dict(policy_kwargs=dict(net_arch=[8, -1])), r"net_arch=\[8, -1\]"),
        (CrossQWN, dict(policy_kwargs=dict(net_arch=dict(pi=[8], qf=[0]))), r"net_arch\['qf'\]=\[0\]"),
        (PreQN, dict(policy_kwargs=dict(net_arch=[-4])), r"net_arch=\[-4\]"),
        (STAC, dict(policy_kwargs=dict(net_arch=[0])), r"net_arch=\[0\]"),
        (STAC, dict(policy_kwargs=dict(head_arch=[0])), r"head_arch=\[0\]"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_degenerate_sizes_are_refused_naming_the_argument(cls, kwargs, message):
    """Item 11: sizes that used to crash deep inside (or train silently) are ValueErrors naming the argument."""
    env_id = "Pendulum-v1" if cls in (CrossQWN, PreQN) else "CartPole-v1"
    with pytest.raises(ValueError, match=message):
        cls("MlpPolicy", env_id, device="cpu", **kwargs)


@pytest.mark.parametrize(
    "reward, message",
    [(np.nan, "replay buffer holds non-finite rewards: the data are"), (1e30, "holds rewards of magnitude 1e\\+30")],
)
def test_the_hint_names_the_data_when_the_buffer_holds_nan_or_huge_rewards(reward, message):
    """Item 12: NaN or huge rewards in the buffer: the error blames the data, not the learning rate."""
    model = _filled(HANQ, "CartPole-v1")
    model.replay_buffer.rewards[:] = reward
    with pytest.raises(NonFiniteLossError, match=message) as err:
        model.train(gradient_steps=3, batch_size=16)
    assert "try a lower learning_rate" not in str(err.value)


def test_the_hint_names_the_learning_rate_when_the_data_are_fine():
    """Item 12: a far too large learning rate on finite, ordinary rewards: the error names the step size.
    (100: the per-state metapredictor, HANQ's default, still trains at 10 for these 200 steps.)"""
    model = _filled(HANQ, "CartPole-v1", learning_rate=100.0)
    with pytest.raises(NonFiniteLossError, match="step size is the likely cause: try a lower learning_rate"):
        model.train(gradient_steps=200, batch_size=16)
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())  # item 8: no NaN left behind


def test_divergence_hint_order():
    """Item 12: data first, then reward scale, then gamma, then the algorithm's own learning-rate advice."""
    ok = th.ones(4, 1)
    assert "non-finite observations" in divergence_hint(rewards=ok, observations=th.tensor([np.inf]), gamma=1.0)
    assert "rewards of magnitude 1e+09" in divergence_hint(rewards=ok * 1e9, gamma=1.0)
    assert "gamma=1.0" in divergence_hint(rewards=ok, gamma=1.0)
    assert divergence_hint(rewards=ok, gamma=0.99, learning_rate_hint="mine") == "mine"


def test_stac_hint_names_the_metaparameters_when_eta_is_not_finite():
    """Item 12: a non-finite metaparameter logit makes the inner loss NaN: the error names eta_init and
    meta_learning_rate (not the inner learning rate) and the update is not applied."""
    model = STAC("MlpPolicy", "CartPole-v1", n_steps=5, policy_kwargs=dict(net_arch=[8], head_arch=[8]), seed=0)
    model.learn(5)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with th.no_grad():
        model.eta[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="STAC: .* at update 2; the metaparameters .*meta_learning_rate"):
        model.train()
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, before[key]), key


@pytest.mark.parametrize("cls", [HANQ, SSAQ])
def test_non_finite_parameters_after_a_finite_loss_are_caught_and_undone(cls):
    """Item 7/8: the last step of a call leaves NaN weights although its loss was finite (forced here): the same
    call raises, names the parameters and the step size, and restores the weights."""
    model = _filled(cls, "CartPole-v1")
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    optimizer_step = model.policy.optimizer.step

    def poisoning_step(*args, **kwargs):
        result = optimizer_step(*args, **kwargs)
        with th.no_grad():
            next(model.policy.q_net.parameters()).fill_(float("nan"))
        return result

    model.policy.optimizer.step = poisoning_step
    with pytest.raises(NonFiniteLossError, match=r"non-finite parameters .* after gradient step 1 .*learning_rate"):
        model.train(gradient_steps=1, batch_size=16)
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, weights[key]), key


def test_stac_catches_an_update_that_overflows_the_parameters():
    """Item 7: learning_rate=1e38 makes theta' infinite while the inner loss at theta is finite: the error names
    the updated parameters and the inner step size, and the update is not applied."""
    model = STAC(
        "MlpPolicy", "CartPole-v1", n_steps=5, learning_rate=1e38, self_tune=(), policy_kwargs=dict(net_arch=[8])
    )
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"\(inner loss, updated parameter norm\).*inner step size") as err:
        model.learn(5)  # one rollout, then the first update
    assert "at update 1;" in str(err.value) and "metaparameters" not in str(err.value)
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, before[key]), key
