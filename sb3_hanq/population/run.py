"""Run a population to completion: resumable checkpoints, JSON results and the summary table."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

from sb3_hanq.population.trainer import MINIBATCH_STREAMS, PopulationTrainer, make_members
from sb3_hanq.version import __version__

#: Version of the results file's layout.
RESULTS_FORMAT_VERSION = 1


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def checkpoint_path(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoint (removed once the results are complete)."""
    return out.with_name(out.name + ".ckpt.pt")


#: Structural settings added after runs were recorded, with the value those runs had: a saved run that lacks one
#: resumes as if it had recorded that value.
ADDED_SETTINGS = {"tune_betas": False}


def _differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(config))
    if "member_params" not in saved:  # (written before the resolved settings were recorded)
        keys.remove("member_params")
    else:
        params = [{**ADDED_SETTINGS, **json.loads(text)} for text in saved["member_params"]]
        saved = {**saved, "member_params": sorted({json.dumps(p, sort_keys=True) for p in params})}
    saved = {"pendulum_start": "uniform", **saved}  # (written before the dataset readings existed)
    saved = {"minibatch_stream": "population", **saved}  # (written before per-member streams)
    return [f"{k}: {saved.get(k)!r} (saved) vs {config.get(k)!r} (now)" for k in keys if saved.get(k) != config.get(k)]


def _saved_stream(config: Any) -> str:
    """The minibatch stream of a saved run's config (``"population"`` if it predates the option); ``"member"`` if
    it has none that is valid (the argument check that follows reports the difference)."""
    stream = config.get("minibatch_stream", "population") if isinstance(config, dict) else "member"
    return stream if stream in MINIBATCH_STREAMS else "member"


def _read_results(out_path: Path) -> dict[str, Any]:
    """A complete run's results file, or a ``ValueError`` saying why ``out`` cannot be one."""
    try:
        saved = json.loads(out_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"out={str(out_path)!r} exists and is not a results file ({err}); choose another path"
        ) from err
    if not isinstance(saved, dict) or "config" not in saved:
        raise ValueError(f"out={str(out_path)!r} exists and is not a population results file; choose another path")
    return saved


def summarize(members: list[dict[str, Any]], reps: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per configuration (everything but the seed): seeds, mean, rliable IQM and its 95% stratified-bootstrap
    CI of the run-averaged score (HANQ paper §4: the score averaged over all evaluations of a run), and how many
    of its members diverged (they count with the scores of their frozen, last finite weights).

    ``seed`` makes the bootstrap repeatable: rliable's ``StratifiedBootstrap`` draws its resamples from NumPy's
    global generator (whatever ``random_state`` says), so it is seeded here and restored afterwards."""
    configs: dict[str, list[float]] = {}
    diverged: dict[str, int] = {}
    for member in members:
        key = json.dumps(member["hyperparameters"], sort_keys=True)
        configs.setdefault(key, []).append(member["average_score"])
        diverged[key] = diverged.get(key, 0) + (member.get("diverged_at_step") is not None)
    try:
        from rliable import library as rly
        from rliable import metrics
    except ImportError:  # the CI needs rliable (extra "bench"); the mean does not
        rly = metrics = None
    rows = []
    for key, scores in configs.items():
        values = np.asarray(scores, dtype=np.float64)
        row: dict[str, Any] = dict(
            hyperparameters=json.loads(key), n=len(values), mean=float(np.nanmean(values)), diverged=diverged[key]
        )
        if rly is not None and np.isfinite(values).all():
            iqm = lambda x: np.array([metrics.aggregate_iqm(x)])  # noqa: E731
            state = np.random.get_state()  # noqa: NPY002 (the global stream rliable uses)
            np.random.seed(seed)  # noqa: NPY002 (the global stream rliable uses)
            try:
                point, ci = rly.get_interval_estimates({"c": values[:, None]}, iqm, reps=reps)
            finally:
                np.random.set_state(state)  # noqa: NPY002 (the global stream rliable uses)
            row.update(iqm=float(point["c"][0]), ci=[float(ci["c"][0, 0]), float(ci["c"][1, 0])])
        rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]], header: str = "") -> str:
    """A Markdown table of :func:`summarize`'s rows: one column per hyperparameter that varies across rows."""
    varying = [k for k in rows[0]["hyperparameters"] if len({json.dumps(r["hyperparameters"][k]) for r in rows}) > 1]
    any_diverged = any(r.get("diverged") for r in rows)
    lines = [header] if header else []
    lines += [
        "| "
        + " | ".join(varying or ["configuration"])
        + " | seeds | mean score | IQM [95% CI] |"
        + (" diverged |" if any_diverged else ""),
        "|" + "---|" * (max(len(varying), 1) + 3 + any_diverged),
    ]
    for r in rows:
        ci = (
            f"{r['iqm']:.1f} [{r['ci'][0]:.1f}, {r['ci'][1]:.1f}]" if "iqm" in r else "(needs rliable: sb3-hanq[bench])"
        )
        values = [r["hyperparameters"][k] for k in varying]
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in values] or ["(the only one)"]
        lines.append(
            "| "
            + " | ".join(cells)
            + f" | {r['n']} | {r['mean']:.1f} | {ci} |"
            + (f" {r.get('diverged', 0)} |" if any_diverged else "")
        )
    return "\n".join(lines) + "\n"


