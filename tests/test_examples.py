"""Each script in examples/ trains with an EvalCallback, saves, loads and predicts (reduced budgets here; the
scripts' own budgets take under a minute each on a 2-core machine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: script -> total timesteps for the test (enough for a few gradient steps and several evaluations)
BUDGETS = {
    "hanq_cartpole": 1500,
    "ssaq_cartpole": 1500,
    "crossq_wn_pendulum": 300,
    "preqn_pendulum": 300,
    "stac_cartpole": 800,
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_algorithm_has_an_example():
    from sb3_hanq.zoo import ZOO_KEYS

    for key in ZOO_KEYS:
        assert any(name.startswith(f"{key}_") for name in BUDGETS), key
        assert (EXAMPLES / f"{next(n for n in BUDGETS if n.startswith(key + '_'))}.py").is_file()


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_example_trains_saves_loads_predicts(tmp_path, name):
    result = _load(name).main(BUDGETS[name], seed=0, log_dir=tmp_path)
    assert Path(result["model_path"]).is_file()
    assert len(result["eval_returns"]) >= 2  # the EvalCallback ran during training
    assert (tmp_path / "evaluations.npz").is_file()
    assert result["loaded_predicts_the_same"]


def test_population_example(tmp_path):
    """The population example trains seeds x kappa members and writes the results and summary it prints."""
    results = _load("population_pendulum").main(gradient_steps=20, seeds=2, out_dir=tmp_path)
    assert sorted((m["seed"], m["hyperparameters"]["hyper_lr"]) for m in results["members"]) == [
        (0, 0.0),
        (0, 0.1),
        (1, 0.0),
        (1, 0.1),
    ]
    assert [row["n"] for row in results["summary"]] == [2, 2]
    assert (tmp_path / "population_pendulum.json").is_file() and (tmp_path / "population_pendulum.md").is_file()
    # kappa = 0 keeps alpha fixed; kappa = 0.1 moves it
    lrs = {m["hyperparameters"]["hyper_lr"]: m["final_learning_rate"] for m in results["members"]}
    assert lrs[0.0] == 10**-2.5 and lrs[0.1] != 10**-2.5
