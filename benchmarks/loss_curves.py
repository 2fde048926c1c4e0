"""Training losses of runs side by side, from their TensorBoard logs: the mean of each logged loss over
windows of steps, so that one can see whether a seed that ends badly lagged from the start.

    python benchmarks/loss_curves.py runs/default-s0 runs/default-s1 [--tags goal total] [--window 250]

Prints a markdown table: per run and loss (those it was trained with), the mean of the logged values (one every `--log-every`
steps of training, a single batch each) in each window of `--window` steps.
"""

import argparse
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="training run folders (each with tb/)")
parser.add_argument("--tags", nargs="+", default=["goal", "total"], help="losses, as logged under train/")
parser.add_argument("--window", type=int, default=250, help="steps per window")
args = parser.parse_args()

rows = []
for run in args.runs:
    if not (run / "tb").is_dir():
        raise SystemExit(f"{run}: no tb/ (is it a `fusion-attn train` run folder?)")
    logs = EventAccumulator(str(run / "tb"))
    logs.Reload()
    for tag in args.tags:
        if f"train/{tag}" not in logs.Tags()["scalars"]:
            continue  # a loss this run was trained without
        events = logs.Scalars(f"train/{tag}")
        steps, values = np.array([e.step for e in events]), np.array([e.value for e in events])
        edges = range(0, int(steps.max()), args.window)
        rows.append((run.name, tag, {f"{a + 1}-{a + args.window}": values[(steps > a) & (steps <= a + args.window)].mean()
                                     for a in edges}))

if missing := set(args.tags) - {tag for _, tag, _ in rows}:
    raise SystemExit(f"no run logged train/{', train/'.join(sorted(missing))}")
windows = max((list(means) for _, _, means in rows), key=len)
print("| run | loss | " + " | ".join(f"steps {w}" for w in windows) + " |")
print("|---|---|" + "---|" * len(windows))
for name, tag, means in rows:
    print(f"| {name} | {tag} | " + " | ".join(f"{means[w]:.3f}" if w in means else "" for w in windows) + " |")
