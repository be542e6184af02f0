"""rl-zoo3 integration (sb3_hanq.zoo): the CLI trains and plays every algorithm from the shipped YAML files,
each YAML entry builds its model, bad input fails early with a clear message, and Optuna workers share a study.

The CLI tests run the real command in a subprocess with tiny budgets (`-n 300`)."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import optuna
import pytest
import yaml
from rl_zoo3 import hyperparams_opt
from rl_zoo3.exp_manager import ExperimentManager
from rl_zoo3.utils import ALGOS

import sb3_hanq  # noqa: F401  (registers DiscretePendulum-v1)
from sb3_hanq import zoo

PYTHON = sys.executable
ZOO = [PYTHON, "-m", "sb3_hanq.zoo"]
ENV_VARS = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: One tiny training run per algorithm: (zoo key, env id, extra flags making it reach a few gradient steps).
CLI_RUNS = [
    ("hanq", "CartPole-v1", ["-params", "learning_starts:100"]),
    ("ssaq", "CartPole-v1", ["-params", "learning_starts:100"]),
    ("stac", "CartPole-v1", []),
    ("crossq_wn", "Pendulum-v1", ["-params", "learning_starts:260"]),
    ("preqn", "Pendulum-v1", ["-params", "learning_starts:250"]),
]

#: The env a YAML file's `default` / `atari` entry is built on in test_yaml_entry_builds.
GENERIC_ENTRY_ENVS = {
    ("hanq", "default"): "MountainCar-v0",
    ("ssaq", "default"): "MountainCar-v0",
    ("crossq_wn", "default"): "Pendulum-v1",
    ("preqn", "default"): "Pendulum-v1",
    ("stac", "atari"): "PongNoFrameskip-v4",
}


def run_zoo(*args: str, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ZOO, *args], cwd=cwd, env=ENV_VARS, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_registration_keeps_the_zoo_algorithms():
    zoo.register_algos()
    for key, algo_class in zoo.zoo_algorithms().items():
        assert ALGOS[key] is algo_class
        assert key in hyperparams_opt.HYPERPARAMS_SAMPLER and key in hyperparams_opt.HYPERPARAMS_CONVERTER
        assert zoo.default_config(key).is_file(), f"no shipped YAML for {key}"
    assert set(zoo.ZOO_KEYS) == {"hanq", "ssaq", "crossq_wn", "preqn", "stac"}
    for key in ("dqn", "td3", "a2c", "crossq", "sac", "ppo"):
        assert key in ALGOS  # baselines stay available
    # the zoo key is the subpackage name
    for key, algo_class in zoo.zoo_algorithms().items():
        assert algo_class.__module__.split(".")[1] == key


@pytest.mark.parametrize("algo,env_id,extra", CLI_RUNS, ids=[run[0] for run in CLI_RUNS])
def test_cli_trains_from_the_shipped_yaml(tmp_path, algo, env_id, extra):
    result = run_zoo(
        "train",
        "--algo",
        algo,
        "--env",
        env_id,
        "-n",
        "300",
        "--seed",
        "3",
        "-f",
        "logs",
        "--num-threads",
        "1",
        *extra,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Loading hyperparameters from: {zoo.default_config(algo)}" in result.stdout
    run_dir = tmp_path / "logs" / algo / f"{env_id}_1"
    model_path = run_dir / f"{env_id}.zip"
    assert model_path.is_file()
    monitors = list(run_dir.glob("*.monitor.csv"))
    assert monitors, f"no monitor log in {run_dir}"
    episodes = sum(len(path.read_text().splitlines()) - 2 for path in monitors)  # minus the two header lines
    assert episodes >= 1
    saved = yaml.unsafe_load((run_dir / env_id / "args.yml").read_text())
    assert dict(saved)["conf_file"] == str(zoo.default_config(algo))
    model = zoo.zoo_algorithms()[algo].load(model_path, device="cpu")
    assert model.num_timesteps >= 300
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(np.asarray(action).reshape(env.action_space.shape).astype(env.action_space.dtype))


def test_cli_enjoy_plays_a_trained_model(tmp_path):
    trained = run_zoo("train", "--algo", "ssaq", "--env", "CartPole-v1", "-n", "300", "-f", "logs", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    played = run_zoo(
        "enjoy",
        "--algo",
        "ssaq",
        "--env",
        "CartPole-v1",
        "-f",
        "logs",
        "-n",
        "200",
        "--no-render",
        "--deterministic",
        cwd=tmp_path,
    )
    assert played.returncode == 0, played.stderr[-3000:]
    assert "Mean reward" in played.stdout


def test_cli_unknown_algo_lists_ours(tmp_path):
    result = run_zoo("train", "--algo", "no_such_algo", "--env", "CartPole-v1", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'no_such_algo'" in result.stderr
    for key in (*zoo.ZOO_KEYS, "dqn"):
        assert f"'{key}'" in result.stderr


def test_cli_unknown_yaml_key_fails_before_training(tmp_path):
    conf = tmp_path / "bad.yml"
    conf.write_text("CartPole-v1:\n  n_timesteps: 300\n  policy: MlpPolicy\n  hyper_learning_rate: 0.1\n")
    result = run_zoo("train", "--algo", "hanq", "--env", "CartPole-v1", "-conf", str(conf), "-f", "logs", cwd=tmp_path)
    assert result.returncode == 2
    assert "'hyper_learning_rate'" in result.stderr and "'hanq'" in result.stderr
    assert not (tmp_path / "logs").exists()  # nothing was built


def test_explicit_conf_and_flags_win(tmp_path):
    conf = tmp_path / "mine.yml"
    conf.write_text("CartPole-v1:\n  n_timesteps: 300\n  policy: MlpPolicy\n")
    argv = zoo.train_argv(["--algo", "hanq", "--env", "CartPole-v1", "--conf", str(conf)])  # an abbreviation
    assert zoo._train_preparser().parse_known_args(argv)[0].conf_file == str(conf)
    argv = zoo.train_argv(["--algo", "hanq", "--env", "CartPole-v1"])
    assert zoo._train_preparser().parse_known_args(argv)[0].conf_file == str(zoo.default_config("hanq"))
    argv = zoo.train_argv(["--algo", "dqn", "--env", "CartPole-v1"])
    assert argv == ["--algo", "dqn", "--env", "CartPole-v1"]  # the zoo's algorithms are untouched
    # -params overrides are checked too
    with pytest.raises(ValueError, match="'learning_rat'.*'ssaq'"):
        zoo.train_argv(["--algo", "ssaq", "--env", "CartPole-v1", "-params", "learning_rat:0.1"])
    # -optimize defaults to a local journal file; explicit --storage / --study-name win
    known = zoo._train_preparser().parse_known_args(
        zoo.train_argv(["--algo", "hanq", "--env", "CartPole-v1", "-optimize", "-f", "runs"])
    )[0]
    assert (known.storage, known.study_name) == (str(Path("runs/hanq/optuna/hanq_CartPole-v1.log")), "hanq_CartPole-v1")
    known = zoo._train_preparser().parse_known_args(
        zoo.train_argv(
            [
                "--algo",
                "hanq",
                "--env",
                "CartPole-v1",
                "-optimize",
                "--storage",
                "sqlite:///s.db",
                "--study-name",
                "mine",
            ]
        )
    )[0]
    assert (known.storage, known.study_name) == ("sqlite:///s.db", "mine")


def _yaml_entries():
    for algo in zoo.ZOO_KEYS:
        for name in yaml.safe_load(zoo.default_config(algo).read_text()):
            yield pytest.param(algo, name, id=f"{algo}-{name}")


def _env_or_skip(env_id: str) -> None:
    """Skip (with the reason) when the env's package is not installed here."""
    for module in ("ale_py", "shimmy"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if module == "ale_py":
            gym.register_envs(mod)
    try:
        gym.make(env_id).close()
    except (gym.error.Error, ImportError, ModuleNotFoundError) as err:
        pytest.skip(f"{env_id} is not available here: {type(err).__name__}: {err}")


@pytest.mark.parametrize("algo,name", list(_yaml_entries()))
def test_yaml_entry_builds(tmp_path, algo, name):
    """Each entry of each shipped YAML builds its model on its env through rl-zoo3's own ExperimentManager."""
    config = zoo.default_config(algo)
    entry = dict(yaml.safe_load(config.read_text())[name])
    env_id = GENERIC_ENTRY_ENVS.get((algo, name), name)
    _env_or_skip(env_id)
    zoo.register_algos()
    zoo.check_hyperparams(algo, entry, name)
    args = argparse.Namespace(algo=algo, env=env_id, conf_file=str(config))
    manager = ExperimentManager(args, algo, env_id, str(tmp_path), n_timesteps=1, config=str(config), device="cpu")
    model, saved = manager.setup_experiment()
    assert isinstance(model, zoo.zoo_algorithms()[algo])
    assert dict(saved) == entry  # rl-zoo3 picked this entry
    for key in (
        "gamma",
        "batch_size",
        "n_steps",
        "tau",
        "hyper_lr",
        "eta",
        "critic_step_size",
        "policy_delay",
        "meta_learning_rate",
        "learning_starts",
        "buffer_size",
    ):
        if key in entry:
            assert getattr(model, key) == entry[key], key
    if "n_envs" in entry:
        assert model.n_envs == entry["n_envs"]
    model.env.close()


@pytest.mark.parametrize("algo", zoo.ZOO_KEYS)
def test_sampler_ranges_and_converter(algo):
    """Samplers cover the ranges of the docstrings, return valid constructor arguments, and the converter maps a
    stored trial's params back to the same arguments (what `--trial-id` loads)."""
    zoo.register_algos()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lows, highs = {}, {}
    for _ in range(200):
        trial = study.ask()
        kwargs = hyperparams_opt.HYPERPARAMS_SAMPLER[algo](trial, 2, 1, {})
        zoo.check_hyperparams(algo, kwargs, "sampler")
        assert hyperparams_opt.HYPERPARAMS_CONVERTER[algo](trial.params) == kwargs
        for key, value in kwargs.items():
            lows[key] = min(lows.get(key, value), value)
            highs[key] = max(highs.get(key, value), value)
        study.tell(trial, 0.0)
    if algo == "hanq":  # HANQ paper §11: learning rate 10^[-4, -1], kappa 10^[-5, 0]
        assert 1e-4 <= lows["learning_rate"] < 3e-4 and 3e-2 < highs["learning_rate"] <= 1e-1
        assert 1e-5 <= lows["hyper_lr"] < 1e-4 and 0.1 < highs["hyper_lr"] <= 1.0


def test_two_workers_share_one_study(tmp_path):
    """Two worker processes, one with the default local storage and one naming the same file explicitly, fill
    one study: each runs 2 trials (`--n-trials 2`), so 4 finished trials mean both wrote to it."""
    common = [
        "train",
        "--algo",
        "hanq",
        "--env",
        "CartPole-v1",
        "-n",
        "200",
        "-optimize",
        "--n-trials",
        "2",
        "--sampler",
        "random",
        "--pruner",
        "none",
        "--n-evaluations",
        "1",
        "--eval-episodes",
        "2",
        "-f",
        "logs",
        "--num-threads",
        "1",
        "--no-optim-plots",
        "-params",
        "learning_starts:100",
    ]
    storage = tmp_path / "logs" / "hanq" / "optuna" / "hanq_CartPole-v1.log"
    workers = [
        subprocess.Popen(
            [*ZOO, *common, "--seed", "1"],
            cwd=tmp_path,
            env=ENV_VARS,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            [*ZOO, *common, "--seed", "2", "--storage", str(storage), "--study-name", "hanq_CartPole-v1"],
            cwd=tmp_path,
            env=ENV_VARS,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=150)
        assert worker.returncode == 0, err[-3000:]
    backend = optuna.storages.journal.JournalFileBackend(str(storage))
    study = optuna.load_study(study_name="hanq_CartPole-v1", storage=optuna.storages.JournalStorage(backend))
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 4  # differently seeded samplers
    assert all(set(t.params) == {"learning_rate", "hyper_lr"} for t in finished)


def test_usage_without_a_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        zoo.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sb3-hanq-zoo {train,enjoy}" in err and all(key in err for key in zoo.ZOO_KEYS)
