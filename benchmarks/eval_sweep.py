"""eval-robustness's τ sweep of one run, both ways side by side in one process: one τ at a time
(`evaluate` per τ: every batch's faulted inputs and targets made again for each τ, as before
2026-12-05) and all τ per batch (`evaluate_taus`, what `sweep` runs), alternating round by round.
Checks that the two reports are equal and prints each way's median time and their ratio.

    MUJOCO_GL=egl python benchmarks/eval_sweep.py runs/imu2_rate-s0 [--rounds 2] [--episodes N] [--out benchmarks/results/eval_sweep.json]

The samples are the run's own validation episodes (rendered into the cache when training did not).
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fusion_attn.config import cache_dir
from fusion_attn.learn.data import build_datasets
from fusion_attn.learn.evaluation import evaluate, evaluate_taus
from fusion_attn.learn.loop import read_state
from fusion_attn.learn.robustness import load_run

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run", type=Path, help="a `fusion-attn train` run folder")
parser.add_argument("--tau", default="0.1,0.3,1,3,10", help="the sweep (eval-robustness's default)")
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--episodes", type=int, help="the run's first N validation episodes only (default: all)")
parser.add_argument("--out", type=Path)
args = parser.parse_args()

torch.set_num_threads(1)  # as each of eval-robustness's sweep jobs runs
taus = [float(t) for t in args.tau.split(",")]
run = load_run(args.run.name, args.run)
_, tc, cfg = read_state(args.run / "train_state.pt")
if args.episodes:
    tc = dataclasses.replace(tc, val_episodes=args.episodes)
_, val = build_datasets(tc, cfg, cache_dir("train"), progress=False)


def one_at_a_time() -> dict:
    return {tau: evaluate(run.model, run.heads, val, run.cfg, tc.fusion_hz, tau, lipschitz=True) for tau in taus}


def all_per_batch() -> dict:
    return evaluate_taus(run.model, run.heads, val, run.cfg, tc.fusion_hz, taus, lipschitz=True)


times, reports = {"one_at_a_time": [], "all_per_batch": []}, {}
for r in range(args.rounds):
    order = [one_at_a_time, all_per_batch] if r % 2 == 0 else [all_per_batch, one_at_a_time]
    for way in order:
        t0 = time.perf_counter()
        reports[way.__name__] = way()
        times[way.__name__].append(time.perf_counter() - t0)
if reports["one_at_a_time"] != reports["all_per_batch"]:
    raise SystemExit("the two ways gave different reports")
medians = {k: statistics.median(v) for k, v in times.items()}
result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
          "torch": torch.__version__, "run": str(args.run), "samples": len(val), "taus": taus, "rounds": args.rounds,
          "seconds": times, "median_s": medians, "speedup": medians["one_at_a_time"] / medians["all_per_batch"],
          "reports_equal": True}
print(f"{len(val)} samples x {len(taus)} τ, median of {args.rounds} rounds: one τ at a time "
      f"{medians['one_at_a_time']:.1f} s, all τ per batch {medians['all_per_batch']:.1f} s "
      f"({result['speedup']:.2f}x); reports equal")
if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
