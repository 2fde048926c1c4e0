"""Observability (issue #15): which sensor observes each supervised quantity, and how often two do.

    python benchmarks/observability.py [--episodes 8] [-o docs/OBSERVABILITY.md]

Held-out simulated episodes (Control and Navigate alternating, seeds 300000 + k: none of training's),
faults off, driven by the training data's smooth random policy (each command held 0.4-1.6 s at 50 Hz
control). At 10 Hz sample instants it decides, from the world's geometry, which of camera, lidar,
IMU and wheel odometry observes each quantity of `RobotEnv.ground_truth` (DEFINITIONS below), and counts the samples in
which at least two do. The camera columns are for the default rig (SensorConfig: 4 views, 360°); one
more column gives the single forward camera (camera_views=1, the camera before the rig) for comparison.
It also times 15 s of simulated Control episode with each camera. Writes the markdown report to -o
and the raw numbers beside it (.json). The report's section "How precisely: the goal" is
benchmarks/goal_range.py's, written in by hand: regenerating carries it over from the report it replaces.
"""

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

import fusion_attn.sim  # noqa: F401  (selects headless rendering before mujoco loads)

# isort: split
import mujoco

from fusion_attn.bench import machine
from fusion_attn.frames import NS_PER_S
from fusion_attn.sim.faults import FaultConfig
from fusion_attn.sim.robot import RobotEnv
from fusion_attn.sim.scene import build_mjcf
from fusion_attn.sim.sensors import (
    MARKER_GROUPS,
    RETROREFLECTIVE_INTENSITY,
    Lidar,
    SensorConfig,
    camera_name,
    geom_groups,
)

SEED0 = 300_000
TASKS = ("control", "navigate")
SECTORS = 16
SAMPLE_STEPS = 5  # control steps (50 Hz) per sample: 10 Hz
CAMERA_RANGE_M = 8.0  # beyond it an obstacle's foot is a few pixels: too far to range from the image
MIN_RETURNS = 20  # lidar returns a sweep needs for scan matching
ACCEL_WINDOW_S = 0.25
ACCEL_MIN = 0.2  # m/s^2: |forward acceleration| above it tells the IMU the speed is changing
POST_END_M = 0.05  # the goal post's foot and top the camera looks for: this far inside its ends
SENSORS = ("camera", "lidar", "imu", "odometry")  # odometry: a model built with --odometry reads it
FORWARD = "75° forward camera"  # the comparison column: the camera before the rig
QUANTITIES = ("forward speed", "yaw rate", *[f"obstacles, sector {s}" for s in range(SECTORS)], "goal")
ALL_SECTORS = "obstacles, all sectors"
LIDAR_RANGE_M = SensorConfig().lidar_max_range_m
SOLID = geom_groups(*MARKER_GROUPS)  # what the robot can hit
EDGE = 1.0 + 1e-9  # a point on the seam of two views lies on both (rounding puts it just outside)

DEFINITIONS = f"""\
A sample is one 10 Hz instant; "observes" is decided from the world's geometry at that instant
(with exact copies of the sensors' rays), not from what a model makes of the data:

- **goal** (distance and bearing; both tasks have one): the *camera* observes it when the goal
  post's foot or top ({POST_END_M:g} m inside its ends, on its axis) projects inside one view's
  image (the rig covers every azimuth; the elevation must fall within the view) and the line of
  sight from that view's camera to it meets no colliding geom (mj_ray). Either gives the bearing,
  and the range: where the foot meets the floor, or the elevation of the top of a post of known
  height. The *lidar* observes it when at least one return of a sweep taken at that instant hits
  the post (intensity {RETROREFLECTIVE_INTENSITY:.0f}: only a retroreflector returns it); the *IMU* never.
- **obstacle distance, per sector** ({SECTORS} sectors, sector 0 centred straight ahead,
  counter-clockwise): the *lidar* observes it when the sweep has a return (not from the goal post)
  within its {LIDAR_RANGE_M:g} m range in the sector; the *camera* when the sector's centre ray
  from the lidar meets a colliding geom within {CAMERA_RANGE_M:g} m, the foot of that point on the
  floor projects inside a view's image (below the horizon and not below the view's lower edge),
  and the line of sight from that view's camera to the point meets that geom first; the *IMU*
  never.
- **yaw rate**: the *IMU*'s gyro always; the *lidar* from consecutive sweeps (ego-motion by scan
  matching) when the previous sample exists and both sweeps have at least {MIN_RETURNS} returns;
  the *camera* from consecutive frames when the previous sample exists (the surround rig always
  has structure in view: walls, obstacles, the checkered floor).
- **forward speed**: the *IMU* measures acceleration, not speed, and integrating it drifts: it
  counts only in samples where the true |forward acceleration| exceeded {ACCEL_MIN:g} m/s^2 at some
  control step in the last {ACCEL_WINDOW_S:g} s (the speed is changing, and the accelerometer says by
  how much). The *lidar* and the *camera* observe it from consecutive frames, as the yaw rate.
- **wheel odometry** (the fourth sensor of a model built with `--odometry`) reads forward speed and
  yaw rate in every sample (its twist, at 50 Hz; `benchmarks/sim_odometry.py` measures how well),
  and nothing else.
"""

