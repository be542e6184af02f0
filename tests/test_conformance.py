"""Conformance: the behaviours SB3's own test suites check for SB3's algorithms, checked for each of ours.

Every test is parametrised over HANQ, SSAQ, CrossQWN, PreQN, STAC and STACX, with networks of 8 units and a
few dozen environment steps, so that the module runs in seconds. Written for this package (issue #15);
SB3's and sb3-contrib's test files were read as references for *what* to check, not copied.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import MatrixActionEnv
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from sb3_hanq import HANQ, SSAQ, STAC, CrossQWN, PreQN
from sb3_hanq.stac import STACX

# Per algorithm: its home environment, tiny settings that train within a few steps, and whether it has a
# MultiInputPolicy. Schedules are constant (epsilon, learning rate) so that learning can be split in two calls.
SPECS: dict[type, dict[str, Any]] = {
    HANQ: dict(
        env="CartPole-v1",
        kwargs=dict(
            learning_starts=8,
            batch_size=8,
            train_freq=2,
            exploration_initial_eps=0.3,
            exploration_final_eps=0.3,
            policy_kwargs=dict(net_arch=[8]),
        ),
        multi_input=True,
    ),
    CrossQWN: dict(
        env="Pendulum-v1",
        kwargs=dict(learning_starts=8, batch_size=8, policy_delay=2, policy_kwargs=dict(net_arch=[8])),
        multi_input=False,
    ),
    PreQN: dict(
        env="Pendulum-v1",
        kwargs=dict(learning_starts=8, batch_size=8, train_freq=2, policy_kwargs=dict(net_arch=[8])),
        multi_input=True,
    ),
    STAC: dict(
        env="CartPole-v1",
        kwargs=dict(n_steps=4, learning_rate=1e-3, policy_kwargs=dict(net_arch=[8], head_arch=[8])),
        multi_input=True,
    ),
    STACX: dict(
        env="CartPole-v1",
        kwargs=dict(n_steps=4, learning_rate=1e-3, policy_kwargs=dict(net_arch=[8], head_arch=[8])),
        multi_input=True,
    ),
}
SPECS[SSAQ] = SPECS[HANQ]  # same settings (SSAQ subclasses HANQ)
ALGOS = list(SPECS)
STEPS = 24  # a multiple of every train_freq / n_steps above, past every learning_starts


def make(cls: type, seed: int = 0, env: Any = None, **overrides: Any) -> Any:
    spec = SPECS[cls]
    kwargs = {**spec["kwargs"], "policy_kwargs": dict(spec["kwargs"]["policy_kwargs"]), **overrides}
    return cls("MlpPolicy", spec["env"] if env is None else env, seed=seed, device="cpu", **kwargs)


def observations(model: Any, n: int, seed: int = 1) -> np.ndarray:
    space = model.observation_space
    space.seed(seed)
    return np.stack([space.sample() for _ in range(n)])


def state_tensors(model: Any) -> dict[str, th.Tensor]:
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def assert_same_state(a: dict[str, th.Tensor], b: dict[str, th.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert th.equal(a[key], b[key]), key


def params_changed(before: dict[str, th.Tensor], model: Any) -> bool:
    after = dict(model.policy.named_parameters())
    return any(not th.equal(before[k], p.detach()) for k, p in after.items())


class DictObservation(gym.ObservationWrapper):
    """Splits a flat Box observation into a Dict of two Boxes (for the MultiInputPolicy)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        box = env.observation_space
        assert isinstance(box, spaces.Box)
        half = box.shape[0] // 2
        self.half = half
        self.observation_space = spaces.Dict(
            {"a": spaces.Box(box.low[:half], box.high[:half]), "b": spaces.Box(box.low[half:], box.high[half:])}
        )

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        return {"a": observation[: self.half], "b": observation[self.half :]}


