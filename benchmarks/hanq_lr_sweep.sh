#!/usr/bin/env bash
# Learning-rate sweep for HANQ on offline DiscretePendulum (the paper tunes alpha_0 over 10^-1 ... 10^-4, §11).
#   bash benchmarks/hanq_lr_sweep.sh          (2 seeds x 20k gradient steps per learning rate)
# Writes benchmarks/results/lr_sweep/hanq_lr_<lr>.{md,json,png} and the summary lr_sweep/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for lr in 0.1 0.031623 0.01 0.00031623 0.0001; do  # 10^-2.5 is in hanq_pendulum.md
  [ -f "benchmarks/results/lr_sweep/hanq_lr_$lr.json" ] && continue
  $PY benchmarks/hanq_pendulum.py --seeds 2 --gradient-steps 20000 --workers 2 --learning-rate "$lr" \
    --tag "lr_sweep/hanq_lr_$lr" --configs "HANQ (kappa=0.1, default)" "HANQ kappa=0"
done
$PY - <<'PYEOF'
import json, pathlib
import numpy as np
rows = {}
for path in sorted(pathlib.Path("benchmarks/results/lr_sweep").glob("hanq_lr_*.json")):
    lr = float(path.stem.split("_")[-1])
    for run in json.loads(path.read_text())["runs"]:
        rows.setdefault(run["name"], {}).setdefault(lr, []).append(run["average_score"])
lrs = sorted({lr for r in rows.values() for lr in r}, reverse=True)
lines = ["Command: `bash benchmarks/hanq_lr_sweep.sh`  ",
         "Mean over seeds of the run-averaged normalised score (2 seeds, 20k gradient steps, DiscretePendulum). "
         "lr 10^-2.5 (the default) is in `benchmarks/results/hanq_pendulum.md` (3 seeds).", "",
         "| configuration | " + " | ".join(f"lr {lr:.2g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
for name, by_lr in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{np.mean(by_lr[lr]):.1f}" if lr in by_lr else "-" for lr in lrs) + " |")
text = "\n".join(lines) + "\n"
pathlib.Path("benchmarks/results/lr_sweep/summary.md").write_text(text)
print(text)
PYEOF
