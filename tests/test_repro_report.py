"""The reproduction report's bookkeeping (``benchmarks/hanq_repro_report.py``): which seeds are pooled, which
cell a tuned row reports, and which repeated runs are dropped. These decide the numbers the docs publish."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "hanq_repro_report.py"
_spec = importlib.util.spec_from_file_location("hanq_repro_report", _PATH)
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

ENV = "DiscretePendulum-v1, data: episodes"
TEXT = "DQN-LN, beta 0.001, lr 0.00032"


def members(scores: dict[int, float]) -> list[dict[str, Any]]:
    return [{"seed": seed, "average_score": score} for seed, score in scores.items()]


def test_pooled_joins_an_add_on_to_the_row_with_the_seeds_before_it():
    groups = {
        f"{ENV}|a.json|{TEXT}": members({0: 1.0, 1: 2.0}),
        f"{ENV}|b.json|{TEXT}": members({2: 3.0, 3: 4.0}),
        f"{ENV}|b.json|other configuration": members({2: 5.0}),  # no row of its configuration before it
        f"{ENV}|gap.json|{TEXT}": members({5: 6.0}),  # seeds 2-4 missing: not pooled
        f"Acrobot-v1|c.json|{TEXT}": members({2: 7.0}),  # another environment's: not pooled with a.json
    }
    out = report.pooled(groups)
    assert sorted(m["seed"] for m in out[f"{ENV}|a+b.json|{TEXT}"]) == [0, 1, 2, 3]
    assert f"{ENV}|b.json|{TEXT}" not in out and f"{ENV}|a.json|{TEXT}" in out  # the earlier run's row stays
    for alone in (f"{ENV}|b.json|other configuration", f"{ENV}|gap.json|{TEXT}", f"Acrobot-v1|c.json|{TEXT}"):
        assert out[alone] == groups[alone]
    assert report.unpooled_add_ons(out) == {"gap.json", "c.json"}  # b.json's other cell: b is part of a pool


def test_pooled_chains_in_order_of_first_seed():
    """A pooled row (``a+b.json``) can be pooled again (``a+b+c.json``), which replaces it, whatever the order of
    the files."""
    groups = {
        f"{ENV}|c.json|{TEXT}": members({2: 3.0, 3: 4.0}),
        f"{ENV}|b.json|{TEXT}": members({1: 2.0}),
        f"{ENV}|a.json|{TEXT}": members({0: 1.0}),
    }
    out = report.pooled(groups)
    assert list(out) == [f"{ENV}|a+b+c.json|{TEXT}", f"{ENV}|a.json|{TEXT}"]  # in the add-on's place
    assert sorted(m["seed"] for m in out[f"{ENV}|a+b+c.json|{TEXT}"]) == [0, 1, 2, 3]


def test_pooled_takes_the_add_ons_namesake_where_two_runs_have_its_seeds():
    """Three runs with seed 0 of one configuration (repeats): ``ep_kappa0_rest`` extends ``ep_kappa0``, not the
    other run, in either order of the files."""
    rows = {"ep_a.json": members({0: 2.0}), "ep_kappa0.json": members({0: 1.0}), "ep_z.json": members({0: 2.0})}
    for order in (list(rows), list(rows)[::-1]):
        groups = {f"{ENV}|{name}|{TEXT}": rows[name] for name in order}
        groups[f"{ENV}|ep_kappa0_rest.json|{TEXT}"] = members({1: 3.0})
        out = report.pooled(groups)
        assert [m["average_score"] for m in out[f"{ENV}|ep_kappa0+ep_kappa0_rest.json|{TEXT}"]] == [1.0, 3.0]
        assert (
            out[f"{ENV}|ep_a.json|{TEXT}"] == rows["ep_a.json"] and out[f"{ENV}|ep_z.json|{TEXT}"] == rows["ep_z.json"]
        )


def dqn(tau: float, lr: float, scores: dict[int, float], norm: str = "layer") -> list[dict[str, Any]]:
    h = {"learning_rate": lr, "tau": tau, "main_norm": norm, "hyper_lr": 0.0, "hyper_objective": "rg"}
    return [{**m, "hyperparameters": h, "algorithm": "dqn"} for m in members(scores)]


def keyed(env: str, cells: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {f"{env}|{name}|{report.label(g[0]['hyperparameters'], g[0]['algorithm'])}": g for name, g in cells.items()}


def test_best_beta_rows_tune_over_beta_1_too():
    """Table 1's best-beta rows tune beta over {10^0, ..., 10^-4}: a beta = 1 cell that beats every beta < 1 cell
    is the row's best, and the row keeps the paper's best-beta number."""
    env = "CartPole-v1"
    cells = {
        "target.json": dqn(1e-3, 1e-3, {0: 40.0, 1: 50.0}),
        "no_target.json": dqn(1.0, 1e-2, {0: 60.0, 1: 70.0}),
    }
    groups = keyed(env, cells)
    rows = report.tuned_rows(groups, env)
    assert sorted(rows) == ["DQN-LN, best beta", "DQN-LN, beta 1"]
    assert sorted(name for name, _ in rows["DQN-LN, best beta"]) == ["no_target.json", "target.json"]
    assert [name for name, _ in rows["DQN-LN, beta 1"]] == ["no_target.json"]
    assert report.best_cell(rows["DQN-LN, best beta"])[0][0] == "no_target.json"
    table = report.tuned_table(groups, [env])
    best = next(line for line in table if line.startswith("| DQN-LN, best beta |"))
    assert "| beta 1, lr 0.01 |" in best and "(Table 1, best beta)" in best
    single = next(line for line in table if line.startswith("| DQN-LN, beta 1 |"))
    assert "(Table 1, beta = 1)" in single
    # hypergradient DQN (Table 8) has one row per kappa, beta tuned over {10^0, ..., 10^-3}
    kappa = {**cells["no_target.json"][0]["hyperparameters"], "hyper_lr": 0.1}
    assert report.tuned_keys(kappa, "dqn") == ("DQN-LN, best beta, kappa 0.1 RG",)


def test_best_cell_selects_on_shared_seeds_and_reports_all():
    rerun = ("a+rerun.json", members({0: 50.0, 1: 50.0, **{s: 95.0 for s in range(2, 30)}}))
    lucky = ("b.json", members({0: 60.0, 1: 60.0}))
    (name, group), shared = report.best_cell([rerun, lucky])
    assert (name, shared) == ("b.json", 2)  # 60 > 50 on seeds 0-1, though the rerun's 30-seed mean is higher
    (name, group), shared = report.best_cell([rerun, ("c.json", members({0: 40.0, 1: 40.0}))])
    assert name == "a+rerun.json" and len(group) == 30


def test_drop_repeats_keeps_the_larger_run_and_compares_the_repeated_seeds():
    base = {0: 10.0, 1: 20.0}
    small = f"{ENV}|grid+grid_s5.json|{TEXT}"
    large = f"{ENV}|grid+rest30.json|{TEXT}"
    groups = {
        small: members({**base, 2: 30.0, 3: 70.0}),
        large: members({**base, 2: 40.0, 3: 40.0, 4: 0.0}),
        f"{ENV}|grid+grid_s5.json|another": members({**base, 2: 30.0}),  # no larger run: kept
    }
    out, lines = report.drop_repeats(groups)
    assert small not in out and large in out and f"{ENV}|grid+grid_s5.json|another" in out
    # seeds 0-1 are the shared base run (identical), so only seeds 2-3 are compared: means 50 and 40, largest 30
    assert lines == [
        f"- {TEXT} ({ENV}): grid+grid_s5.json repeats seeds of grid+rest30.json; mean over seeds 2-3 50.0 "
        "against 40.0, largest difference of one seed 30.0"
    ]
    identical = {small: members(base), large: members({**base, 2: 1.0})}
    assert report.drop_repeats(identical)[1][0].endswith("identical scores")


def hanq(lr: float, scores: dict[int, float], **flags: Any) -> list[dict[str, Any]]:
    h = {"learning_rate": lr, "hyper_lr": 0.1, "hyper_objective": "rg", "metapredictor_outputs": "state", **flags}
    return [{**m, "hyperparameters": h, "algorithm": "hanq"} for m in members(scores)]


def test_acrobot_ablation_figures_are_named_by_half_decade():
    """One figure per learning rate, named by its exponent on the grid's half-decades (3.1623e-1 is 10^-0.5:
    ``_lr05``, not ``_lr0499997``); 10^-2.5 keeps the unsuffixed name."""
    cells = {
        f"acrobot_table2_no_pred_{name}.json": hanq(lr, {0: 1.0}, predictor="none")
        for name, lr in (("lr05", 3.1623e-1), ("lr1", 1e-1), ("lr25", 3.1623e-3), ("lr45", 3.1623e-5))
    }
    files = {figure: title for figure, title, _ in report.figures(keyed("Acrobot-v1", cells))}
    assert set(files) == {
        "curves_acrobot_ablations_lr05.png",
        "curves_acrobot_ablations_lr1.png",
        "curves_acrobot_ablations.png",
        "curves_acrobot_ablations_lr45.png",
        "curves_acrobot_ablations_best.png",
    }
    assert files["curves_acrobot_ablations_lr05.png"].endswith("lr 10^-0.5")


def test_figures_of_tuned_rows_draw_each_rows_best_cell():
    """Table 1's figure draws the cell each row reports (a beta = 1 cell that is also its best-beta row's best
    appears once); the ablations' best-cell figure puts HANQ's best beside them; per-learning-rate figures keep
    every cell."""
    cells = {
        "hanq_lr3.json": hanq(1e-3, {0: 50.0, 1: 60.0}),
        "hanq_lr4.json": hanq(1e-4, {0: 80.0, 1: 90.0}),
        "dqn_beta1_lr3.json": dqn(1.0, 1e-3, {0: 70.0, 1: 70.0}),
        "dqn_beta3_lr3.json": dqn(1e-3, 1e-3, {0: 10.0, 1: 20.0}),
        "dqn_beta1_lr4.json": dqn(1.0, 1e-4, {0: 30.0, 1: 30.0}),
        "cartpole_table2_no_pred_lr4.json": hanq(1e-4, {0: 5.0, 1: 5.0}, predictor="none"),
        "cartpole_table2_no_pred_lr25.json": hanq(3.1623e-3, {0: 9.0, 1: 9.0}, predictor="none"),
    }
    groups = keyed("CartPole-v1", cells)
    files = {figure: [key.split("|")[1] for key in keys] for figure, _, keys in report.figures(groups)}
    assert files["curves_cartpole.png"] == ["dqn_beta1_lr3.json", "hanq_lr4.json"]  # rows: DQN-LN x2, HANQ
    assert files["curves_cartpole_ablations_best.png"] == ["hanq_lr4.json", "cartpole_table2_no_pred_lr25.json"]
    assert files["curves_cartpole_ablations_lr4.png"] == ["cartpole_table2_no_pred_lr4.json"]
    # Pendulum's DQN figure (Tables 1 and 8) takes the same rule
    pendulum = keyed(ENV, {f"ep_{name}": group for name, group in cells.items() if name.startswith("dqn")})
    files = {figure: [key.split("|")[1] for key in keys] for figure, _, keys in report.figures(pendulum)}
    assert files == {"curves_dqn.png": ["ep_dqn_beta1_lr3.json"]}
    # Table 4's figure: one line per normalisation pair, its best cell (HANQ's own pair is the first column)
    table4 = {
        "ep_table4_a.json": hanq(1e-3, {0: 70.0, 1: 80.0}, hyper_lr=0.0),
        "ep_table4_b.json": hanq(3.1623e-3, {0: 60.0, 1: 60.0}, hyper_lr=0.0),
        "ep_table4_c.json": hanq(1e-3, {0: 5.0, 1: 5.0}, hyper_lr=0.0, meta_norm="none", main_norm="none"),
        "ep_table4_d.json": hanq(3.1623e-3, {0: 9.0, 1: 9.0}, hyper_lr=0.0, meta_norm="none", main_norm="none"),
    }
    files = {figure: [key.split("|")[1] for key in keys] for figure, _, keys in report.figures(keyed(ENV, table4))}
    assert files == {"curves_table4.png": ["ep_table4_a.json", "ep_table4_d.json"]}
    # Adam via Adam (tune_betas): every cell, its learning-rate grids too, after HANQ's best cell
    betas = {
        "ep_hanq_a.json": hanq(1e-3, {0: 70.0, 1: 80.0}),
        "ep_hanq_b.json": hanq(3.1623e-3, {0: 90.0, 1: 90.0}),
        "ep_tune_betas_lrs.json": hanq(3.1623e-3, {0: 9.0, 1: 9.0}, tune_betas=True),
        "ep_tune_betas_more_lrs.json": hanq(1e-3, {0: 5.0, 1: 5.0}, tune_betas=True),
    }
    files = {figure: [key.split("|")[1] for key in keys] for figure, _, keys in report.figures(keyed(ENV, betas))}
    assert files["curves_betas.png"] == ["ep_hanq_b.json", "ep_tune_betas_lrs.json", "ep_tune_betas_more_lrs.json"]


def test_lr_sensitivity_panels_put_each_row_with_its_table():
    """Score-against-learning-rate figures: DQN's rows (Tables 1 and 8) in one panel, Table 4's kappa = 0 pairs
    (HANQ's own pair, its first column, among them) in another, HANQ and its ablations (at kappa = 0.1, where
    w/o LN and w/o l2N are ablations, not Table 4's pairs) in the first."""

    def panel(group: list[dict[str, Any]]) -> int:
        return report.lr_panel(group[0]["hyperparameters"], group[0]["algorithm"])

    assert panel(dqn(1e-3, 1e-3, {0: 1.0})) == panel(dqn(1.0, 1e-3, {0: 1.0}, norm="l2")) == 2
    assert panel(hanq(1e-3, {0: 1.0}, hyper_lr=0.0)) == 1
    assert panel(hanq(1e-3, {0: 1.0}, hyper_lr=0.0, meta_norm="layer", main_norm="none")) == 1
    assert panel(hanq(1e-3, {0: 1.0})) == panel(hanq(1e-3, {0: 1.0}, main_norm="none")) == 0
    assert panel(hanq(1e-3, {0: 1.0}, hyper_lr=0.0, predictor="none")) == 0  # kappa = 0 ablation: not a pair
    assert len(report.LR_PANELS) == 3


def test_paper_tables_report_each_rows_best_cell_under_the_default_reading():
    """One line per row the paper reports: the best cell of the package's reading (an "alpha linear" or "betas
    tuned" reading that scores higher is another reading, not HANQ's row), its seeds and cell, a check mark only
    inside the paper's CI, and columns only for the environments the paper puts in that table."""
    groups = {
        **keyed(
            ENV,
            {
                "hanq_lr3.json": hanq(1e-3, {0: 90.0, 1: 100.0}),  # mean 95.0, below the paper's [98.0, 102.2]
                "hanq_lr2.json": hanq(1e-2, {0: 50.0, 1: 60.0}),
                "linear.json": hanq(1e-2, {0: 101.0, 1: 101.0}, lr_parameterization="linear"),
                "betas.json": hanq(1e-2, {0: 102.0, 1: 102.0}, tune_betas=True),  # Adam via Adam: another reading
            },
        ),
        **keyed(
            "Acrobot-v1",
            {
                "beta1.json": dqn(1.0, 1e-4, {0: 60.0, 1: 70.0}, norm="none"),  # 65.0: inside beta = 1's [61.7, 73.2]
                "beta3.json": dqn(
                    1e-3, 3.1623e-5, {0: 80.0, 1: 90.0}, norm="none"
                ),  # 85.0: best beta, under [90.3, 93.5]
            },
        ),
    }
    lines = report.paper_tables(groups)
    row = {line.split(" | ")[0].removeprefix("| "): line for line in lines if line.startswith("| ")}
    assert row["HANQ, κ = 0.1"] == (
        "| HANQ, κ = 0.1 | 95.0 (2; lr 10^-3) | 100.1 [98.0, 102.2] | - | 90.1 [88.0, 92.0] | - | 24.0 [19.1, 30.2] |"
    )
    assert row["DQN, β = 1"].split(" | ")[3:5] == ["65.0 ✓ (2; lr 10^-4)", "67.9 [61.7, 73.2]"]
    assert row["DQN, best β"].split(" | ")[3:5] == ["85.0 (2; β 10^-3, lr 10^-4.5)", "91.9 [90.3, 93.5]"]
    start = lines.index("*Table 4*")
    assert lines[start + 2] == "| row | Pendulum | paper [95% CI] |"  # the paper runs Table 4 on Pendulum only
    table4 = [line.split(" | ")[0].removeprefix("| ") for line in lines[start + 4 : start + 13]]
    assert table4 == ["l2N LN (HANQ, κ = 0)", "LN l2N", "l2N l2N", "LN LN", "- l2N", "- LN", "l2N -", "LN -", "- -"]
    table1 = [line.split(" | ")[0].removeprefix("| ") for line in lines[lines.index("*Table 1*") + 4 :][:7]]
    assert table1[0] == "DQN, best β" and table1[-1] == "HANQ, κ = 0.1"  # the paper's column order
    assert sum(line.startswith("*Table ") for line in lines) == 6  # Tables 1, 2, 3, 4, 7, 8
