"""Reduced-scale Fig. 2 / Fig. 4 of the CrossQ + WN paper: CrossQ vs CrossQ + WN at UTD 1 and 5 on MuJoCo.

    # 1. single-threaded gradient-step time of both algorithms at the chosen widths (to size the runs)
    python benchmarks/crossq_wn_fig2.py --measure
    # 2. one run (one process), writing benchmarks/results/crossq_wn_fig2/<env>_<algo>_utd<k>_seed<s>.json
    python benchmarks/crossq_wn_fig2.py --env Hopper-v5 --algo crossq_wn --utd 5 --steps 8000
    # 3. the whole queue, one run after the other (each a subprocess; finished runs are skipped)
    nohup python benchmarks/crossq_wn_fig2.py --queue > /tmp/crossq_wn_fig2.log 2>&1 &
    # 4. figure and report from whatever JSONs exist
    python benchmarks/crossq_wn_fig2.py --plot

Both algorithms use the same widths (``--critic-width`` x 2 hidden layers, two critics; ``--actor-width`` x 2),
batch 256, policy delay 3, learning rate 1e-4 for actor, critic and temperature, Adam(W) betas (0.9, 0.999),
initial temperature 1 and target entropy -dim(A), batch-renorm momentum 0.01 (the paper's Flax 0.99), i.e.
the CrossQ and CrossQ + WN columns of Appendix C, Table 1. They differ only where the paper's algorithms do:
CrossQ + WN (``sb3_hanq.CrossQWN`` defaults) adds the unit-norm projection of the hidden layers, AdamW weight
decay 1e-2 on the unprojected parameters and a target critic (tau 0.005); CrossQ (``sb3_contrib.CrossQ``)
has Adam without decay and no target network.

Every ``--eval-freq`` environment steps (and once before learning) the run records the mean return of
``--eval-episodes`` deterministic episodes on a separate environment, and the critic weight norm of Fig. 2
(row 3): :func:`sb3_hanq.common.weight_norm.dense_weight_norm` of ``model.critic`` (sum over all dense layers
of both critics of the Frobenius norm of their weights; the same quantity as ``train/critic_weight_norm``),
split also into its hidden layers and its output layers. The JSON is rewritten at every evaluation, so a
run cut short keeps its curve so far.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch as th
from bench_common import random_transitions
from sb3_contrib import CrossQ
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger
from torch import nn

from sb3_hanq import CrossQWN
from sb3_hanq.common.weight_norm import dense_weight_norm, find_projected_layers

RESULTS = Path(__file__).parent / "results"
RUN_DIR = RESULTS / "crossq_wn_fig2"
ALGOS = {"crossq": "CrossQ", "crossq_wn": "CrossQ + WN", "crossq_wn_tau1": "CrossQ + WN, no target (tau 1)"}
ENVS = ("HalfCheetah-v5", "Hopper-v5")
LR = 1e-4  # Appendix C, Table 1, both algorithms

# The queue: (env, algo, utd, env steps, eval every). Sized with --measure so that the total fits about 70 minutes on
# one shared core (see the report). Per task the four runs, Hopper first; within a task the UTD 5 pair first.
QUEUE = [
    ("Hopper-v5", "crossq", 5, 5000, 500),
    ("Hopper-v5", "crossq_wn", 5, 5000, 500),
    ("Hopper-v5", "crossq", 1, 14000, 1000),
    ("Hopper-v5", "crossq_wn", 1, 14000, 1000),
    ("HalfCheetah-v5", "crossq", 5, 5000, 500),
    ("HalfCheetah-v5", "crossq_wn", 5, 5000, 500),
    ("HalfCheetah-v5", "crossq", 1, 14000, 1000),
    ("HalfCheetah-v5", "crossq_wn", 1, 14000, 1000),
]
# Where CrossQ + WN trailed CrossQ most (HalfCheetah, UTD 5): is it the target critic or the projection + AdamW?
# The WN variant without a target network (tau=1.0), and a second seed of all three.
ABLATION_QUEUE = [
    ("HalfCheetah-v5", "crossq_wn_tau1", 5, 5000, 500, 0),
    ("HalfCheetah-v5", "crossq", 5, 5000, 500, 1),
    ("HalfCheetah-v5", "crossq_wn", 5, 5000, 500, 1),
    ("HalfCheetah-v5", "crossq_wn_tau1", 5, 5000, 500, 1),
]


def make_model(algo: str, env, utd: int, args, seed: int):
    net_arch = {"pi": [args.actor_width] * 2, "qf": [args.critic_width] * 2}
    common = dict(
        learning_rate=LR,
        learning_starts=args.learning_starts,
        batch_size=256,
        train_freq=1,
        gradient_steps=utd,
        policy_delay=3,
        buffer_size=max(args.steps, 1000),
        seed=seed,
        device="cpu",
        verbose=0,
    )
    if algo == "crossq":
        # Appendix C's CrossQ column: Adam with betas (0.9, 0.999) (sb3-contrib's default is (0.5, 0.999)).
        kwargs = dict(policy_kwargs=dict(net_arch=net_arch, optimizer_kwargs=dict(betas=(0.9, 0.999))))
        return CrossQ("MlpPolicy", env, **common, **kwargs)
    tau = 1.0 if algo == "crossq_wn_tau1" else 0.005
    return CrossQWN("MlpPolicy", env, **common, tau=tau, policy_kwargs=dict(net_arch=net_arch))


def critic_norms(critic: nn.Module) -> dict[str, float]:
    hidden = [layer for q_net in critic.q_networks for layer in find_projected_layers(q_net)]
    hidden_ids = {id(m) for m in hidden}
    output = [m for m in critic.modules() if isinstance(m, nn.Linear) and id(m) not in hidden_ids]
    with th.no_grad():
        return dict(
            critic_weight_norm=dense_weight_norm(critic).item(),
            critic_hidden_norm=sum(th.linalg.vector_norm(m.weight).item() for m in hidden),
            critic_output_norm=sum(th.linalg.vector_norm(m.weight).item() for m in output),
        )


class EvalRecorder(BaseCallback):
    """Evaluate and record the critic weight norm every ``eval_freq`` env steps; rewrite the JSON each time."""

    def __init__(self, record: dict, path: Path, eval_env, eval_freq: int, n_episodes: int, max_seconds: float):
        super().__init__()
        self.record, self.path, self.eval_env = record, path, eval_env
        self.eval_freq, self.n_episodes, self.max_seconds = eval_freq, n_episodes, max_seconds
        self.start = time.perf_counter()

    def evaluate(self) -> None:
        t0 = time.perf_counter()
        returns, lengths = evaluate_policy(
            self.model, self.eval_env, n_eval_episodes=self.n_episodes, deterministic=True, return_episode_rewards=True
        )
        self.record["evals"].append(
            dict(
                timesteps=self.num_timesteps,
                n_updates=self.model._n_updates,
                mean_return=float(np.mean(returns)),
                returns=[float(r) for r in returns],
                lengths=[int(n) for n in lengths],
                ent_coef=float(th.exp(self.model.log_ent_coef.detach()).item()),
                wall_seconds=time.perf_counter() - self.start,
                eval_seconds=time.perf_counter() - t0,
                **critic_norms(self.model.critic),
            )
        )
        self.record["wall_seconds"] = time.perf_counter() - self.start
        write_json(self.path, self.record)

    def _on_training_start(self) -> None:
        self.evaluate()

    def _on_step(self) -> bool:
        if self.num_timesteps % self.eval_freq == 0:
            self.evaluate()
        if time.perf_counter() - self.start > self.max_seconds:
            self.record["stopped_early"] = f"wall-clock budget of {self.max_seconds:.0f} s reached"
            if self.num_timesteps % self.eval_freq != 0:
                self.evaluate()
            return False
        return True


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def run_path(env_id: str, algo: str, utd: int, seed: int) -> Path:
    return RUN_DIR / f"{env_id}_{algo}_utd{utd}_seed{seed}.json"


def run(args) -> None:
    th.set_num_threads(args.threads)
    path = run_path(args.env, args.algo, args.utd, args.seed)
    env, eval_env = gym.make(args.env), gym.make(args.env)
    eval_env.reset(seed=args.seed + 1000)
    model = make_model(args.algo, env, args.utd, args, args.seed)
    model.set_logger(Logger(folder=None, output_formats=[]))
    record = dict(
        env=args.env,
        algo=args.algo,
        utd=args.utd,
        seed=args.seed,
        target_steps=args.steps,
        config=dict(
            critic=[args.critic_width] * 2,
            actor=[args.actor_width] * 2,
            n_critics=2,
            learning_rate=LR,
            batch_size=256,
            policy_delay=3,
            learning_starts=args.learning_starts,
            gradient_steps=args.utd,
            eval_freq=args.eval_freq,
            eval_episodes=args.eval_episodes,
            tau=model.tau if args.algo.startswith("crossq_wn") else "none (no target network)",
            optimizer=type(model.critic.optimizer).__name__,
            optimizer_defaults={k: str(v) for k, v in model.critic.optimizer.defaults.items()},
        ),
        machine=dict(torch=th.__version__, threads=args.threads, loadavg_start=os.getloadavg()),
        command=" ".join(["python", "benchmarks/crossq_wn_fig2.py", *sys.argv[1:]]),
        evals=[],
        finished=False,
    )
    callback = EvalRecorder(record, path, eval_env, args.eval_freq, args.eval_episodes, 60 * args.max_minutes)
    model.learn(total_timesteps=args.steps, callback=callback)
    if record["evals"][-1]["timesteps"] != model.num_timesteps:
        callback.evaluate()
    record["finished"] = "stopped_early" not in record
    record["env_steps_done"] = model.num_timesteps
    record["machine"]["loadavg_end"] = os.getloadavg()
    write_json(path, record)
    print(
        f"{path.name}: {model.num_timesteps} steps, final return {record['evals'][-1]['mean_return']:.1f}, "
        f"weight norm {record['evals'][-1]['critic_weight_norm']:.2f}, {record['wall_seconds']:.0f} s",
        flush=True,
    )


def measure(args) -> None:
    """Gradient steps per second of both algorithms at the chosen widths, on random HalfCheetah data."""
    th.set_num_threads(args.threads)
    env_id = "HalfCheetah-v5"
    buffer = random_transitions(env_id, 5000, seed=0)
    models = {}
    for algo in ("crossq", "crossq_wn"):
        model = make_model(algo, env_id, 1, args, 0)
        model.set_logger(Logger(folder=None, output_formats=[]))
        model.replay_buffer = buffer
        model.train(gradient_steps=20, batch_size=256)
        models[algo] = model
    times = {algo: [] for algo in models}
    for _ in range(3):
        for algo, model in models.items():
            t0 = time.perf_counter()
            model.train(gradient_steps=100, batch_size=256)
            times[algo].append((time.perf_counter() - t0) / 100)
    # environment-step + policy overhead per env step (collect_rollouts without training)
    model = models["crossq"]
    model.learning_starts = 10**9
    t0 = time.perf_counter()
    model.learn(total_timesteps=1000, reset_num_timesteps=True)
    per_env_step = (time.perf_counter() - t0) / 1000
    for algo, ts in times.items():
        print(f"{algo}: {1000 * np.median(ts):.2f} ms / gradient step ({1 / np.median(ts):.1f} steps/s)")
    print(f"env step + predict (random-action warm-up path): {1000 * per_env_step:.2f} ms")
    print(f"loadavg {os.getloadavg()}")


def queue(args) -> None:
    deadline = time.time() + 60 * args.queue_minutes
    jobs = [(*job, args.seed) for job in QUEUE] if args.queue == "main" else ABLATION_QUEUE
    for env_id, algo, utd, steps, eval_freq, seed in jobs:
        path = run_path(env_id, algo, utd, seed)
        if path.exists() and json.loads(path.read_text()).get("finished"):
            print(f"skip {path.name} (finished)", flush=True)
            continue
        minutes = min(args.max_minutes, (deadline - time.time()) / 60)
        if minutes < 2:
            print(f"skip {path.name} (queue deadline)", flush=True)
            continue
        cmd = [sys.executable, __file__, "--env", env_id, "--algo", algo, "--utd", str(utd), "--steps", str(steps)]
        cmd += ["--seed", str(seed), "--eval-freq", str(eval_freq), "--max-minutes", f"{minutes:.1f}"]
        print(time.strftime("%H:%M:%S"), " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=False)
    print(time.strftime("%H:%M:%S"), "queue done", flush=True)


def load_runs() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RUN_DIR.glob("*.json"))]


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in load_runs() if r["evals"]]
    colours = {"crossq": "tab:blue", "crossq_wn": "tab:orange", "crossq_wn_tau1": "tab:green"}
    styles = {1: "-", 5: "--"}
    rows = [
        ("mean_return", "eval return (deterministic)"),
        ("critic_weight_norm", "critic weight norm\n(sum of dense-layer L2 norms)"),
        ("critic_hidden_norm", "hidden layers only"),
    ]
    fig, axes = plt.subplots(len(rows), len(ENVS), figsize=(11, 9), sharex="col", squeeze=False)
    for j, env_id in enumerate(ENVS):
        for i, (key, label) in enumerate(rows):
            ax = axes[i, j]
            for r in runs:
                if r["env"] != env_id:
                    continue
                x = [e["timesteps"] for e in r["evals"]]
                y = [e[key] for e in r["evals"]]
                name = f"{ALGOS[r['algo']]} UTD {r['utd']}" + (f" seed {r['seed']}" if r["seed"] else "")
                name += "" if r.get("finished") else " (unfinished)"
                ls = styles.get(r["utd"], ":") if r["seed"] == 0 else ":"
                ax.plot(x, y, color=colours[r["algo"]], ls=ls, marker=".", label=name)
            if i == 0:
                ax.set_title(env_id)
            if j == 0:
                ax.set_ylabel(label)
            if i == len(rows) - 1:
                ax.set_xlabel("environment steps")
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=8)
    fig.suptitle("CrossQ vs CrossQ + WN, reduced-scale Fig. 2 / 4 (seed 0; HalfCheetah UTD 5 also seed 1, dotted)")
    fig.tight_layout()
    fig.savefig(RESULTS / "crossq_wn_fig2.png", dpi=110)
    write_report(runs)


def write_report(runs: list[dict]) -> None:
    cfg = runs[0]["config"] if runs else {}
    lines = [
        "# CrossQ vs CrossQ + WN: reduced-scale Fig. 2 / Fig. 4",
        "",
        "Commands:",
        "",
        "```",
        "python benchmarks/crossq_wn_fig2.py --measure",
        "nohup python benchmarks/crossq_wn_fig2.py --queue > /tmp/crossq_wn_fig2.log 2>&1 &",
        "nohup python benchmarks/crossq_wn_fig2.py --queue ablation > /tmp/crossq_wn_ablation.log 2>&1 &",
        "python benchmarks/crossq_wn_fig2.py --plot",
        "```",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"torch {th.__version__}, 1 thread per run, one run at a time. Figure: `crossq_wn_fig2.png` "
        "(rows: return, critic weight norm, its hidden-layer part; columns: tasks; colour: algorithm; "
        "line style: UTD). Per-run curves: `crossq_wn_fig2/*.json`.",
        "",
        "## Settings (both algorithms)",
        "",
        f"- critic {cfg.get('critic')} x 2 critics, actor {cfg.get('actor')}, batch 256, policy delay 3, "
        f"learning rate {cfg.get('learning_rate')} (actor, critic, temperature), betas (0.9, 0.999), initial "
        "temperature 1, target entropy -dim(A), batch-renorm momentum 0.01 (= Flax 0.99), renorm warm-up 100k "
        "updates (so batch statistics throughout these short runs), discount 0.99;",
        f"- warm-up (random actions) {cfg.get('learning_starts')} env steps; UTD k = `gradient_steps=k`, "
        "`train_freq=1`;",
        f"- evaluation (and before learning): {cfg.get('eval_episodes')} deterministic episodes on a separate "
        "env, every 500 (UTD 5) / 1000 (UTD 1) env steps; critic norm at the same points;",
        "- CrossQ: `sb3_contrib.CrossQ`, Adam, no weight decay, no target network;",
        "- CrossQ + WN: `sb3_hanq.CrossQWN` defaults: row-wise unit-norm projection of the hidden layers of "
        "critic and actor after every step, AdamW decay 1e-2 on unprojected parameters, target critic "
        "tau 0.005.",
        "- CrossQ + WN, no target (tau 1): the same with `tau=1.0` (CrossQ's target-free joint pass), to tell the "
        "target critic's effect from the projection's.",
        "",
        "## Deviations from the paper",
        "",
        "- MuJoCo (HalfCheetah-v5, Hopper-v5) instead of DMC / MyoSuite; no action repeat (Table 1 uses 2);",
        f"- critic width {cfg.get('critic')} instead of [512, 512] (compute budget: 1 shared CPU core, 6-12 min "
        "per run); actor [256, 256] as in the paper;",
        "- 1 seed instead of 10 (2 seeds, plus the no-target ablation, on HalfCheetah UTD 5; no IQM, no confidence "
        "intervals); 5k (UTD 5, 20k updates) / 14k (UTD 1, 13k "
        "updates) env steps instead of 1M; warm-up 1000 transitions instead of 5000; evaluation every 500 (UTD 5) "
        "/ 1000 (UTD 1) env steps with 3 episodes instead of the paper's cadence;",
        "- UTD 1 and 5 only (Fig. 4 also has an intermediate UTD); no SAC baseline, no Q-bias row of Fig. 2.",
        "",
        "## Results",
        "",
        "| task | algorithm | UTD | seed | env steps | grad steps | final return | mean return (all evals) | "
        "best return | critic norm start -> end (ratio) | hidden-layer norm start -> end (ratio) | "
        "output-layer norm start -> end | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["env"], r["utd"], r["algo"], r["seed"])):
        ev = r["evals"]
        first, last = ev[0], ev[-1]
        status = "" if r.get("finished") else " (unfinished)"
        lines.append(
            f"| {r['env']} | {ALGOS[r['algo']]} | {r['utd']} | {r['seed']} | {last['timesteps']}{status} | "
            f"{last['n_updates']} | "
            f"{last['mean_return']:.0f} | {np.mean([e['mean_return'] for e in ev]):.0f} | "
            f"{max(e['mean_return'] for e in ev):.0f} | "
            f"{first['critic_weight_norm']:.1f} -> {last['critic_weight_norm']:.1f} "
            f"({last['critic_weight_norm'] / first['critic_weight_norm']:.2f}) | "
            f"{first['critic_hidden_norm']:.1f} -> {last['critic_hidden_norm']:.1f} "
            f"({last['critic_hidden_norm'] / first['critic_hidden_norm']:.2f}) | "
            f"{first['critic_output_norm']:.2f} -> {last['critic_output_norm']:.2f} | "
            f"{r.get('wall_seconds', 0) / 60:.1f} |"
        )
    lines += [
        "",
        "Norms are measured at the evaluation points with `dense_weight_norm(model.critic)` (all dense layers "
        "of both critics, Fig. 2 row 3). Under CrossQ + WN each projected hidden layer has unit-norm rows, so "
        "its Frobenius norm is sqrt(width) by construction and only the output layers can move; CrossQ's "
        "hidden layers start at the PyTorch default initialisation (about sqrt(width / 3) per layer), which "
        "is why the absolute curves start at different levels: compare growth (ratios), not levels.",
        "",
    ]
    (RESULTS / "crossq_wn_fig2.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="time gradient steps of both algorithms")
    parser.add_argument(
        "--queue", nargs="?", const="main", choices=("main", "ablation"), help="run QUEUE (or ABLATION_QUEUE) in turn"
    )
    parser.add_argument("--plot", action="store_true", help="figure + report from the existing JSONs")
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--algo", choices=sorted(ALGOS), default="crossq_wn")
    parser.add_argument("--utd", type=int, default=1)
    parser.add_argument("--steps", type=int, default=15000, help="environment steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--critic-width", type=int, default=256)
    parser.add_argument("--actor-width", type=int, default=256)
    parser.add_argument("--eval-freq", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=3)
    parser.add_argument("--max-minutes", type=float, default=12.0, help="wall-clock budget of one run")
    parser.add_argument("--queue-minutes", type=float, default=80.0, help="wall-clock budget of the whole queue")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.measure:
        measure(args)
    elif args.queue:
        queue(args)
    elif args.plot:
        plot(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
