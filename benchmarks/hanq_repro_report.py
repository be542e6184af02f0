"""Tables and curves of the HANQ reproduction runs (issue #14), beside the paper's numbers.

    .venv/bin/python benchmarks/hanq_repro_report.py [results directory ...]

Reads every population results file (``python -m sb3_hanq.population ... --out X.json``) in the directories given
(default: ``benchmarks/results/hanq_repro`` and the 30-seed run in ``benchmarks/results/population``), and writes
``summary.md`` (per environment, one row per configuration: seeds, mean, rliable IQM with its 95% CI, the paper's
number where the paper has that configuration, the final learning rate and omega_scale^+), ``paper_tables.md``
(the paper's Tables 1-4, 7 and 8 as reproduced: each row's tuned best cell beside the paper's number, per
environment; :func:`paper_tables`) and ``curves*.png``
(score, learning rate and omega_scale^+ against gradient steps, mean with a 95% bootstrap band, as Figs. 3, 6
and 7; see :func:`figures`) into the first directory. Pendulum's rows are grouped by the dataset's reading
(``--pendulum-start``; "episodes", the default, first).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sb3_hanq.population.run import summarize
from sb3_hanq.population.trainer import param_defaults

ROOT = Path(__file__).resolve().parent
DEFAULT_DIRS = [ROOT / "results" / "hanq_repro", ROOT / "results" / "population"]

#: The paper's scores (HANQ paper, 30 seeds x 200k steps, best learning rate), per environment:
#: key -> (mean, CI low, CI high, where)
PAPER: dict[str, dict[tuple[Any, ...], tuple[float, float, float, str]]] = {
    "DiscretePendulum-v1": {
        # Table 1 in the paper's column order (the order of the generated tables' rows)
        ("dqn-none", "best"): (72.4, 61.0, 82.5, "Table 1, best beta"),
        ("dqn-layer", "best"): (83.0, 77.6, 87.9, "Table 1, best beta"),
        ("dqn-l2", "best"): (86.1, 80.9, 91.0, "Table 1, best beta"),
        ("dqn-none", 1.0): (30.0, 22.1, 37.0, "Table 1, beta = 1"),
        ("dqn-layer", 1.0): (40.1, 27.0, 53.6, "Table 1, beta = 1"),
        ("dqn-l2", 1.0): (31.9, 20.1, 43.0, "Table 1, beta = 1"),
        ("hanq", 0.1, "rg"): (100.1, 98.0, 102.2, "Table 1"),
        ("hanq", 0.1, "sg"): (98.7, 95.9, 101.2, "Table 7"),
        # Table 4: kappa = 0, (metapredictor's, main network's) normalisation; (l2, layer) is HANQ's
        ("hanq", "table4", "l2", "layer"): (79.2, 73.5, 84.1, "Table 4"),
        ("hanq", "table4", "layer", "l2"): (18.9, 15.4, 22.4, "Table 4"),
        ("hanq", "table4", "l2", "l2"): (8.2, 4.9, 11.2, "Table 4"),
        ("hanq", "table4", "layer", "layer"): (14.0, 11.2, 16.9, "Table 4"),
        ("hanq", "table4", "none", "l2"): (45.9, 40.5, 51.1, "Table 4"),
        ("hanq", "table4", "none", "layer"): (28.4, 24.3, 32.3, "Table 4"),
        ("hanq", "table4", "l2", "none"): (24.5, 21.7, 27.5, "Table 4"),
        ("hanq", "table4", "layer", "none"): (11.6, 9.1, 14.1, "Table 4"),
        ("hanq", "table4", "none", "none"): (9.2, 4.7, 14.6, "Table 4"),
        # Table 8: hypergradient DQN (L_RG), beta tuned over {1, ..., 10^-3}
        ("dqn-none", "kappa", 0.1): (53.3, 39.8, 66.6, "Table 8, best beta"),
        ("dqn-none", "kappa", 0.01): (63.1, 49.6, 75.9, "Table 8, best beta"),
        ("dqn-none", "kappa", 0.001): (65.5, 51.2, 80.7, "Table 8, best beta"),
        # Tables 2 and 3: HANQ's ablations (kappa = 0.1, RG)
        ("hanq", "no_scale"): (84.3, 78.2, 90.3, "Table 2, w/o omega_scale+"),
        ("hanq", "no_bias"): (94.8, 88.4, 99.5, "Table 2, w/o omega_bias"),
        ("hanq", "no_metapred"): (93.6, 88.9, 97.7, "Table 2, w/o metapred."),
        ("hanq", "no_pred"): (43.5, 28.6, 56.7, "Table 2, w/o any pred."),
        ("hanq", "symmetrized"): (39.2, 25.1, 54.0, "Table 2, symmetrized"),
        ("hanq", "no_l2n"): (40.8, 27.7, 52.9, "Table 3, w/o l2N"),
        ("hanq", "no_ln"): (34.9, 32.1, 37.7, "Table 3, w/o LN"),
    },
    "Acrobot-v1": {
        ("hanq", 0.1, "rg"): (90.1, 88.0, 92.0, "Table 1"),
        ("hanq", 0.1, "sg"): (87.8, 85.8, 89.6, "Table 7"),
        ("dqn-none", 1.0): (67.9, 61.7, 73.2, "Table 1, beta = 1"),
        ("dqn-layer", 1.0): (90.0, 87.9, 92.0, "Table 1, beta = 1"),
        ("dqn-l2", 1.0): (80.0, 77.1, 82.4, "Table 1, beta = 1"),
        ("dqn-none", "best"): (91.9, 90.3, 93.5, "Table 1, best beta"),
        ("dqn-layer", "best"): (90.6, 89.0, 92.0, "Table 1, best beta"),
        ("dqn-l2", "best"): (89.6, 87.3, 91.7, "Table 1, best beta"),
        ("hanq", "no_scale"): (65.7, 50.7, 79.2, "Table 2, w/o omega_scale+"),
        ("hanq", "no_bias"): (90.5, 88.7, 91.9, "Table 2, w/o omega_bias"),
        ("hanq", "no_metapred"): (90.7, 88.0, 93.1, "Table 2, w/o metapred."),
        ("hanq", "no_pred"): (91.7, 90.2, 93.2, "Table 2, w/o any pred."),
        ("hanq", "symmetrized"): (93.6, 92.2, 94.7, "Table 2, symmetrized"),
        ("hanq", "no_l2n"): (87.9, 81.3, 92.5, "Table 3, w/o l2N"),
        ("hanq", "no_ln"): (25.0, 15.4, 34.4, "Table 3, w/o LN"),
    },
    "CartPole-v1": {
        ("hanq", 0.1, "rg"): (24.0, 19.1, 30.2, "Table 1"),
        ("dqn-none", 1.0): (41.1, 39.1, 43.6, "Table 1, beta = 1"),
        ("dqn-layer", 1.0): (47.7, 45.3, 49.9, "Table 1, beta = 1"),
        ("dqn-l2", 1.0): (36.5, 33.0, 40.3, "Table 1, beta = 1"),
        ("dqn-none", "best"): (55.6, 51.3, 60.1, "Table 1, best beta"),
        ("dqn-layer", "best"): (49.5, 47.8, 51.2, "Table 1, best beta"),
        ("dqn-l2", "best"): (50.9, 43.7, 58.7, "Table 1, best beta"),
    },
}

#: HANQ's ablation flags (Tables 2 and 3): the setting that differs from HANQ's, and its name
ABLATIONS = (
    ("positive_scale", False, "no_scale", "w/o omega_scale+"),
    ("predictor_bias", False, "no_bias", "w/o omega_bias"),
    ("predictor", "scalar", "no_metapred", "w/o metapred."),
    ("predictor", "none", "no_pred", "w/o any pred."),
    ("symmetric", True, "symmetrized", "symmetrized"),
    ("meta_norm", "none", "no_l2n", "w/o l2N"),
    ("main_norm", "none", "no_ln", "w/o LN"),
)


NORM_NAMES = {"l2": "l2N", "layer": "LN", "none": "-"}
#: DQN's rows by the main network's normalisation, as the paper names them
DQN_NAMES = {"none": "DQN", "layer": "DQN-LN", "l2": "DQN-l2N"}


def ablation(h: dict[str, Any]) -> tuple[str, str] | None:
    """(key, name) of the Table 2/3 ablation a HANQ configuration is, if any (Table 4's normalisation pairs, at
    kappa = 0, are not ablations: see :func:`table4`)."""
    for flag, value, key, name in ABLATIONS:
        if flag in ("meta_norm", "main_norm") and h["hyper_lr"] == 0:
            continue
        if h.get(flag) == value:
            return key, name
    return None


def table4(h: dict[str, Any]) -> tuple[str, str] | None:
    """(metapredictor's, main network's) normalisation of a kappa = 0 HANQ configuration (Table 4's columns)."""
    if h["hyper_lr"] != 0 or ablation(h) is not None:
        return None
    return h.get("meta_norm", "l2"), h.get("main_norm", "layer")


def label(h: dict[str, Any], algo: str) -> str:
    """A short name for a configuration."""
    lr = f"lr {h['learning_rate']:.2g}"
    if algo == "dqn":
        norm = DQN_NAMES[h["main_norm"]]
        kappa = f", kappa {h['hyper_lr']:g} {h['hyper_objective'].upper()}" if h["hyper_lr"] > 0 else ""
        return f"{norm}, beta {h['tau']:g}{kappa}, {lr}"
    if algo in ("ssaq", "hssaq"):  # one scalar omega, no normalisation (Alg. 1): none of HANQ's flags apply
        return f"{algo.upper()}, kappa {h['hyper_lr']:g} {h['hyper_objective'].upper()}, {lr}"
    if ablation(h) is not None:
        return f"{algo.upper()} {ablation(h)[1]}, kappa {h['hyper_lr']:g} {h['hyper_objective'].upper()}, {lr}"  # type: ignore[index]
    head = "per state" if h.get("metapredictor_outputs") == "state" else "per (s, a)"
    if h["hyper_lr"] == 0:
        norms = table4(h)
        pair = "" if norms in (None, ("l2", "layer")) else f", norms {NORM_NAMES[norms[0]]} {NORM_NAMES[norms[1]]}"  # type: ignore[index]
        return f"{algo.upper()} {head}, kappa 0{pair}, {lr}"
    batch = h.get("hyper_batch", "next")
    step = ", alpha linear" if h.get("lr_parameterization") == "linear" else ""  # kappa as an absolute step
    step += ", betas tuned" if h.get("tune_betas") else ""  # Adam via Adam: beta1 and beta2 hyperoptimised too
    return f"{algo.upper()} {head}, kappa {h['hyper_lr']:g} {h['hyper_objective'].upper()} {batch}-batch{step}, {lr}"


def paper_key(h: dict[str, Any], algo: str, best_beta: bool = False) -> tuple[Any, ...]:
    """The :data:`PAPER` key of a configuration; ``best_beta``: as the best-beta row of Table 1, whatever its beta
    (a beta = 1 cell can be that row's best)."""
    if algo == "dqn" and h["hyper_lr"] > 0:
        return (f"dqn-{h['main_norm']}", "kappa", h["hyper_lr"])
    if algo == "dqn":
        return (f"dqn-{h['main_norm']}", "best" if best_beta or h["tau"] != 1.0 else 1.0)
    if ablation(h) is not None:
        return (algo, ablation(h)[0])  # type: ignore[index]
    if table4(h) is not None:
        return (algo, "table4", *table4(h))  # type: ignore[misc]
    return (algo, h["hyper_lr"], h["hyper_objective"])


def paper_number(h: dict[str, Any], algo: str, env_id: str, best_beta: bool = False) -> str:
    """The paper's number for a configuration (:func:`paper_key`), or "-" where the paper has none."""
    key = paper_key(h, algo, best_beta)
    if key not in PAPER.get(env_id, {}):
        return "-"
    mean, low, high, where = PAPER[env_id][key]
    return f"{mean} [{low}, {high}] ({where})"


def load_members(dirs: list[Path]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file name, run config, member) for every member of every complete results file."""
    out = []
    for directory in dirs:
        for path in sorted(directory.glob("*.json")):
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or "members" not in data:
                continue
            if data["config"]["gradient_steps"] < 200_000:
                continue
            for member in data["members"]:
                out.append((path.name, data["config"], member))
    return out


def bootstrap_band(values: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap band of the mean over runs, per column."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(reps, len(values)))
    means = values[idx].mean(axis=1)
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def main(argv: list[str]) -> None:
    dirs = [Path(a) for a in argv] or DEFAULT_DIRS
    members = load_members(dirs)
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, config, member in members:
        text = label(member["hyperparameters"], member["algorithm"])
        env = config["env_id"]
        if env == "DiscretePendulum-v1":  # (files written before the option existed used "uniform")
            env += f", data: {config.get('pendulum_start', 'uniform')}"
        key = f"{env}|{name}|{text}"
        groups.setdefault(key, []).append(member)
    groups, repeats = drop_repeats(pooled(groups))
    for name in sorted(unpooled_add_ons(groups)):
        print(f"note: {name} has no seed 0 and is not pooled (no run of its configurations has the seeds before it)")
    lines = [
        "**HANQ at the paper's scale (200k gradient steps)**",
        "",
        "Command: `bash benchmarks/hanq_repro.sh` (population trainer), then "
        "`.venv/bin/python benchmarks/hanq_repro_report.py`. Every run: the paper's datasets per seed (§11: 1000 "
        "random-action transitions for Pendulum, under the reading each section names (`collect_dataset`'s "
        '`pendulum_start`; "episodes" is the default), 10k from standard resets for Acrobot and CartPole), batch 128, '
        "evaluation every 2000 steps on 10 episodes, the score (Table 10) averaged over all evaluations of a run "
        "(§4); IQM and 95% stratified-bootstrap CI from rliable. The paper tunes the learning rate (and beta for "
        "DQN); rows here use the stated ones. `frozen`: runs whose final learning rate is below 10^-6.",
    ]
    order = ["episodes", "uniform_episodes", "trajectory", "uniform", "reset"]
    envs = sorted(
        {key.split("|")[0] for key in groups},
        key=lambda e: (not e.startswith("DiscretePendulum"), order.index(e.split(": ")[1]) if ": " in e else 0, e),
    )
    for env_id in envs:
        lines += [
            "",
            f"*{env_id}*",
            "",
            "| file | configuration | seeds | mean | IQM [95% CI] | paper [95% CI] | final lr (median) | frozen | "
            "final omega_scale+ (median) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, group in groups.items():
            env, name, text = key.split("|")
            if env != env_id:
                continue
            row = summarize(group, reps=2000)[0]
            ci = f"{row['iqm']:.1f} [{row['ci'][0]:.1f}, {row['ci'][1]:.1f}]" if "iqm" in row else "-"
            final_lr = np.array([m["final_learning_rate"] for m in group])
            frozen = int((final_lr < 1e-6).sum())
            scales = np.array([m["omega_scales"][-1] for m in group])
            h, algo = group[0]["hyperparameters"], group[0]["algorithm"]
            paper = paper_number(h, algo, env.split(",")[0])
            lines.append(
                f"| {name} | {text} | {row['n']} | {row['mean']:.1f} | {ci} | {paper} | "
                f"{np.median(final_lr):.2g} | {frozen}/{len(group)} | {np.median(scales):.2f} |"
            )
    lines += tuned_table(groups, envs)
    if repeats:
        lines += [
            "",
            "**Repeated seeds** (a run that reran seeds another run of the same configuration has; dropped from the "
            "tables above). A seed fixes a member's dataset and initial weights; the minibatch indices come from "
            "one stream per run, drawn for the whole population, so a repeated seed trains on other minibatches: "
            "the differences below are what minibatch sampling alone does to a seed's score.",
            "",
        ]
        lines += repeats
    out_dir = dirs[0]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (out_dir / "paper_tables.md").write_text("\n".join(paper_tables(groups)) + "\n")
    print("\n".join(lines))
    written = figures(groups)
    for stale in set(out_dir.glob("curves*.png")) - {out_dir / figure for figure, _, _ in written}:
        stale.unlink()  # a figure whose runs moved elsewhere
    for figure, title, keys in written:
        plot_curves(out_dir / figure, title, {k: groups[k] for k in keys})
        print(f"wrote {out_dir / figure}")
    for env_id, title, figure in (
        ("DiscretePendulum-v1, data: episodes", "Pendulum", "lr_sensitivity.png"),
        ("Acrobot-v1", "Acrobot", "lr_sensitivity_acrobot.png"),
        ("CartPole-v1", "CartPole", "lr_sensitivity_cartpole.png"),
    ):
        if plot_lr_sensitivity(out_dir / figure, title, tuned_rows(groups, env_id)):
            print(f"wrote {out_dir / figure}")


def tuned_keys(h: dict[str, Any], algo: str) -> tuple[str, ...]:
    """The rows a configuration is a candidate for under the paper's tuning (§4, §11: each cell is the best mean
    over the learning rates, and over beta for DQN): its label without the learning rate (and beta). Table 1's
    best-beta rows tune beta over {10^0, 10^-1, ..., 10^-4} and Table 8's over {10^0, ..., 10^-3}, so a DQN cell
    with beta = 1 is a candidate for its best-beta row as well as for Table 1's beta = 1 row."""
    text = label(h, algo).rsplit(", lr ", 1)[0]
    if algo != "dqn":
        return (text,)
    best = text.replace(f"beta {h['tau']:g}", "best beta")
    return (text, best) if h["tau"] == 1.0 and h["hyper_lr"] == 0 else (best,)


