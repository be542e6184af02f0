"""STAC / STACX metaparameters during training (the STAC paper's Fig. 5 style) and returns against SB3's A2C.

    python benchmarks/stac_metaparams.py [--envs CartPole-v1 Pendulum-v1] [--seeds 3]
        [--timesteps CartPole-v1=500000 Pendulum-v1=200000] [--workers 1]

For every environment, configuration and seed: one training run of ``--timesteps`` environment steps with
8 environments and ``n_steps=20`` (160 steps per update), the same network for everybody (MLP torso (256, 256),
policy and value heads of 256 hidden units, STAC paper Table 2), evaluation every ``--eval-freq`` steps on
``--eval-episodes`` deterministic episodes. For STAC and STACX we record sigma(eta) of every head every
``--meta-every`` updates: gamma, lambda, alpha as used in the inner loss, and the loss weights g_v, g_p, g_e
*without* their outer factor, exactly what the paper's Fig. 5 plots (§4.3). Configurations:

- STAC: all six metaparameters self-tuned (Table 3 defaults: RMSProp 1e-3 -> 1e-4, meta-Adam 1e-3, eta 4.6);
- STACX: the same with 3 heads (head 1 acts; heads 2-3 are the self-tuned auxiliary tasks, §3.2);
- STAC, nothing self-tuned: the same agent with the outer hyperparameters fixed (the paper's IMPALA baseline);
- A2C: SB3's A2C with its own defaults (learning rate 7e-4, RMSProp eps 1e-5, vf_coef 0.5, ent_coef 0,
  max_grad_norm 0.5) on the same rollouts and network.

Returns are aggregated over seeds with rliable's IQM and 95% stratified-bootstrap confidence intervals, for the
final score (mean of the last ``--final-evals`` evaluations) and the average over all evaluations. Raw results
go to ``benchmarks/results/<tag>.json`` after every run (a cut-off run keeps what finished); ``--from-json``
re-makes the table and plot. The paper trains for 30M (control) to 200M (Atari) steps: here a run is far shorter,
so the metaparameters have far fewer meta-updates in which to move (Adam moves a logit by about 1e-3 per update).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from stac_models import make_model

RESULTS = Path(__file__).parent / "results"
META_NAMES = ("gamma", "lambda", "alpha", "g_v", "g_p", "g_e")
N_ENVS, N_STEPS = 8, 20

# name -> (algorithm, constructor kwargs)
CONFIGS: dict[str, tuple[str, dict]] = {
    "STAC": ("STAC", dict()),
    "STACX (3 heads)": ("STAC", dict(n_heads=3)),
    "STAC, nothing self-tuned": ("STAC", dict(self_tune=())),
    "A2C (SB3)": ("A2C", dict()),
}
DEFAULT_TIMESTEPS = {"CartPole-v1": 500_000, "Pendulum-v1": 200_000}


def run_one(
    env_id: str, name: str, seed: int, timesteps: int, eval_freq: int, eval_episodes: int, meta_every: int
) -> dict:
    import torch as th

    th.set_num_threads(1)
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    algo, kwargs = CONFIGS[name]
    model = make_model(algo, kwargs, env_id, seed)
    eval_env = make_vec_env(env_id, n_envs=5, seed=100_000 + seed)
    record: dict[str, list] = dict(eval_steps=[], eval_returns=[], meta_steps=[], train_returns=[], sigma_eta=[])

    def sigma_eta() -> list[list[float]]:
        """sigma(eta) per head, in META_NAMES order (Fig. 5: the loss weights without their outer factor)."""
        zeta = np.array([model.metaparameters[k] for k in META_NAMES]).T  # [heads, 6]
        outer = np.array([1.0, 1.0, 1.0, model.vf_coef, model.pg_coef, model.ent_coef])
        return (zeta / outer).tolist()

    class Recorder(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next_eval = 0

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_eval:
                self.evaluate()
            return True

        def evaluate(self) -> None:
            returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True)
            record["eval_steps"].append(int(self.num_timesteps))
            record["eval_returns"].append(float(returns))
            self.next_eval += eval_freq

        def _on_rollout_end(self) -> None:
            # Called before train(): the state after the previous update, every `meta_every` updates.
            updates = self.num_timesteps // (N_ENVS * N_STEPS) - 1
            if updates % meta_every == 0:
                record["meta_steps"].append(int(self.num_timesteps - N_ENVS * N_STEPS))
                episodes = [info["r"] for info in model.ep_info_buffer]
                record["train_returns"].append(float(np.mean(episodes)) if episodes else float("nan"))
                if algo == "STAC":
                    record["sigma_eta"].append(sigma_eta())

    recorder = Recorder()
    start = time.perf_counter()
    model.learn(timesteps, callback=recorder)
    recorder.evaluate()  # at the end of training
    if algo == "STAC":
        record["meta_steps"].append(int(model.num_timesteps))
        record["sigma_eta"].append(sigma_eta())
        record["train_returns"].append(float(np.mean([info["r"] for info in model.ep_info_buffer])))
    return dict(env=env_id, name=name, seed=seed, seconds=time.perf_counter() - start, **record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="*", default=list(DEFAULT_TIMESTEPS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--timesteps", nargs="*", default=[], help="ENV=STEPS overrides, e.g. CartPole-v1=500000")
    parser.add_argument("--eval-freq", type=int, default=25_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--final-evals", type=int, default=3, help="evaluations averaged into the final score")
    parser.add_argument("--meta-every", type=int, default=10, help="record sigma(eta) every this many updates")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tag", default="stac_metaparams")
    parser.add_argument("--from-json", type=Path, help="re-make the table and plot from a saved runs file")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in <tag>.json, run the rest")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        report(saved["runs"], saved["command"], args)
        return

    timesteps = dict(DEFAULT_TIMESTEPS)
    for item in args.timesteps:
        env_id, steps = item.split("=")
        timesteps[env_id] = int(float(steps))
    command = (
        f"python benchmarks/stac_metaparams.py --envs {' '.join(args.envs)} --seeds {args.seeds} --timesteps "
        + " ".join(f"{e}={timesteps[e]}" for e in args.envs)
        + f" --eval-freq {args.eval_freq} --eval-episodes {args.eval_episodes} --final-evals {args.final_evals} "
        f"--meta-every {args.meta_every} --workers {args.workers} --tag {args.tag}"
    )
    if set(args.configs) != set(CONFIGS):
        command += " --configs " + " ".join(f'"{c}"' for c in args.configs)
    jobs = [(e, name, seed) for e in args.envs for seed in range(args.seeds) for name in args.configs]
    runs: list[dict] = []
    out = RESULTS / f"{args.tag}.json"
    if args.resume and out.exists():
        runs = [r for r in json.loads(out.read_text())["runs"] if (r["env"], r["name"], r["seed"]) in set(jobs)]
        done = {(r["env"], r["name"], r["seed"]) for r in runs}
        jobs = [job for job in jobs if job not in done]
        print(f"resuming: {len(runs)} runs kept, {len(jobs)} to run", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [
            pool.submit(run_one, e, name, seed, timesteps[e], args.eval_freq, args.eval_episodes, args.meta_every)
            for e, name, seed in jobs
        ]
        for future in futures:
            run = future.result()
            runs.append(run)
            out.write_text(json.dumps(dict(command=command, runs=runs)))  # raw results first, after every run
            print(
                f"{run['env']:12s} {run['name']:26s} seed {run['seed']}: final eval {run['eval_returns'][-1]:8.1f} "
                f"({run['seconds']:.0f} s)",
                flush=True,
            )
    report(runs, command, args)


def iqm_ci(scores: np.ndarray, name: str) -> tuple[float, float, float]:
    from rliable import library as rly
    from rliable import metrics

    iqm = lambda x: np.array([metrics.aggregate_iqm(x)])  # noqa: E731
    point, ci = rly.get_interval_estimates({name: scores[:, None]}, iqm, reps=2000)
    return float(point[name][0]), float(ci[name][0, 0]), float(ci[name][1, 0])


def report(runs: list[dict], command: str, args: argparse.Namespace) -> None:
    final_evals = args.final_evals
    envs = list(dict.fromkeys(r["env"] for r in runs))
    lines = [
        f"Command: `{command}`  ",
        f"{N_ENVS} environments, n_steps {N_STEPS}; network MLP torso (256, 256) + policy and value heads of 256 "
        "hidden units for all; evaluation on deterministic episodes. Final = mean of the last "
        f"{final_evals} evaluations, average = mean over all evaluations of a run; IQM and 95% CI over seeds by "
        "rliable (stratified bootstrap).",
        "",
    ]
    for env_id in envs:
        env_runs = [r for r in runs if r["env"] == env_id]
        steps = env_runs[0]["eval_steps"][-1]
        lines += [
            f"### {env_id}, {steps} steps",
            "",
            "| configuration | seeds | final return IQM [95% CI] | average return IQM [95% CI] | per-seed final | "
            "minutes per run |",
            "|---|---|---|---|---|---|",
        ]
        for name in CONFIGS:
            group = sorted((r for r in env_runs if r["name"] == name), key=lambda r: r["seed"])
            if not group:
                continue
            final = np.array([np.mean(r["eval_returns"][-final_evals:]) for r in group])
            average = np.array([np.mean(r["eval_returns"]) for r in group])
            f_iqm, f_lo, f_hi = iqm_ci(final, name)
            a_iqm, a_lo, a_hi = iqm_ci(average, name)
            minutes = np.mean([r["seconds"] for r in group]) / 60
            per_seed = ", ".join(f"{x:.1f}" for x in final)
            lines.append(
                f"| {name} | {len(group)} | {f_iqm:.1f} [{f_lo:.1f}, {f_hi:.1f}] | "
                f"{a_iqm:.1f} [{a_lo:.1f}, {a_hi:.1f}] | {per_seed} | {minutes:.1f} |"
            )
        lines += [
            "",
            f"sigma(eta) on {env_id}, mean over seeds at 0, 25, 50, 75 and 100% of training, and the range over "
            "seeds and training (loss weights without their outer factor, as the paper's Fig. 5):",
            "",
            "| configuration, head | metaparameter | 0% | 25% | 50% | 75% | 100% | min | max |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, n_heads in (("STAC", 1), ("STACX (3 heads)", 3)):
            group = [r for r in env_runs if r["name"] == name]
            if not group:
                continue
            length = min(len(r["sigma_eta"]) for r in group)
            sig = np.array([r["sigma_eta"][:length] for r in group])  # [seeds, time, heads, 6]
            mean = sig.mean(0)
            marks = [round(q * (length - 1)) for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
            for head in range(n_heads):
                for k, key in enumerate(META_NAMES):
                    cells = [f"{mean[i, head, k]:.4f}" for i in marks]
                    cells += [f"{sig[:, :, head, k].min():.4f}", f"{sig[:, :, head, k].max():.4f}"]
                    lines.append(f"| {name}, head {head + 1} | {key} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"{args.tag}.md").write_text(text)
    plot(runs, envs, RESULTS / f"{args.tag}.png")


def plot(runs: list[dict], envs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fig. 5's colours: head 1 blue, heads 2 and 3 orange and magenta; STAC (one head) green.
    lines = [("STAC", 0, "tab:green", "STAC"), ("STACX (3 heads)", 0, "tab:blue", "STACX head 1")]
    lines += [("STACX (3 heads)", 1, "tab:orange", "STACX head 2"), ("STACX (3 heads)", 2, "m", "STACX head 3")]
    returns_colours = {"STAC": "tab:green", "STACX (3 heads)": "tab:blue", "STAC, nothing self-tuned": "tab:gray"}
    returns_colours["A2C (SB3)"] = "k"
    fig, axes = plt.subplots(len(envs), 1 + len(META_NAMES), figsize=(25, 3.6 * len(envs)), squeeze=False)
    for row, env_id in zip(axes, envs):
        env_runs = [r for r in runs if r["env"] == env_id]
        ax = row[0]
        for name, colour in returns_colours.items():
            group = [r for r in env_runs if r["name"] == name]
            if not group:
                continue
            steps = np.array(group[0]["eval_steps"])
            values = np.array([r["eval_returns"][: len(steps)] for r in group])
            ax.plot(steps, values.mean(0), color=colour, label=name)
            ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15)
        ax.set_title(f"{env_id}: evaluation return")
        ax.set_xlabel("environment steps")
        ax.legend(fontsize=7)
        for k, (key, ax) in enumerate(zip(META_NAMES, row[1:])):
            for name, head, colour, label in lines:
                group = [r for r in env_runs if r["name"] == name]
                if not group:
                    continue
                length = min(len(r["sigma_eta"]) for r in group)
                steps = np.array(group[0]["meta_steps"][:length])
                values = np.array([[s[head][k] for s in r["sigma_eta"][:length]] for r in group])
                ax.plot(steps, values.mean(0), color=colour, label=label, lw=1.2)
                ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.12)
            title = {"g_v": "g_v / g_v^outer", "g_p": "g_p / g_p^outer", "g_e": "g_e / g_e^outer"}.get(key, key)
            ax.set_title(f"sigma(eta): {title}")
            ax.set_xlabel("environment steps")
            if k == 0:
                ax.legend(fontsize=7)
    fig.suptitle("STAC / STACX metaparameters during training (mean over seeds, shaded: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
