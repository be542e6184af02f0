"""Speed of the population trainer against M, beside the SB3 classes' gradient steps/s, in one run.

    python benchmarks/speed_population.py [--members 1 10 30 100 300 1000] [--threads 2] [--seconds 4] [--device cpu]

For each M, eager and with ``compile=True``: HANQ (kappa = 0.1, RG hyperobjective, width 128, batch 128,
DiscretePendulum-v1's 1000-transition datasets) trained by :class:`sb3_hanq.population.PopulationTrainer` in a
fresh subprocess (so that its peak memory, ``ru_maxrss``, is its own), timed over about ``--seconds`` after 10
warm-up steps. Interleaved with those, in this process: SB3's ``HANQ.train`` and ``DQN.train`` on one agent with
one thread (the way one runs one agent per core). Also: torch.profiler breakdowns at M = 30, the FLOPs per
member-step and the machine's measured matmul FLOP rate. Writes ``benchmarks/results/speed_population.{md,json}``.

``--device cuda`` runs all of it on a GPU (``speed_population_cuda.{md,json}``): the population and the SB3
classes on the GPU, the clocks read after ``torch.cuda.synchronize()``, the profiles in GPU time, peak GPU memory
in the table's memory column (peak RSS stays in the JSON), and the float32 matmul rate measured on the GPU
(4096 x 4096, PyTorch's default precision: no TF32).
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


def population_rate(
    members: int, threads: int, seconds: float, profile: bool = False, compile: bool = False, device: str = "cpu"
) -> dict:
    import torch as th
    from bench_common import synchronize

    th.set_num_threads(threads)
    from sb3_hanq.population import PopulationTrainer, make_members

    trainer = PopulationTrainer(
        "DiscretePendulum-v1", make_members("hanq", range(members)), device=device, compile=compile
    )
    synchronize(device)
    start = time.perf_counter()
    trainer.train_steps(10)
    synchronize(device)
    first_steps = time.perf_counter() - start  # with compile=True: the compilation
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 5:
        trainer.train_steps(5)
        steps += 5
        synchronize(device)  # (each 5 steps: the loop's clock sees the GPU's work, not how much is queued)
    elapsed = time.perf_counter() - start
    start_eval = time.perf_counter()
    trainer.record()
    synchronize(device)
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
    on_gpu = th.device(device).type == "cuda"
    if on_gpu:
        out["peak_device_mib"] = th.cuda.max_memory_allocated(device) / 2**20
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            trainer.train_steps(20)
            synchronize(device)
        events = prof.key_averages()
        # on a GPU, the kernels' own time (the CPU's is mostly launching them), where the profiler could trace them
        gpu_traced = on_gpu and any(e.self_device_time_total > 0 for e in events)
        self_time = (lambda e: e.self_device_time_total) if gpu_traced else (lambda e: e.self_cpu_time_total)
        rows = sorted(events, key=lambda e: -self_time(e))[:12]
        total = sum(self_time(e) for e in events)
        out["profile_time"] = "GPU" if gpu_traced else "CPU"
        out["profile"] = [
            dict(op=e.key, ms_per_step=self_time(e) / 20 / 1000, share=self_time(e) / total) for e in rows
        ]
    return out


def sb3_rates(seconds: float, device: str = "cpu") -> dict[str, float]:
    import torch as th
    from bench_common import synchronize
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
        model = cls("MlpPolicy", "DiscretePendulum-v1", batch_size=128, seed=0, device=device, **kwargs)
        model.set_logger(Logger(folder=None, output_formats=[]))
        model.replay_buffer = dataset_to_replay_buffer(dataset, model.observation_space, model.action_space, device)
        model.train(gradient_steps=50)
        synchronize(device)
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.train(gradient_steps=100)
            steps += 100
            synchronize(device)
        rates[name] = steps / (time.perf_counter() - start)
    return rates


def flops_per_member_step(batch: int = 128, width: int = 128, n_obs: int = 3, n_actions: int = 3) -> float:
    """Matmul FLOPs of one HANQ member-step: forward of s (torso, Q head, metapredictor head), its backward
    (2x), forward of s' (torso, Q head) and the RG backward through it (2x)."""
    s_path = 2 * batch * (n_obs * width + width * n_actions + width * 2 * n_actions)
    next_path = 2 * batch * (n_obs * width + width * n_actions)
    return 3 * s_path + 3 * next_path


def matmul_size(device: str) -> int:
    """The side of the square float32 matmul that measures the device's rate (a GPU needs larger products)."""
    return 2048 if device == "cpu" else 4096


