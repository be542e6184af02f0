"""Command line of the population trainer.

    python -m sb3_hanq.population --algo hanq --env DiscretePendulum-v1 --seeds 30 --gradient-steps 200000 \\
        --eval-freq 2000 --eval-episodes 10 --learning-rate 1e-3 3.16e-3 [--hyper-lr ...] [--tau ...] \\
        [--gamma ...] [--hyper-objective rg sg] [-params key:value ...] --out results.json

The grid is the product of the lists given. ``-params`` sets structural settings (``predictor``, ``main_norm``,
``meta_norm``, ``positive_scale``, ``predictor_bias``, ``symmetric``, ``metapredictor_outputs``, ``hyper_batch``,
``net_arch``, ``loss``, ``max_grad_norm``, ``lr_parameterization``); a Python list as value
(``main_norm:"['layer','l2']"``) makes it a grid dimension.
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any

from sb3_hanq.common.offline import PENDULUM_STARTS
from sb3_hanq.population.envs import BATCHED_ENV_IDS
from sb3_hanq.population.run import train_population
from sb3_hanq.population.trainer import ALGORITHMS, GROUP_PARAMS, MINIBATCH_STREAMS


def parse_params(items: list[str]) -> dict[str, Any]:
    """``key:value`` pairs; values are Python literals (``True``, ``0.5``, ``[64, 64]``) or else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition(":")
        if not sep or not key:
            raise ValueError(f"-params: expected key:value, got {item!r}")
        if key not in GROUP_PARAMS:
            raise ValueError(f"-params: unknown key {key!r}; expected one of {tuple(GROUP_PARAMS)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        params[key] = value
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_hanq.population",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--algo", required=True, choices=list(ALGORITHMS))
    parser.add_argument("--env", required=True, choices=list(BATCHED_ENV_IDS))
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (FIRST .. FIRST+N-1)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="first seed (default 0): e.g. --first-seed 10 --seeds 20 adds seeds 10-29 to a 10-seed run",
    )
    parser.add_argument("--gradient-steps", type=int, default=200_000)
    parser.add_argument("--eval-freq", type=int, default=2_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, nargs="+")
    parser.add_argument("--hyper-lr", type=float, nargs="+", help="kappa values")
    parser.add_argument("--tau", type=float, nargs="+", help="target update rates beta (1: no target network)")
    parser.add_argument("--gamma", type=float, nargs="+")
    parser.add_argument("--hyper-objective", nargs="+", choices=["rg", "sg"])
    parser.add_argument("-params", "--params", nargs="+", default=[], metavar="KEY:VALUE")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-samples", type=int, help="dataset size per seed (default: the paper's)")
    parser.add_argument("--target-update-interval", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the minibatch indices")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="results JSON (a .md summary and a checkpoint go beside it)")
    parser.add_argument(
        "--pendulum-start",
        default="episodes",
        choices=list(PENDULUM_STARTS),
        help="how Pendulum's dataset is collected (see sb3_hanq.offline.collect_dataset)",
    )
    parser.add_argument(
        "--minibatch-stream",
        choices=list(MINIBATCH_STREAMS),
        help="member: each member samples from its own stream (seeded by --seed and its seed; the default for new "
        "runs); population: one stream for the run (runs before this option). Default: a resumed run's own",
    )
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the forward and backward passes (1.5-2.6x faster on 2 CPU cores, 5-25 s to compile)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch as th

    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        th.set_num_threads(args.threads)
    if args.seeds < 1 or args.first_seed < 0:
        print("error: --seeds must be >= 1 and --first-seed >= 0", file=sys.stderr)
        return 2
    try:
        train_population(
            algo=args.algo,
            env_id=args.env,
            seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
            gradient_steps=args.gradient_steps,
            eval_freq=args.eval_freq,
            eval_episodes=args.eval_episodes,
            learning_rate=args.learning_rate,
            hyper_lr=args.hyper_lr,
            tau=args.tau,
            gamma=args.gamma,
            hyper_objective=args.hyper_objective,
            params=parse_params(args.params),
            batch_size=args.batch_size,
            n_samples=args.n_samples,
            target_update_interval=args.target_update_interval,
            device=args.device,
            out=args.out,
            progress_bar=not args.no_progress_bar,
            seed=args.seed,
            compile=args.compile,
            pendulum_start=args.pendulum_start,
            minibatch_stream=args.minibatch_stream,
        )
    except (ValueError, TypeError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
