"""Gradient-step time of PreQN against SB3's TD3 with the same networks, batch and data, in one run.

    python benchmarks/speed_preqn.py [--env HalfCheetah-v5] [--steps 200] [--repeats 5] [--threads 1]

Both algorithms use net_arch [256, 256] for actor and critic and batch 256 (PreQN paper Appendix B), and
train on the same fixed replay buffer of ``--buffer`` transitions collected with uniformly random actions
(one buffer object, shared). Each repeat times ``model.train(gradient_steps=--steps, batch_size=256)`` for
every algorithm in turn, so that load from other processes on the machine affects all alike; the headline is
the median over repeats of the per-repeat ratio PreQN / TD3.

Then, outside the timed repeats:

* an instrumented pass over ``--breakdown-steps`` PreQN gradient steps with wall-clock timers around the
  parts of ``PreQN.train`` (replay sampling, NTK build, ``eigh``, rest of the least-squares solve, update
  direction, line search, actor loss forward, actor optimiser step, NTK statistics; the rest is TD targets,
  actor backward and bookkeeping). The timers wrap the package's own functions; no sb3_hanq code is changed;
* a torch.profiler pass (top operators by self CPU time) for PreQN and TD3;
* a micro-benchmark of alternative solvers for ``Z = K^+ Delta`` on kernels captured from real PreQN batches
  (eigh float32 as in the package, eigh float64, Cholesky with jitter, LU solve, ``lstsq``), with their
  residuals, so that any speed-up suggestion in the report is a measured one.

Writes the raw numbers to ``benchmarks/results/speed_preqn.json`` first, then the tables to ``speed_preqn.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch as th
from bench_common import add_speed_arguments, random_transitions
from stable_baselines3 import TD3
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import Logger

import sb3_hanq.common.ntk as ntk_module
import sb3_hanq.preqn.preqn as preqn_module
from sb3_hanq import PreQN

RESULTS = Path(__file__).parent / "results"
NET_ARCH = [256, 256]
BATCH = 256
BASE = "TD3 (SB3, baseline)"
PREQN = "PreQN (sin critic, default)"
PREQN_RELU = "PreQN (relu critic)"
PREQN_CHOL = "PreQN (sin critic, lstsq_method='cholesky')"
# name -> (class, constructor kwargs)
CONFIGS = {
    BASE: (TD3, dict()),
    PREQN: (PreQN, dict()),
    "TD3 (policy_delay=1)": (TD3, dict(policy_delay=1)),
    PREQN_RELU: (PreQN, dict(policy_kwargs=dict(net_arch=NET_ARCH, critic_activation="relu"))),
    PREQN_CHOL: (PreQN, dict(lstsq_method="cholesky")),
}


def build(cls, kwargs: dict, env_id: str, buffer: ReplayBuffer, seed: int):
    kwargs = dict(dict(policy_kwargs=dict(net_arch=NET_ARCH)), **kwargs)
    model = cls("MlpPolicy", env_id, batch_size=BATCH, seed=seed, device="cpu", **kwargs)
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.replay_buffer = buffer
    return model


class Timers:
    """Wall-clock timers around callables; nested timers are reported exclusive of their children."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[float]] = []  # per active timer: [child time]

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.stack.append([0.0])
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = self.stack.pop()[0]
                self.total[name] += elapsed - children
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1][0] += elapsed

        return timed


