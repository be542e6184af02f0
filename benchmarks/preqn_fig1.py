"""PreQN paper §5.1, Fig. 1 (and Appendix C.1): NTK row ratio and diagonal of freshly initialised critics.

    python benchmarks/preqn_fig1.py [--env HalfCheetah-v5] [--samples 1000] [--seeds 3] [--init default]

Data: ``--samples`` state-action pairs from a "rails-random" policy on a gymnasium MuJoCo environment:
``a = sign(u), u ~ Unif(action space)`` (clipped to the action bounds, which are [-1, 1] for HalfCheetah and
Hopper), rolling the environment from ``reset(seed=--data-seed)`` and resetting at the end of an episode; the
pair is (s_t, a_t), the observation the action was taken in. The same data is used for every network.

Networks: the critic of :class:`sb3_hanq.preqn.policies.PreQNPolicy` (SB3's ``ContinuousCritic``,
``Q(s, a) = MLP(cat(s, a))`` with 2 hidden layers of width 32, 64, 128 or 256, the activation
``critic_activation`` = relu / tanh / sin, raw observations), built exactly as PreQN builds it, with PyTorch's
default initialisation (``--init xavier`` instead uses Glorot-uniform weights and zero biases, the default of
TensorFlow, which the paper's code base presumably used; an extra, not PreQN's set-up). For each of
``--seeds`` initialisations (``torch.manual_seed(seed)`` before the policy is built) we compute the NTK
K (N x N) with the package's :func:`sb3_hanq.common.ntk.batch_ntk` (layerwise, float32 as in PreQN) and
report ``mean_i R_i`` with ``R_i = (1/N) sum_{j != i} |K_ij| / K_ii`` (:func:`ntk_row_ratio`) and
``mean_i K_ii`` (:func:`ntk_diagonal`).

Writes ``benchmarks/results/<tag>.json`` (raw numbers), ``<tag>.md`` (table and comparison with the paper's
claims) and ``<tag>.png`` (row ratio and diagonal vs width, mean with min-max band over initialisations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch as th
from torch import nn

from sb3_hanq.common.ntk import batch_ntk, ntk_diagonal, ntk_row_ratio
from sb3_hanq.preqn.policies import PreQNPolicy

RESULTS = Path(__file__).parent / "results"
ACTIVATIONS = ("relu", "tanh", "sin")
WIDTHS = (32, 64, 128, 256)
COLOURS = {"relu": "tab:blue", "tanh": "tab:orange", "sin": "tab:green"}


def rails_random(env_id: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, int, tuple]:
    """``n`` pairs (s_t, a_t) with ``a_t = sign(u_t)``, ``u_t ~ Unif(A)``; also the number of episodes started."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    low, high = env.action_space.low, env.action_space.high
    obs, _ = env.reset(seed=seed)
    observations, actions, episodes = [], [], 1
    for _ in range(n):
        action = np.clip(np.sign(env.action_space.sample()), low, high).astype(env.action_space.dtype)
        observations.append(obs)
        actions.append(action)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
            episodes += 1
    spaces = (env.observation_space, env.action_space)
    env.close()
    return np.array(observations), np.array(actions), episodes, spaces


def make_critic(spaces, width: int, activation: str, seed: int, init: str) -> nn.Module:
    th.manual_seed(seed)
    policy = PreQNPolicy(
        spaces[0], spaces[1], lr_schedule=lambda _: 1e-3, net_arch=[width, width], critic_activation=activation
    )
    critic = policy.critic
    if init == "xavier":
        for module in critic.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
    return critic


