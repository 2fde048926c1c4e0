"""The trust of a sensor left alone (issue #15): every other sensor sends nothing.

A sensor's trust compares it with the other present sensors too. Where none is left (a camera + lidar rig
whose lidar failed, or two failures at once) that comparison has nothing in it. This measures trained runs
on eval-robustness's held-out episodes (10 Hz, phase 0), each sensor in turn left alone: the share of
fusions whose lone sensor is below the trust threshold, clean (false alarms), clean as a first frame (no
previous frame to compare with, as at a recording's start) and with a fault of its own (zero, noise, freeze:
detections).

    MUJOCO_GL=egl python benchmarks/lone_trust.py runs/default_walkfit runs/default_lonefit \\
        [--weights fusion_attn/data/fusion_default.safetensors] [--out benchmarks/results/lone_trust.json]

Prints a markdown table; --out writes the figures as JSON.
"""

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
from fusion_attn.config import cache_dir
from fusion_attn.learn.augment import FaultPlan, corrupt
from fusion_attn.learn.data import Dataset, episode_shards
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.learn.objectives import fused_feature
from fusion_attn.learn.robustness import load_run, with_checkpoint
from fusion_attn.outputs import TRUST_THRESHOLD

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="training run folders (train_state.pt)")
parser.add_argument("--weights", type=Path, help="a checkpoint (its heads beside it) measured in the first run's "
                    "config, as a run of its own: e.g. the packaged default")
parser.add_argument("--episodes", type=int, default=12, help="held-out episodes (eval-robustness's first ones)")
parser.add_argument("--out", type=Path, help="write the figures as JSON")
args = parser.parse_args()

CONDITIONS = ("clean", "first frame", "zero", "noise", "freeze")
HZ = 10.0

runs = [load_run(str(r), r) for r in args.runs]
if args.weights:
    runs.append(with_checkpoint(runs[0], args.weights))


@torch.no_grad()
def below_threshold(run, data: Dataset, sensor: int, condition: str) -> tuple[float | None, int]:
    """(share of fusions with `sensor` alone whose trust is below the threshold, how many fusions): clean (as a
    first frame), or with the fault on that sensor; fusions where it has no tokens are left out."""
    t, below = data.tensors(), []
    for idx in torch.arange(len(data)).split(256):
        clean = condition in ("clean", "first frame")
        plan = FaultPlan.fixed(len(idx), -1 if clean else sensor, "drop" if clean else condition)
        plan.alone = torch.full((len(idx),), sensor)
        plan.first_frame = torch.full((len(idx), 2), condition == "first frame")
        x = corrupt(t, idx, plan, run.cfg, HZ, torch.Generator().manual_seed(0))
        _, fusion = fused_feature(run.model, x, torch.ones(len(idx), 1 + len(run.cfg.sensors)))
        alone = fusion["trust_logits"].isfinite().sum(1) == 1
        below.append(fusion["trust"][alone & fusion["trust_logits"][:, sensor].isfinite(), sensor] < TRUST_THRESHOLD)
    below = torch.cat(below)
    return (float(below.float().mean()) if len(below) else None), len(below)


cache = cache_dir("train")
results = {}
for run in runs:
    tc = dataclasses.replace(TrainConfig(), fusion_hz=HZ, sim_camera_view=run.tc.sim_camera_view)  # the run's rig
    data = Dataset.join([(s.load(cache), 0) for s in episode_shards(tc, run.cfg, "test", args.episodes)])
    results[run.name] = {name: {c: below_threshold(run, data, m, c) for c in CONDITIONS}
                         for m, name in enumerate(run.cfg.sensor_names)}

print("| run | sensor alone | fusions | " + " | ".join(f"below threshold, {c}" for c in CONDITIONS) + " |")
print("|---" * (3 + len(CONDITIONS)) + "|")
for name, sensors in results.items():
    for sensor, rows in sensors.items():
        cells = (f"{rows[c][0]:.1%}" if rows[c][1] else "-" for c in CONDITIONS)  # a zeroed lidar is no lidar: none
        print(f"| {name} | {sensor} | {rows['clean'][1]} | " + " | ".join(cells) + " |")
if args.out:
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                                    "episodes": args.episodes, "threshold": TRUST_THRESHOLD, "results": results},
                                   indent=1) + "\n")
