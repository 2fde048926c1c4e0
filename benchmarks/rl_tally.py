"""One row per RL seed of benchmarks/rl_memory_task.py results: the fusion it observed through, its training
success before the fault curriculum began ("?" where the results predate recording it) and over the whole
run (the curve's largest point), the first step at which it reached 0.9, its lowest and highest training
success once faults were in the mix, and its final evaluation clean and with one sensor fault, against
issue #15's RL target (clean >= 0.9, a drop of at most 10 points).

    python benchmarks/rl_tally.py benchmarks/results/rl_memory_*.json [--agent gtrxl]
"""

import argparse
import json
import math
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("results", type=Path, nargs="+")
parser.add_argument("--agent", default="gtrxl")
args = parser.parse_args()

print("| results | fusion | seed | peak before faults | peak | first >= 0.9 at step | after the faults | clean | with a fault "
      "| target |")
print("|---|---|---|---|---|---|---|---|---|---|")
for path in args.results:
    report = json.loads(path.read_text())
    if "fault_rate" not in report:  # written before the results recorded their fault options
        fault_step = None
    else:
        fault_step = report["fault_after"] * report["steps"] if report["fault_rate"] else report["steps"]
    fusion = report.get("fusion_checkpoint") or "packaged then"  # the file name says which, for older runs
    for run in report["results"].get(args.agent, []):
        curve = [(step, s) for step, s in run["curve"] if not math.isnan(s)]  # NaN: no episode finished in that rollout
        before = max((s for step, s in curve if step <= fault_step), default=float("nan")) if fault_step else None
        peak = max((s for _, s in curve), default=float("nan"))
        found = next((f"{step:,}" for step, s in curve if s >= 0.9), "-")  # the cue found, by training success
        after = [s for step, s in curve if fault_step is not None and step > fault_step]
        after = f"{min(after):.2f}-{max(after):.2f}" if after else "-"
        clean, faulted = run["success_clean"], run["success_faults"]
        met = clean >= 0.9 and clean - faulted <= 0.10 + 1e-9
        print(f"| {path.name} | {fusion} | {run['seed']} | {'?' if before is None else f'{before:.2f}'} | {peak:.2f} | {found} | {after} | {clean:.3f} | {faulted:.3f} "
              f"| {'met' if met else 'not met'} |")