def train_population(
    algo: str,
    env_id: str,
    seeds: int | Sequence[int],
    gradient_steps: int,
    eval_freq: int,
    eval_episodes: int = 10,
    learning_rate: Sequence[float] | None = None,
    hyper_lr: Sequence[float] | None = None,
    tau: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    hyper_objective: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
    batch_size: int = 128,
    n_samples: int | None = None,
    target_update_interval: int = 1,
    device: th.device | str = "auto",
    out: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
    seed: int = 0,
    verbose: int = 1,
    compile: bool = False,
    pendulum_start: str = "episodes",
    minibatch_stream: str | None = None,
) -> dict[str, Any]:
    """Train the grid ``seeds x learning_rate x hyper_lr x tau x gamma x hyper_objective x params`` offline on
    ``env_id`` as one batched population, evaluating every member every ``eval_freq`` gradient steps.

    With ``out``, the results go to ``out`` (JSON) and the summary table to ``out`` with suffix ``.md``; a
    checkpoint is written after every evaluation, and calling again with the same arguments continues from it
    (a finished run is returned as it is). Different arguments against an existing output are a ``ValueError``.

    :param seeds: a number of seeds (``0 .. seeds-1``) or the seeds themselves
    :param compile: :func:`torch.compile` the members' forward and backward passes (see
        :class:`~sb3_hanq.population.PopulationTrainer`); not part of the run's arguments, so a run may be
        resumed with or without it
    :param pendulum_start: the Pendulum dataset's reading (:func:`~sb3_hanq.common.offline.collect_dataset`)
    :param minibatch_stream: where the members' minibatch indices come from, one of
        :data:`~sb3_hanq.population.trainer.MINIBATCH_STREAMS` (see :class:`~sb3_hanq.population.PopulationTrainer`);
        ``None``: the stream of the run being resumed or returned (``"population"`` for runs saved before the
        option existed), else ``"member"``
    :return: the results (what the JSON holds): ``config``, ``members`` (per member: algorithm, hyperparameters,
        seed, evaluation steps, scores, the score averaged over evaluations, learning rates, final learning
        rate, ``diverged_at_step``), ``summary``, timing and machine
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)  # type: ignore[arg-type]
    for name, value in (("gradient_steps", gradient_steps), ("eval_freq", eval_freq)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}: must be an integer >= 1")
    if eval_freq > gradient_steps:
        raise ValueError(f"Invalid eval_freq={eval_freq}: larger than gradient_steps={gradient_steps} (no evaluation)")
    if minibatch_stream is not None and minibatch_stream not in MINIBATCH_STREAMS:
        raise ValueError(f"Invalid minibatch_stream={minibatch_stream!r}: expected one of {MINIBATCH_STREAMS}")
    members = make_members(algo, seed_list, learning_rate, hyper_lr, tau, gamma, hyper_objective, params)
    out_path = Path(out) if out is not None else None
    ckpt = checkpoint_path(out_path) if out_path is not None else None
    # a finished run is returned as it is, else a checkpoint resumed (each file is read once)
    saved = _read_results(out_path) if out_path is not None and out_path.exists() else None
    state = None
    if saved is None and ckpt is not None and ckpt.exists():
        state = th.load(ckpt, map_location="cpu", weights_only=False)  # (the trainer moves it to its device)
    if minibatch_stream is None:  # a run being resumed or returned keeps its stream
        source = saved if saved is not None else state
        minibatch_stream = _saved_stream(source.get("config")) if isinstance(source, dict) else "member"
    config = dict(
        algo=algo,
        env_id=env_id,
        seeds=seed_list,
        gradient_steps=int(gradient_steps),
        eval_freq=int(eval_freq),
        eval_episodes=int(eval_episodes),
        learning_rate=None if learning_rate is None else [float(x) for x in learning_rate],
        hyper_lr=None if hyper_lr is None else [float(x) for x in hyper_lr],
        tau=None if tau is None else [float(x) for x in tau],
        gamma=None if gamma is None else [float(x) for x in gamma],
        hyper_objective=None if hyper_objective is None else list(hyper_objective),
        params=params or {},
        batch_size=batch_size,
        n_samples=n_samples,
        target_update_interval=target_update_interval,
        seed=seed,
        pendulum_start=pendulum_start,
        minibatch_stream=minibatch_stream,
        # the structural settings after defaults: a run resumed after a default changed is refused, not mixed
        member_params=sorted({json.dumps(dict(m.params), sort_keys=True) for m in members}),
    )
    if saved is not None:
        diff = _differences(saved["config"], config)
        if diff:
            raise ValueError(
                f"out={str(out_path)!r} holds a run with different arguments ({'; '.join(diff)}): "
                "pass the same arguments to resume, or another --out"
            )
        if verbose:
            print(f"{out_path} is complete: nothing to do")
        return saved

    trainer = PopulationTrainer(
        env_id,
        members,
        batch_size=batch_size,
        n_samples=n_samples,
        eval_episodes=eval_episodes,
        target_update_interval=target_update_interval,
        device=device,
        seed=seed,
        compile=compile,
        pendulum_start=pendulum_start,
        minibatch_stream=minibatch_stream,
    )
    elapsed_before = 0.0
    if state is not None:
        diff = _differences(state["config"], config)
        if diff:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} belongs to a run with different arguments ({'; '.join(diff)}): "
                "pass the same arguments to resume, or another --out"
            )
        trainer.load_state_dict(state["trainer"])
        elapsed_before = float(state["seconds"])
        if verbose:
            print(f"Resuming from {ckpt} at gradient step {trainer.num_steps}")

    bar = None
    if progress_bar:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=gradient_steps, initial=trainer.num_steps, unit="step", desc=f"{algo} x{len(members)}")
        except ImportError:
            print("progress_bar needs tqdm (pip install tqdm); continuing without it")
    start = time.perf_counter()
    start_step = trainer.num_steps
    while trainer.num_steps < gradient_steps:
        n = min(eval_freq - trainer.num_steps % eval_freq, gradient_steps - trainer.num_steps)
        trainer.train_steps(n)
        if trainer.num_steps % eval_freq == 0:
            scores = trainer.record()
            if ckpt is not None:
                seconds = elapsed_before + time.perf_counter() - start
                payload = dict(config=config, trainer=trainer.state_dict(), seconds=seconds)
                _atomic_write(ckpt, lambda p, payload=payload: th.save(payload, p))
            if bar is not None:
                bar.set_postfix(score=f"{np.nanmean(scores):.1f}")
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    seconds = elapsed_before + time.perf_counter() - start
    run_seconds = time.perf_counter() - start

    history = trainer.history
    diverged = trainer.diverged_at()
    member_rows = []
    for i, member in enumerate(members):
        scores_i = [row[i] for row in history["scores"]]
        lrs = [row[i] for row in history["learning_rates"]]
        hyperparameters = member.config
        hyperparameters.pop("algo")
        member_rows.append(
            dict(
                algorithm=member.algo,
                seed=member.seed,
                hyperparameters=hyperparameters,
                eval_steps=list(history["steps"]),
                scores=scores_i,
                average_score=float(np.mean(scores_i)),
                learning_rates=lrs,
                final_learning_rate=lrs[-1],
                losses=[row[i] for row in history["losses"]],
                omega_scales=[row[i] for row in history["omega_scales"]],
                diverged_at_step=diverged[i],
            )
        )
        for name in ("beta1", "beta2"):  # (tune_betas runs)
            if name in history:
                member_rows[-1][name] = [row[i] for row in history[name]]
    summary = summarize(member_rows)
    results = dict(
        format_version=RESULTS_FORMAT_VERSION,
        config=config,
        members=member_rows,
        summary=summary,
        seconds=seconds,
        member_steps_per_second=len(members) * (trainer.num_steps - start_step) / max(run_seconds, 1e-9),
        machine=dict(
            platform=platform.platform(),
            torch=th.__version__,
            device=str(trainer.device),
            threads=th.get_num_threads(),
            load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            sb3_hanq=__version__,
        ),
    )
    n_diverged = sum(d is not None for d in diverged)
    header = (
        f"{algo} on {env_id}: {len(seed_list)} seeds x {gradient_steps} gradient steps, evaluation every "
        f"{eval_freq} steps on {eval_episodes} episodes; score averaged over evaluations (HANQ paper §4). "
        f"{len(members)} members in {seconds:.0f} s on {trainer.device}"
        + (f"; {n_diverged} member(s) diverged (see diverged_at_step)" if n_diverged else "")
        + "\n"
    )
    table = format_summary(summary, header)
    if verbose:
        print(table)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_path, lambda p: p.write_text(json.dumps(results, indent=1)))
        _atomic_write(out_path.with_suffix(".md"), lambda p: p.write_text(table))
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
    return results
