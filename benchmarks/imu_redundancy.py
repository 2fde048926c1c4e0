"""What a second or third IMU would give the yaw rate when one IMU fails (issue #15's IMU-failed floor).

    MUJOCO_GL=egl python benchmarks/imu_redundancy.py [--imus 3] [--episodes 12] [--seconds 20]
        [--out benchmarks/results/imu_redundancy.json]

docs/RESULTS.md names a second reader of the rates as precise as the gyro as the design that would let
the yaw rate survive the IMU's failure. Whether one more IMU is enough depends on how much of a gyro's
error at the fusion instant is its own (white noise, per-episode bias: independent between IMUs, so
averaging N of them divides it by about sqrt(N)) and how much every IMU shares (the robot's motion
since the newest sample). This drives the simulator as sim_odometry.py does (the training data's random
policy, clean sensors, seeds no split uses) with `--imus` IMUs at the same site, each with its own bias
and noise as `sim.sensors.Imu` draws them, and at the end of every 50 Hz control step reads the yaw rate
from the first n of them (n = 1 .. --imus) by several readers:
    newest   the mean of the n gyros' newest z readings
    line_K   a line fitted to the last K mean readings (--lines; K / 200 Hz seconds back), read at the
             step's end: it follows the turn to the step's end, and averages noise over K readings
and compares each with the true yaw rate (`RobotEnv.ground_truth`). `rise_losing_one` is a reader's
error from n - 1 IMUs over its error from n; `best` takes, for each n, the reader that errs least: what
losing one of n IMUs costs a fusion as precise as they are.
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
from fusion_attn.frames import NS_PER_S
from fusion_attn.learn.data import random_drive
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.sim.faults import FaultConfig
from fusion_attn.sim.robot import RobotEnv
from fusion_attn.sim.sensors import Imu

FIRST_SEED = 910_000  # beyond every split's (learn.data.SPLIT_SEEDS) and sim_odometry.py's

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--imus", type=int, default=3)
parser.add_argument("--episodes", type=int, default=12)
parser.add_argument("--seconds", type=float, default=20.0)
parser.add_argument("--lines", type=int, nargs="+", default=[4, 8, 16], help="readings each line reader fits")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "imu_redundancy.json")
args = parser.parse_args()
if args.imus < 2 or min(args.lines) < 2:
    parser.error("--imus and each of --lines must be at least 2")


class ImuTap:
    """Stands in the env's IMU slot: returns the env's own IMU sample, and records the gyro z of it and
    of the extra IMUs, all captured from the same MuJoCo state at the same instant."""

    def __init__(self, own: Imu, extra: list[Imu]):
        self.own, self.extra = own, extra
        self.stamps: list[int] = []
        self.gyro_z: list[list[float]] = []

    def capture(self, data, stamp_ns: int):
        sample = self.own.capture(data, stamp_ns)
        self.stamps.append(stamp_ns)
        self.gyro_z.append([sample.gyro[2]] + [imu.capture(data, stamp_ns).gyro[2] for imu in self.extra])
        return sample


def read_yaw_rate(stamps: np.ndarray, gyro: np.ndarray, now_ns: int) -> list[float]:
    """The newest reading, then each line reader's, from (T,) stamps and (T,) gyro readings up to now_ns."""
    lines = [np.polyfit((stamps[-k:] - now_ns) / NS_PER_S, gyro[-k:], 1)[1] for k in args.lines]
    return [float(gyro[-1])] + [float(v) for v in lines]


errors = {name: [[] for _ in range(args.imus)] for name in ["newest"] + [f"line_{k}" for k in args.lines]}
tasks = TrainConfig().sim_tasks
for k in range(args.episodes):
    env = RobotEnv(tasks[k % len(tasks)], faults=FaultConfig())
    extra_rng = np.random.default_rng(FIRST_SEED + 500_000 + k)
    try:
        tap = None
        for info in random_drive(env, np.random.default_rng(FIRST_SEED + k), FIRST_SEED + k, args.seconds):
            if tap is None:  # the episode's model exists after reset: the extra IMUs are built on it
                extra = [Imu(env.model, env.sensors, extra_rng) for _ in range(args.imus - 1)]
                tap = env._devices["imu"] = ImuTap(env._devices["imu"], extra)
                continue
            if len(tap.stamps) < max(args.lines):
                continue
            truth = env.ground_truth()["velocity"][1]
            stamps, gyro = np.array(tap.stamps), np.array(tap.gyro_z)
            for n in range(1, args.imus + 1):
                readings = read_yaw_rate(stamps, gyro[:, :n].mean(axis=1), info["time_ns"])
                for reader, value in zip(errors, readings):
                    errors[reader][n - 1].append(abs(value - truth))
    finally:
        env.close()

def summary(mae: list[float]) -> dict:
    return {"yaw_rate_mae_radps": {str(n + 1): m for n, m in enumerate(mae)},
            "rise_losing_one": {str(n + 1): mae[n - 1] / mae[n] - 1.0 for n in range(1, len(mae))}}


mae = {reader: [float(np.mean(e)) for e in per_n] for reader, per_n in errors.items()}
best = [min(m[n] for m in mae.values()) for n in range(args.imus)]
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "episodes": args.episodes,
          "seconds": args.seconds, "imus": args.imus, "steps": len(errors["newest"][0]),
          "best": {**summary(best), "reader": {str(n + 1): min(mae, key=lambda r: mae[r][n]) for n in range(args.imus)}},
          "readers": {reader: summary(m) for reader, m in mae.items()}}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
