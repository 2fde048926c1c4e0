"""What a model's trust reads at fusion instants training never shows (issue #15).

    MUJOCO_GL=egl python benchmarks/tick_inputs.py runs/default_first-s0/model.safetensors [--seconds 3]

1. The held-out simulated samples: the camera's and lidar's age, and the share of samples whose camera
   or lidar has no previous frame (training's episodes are made the same way).
2. One simulated Control episode (seed 400000, freeze_detection.py's first) through the node's path at
   --fusion-hz: at every tick whose IMU trust is below the threshold, that trust as it is, with the
   camera's and lidar's ages set to training's 0.1 s, with the IMU window of the tick before, and the
   tick before given this tick's IMU window.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
from fusion_attn.checkpoint import load_checkpoint
from fusion_attn.clock import FusionClock
from fusion_attn.config import cache_dir
from fusion_attn.frames import NS_PER_S
from fusion_attn.learn.data import held_out_set, random_drive
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.outputs import TRUST_THRESHOLD
from fusion_attn.sim.robot import RobotEnv
from fusion_attn.sync import SensorSync, SyncConfig
from fusion_attn.tokenize import Tokenizer, output_names

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoint", type=Path)
parser.add_argument("--seconds", type=float, default=3.0)
parser.add_argument("--fusion-hz", type=float, default=20.0)
parser.add_argument("--episodes", type=int, default=12, help="held-out episodes for part 1")
args = parser.parse_args()

model = load_checkpoint(args.checkpoint).eval()
cfg, names = model.cfg, output_names(model.cfg)
imu = cfg.sensor_names.index("imu")

held = held_out_set(TrainConfig(), cfg, cache_dir("train"), args.episodes).arrays
for name in ("camera", "lidar"):
    ages = held[f"{name}_age"][:, 0]
    no_prev = (held[f"{name}_prev"] < 0).mean()
    print(f"held out, {name}: age min {ages.min():.3f} / median {np.median(ages):.3f} / max {ages.max():.3f} s; "
          f"no previous frame in {no_prev:.2%} of {len(ages)} samples")

tokenizer, env = Tokenizer(cfg), RobotEnv("control")
clock = FusionClock(SensorSync(SyncConfig.for_model(cfg)), args.fusion_hz)
ticks = []
try:
    for info in random_drive(env, np.random.default_rng(400_000), 400_000, args.seconds):
        for snap in clock.step(info["frames"], info["time_ns"]):
            ticks.append((snap.stamp_ns / NS_PER_S, tokenizer(snap, np.ones(1 + len(cfg.sensors), np.float32))))
finally:
    env.close()


@torch.no_grad()
def imu_trust(x: dict[str, np.ndarray]) -> float:
    out = dict(zip(names, model(**{k: torch.as_tensor(v)[None] for k, v in x.items()})))
    return float(out["trust"][0, imu])


window = ("imu_chunks", "imu_mask", "imu_age")
print(f"\nticks at {args.fusion_hz:g} Hz with the IMU's trust below {TRUST_THRESHOLD}: as fused | camera and lidar "
      "0.1 s old | the tick before's IMU window | the tick before with this IMU window")
for (t, x), (_, before) in zip(ticks[1:], ticks):
    if (own := imu_trust(x)) >= TRUST_THRESHOLD:
        continue
    aged = dict(x, camera_age=np.full_like(x["camera_age"], 0.1), lidar_age=np.full_like(x["lidar_age"], 0.1))
    swapped = dict(x, **{k: before[k] for k in window})
    other = dict(before, **{k: x[k] for k in window})
    print(f"{t:.2f} s: {own:.2f} | {imu_trust(aged):.2f} | {imu_trust(swapped):.2f} | {imu_trust(other):.2f}")
