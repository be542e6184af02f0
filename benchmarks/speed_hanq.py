"""Gradient-step time of HANQ / SSAQ against SB3's DQN with the same network and batch, in one run.

    python benchmarks/speed_hanq.py [--steps 5000] [--threads 1] [--repeats 3] [--device cpu]

Each algorithm trains on the same fixed 1000-transition DiscretePendulum dataset (network [128],
batch 128, as in the paper's §11); we time ``model.train(gradient_steps=steps)`` and report the best of
``--repeats`` runs, interleaved so that machine load affects all algorithms alike. Writes a Markdown
table to ``benchmarks/results/speed_hanq.md`` (``speed_hanq_<device>.md`` for ``--device`` other than cpu).
On a GPU the clock stops after ``torch.cuda.synchronize()``, so queued kernels count.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch as th
from bench_common import device_name, synchronize, torch_device
from stable_baselines3 import DQN
from stable_baselines3.common.logger import Logger

import sb3_hanq  # noqa: F401  (registers DiscretePendulum-v1)
from sb3_hanq import HANQ, SSAQ
from sb3_hanq.offline import collect_dataset, dataset_to_replay_buffer

CONFIGS = {
    "DQN (SB3, baseline)": (DQN, dict(policy_kwargs=dict(net_arch=[128]))),
    "HANQ (kappa=0.1, RG hypergradient)": (HANQ, dict()),
    "HANQ (kappa=0.1, SG hypergradient)": (HANQ, dict(hyper_objective="sg")),
    "HANQ (kappa=0)": (HANQ, dict(hyper_lr=0.0)),
    "SSAQ": (SSAQ, dict()),
}


def build(cls, kwargs, dataset, device="cpu"):
    model = cls("MlpPolicy", "DiscretePendulum-v1", batch_size=128, seed=0, device=device, **kwargs)
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.replay_buffer = dataset_to_replay_buffer(dataset, model.observation_space, model.action_space, model.device)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help='torch device of every model, e.g. "cuda"')
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/speed_hanq[_<device>].md")
    args = parser.parse_args()
    device = torch_device(args.device)
    on_cpu = device.type == "cpu"  # the CPU run keeps its command line and its file
    if args.out is None:
        args.out = Path(__file__).parent / "results" / f"speed_hanq{'' if on_cpu else '_' + device.type}.md"
    th.set_num_threads(args.threads)
    dataset = collect_dataset("DiscretePendulum-v1", 1000, seed=0)
    models = {name: build(cls, kw, dataset, device) for name, (cls, kw) in CONFIGS.items()}
    for model in models.values():  # warm-up
        model.train(gradient_steps=200, batch_size=128)
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            synchronize(device)
            start = time.perf_counter()
            model.train(gradient_steps=args.steps, batch_size=128)
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    base = best["DQN (SB3, baseline)"]
    lines = [
        f"Command: `python benchmarks/speed_hanq.py --steps {args.steps} --threads {args.threads} "
        f"--repeats {args.repeats}{'' if on_cpu else ' --device ' + args.device}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {th.__version__}, {args.threads} thread(s), "
        f"{device_name(device)}; network [128], batch 128, DiscretePendulum-v1 (3 actions).",
        "",
        "| algorithm | gradient steps / s | time per step (ms) | ratio to DQN |",
        "|---|---|---|---|",
    ]
    for name, seconds in best.items():
        lines.append(
            f"| {name} | {args.steps / seconds:.0f} | {1000 * seconds / args.steps:.3f} | {seconds / base:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