def breakdown(model: PreQN, steps: int, captured: list) -> dict:
    """Instrumented PreQN pass: exclusive ms per gradient step for each part of ``PreQN.train``."""
    timers = Timers()
    originals = dict(
        eigh=th.linalg.eigh,
        ntk_lstsq=ntk_module.ntk_lstsq,
        direction=preqn_module.preconditioned_direction,
        row_ratio=preqn_module.ntk_row_ratio,
        diagonal=preqn_module.ntk_diagonal,
    )
    lstsq = timers.wrap("least squares: rest (cutoff, 2 mat-vecs)", originals["ntk_lstsq"])

    def capturing_lstsq(kernel, delta, rtol=None, method="eigh"):
        if len(captured) < 32:
            captured.append((kernel.detach().clone(), delta.detach().clone()))
        return lstsq(kernel, delta, rtol, method)

    th.linalg.eigh = timers.wrap("least squares: torch.linalg.eigh (float32)", originals["eigh"])
    ntk_module.ntk_lstsq = capturing_lstsq
    preqn_module.preconditioned_direction = timers.wrap(
        "update direction (weighted gradient from G_l, A_l)", originals["direction"]
    )
    preqn_module.ntk_row_ratio = timers.wrap("NTK statistics (row ratio, diagonal)", originals["row_ratio"])
    preqn_module.ntk_diagonal = timers.wrap("NTK statistics (row ratio, diagonal)", originals["diagonal"])
    q = model._q_function
    q.ntk_and_q = timers.wrap("NTK build (forward, backward for G_l, layer Gram products)", q.ntk_and_q)
    model._line_search = timers.wrap("line search (forward passes of candidates)", model._line_search)
    model.critic.q1_forward = timers.wrap("actor loss: critic forward on (s, mu(s))", model.critic.q1_forward)
    model.actor.forward = timers.wrap("actor forward (mu(s') for targets, mu(s) for actor loss)", model.actor.forward)
    q_call = type(q).__call__
    td_timer = timers.wrap("TD targets: critic forward on (s', mu(s'))", q_call)

    def call(self, obs, actions=None, params=None):  # params=None: the TD targets; else a line-search candidate
        return td_timer(self, obs, actions) if params is None else q_call(self, obs, actions, params)

    type(q).__call__ = call
    model.actor.optimizer.step = timers.wrap("actor Adam step", model.actor.optimizer.step)
    buffer = model.replay_buffer
    buffer.sample = timers.wrap("replay sampling", buffer.sample)
    try:
        start = time.perf_counter()
        train = timers.wrap("total", model.train)
        train(gradient_steps=steps, batch_size=BATCH)
        total = time.perf_counter() - start
    finally:
        th.linalg.eigh = originals["eigh"]
        ntk_module.ntk_lstsq = originals["ntk_lstsq"]
        preqn_module.preconditioned_direction = originals["direction"]
        preqn_module.ntk_row_ratio = originals["row_ratio"]
        preqn_module.ntk_diagonal = originals["diagonal"]
        type(q).__call__ = q_call
        for obj, attr in (
            (q, "ntk_and_q"),
            (model, "_line_search"),
            (model.critic, "q1_forward"),
            (model.actor, "forward"),
        ):
            del obj.__dict__[attr]
        del model.actor.optimizer.__dict__["step"]
        del buffer.__dict__["sample"]
    parts = {name: 1000 * t / steps for name, t in timers.total.items() if name != "total"}
    parts["other (actor backward through the critic, zero_grad, finiteness checks, bookkeeping)"] = (
        1000 * timers.total["total"] / steps
    )
    return dict(total_ms=1000 * total / steps, parts_ms=parts, calls=dict(timers.calls))


def profile_ops(model, steps: int, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.train(gradient_steps=steps, batch_size=BATCH)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        dict(op=e.key, self_ms_per_step=e.self_cpu_time_total / 1000 / steps, share=e.self_cpu_time_total / total)
        for e in events[:top]
    ]


def _eigh_solve(kernel, delta, dtype):
    k, d = kernel.to(dtype), delta.to(dtype)
    rtol = k.shape[0] * th.finfo(th.float32).eps  # the package's cutoff for float32 kernels
    values, vectors = th.linalg.eigh(k)
    inverse = th.where(values > rtol * values.abs().max(), 1.0 / values, th.zeros_like(values))
    return vectors @ (inverse * (vectors.T @ d))


def _cholesky_solve(kernel, delta, dtype, jitter):
    k, d = kernel.to(dtype), delta.to(dtype)
    eye = th.eye(k.shape[0], dtype=dtype)
    k = k + jitter * th.diagonal(k).mean() * eye
    factor, info = th.linalg.cholesky_ex(k)
    if int(info) != 0:
        return None
    return th.cholesky_solve(d[:, None], factor)[:, 0]


def _lu_solve(kernel, delta):
    z, info = th.linalg.solve_ex(kernel, delta)
    return None if int(info) != 0 else z


SOLVERS = {
    "eigh float32 (package: ntk_lstsq)": lambda k, d: ntk_module.ntk_lstsq(k, d),
    "eigh float64": lambda k, d: _eigh_solve(k, d, th.float64),
    "Cholesky float32, jitter 1e-6 * mean diag": lambda k, d: _cholesky_solve(k, d, th.float32, 1e-6),
    "Cholesky float32, jitter 1e-4 * mean diag": lambda k, d: _cholesky_solve(k, d, th.float32, 1e-4),
    "Cholesky float64, jitter 1e-10 * mean diag": lambda k, d: _cholesky_solve(k, d, th.float64, 1e-10),
    "package: ntk_lstsq(method='cholesky') (ridge eps * lambda_max)": lambda k, d: ntk_module.ntk_lstsq(
        k, d, method="cholesky"
    ),
    "LU solve float32 (torch.linalg.solve_ex)": lambda k, d: _lu_solve(k, d),
    "lstsq float32 (gelsd)": lambda k, d: th.linalg.lstsq(k, d[:, None], driver="gelsd").solution[:, 0],
}