def best_cell(cells: list[tuple[str, list[dict[str, Any]]]]) -> tuple[tuple[str, list[dict[str, Any]]], int]:
    """The cell with the best mean over the seeds every cell has (a grid's, when some cells were rerun with more
    seeds: the protocol of issue #14, select on the grid, report the rerun), and how many seeds that is."""
    common = set.intersection(*({m["seed"] for m in group} for _, group in cells))
    seeds = common or {m["seed"] for _, group in cells for m in group}  # no shared seed: each cell's own

    def grid_mean(cell: tuple[str, list[dict[str, Any]]]) -> float:
        return float(np.mean([m["average_score"] for m in cell[1] if m["seed"] in seeds]))

    return max(cells, key=grid_mean), len(common)


def tuned_rows(
    groups: dict[str, list[dict[str, Any]]], env_id: str
) -> dict[str, list[tuple[str, list[dict[str, Any]]]]]:
    """An environment's configurations as (file, members) cells, grouped by the rows they tune (:func:`tuned_keys`);
    of two runs of one configuration, the one with more seeds."""
    configs: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for key, group in groups.items():
        env, name, text = key.split("|")
        if env == env_id and (text not in configs or len(group) > len(configs[text][1])):
            configs[text] = (name, group)
    rows: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for name, group in configs.values():
        for row in tuned_keys(group[0]["hyperparameters"], group[0]["algorithm"]):
            rows.setdefault(row, []).append((name, group))
    return rows


