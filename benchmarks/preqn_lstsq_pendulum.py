"""Does PreQN's optional Cholesky solver train like the default eigh least squares? Pendulum-v1 (or any env).

    python benchmarks/preqn_lstsq_pendulum.py [--seeds 3] [--timesteps 10000] [--threads 1]
    python benchmarks/preqn_lstsq_pendulum.py --env HalfCheetah-v5 --seeds 1 --timesteps 25000 --learning-starts 5000

Both runs of a seed use the same seed, Appendix B's PreQN (sin critic [256, 256], critic step size 0.1,
eta 0.97, actor Adam 1e-3, N(0, 0.1) action noise, updates every 50 steps), by default with 1000 warm-up steps
instead of 5000 (a short run), and differ only in ``lstsq_method``. Recorded per run: mean return of 10 deterministic
evaluation episodes at the end, the number of rejected critic steps (line search failed), the mean logged
``train/critic_alignment`` and wall time. Writes ``benchmarks/results/preqn_lstsq_pendulum.{json,md}``
(other envs: ``preqn_lstsq_<env>.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_hanq import PreQN

RESULTS = Path(__file__).parent / "results"
METHODS = ("eigh", "cholesky")


class AlignmentRecorder(BaseCallback):
    """Collect ``train/critic_alignment`` after every rollout (``train`` has run by the next rollout's start)."""

    def __init__(self) -> None:
        super().__init__()
        self.alignments: list[float] = []

    def _on_rollout_start(self) -> None:
        value = self.model.logger.name_to_value.get("train/critic_alignment")
        if value is not None:
            self.alignments.append(float(value))

    def _on_step(self) -> bool:
        return True


def run(env_id: str, method: str, seed: int, timesteps: int, learning_starts: int) -> dict:
    model = PreQN(
        "MlpPolicy", env_id, lstsq_method=method, learning_starts=learning_starts, seed=seed, device="cpu", verbose=0
    )
    recorder = AlignmentRecorder()
    start = time.perf_counter()
    model.learn(timesteps, callback=recorder)
    seconds = time.perf_counter() - start
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 1000)
    returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True, return_episode_rewards=True)
    return dict(
        method=method,
        seed=seed,
        mean_return=float(np.mean(returns)),
        rejected_steps=int(model.rejected_steps),
        gradient_steps=int(model._n_updates),
        mean_alignment=float(np.mean(recorder.alignments)) if recorder.alignments else None,
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--timesteps", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    command = (
        f"python benchmarks/preqn_lstsq_pendulum.py --seeds {args.seeds} --timesteps {args.timesteps} "
        f"--threads {args.threads}"
    )
    name = "preqn_lstsq_pendulum"
    if args.env != "Pendulum-v1":
        command += f" --env {args.env} --learning-starts {args.learning_starts}"
        name = f"preqn_lstsq_{args.env.split('-')[0].lower()}"
    elif args.learning_starts != 1000:
        command += f" --learning-starts {args.learning_starts}"
    runs = []
    for seed in range(args.seeds):
        for method in METHODS:
            runs.append(run(args.env, method, seed, args.timesteps, args.learning_starts))
            print(runs[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(dict(command=command, runs=runs), indent=1))
    lines = [
        f"# PreQN on {args.env}: `lstsq_method='eigh'` (default) vs `'cholesky'`",
        "",
        f"Command: `{command}`  ",
        f"torch {th.__version__}, {args.threads} thread(s), load average at the end {os.getloadavg()[0]:.2f}. "
        "Final score: mean return of 10 deterministic episodes after training.",
        "",
        "| seed | method | final return | rejected steps / gradient steps | mean logged alignment | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        alignment = "n/a" if r["mean_alignment"] is None else f"{r['mean_alignment']:.4f}"
        lines.append(
            f"| {r['seed']} | {r['method']} | {r['mean_return']:.1f} | {r['rejected_steps']} / {r['gradient_steps']} "
            f"| {alignment} | {r['seconds']:.0f} |"
        )
    lines += ["", "| method | mean final return over seeds | total rejected | total wall (s) |", "|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        lines.append(
            f"| {method} | {np.mean([r['mean_return'] for r in mine]):.1f} | "
            f"{sum(r['rejected_steps'] for r in mine)} | {sum(r['seconds'] for r in mine):.0f} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