def matmul_peak(threads: int, device: str = "cpu") -> float:
    import torch as th
    from bench_common import synchronize

    th.set_num_threads(threads)
    size = matmul_size(device)
    a, b = th.randn(size, size, device=device), th.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    synchronize(device)
    return 2 * size**3 * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 10, 30, 100, 300, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--device", default="cpu", help='torch device of the population and the SB3 classes, e.g. "cuda"'
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one M, print JSON
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench_common import device_name, torch_device

    torch_dev = torch_device(args.device)
    device = str(torch_dev)
    on_cpu = torch_dev.type == "cpu"  # the CPU run keeps its command line, its files and its table
    if args.one is not None:
        print(json.dumps(population_rate(args.one, args.threads, args.seconds, args.profile, args.compile, device)))
        return

    rows, compiled, sb3 = [], [], []
    for m in args.members:
        sb3.append(sb3_rates(args.seconds / 2, device))  # interleaved with the population runs
        for flag, out in ((False, rows), (True, compiled)):  # eager and compiled, one after the other
            cmd = [sys.executable, __file__, "--one", str(m), "--threads", str(args.threads)]
            cmd += ["--seconds", str(args.seconds), "--device", device] + (["--profile"] if m == 30 else [])
            cmd += ["--compile"] if flag else []
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:  # show why (a GPU run may be the only one there is time for)
                sys.stderr.write(result.stderr)
                result.check_returncode()
            out.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(m, "compiled" if flag else "eager", f"{out[-1]['member_steps_per_s']:.0f} member-steps/s", flush=True)
    hanq_sb3 = sum(r["HANQ (SB3 class)"] for r in sb3) / len(sb3)
    dqn_sb3 = sum(r["DQN (SB3)"] for r in sb3) / len(sb3)
    peak = matmul_peak(args.threads, device)
    flops = flops_per_member_step()
    command = f"python benchmarks/speed_population.py --members {' '.join(map(str, args.members))} "
    command += f"--threads {args.threads} --seconds {args.seconds:g}" + ("" if on_cpu else f" --device {device}")
    load = os.getloadavg()
    # The SB3 baseline: on the CPU one agent per core, on a GPU one agent on it.
    agents = (os.cpu_count() or 1) if on_cpu else 1
    if on_cpu:
        baseline = (
            f"SB3 classes: one agent, 1 thread, measured between the population runs (mean of {len(sb3)} "
            f"measurements): HANQ {hanq_sb3:.0f} steps/s, SB3 DQN {dqn_sb3:.0f} steps/s; one agent per core on "
            f"{os.cpu_count()} cores gives {hanq_sb3 * agents:.0f} HANQ member-steps/s."
        )
    else:
        baseline = (
            f"SB3 classes: one agent on the same device, measured between the population runs (mean of {len(sb3)} "
            f"measurements): HANQ {hanq_sb3:.0f} steps/s, SB3 DQN {dqn_sb3:.0f} steps/s."
        )
    baseline_column = "1 agent per core" if on_cpu else "1 agent"
    memory_column = "RSS" if on_cpu else "GPU memory"
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}, "
        f"{device_name(device)}; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end.  ",
        "HANQ (kappa = 0.1, RG), width 128, batch 128, DiscretePendulum-v1. Population: "
        f"{args.threads} torch threads. {baseline}",
        "",
        "Eager: `PopulationTrainer(...)`; compiled: `PopulationTrainer(..., compile=True)` (`--compile`), "
        "measured right after the eager run of the same M; its first 10 steps include the compilation.",
        "",
        "| M | eager: ms / step | eager: member-steps / s | compiled: ms / step | compiled: member-steps / s |"
        f" compiled / eager | compiled: first 10 steps, s | compiled x SB3 HANQ ({baseline_column}) |"
        f" evaluation (M x 10 episodes), s | peak {memory_column} eager / compiled, MiB |"
        " matmul GFLOP/s achieved (compiled) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    memory = "peak_rss_mib" if on_cpu else "peak_device_mib"
    for r, c in zip(rows, compiled):
        ratio = c["member_steps_per_s"] / (hanq_sb3 * agents)
        lines.append(
            f"| {r['members']} | {r['ms_per_step']:.2f} | {r['member_steps_per_s']:.0f} | {c['ms_per_step']:.2f} | "
            f"{c['member_steps_per_s']:.0f} | {c['member_steps_per_s'] / r['member_steps_per_s']:.2f}x | "
            f"{c['first_10_steps_s']:.1f} | {ratio:.2f}x | {r['eval_seconds']:.2f} | "
            f"{r[memory]:.0f} / {c[memory]:.0f} | {c['member_steps_per_s'] * flops / 1e9:.1f} |"
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
        f"({matmul_size(device)} x {matmul_size(device)}, {f'{args.threads} threads' if on_cpu else device}): "
        f"{peak / 1e9:.0f} GFLOP/s.",
    ]
    for label, table in (("eager", rows), ("compiled", compiled)):
        profiled = next((r for r in table if "profile" in r), None)
        if profiled:
            lines += [
                "",
                f"Where the time goes at M = 30, {label} (torch.profiler, self {profiled.get('profile_time', 'CPU')} "
                "time per gradient step):",
            ]
            lines += ["", "| op | ms / step | share |", "|---|---|---|"]
            for p in profiled["profile"]:
                lines.append(f"| {p['op'][:60]} | {p['ms_per_step']:.2f} | {100 * p['share']:.0f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = "speed_population" if on_cpu else f"speed_population_{torch_dev.type}"  # e.g. _cuda
    (RESULTS / f"{stem}.md").write_text(text)
    payload = dict(
        command=command, rows=rows, compiled=compiled, sb3=sb3, matmul_flops=peak, flops_per_member_step=flops
    )
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