REPORT = """\
# Observability: which sensors observe each supervised quantity

Issue #15 part 1, a world with redundancy: every quantity the model learns
(`RobotEnv.ground_truth`: forward speed, yaw rate, free distance in 16 sectors, goal distance and
bearing) should be observed by at least two sensors in most samples, so that there is something to
fuse and a faulty sensor can be told from a working one. The simulated world has a 360° camera rig
(4 square views of 90° on a mast, stitched into one 64 x 256 panorama with straight ahead in the
middle, plus pixel noise) and a 2 m retroreflective post at the goal that camera and lidar both see
(the lidar at intensity 255, any other surface at most 200); the robot drives through the post, and
obstacle ground truth ignores it.

    {command}

Date: {date}. Machine: {machine}.
{episodes} held-out episodes ({counts}; seeds {seed0} + k), {samples} samples at 10 Hz
({simulated_s:.0f} s simulated), faults off, driven by the training data's smooth random policy (each
command held 0.4-1.6 s).

## Definitions

{definitions}
## Measured

Share of samples in which each sensor observes the quantity; `>= 2`, `exactly 1` and `none` count
camera, lidar, IMU and odometry (for speed and yaw rate odometry makes a second observer only in an
episode's first sample, which has no previous frame to see motion in). The last column is the single {forward} (camera_views=1: the camera
before the rig) in the same samples and world, for comparison. Before the goal post, the lidar never
observed the goal: its rays passed through the floor patch that marked it.

{table}

The share of samples with at least two observers, per task:

{per_task}

Where a quantity has a single observer:

{single}

Reading it:

- The lidar observes the goal only within its {lidar_range:g} m range and when no obstacle stands in
  between; Navigate's goal starts 6.4-11.9 m away across 14 obstacles, so there the camera, which sees
  the 2 m post over any obstacle (at most 1 m tall), is often its only observer. A second observer
  there would take a longer-range lidar (the label's {lidar_range:g} m cap could stay) or another goal sensor.
- The camera misses an obstacle when the foot of its nearest point lies under the views' lower edge
  (within about 0.6 m of the mast: the robot is pushing against it) or when nothing lies within
  {camera_range:g} m along the sector's centre ray (Navigate's far corners), where the lidar may still
  have a return elsewhere in the sector.
- The IMU alone does not observe forward speed: only changes of it, while it is accelerating. The
  second observer of speed and yaw rate is ego-motion from consecutive camera or lidar frames, which
  a model has to compute from two frames, not read off one.
- The 75° forward camera column is what the camera saw before the rig: 3 of 16 sectors, and the goal
  only when it lay ahead.

## Cost of the camera rig

Wall time of 15 s of simulated Control episode (reset + 750 control steps at 50 Hz, physics at
200 Hz, camera and lidar at 10 Hz, IMU at 200 Hz, faults off, random commands), for each camera in
the same run, interleaved:

| camera | seconds per repeat (sorted) | median |
|---|---|---|
{timing}

Rendering: {rendering}.
"""


