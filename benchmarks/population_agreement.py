"""Do the population trainer and the SB3 path agree? Same protocol, both paths, one table.

    python benchmarks/population_agreement.py [--seeds 10] [--gradient-steps 20000] [--eval-freq 1000]

SB3 path: ``benchmarks/hanq_pendulum.py`` (one process per run: SB3's ``DQN`` with beta = 10^-3, and
``HANQ`` with its defaults, through ``train_offline`` and ``ScoreCallback``). Population: the same two
configurations through ``python -m sb3_hanq.population`` (``dqn`` with SB3's Huber loss and gradient clipping
at 10, beta = 10^-3; ``hanq`` defaults). Same seeds (hence the same datasets and initial weights), learning
rate 10^-2.5, batch 128, evaluation every ``--eval-freq`` steps on 10 episodes; the evaluation episodes'
start states and the minibatch indices differ between the paths. Each path's runs are skipped when its
results file exists. Writes ``benchmarks/results/population/agreement_<seeds>x<steps>k[_<reading>].md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sb3_hanq.common.offline import PENDULUM_STARTS

RESULTS = Path(__file__).parent / "results" / "population"
CONFIGS = {  # name in hanq_pendulum.py -> population CLI arguments
    "DQN, target beta=1e-3": ["--algo", "dqn", "--tau", "1e-3", "-params", "loss:huber", "max_grad_norm:10.0"],
    "HANQ (kappa=0.1, default)": ["--algo", "hanq"],
}


def iqm_ci(values: np.ndarray) -> tuple[float, float, float]:
    from rliable import library as rly
    from rliable import metrics

    iqm = lambda x: np.array([metrics.aggregate_iqm(x)])  # noqa: E731
    point, ci = rly.get_interval_estimates({"c": values[:, None]}, iqm, reps=2000)
    return float(point["c"][0]), float(ci["c"][0, 0]), float(ci["c"][1, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--gradient-steps", type=int, default=20_000)
    parser.add_argument("--eval-freq", type=int, default=1_000)
    parser.add_argument(
        "--pendulum-start",
        default="uniform",
        choices=PENDULUM_STARTS,
        help="the dataset's reading for both paths (the committed tables used 'uniform')",
    )
    parser.add_argument("--compile", action="store_true", help="pass --compile to the population trainer")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    scale = f"{args.seeds}x{args.gradient_steps // 1000}k"
    scale += "" if args.pendulum_start == "uniform" else f"_{args.pendulum_start}"  # (the committed files' names)
    tag = f"population/sb3_path_{scale}"
    sb3_file = RESULTS.parent / f"{tag}.json"
    if not sb3_file.exists():
        cmd = [sys.executable, str(Path(__file__).parent / "hanq_pendulum.py"), "--seeds", str(args.seeds)]
        cmd += ["--gradient-steps", str(args.gradient_steps), "--eval-freq", str(args.eval_freq), "--workers", "2"]
        cmd += ["--configs", *CONFIGS, "--tag", tag, "--pendulum-start", args.pendulum_start]
        subprocess.run(cmd, check=True)
    sb3_runs = json.loads(sb3_file.read_text())["runs"]
    lines = [
        f"DiscretePendulum-v1, {args.seeds} seeds x {args.gradient_steps} gradient steps, evaluation every "
        f"{args.eval_freq} steps on 10 episodes, learning rate 10^-2.5, batch 128; score averaged over evaluations.  ",
        f"Command: `python benchmarks/population_agreement.py --seeds {args.seeds} --gradient-steps "
        f"{args.gradient_steps} --eval-freq {args.eval_freq} --pendulum-start {args.pendulum_start}`",
        "",
        "| configuration | SB3 path: mean, IQM [95% CI] | population: mean, IQM [95% CI] | CIs overlap | "
        "population wall time |",
        "|---|---|---|---|---|",
    ]
    for name, cli in CONFIGS.items():
        out = RESULTS / f"agreement_{cli[1]}_{scale}.json"
        cmd = [sys.executable, "-m", "sb3_hanq.population", *cli, "--env", "DiscretePendulum-v1"]
        cmd += ["--seeds", str(args.seeds), "--gradient-steps", str(args.gradient_steps), "--eval-freq"]
        cmd += [str(args.eval_freq), "--eval-episodes", "10", "--learning-rate", str(10**-2.5), "--out", str(out)]
        cmd += ["--no-progress-bar", "--pendulum-start", args.pendulum_start] + (["--compile"] if args.compile else [])
        subprocess.run(cmd, check=True)
        population = json.loads(out.read_text())
        a = np.array([r["average_score"] for r in sb3_runs if r["name"] == name])
        b = np.array([m["average_score"] for m in population["members"]])
        (ia, la, ha), (ib, lb, hb) = iqm_ci(a), iqm_ci(b)
        overlap = "yes" if max(la, lb) <= min(ha, hb) else "no"
        lines.append(
            f"| {name} | {a.mean():.1f}, {ia:.1f} [{la:.1f}, {ha:.1f}] | {b.mean():.1f}, {ib:.1f} [{lb:.1f}, {hb:.1f}]"
            f" | {overlap} | {population['seconds']:.0f} s |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"agreement_{scale}.md").write_text(text)


if __name__ == "__main__":
    main()
