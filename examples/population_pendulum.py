"""Train a small population offline in one process: HANQ with and without the hypergradient, several seeds.

    python examples/population_pendulum.py

Every seed collects its own 1000-transition DiscretePendulum dataset and starts from the weights
``HANQ(..., seed=seed)`` would have; the members of one seed differ only in kappa. Same as the command line
``python -m sb3_hanq.population --algo hanq --env DiscretePendulum-v1 --seeds 3 --gradient-steps 5000
--eval-freq 500 --hyper-lr 0 0.1 --out population_pendulum.json``.
"""

from __future__ import annotations

from pathlib import Path

from sb3_hanq.population import train_population


def main(gradient_steps: int = 5000, seeds: int = 3, out_dir: str | Path = ".") -> dict:
    results = train_population(
        algo="hanq",
        env_id="DiscretePendulum-v1",
        seeds=seeds,
        gradient_steps=gradient_steps,
        eval_freq=gradient_steps // 10,
        eval_episodes=10,
        hyper_lr=[0.0, 0.1],  # a grid dimension: every seed runs both
        out=Path(out_dir) / "population_pendulum.json",  # resumable; a .md summary goes beside it
        progress_bar=True,
    )
    for row in results["summary"]:
        print(f"kappa={row['hyperparameters']['hyper_lr']}: mean run-averaged score {row['mean']:.1f}")
    return results


if __name__ == "__main__":
    main()
