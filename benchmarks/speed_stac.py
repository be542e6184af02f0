"""Wall time of STAC / STACX against SB3's A2C on CartPole-v1 with 8 environments, in one run.

    python benchmarks/speed_stac.py [--timesteps 16000] [--repeats 7] [--threads 1] [--tag speed_stac]

All algorithms use the same rollout (8 environments, ``n_steps=20``) and the same network: an MLP torso
(256, 256) shared by a policy head and a value head of 256 hidden units each (STAC paper Table 2, control from
features; A2C gets it through a shared features extractor and ``net_arch=dict(pi=[256], vf=[256])``). Each
repeat times ``model.learn(--timesteps)`` (rollouts and updates, continuing the same run) for every algorithm
in turn, so that load from other processes on the machine affects all alike; the reported ratio is the median
over repeats of the per-repeat ratio to A2C. The time spent inside ``train()`` is recorded separately, and
a torch.profiler pass over ``--profile-updates`` updates per algorithm estimates how much of an update is
matrix multiplication (the part that the metagradient's extra passes make unavoidable), and the process's
minor page faults and kernel time are recorded per algorithm.

``--malloc-no-trim`` (glibc only) calls ``mallopt`` before anything is built so that freed memory stays in the
heap (``M_MMAP_THRESHOLD`` 16 MiB, ``M_TRIM_THRESHOLD`` 256 MiB; the same as the environment variables
``MALLOC_MMAP_THRESHOLD_=16777216 MALLOC_TRIM_THRESHOLD_=268435456``). With glibc's defaults a STAC update can
hand several MB of temporaries back to the kernel and fault them in again at the next update; whether it does
depends on the heap's layout, which makes STAC's time vary from one process to the next.

Writes the raw numbers to ``benchmarks/results/<tag>.json`` first, then the table to ``<tag>.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stac_models import make_model

RESULTS = Path(__file__).parent / "results"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}

# name -> (class name, constructor kwargs)
CONFIGS: dict[str, tuple[str, dict]] = {
    "A2C (SB3, baseline)": ("A2C", dict()),
    "STAC (all self-tuned)": ("STAC", dict()),
    "STAC (nothing self-tuned: A2C with V-trace)": ("STAC", dict(self_tune=())),
    "STACX (3 heads, all self-tuned)": ("STAC", dict(n_heads=3)),
}


def build(name: str, seed: int):
    from stable_baselines3.common.logger import Logger

    algo, kwargs = CONFIGS[name]
    model = make_model(algo, kwargs, "CartPole-v1", seed)
    model.set_logger(Logger(folder=None, output_formats=[]))
    train_seconds = [0.0]
    train = model.train

    def timed_train() -> None:
        start = time.perf_counter()
        train()
        train_seconds[0] += time.perf_counter() - start

    model.train = timed_train  # type: ignore[method-assign]
    return model, train_seconds


def matmul_share(model, updates: int) -> float:
    """Fraction of the profiled operator time of ``updates`` calls to ``train()`` (on the last rollout) spent in
    matrix multiplications."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(updates):
            model.train()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return matmul / total if total > 0 else float("nan")


