"""Gradient-step time of CrossQ + WN (sb3_hanq.CrossQWN) against sb3-contrib's CrossQ, same widths, in one run.

    python benchmarks/speed_crossq_wn.py [--env HalfCheetah-v5] [--steps 200] [--repeats 5] [--threads 1]

All models use CrossQWN's default widths (critic [512, 512], actor [256, 256], Appendix C), batch 256,
policy delay 3, two critics, and train on the same fixed replay buffer of ``--buffer`` transitions collected
with uniformly random actions (one buffer object, shared). Each repeat times
``model.train(gradient_steps=--steps, batch_size=256)`` (UTD is irrelevant here: one call = ``--steps``
updates) for every model in turn, so that load from other processes affects all alike; the headline is the
median over repeats of the per-repeat ratio to CrossQ. Models:

* CrossQ (sb3-contrib 2.x, its defaults except the widths: Adam, no target network);
* CrossQWN (defaults: row weight normalisation of actor and critic, AdamW, target critic with tau=0.005);
* CrossQWN with tau=1.0 (no target critic: CrossQ's joint pass only, plus the projection and AdamW).

Then, outside the timed repeats, a micro-benchmark of the pieces CrossQWN adds per gradient step, on the
CrossQWN model: the critic projection, the actor projection (every ``policy_delay`` steps), the Polyak update
of the target, and the target critic's no-grad joint forward pass over ``[s; s']`` (2 x 256 rows).

Writes ``benchmarks/results/speed_crossq_wn.json`` (raw numbers) and ``speed_crossq_wn.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch as th
from bench_common import add_speed_arguments, random_transitions
from sb3_contrib import CrossQ
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import polyak_update

from sb3_hanq import CrossQWN

RESULTS = Path(__file__).parent / "results"
NET_ARCH = {"pi": [256, 256], "qf": [512, 512]}  # CrossQWNPolicy's default (Appendix C)
BATCH = 256
BASE = "CrossQ (sb3-contrib)"
WN = "CrossQWN (default, tau=0.005)"
WN_NOTARGET = "CrossQWN (tau=1.0, no target)"
CONFIGS = {
    BASE: (CrossQ, dict(policy_kwargs=dict(net_arch=NET_ARCH))),
    WN: (CrossQWN, dict()),
    WN_NOTARGET: (CrossQWN, dict(tau=1.0)),
}


def build(cls, kwargs: dict, env_id: str, buffer: ReplayBuffer, seed: int):
    model = cls("MlpPolicy", env_id, batch_size=BATCH, policy_delay=3, seed=seed, device="cpu", **kwargs)
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.replay_buffer = buffer
    return model


def time_call(fn, n: int) -> float:
    """Median over 5 blocks of the mean time (ms) of ``fn()`` over ``n`` calls."""
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        blocks.append(1000 * (time.perf_counter() - start) / n)
    return statistics.median(blocks)


def breakdown(model: CrossQWN, buffer: ReplayBuffer, n: int) -> dict[str, float]:
    data = buffer.sample(BATCH)
    all_obs = th.cat([data.observations, data.next_observations], dim=0)
    all_actions = th.cat([data.actions, data.actions], dim=0)
    policy = model.policy
    critic, target = model.critic, model.critic_target

    def target_forward():
        with th.no_grad():
            target.set_bn_training_mode(True)
            th.cat(target(all_obs, all_actions), dim=1)
            target.set_bn_training_mode(False)

    def critic_forward_backward():
        critic.set_bn_training_mode(True)
        q = th.cat(critic(all_obs, all_actions), dim=1)
        critic.set_bn_training_mode(False)
        q.sum().backward()
        critic.optimizer.zero_grad()

    state = {k: v.clone() for k, v in policy.state_dict().items()}
    out = {
        "critic projection": time_call(policy.project_critic_weights, n),
        "actor projection (per call; runs every policy_delay steps)": time_call(policy.project_actor_weights, n),
        "Polyak update of the target critic": time_call(
            lambda: polyak_update(critic.parameters(), target.parameters(), model.tau), n
        ),
        "target critic joint forward (no grad, BN training mode)": time_call(target_forward, n),
        "reference: critic joint forward + backward": time_call(critic_forward_backward, n),
    }
    policy.load_state_dict(state)  # undo the BN running-statistics updates and Polyak steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(parser)
    parser.add_argument("--breakdown-calls", type=int, default=50)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing .json")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((RESULTS / "speed_crossq_wn.json").read_text()))
        return
    th.set_num_threads(args.threads)
    command = (
        f"python benchmarks/speed_crossq_wn.py --env {args.env} --steps {args.steps} --repeats {args.repeats} "
        f"--buffer {args.buffer} --threads {args.threads}"
    )
    load_before = os.getloadavg()
    buffer = random_transitions(args.env, args.buffer, args.seed)
    models = {name: build(cls, kw, args.env, buffer, args.seed) for name, (cls, kw) in CONFIGS.items()}
    for model in models.values():  # warm-up
        model.train(gradient_steps=30, batch_size=BATCH)
    ms: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.train(gradient_steps=args.steps, batch_size=BATCH)
            ms[name].append(1000 * (time.perf_counter() - start) / args.steps)
        print(f"repeat {rep}: " + ", ".join(f"{n}: {v[-1]:.2f} ms" for n, v in ms.items()), flush=True)
    ratios = {name: [a / b for a, b in zip(ms[name], ms[BASE], strict=True)] for name in models}
    parts = breakdown(models[WN], buffer, args.breakdown_calls)
    load_after = os.getloadavg()
    raw = dict(
        command=command,
        machine=dict(
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            torch=th.__version__,
            threads=args.threads,
            loadavg_before=load_before,
            loadavg_after=load_after,
        ),
        net_arch=NET_ARCH,
        batch_size=BATCH,
        policy_delay=3,
        ms_per_step=ms,
        ratio_to_crossq=ratios,
        median_ms_per_step={n: statistics.median(v) for n, v in ms.items()},
        median_ratio={n: statistics.median(v) for n, v in ratios.items()},
        breakdown_ms=parts,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed_crossq_wn.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_report(raw)


def write_report(raw: dict) -> None:
    ms, ratios, parts, med = raw["ms_per_step"], raw["ratio_to_crossq"], raw["breakdown_ms"], raw["median_ms_per_step"]
    machine = raw["machine"]
    load_before, load_after = machine["loadavg_before"], machine["loadavg_after"]
    lines = [
        "# CrossQ + WN: gradient-step time against CrossQ",
        "",
        f"Command: `{raw['command']}`  ",
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores (shared with other jobs), torch "
        f"{machine['torch']}, {machine['threads']} thread(s), CPU; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}.  ",
        f"Setup: fixed buffer of uniformly random transitions (shared), critic [512, 512] x 2 critics, actor "
        f"[256, 256] (CrossQWN's defaults, passed to CrossQ too), batch {raw['batch_size']} (joint pass of "
        f"{2 * raw['batch_size']} rows), policy delay 3, BatchRenorm momentum 0.01; each repeat times one "
        "`train(gradient_steps=...)` call for every model in turn. UTD does not enter: one call = that many "
        "updates.",
        "",
        "| model | ms / step (median) | per repeat (ms) | ratio to CrossQ, per repeat | ratio (median) |",
        "|---|---|---|---|---|",
    ]
    for name in ms:
        lines.append(
            f"| {name} | {med[name]:.2f} | {', '.join(f'{x:.2f}' for x in ms[name])} | "
            f"{', '.join(f'{x:.2f}' for x in ratios[name])} | {raw['median_ratio'][name]:.2f}x |"
        )
    extra_wn = med[WN] - med[BASE]
    extra_nt = med[WN_NOTARGET] - med[BASE]
    target_fwd = parts["target critic joint forward (no grad, BN training mode)"]
    projection = parts["critic projection"] + parts["actor projection (per call; runs every policy_delay steps)"] / 3
    polyak = parts["Polyak update of the target critic"]
    lines += [
        "",
        f"Goal: CrossQWN <= 1.1x CrossQ. Extra time per step (medians): default {extra_wn:+.2f} ms "
        f"({raw['median_ratio'][WN]:.2f}x), tau=1.0 {extra_nt:+.2f} ms ({raw['median_ratio'][WN_NOTARGET]:.2f}x).",
        "",
        "## Where the extra time goes (CrossQWN default, micro-benchmark, median of 5 blocks)",
        "",
        "| piece | ms per call |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in parts.items()]
    lines += [
        "",
        f"Per gradient step: projection (critic every step + actor every 3rd) {projection:.2f} ms, Polyak update "
        f"{polyak:.2f} ms, target joint forward {target_fwd:.2f} ms; sum {projection + polyak + target_fwd:.2f} ms "
        f"against a measured difference of {extra_wn:.2f} ms (the rest: AdamW with two parameter groups "
        "instead of Adam, timing noise).",
        "",
        "Reading:",
        "",
        f"- Weight normalisation itself is cheap: without the target network (tau=1.0) CrossQWN costs "
        f"{raw['median_ratio'][WN_NOTARGET]:.2f}x CrossQ, within the 1.1x goal. The projection is a row-norm and "
        "an in-place division per hidden layer, well under 1 ms.",
        f"- The default (tau=0.005) misses the goal, {raw['median_ratio'][WN]:.2f}x, and almost all of the "
        f"excess is the target critic's joint forward pass ({target_fwd:.1f} ms of {extra_wn:.1f} ms): a full "
        "no-grad forward of both critics over the 2 x 256-row batch, about 40% of the cost of the critic's own "
        'forward + backward. This is a cost the paper re-adds by design (§4 "Target networks"): to keep '
        "CrossQ's batch-statistics matching, the target must see the same joint [s; s'] batch in training mode, "
        "so it cannot be restricted to the s' half, and since BatchRenorm statistics of layer 2 depend on layer "
        "1's outputs for all rows, nothing can be cached. It is not an implementation overhead; it could only "
        "be avoided by dropping the target (tau=1.0, which the paper's §5.4 ablation finds costs performance on "
        "DMC). The Polyak update is small.",
        "- Implementation check: no avoidable overhead found; `project_*_weights` and `polyak_update` are "
        "negligible, the extra time is the extra network evaluation.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "speed_crossq_wn.md").write_text(text)


if __name__ == "__main__":
    main()