#: The panels of the score-against-learning-rate figures (:func:`lr_panel`)
LR_PANELS = (
    "HANQ and its ablations (Tables 1-3, 7)",
    "normalisations, kappa = 0 (Table 4)",
    "DQN (Tables 1, 8; best beta per cell)",
)


def lr_panel(h: dict[str, Any], algo: str) -> int:
    """The panel of :data:`LR_PANELS` that draws a configuration's row: DQN's, Table 4's (kappa = 0 HANQ with any
    pair of normalisations, HANQ's own pair included: Table 4's first column), or HANQ's and its ablations'."""
    if algo == "dqn":
        return 2
    return 1 if table4(h) is not None else 0


def plot_lr_sensitivity(path: Path, title: str, rows: dict[str, list[tuple[str, list[dict[str, Any]]]]]) -> bool:
    """Each row's score against the learning rate (the best cell per learning rate, :func:`best_cell`, with a 95%
    bootstrap CI of the mean over its seeds), for the rows run at 3 learning rates or more, one panel per kind of
    row (:func:`lr_panel`) that has any. Returns whether there was anything to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for row, cells in sorted(rows.items()):
        by_lr: dict[float, list[tuple[str, list[dict[str, Any]]]]] = {}
        for cell in cells:
            by_lr.setdefault(cell[1][0]["hyperparameters"]["learning_rate"], []).append(cell)
        if len(by_lr) >= 3:
            curves[row] = sorted((lr, best_cell(lr_cells)[0][1]) for lr, lr_cells in by_lr.items())
    if not curves:
        return False
    panel = {row: lr_panel(rows[row][0][1][0]["hyperparameters"], rows[row][0][1][0]["algorithm"]) for row in curves}
    used = sorted(set(panel.values()))
    fig, axes = plt.subplots(1, len(used), figsize=(7 * len(used), 5), sharey=True, squeeze=False)
    for row, points in curves.items():
        ax = axes[0][used.index(panel[row])]
        x = np.log10([lr for lr, _ in points])
        scores = [np.array([m["average_score"] for m in group]) for _, group in points]
        bands = [bootstrap_band(v[:, None]) for v in scores]
        mean = [v.mean() for v in scores]
        low = [m - b[0][0] for m, b in zip(mean, bands)]
        high = [b[1][0] - m for m, b in zip(mean, bands)]
        seeds = "/".join(sorted({str(len(v)) for v in scores}, key=int))
        ax.errorbar(x, mean, yerr=[low, high], marker="o", capsize=3, label=f"{row} ({seeds} seeds)")
    for ax, index in zip(axes[0], used):
        ax.set(
            xlabel="log10 learning rate", ylabel="score averaged over evaluations", title=f"{title}: {LR_PANELS[index]}"
        )
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


#: The environments of the paper's tables: the report's name (Pendulum: the default data), :data:`PAPER`'s, column
PAPER_ENVS = (
    ("DiscretePendulum-v1, data: episodes", "DiscretePendulum-v1", "Pendulum"),
    ("Acrobot-v1", "Acrobot-v1", "Acrobot"),
    ("CartPole-v1", "CartPole-v1", "CartPole"),
)

#: The settings that tell HANQ's readings of the paper apart (issue #14); the paper's tables compare the default's
READINGS = ("metapredictor_outputs", "hyper_batch", "lr_parameterization", "tune_betas")


def default_reading(h: dict[str, Any], algo: str) -> bool:
    """Whether a configuration uses the package's reading of the paper (DQN has one reading). Files written before
    a setting existed lack it: the metapredictor was per (s, a) then; the other two were as their defaults."""
    if algo == "dqn":
        return True
    defaults = param_defaults(algo)
    old = {"metapredictor_outputs": "state_action"}
    return all(h.get(k, old.get(k, defaults[k])) == defaults[k] for k in READINGS)


def paper_row_name(key: tuple[Any, ...], where: str) -> str:
    """A :data:`PAPER` row named as the paper's table names it (Table 1's column heads, Table 2's row names, Table 4's
    (metapredictor's, main network's) normalisation pair)."""
    if key[0].startswith("dqn-"):
        name = DQN_NAMES[key[0].removeprefix("dqn-")]
        if key[1] == "kappa":
            return f"{name}, best β, κ = {key[2]:g}"
        return f"{name}, {'β = 1' if key[1] == 1.0 else 'best β'}"
    if key[1] == "table4":
        pair = f"{NORM_NAMES[key[2]]} {NORM_NAMES[key[3]]}"
        return f"{pair} (HANQ, κ = 0)" if key[2:] == ("l2", "layer") else pair
    detail = where.partition(", ")[2]
    if detail:
        return f"HANQ {detail}"
    return f"HANQ, κ = {key[1]:g}" + (", L_SG" if key[2] == "sg" else "")


def paper_tables(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The paper's tables (1, 2, 3, 4, 7, 8) as reproduced: for every row the paper reports, each environment's best
    cell tuned as the paper tunes (:func:`tuned_rows`, :func:`best_cell`; the package's reading,
    :func:`default_reading`) beside the paper's number, with its seeds and cell; a check mark where our mean lies
    inside the paper's 95% CI. An environment the paper leaves out of a table gets no column there."""
    ours: dict[tuple[str, tuple[Any, ...]], str] = {}
    for env_id, paper_env, _ in PAPER_ENVS:
        for row, cells in sorted(tuned_rows(groups, env_id).items()):
            (_, group), _ = best_cell(cells)
            h, algo = group[0]["hyperparameters"], group[0]["algorithm"]
            key = paper_key(h, algo, best_beta="best beta" in row)
            if key not in PAPER[paper_env] or not default_reading(h, algo):
                continue
            mean, (low, high) = float(np.mean([m["average_score"] for m in group])), PAPER[paper_env][key][1:3]
            beta = f"β 10^{np.log10(h['tau']):.2g}, " if "best beta" in row else ""
            mark = " ✓" if low <= mean <= high else ""
            ours[paper_env, key] = f"{mean:.1f}{mark} ({len(group)}; {beta}lr 10^{np.log10(h['learning_rate']):.2g})"
    lines = [
        "**The paper's tables as reproduced** (generated by `benchmarks/hanq_repro_report.py`). Each cell: our mean "
        "score of the row's best cell, tuned as the paper tunes (§4, §11: best mean over the learning rates run, "
        "and over beta for DQN's best-beta rows, selected on the seeds every cell has), with (seeds; that cell); "
        "✓ where the mean lies inside the paper's 95% CI. The paper's protocol is 30 seeds; '-' where a row has "
        "not been run. Rows as the paper names them; HANQ is the package's reading (per-state metapredictor, "
        "next-minibatch L_RG hypergradient on log alpha); Table 4's rows: the metapredictor's normalisation, then "
        'the main network\'s; Table 8: DQN with the L_RG hypergradient. Pendulum: the default data ("episodes").',
    ]
    on: dict[str, dict[tuple[Any, ...], list[str]]] = {}  # table -> row -> the environments the paper reports it on
    for _, paper_env, _ in PAPER_ENVS:
        for key, (*_, where) in PAPER[paper_env].items():
            on.setdefault(where.split(",")[0], {}).setdefault(key, []).append(paper_env)
    for table, rows in sorted(on.items(), key=lambda item: int(item[0].split()[1])):
        envs = [env for env in PAPER_ENVS if any(env[1] in row_envs for row_envs in rows.values())]
        lines += [
            "",
            f"*{table}*",
            "",
            "| row | " + " | ".join(f"{column} | paper [95% CI]" for *_, column in envs) + " |",
            "|---|" + "---|---|" * len(envs),
        ]
        for key, row_envs in rows.items():
            shown: list[str] = []
            for _, paper_env, _ in envs:
                paper = "{} [{}, {}]".format(*PAPER[paper_env][key][:3]) if paper_env in row_envs else "-"
                shown += [ours.get((paper_env, key), "-"), paper]
            name = paper_row_name(key, PAPER[row_envs[0]][key][3])
            lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return lines


