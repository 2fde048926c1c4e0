"""Would wheel odometry carry the yaw rate and speed when the IMU fails? Measured on a real robot (issue #15).

    python benchmarks/odom_rates.py [BAG] [--out benchmarks/results/odom_rates.json]

docs/RESULTS.md names a second sensor that reads the rates as the design that would let speed and yaw
rate survive a failed IMU: camera and lidar see the motion only between two frames, which lags, and a
fusion as precise as its gyro would be allowed about 0.05 rad/s of yaw-rate error without it. This
reads a recording with an Imu and a nav_msgs/Odometry topic (default: the real Clearpath Husky in
../shared/data/real/husky_imu_odom_gps.bag, a skid-steer robot, whose wheels slip when it turns) and
compares, at each odometry message, its twist's yaw rate with the gyro's interpolated at its stamp:

- the gyro axis and sign that are the robot's yaw: the recording has no tf, and an IMU may be mounted
  turned; the axis whose rate correlates best with the odometry's is taken and named;
- at the stamps as recorded and at the offset between the two clocks that fits best (searched
  over +-1 s), the mean and RMS difference, the bias and the odometry's scale against the gyro
  (a skid-steer's wheels report more turn than the body makes, or less), turning and driving straight;
- the gyro's own spread while the odometry says the robot stands;
- speed, with a NavSatFix topic: the fixes' speed over windows of 2 and 4 s against the odometry's mean
  over the same window (GPS noise dominates; the ratio of means says whether the wheels' scale holds).
"""

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from fusion_attn.adapters import imu_to_sample, odometry_to_sample
from fusion_attn.bag import open_reader
from fusion_attn.bench import machine
from fusion_attn.frames import NS_PER_S, stamp_to_ns

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("bag", nargs="?", type=Path, default=REAL / "husky_imu_odom_gps.bag")
parser.add_argument("--turning", type=float, default=0.05, help="|yaw rate| [rad/s] above which the robot turns")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "odom_rates.json")
args = parser.parse_args()
if not args.bag.exists():
    parser.error(f"{args.bag}: no such recording")

imu, odom, fix = [], [], []  # (t [s], gyro xyz) / (t, speed, yaw rate) / (t, lat, lon)
with open_reader([args.bag]) as reader:
    for conn, _, raw in reader.messages():
        if conn.msgtype not in ("sensor_msgs/msg/Imu", "nav_msgs/msg/Odometry", "sensor_msgs/msg/NavSatFix"):
            continue
        msg = reader.deserialize(raw, conn.msgtype)
        t = stamp_to_ns(msg.header.stamp) / NS_PER_S
        if conn.msgtype == "sensor_msgs/msg/Imu":
            imu.append((t, *imu_to_sample(msg).gyro))
        elif conn.msgtype == "nav_msgs/msg/Odometry":  # the twist, as the node's adapter reads it
            twist = odometry_to_sample(msg)
            odom.append((t, twist.linear[0], twist.angular[2]))
        elif msg.status.status >= 0:  # a fix
            fix.append((t, msg.latitude, msg.longitude))
if not imu or not odom:
    raise SystemExit(f"{args.bag}: needs an Imu and a nav_msgs/Odometry topic "
                     f"({len(imu)} Imu, {len(odom)} Odometry messages)")
imu, odom = np.array(imu), np.array(odom)
t0 = odom[0, 0]
t_imu, t_odom, speed, yaw = imu[:, 0] - t0, odom[:, 0] - t0, odom[:, 1], odom[:, 2]


def gyro_at(axis: int, offset_s: float) -> np.ndarray:
    """The gyro's rate about `axis` at each odometry stamp shifted by offset_s."""
    return np.interp(t_odom + offset_s, t_imu, imu[:, 1 + axis])


# the robot's yaw axis in the IMU's frame: the best correlated, at the best offset
scores = {(axis, round(off, 2)): np.corrcoef(gyro_at(axis, off), yaw)[0, 1]
          for axis in range(3) for off in np.arange(-1.0, 1.0001, 0.1)}
(axis, _), corr = max(scores.items(), key=lambda kv: abs(kv[1]))
sign = float(np.sign(corr))


def compare(offset_s: float) -> dict:
    gyro = sign * gyro_at(axis, offset_s)
    diff = yaw - gyro
    turning = np.abs(gyro) > args.turning
    scale, bias = np.polyfit(gyro, yaw, 1)
    return {"offset_s": round(offset_s, 3), "mean_abs_radps": float(np.abs(diff).mean()),
            "rms_radps": float(np.sqrt((diff**2).mean())), "bias_radps": float(diff.mean()),
            "odom_per_gyro_scale": float(scale), "turning_share": float(turning.mean()),
            "mean_abs_turning_radps": float(np.abs(diff[turning]).mean()),
            "mean_abs_straight_radps": float(np.abs(diff[~turning]).mean()),
            "mean_abs_after_scale_radps": float(np.abs(yaw - (scale * gyro + bias)).mean())}


offsets = np.arange(-1.0, 1.0001, 0.01)
best = offsets[np.argmin([np.abs(yaw - sign * gyro_at(axis, o)).mean() for o in offsets])]
still = (np.abs(speed) < 0.01) & (np.abs(yaw) < 0.01)
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "bag": args.bag.name,
          "imu_messages": len(imu), "odom_messages": len(odom), "seconds": float(t_odom[-1]),
          "yaw_axis": f"{'-' if sign < 0 else '+'}{'xyz'[axis]} of the IMU frame", "yaw_axis_corr": float(abs(corr)),
          "yaw_rate": {"as_stamped": compare(0.0), "best_offset": compare(float(best))},
          "gyro_spread_still_radps": float(gyro_at(axis, 0.0)[still].std()) if still.sum() > 1 else None,
          "still_share": float(still.mean()), "speed_vs_gps": None}
if len(fix) > 1:
    fix = np.array(fix)
    lat0 = np.radians(fix[0, 1])
    east = np.radians(fix[:, 2] - fix[0, 2]) * 6_371_000 * np.cos(lat0)
    north = np.radians(fix[:, 1] - fix[0, 1]) * 6_371_000
    report["speed_vs_gps"] = {}
    for window in (2.0, 4.0):
        pairs = []
        for i in range(len(fix)):
            j = np.searchsorted(fix[:, 0], fix[i, 0] + window)
            inside = (odom[:, 0] >= fix[i, 0]) & (odom[:, 0] <= fix[min(j, len(fix) - 1), 0])
            if j >= len(fix) or not inside.any():
                break
            gps = np.hypot(east[j] - east[i], north[j] - north[i]) / (fix[j, 0] - fix[i, 0])
            pairs.append((gps, speed[inside].mean()))
        gps, wheels = np.array(pairs).T
        report["speed_vs_gps"][f"{window:g}s"] = {"windows": len(pairs), "mean_abs_mps": float(np.abs(gps - wheels).mean()),
                                                  "odom_over_gps_mean": float(wheels.mean() / gps.mean())}

args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
