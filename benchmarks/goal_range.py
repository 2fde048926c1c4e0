"""Whether the camera carries the goal's distance without the lidar (issue #15): the goal post's range read
off the simulated camera by its geometry, at the resolution the model sees and at finer ones, against the
lidar's. Nothing trained.

    MUJOCO_GL=egl python benchmarks/goal_range.py [--views 64 128] [--token-sizes 96x128 64x256]
        [--episodes 8] [--out benchmarks/results/goal_range.json]

For each rendered view size (the rig's four square 90° views; 64: the simulator's default, a 64 x 256
panorama), validation-seed episodes of the default tasks (the data's random drive) give, at each camera
frame, the panorama, the newest lidar sweep and the goal's true distance. Each image is read as rendered
and as each camera tokenizer size in `--token-sizes` resizes it (96 x 128: the packaged model's; the
tokenizer's own resize). The estimates:

- lidar: the mean range of the sweep's retroreflective returns (the post's) plus the post's radius;
- camera: the green post's top edge, at a known 2 m, 1.58 m above the rig: its rows above the horizon
  in the post's column (sub-pixel, from the edge pixel's share of green) give the range along that
  column to the top's nearest rim, one post radius before its axis; where the top is above the view,
  the floor patch's near edge (0.42 m below the rig, 0.4 m before the post) does; where both are cut off, the middle of the ranges that would cut them.

The bearing: the post's column in its view (camera), the mean direction of its returns (lidar). "Both"
is, per quantity, the sensor that reads it better where it sees the post, else the other: what the two
say together; "camera alone" is what is left with the lidar failed. Their mean absolute errors, where the lidar reaches the post and
over all samples, say what the sensors carry: a fusion that read each as well as this loses at most
their ratio with the lidar failed (on average; nothing makes it a bound). Each camera frame is paired
with the lidar sweep taken with it and the truth at the end of that 50 Hz control step (up to 20 ms
later); a fusion's frames are up to a period older, which these readings do not pay.
"""

import argparse
import datetime
import json
import math
from pathlib import Path

import cv2
import numpy as np

import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
from fusion_attn.bench import machine
from fusion_attn.frames import CameraFrame, LidarFrame
from fusion_attn.learn.data import SPLIT_SEEDS, random_drive
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.sim.faults import FaultConfig
from fusion_attn.sim.robot import RobotEnv
from fusion_attn.sim.scene import RIG_HEIGHT, ROBOT_Z
from fusion_attn.sim.sensors import RETROREFLECTIVE_INTENSITY, SensorConfig
from fusion_attn.sim.tasks import POST_HALF_HEIGHT, POST_RADIUS, ReachTask

RIG_Z = ROBOT_Z + RIG_HEIGHT  # the rig's height above the floor (the robot drives on flat ground)
ABOVE, BELOW = 2 * POST_HALF_HEIGHT - RIG_Z, RIG_Z  # the post's top above the rig; the floor below it
PATCH_RADIUS = ReachTask.success_radius  # the green floor patch around the post


def green(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) how green each pixel is: green over the larger of red and blue, in [0, 1].
    The goal's colour is the only green in the arena (obstacles never use a task colour)."""
    rgb = image.astype(np.float32) / 255.0
    return np.clip(rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2]), 0.0, None)


