"""Offline RL: fixed datasets, training on them with any SB3 off-policy algorithm, and the papers' scores.

The HANQ paper trains every algorithm on a fixed dataset of uniformly random actions (§3.1, §4.1,
§11 "Offline dataset construction") and reports a normalised *score* averaged over all gradient
steps (§4, §11.1). This module holds those pieces once:

- :class:`OfflineDataset` (+ ``.npz`` save/load without pickle) and :func:`collect_dataset`;
- :func:`dataset_to_replay_buffer` and :func:`train_offline`, which runs ``gradient_steps`` updates of
  an SB3 ``OffPolicyAlgorithm`` on the dataset with SB3's logger and callbacks;
- :data:`RETURN_RANGES`, :func:`normalized_score` and :class:`ScoreCallback` (Table 10).
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from gymnasium.envs.classic_control.pendulum import PendulumEnv
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv

from sb3_hanq.common.envs import register_envs
from sb3_hanq.common.extras import require_extra

SelfOffPolicyAlgorithm = TypeVar("SelfOffPolicyAlgorithm", bound=OffPolicyAlgorithm)

#: Version of the ``.npz`` layout written by :meth:`OfflineDataset.save`.
DATASET_FORMAT_VERSION = 1

_ARRAY_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminations")


@dataclass
class OfflineDataset:
    """A fixed set of transitions ``(s, a, r, s', terminated)`` from one environment.

    :param observations: ``[N, *obs_shape]``, dtype of the observation space (``float32`` for classic control).
    :param actions: ``[N]`` integers (``int64``) for ``Discrete`` actions, ``[N, *action_shape]`` otherwise.
    :param rewards: ``[N]``, stored as ``float32``.
    :param next_observations: ``[N, *obs_shape]``, the observation returned by ``step`` (the real final
        observation when the episode was truncated by a time limit).
    :param terminations: ``[N]`` ``float32``, ``1.0`` only for a true termination; ``0.0`` for a time-limit
        truncation, so that the target still bootstraps from ``s'``.
    :param env_id: Gymnasium id of the environment the data comes from.

    **File format** (:meth:`save` / :meth:`load`): one ``.npz`` archive (``np.savez_compressed``) with the
    five arrays above under their field names (same dtypes and shapes) plus ``metadata``, a 0-d numpy
    unicode array holding the JSON object ``{"format_version": 1, "env_id": str, "n_samples": N}``.
    Nothing is pickled, so :meth:`load` reads it with ``allow_pickle=False``.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminations: np.ndarray
    env_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.env_id, str):
            raise ValueError(f"env_id: expected a str, got {type(self.env_id).__name__}")
        for name in _ARRAY_FIELDS:
            value = np.asarray(getattr(self, name))
            if value.dtype == object:
                raise ValueError(f"{name}: expected a numeric array, got dtype=object")
            if value.ndim < 1:
                raise ValueError(f"{name}: expected an array with a leading sample axis, got shape {value.shape}")
            setattr(self, name, value)
        n = len(self.observations)
        if n < 1:
            raise ValueError("observations: expected at least one transition, got 0")
        for name in _ARRAY_FIELDS:
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(f"{name}: expected {n} samples (as many as observations), got {got}")
        if self.next_observations.shape != self.observations.shape:
            raise ValueError(
                f"next_observations: expected shape {self.observations.shape} (same as observations), "
                f"got {self.next_observations.shape}"
            )
        for name in ("rewards", "terminations"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ValueError(f"{name}: expected shape ({n},), got {value.shape}")
            setattr(self, name, value.astype(np.float32, copy=False))
        if not np.isin(self.terminations, (0.0, 1.0)).all():
            raise ValueError("terminations: expected only 0.0 and 1.0 values")
        for name in ("observations", "rewards", "next_observations", "actions"):
            value = getattr(self, name)
            if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).reshape(n, -1).any(axis=1).sum())
                raise ValueError(f"{name}: {bad} sample(s) hold NaN or infinite values; remove or fix them")

    def __len__(self) -> int:
        return len(self.observations)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the dataset to a compressed ``.npz`` (format in the class docstring).

        :return: The path written (``np.savez_compressed`` appends ``.npz`` when missing).
        """
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        metadata = {"format_version": DATASET_FORMAT_VERSION, "env_id": self.env_id, "n_samples": len(self)}
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        np.savez_compressed(path, metadata=np.array(json.dumps(metadata)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OfflineDataset:
        """Read a file written by :meth:`save` (never unpickles). ``ValueError`` names what is wrong."""
        try:
            archive = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{os.fspath(path)!r} is not an OfflineDataset .npz file: {err}") from err
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{os.fspath(path)!r} is a single .npy array, not an OfflineDataset .npz archive")
        with archive:
            missing = [key for key in ("metadata", *_ARRAY_FIELDS) if key not in archive.files]
            if missing:
                raise ValueError(f"{os.fspath(path)!r}: missing key(s) {missing} (found {sorted(archive.files)})")
            loaded: dict[str, np.ndarray] = {}
            for key in ("metadata", *_ARRAY_FIELDS):
                try:
                    loaded[key] = archive[key]
                except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
                    raise ValueError(f"{os.fspath(path)!r}: key {key!r} cannot be read: {err}") from err
        raw = loaded.pop("metadata")
        if raw.dtype.kind != "U" or raw.ndim != 0:
            raise ValueError(f"metadata: expected a 0-d unicode array, got dtype={raw.dtype} shape={raw.shape}")
        try:
            metadata = json.loads(str(raw))
        except json.JSONDecodeError as err:
            raise ValueError(f"metadata: not valid JSON ({err})") from err
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata: expected a JSON object, got {type(metadata).__name__}")
        for key in ("format_version", "env_id", "n_samples"):
            if key not in metadata:
                raise ValueError(f"metadata: missing key {key!r}")
        if metadata["format_version"] != DATASET_FORMAT_VERSION:
            raise ValueError(
                f"metadata: format_version {metadata['format_version']!r} is not supported "
                f"(expected {DATASET_FORMAT_VERSION})"
            )
        dataset = cls(env_id=metadata["env_id"], **loaded)
        if metadata["n_samples"] != len(dataset):
            raise ValueError(f"metadata: n_samples={metadata['n_samples']!r} but the arrays hold {len(dataset)}")
        return dataset

    def episode_ends(self) -> np.ndarray:
        """Indices of the transitions that end an episode, in order (the last transition always does).

        Transition ``i`` ends an episode when it terminates or when transition ``i + 1`` does not start from its
        next observation (a reset, e.g. after a time-limit truncation, or data without episodes).
        """
        n = len(self)
        flat_obs = self.observations.reshape(n, -1)
        flat_next = self.next_observations.reshape(n, -1)
        continues = (self.terminations[:-1] == 0.0) & (flat_next[:-1] == flat_obs[1:]).all(axis=1)
        return np.flatnonzero(np.append(~continues, True))

    def to_minari(
        self,
        dataset_id: str,
        one_step_episodes: bool = False,
        **create_kwargs: Any,
    ) -> Any:
        """Write the data as a local `Minari <https://minari.farama.org>`_ dataset (needs the ``minari`` extra).

        Each episode of :meth:`episode_ends` becomes one Minari episode: its ``T`` transitions give ``T + 1``
        observations, ``T`` actions, rewards, terminations and truncations; an episode that ends without a
        termination is marked truncated (a time limit, or the end of the data). The dataset is created with
        ``minari.create_dataset_from_buffers`` in Minari's local store (``MINARI_DATASETS_PATH``), with
        ``env=self.env_id``.

        Data without episodes, where no transition starts from the previous one's next observation (the
        ``"uniform"`` and ``"reset"`` Pendulum readings of :func:`collect_dataset`: one fresh start state per
        transition), is refused unless ``one_step_episodes=True``, which stores each transition as a one-step
        truncated episode.

        :param dataset_id: Minari id, ``(namespace/)(env_name/)dataset_name-v<version>``.
        :param one_step_episodes: Accept data without episodes as one-step episodes.
        :param create_kwargs: Passed to ``minari.create_dataset_from_buffers`` (``algorithm_name``, ``author``,
            ``description``, ...).
        :return: The ``minari.MinariDataset`` written.
        """
        require_extra("minari", ["minari", "h5py"], "OfflineDataset.to_minari")
        import minari
        from minari.data_collector import EpisodeBuffer

        if not isinstance(dataset_id, str) or not dataset_id:
            raise ValueError(f"dataset_id: expected a non-empty str, got {dataset_id!r}")
        for key in ("buffer", "env", "dataset_id"):
            if key in create_kwargs:
                raise TypeError(f"create_kwargs: {key!r} is set by to_minari itself")
        ends = self.episode_ends()
        lengths = np.diff(np.append(-1, ends))
        if len(self) > 1 and (lengths == 1).all() and not self.terminations.all() and not one_step_episodes:
            raise ValueError(
                "this dataset has no episodes: no transition starts from the previous one's next observation (as in "
                "collect_dataset's 'uniform' or 'reset' Pendulum data, one fresh start state per transition), so "
                "Minari episodes cannot be rebuilt; pass one_step_episodes=True to store each transition as a one-step "
                "truncated episode"
            )
        buffers = []
        start = 0
        for episode, end in enumerate(ends):
            rows = slice(start, end + 1)
            terminated = self.terminations[rows].astype(bool)
            truncated = np.zeros_like(terminated)
            truncated[-1] = not terminated[-1]
            observations = np.concatenate([self.observations[rows], self.next_observations[end : end + 1]])
            buffers.append(
                EpisodeBuffer(
                    id=episode,
                    observations=list(observations),
                    actions=list(self.actions[rows]),
                    rewards=[float(r) for r in self.rewards[rows]],
                    terminations=terminated.tolist(),
                    truncations=truncated.tolist(),
                    infos={},
                )
            )
            start = end + 1
        register_envs()
        create_kwargs.setdefault("description", f"sb3-hanq OfflineDataset: {len(self)} transitions of {self.env_id}")
        return minari.create_dataset_from_buffers(dataset_id, buffers, env=self.env_id, **create_kwargs)

    @classmethod
    def from_minari(cls, dataset: Any, env_id: str | None = None) -> OfflineDataset:
        """The transitions of a ``minari.MinariDataset`` (e.g. ``minari.load_dataset(id)``), episode after episode.

        An episode of ``T`` steps gives ``T`` transitions ``(o_t, a_t, r_t, o_{t+1}, terminated_t)``; truncations
        keep ``terminations = 0`` so that the target still bootstraps from ``o_{t+1}``.

        :param dataset: A ``MinariDataset`` with array (``Box``/``Discrete``/...) observations and actions.
        :param env_id: Gymnasium id to record; by default the id of the dataset's environment spec.
        """
        require_extra("minari", ["minari", "h5py"], "OfflineDataset.from_minari")
        from minari import MinariDataset

        if not isinstance(dataset, MinariDataset):
            raise TypeError(f"dataset: expected a minari.MinariDataset, got {type(dataset).__name__}")
        if env_id is None:
            env_spec = dataset.spec.env_spec
            if env_spec is None:
                raise ValueError(
                    f"env_id: the Minari dataset {dataset.spec.dataset_id!r} records no environment; pass env_id="
                )
            env_id = env_spec.id
        for name, space in (("observation", dataset.observation_space), ("action", dataset.action_space)):
            if not isinstance(space, spaces.Box | spaces.Discrete | spaces.MultiDiscrete | spaces.MultiBinary):
                raise ValueError(f"dataset: only array {name} spaces are supported, got {space}")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAY_FIELDS}
        for episode in dataset.iterate_episodes():
            observations = np.asarray(episode.observations)
            parts["observations"].append(observations[:-1])
            parts["next_observations"].append(observations[1:])
            parts["actions"].append(np.asarray(episode.actions))
            parts["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
            parts["terminations"].append(np.asarray(episode.terminations, dtype=np.float32))
        if not parts["observations"]:
            raise ValueError(f"dataset: the Minari dataset {dataset.spec.dataset_id!r} has no episodes")
        arrays = {name: np.concatenate(values) for name, values in parts.items()}
        return cls(env_id=env_id, **arrays)


#: Readings of the Pendulum dataset (see :func:`collect_dataset`).
PENDULUM_STARTS = ("uniform", "reset", "episodes", "trajectory", "uniform_episodes")


def collect_dataset(
    env_id: str,
    n_samples: int,
    seed: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    pendulum_start: str = "episodes",
) -> OfflineDataset:
    """Collect ``n_samples`` transitions with uniformly random actions (HANQ paper §3.1, §11).

    - **Pendulum** (``DiscretePendulum-v1`` and ``Pendulum-v1``): "1000 samples of state-action pairs,
      using uniformly sampled initial states" (§11, after Xiao et al., 2022; §3.1 says "using a uniformly
      sampled initial state"). Five readings (``pendulum_start``):

      - ``"episodes"`` (default): random-action episodes from standard resets (§3.1's singular "a uniformly
        sampled initial state"; Pendulum's reset draws ``theta ~ U[-pi, pi)``, ``theta_dot ~ U[-1, 1]``), as for
        the other environments below;
      - ``"uniform"``: one independent start state per transition, ``theta ~ U[-pi, pi)``,
        ``theta_dot ~ U[-max_speed, max_speed]`` (``max_speed = 8``), drawn by the environment's own
        ``reset(options={"x_init": pi, "y_init": max_speed})``, then one random step: the samples cover the
        whole state space (§11 contrasts these states with CartPole's and Acrobot's "standard initial states");
      - ``"reset"``: one transition from each of ``n_samples`` standard resets;
      - ``"trajectory"``: one random-action trajectory of ``n_samples`` steps from one standard reset, without
        the 200-step time limit (§3.1's singular read most literally: "a uniformly sampled initial state");
      - ``"uniform_episodes"``: random-action episodes as ``"episodes"``, each from a start state drawn as in
        ``"uniform"`` (§11 read with "initial states" as the episodes' starts: "uniformly sampled initial states,
        taking uniformly random actions").

      Only ``"episodes"`` gives the paper's ordering (population trainer, 200k gradient steps, lr 10^-2.5,
      10 seeds, ``benchmarks/results/hanq_repro/``): HANQ 85.0 against DQN (β = 10^-3) 46.8, where the paper
      has 100.1 and 72.4 (Table 1). Under ``"uniform"`` DQN scores 100.1 and HANQ 73.1, and under ``"reset"``
      HANQ 37.5 and DQN 17.2 (5 seeds). Under ``"uniform_episodes"`` DQN scores 87.5 and HANQ 70.6 (10 seeds).
      (``"uniform"`` was the default until issue #14 settled it.)

      ``terminations`` are all 0 (Pendulum never terminates).
    - **Any other environment** (CartPole, Acrobot: 10k samples; Atari: 100k, §11): standard resets,
      random-action episodes, reset when an episode terminates or is truncated. On truncation the stored
      ``next_observations`` row is the real final observation and ``terminations`` is 0.

    :param env_id: Gymnasium id (``sb3_hanq``'s environments are registered automatically).
    :param n_samples: Number of transitions.
    :param seed: Seeds the environment and the action sampling; the same seed gives the same dataset.
    :param env_kwargs: Extra keyword arguments for ``gym.make``.
    :param pendulum_start: the Pendulum reading, one of :data:`PENDULUM_STARTS` (ignored by other environments)
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if pendulum_start not in PENDULUM_STARTS:
        raise ValueError(f"Invalid pendulum_start={pendulum_start!r}: expected one of {PENDULUM_STARTS}")
    register_envs()
    env = gym.make(env_id, **(env_kwargs or {}))
    if isinstance(env.unwrapped, PendulumEnv) and pendulum_start == "trajectory":
        env.close()  # one episode as long as the dataset
        env = gym.make(env_id, **{**(env_kwargs or {}), "max_episode_steps": n_samples})
    try:
        obs_shape, action_shape = env.observation_space.shape, env.action_space.shape
        if obs_shape is None or action_shape is None:
            raise ValueError(
                f"{env_id}: only array observation/action spaces are supported, "
                f"got {env.observation_space} and {env.action_space}"
            )
        env.action_space.seed(seed)
        observations = np.zeros((n_samples, *obs_shape), dtype=env.observation_space.dtype)
        next_observations = np.zeros_like(observations)
        actions = np.zeros((n_samples, *action_shape), dtype=env.action_space.dtype)
        rewards = np.zeros(n_samples, dtype=np.float32)
        terminations = np.zeros(n_samples, dtype=np.float32)

        pendulum = env.unwrapped if isinstance(env.unwrapped, PendulumEnv) else None
        uniform_state = (
            {"x_init": np.pi, "y_init": float(pendulum.max_speed)}
            if pendulum is not None and pendulum_start in ("uniform", "uniform_episodes")
            else None
        )
        if pendulum is not None and pendulum_start in ("uniform", "reset"):
            for i in range(n_samples):
                # A fresh start state per transition (also resets the TimeLimit counter).
                obs, _ = env.reset(seed=seed if i == 0 else None, options=uniform_state)
                action = env.action_space.sample()
                next_obs, reward, terminated, _, _ = env.step(action)
                observations[i], actions[i], rewards[i] = obs, action, reward
                next_observations[i], terminations[i] = next_obs, float(terminated)
        else:
            obs, _ = env.reset(seed=seed, options=uniform_state)
            for i in range(n_samples):
                action = env.action_space.sample()
                next_obs, reward, terminated, truncated, _ = env.step(action)
                observations[i], actions[i], rewards[i] = obs, action, reward
                next_observations[i], terminations[i] = next_obs, float(terminated)
                obs = env.reset(options=uniform_state)[0] if (terminated or truncated) else next_obs
    finally:
        env.close()
    return OfflineDataset(observations, actions, rewards, next_observations, terminations, env_id=env_id)


def validate_dataset(dataset: OfflineDataset, observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """Check that ``dataset`` fits a model's spaces; ``ValueError`` names the field, expected and got."""
    if not isinstance(dataset, OfflineDataset):
        raise TypeError(f"Expected an OfflineDataset, got {type(dataset).__name__}")
    if isinstance(observation_space, spaces.Dict):
        raise ValueError("observation_space: Dict observation spaces are not supported for offline datasets")
    n = len(dataset)
    for name in ("observations", "next_observations"):
        got = getattr(dataset, name).shape[1:]
        if got != observation_space.shape:
            raise ValueError(
                f"{name}: expected per-sample shape {observation_space.shape} ({observation_space}), got {got}"
            )
    actions = dataset.actions
    if isinstance(action_space, spaces.Discrete):
        if actions.shape != (n,):
            raise ValueError(f"actions: expected shape ({n},) for {action_space}, got {actions.shape}")
        if not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions: expected an integer dtype for {action_space}, got {actions.dtype}")
        low, high = int(action_space.start), int(action_space.start + action_space.n - 1)
        if actions.min() < low or actions.max() > high:
            raise ValueError(
                f"actions: expected values in [{low}, {high}] for {action_space}, "
                f"got range [{actions.min()}, {actions.max()}]"
            )
        return
    if actions.shape[1:] != action_space.shape:
        raise ValueError(
            f"actions: expected per-sample shape {action_space.shape} ({action_space}), got {actions.shape[1:]}"
        )
    if isinstance(action_space, spaces.Box):
        outside = (actions < action_space.low) | (actions > action_space.high)
        if outside.any():
            raise ValueError(
                f"actions: {int(outside.any(axis=tuple(range(1, actions.ndim))).sum())} sample(s) outside "
                f"[{action_space.low.tolist()}, {action_space.high.tolist()}]"
            )
    elif isinstance(action_space, spaces.MultiDiscrete):
        if (actions < action_space.start).any() or (actions >= action_space.start + action_space.nvec).any():
            raise ValueError(f"actions: values outside {action_space}")
    elif isinstance(action_space, spaces.MultiBinary):
        if not np.isin(actions, (0, 1)).all():
            raise ValueError(f"actions: expected only 0/1 values for {action_space}")


def dataset_to_replay_buffer(
    dataset: OfflineDataset,
    observation_space: spaces.Space,
    action_space: spaces.Space,
    device: th.device | str = "auto",
) -> ReplayBuffer:
    """An SB3 ``ReplayBuffer`` holding exactly the dataset (size ``len(dataset)``, ``n_envs=1``, full).

    ``buffer.sample(batch_size)`` then draws rows of the dataset uniformly with replacement. Time-limit
    truncations are already excluded from ``terminations``, so ``timeouts`` stays zero.
    """
    validate_dataset(dataset, observation_space, action_space)
    n = len(dataset)
    buffer = ReplayBuffer(
        n,
        observation_space,
        action_space,
        device=device,
        n_envs=1,
        optimize_memory_usage=False,
        handle_timeout_termination=False,
    )
    buffer.observations[:] = dataset.observations.reshape(buffer.observations.shape)
    buffer.next_observations[:] = dataset.next_observations.reshape(buffer.next_observations.shape)
    buffer.actions[:] = dataset.actions.reshape(buffer.actions.shape)
    buffer.rewards[:] = dataset.rewards.reshape(n, 1)
    buffer.dones[:] = dataset.terminations.reshape(n, 1)
    buffer.timeouts[:] = 0.0
    buffer.pos = 0
    buffer.full = True
    return buffer


def train_offline(
    model: SelfOffPolicyAlgorithm,
    dataset: OfflineDataset,
    gradient_steps: int,
    callback: MaybeCallback = None,
    log_interval: int = 1000,
    tb_log_name: str | None = None,
    reset_num_timesteps: bool = True,
    progress_bar: bool = False,
) -> SelfOffPolicyAlgorithm:
    """Train an SB3 off-policy algorithm for ``gradient_steps`` updates on a fixed dataset (HANQ paper §3.1, §4).

    The model's replay buffer is replaced by the dataset (:func:`dataset_to_replay_buffer`) and the
    environment is never stepped (``_setup_learn`` resets it once, as ``learn()`` does); evaluation
    happens only in callbacks with their own env, e.g. :class:`ScoreCallback`.

    One gradient step counts as one *timestep*: ``model.num_timesteps`` grows by one per step, so
    ``EvalCallback(eval_freq=k)`` evaluates every ``k`` gradient steps, the progress bar and the logger's
    x-axis count gradient steps, and schedules see ``progress_remaining`` go from 1 to 0 over the run.
    Each step runs ``model.train(gradient_steps=1)`` then ``model._on_step()``; for DQN and its
    subclasses ``_on_step`` is where the target network is updated, so **``target_update_interval``
    counts gradient steps** here (and ``tau`` is the paper's target update rate beta).

    Logged every ``log_interval`` steps, besides the algorithm's ``train/*`` keys:
    ``time/gradient_steps`` (total steps so far, = ``num_timesteps``), ``time/time_elapsed`` (seconds)
    and ``time/fps`` (gradient steps per second in this call).

    :param model: Any ``OffPolicyAlgorithm`` (DQN, HANQ, SSAQ, ...) with a single-env ``env`` whose
        spaces match the dataset.
    :param dataset: The fixed training data.
    :param gradient_steps: Number of gradient steps (the paper: 200k for classic control, 1M for Atari, §11).
    :param callback: SB3 callback(s), called once per gradient step.
    :param log_interval: Dump the logger every ``log_interval`` gradient steps (``0`` to never dump here).
    :param tb_log_name: TensorBoard run name (default: the algorithm's class name).
    :param reset_num_timesteps: Whether to restart the step counter (``False`` continues a previous run).
    :param progress_bar: Show a tqdm/rich progress bar over gradient steps.
    :return: The trained model.
    """
    if not isinstance(model, OffPolicyAlgorithm):
        raise TypeError(f"train_offline needs an SB3 OffPolicyAlgorithm, got {type(model).__name__}")
    if isinstance(gradient_steps, bool) or not isinstance(gradient_steps, (int, np.integer)) or gradient_steps < 1:
        raise ValueError(f"gradient_steps must be an integer >= 1, got {gradient_steps!r}")
    if log_interval < 0:
        raise ValueError(f"log_interval must be >= 0, got {log_interval}")
    validate_dataset(dataset, model.observation_space, model.action_space)
    if model.env is None:
        raise ValueError("The model has no environment: pass one at construction or call model.set_env(env)")
    if model.n_envs != 1:
        # DQN divides target_update_interval by n_envs and callbacks count n_envs steps per call:
        # with one gradient step per "timestep" both only make sense for a single env.
        raise ValueError(f"train_offline needs a model with a single environment, got n_envs={model.n_envs}")
    if getattr(model, "n_steps", 1) > 1:
        warnings.warn(
            f"n_steps={model.n_steps} is ignored by train_offline: the dataset buffer holds one-step transitions",
            stacklevel=2,
        )

    model.replay_buffer = dataset_to_replay_buffer(dataset, model.observation_space, model.action_space, model.device)
    total_timesteps, callback = model._setup_learn(
        int(gradient_steps),
        callback,
        reset_num_timesteps,
        tb_log_name or model.__class__.__name__,
        progress_bar,
    )
    callback.on_training_start(locals(), globals())
    start_time, start_step = time.time(), model.num_timesteps

    def dump() -> None:
        elapsed = max(time.time() - start_time, 1e-9)
        model.logger.record("time/gradient_steps", model.num_timesteps)
        model.logger.record("time/time_elapsed", int(elapsed), exclude="tensorboard")
        model.logger.record("time/fps", int((model.num_timesteps - start_step) / elapsed))
        model.logger.dump(step=model.num_timesteps)

    for _ in range(int(gradient_steps)):
        model.num_timesteps += 1
        model._update_current_progress_remaining(model.num_timesteps, total_timesteps)
        model.train(gradient_steps=1, batch_size=model.batch_size)
        model._on_step()
        model.logger.name_to_value.pop("rollout/exploration_rate", None)  # DQN's epsilon: meaningless offline

        callback.update_locals(locals())
        if not callback.on_step():
            break

        if log_interval > 0 and model.num_timesteps % log_interval == 0:
            dump()

    if log_interval > 0 and model.num_timesteps % log_interval != 0:  # the last steps' scalars, dumped too
        dump()
    callback.on_training_end()
    return model


#: ``(low_return, high_return)`` per environment, HANQ paper Table 10 (§11.1): low is a random policy's
#: typical return, high an expert's (300 for Seaquest: the peak of the paper's early offline runs).
RETURN_RANGES: dict[str, tuple[float, float]] = {
    "Pendulum-v1": (-1500.0, -200.0),
    "DiscretePendulum-v1": (-1500.0, -200.0),
    "Acrobot-v1": (-500.0, -100.0),
    "CartPole-v1": (0.0, 500.0),
    "SeaquestNoFrameskip-v4": (0.0, 300.0),
    "ALE/Seaquest-v5": (0.0, 300.0),
}


def normalized_score(returns: float | np.ndarray | list[float], env_id: str) -> float | np.ndarray:
    """``score = 100 (return - low_return) / (high_return - low_return)`` (HANQ paper §11.1, Table 10).

    Elementwise; a scalar in gives a ``float`` out. ``ValueError`` for an environment without a range.
    """
    if env_id not in RETURN_RANGES:
        raise ValueError(f"No return range for env_id={env_id!r}; known environments: {sorted(RETURN_RANGES)}")
    low, high = RETURN_RANGES[env_id]
    score = 100.0 * (np.asarray(returns, dtype=np.float64) - low) / (high - low)
    return float(score) if score.ndim == 0 else score


class ScoreCallback(EvalCallback):
    """``EvalCallback`` that also reports the paper's normalised score (HANQ paper §4, §11.1).

    After each evaluation it logs ``eval/score`` (:func:`normalized_score` of the mean return, dumped at
    the same step as ``eval/mean_reward``) and appends ``(num_timesteps, score)`` to ``self.scores``.
    :attr:`average_score` is the mean of those scores: with evenly spaced evaluations this is the
    paper's table metric, "scores averaged over all gradient steps within each training run" (§4).

    :param eval_env: Evaluation environment (its own, never the training data).
    :param env_id: Key of :data:`RETURN_RANGES`; inferred from ``eval_env``'s spec when ``None``.

    The other parameters are those of SB3's ``EvalCallback``.
    """

    eval_env: VecEnv  # ``EvalCallback`` wraps a single env in a ``DummyVecEnv``

    def __init__(
        self,
        eval_env: gym.Env | VecEnv,
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
        n_eval_episodes: int = 5,
        eval_freq: int = 10000,
        log_path: str | None = None,
        best_model_save_path: str | None = None,
        deterministic: bool = True,
        render: bool = False,
        verbose: int = 1,
        warn: bool = True,
        env_id: str | None = None,
    ) -> None:
        super().__init__(
            eval_env,
            callback_on_new_best=callback_on_new_best,
            callback_after_eval=callback_after_eval,
            n_eval_episodes=n_eval_episodes,
            eval_freq=eval_freq,
            log_path=log_path,
            best_model_save_path=best_model_save_path,
            deterministic=deterministic,
            render=render,
            verbose=verbose,
            warn=warn,
        )
        if env_id is None:
            spec = self.eval_env.get_attr("spec", indices=[0])[0]
            if spec is None:
                raise ValueError("Cannot infer env_id: eval_env has no spec; pass env_id explicitly")
            env_id = spec.id
        if env_id not in RETURN_RANGES:
            raise ValueError(f"No return range for env_id={env_id!r}; known environments: {sorted(RETURN_RANGES)}")
        self.env_id: str = env_id
        self.scores: list[tuple[int, float]] = []

    def _on_step(self) -> bool:
        evaluating = self.eval_freq > 0 and self.n_calls % self.eval_freq == 0  # same test as EvalCallback
        continue_training = super()._on_step()
        if evaluating:
            score = normalized_score(self.last_mean_reward, self.env_id)
            assert isinstance(score, float)
            self.scores.append((self.num_timesteps, score))
            # EvalCallback has already dumped eval/mean_reward; dump the score at the same step.
            self.logger.record("eval/score", score)
            self.logger.dump(self.num_timesteps)
        return continue_training

    @property
    def average_score(self) -> float:
        """Mean of all recorded scores (``nan`` before the first evaluation)."""
        if not self.scores:
            return float("nan")
        return float(np.mean([score for _, score in self.scores]))
