"""Speed of the population trainer against M, beside the SB3 classes' gradient steps/s, in one run.

    python benchmarks/speed_population.py [--members 1 10 30 100 300 1000] [--threads 2] [--seconds 4]

For each M, eager and with ``compile=True``: HANQ (kappa = 0.1, RG hyperobjective, width 128, batch 128,
DiscretePendulum-v1's 1000-transition datasets) trained by :class:`sb3_hanq.population.PopulationTrainer` in a
fresh subprocess (so that its peak memory, ``ru_maxrss``, is its own), timed over about ``--seconds`` after 10
warm-up steps. Interleaved with those, in this process: SB3's ``HANQ.train`` and ``DQN.train`` on one agent with
one thread (the way one runs one agent per core). Also: torch.profiler breakdowns at M = 30, the FLOPs per
member-step and the machine's measured matmul FLOP rate. Writes ``benchmarks/results/speed_population.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def population_rate(members: int, threads: int, seconds: float, profile: bool = False, compile: bool = False) -> dict:
    import torch as th

    th.set_num_threads(threads)
    from sb3_hanq.population import PopulationTrainer, make_members

    trainer = PopulationTrainer(
        "DiscretePendulum-v1", make_members("hanq", range(members)), device="cpu", compile=compile
    )
    start = time.perf_counter()
    trainer.train_steps(10)
    first_steps = time.perf_counter() - start  # with compile=True: the compilation
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 5:
        trainer.train_steps(5)
        steps += 5
    elapsed = time.perf_counter() - start
    start_eval = time.perf_counter()
    trainer.record()
    eval_seconds = time.perf_counter() - start_eval
    out = dict(
        members=members,
        compile=compile,
        first_10_steps_s=first_steps,
        ms_per_step=1000 * elapsed / steps,
        member_steps_per_s=members * steps / elapsed,
        eval_seconds=eval_seconds,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            trainer.train_steps(20)
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        out["profile"] = [
            dict(op=e.key, ms_per_step=e.self_cpu_time_total / 20 / 1000, share=e.self_cpu_time_total / total)
            for e in rows
        ]
    return out


def sb3_rates(seconds: float) -> dict[str, float]:
    import torch as th
    from stable_baselines3 import DQN
    from stable_baselines3.common.logger import Logger

    from sb3_hanq import HANQ
    from sb3_hanq.offline import collect_dataset, dataset_to_replay_buffer

    th.set_num_threads(1)
    dataset = collect_dataset("DiscretePendulum-v1", 1000, seed=0)
    rates = {}
    for name, cls, kwargs in (
        ("HANQ (SB3 class)", HANQ, {}),
        ("DQN (SB3)", DQN, dict(policy_kwargs=dict(net_arch=[128]))),
    ):
        model = cls("MlpPolicy", "DiscretePendulum-v1", batch_size=128, seed=0, device="cpu", **kwargs)
        model.set_logger(Logger(folder=None, output_formats=[]))
        model.replay_buffer = dataset_to_replay_buffer(dataset, model.observation_space, model.action_space, "cpu")
        model.train(gradient_steps=50)
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.train(gradient_steps=100)
            steps += 100
        rates[name] = steps / (time.perf_counter() - start)
    return rates


def flops_per_member_step(batch: int = 128, width: int = 128, n_obs: int = 3, n_actions: int = 3) -> float:
    """Matmul FLOPs of one HANQ member-step: forward of s (torso, Q head, metapredictor head), its backward
    (2x), forward of s' (torso, Q head) and the RG backward through it (2x)."""
    s_path = 2 * batch * (n_obs * width + width * n_actions + width * 2 * n_actions)
    next_path = 2 * batch * (n_obs * width + width * n_actions)
    return 3 * s_path + 3 * next_path