def tuned_table(groups: dict[str, list[dict[str, Any]]], envs: list[str]) -> list[str]:
    """Per environment and row (:func:`tuned_keys`), the best configuration among those run (:func:`best_cell`;
    of two runs of one configuration the one with more seeds), reported with all its seeds, as the paper reports
    its tables."""
    lines = [
        "",
        "**Tuned as the paper tunes (§4: the best mean over the learning rates run, and over the betas run for "
        "DQN's best-beta rows, beta = 1 included as in Table 1's {10^0, ..., 10^-4} and Table 8's {10^0, ..., "
        "10^-3})**",
        "",
        "Cells are compared on the seeds they all have (`selected on`: the grids' 5 seeds, as a rule) and the "
        "chosen cell is reported with all its seeds, so that a cell rerun at 30 seeds does not lose to a lucky "
        "5-seed one. Selecting the best of several 5-seed cells still flatters rows with many cells.",
    ]
    for env_id in envs:
        rows = tuned_rows(groups, env_id)
        lines += [
            "",
            f"*{env_id}*",
            "",
            "| row | best cell | cells tried | selected on | file | seeds | mean | IQM [95% CI] | paper [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row, cells in sorted(rows.items()):
            (name, group), shared = best_cell(cells)
            stats = summarize(group, reps=2000)[0]
            ci = f"{stats['iqm']:.1f} [{stats['ci'][0]:.1f}, {stats['ci'][1]:.1f}]" if "iqm" in stats else "-"
            h, algo = group[0]["hyperparameters"], group[0]["algorithm"]
            cell = (f"beta {h['tau']:g}, " if "best beta" in row else "") + f"lr {h['learning_rate']:.2g}"
            paper = paper_number(h, algo, env_id.split(",")[0], best_beta="best beta" in row)
            lines.append(
                f"| {row} | {cell} | {len(cells)} | {shared} seeds | {name} | {stats['n']} | {stats['mean']:.1f} "
                f"| {ci} | {paper} |"
            )
    return lines


def pooled(groups: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """``groups`` with each add-on row (a configuration whose seeds start after seed 0: ``--first-seed``) pooled with
    the row of the same environment and configuration that has exactly the seeds before it, configuration by
    configuration; the pooled row (``earlier+add-on``) takes the add-on's place, the earlier run's own row stays.
    Add-ons go in order of their first seed, so that a pooled row can be pooled again (``a+b.json``, seeds 0-9, with
    ``c.json``, 10-29, gives ``a+b+c.json``, which replaces ``a+b.json``). Where two rows have those seeds (a run
    that repeats another's), the one whose file name shares the longest start with the add-on's: the queue names an
    add-on after its run (``ep_kappa0_rest`` after ``ep_kappa0``). An add-on without such a row stays as it is
    (:func:`unpooled_add_ons`)."""
    out = dict(groups)
    place: dict[str, str] = {}  # a pooled row -> the add-on row whose position it takes

    def seeds(key: str) -> set[int]:
        return {m["seed"] for m in out[key]}

    add_ons = sorted((key for key in groups if min(seeds(key)) > 0), key=lambda key: (min(seeds(key)), key))
    for key in add_ons:
        env, name, text = key.split("|")
        before = set(range(min(seeds(key))))
        bases = [k for k in out if k.split("|")[::2] == [env, text] and seeds(k) == before]
        if not bases:
            continue
        base = max(bases, key=lambda k: (len(os.path.commonprefix([k.split("|")[1], name])), k))
        base_name = base.split("|")[1]
        group = out.pop(base) if "+" in base_name else out[base]  # a pooled row is extended; a run's own row stays
        pooled_key = f"{env}|{base_name.removesuffix('.json')}+{name}|{text}"
        out[pooled_key], place[pooled_key] = group + out.pop(key), key
    position = {key: i for i, key in enumerate(groups)}
    return dict(sorted(out.items(), key=lambda item: position[place.get(item[0], item[0])]))


def unpooled_add_ons(groups: dict[str, list[dict[str, Any]]]) -> set[str]:
    """The files with a configuration that starts after seed 0 (``--first-seed``) and no cell in any pool: an
    add-on whose earlier run is not done yet (:func:`pooled` found no row with the seeds before its first). (A file
    with one pooled cell counts as pooled, as E16's seeds 5-9, whose 10^-3 cells had no seeds 0-4 until E22.)"""
    names = {key.split("|")[1] for key in groups}
    in_pools = {part.removesuffix(".json") for name in names if "+" in name for part in name.split("+")}
    return {
        name
        for key, group in groups.items()
        if (name := key.split("|")[1]).removesuffix(".json") not in in_pools and min(m["seed"] for m in group) > 0
    }


def drop_repeats(groups: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """``groups`` without the pooled rows whose seeds another row of the same configuration has all of (E12's
    grids repeat seeds 5-9 of three 30-seed cells), and one line per dropped row comparing the two runs on the seeds
    whose scores differ (same datasets and initial weights, other minibatches): both means and the largest
    difference of one seed."""
    out, lines = dict(groups), []
    for key, group in groups.items():
        env, name, text = key.split("|")
        seeds = {m["seed"]: m["average_score"] for m in group}
        for other, other_group in groups.items():
            o_env, o_name, o_text = other.split("|")
            if "+" not in name or other == key or (o_env, o_text) != (env, text):
                continue
            other_seeds = {m["seed"]: m["average_score"] for m in other_group}
            if set(seeds) < set(other_seeds):
                both = sorted(s for s in seeds if seeds[s] != other_seeds[s])  # (a shared base run is identical)
                if both:
                    diff = max(abs(seeds[s] - other_seeds[s]) for s in both)
                    mine, theirs = np.mean([seeds[s] for s in both]), np.mean([other_seeds[s] for s in both])
                    what = (
                        f"mean over seeds {both[0]}-{both[-1]} {mine:.1f} against {theirs:.1f}, largest difference "
                        f"of one seed {diff:.1f}"
                    )
                else:
                    what = "identical scores"
                lines.append(f"- {text} ({env}): {name} repeats seeds of {o_name}; {what}")
                out.pop(key, None)
                break
    return out, lines


def figures(groups: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, list[str]]]:
    """Which configurations go in which PNG. Pendulum under the default ("episodes") reading: HANQ's readings and
    the 30-seed run (curves.png), the ablations of Tables 2, 3 and 7 (curves_ablations.png), Table 4's
    normalisations (curves_table4.png), DQN (Tables 1 and 8: curves_dqn.png), the learning-rate grid
    (curves_lr.png), the kappa grid with kappa = 0 (curves_kappa.png); the 5-seed runs of the "reset",
    "episodes", "trajectory" and 10-seed "uniform_episodes" readings (curves_datasets.png); the "uniform" reading's runs
    (curves_uniform{,_ablations,_dqn}.png); per other environment, one file for the rest and one for its
    ablations per learning rate (``_lr4``: 10^-4, ``_lr35``: 10^-3.5, no suffix: 10^-2.5). The ablations'
    learning-rate grids (``*_lrs``) are drawn against the learning rate instead (lr_sensitivity*.png).

    Figures of tuned rows draw each row's best cell only (:func:`best_figure_keys`, the cell its table reports;
    a grid of 30-40 cells in one plot cannot be read): every other environment's main figure (Table 1's rows),
    the ablations (with HANQ's best cell beside them; on other environments ``_ablations_best``), Table 4 and DQN. The
    learning-rate, kappa, dataset and per-learning-rate ablation figures keep every cell: the cells are what
    they compare."""
    out: dict[str, tuple[str, list[str]]] = {}
    best_only: set[str] = set()
    ablations_best: dict[str, list[str]] = {}  # other environments: every ablation cell, by environment
    parts = [key.split("|") for key in groups]
    pooled_bases = {f"{env}|{name.split('+')[0]}.json|{text}" for env, name, text in parts if "+" in name}
    for key in groups:
        if key in pooled_bases:
            continue  # drawn once, pooled with its add-on (:func:`pooled`)
        env, name, _ = key.split("|")
        if name.startswith("ep_tune_betas"):  # every cell of the reading, its grids included, with HANQ's best
            out.setdefault("curves_betas.png", (BETAS_TITLE, []))[1].append(key)
            continue
        if name.endswith("_lrs.json") and "+" not in name:
            continue  # an ablation's learning-rate grid: lr_sensitivity.png (pooled into a cell: drawn with it)
        if not env.startswith("DiscretePendulum"):
            part, what = ("", ": Table 1's rows")
            if "_table" in name:  # the ablations, one figure per learning rate (10^-2.5: no suffix)
                ablations_best.setdefault(env, []).append(key)
                # the grids step by half a decade: 3.1623e-1 is 10^-0.5, not 10^-0.499997
                exponent = round(2 * np.log10(groups[key][0]["hyperparameters"]["learning_rate"])) / 2
                tag = f"{-exponent:g}".replace(".", "")
                part = "_ablations" if tag == "25" else f"_ablations_lr{tag}"
                what = f": ablations (Tables 2, 3, 7), lr 10^{exponent:g}"
            figure, title = f"curves_{env.split('-')[0].lower()}{part}.png", f"{env}, offline{what}"
            if not part:
                best_only.add(figure)
        elif name.startswith(("reset", "episodes_", "traj_", "ue_")):
            figure, title = "curves_datasets.png", "DiscretePendulum-v1: the dataset's readings (5-10 seeds)"
        elif env.endswith("episodes"):
            kind = name.removeprefix("ep_").removeprefix("episodes10_")
            if kind.startswith(("table2", "table3", "table7")):
                figure, title = "curves_ablations.png", "DiscretePendulum-v1: ablations (Tables 2, 3, 7)"
            elif kind.startswith("table4"):
                figure, title = "curves_table4.png", "DiscretePendulum-v1: normalisations, kappa = 0 (Table 4)"
            elif kind.startswith(("dqn", "table8")):
                figure, title = "curves_dqn.png", "DiscretePendulum-v1: DQN (Tables 1, 8)"
            elif kind.startswith(("lr_grid", "lr_best")):
                figure, title = "curves_lr.png", "DiscretePendulum-v1: HANQ's learning rates"
            elif kind.startswith("hssaq"):
                figure, title = "curves_fig7.png", "DiscretePendulum-v1: HSSAQ, kappa = 10^-4 (Fig. 7)"
            elif kind.startswith(("kappa_grid", "kappa0")):
                figure, title = "curves_kappa.png", "DiscretePendulum-v1: HANQ's hyperlearning rates (kappa)"
            else:
                figure, title = "curves.png", "DiscretePendulum-v1: HANQ's readings"
        elif name.startswith(("table2", "table3", "table7")):
            figure, title = "curves_uniform_ablations.png", "DiscretePendulum-v1, data: uniform: ablations"
        elif name.startswith(("dqn", "table8")):
            figure, title = "curves_uniform_dqn.png", "DiscretePendulum-v1, data: uniform: DQN"
        else:
            figure, title = "curves_uniform.png", "DiscretePendulum-v1, data: uniform: HANQ's readings"
        out.setdefault(figure, (title, []))[1].append(key)
    best_only |= {
        "curves_ablations.png",
        "curves_table4.png",
        "curves_dqn.png",
        "curves_uniform_ablations.png",
        "curves_uniform_dqn.png",
    }
    for env, keys in ablations_best.items():
        figure = f"curves_{env.split('-')[0].lower()}_ablations_best.png"
        out[figure] = (f"{env}, offline: HANQ and its ablations (Tables 2, 3, 7)", keys)
        best_only.add(figure)
    for figure in best_only & set(out):
        title, keys = out[figure]
        out[figure] = (
            f"{title}, each row's best cell",
            best_figure_keys(groups, keys, with_hanq="ablations" in figure),
        )
    if "curves_betas.png" in out:
        hanq = row_best_key(groups, "DiscretePendulum-v1, data: episodes", HANQ_ROW)
        out["curves_betas.png"][1][:0] = [hanq] if hanq is not None else []
    return [(figure, title, keys) for figure, (title, keys) in out.items()]


#: HANQ's row under its defaults (κ = 0.1, L_RG, the per-state metapredictor): the reference of Tables 2, 3, 7
HANQ_ROW = "HANQ per state, kappa 0.1 RG next-batch"
BETAS_TITLE = "DiscretePendulum-v1: Adam via Adam (tune_betas), every cell, beside HANQ's best cell"


def row_best_key(groups: dict[str, list[dict[str, Any]]], env: str, row: str) -> str | None:
    """The key in ``groups`` of a tuned row's best cell (:func:`best_cell`) on ``env``, or ``None`` without that row."""
    cells = tuned_rows(groups, env).get(row)
    if cells is None:
        return None
    group = best_cell(cells)[0][1]
    return next(k for k, g in groups.items() if g is group)


def best_figure_keys(groups: dict[str, list[dict[str, Any]]], keys: list[str], with_hanq: bool = False) -> list[str]:
    """Of ``keys``, the best cell (:func:`best_cell`) of each tuned row (:func:`tuned_rows`), per environment, each
    once (Table 1's beta = 1 and best-beta rows can share a cell); ``with_hanq``: HANQ's own best cell first
    (:data:`HANQ_ROW`, from all of ``groups``), as the ablations' reference."""
    picked: list[str] = []
    for env in dict.fromkeys(key.split("|")[0] for key in keys):
        sub = {key: groups[key] for key in keys if key.split("|")[0] == env}
        rows = [(row, sub) for row in sorted(tuned_rows(sub, env))]
        if with_hanq:
            rows.insert(0, (HANQ_ROW, groups))
        for row, where in rows:
            key = row_best_key(where, env, row)
            if key is not None and key not in picked:
                picked.append(key)
    return picked


def plot_curves(path: Path, title: str, groups: dict[str, list[dict[str, Any]]]) -> None:
    """Score, learning rate and omega_scale^+ against gradient steps, mean with a 95% bootstrap band (as Figs. 3,
    6 and 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = any("beta1" in m for group in groups.values() for m in group)  # tune_betas runs: a panel of their own
    fig, axes = plt.subplots(1, 4 if betas else 3, figsize=(24 if betas else 18, 4.8))
    ax_score, ax_lr, ax_scale = axes[:3]
    for key, group in groups.items():
        steps = np.asarray(group[0]["eval_steps"])
        scores = np.array([m["scores"] for m in group])
        lrs = np.log10(np.maximum(np.array([m["learning_rates"] for m in group]), 1e-12))
        text = key.split("|")[2] + f" ({len(group)} seeds)"
        (line,) = ax_score.plot(steps, scores.mean(0), label=text)
        low, high = bootstrap_band(scores)
        ax_score.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax_lr.plot(steps, lrs.mean(0), color=line.get_color())
        low, high = bootstrap_band(lrs)
        ax_lr.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        if "omega_scales" in group[0]:
            scales = np.array([m["omega_scales"] for m in group])
            ax_scale.plot(steps, scales.mean(0), color=line.get_color())
            low, high = bootstrap_band(scales)
            ax_scale.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        if "beta1" in group[0]:
            for name, style in (("beta1", "-"), ("beta2", "--")):
                axes[3].plot(steps, np.mean([m[name] for m in group], 0), style, color=line.get_color())
    if betas:
        axes[3].set(xlabel="gradient steps", ylabel="beta", title="Adam's beta1 (solid) and beta2 (dashed), mean")
    ax_score.set(xlabel="gradient steps", ylabel="score (Table 10)", title=title)
    ax_lr.set(xlabel="gradient steps", ylabel="log10 learning rate", title="learning rate (mean of log10)")
    ax_scale.set(xlabel="gradient steps", ylabel="omega_scale+", title="predictor scale (batch mean; 1 without one)")
    ax_score.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