# --- save / load --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_save_load_gives_the_same_model_and_training_continues(cls, tmp_path):
    """Saved and loaded: every tensor of the policy, and the deterministic actions, are the same; learning goes
    on from the loaded file (more timesteps, more updates, parameters move)."""
    model = make(cls).learn(STEPS)
    obs = observations(model, 6)
    actions = model.predict(obs, deterministic=True)[0]
    model.save(tmp_path / "model.zip")
    loaded = cls.load(tmp_path / "model.zip", env=make_vec_env(SPECS[cls]["env"], n_envs=1, seed=3), device="cpu")
    assert_same_state(state_tensors(model), state_tensors(loaded))
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], actions)
    assert loaded._n_updates == model._n_updates and loaded.num_timesteps == STEPS
    before = {k: v.detach().clone() for k, v in loaded.policy.named_parameters()}
    loaded.learn(STEPS, reset_num_timesteps=False)
    assert loaded.num_timesteps == 2 * STEPS and loaded._n_updates > model._n_updates
    assert params_changed(before, loaded)


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_policy_saved_alone_loads_with_the_same_predictions(cls, tmp_path):
    """``policy.save`` / ``Policy.load`` (SB3 rebuilds it with a learning rate of 0): same actions and values."""
    model = make(cls).learn(STEPS)
    model.policy.save(tmp_path / "policy.pkl")
    policy = type(model.policy).load(tmp_path / "policy.pkl", device="cpu")
    obs = observations(model, 6)
    np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    assert_same_state(
        {k: v.detach() for k, v in policy.state_dict().items()}, {k: v for k, v in state_tensors(model).items()}
    )


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_load_with_env_and_the_original_policy_kwargs(cls, tmp_path):
    """``load(path, env=..., policy_kwargs=<the dict given at construction>)``: the env is the given one (two
    environments here, where the model was trained with one) and the model learns on it."""
    model = make(cls).learn(STEPS)
    model.save(tmp_path / "model.zip")
    env = make_vec_env(SPECS[cls]["env"], n_envs=2, seed=5)
    original = dict(SPECS[cls]["kwargs"]["policy_kwargs"])
    loaded = cls.load(tmp_path / "model.zip", env=env, policy_kwargs=original, device="cpu")
    assert loaded.get_env() is env and loaded.n_envs == 2
    loaded.learn(2 * STEPS, reset_num_timesteps=False)
    assert loaded.num_timesteps == 3 * STEPS and loaded._n_updates > model._n_updates


# --- determinism --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_seeded_runs_are_identical_and_seeds_matter(cls):
    """Two runs with one seed end with identical tensors; another seed gives other ones."""
    first, second, other = (make(cls, seed=s).learn(STEPS) for s in (7, 7, 8))
    assert_same_state(state_tensors(first), state_tensors(second))
    assert any(not th.equal(v, state_tensors(other)[k]) for k, v in state_tensors(first).items())


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_learning_in_two_calls_equals_learning_in_one(cls):
    """``learn(N)`` then ``learn(M, reset_num_timesteps=False)`` ends where ``learn(N + M)`` does. Only with
    constant schedules (SPECS sets epsilon and STAC's learning rate constant): a schedule follows the fraction
    of ``total_timesteps`` done, which the first of two calls counts against N instead of N + M."""
    split = make(cls, seed=3).learn(STEPS)
    split.learn(STEPS, reset_num_timesteps=False)
    whole = make(cls, seed=3).learn(2 * STEPS)
    assert split.num_timesteps == whole.num_timesteps and split._n_updates == whole._n_updates
    assert_same_state(state_tensors(split), state_tensors(whole))


# --- train / eval mode --------------------------------------------------------------------------------------


def running_statistics(model: Any) -> dict[str, th.Tensor]:
    return {k: v.clone() for k, v in model.policy.named_buffers() if "running_" in k or "ra_" in k}


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_predict_runs_in_eval_mode_and_leaves_statistics_alone(cls):
    """``predict`` puts every module in evaluation mode and changes no normalisation statistic."""
    model = make(cls).learn(STEPS)
    model.policy.set_training_mode(True)
    stats = running_statistics(model)
    model.predict(observations(model, 16), deterministic=False)
    assert not any(module.training for module in model.policy.modules())
    assert_same_state(stats, running_statistics(model))


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_training_updates_normalisation_statistics(cls):
    """Training updates every running statistic of batch normalisation (CrossQWN's BatchRenorm: the critics' and
    the target's at each step, the actor's at each actor update, i.e. once in ``policy_delay=2`` steps)."""
    model = make(cls).learn(STEPS)
    stats = running_statistics(model)
    if not stats:
        pytest.skip(f"{cls.__name__}'s default networks have no layer with running statistics")
    model.train(gradient_steps=2, batch_size=8)
    assert all(not th.equal(v, running_statistics(model)[k]) for k, v in stats.items() if "mean" in k)


# --- callbacks ----------------------------------------------------------------------------------------------