def solver_benchmark(captured: list, repeats: int) -> dict:
    """Median time and quality of alternative solvers of ``K Z = Delta`` on captured PreQN kernels."""
    out = {}
    for name, solve in SOLVERS.items():
        times, residuals, changes, failures = [], [], [], 0
        for kernel, delta in captured:
            reference = ntk_module.ntk_lstsq(kernel, delta)
            for _ in range(repeats):
                start = time.perf_counter()
                z = solve(kernel, delta)
                times.append(time.perf_counter() - start)
            if z is None or not bool(th.isfinite(z).all()):
                failures += 1
                continue
            k64, z64, d64 = kernel.double(), z.double(), delta.double()
            residuals.append(float((k64 @ z64 - d64).norm() / d64.norm()))
            # first-order change of Q, K z, against the package's: what the line search would see
            changes.append(float((k64 @ z64 - k64 @ reference.double()).norm() / d64.norm()))
        out[name] = dict(
            median_ms=1000 * statistics.median(times),
            median_rel_residual=statistics.median(residuals) if residuals else float("nan"),
            max_rel_residual=max(residuals) if residuals else float("nan"),
            median_rel_change_vs_package=statistics.median(changes) if changes else float("nan"),
            failures=failures,
        )
    conds, ranks = [], []
    for kernel, _ in captured:
        values = th.linalg.eigvalsh(kernel.double())
        conds.append(float(values.max() / values.min().abs().clamp_min(1e-300)))
        values32 = th.linalg.eigvalsh(kernel)
        ranks.append(int((values32 > kernel.shape[0] * th.finfo(th.float32).eps * values32.abs().max()).sum()))
    return dict(
        solvers=out,
        n_kernels=len(captured),
        median_condition_number_float64=statistics.median(conds),
        numerical_ranks_float32=ranks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(parser)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--breakdown-steps", type=int, default=200)
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument("--solver-repeats", type=int, default=5)
    parser.add_argument("--tag", default="speed_preqn")
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    command = (
        f"python benchmarks/speed_preqn.py --env {args.env} --steps {args.steps} --repeats {args.repeats} "
        f"--warmup {args.warmup} --buffer {args.buffer} --breakdown-steps {args.breakdown_steps} "
        f"--profile-steps {args.profile_steps} --solver-repeats {args.solver_repeats} --threads {args.threads} "
        f"--seed {args.seed} --tag {args.tag}"
    )
    buffer = random_transitions(args.env, args.buffer, args.seed)
    models = {name: build(cls, kw, args.env, buffer, args.seed) for name, (cls, kw) in CONFIGS.items()}
    for model in models.values():
        model.train(gradient_steps=args.warmup, batch_size=BATCH)
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in models}
    backtracks: dict[str, list[float]] = {PREQN: [], PREQN_RELU: [], PREQN_CHOL: []}
    for repeat in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.train(gradient_steps=args.steps, batch_size=BATCH)
            seconds[name].append(time.perf_counter() - start)
            if name in backtracks:
                backtracks[name].append(float(model.logger.name_to_value["train/linesearch_backtracks"]))
        print(
            f"repeat {repeat + 1}: " + ", ".join(f"{n}: {1000 * s[-1] / args.steps:.2f} ms" for n, s in seconds.items())
        )
    load_after = os.getloadavg()
    summary = {}
    for name, runs in seconds.items():
        ratios = [r / b for r, b in zip(runs, seconds[BASE])]
        summary[name] = dict(
            ms_per_step=[1000 * r / args.steps for r in runs],
            median_ms_per_step=1000 * statistics.median(runs) / args.steps,
            ratios_to_td3=ratios,
            median_ratio_to_td3=statistics.median(ratios),
        )
    results = dict(
        command=command,
        machine=dict(
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            load_before=load_before,
            torch=th.__version__,
            python=sys.version.split()[0],
            threads=args.threads,
        ),
        args=vars(args),
        summary=summary,
        preqn_backtracks_per_step=backtracks,
        preqn_rejected_steps={name: models[name].rejected_steps for name in backtracks},
    )
    results["machine"]["load_after"] = load_after
    out_json = RESULTS / f"{args.tag}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2, default=str))

    captured: dict[str, list] = {PREQN: [], PREQN_RELU: []}
    results["breakdown"] = {
        name: breakdown(models[name], args.breakdown_steps, captured[name]) for name in (PREQN, PREQN_RELU)
    }
    out_json.write_text(json.dumps(results, indent=2, default=str))
    results["profile"] = {name: profile_ops(models[name], args.profile_steps) for name in (PREQN, BASE)}
    out_json.write_text(json.dumps(results, indent=2, default=str))
    results["solvers"] = {name: solver_benchmark(kernels, args.solver_repeats) for name, kernels in captured.items()}
    results["machine"]["load_end"] = os.getloadavg()
    out_json.write_text(json.dumps(results, indent=2, default=str))
    text = render(results)
    print(text)
    (RESULTS / f"{args.tag}.md").write_text(text)