def comparison(cells: dict) -> list[str]:
    """The paper's qualitative claims of §5.1 (2 hidden layers), checked against our numbers."""

    def mean(act, width, key):
        return cells[f"{act}/{width}"][f"{key}_mean"]

    lines = []
    lowest = {w: min(ACTIVATIONS, key=lambda a: mean(a, w, "row_ratio")) for w in WIDTHS}
    highest_rr = {w: max(ACTIVATIONS, key=lambda a: mean(a, w, "row_ratio")) for w in WIDTHS}
    highest_diag = {w: max(ACTIVATIONS, key=lambda a: mean(a, w, "diag")) for w in WIDTHS}
    fmt = ", ".join
    sin_vs_relu = fmt(f"{w}: {mean('sin', w, 'diag') / mean('relu', w, 'diag'):.2f}x" for w in WIDTHS)
    lines.append(
        "* Paper: relu nets 'commonly have the largest on-diagonal elements and row ratios'. Here, largest row "
        f"ratio per width: {fmt(f'{w}: {a}' for w, a in highest_rr.items())}; largest diagonal per width: "
        f"{fmt(f'{w}: {a}' for w, a in highest_diag.items())}."
    )
    lines.append(
        "* Paper: sin nets are in a 'sweet spot' of high on-diagonal and low off-diagonal elements (§5.2: 'for sin "
        "networks, the NTK is closer to diagonal'). Here, lowest row ratio per width: "
        f"{fmt(f'{w}: {a}' for w, a in lowest.items())}; sin's diagonal relative to relu's per width: "
        f"{sin_vs_relu}."
    )
    trends = []
    for act in ACTIVATIONS:
        diags = [mean(act, w, "diag") for w in WIDTHS]
        increasing = all(b > a for a, b in zip(diags, diags[1:]))
        trends.append(f"{act}: {'increasing' if increasing else 'not monotone'} ({diags[-1] / diags[0]:.2f}x 32->256)")
    lines.append(f"* Paper: diagonal elements 'tend to increase with width'. Here: {fmt(trends)}.")
    trends = []
    for act in ACTIVATIONS:
        ratios = [mean(act, w, "row_ratio") for w in WIDTHS]
        trends.append(f"{act}: {' -> '.join(f'{r:.3f}' for r in ratios)}")
    lines.append(
        "* Paper: row ratios 'do not clearly correlate with width'. Here (mean over inits, widths 32 -> 256): "
        f"{fmt(trends)}."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5", help="e.g. HalfCheetah-v5 or Hopper-v5")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3, help="network initialisations per cell")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--init", choices=("default", "xavier"), default="default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None, help="output name (default preqn_fig1, with env/init suffixes)")
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    tag = args.tag or "preqn_fig1" + ("" if args.env == "HalfCheetah-v5" else f"_{args.env.split('-')[0].lower()}")
    if args.tag is None and args.init != "default":
        tag += f"_{args.init}"
    command = (
        f"python benchmarks/preqn_fig1.py --env {args.env} --samples {args.samples} --seeds {args.seeds} "
        f"--data-seed {args.data_seed} --init {args.init} --threads {args.threads}"
        + (f" --tag {args.tag}" if args.tag else "")
    )
    observations, actions, episodes, spaces = rails_random(args.env, args.samples, args.data_seed)
    obs_t, act_t = th.as_tensor(observations, dtype=th.float32), th.as_tensor(actions, dtype=th.float32)
    start = time.perf_counter()
    cells = {}
    for act in ACTIVATIONS:
        for width in WIDTHS:
            row_ratios, diags = [], []
            for seed in range(args.seeds):
                critic = make_critic(spaces, width, act, seed, args.init)
                kernel = batch_ntk(critic, obs_t, act_t)
                assert kernel.shape == (args.samples, args.samples)
                row_ratios.append(float(ntk_row_ratio(kernel).mean()))
                diags.append(float(ntk_diagonal(kernel).mean()))
            cells[f"{act}/{width}"] = dict(
                row_ratio=row_ratios,
                diag=diags,
                row_ratio_mean=statistics.mean(row_ratios),
                row_ratio_std=statistics.stdev(row_ratios) if len(row_ratios) > 1 else 0.0,
                diag_mean=statistics.mean(diags),
                diag_std=statistics.stdev(diags) if len(diags) > 1 else 0.0,
            )
            print(f"{act:5s} width {width:3d}: row ratio {row_ratios}, diag {diags}", flush=True)
    results = dict(
        command=command,
        args=vars(args),
        data=dict(
            n=args.samples,
            episodes=episodes,
            obs_dim=int(observations.shape[1]),
            action_dim=int(actions.shape[1]),
            obs_abs_mean=float(np.abs(observations).mean()),
            obs_abs_max=float(np.abs(observations).max()),
        ),
        machine=dict(
            processor=platform.processor() or platform.machine(),
            torch=th.__version__,
            threads=args.threads,
            load=os.getloadavg(),
            seconds=time.perf_counter() - start,
        ),
        cells=cells,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(results, indent=2))
    plot(cells, args, RESULTS / f"{tag}.png")
    text = render(results, tag)
    print(text)
    (RESULTS / f"{tag}.md").write_text(text)


def plot(cells: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "row_ratio", "average row ratio mean_i R_i"), (axes[1], "diag", "mean K_ii")):
        for act in ACTIVATIONS:
            values = np.array([cells[f"{act}/{w}"][key] for w in WIDTHS])
            ax.plot(WIDTHS, values.mean(axis=1), "o-", color=COLOURS[act], label=act)
            ax.fill_between(WIDTHS, values.min(axis=1), values.max(axis=1), color=COLOURS[act], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(WIDTHS, [str(w) for w in WIDTHS])
        ax.set_xlabel("hidden width (2 hidden layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(title="critic activation")
    fig.suptitle(
        f"NTK at initialisation, {args.samples} rails-random samples of {args.env} "
        f"({args.init} init; mean and min-max over {args.seeds} inits)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(res: dict, tag: str) -> str:
    args, cells, data = res["args"], res["cells"], res["data"]
    lines = [
        f"# PreQN paper Fig. 1: NTK row ratio and diagonal at initialisation ({args['env']})",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']['processor']}, torch {res['machine']['torch']}, {args['threads']} thread(s), CPU; "
        f"load average {res['machine']['load'][0]:.2f}; {res['machine']['seconds']:.0f} s for all networks.  ",
        f"Data: {data['n']} rails-random pairs (a = sign(u), u ~ Unif(A)) from {args['env']} "
        f"(obs dim {data['obs_dim']}, action dim {data['action_dim']}, {data['episodes']} episode(s), "
        f"raw observations: mean |s| {data['obs_abs_mean']:.2f}, max |s| {data['obs_abs_max']:.1f}), "
        f"data seed {args['data_seed']}.  ",
        "Networks: the critic of `PreQNPolicy` (Q(s, a) = MLP(cat(s, a)), 2 hidden layers), "
        + (
            "PyTorch default initialisation (as PreQN)"
            if args["init"] == "default"
            else "Glorot-uniform weights, zero biases (not PreQN's default)"
        )
        + f", {args['seeds']} initialisations (seeds 0..{args['seeds'] - 1}) per cell; K from "
        "`sb3_hanq.common.ntk.batch_ntk` (float32). Row ratio: mean_i R_i, R_i = (1/N) sum_{j != i} |K_ij| / K_ii. "
        f"Plot: `benchmarks/results/{tag}.png`.",
        "",
        "| activation | width | row ratio (mean ± std) | per init | mean K_ii (mean ± std) | per init |",
        "|---|---|---|---|---|---|",
    ]
    for act in ACTIVATIONS:
        for width in WIDTHS:
            c = cells[f"{act}/{width}"]
            lines.append(
                f"| {act} | {width} | {c['row_ratio_mean']:.4f} ± {c['row_ratio_std']:.4f} | "
                f"{', '.join(f'{x:.4f}' for x in c['row_ratio'])} | {c['diag_mean']:.4g} ± {c['diag_std']:.2g} | "
                f"{', '.join(f'{x:.4g}' for x in c['diag'])} |"
            )
    lines += [
        "",
        "## Comparison with the paper (generated from the numbers above)",
        "",
        "The paper's figures are not available to us as numbers (only its text), so we check its stated "
        "qualitative findings for 2-hidden-layer networks (§5.1; Fig. 1 is Walker2d-v2, Appendix C.1 Fig. 5 "
        "HalfCheetah-v2; MuJoCo -v2 environments and TensorFlow-era initialisation, ours are gymnasium -v5 and "
        "PyTorch's):",
        "",
        *comparison(cells),
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
