"""rl-zoo3 integration: train, evaluate and tune every ``sb3_hanq`` algorithm with the zoo's own CLI.

``python -m sb3_hanq.zoo train --algo hanq --env CartPole-v1`` (or the ``sb3-hanq-zoo`` entry point) is
``python -m rl_zoo3.train`` with three additions:

1. the ``sb3_hanq`` algorithms are registered in the zoo's tables (:data:`rl_zoo3.utils.ALGOS`, and the Optuna
   samplers of :mod:`rl_zoo3.hyperparams_opt`) under the names of their subpackages (:data:`ZOO_KEYS`), next to
   the zoo's own algorithms (``dqn``, ``td3``, ``crossq``, ...), which stay available for baselines;
2. for those algorithms the package's ``sb3_hanq/hyperparams/<algo>.yml`` is the default ``-conf`` (an
   explicit ``-conf`` wins), and the YAML entry used is checked against the algorithm's constructor before
   any environment is built: an unknown key is an error naming the key and the algorithm;
3. with ``-optimize`` and no ``--storage``, the Optuna study lives in a local journal file,
   ``<log-folder>/<algo>/optuna/<algo>_<env>.log``, with the study name ``<algo>_<env>``, so that a run can be
   resumed and more workers can join it (an explicit ``--storage`` / ``--study-name`` wins).

Every other flag is rl-zoo3's and keeps its meaning. ``enjoy`` is ``python -m rl_zoo3.enjoy`` with (1).

rl-zoo3 has no plugin hook; its parser reads ``ALGOS`` when ``train()`` builds it, so registration must
happen before ``rl_zoo3.train.train()`` is called, which :func:`main` does.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_hanq.common.extras import MissingExtraError, require_extra
from sb3_hanq.crossq_wn import CrossQWN
from sb3_hanq.hanq import HANQ
from sb3_hanq.preqn import PreQN
from sb3_hanq.ssaq import SSAQ
from sb3_hanq.stac import STAC

#: The shipped YAML files, one per zoo key (package data, so found from a checkout and from an install).
HYPERPARAMS_DIR = Path(__file__).parent / "hyperparams"

#: Keys of a zoo YAML entry that rl-zoo3 consumes itself (``ExperimentManager._preprocess_hyperparams`` and
#: ``_preprocess_action_noise``) instead of passing them to the algorithm's constructor.
ZOO_ONLY_KEYS = frozenset(
    {
        "n_timesteps",
        "n_envs",
        "normalize",
        "env_wrapper",
        "vec_env_wrapper",
        "frame_stack",
        "callback",
        "monitor_kwargs",
        "env_kwargs",
        "noise_type",
        "noise_std",
    }
)

#: Constructor arguments the zoo passes itself (from its flags), so a YAML entry must not set them.
ZOO_SET_ARGS = frozenset({"env", "tensorboard_log", "seed", "verbose", "device", "_init_setup_model"})


def zoo_algorithms() -> dict[str, type[BaseAlgorithm]]:
    """The ``sb3_hanq`` algorithms by zoo key (= subpackage name = YAML file name)."""
    return {"hanq": HANQ, "ssaq": SSAQ, "crossq_wn": CrossQWN, "preqn": PreQN, "stac": STAC}


ZOO_KEYS: tuple[str, ...] = tuple(zoo_algorithms())


def register_algos() -> None:
    """Add the ``sb3_hanq`` algorithms and their Optuna samplers to rl-zoo3's tables (idempotent)."""
    from rl_zoo3 import hyperparams_opt, utils

    algos = zoo_algorithms()
    utils.ALGOS.update(algos)
    hyperparams_opt.HYPERPARAMS_SAMPLER.update({key: HYPERPARAMS_SAMPLER[key] for key in algos})
    hyperparams_opt.HYPERPARAMS_CONVERTER.update({key: HYPERPARAMS_CONVERTER[key] for key in algos})  # type: ignore[misc]


# Optuna samplers (rl-zoo3's ``sample_<algo>_params(trial, n_actions, n_envs, additional_args)``): each draws the
# ranges its paper tuned and returns constructor keyword arguments; the matching converter maps a finished
# trial's ``params`` (what Optuna stores) to the same keyword arguments, for ``--trial-id`` / ``load_trial``.