def render(res: dict) -> str:
    m, summary = res["machine"], res["summary"]
    steps, repeats = res["args"]["steps"], res["args"]["repeats"]
    lines = [
        "# PreQN vs TD3: gradient-step time",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {m['processor']} ({m['cpu_count']} cores, shared with other jobs; load average "
        f"{m['load_before'][0]:.2f} before the timed repeats, {m['load_after'][0]:.2f} after), CPU only, "
        f"torch {m['torch']}, {m['threads']} thread(s), Python {m['python']}.  ",
        f"{res['args']['env']}, one shared replay buffer of {res['args']['buffer']} uniformly random transitions; "
        f"batch {BATCH}; net_arch {NET_ARCH} for actor and critic(s); {repeats} interleaved repeats of "
        f"`model.train(gradient_steps={steps}, batch_size={BATCH})` per algorithm, after "
        f"{res['args']['warmup']} warm-up steps; no-output Logger.",
        "",
        "| algorithm | median ms / gradient step | per-repeat ms / step | ratio to TD3 (median) | per-repeat ratios |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['median_ms_per_step']:.2f} | {', '.join(f'{x:.2f}' for x in s['ms_per_step'])} | "
            f"{s['median_ratio_to_td3']:.2f}x | {', '.join(f'{x:.2f}' for x in s['ratios_to_td3'])} |"
        )
    bt = {name: statistics.mean(v) for name, v in res["preqn_backtracks_per_step"].items()}
    lines += [
        "",
        "Notes: TD3 is SB3's default (2 critics, target networks with Polyak updates, target policy smoothing, "
        "`policy_delay=2`: the actor and the targets are updated every second step). PreQN "
        "(`sb3_hanq.PreQN`, Appendix B defaults: sin critic, alpha_q 0.1, eta 0.97) has one critic, no target "
        "networks, no critic optimiser, and updates the actor at **every** gradient step (`policy_delay=1` in "
        "its `TD3.__init__` call, Alg. 1 line 14). The row `TD3 (policy_delay=1)` updates the actor every step "
        "too, for a like-for-like actor cost; `PreQN (relu critic)` isolates the cost of the sin activation. "
        "Line-search shrinks per gradient step during the timed repeats (each is one more critic forward pass "
        "on the batch): "
        + ", ".join(f"{name} {v:.2f}" for name, v in bt.items())
        + "; rejected critic steps: "
        + ", ".join(f"{name} {v}" for name, v in res["preqn_rejected_steps"].items())
        + ".",
        "",
    ]
    for name, b in res["breakdown"].items():
        lines += [
            f"## Where the time of {name} goes ({res['args']['breakdown_steps']} instrumented gradient steps)",
            "",
            f"Wall-clock timers around the parts of `PreQN.train` (exclusive times; instrumented total "
            f"{b['total_ms']:.2f} ms / step against {summary[name]['median_ms_per_step']:.2f} uninstrumented).",
            "",
            "| part | ms / step | share |",
            "|---|---|---|",
        ]
        total = sum(b["parts_ms"].values())
        for part, ms in sorted(b["parts_ms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {part} | {ms:.2f} | {100 * ms / total:.0f}% |")
        lines.append("")
    for name, ops in res["profile"].items():
        lines += [
            f"torch.profiler, {name}: top operators by self CPU time ({res['args']['profile_steps']} steps)",
            "",
            "| operator | self ms / step | share |",
            "|---|---|---|",
        ]
        lines += [f"| `{o['op']}` | {o['self_ms_per_step']:.3f} | {100 * o['share']:.0f}% |" for o in ops]
        lines.append("")
    for name, s in res["solvers"].items():
        ranks = s["numerical_ranks_float32"]
        lines += [
            f"## Solvers for Z = K^+ Delta on {s['n_kernels']} kernels captured from {name} batches "
            f"({BATCH} x {BATCH})",
            "",
            f"Median condition number of K (float64 eigenvalues): {s['median_condition_number_float64']:.3g}; "
            f"numerical rank with the package's float32 cutoff: median {statistics.median(ranks)}, min {min(ranks)} "
            f"of {BATCH}. Relative residual: ||K Z - Delta|| / ||Delta|| (float64). Change vs package: "
            "||K Z - K Z_package|| / ||Delta||, how different the first-order change of Q would be. "
            "A failure is a non-zero `info` (factorisation failed) or a non-finite Z.",
            "",
            "| solver | median ms / solve | median rel. residual | max rel. residual | median change vs package "
            "| failures |",
            "|---|---|---|---|---|---|",
        ]
        for solver, r in s["solvers"].items():
            lines.append(
                f"| {solver} | {r['median_ms']:.2f} | {r['median_rel_residual']:.2e} | {r['max_rel_residual']:.2e} "
                f"| {r['median_rel_change_vs_package']:.2e} | {r['failures']} |"
            )
        lines.append("")
    lines += ["## Assessment (generated from the numbers above)", ""]
    ratio = summary[PREQN]["median_ratio_to_td3"]
    base_ms = summary[BASE]["median_ms_per_step"]
    for name in (PREQN, PREQN_RELU):
        parts = res["breakdown"][name]["parts_ms"]
        eigh_ms = parts["least squares: torch.linalg.eigh (float32)"]
        solvers = res["solvers"][name]["solvers"]
        chol = solvers["Cholesky float32, jitter 1e-6 * mean diag"]
        eigh_residual = solvers["eigh float32 (package: ntk_lstsq)"]["median_rel_residual"]
        saved = eigh_ms - chol["median_ms"]
        projected = (summary[name]["median_ms_per_step"] - saved) / base_ms
        lines.append(
            f"* {name}: {summary[name]['median_ratio_to_td3']:.2f}x TD3; `eigh` is "
            f"{100 * eigh_ms / sum(parts.values()):.0f}% of its step ({eigh_ms:.2f} ms). Cholesky float32 with "
            f"jitter 1e-6 * mean diag solved the captured kernels in {chol['median_ms']:.2f} ms "
            f"({chol['failures']} failures of {res['solvers'][name]['n_kernels']}, median residual "
            f"{chol['median_rel_residual']:.1e} vs {eigh_residual:.1e} "
            f"for eigh); swapping it in would save about {saved:.2f} ms / step, i.e. a projected "
            f"{projected:.2f}x TD3 (projection from the parts, not a measured run)."
        )
    chol = summary[PREQN_CHOL]
    lines.append(
        f"* Measured, not projected: the row `{PREQN_CHOL}` is PreQN with the package's optional solver "
        f"(`sb3_hanq.common.ntk.ntk_lstsq(..., method='cholesky')`: Cholesky solve of K + eps * lambda_max I, "
        "lambda_max from 10 power iterations, then n eps * lambda_max, then eigh if both factorisations fail): "
        f"{chol['median_ms_per_step']:.2f} ms / "
        f"step, {chol['median_ratio_to_td3']:.2f}x TD3. It is a ridge-regularised stand-in for the paper's "
        "K^+ Delta, so it is an option, not the default; its effect on training is in the README's PreQN section."
    )
    td3_delay1 = summary["TD3 (policy_delay=1)"]["median_ms_per_step"]
    lines.append(
        f"* Algorithmic, not implementation, cost: updating the actor at every step costs TD3 "
        f"{td3_delay1 - base_ms:.2f} ms / step (policy_delay 1 vs 2); the sin critic costs PreQN "
        f"{summary[PREQN]['median_ms_per_step'] - summary[PREQN_RELU]['median_ms_per_step']:.2f} ms / step over relu "
        "(sin and its derivative cos in every critic pass). Against `TD3 (policy_delay=1)` the default PreQN is "
        f"{summary[PREQN]['median_ms_per_step'] / td3_delay1:.2f}x."
    )
    ls_ms = res["breakdown"][PREQN]["parts_ms"]["line search (forward passes of candidates)"]
    lines.append(
        f"* On this random-transition buffer with fresh networks the line search almost never shrinks the step "
        f"(see notes), so the line search here is one candidate evaluation ({ls_ms:.2f} ms / step); in training, "
        "every shrink adds about as much again, so these ratios are lower bounds for PreQN."
    )
    verdict = "meets" if ratio <= 1.5 else "misses"
    lines.append(f"* The default PreQN {verdict} the <= 1.5x goal as measured ({ratio:.2f}x).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