def camera_reading(image: np.ndarray, views: int, yaws_deg: tuple[float, ...]) -> tuple[float, float, str] | None:
    """The goal post's horizontal range [m] and bearing [rad] from one panorama (views of yaws_deg, left
    to right), and which edge gave the range; None: no post in view."""
    h, w_all, _ = image.shape
    w = w_all // views
    fx, fy, v0 = w / 2.0, h / 2.0, h / 2.0  # square 90° views: the focal lengths in pixels; a level horizon
    g = green(image)
    above = g[: h // 2].sum(axis=0)  # only the post rises above the horizon
    if above.max() < 0.3:
        return None
    c = int(above.argmax())
    cols = slice(max(c - 1, 0), min(c + 2, w_all))  # a distant post is under two pixels wide
    x = (np.arange(w_all)[cols] * above[cols]).sum() / above[cols].sum() + 0.5 - (c // w) * w
    phi = math.atan((w / 2.0 - x) / fx)  # the column's angle from its view's axis, left positive
    bearing, cos_phi = math.radians(yaws_deg[c // w]) + phi, math.cos(phi)
    profile = g[:, cols].sum(axis=1)
    up = profile[: h // 2]  # the post's full width, by the rows only it covers (the patch below is wider)
    level = np.percentile(up[up > 0.5 * up.max()], 80)
    share = np.clip(profile / level, 0.0, 1.0)  # per row: how much of it is post (or patch)
    solid = np.flatnonzero(share >= 0.5)
    top, bottom = solid[0], solid[-1]
    if top > 0:  # the edge lies in the row above the first solid one, by that row's share of green
        edge = top - share[top - 1]
        return fy * ABOVE / ((v0 - edge) * cos_phi) + POST_RADIUS, bearing, "top"  # the top's rim nearest the rig
    if bottom < h - 1:
        edge = bottom + 1 + share[bottom + 1]
        return fy * BELOW / ((edge - v0) * cos_phi) + PATCH_RADIUS, bearing, "patch"
    # the top above the view and the patch below it: the post nearer than both would allow
    return min(ABOVE / cos_phi + POST_RADIUS, BELOW / cos_phi + PATCH_RADIUS) / 2.0, bearing, "cut off"


def lidar_reading(frame: LidarFrame | None) -> tuple[float, float] | None:
    """The goal post's range [m] and bearing [rad] from the sweep's retroreflective returns; None: none hit it."""
    if frame is None:
        return None
    post = frame.points[frame.points[:, 3] >= RETROREFLECTIVE_INTENSITY]
    if len(post) == 0:
        return None
    x, y = post[:, 0].mean(), post[:, 1].mean()
    return float(np.hypot(post[:, 0], post[:, 1]).mean()) + POST_RADIUS, math.atan2(y, x)


def episode(task: str, seed: int, seconds: float, sensors: SensorConfig) -> list[dict]:
    """Each camera frame of one episode: its image, the newest lidar sweep's reading of the post and the
    goal's true range and bearing."""
    env = RobotEnv(task, sensors=sensors, faults=FaultConfig())
    rng = np.random.default_rng(seed)
    lidar, out = None, []
    try:
        for info in random_drive(env, rng, seed, seconds):
            # a step delivers its camera frame before the sweep taken with it: take the step's sweeps first
            frames = sorted(info["frames"], key=lambda f: not isinstance(f, LidarFrame))
            for f in frames:
                if isinstance(f, LidarFrame):
                    lidar = f
                elif isinstance(f, CameraFrame):
                    out.append({"image": f.image, "lidar": lidar_reading(lidar), "truth": env.ground_truth()["goal"]})
    finally:
        env.close()
    return out


def summary(err: np.ndarray) -> dict:
    return {"mean": float(err.mean()), "median": float(np.median(err)), "p90": float(np.percentile(err, 90))}


def errors(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N, 2) range [m], bearing [rad] -> (N, 2) absolute errors in m and degrees."""
    bearing = np.angle(np.exp(1j * (estimate[:, 1] - truth[:, 1])))
    return np.stack([np.abs(estimate[:, 0] - truth[:, 0]), np.degrees(np.abs(bearing))], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, nargs="+", default=[64, 128], help="rendered view sizes [px]")
    parser.add_argument("--token-sizes", nargs="+", default=["96x128", "64x256"],
                        help="camera tokenizer sizes HxW")
    parser.add_argument("--episodes", type=int, default=8, help="15 s episodes per view size, tasks alternating")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "goal_range.json")
    args = parser.parse_args()

    tc = TrainConfig()
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "episodes": args.episodes,
              "readings": {}}
    print("| view | image | samples | lidar sees the post | camera: top / patch / cut off / none | range, lidar in "
          "reach: lidar / camera | range, all: both / camera alone (ratio) | bearing, all: both / camera alone |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.views:
        sensors = SensorConfig(camera_size=(size, size))
        samples = [s for k in range(args.episodes)
                   for s in episode(tc.sim_tasks[k % len(tc.sim_tasks)], SPLIT_SEEDS["val"] + k, tc.sim_seconds, sensors)]
        truth = np.array([s["truth"] for s in samples], np.float64)
        lidar = np.array([(np.nan, np.nan) if s["lidar"] is None else s["lidar"] for s in samples])
        lidar_sees = np.isfinite(lidar[:, 0])
        # the camera missing the post: the mean true range, straight ahead (what a fusion that knows nothing says)
        blind = (truth[:, 0].mean(), 0.0)
        h, w, _ = sensors.camera_image_shape
        resized = {f"{h}x{w}": None} | {t: tuple(map(int, t.split("x"))) for t in args.token_sizes if t != f"{h}x{w}"}
        for name, hw in resized.items():
            readings = [camera_reading(s["image"] if hw is None else
                                       cv2.resize(s["image"], hw[::-1], interpolation=cv2.INTER_AREA),
                                       sensors.camera_views, sensors.camera_yaws_deg) for s in samples]
            how = ["none" if r is None else r[2] for r in readings]
            cam = np.array([blind if r is None else r[:2] for r in readings])
            cam_err = errors(cam, truth)
            # both: per quantity, the sensor that reads it better first and the other where it does not see
            camera_sees = np.array([r is not None for r in readings])
            orders = (errors(np.where(lidar_sees[:, None], lidar, cam), truth),
                      errors(np.where(camera_sees[:, None] | ~lidar_sees[:, None], cam, lidar), truth))
            both_err = np.stack([min(orders, key=lambda e: e[:, q].mean())[:, q] for q in range(2)], axis=1)
            lidar_err = errors(lidar[lidar_sees], truth[lidar_sees])
            row = {"samples": len(truth), "lidar_sees": float(lidar_sees.mean()),
                   "camera_how": {k: how.count(k) / len(how) for k in ("top", "patch", "cut off", "none")}}
            for q, unit in ((0, "range_m"), (1, "bearing_deg")):
                row[unit] = {"lidar_in_reach": {"lidar": summary(lidar_err[:, q]), "camera": summary(cam_err[lidar_sees, q])},
                             "all": {"both": summary(both_err[:, q]), "camera": summary(cam_err[:, q])}}
            report["readings"][f"view {size}, image {name}"] = row
            r, b = row["range_m"], row["bearing_deg"]
            print(f"| {size} | {name} | {len(truth)} | {lidar_sees.mean():.0%} | "
                  + " / ".join(f"{row['camera_how'][k]:.0%}" for k in ("top", "patch", "cut off", "none"))
                  + f" | {r['lidar_in_reach']['lidar']['mean']:.3f} / {r['lidar_in_reach']['camera']['mean']:.3f} m"
                  f" | {r['all']['both']['mean']:.3f} / {r['all']['camera']['mean']:.3f} m "
                  f"({r['all']['camera']['mean'] / r['all']['both']['mean']:.2f}x) | {b['all']['both']['mean']:.1f}"
                  f" / {b['all']['camera']['mean']:.1f}° |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
