"""Cost of per-member minibatch streams: one population trained with ``minibatch_stream="member"`` and one with
``"population"``, interleaved in one process (same members, compiled), ms per gradient step.

    python benchmarks/speed_minibatch_stream.py [--members 20] [--steps 1000] [--repeats 5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch as th

from sb3_hanq.population import MINIBATCH_STREAMS, PopulationTrainer, make_members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/speed_minibatch_stream.md")
    args = parser.parse_args()
    th.set_num_threads(1)
    members = make_members("hanq", list(range(args.members)), learning_rate=[10**-2.5])
    trainers = {
        stream: PopulationTrainer("DiscretePendulum-v1", members, device="cpu", compile=True, minibatch_stream=stream)
        for stream in MINIBATCH_STREAMS
    }
    for trainer in trainers.values():
        trainer.train_steps(300)  # compile, warm up, cross a block boundary
    times: dict[str, list[float]] = {stream: [] for stream in trainers}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for stream, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_steps(args.steps)
            times[stream].append((time.perf_counter() - start) / args.steps * 1e3)
    load_after = os.getloadavg()
    ratios = [m / p for m, p in zip(times["member"], times["population"])]
    lines = [
        "# Per-member minibatch streams: step time against one stream per population",
        "",
        f"Command: `python benchmarks/speed_minibatch_stream.py --members {args.members} --steps {args.steps} "
        f"--repeats {args.repeats}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {th.__version__}, 1 thread, CPU; load average "
        f"(1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}.  ",
        f"HANQ on DiscretePendulum-v1, {args.members} members (one group), batch 128, `compile=True`; the two "
        f"trainers alternate, {args.steps} steps per repeat.",
        "",
        "| minibatch_stream | ms / step (median) | per repeat (ms) |",
        "|---|---|---|",
        *(f"| {stream} | {np.median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |" for stream, v in times.items()),
        "",
        f"Ratio member / population per repeat: {', '.join(f'{r:.3f}' for r in ratios)}; median "
        f"{np.median(ratios):.3f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
