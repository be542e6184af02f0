"""PreQN on Pendulum-v1: train with an EvalCallback, save, load and predict.

python examples/preqn_pendulum.py [--timesteps 3_000]   (about 40 s here)

The zoo trains the same algorithm from the shipped YAML: `sb3-hanq-zoo train --algo preqn --env Pendulum-v1`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env

from sb3_hanq import PreQN

ENV_ID = "Pendulum-v1"


def main(total_timesteps: int = 3_000, seed: int = 0, log_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, evaluate along the way, save, load, predict. Returns what a test checks."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="preqn_pendulum_"))
    eval_env = make_vec_env(ENV_ID, n_envs=1, seed=seed + 1000)
    # The paper's values (Appendix B: critic step size 0.1, eta 0.97, sin critic, N(0, 0.1) action noise) except
    # smaller networks and warm-up, to stay under a minute here.
    model = PreQN(
        "MlpPolicy",
        ENV_ID,
        learning_starts=min(1000, total_timesteps // 3),
        policy_kwargs=dict(net_arch=[64, 64]),
        seed=seed,
        device="cpu",
    )
    # EvalCallback counts calls, one per vectorised step of model.n_envs transitions.
    eval_callback = EvalCallback(
        eval_env,
        n_eval_episodes=5,
        eval_freq=max(total_timesteps // (3 * model.n_envs), 1),
        log_path=str(log_dir),
        verbose=0,
    )
    model.learn(total_timesteps, callback=eval_callback)
    model_path = log_dir / "preqn_pendulum.zip"
    model.save(model_path)

    loaded = PreQN.load(model_path, device="cpu")
    obs = eval_env.reset()
    action, _ = loaded.predict(obs, deterministic=True)
    same = bool(np.allclose(action, model.predict(obs, deterministic=True)[0]))
    rewards = [float(np.mean(r)) for r in eval_callback.evaluations_results]
    print(f"PreQN on {ENV_ID}: mean evaluation returns {[round(r, 1) for r in rewards]}; saved to {model_path}")
    return {"model_path": model_path, "eval_returns": rewards, "loaded_predicts_the_same": same, "action": action}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timesteps", type=int, default=3_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.timesteps, args.seed)