def matmul_peak(threads: int) -> float:
    import torch as th

    th.set_num_threads(threads)
    a, b = th.randn(2048, 2048), th.randn(2048, 2048)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 10, 30, 100, 300, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one M, print JSON
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(population_rate(args.one, args.threads, args.seconds, args.profile, args.compile)))
        return

    rows, compiled, sb3 = [], [], []
    for m in args.members:
        sb3.append(sb3_rates(args.seconds / 2))  # interleaved with the population runs
        for flag, out in ((False, rows), (True, compiled)):  # eager and compiled, one after the other
            cmd = [sys.executable, __file__, "--one", str(m), "--threads", str(args.threads)]
            cmd += ["--seconds", str(args.seconds)] + (["--profile"] if m == 30 else [])
            cmd += ["--compile"] if flag else []
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(m, "compiled" if flag else "eager", f"{out[-1]['member_steps_per_s']:.0f} member-steps/s", flush=True)
    hanq_sb3 = sum(r["HANQ (SB3 class)"] for r in sb3) / len(sb3)
    dqn_sb3 = sum(r["DQN (SB3)"] for r in sb3) / len(sb3)
    peak = matmul_peak(args.threads)
    flops = flops_per_member_step()
    command = f"python benchmarks/speed_population.py --members {' '.join(map(str, args.members))} "
    command += f"--threads {args.threads} --seconds {args.seconds:g}"
    load = os.getloadavg()
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}, CPU; "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end.  ",
        "HANQ (kappa = 0.1, RG), width 128, batch 128, DiscretePendulum-v1. Population: "
        f"{args.threads} torch threads. SB3 classes: one agent, 1 thread, measured between the population runs "
        f"(mean of {len(sb3)} measurements): HANQ {hanq_sb3:.0f} steps/s, SB3 DQN {dqn_sb3:.0f} steps/s; one agent "
        f"per core on {os.cpu_count()} cores gives {hanq_sb3 * (os.cpu_count() or 1):.0f} HANQ member-steps/s.",
        "",
        "Eager: `PopulationTrainer(...)`; compiled: `PopulationTrainer(..., compile=True)` (`--compile`), "
        "measured right after the eager run of the same M; its first 10 steps include the compilation.",
        "",
        "| M | eager: ms / step | eager: member-steps / s | compiled: ms / step | compiled: member-steps / s |"
        " compiled / eager | compiled: first 10 steps, s | compiled x SB3 HANQ (1 agent per core) |"
        " evaluation (M x 10 episodes), s | peak RSS eager / compiled, MiB | matmul GFLOP/s achieved (compiled) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, c in zip(rows, compiled):
        ratio = c["member_steps_per_s"] / (hanq_sb3 * (os.cpu_count() or 1))
        lines.append(
            f"| {r['members']} | {r['ms_per_step']:.2f} | {r['member_steps_per_s']:.0f} | {c['ms_per_step']:.2f} | "
            f"{c['member_steps_per_s']:.0f} | {c['member_steps_per_s'] / r['member_steps_per_s']:.2f}x | "
            f"{c['first_10_steps_s']:.1f} | {ratio:.2f}x | {r['eval_seconds']:.2f} | "
            f"{r['peak_rss_mib']:.0f} / {c['peak_rss_mib']:.0f} | {c['member_steps_per_s'] * flops / 1e9:.1f} |"
        )
    at_30 = next((c for c in compiled if c["members"] == 30), None)
    if at_30 is not None:
        minutes = (200_000 * at_30["ms_per_step"] / 1000 + 100 * at_30["eval_seconds"] + at_30["first_10_steps_s"]) / 60
        lines += [
            "",
            f"The paper's protocol for one configuration (30 members x 200k steps, 100 evaluations) at these rates, "
            f"compiled: about {minutes:.0f} minutes (issue #13's goal: 10).",
        ]
    lines += [
        "",
        f"Matmul FLOPs per HANQ member-step: {flops / 1e6:.2f} M; this machine's measured float32 matmul rate "
        f"(2048 x 2048, {args.threads} threads): {peak / 1e9:.0f} GFLOP/s.",
    ]
    for label, table in (("eager", rows), ("compiled", compiled)):
        profiled = next((r for r in table if "profile" in r), None)
        if profiled:
            lines += ["", f"Where the time goes at M = 30, {label} (torch.profiler, self CPU time per gradient step):"]
            lines += ["", "| op | ms / step | share |", "|---|---|---|"]
            for p in profiled["profile"]:
                lines.append(f"| {p['op'][:60]} | {p['ms_per_step']:.2f} | {100 * p['share']:.0f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed_population.md").write_text(text)
    payload = dict(
        command=command, rows=rows, compiled=compiled, sb3=sb3, matmul_flops=peak, flops_per_member_step=flops
    )
    (RESULTS / "speed_population.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