def convert_hanq_params(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params of :func:`sample_hanq_params` / :func:`sample_ssaq_params` -> HANQ/SSAQ arguments."""
    return dict(params)


def sample_hanq_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """HANQ paper §11: learning rate in 10^[-4, -1] and hyper-learning rate kappa in 10^[-5, 0], both log-uniform
    (the paper's grids {10^-1, 10^-1.5, ..., 10^-4} and {10^0, ..., 10^-5})."""
    return convert_hanq_params(
        {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
            "hyper_lr": trial.suggest_float("hyper_lr", 1e-5, 1.0, log=True),
        }
    )


def sample_ssaq_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """HANQ paper §11 for SSAQ (kappa = 0, Alg. 1): the learning rate in 10^[-4, -1], log-uniform."""
    return convert_hanq_params({"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)})


def convert_crossq_wn_params(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params of :func:`sample_crossq_wn_params` -> CrossQWN arguments (``utd`` is ``gradient_steps``)."""
    kwargs = dict(params)
    kwargs["gradient_steps"] = kwargs.pop("utd")
    return kwargs


def sample_crossq_wn_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """CrossQ + WN paper §5.3-5.4 (Fig. 4-5 ablations) around Table 1 (App. C): learning rate 10^[-4.5, -3.5]
    (Table 1: 1e-4), update-to-data ratio {1, 2, 5}, target network on (tau 0.005) or off (tau 1, CrossQ's
    joint pass), AdamW weight decay {0, 1e-3, 1e-2 (Table 1), 1e-1}."""
    return convert_crossq_wn_params(
        {
            "learning_rate": trial.suggest_float("learning_rate", 10**-4.5, 10**-3.5, log=True),
            "utd": trial.suggest_categorical("utd", [1, 2, 5]),
            "tau": trial.suggest_categorical("tau", [0.005, 1.0]),
            "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 1e-3, 1e-2, 1e-1]),
        }
    )


def convert_preqn_params(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params of :func:`sample_preqn_params` -> PreQN arguments."""
    return dict(params)


def sample_preqn_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """PreQN paper App. B around its values: critic step size 10^[-2, 0] (paper 0.1), alignment threshold eta
    in [0.9, 0.99] (paper 0.97, "close to, but less than, 1", §4), actor learning rate 10^[-4, -2] (paper 1e-3)."""
    return convert_preqn_params(
        {
            "critic_step_size": trial.suggest_float("critic_step_size", 1e-2, 1.0, log=True),
            "eta": trial.suggest_float("eta", 0.9, 0.99),
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        }
    )


def convert_stac_params(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params of :func:`sample_stac_params` -> STAC arguments."""
    return dict(params)


def sample_stac_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """STAC paper §9.3: the paper tuned the number of heads (1: STAC, 3: STACX; 2, 5, 8 tried) and otherwise
    used Table 3's values; we search around them: inner learning rate 10^[-4, -2.5] (Table 3: 6e-4 Atari,
    1e-3 control), meta learning rate 10^[-4, -2] (Table 3: 1e-3), trajectory length {20, 40} (Table 3)."""
    return convert_stac_params(
        {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 10**-2.5, log=True),
            "meta_learning_rate": trial.suggest_float("meta_learning_rate", 1e-4, 1e-2, log=True),
            "n_steps": trial.suggest_categorical("n_steps", [20, 40]),
            "n_heads": trial.suggest_categorical("n_heads", [1, 3]),
        }
    )


HYPERPARAMS_SAMPLER: dict[str, Callable[..., dict[str, Any]]] = {
    "hanq": sample_hanq_params,
    "ssaq": sample_ssaq_params,
    "crossq_wn": sample_crossq_wn_params,
    "preqn": sample_preqn_params,
    "stac": sample_stac_params,
}
HYPERPARAMS_CONVERTER: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hanq": convert_hanq_params,
    "ssaq": convert_hanq_params,
    "crossq_wn": convert_crossq_wn_params,
    "preqn": convert_preqn_params,
    "stac": convert_stac_params,
}


def default_config(algo: str) -> Path:
    """The shipped YAML file of zoo key ``algo``."""
    return HYPERPARAMS_DIR / f"{algo}.yml"


def constructor_arguments(algo_class: type) -> set[str]:
    """Keyword arguments ``algo_class(...)`` accepts, following ``**kwargs`` up the MRO (e.g. SSAQ -> HANQ)."""
    names: set[str] = set()
    for cls in algo_class.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
        names.update(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self")
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def check_hyperparams(algo: str, hyperparams: dict[str, Any], where: str = "") -> None:
    """Raise ``ValueError`` naming the first key of a zoo YAML entry that ``algo`` does not understand.

    :param algo: a zoo key of :func:`zoo_algorithms`
    :param hyperparams: one YAML entry (e.g. ``yaml["CartPole-v1"]``), plus any ``-params`` overrides
    :param where: where the entry comes from, for the message (e.g. ``"hanq.yml, entry CartPole-v1"``)
    """
    algo_class = zoo_algorithms()[algo]
    valid = (constructor_arguments(algo_class) - ZOO_SET_ARGS) | ZOO_ONLY_KEYS
    for key in hyperparams:
        if key not in valid:
            hint = " (set by the zoo's own flags)" if key in ZOO_SET_ARGS else ""
            raise ValueError(
                f"Unknown hyperparameter {key!r}{hint} for algorithm {algo!r} ({algo_class.__name__})"
                f"{' in ' + where if where else ''}; valid keys: {', '.join(sorted(valid))}"
            )


def select_entry(hyperparams_dict: dict[str, Any], env_id: str) -> tuple[str, dict[str, Any]] | None:
    """The entry rl-zoo3 uses for ``env_id`` (``ExperimentManager.read_hyperparameters``): the env id, else
    ``atari`` for an Atari env, else ``default``; ``None`` when there is none (the zoo then reports it)."""
    from rl_zoo3.exp_manager import ExperimentManager

    if env_id in hyperparams_dict:
        return env_id, dict(hyperparams_dict[env_id])
    if "atari" in hyperparams_dict and env_id in _gym_registry() and ExperimentManager.is_atari(env_id):
        return "atari", dict(hyperparams_dict["atari"])
    if "default" in hyperparams_dict:
        return "default", dict(hyperparams_dict["default"])
    return None


def _gym_registry() -> Any:
    import gymnasium as gym

    return gym.envs.registry


def load_config(config: str) -> dict[str, Any] | None:
    """The hyperparameter dict of a ``-conf`` value (.yml/.yaml, .py defining ``hyperparams``, or a module)."""
    if config.endswith((".yml", ".yaml")):
        import yaml  # the `zoo` extra (checked by main)

        with open(config) as file:
            return yaml.safe_load(file)
    if config.endswith(".py"):
        namespace: dict[str, Any] = {}
        exec(Path(config).read_text(), namespace)
        return namespace.get("hyperparams")
    try:
        return importlib.import_module(config).hyperparams
    except (ImportError, AttributeError):
        return None  # the zoo reports it


def _train_preparser() -> argparse.ArgumentParser:
    """The few rl-zoo3 ``train`` options :func:`main` reads, spelled as rl-zoo3 spells them."""
    from rl_zoo3.utils import StoreDict

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("-f", "--log-folder", default="logs")
    parser.add_argument("-conf", "--conf-file", default=None)
    parser.add_argument("-params", "--hyperparams", nargs="+", action=StoreDict, default=None)
    parser.add_argument("-optimize", "--optimize-hyperparameters", action="store_true")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--study-name", default=None)
    parser.add_argument("--gym-packages", nargs="+", default=[])
    return parser


def train_argv(argv: Sequence[str]) -> list[str]:
    """rl-zoo3 ``train`` arguments with this package's defaults *prepended*, so that any explicit flag, in any
    spelling argparse accepts, comes later and wins. Raises ``ValueError`` for a YAML entry with an unknown key."""
    argv = list(argv)
    known, _ = _train_preparser().parse_known_args(argv)
    algos = zoo_algorithms()
    if known.algo not in algos:
        return argv  # a zoo algorithm (or an unknown one: rl-zoo3's parser lists the choices)
    for module in known.gym_packages:
        importlib.import_module(module)
    defaults: list[str] = []
    config = known.conf_file
    if config is None:
        config = str(default_config(known.algo))
        defaults += ["--conf-file", config]
    hyperparams_dict = load_config(config)
    entry = select_entry(hyperparams_dict, known.env) if isinstance(hyperparams_dict, dict) else None
    if entry is not None:
        name, hyperparams = entry
        hyperparams.update(known.hyperparams or {})
        check_hyperparams(known.algo, hyperparams, f"{config}, entry {name!r}")
    if known.optimize_hyperparameters:
        study = f"{known.algo}_{known.env}".replace("/", "-").replace(":", "-")
        if known.storage is None:
            defaults += ["--storage", str(Path(known.log_folder) / known.algo / "optuna" / f"{study}.log")]
        defaults += ["--study-name", study]
    return defaults + argv


class EnjoyLoader:
    """What ``ALGOS[algo]`` is for ``enjoy``: ``algo_class.load`` without two of rl-zoo3's overrides.

    rl-zoo3's enjoy loads every model with ``custom_objects={"learning_rate": 0.0, "lr_schedule": lambda _: 0.0}``
    (a patch for models pickled under Python 3.6/3.7). The sb3_hanq optimisers (e.g. ``HyperAdam``) reject a
    zero learning rate, and the saved schedules load fine, so those two overrides are dropped. Off-policy
    models get ``buffer_size=1``, as the zoo gives its own off-policy algorithms (no replay memory to play).
    """

    def __init__(self, algo_class: type[BaseAlgorithm]) -> None:
        self.algo_class = algo_class

    def load(self, path: str, custom_objects: dict[str, Any] | None = None, **kwargs: Any) -> BaseAlgorithm:
        from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

        custom_objects = {
            key: value for key, value in (custom_objects or {}).items() if key not in ("learning_rate", "lr_schedule")
        }
        if issubclass(self.algo_class, OffPolicyAlgorithm):
            kwargs.setdefault("buffer_size", 1)
        return self.algo_class.load(path, custom_objects=custom_objects, **kwargs)


def zoo_modules(command: str, argv: Sequence[str]) -> list[str]:
    """The modules a zoo command needs, all installed by the ``zoo`` extra (rl-zoo3 itself installs none of the
    last three): ``enjoy`` imports ``requests``, ``-tb`` needs ``tensorboard``, the ``-optimize`` report ``pandas``.
    """
    if command not in ("train", "enjoy"):
        raise ValueError(f"command must be 'train' or 'enjoy', got {command!r}")
    modules = ["yaml", "rl_zoo3", "optuna"]
    if command == "enjoy":
        modules.append("requests")
    if any(arg in ("-tb", "--tensorboard-log") or arg.startswith("--tensorboard-log=") for arg in argv):
        modules.append("tensorboard")
    if any(arg in ("-optimize", "--optimize-hyperparameters") for arg in argv):
        modules.append("pandas")
    return modules


USAGE = """usage: sb3-hanq-zoo {{train,enjoy}} [rl-zoo3 arguments]

  train   rl-zoo3's train (python -m rl_zoo3.train) with the sb3_hanq algorithms registered
  enjoy   rl-zoo3's enjoy (python -m rl_zoo3.enjoy) with the sb3_hanq algorithms registered

sb3_hanq algorithms: {algos}. `sb3-hanq-zoo train -h` lists rl-zoo3's flags."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``sb3-hanq-zoo`` and ``python -m sb3_hanq.zoo``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "enjoy"):
        print(USAGE.format(algos=", ".join(ZOO_KEYS)), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    prog = f"sb3-hanq-zoo {command}"
    try:
        require_extra("zoo", zoo_modules(command, rest), prog)
    except MissingExtraError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
    register_algos()
    if command == "enjoy":
        from rl_zoo3.utils import ALGOS

        ALGOS.update({key: EnjoyLoader(algo_class) for key, algo_class in zoo_algorithms().items()})  # type: ignore[misc]
    if command == "train":
        try:
            rest = train_argv(rest)
        except ValueError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(2)
    sys.argv = [prog, *rest]
    # Imported here: rl_zoo3.enjoy imports the Hugging Face hub helpers (and `requests`), which train never needs.
    entry: Callable[[], None] = getattr(importlib.import_module(f"rl_zoo3.{command}"), command)
    entry()


if __name__ == "__main__":
    main()
