"""Training runs side by side on their own validation (metrics.json `val`, τ = 1): a quick screen of a
design before `fusion-attn eval-robustness` measures it on held-out episodes at every τ.

    python benchmarks/compare_runs.py runs/arrival-s0 runs/arrival_token-s0 [--faults imu_drop lidar_drop ...]

Prints a markdown table: each run's clean error per quantity, then for each fault its rise over
that run's clean error, and the same error in physical units.
"""

import argparse
import json
from pathlib import Path

QUANTITIES = {"head_error": "head error", "speed_mae_mps": "speed [m/s]", "yaw_rate_mae_radps": "yaw rate [rad/s]",
              "obstacle_mae_m": "obstacle [m]", "goal_distance_mae_m": "goal distance [m]",
              "goal_bearing_mae_deg": "goal bearing [°]",
              # the samples camera and lidar both observe the goal in (runs trained after the classes: "-" before)
              "goal_distance_two_observers_mae_m": "goal distance, camera + lidar [m]",
              "goal_bearing_two_observers_mae_deg": "goal bearing, camera + lidar [°]"}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="training run folders (each with metrics.json)")
parser.add_argument("--faults", nargs="+", default=["imu_drop", "imu_freeze", "imu_noise", "lidar_drop", "lidar_freeze",
                                                    "camera_drop", "camera_freeze"])
args = parser.parse_args()


def validation(run: Path) -> dict:
    path = run / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics.json (is {run} a finished `fusion-attn train` run?)")
    val = json.loads(path.read_text()).get("val", {})
    missing = [c for c in ("clean", *args.faults) if c not in val]
    if missing:
        raise SystemExit(f"{path}: no validation for {', '.join(missing)} (it has: {', '.join(sorted(val)) or 'none'})")
    return val


runs = {run: validation(run) for run in args.runs}
print("| run | condition | " + " | ".join(QUANTITIES.values()) + " |")
print("|---|---|" + "---|" * len(QUANTITIES))
for run, val in runs.items():
    clean = val["clean"]
    print(f"| {run.name} | clean | " + " | ".join(f"{clean[k]:.3f}" if k in clean else "-" for k in QUANTITIES) + " |")
    for fault in args.faults:
        row = val[fault]
        cells = [f"{100 * (row[k] / clean[k] - 1):+.0f} % ({row[k]:.3f})" if k in clean else "-" for k in QUANTITIES]
        print(f"| {run.name} | {fault} | " + " | ".join(cells) + " |")