class CountingCallback(BaseCallback):
    """Counts SB3's callback events; stops training after ``stop_after`` steps when given."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.stop_after = stop_after
        self.counts = dict(training_start=0, training_end=0, rollout_start=0, rollout_end=0, step=0)

    def _on_training_start(self) -> None:
        self.counts["training_start"] += 1

    def _on_training_end(self) -> None:
        self.counts["training_end"] += 1

    def _on_rollout_start(self) -> None:
        self.counts["rollout_start"] += 1

    def _on_rollout_end(self) -> None:
        self.counts["rollout_end"] += 1

    def _on_step(self) -> bool:
        self.counts["step"] += 1
        return self.stop_after is None or self.counts["step"] < self.stop_after


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_callbacks_are_called_and_can_stop_training(cls):
    """One on_step per environment step, rollouts paired, training start/end once; returning False stops."""
    callback = CountingCallback()
    model = make(cls).learn(STEPS, callback=callback)
    counts = callback.counts
    assert counts["step"] == STEPS and model.num_timesteps == STEPS
    assert counts["training_start"] == counts["training_end"] == 1
    assert counts["rollout_start"] == counts["rollout_end"] >= 1
    stopper = CountingCallback(stop_after=5)
    model = make(cls).learn(STEPS, callback=stopper)
    assert stopper.counts["step"] == 5 and model.num_timesteps == 5


# --- predict ------------------------------------------------------------------------------------------------


def check_predictions(model: Any, obs_batch: Any, n: int) -> None:
    """Single observation: an action of the action space's shape; a batch: one per row, equal to the single ones."""
    shape = model.action_space.shape
    single = [
        model.predict(
            {k: v[i] for k, v in obs_batch.items()} if isinstance(obs_batch, dict) else obs_batch[i], deterministic=True
        )[0]
        for i in range(n)
    ]
    batched = model.predict(obs_batch, deterministic=True)[0]
    assert single[0].shape == shape and batched.shape == (n, *shape)
    np.testing.assert_allclose(batched, np.stack(single), rtol=1e-5, atol=1e-6)
    assert all(model.action_space.contains(np.asarray(a, dtype=model.action_space.dtype)) for a in batched)


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_predict_on_single_and_batched_box_observations(cls):
    model = make(cls).learn(STEPS)
    check_predictions(model, observations(model, 5), 5)


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_predict_on_single_and_batched_dict_observations(cls):
    """Dict observations through the MultiInputPolicy (where the algorithm has one), trained a few steps."""
    if not SPECS[cls]["multi_input"]:
        pytest.skip(f"{cls.__name__} has no MultiInputPolicy (sb3-contrib's CrossQ has none either)")
    spec = SPECS[cls]
    env = DictObservation(gym.make(spec["env"]))
    model = cls("MultiInputPolicy", env, seed=0, device="cpu", **spec["kwargs"]).learn(STEPS)
    assert model._n_updates > 0
    space = model.observation_space
    space.seed(2)
    samples = [space.sample() for _ in range(4)]
    check_predictions(model, {k: np.stack([s[k] for s in samples]) for k in samples[0]}, 4)


# --- action spaces ------------------------------------------------------------------------------------------

UNSUPPORTED = {
    HANQ: [spaces.Box(-1, 1, (2,)), spaces.MultiDiscrete([2, 3])],
    SSAQ: [spaces.Box(-1, 1, (2,)), spaces.MultiBinary(2)],
    CrossQWN: [spaces.Discrete(3), spaces.MultiDiscrete([2, 3])],
    PreQN: [spaces.Discrete(3), spaces.MultiBinary(2)],
    STAC: [spaces.MultiDiscrete([2, 3]), spaces.Box(-1, 1, (2, 2)), spaces.Box(-np.inf, np.inf, (2,))],
    STACX: [spaces.MultiBinary(2), spaces.Box(-1, 1, (2, 2))],
}


class ActionSpaceEnv(gym.Env):
    """A one-step env with a given action space (only its type and shape matter to the constructors)."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)

    def __init__(self, action_space: spaces.Space) -> None:
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(3, np.float32), 0.0, True, False, {}


@pytest.mark.parametrize(
    "cls, space", [(cls, space) for cls, spaces_ in UNSUPPORTED.items() for space in spaces_], ids=str
)
def test_unsupported_action_spaces_are_refused_clearly(cls, space):
    """A ValueError that names the algorithm and the offending space (SB3 itself only asserts)."""
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*(does not support|needs a bounded 1-D Box)"):
        cls("MlpPolicy", ActionSpaceEnv(space), device="cpu")


@pytest.mark.parametrize("cls", [CrossQWN, PreQN], ids=lambda c: c.__name__)
def test_continuous_algorithms_train_on_a_multi_dimensional_box(cls):
    """A (2, 2) Box action space: training runs its updates, actions come back as (2, 2) arrays in bounds."""
    model = make(cls, env=MatrixActionEnv()).learn(STEPS)
    assert model._n_updates > 0
    check_predictions(model, observations(model, 3), 3)


class ImageObservation(gym.ObservationWrapper):
    """A 36 x 36 grey image (NatureCNN's smallest input) whose rows encode the flat observation."""

    observation_space = spaces.Box(0, 255, (36, 36, 1), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        image = np.zeros((36, 36, 1), np.uint8)
        image[: len(observation), :, 0] = (np.clip(np.tanh(observation), -1, 1)[:, None] * 127 + 128).astype(np.uint8)
        return image


@pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)
def test_predict_on_single_and_batched_image_observations(cls):
    """Image observations through the CnnPolicy (where the algorithm has one), trained a few steps."""
    if "CnnPolicy" not in cls.policy_aliases:
        pytest.skip(f"{cls.__name__} has no CnnPolicy (sb3-contrib's CrossQ has none either)")
    spec = SPECS[cls]
    kwargs = {**spec["kwargs"], "policy_kwargs": {**spec["kwargs"]["policy_kwargs"]}}
    kwargs["policy_kwargs"]["features_extractor_kwargs"] = dict(features_dim=8)
    model = cls("CnnPolicy", ImageObservation(gym.make(spec["env"])), seed=0, device="cpu", **kwargs).learn(STEPS)
    assert model._n_updates > 0
    check_predictions(model, observations(model, 3), 3)
