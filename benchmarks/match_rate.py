"""Whether a faster lidar would carry the yaw rate and speed without the IMU (issue #15): the scan match's
own errors against the labels at several simulated lidar rates, and the gyro's beside them. Nothing trained.

    MUJOCO_GL=egl python benchmarks/match_rate.py [--rates 10 20 40] [--trigger lidar] [--episodes 4]
        [--out benchmarks/results/match_rate.json]

For each lidar rate: validation-seed episodes of the default tasks (the data's random drive), fused on
`--trigger` (lidar: as each sweep arrives, the `arrival` recipe; timer: the 10 Hz fusion timer, which
pairs a sweep with the one fused before it, 0.1 s back at any lidar rate), then `model.lidar_scan_match`
of each sample's sweep and the one before it. A shorter interval between the two lags less behind a
turn, but the same range noise then reads as a larger rate: the mean error (lag at the drive's command
switches) and the median (noise) pull apart. The gyro's error is its newest resampled yaw rate as it is.
"""

import argparse
import datetime
import json
from pathlib import Path

import torch

import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
from fusion_attn.bench import machine
from fusion_attn.learn.augment import FaultPlan, corrupt
from fusion_attn.learn.data import SPLIT_SEEDS, Dataset, sim_episode
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.model import lidar_scan_match
from fusion_attn.sim.sensors import SensorConfig
from fusion_attn.tokenize import IMU_AXES, imu_samples

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 20.0, 40.0], help="simulated lidar rates [Hz]")
parser.add_argument("--trigger", choices=["lidar", "timer"], default="lidar")
parser.add_argument("--episodes", type=int, default=4, help="15 s episodes per rate, tasks alternating")
parser.add_argument("--good", type=float, default=0.05, help="a match within this many rad/s of the label is good")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "match_rate.json")
args = parser.parse_args()

tc = TrainConfig(lidar_motion=True, trigger=args.trigger)
cfg = tc.fusion_config()
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "trigger": args.trigger,
          "episodes": args.episodes, "good_radps": args.good, "rates": {}}
print("| lidar | samples | matched | match yaw: mean / median / good share | match speed: mean / median | gyro yaw: mean |")
print("|---|---|---|---|---|---|")
for hz in args.rates:
    episodes = [(sim_episode(tc.sim_tasks[k % len(tc.sim_tasks)], SPLIT_SEEDS["val"] + k, tc.sim_seconds, tc.fusion_hz,
                             cfg, args.trigger, sensors=SensorConfig(lidar_hz=hz)), 0) for k in range(args.episodes)]
    t = Dataset.join(episodes).tensors()
    idx = torch.arange(len(t["labelled"]))
    x = corrupt(t, idx, FaultPlan.fixed(len(idx), -1, "drop"), cfg, tc.fusion_hz, torch.Generator())  # clean inputs
    scan = lidar_scan_match(x, cfg.lidar)  # yaw rate, speed, sideways, share, log rms, matched
    speed, yaw = t["velocity"][:, 0], t["velocity"][:, 1]
    matched = scan[:, 5] > 0
    match_yaw, match_speed = (scan[:, 0] - yaw).abs()[matched], (scan[:, 1] - speed).abs()[matched]
    gyro = imu_samples(x["imu_chunks"], cfg.imu)[:, -1, -1, IMU_AXES.index("gyro_z")] * cfg.imu.gyro_scale
    row = {"samples": len(idx), "matched_share": float(matched.float().mean()),
           "match_yaw_mean": float(match_yaw.mean()), "match_yaw_median": float(match_yaw.median()),
           "match_yaw_good_share": float((match_yaw < args.good).float().mean()),
           "match_speed_mean": float(match_speed.mean()), "match_speed_median": float(match_speed.median()),
           "gyro_yaw_mean": float((gyro - yaw).abs().mean())}
    report["rates"][f"{hz:g}"] = row
    print(f"| {hz:g} Hz | {row['samples']} | {row['matched_share']:.0%} | {row['match_yaw_mean']:.3f} / "
          f"{row['match_yaw_median']:.3f} / {row['match_yaw_good_share']:.0%} | {row['match_speed_mean']:.3f} / "
          f"{row['match_speed_median']:.3f} | {row['gyro_yaw_mean']:.3f} |", flush=True)

args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