def malloc_no_trim() -> None:
    """Keep freed memory in glibc's heap: no mmap for blocks under 16 MiB, no trimming below 256 MiB."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (libc.mallopt(m_mmap_threshold, 16 * 2**20) and libc.mallopt(m_trim_threshold, 256 * 2**20)):
        raise RuntimeError("mallopt failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=16_000, help="environment steps per algorithm and repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1_600, help="environment steps before timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile-updates", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc-no-trim", action="store_true", help="glibc: keep freed memory in the heap")
    parser.add_argument(
        "--extra-processes", type=int, default=0, help="repeat the measurement in this many fresh processes"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="free text recorded in the results (e.g. the code version)")
    parser.add_argument("--tag", default="speed_stac")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.malloc_no_trim:
        malloc_no_trim()
    import torch as th

    th.set_num_threads(args.threads)
    models = {name: build(name, args.seed) for name in CONFIGS}
    for model, _ in models.values():
        model.learn(args.warmup, reset_num_timesteps=False)
    load_before = os.getloadavg()
    repeats: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, (model, train_seconds) in models.items():
            train_seconds[0] = 0.0
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            model.learn(args.timesteps, reset_num_timesteps=False)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            repeats[name].append(
                dict(
                    wall=wall,
                    train=train_seconds[0],
                    minor_faults=after.ru_minflt - usage.ru_minflt,
                    kernel=after.ru_stime - usage.ru_stime,
                )
            )
    load_after = os.getloadavg()
    shares = {
        name: matmul_share(model, args.profile_updates) if args.profile_updates > 0 else float("nan")
        for name, (model, _) in models.items()
    }

    updates = args.timesteps // (8 * 20)
    base = "A2C (SB3, baseline)"
    summary = {}
    for name, runs in repeats.items():
        ratios = [r["wall"] / b["wall"] for r, b in zip(runs, repeats[base])]
        summary[name] = dict(
            median_wall=statistics.median(r["wall"] for r in runs),
            median_train_ms=1000 * statistics.median(r["train"] for r in runs) / updates,
            median_ratio=statistics.median(ratios),
            ratios=ratios,
            faults_per_update=statistics.median(r["minor_faults"] for r in runs) / updates,
            kernel_share=statistics.median(r["kernel"] / r["wall"] for r in runs),
            matmul_share=shares[name],
        )
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    command = (
        f"python benchmarks/speed_stac.py --timesteps {args.timesteps} --repeats {args.repeats} --warmup {args.warmup} "
        f"--threads {args.threads} --profile-updates {args.profile_updates} --seed {args.seed} --tag {args.tag}"
        + (" --malloc-no-trim" if args.malloc_no_trim else "")
        + (f" --extra-processes {args.extra_processes}" if args.extra_processes else "")
    )
    machine = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        torch=th.__version__,
        threads=args.threads,
        python=platform.python_version(),
        loadavg_before=load_before,
        loadavg_after=load_after,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw = dict(command=command, note=args.note, machine=machine, repeats=repeats, summary=summary, updates=updates)
    (args.out_dir / f"{args.tag}.json").write_text(json.dumps(raw, indent=1))
    if args.extra_processes:
        raw["extra_processes"] = extra_processes(args)
        (args.out_dir / f"{args.tag}.json").write_text(json.dumps(raw, indent=1))
    report(raw, args.tag, args.out_dir)


def extra_processes(args: argparse.Namespace) -> list[dict]:
    """The same measurement (without the profile) in fresh processes, one after the other: the heap's layout,
    and with it the page faults, differ from one process to the next."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.extra_processes):
            tag = f"process{i + 1}"
            cmd = [sys.executable, __file__, "--timesteps", str(args.timesteps), "--repeats", str(args.repeats)]
            cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed)]
            cmd += ["--profile-updates", "0", "--out-dir", tmp, "--tag", tag]
            cmd += ["--malloc-no-trim"] if args.malloc_no_trim else []
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            out.append(json.loads((Path(tmp) / f"{tag}.json").read_text())["summary"])
    return out


def report(raw: dict, tag: str, out_dir: Path = RESULTS) -> None:
    machine, summary = raw["machine"], raw["summary"]
    timesteps = round(raw["updates"] * 160)
    lines = [
        f"Command: `{raw['command']}`  ",
        f"Machine: {machine['cpu']} ({machine['cores']} cores, shared with other jobs; load average "
        f"{machine['loadavg_before'][0]:.2f} before, {machine['loadavg_after'][0]:.2f} after), CPU only, torch "
        f"{machine['torch']}, {machine['threads']} thread(s), Python {machine['python']}; glibc malloc "
        + ("with `--malloc-no-trim`" if raw["command"].endswith("--malloc-no-trim") else "defaults")
        + ".  ",
        f"CartPole-v1, 8 environments, n_steps 20 ({raw['updates']} updates per repeat of {timesteps} steps); "
        "network: MLP torso (256, 256) + policy and value heads with 256 hidden units, for every algorithm.",
    ]
    if raw.get("note"):
        lines.append(f"Code: {raw['note']}.")
    lines += [
        "",
        "| algorithm | env steps / s | ms per update in `train()` | matmul share of update (profiler) | "
        "page faults per update | kernel time share | wall-time ratio to A2C (median) | per-repeat ratios |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        per_repeat = ", ".join(f"{r:.2f}" for r in s["ratios"])
        lines.append(
            f"| {name} | {timesteps / s['median_wall']:.0f} | {s['median_train_ms']:.2f} | "
            f"{100 * s['matmul_share']:.0f}% | {s['faults_per_update']:.0f} | {100 * s['kernel_share']:.0f}% | "
            f"{s['median_ratio']:.2f}x | {per_repeat} |"
        )
    lines += ["", "Per-repeat wall time (s) of `learn()`, and inside it of `train()`:", ""]
    names = list(summary)
    lines.append("| repeat | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for i in range(len(raw["repeats"][names[0]])):
        cells = [f"{raw['repeats'][n][i]['wall']:.2f} ({raw['repeats'][n][i]['train']:.2f})" for n in names]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if raw.get("extra_processes"):
        names = [n for n in summary if n != "A2C (SB3, baseline)"]
        lines += [
            "",
            "The same measurement repeated in fresh processes (without the profile): median ratio to A2C, and in "
            "brackets the page faults per update.",
            "",
            "| process | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            "| this one | "
            + " | ".join(f"{summary[n]['median_ratio']:.2f}x ({summary[n]['faults_per_update']:.0f})" for n in names)
            + " |",
        ]
        for i, extra in enumerate(raw["extra_processes"]):
            cells = [f"{extra[n]['median_ratio']:.2f}x ({extra[n]['faults_per_update']:.0f})" for n in names]
            lines.append(f"| {i + 2} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out_dir / f"{tag}.md").write_text(text)


if __name__ == "__main__":
    main()
