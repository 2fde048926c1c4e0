"""How well the simulated wheel odometry and gyro read the robot's speed and yaw rate (issue #15).

    python benchmarks/sim_odometry.py [--episodes 6] [--seconds 20] [--out benchmarks/results/sim_odometry.json]

Odometry is the fourth sensor of a model built with `--odometry`: it reads speed and yaw rate where the
IMU fails. What a fusion can keep then is bounded by how well it reads them, so this drives the
simulator with the training data's random policy (`learn.data.random_drive`, clean sensors) and
compares, at the end of every 50 Hz control step, the newest odometry twist and the newest gyro
reading with the true state (`RobotEnv.ground_truth`): mean absolute error of the odometry's speed and
yaw rate, and of the gyro's yaw rate (its z axis: the simulated IMU sits level on the robot).
Episodes alternate the default tasks and use seeds no training, validation or test episode uses.
"""

import argparse
import datetime
import json
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

import fusion_attn.sim  # noqa: F401 - the headless GL backend before mujoco loads
from fusion_attn.bench import machine
from fusion_attn.frames import ImuSample, OdometrySample
from fusion_attn.learn.data import random_drive
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.sim.faults import FaultConfig
from fusion_attn.sim.robot import RobotEnv

FIRST_SEED = 900_000  # beyond every split's (learn.data.SPLIT_SEEDS)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--episodes", type=int, default=6)
parser.add_argument("--seconds", type=float, default=20.0)
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sim_odometry.json")
args = parser.parse_args()

rows = []  # per control step: true speed, true yaw rate, odometry speed, odometry yaw rate, gyro yaw rate
tasks = TrainConfig().sim_tasks
for k in range(args.episodes):
    env = RobotEnv(tasks[k % len(tasks)], faults=FaultConfig())
    try:
        odometry = gyro = None
        for info in random_drive(env, np.random.default_rng(FIRST_SEED + k), FIRST_SEED + k, args.seconds):
            for frame in info["frames"]:
                if isinstance(frame, OdometrySample):
                    odometry = frame
                elif isinstance(frame, ImuSample):
                    gyro = frame
            if odometry is not None and gyro is not None:
                speed, yaw_rate = env.ground_truth()["velocity"]
                rows.append((speed, yaw_rate, odometry.linear[0], odometry.angular[2], gyro.gyro[2]))
    finally:
        env.close()
rows = np.array(rows)
truth_speed, truth_yaw, odo_speed, odo_yaw, gyro_yaw = rows.T
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "episodes": args.episodes,
          "seconds": args.seconds, "steps": len(rows),
          "odometry_speed_mae_mps": float(np.abs(odo_speed - truth_speed).mean()),
          "odometry_yaw_rate_mae_radps": float(np.abs(odo_yaw - truth_yaw).mean()),
          "gyro_yaw_rate_mae_radps": float(np.abs(gyro_yaw - truth_yaw).mean()),
          "true_speed_mean_abs_mps": float(np.abs(truth_speed).mean()),
          "true_yaw_rate_mean_abs_radps": float(np.abs(truth_yaw).mean())}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