class Probe:
    """A copy of the episode's world with a camera rig, posed like the env's robot: frustum and line of
    sight tests for the cameras, rays for the lidar (exact, at the instant itself)."""

    def __init__(self, env: RobotEnv, sensors: SensorConfig):
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(env.layout, sensors, env.dt_ns / NS_PER_S))
        self.data = mujoco.MjData(self.model)
        self.robot = self.model.body("robot").id
        self.cams = [self.model.camera(camera_name(i)).id for i in range(sensors.camera_views)]
        h, w = sensors.camera_size
        self.tan_y = [math.tan(math.radians(self.model.cam_fovy[c]) / 2) for c in self.cams]
        self.aspect = w / h
        self._geom = np.zeros(1, np.int32)

    def pose_as(self, env: RobotEnv) -> None:
        self.data.qpos[:] = env.data.qpos
        self.data.mocap_pos[:] = env.data.mocap_pos
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_camlight(self.model, self.data)

    def view_of(self, point: np.ndarray) -> int | None:
        """The camera (id) of the first view whose image contains the world point, or None."""
        for cam, tan_y in zip(self.cams, self.tan_y):
            x, y, z = self.data.cam_xmat[cam].reshape(3, 3).T @ (point - self.data.cam_xpos[cam])
            depth = -z  # a MuJoCo camera looks along its -z
            if depth > 0 and abs(y) <= depth * tan_y * EDGE and abs(x) <= depth * tan_y * self.aspect * EDGE:
                return cam
        return None

    def first_hit(self, start: np.ndarray, end: np.ndarray) -> tuple[float, int]:
        """(fraction of the way from start to end, geom id) of the first colliding geom on the ray (beyond
        end too); -1 for none."""
        x = mujoco.mj_ray(self.model, self.data, start, end - start, SOLID, 1, self.robot, self._geom)
        return x, int(self._geom[0])

    def camera_sees(self, point: np.ndarray) -> bool:
        """Is the world point inside a view, with nothing the robot can hit on the line of sight?"""
        if (cam := self.view_of(point)) is None:
            return False
        x, _ = self.first_hit(self.data.cam_xpos[cam], point)
        return x < 0 or x >= 1.0

    def camera_sees_obstacles(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Per horizontal direction from origin (the lidar): does a camera see the obstacle it meets first?"""
        seen = np.zeros(len(directions), bool)
        for i, vec in enumerate(directions):
            dist, geom = self.first_hit(origin, origin + CAMERA_RANGE_M * vec)
            if dist < 0 or dist > 1.0:
                continue
            point = origin + dist * CAMERA_RANGE_M * vec
            if (cam := self.view_of(np.array([point[0], point[1], 0.0]))) is not None:
                seen[i] = self.first_hit(self.data.cam_xpos[cam], point)[1] == geom
        return seen


def observe_episode(task: str, seed: int) -> dict:
    """-> "observed" (samples, quantities, camera/lidar/IMU/forward camera) bool for one episode."""
    env = RobotEnv(task, faults=FaultConfig())
    sensors = env.sensors
    forward_cfg = dataclasses.replace(sensors, camera_views=1)
    rng = np.random.default_rng(seed)
    _, info = env.reset(seed=seed)
    rig, forward = Probe(env, sensors), Probe(env, forward_cfg)
    lidar = Lidar(rig.model, dataclasses.replace(sensors, lidar_noise_m=0.0), np.random.default_rng(0))
    site = rig.model.site("lidar").id
    (post_geom,) = [g for g in env.layout.geoms if g.retroreflective]
    post_ends = [np.array([*post_geom.pos[:2], post_geom.pos[2] + s * (post_geom.size[1] - POST_END_M)])
                 for s in (-1, 1)]
    width = 2 * math.pi / SECTORS
    control_s = env.substeps * env.dt_ns / NS_PER_S
    speeds = [0.0]  # the robot's forward speed after each control step
    samples, prev_returns, action, hold = [], None, None, 0
    try:
        for step in itertools.count(1):
            if hold <= 0:
                action = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
                hold = int(rng.integers(20, 80))  # control steps at 50 Hz, as learn.data.sim_episode
            hold -= 1
            _, _, terminated, truncated, info = env.step(action)
            yaw = float(env.data.qpos[2])
            speeds.append(math.cos(yaw) * env.data.qvel[0] + math.sin(yaw) * env.data.qvel[1])
            if step % SAMPLE_STEPS == 0:
                rig.pose_as(env)
                forward.pose_as(env)
                points = lidar.capture(rig.data, 0).points
                post = points[:, 3] == RETROREFLECTIVE_INTENSITY
                sector = np.rint(np.arctan2(points[~post, 1], points[~post, 0]) / width).astype(int) % SECTORS
                centre = np.arange(SECTORS) * width + yaw
                rays = np.stack([np.cos(centre), np.sin(centre), np.zeros(SECTORS)], axis=1)
                origin = rig.data.site_xpos[site]
                has_prev = prev_returns is not None
                ego_lidar = has_prev and min(prev_returns, len(points)) >= MIN_RETURNS
                accel = np.abs(np.diff(speeds[-round(ACCEL_WINDOW_S / control_s) - 1:])) / control_s
                obs = np.zeros((len(QUANTITIES), len(SENSORS) + 1), bool)  # + the forward camera
                obs[0] = has_prev, ego_lidar, accel.max() > ACCEL_MIN, True, has_prev
                obs[1] = has_prev, ego_lidar, True, True, has_prev
                obs[2:2 + SECTORS, 0] = rig.camera_sees_obstacles(origin, rays)
                obs[2:2 + SECTORS, 1] = np.isin(np.arange(SECTORS), sector)
                obs[2:2 + SECTORS, -1] = forward.camera_sees_obstacles(origin, rays)
                obs[-1] = (any(map(rig.camera_sees, post_ends)), post.any(), False, False,
                           any(map(forward.camera_sees, post_ends)))
                samples.append(obs)
                prev_returns = len(points)
            if terminated or truncated:
                break
    finally:
        env.close()
    return {"observed": np.stack(samples), "seconds": info["time_ns"] / NS_PER_S}


def stepping_s(camera_views: int, seed: int) -> float:
    """Wall seconds for 15 s of simulated Control episode: reset + 750 control steps of random commands."""
    env = RobotEnv("control", sensors=SensorConfig(camera_views=camera_views), faults=FaultConfig())
    env.reset(seed=seed)  # not timed: the GL context's first use (shader compile) is not the episode's
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    env.reset(seed=seed)
    for _ in range(750):
        if env.step(rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32))[2]:
            env.reset()  # reached the goal: the next episode goes on
    seconds = time.perf_counter() - start
    env.close()
    return seconds


def virtual() -> bool:
    """Does the CPU report a hypervisor?"""
    try:
        return "hypervisor" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def gl_renderer() -> str:
    """The OpenGL implementation the camera renders with (llvmpipe: Mesa on the CPU)."""
    env = RobotEnv("control")
    env.reset(seed=0)  # makes the camera's GL context current on this thread
    from OpenGL import GL

    name = GL.glGetString(GL.GL_RENDERER).decode()
    env.close()
    return name


def _row(observed: np.ndarray) -> dict[str, float]:
    """observed (..., SENSORS then the forward camera) -> share of each sensor, of >= 2, exactly 1 and
    no observers (of SENSORS), and of each sensor being the only one."""
    own = observed[..., : len(SENSORS)]
    count = own.sum(axis=-1)
    row = {s: float(own[..., i].mean()) for i, s in enumerate(SENSORS)}
    row[FORWARD] = float(observed[..., len(SENSORS)].mean())
    for label, n in ((">= 2", count >= 2), ("exactly 1", count == 1), ("none", count == 0)):
        row[label] = float(n.mean())
    return row | {f"{s} alone": float((own[..., i] & (count == 1)).mean()) for i, s in enumerate(SENSORS)}


def summarise(observed: np.ndarray) -> dict[str, dict[str, float]]:
    """Per quantity (and all obstacle sectors together), `_row` over the samples."""
    out = {name: _row(observed[:, q]) for q, name in enumerate(QUANTITIES)}
    out[ALL_SECTORS] = _row(observed[:, 2:2 + SECTORS])
    return out


def _label(name: str) -> str:
    if name == ALL_SECTORS:
        return f"**{name}**"
    if "sector " not in name:
        return name
    s = int(name.rsplit(" ", 1)[1])
    return f"{name} ({(s * 360 / SECTORS + 180) % 360 - 180:+.1f}°)"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def to_markdown(report: dict) -> str:
    cols = [*SENSORS, ">= 2", "exactly 1", "none", FORWARD]
    table = ["| quantity | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    table += [f"| {_label(q)} | " + " | ".join(_pct(row[c]) for c in cols) + " |"
              for q, row in report["all"].items()]
    shown = ("forward speed", "yaw rate", ALL_SECTORS, "goal")
    per_task = ["| task | episodes | samples | " + " | ".join(shown) + " |",
                "|---|---|---|" + "---|" * len(shown)]
    per_task += [f"| {task} | {t['episodes']} | {t['samples']} | "
                 + " | ".join(_pct(t["summary"][q][">= 2"]) for q in shown) + " |"
                 for task, t in report["per_task"].items()]
    single = []
    for q in shown:
        row = report["all"][q]
        alone = ", ".join(f"{s} alone {_pct(row[f'{s} alone'])}" for s in SENSORS
                          if row[f"{s} alone"] >= 0.005)
        one = _pct(row["exactly 1"]) + (f" ({alone})" if alone else "")
        single.append(f"- {q}: at least two in {_pct(row['>= 2'])} of samples; one in {one}, "
                      f"none in {_pct(row['none'])}")
    worst = min((q for q in report["all"] if "sector " in q), key=lambda q: report["all"][q][">= 2"])
    single.append(f"- the worst of them, {_label(worst)}: at least two in "
                  f"{_pct(report['all'][worst]['>= 2'])} of samples")
    single += [f"- {q} in {task} episodes: at least two in only {_pct(t['summary'][q]['>= 2'])} of samples"
               for task, t in report["per_task"].items() for q in shown if t["summary"][q][">= 2"] < 0.5]
    cameras = {"1": "one 75° forward camera (camera_views=1)", "4": "the 360° rig (camera_views=4)"}
    timing = [f"| {cameras[v]} | {', '.join(f'{x:.2f}' for x in sorted(times))} | {np.median(times):.2f} |"
              for v, times in report["timing_s"].items()]
    counts = ", ".join(f"{task} x {t['episodes']}" for task, t in report["per_task"].items())
    return REPORT.format(
        **{k: report[k] for k in ("command", "date", "machine", "episodes", "samples", "simulated_s",
                                  "rendering")},
        counts=counts, seed0=SEED0, lidar_range=LIDAR_RANGE_M, camera_range=CAMERA_RANGE_M,
        definitions=DEFINITIONS, forward=FORWARD, table="\n".join(table), per_task="\n".join(per_task),
        single="\n".join(single), timing="\n".join(timing))


HAND_WRITTEN, AFTER_IT = "## How precisely: the goal", "## Cost of the camera rig"


def with_hand_written(markdown: str, previous: Path) -> str:
    """`markdown` with the hand-written section of the report it replaces (if that has one) put back in
    its place, before AFTER_IT."""
    old = previous.read_text() if previous.exists() else ""
    if HAND_WRITTEN not in old:
        return markdown
    start = old.index(HAND_WRITTEN)
    end = old.find("\n## ", start + len(HAND_WRITTEN))
    section = old[start:] if end < 0 else old[start:end + 1]
    return markdown.replace(AFTER_IT, section.rstrip("\n") + "\n\n" + AFTER_IT, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per camera")
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/OBSERVABILITY.md"))
    args = parser.parse_args()

    runs = []
    for k in range(args.episodes):
        task = TASKS[k % len(TASKS)]
        runs.append((task, observe_episode(task, SEED0 + k)))
        print(f"episode {k} ({task}): {len(runs[-1][1]['observed'])} samples", flush=True)
    observed = np.concatenate([r["observed"] for _, r in runs])
    per_task = {}
    for task in TASKS:
        mine = [r["observed"] for t, r in runs if t == task]
        if mine:
            joined = np.concatenate(mine)
            per_task[task] = {"episodes": len(mine), "samples": len(joined), "summary": summarise(joined)}
    timing = {"1": [], "4": []}
    for r in range(args.repeats):  # interleaved, so that a slow spell of the machine hits both
        for views, times in timing.items():
            times.append(stepping_s(int(views), SEED0 + r))
    report = {
        "command": f"MUJOCO_GL={os.environ['MUJOCO_GL']} python benchmarks/observability.py "
                   f"--episodes {args.episodes} -o {args.out}",
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine()}, mujoco {version('mujoco')}" + (", a virtual machine" if virtual() else ""),
        "rendering": f"MUJOCO_GL={os.environ['MUJOCO_GL']}, {gl_renderer()}",
        "episodes": args.episodes,
        "episodes_per_task": {t: p["episodes"] for t, p in per_task.items()},
        "samples": len(observed),
        "simulated_s": sum(r["seconds"] for _, r in runs),
        "sensors": dataclasses.asdict(SensorConfig()),
        "all": summarise(observed),
        "per_task": per_task,
        "timing_s": timing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(with_hand_written(to_markdown(report), args.out))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
