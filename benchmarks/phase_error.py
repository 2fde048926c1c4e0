"""Clean error where the fusion timer is not in step with the sensors (issue #15).

Training's and eval-robustness's simulated episodes are fused by a 10 Hz timer whose every tick ends a 50 Hz
control step, together with a camera frame and a lidar sweep (each 0.1 s old at the tick). A robot's timer
keeps no such step with its sensors, and the node's default 20 Hz ticks between them every other time. This
measures trained runs, clean, on eval-robustness's held-out episodes fused three ways:

    10 Hz, phase 0     as eval-robustness fuses them
    10 Hz, spread      episode k's timer k x 0.618 of a period late (the frames 0 to 0.1 s old)
    20 Hz, phase 0     the node's default rate: ticks on and between the frames, in turn

and at spread phases, the share of fusions whose clean lidar is below the trust threshold as fused and
with the sweep's age (and its previous sweep's) moved to phase 0's 0.1 s, nothing else changed.

    MUJOCO_GL=egl python benchmarks/phase_error.py runs/default runs/default_phase-s0 \\
        [--weights fusion_attn/data/fusion_default.safetensors] [--out benchmarks/results/phase_error.json]

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
from fusion_attn.learn.evaluation import evaluate_taus
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.learn.objectives import fused_feature
from fusion_attn.learn.robustness import load_run, with_checkpoint
from fusion_attn.outputs import TRUST_THRESHOLD

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="training run folders (train_state.pt)")
parser.add_argument("--weights", type=Path, help="a checkpoint (its heads beside it) measured in the first run's "
                    "config, as a run of its own: e.g. the packaged default, whose training folder is not kept")
parser.add_argument("--episodes", type=int, default=12, help="held-out episodes (eval-robustness's first ones)")
parser.add_argument("--out", type=Path, help="write the figures as JSON")
args = parser.parse_args()

SETS = {"10 Hz, phase 0": (10.0, False), "10 Hz, spread": (10.0, True), "20 Hz, phase 0": (20.0, False)}
COLUMNS = {"head_error": "head error", "speed_mae_mps": "speed [m/s]", "yaw_rate_mae_radps": "yaw rate [rad/s]",
           "obstacle_mae_m": "obstacles [m]", "goal_distance_mae_m": "goal distance [m]",
           "goal_bearing_mae_deg": "goal bearing [deg]"}

runs = [load_run(str(r), r) for r in args.runs]
if args.weights:
    runs.append(with_checkpoint(runs[0], args.weights))


@torch.no_grad()
def lidar_untrusted(run, data: Dataset, hz: float, age_s: float | None = None) -> float:
    """The share of fusions with a lidar sweep whose lidar trust is below the threshold, clean; age_s: with
    the sweep's age set to it, and its previous sweep's age moved by as much."""
    t, below = data.tensors(), []
    for idx in torch.arange(len(data)).split(256):
        x = corrupt(t, idx, FaultPlan.fixed(len(idx), -1, "drop"), run.cfg, hz, torch.Generator())
        present = x["lidar_mask"].flatten(1).any(1)
        if age_s is not None:
            moved = torch.where(x["lidar_age"] > 0, age_s - x["lidar_age"], 0.0)
            x["lidar_age"], x["lidar_prev_age"] = x["lidar_age"] + moved, x["lidar_prev_age"] + moved
        _, fusion = fused_feature(run.model, x, torch.ones(len(idx), 1 + len(run.cfg.sensors)))
        below.append(fusion["trust"][present, run.cfg.sensor_names.index("lidar")] < TRUST_THRESHOLD)
    return float(torch.cat(below).float().mean())


cache = cache_dir("train")
results = {}
for run in runs:
    results[run.name] = {}
    for label, (hz, spread) in SETS.items():
        tc = dataclasses.replace(TrainConfig(), fusion_hz=hz, sim_camera_view=run.tc.sim_camera_view)  # the run's rig
        data = Dataset.join([(s.load(cache), 0) for s in episode_shards(tc, run.cfg, "test", args.episodes, spread)])
        m = evaluate_taus(run.model, run.heads, data, run.cfg, hz, [1.0], clean_only=True)[1.0]["clean"]
        results[run.name][label] = {"samples": len(data), **{k: float(m[k]) for k in COLUMNS},
                                    **{f"untrusted_{n}": float(m[f"untrusted_{n}"]) for n in run.cfg.sensor_names}}
        if spread:
            results[run.name]["lidar_untrusted_spread"] = {"as fused": lidar_untrusted(run, data, hz),
                                                           "sweep age 0.1 s": lidar_untrusted(run, data, hz, 0.1)}

names = runs[0].cfg.sensor_names
print("| run | fused | samples | " + " | ".join(COLUMNS.values()) + " | " +
      " | ".join(f"{n} untrusted" for n in names) + " |")
print("|---" * (3 + len(COLUMNS) + len(names)) + "|")
for name, sets in results.items():
    for label in SETS:
        m = sets[label]
        print(f"| {name} | {label} | {m['samples']} | " + " | ".join(f"{m[k]:.3f}" for k in COLUMNS) + " | " +
              " | ".join(f"{m.get(f'untrusted_{n}', float('nan')):.1%}" for n in names) + " |")
print("\n| run | lidar untrusted at spread phases, as fused | with the sweep's age set to 0.1 s |\n|---|---|---|")
for name, sets in results.items():
    probe = sets["lidar_untrusted_spread"]
    print(f"| {name} | {probe['as fused']:.1%} | {probe['sweep age 0.1 s']:.1%} |")
if args.out:
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                                    "episodes": args.episodes, "results": results}, indent=1) + "\n")
