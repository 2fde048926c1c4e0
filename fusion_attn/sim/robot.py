"""`RobotEnv`: a Gymnasium env of a MuJoCo ground robot whose sensors emit the core's frame types.

One control step (default 50 Hz) runs several physics steps (default 200 Hz); every sensor is
sampled whenever its own period has elapsed (camera 10 Hz, lidar 10 Hz, IMU 200 Hz by default), on
simulated time in integer nanoseconds from 0 at reset. The frames go through the episode's faults
and are delivered (late, under a delay fault) in `info["frames"]`, which a front-end feeds to
`SensorSync.add` exactly like frames adapted from ROS messages (see wrappers.FusedObservation).

Actions: Box (v [m/s], omega [rad/s]) within V_RANGE x OMEGA_RANGE, or with discrete=True an index
into DISCRETE_ACTIONS; the drive ramps to the command within its limits (DRIVE_ACCEL). Until the
task's hold_s the robot is held: commands are ignored.
Observation: a Dict of fixed-size arrays made from the delivered frames:

    image  (H, W, 3) uint8    the newest camera image (zeros before the first): with the default rig a
                              360° panorama, straight ahead in the middle (SensorConfig.camera_views)
    lidar  (rings, beams) f32 the newest lidar sweep as ranges [m] (max range: no return)
    imu    (K, 6) f32         the newest K IMU samples, oldest first: accel [m/s^2], gyro [rad/s];
                              K = IMU samples per control step
    ages   (3,) f32           age [s] of the newest camera, lidar, IMU data, at most AGE_CAP_S
    task   (task.obs_dim,)    the task's own part (tasks.py)

info: "frames" (a FrameList of the frames delivered during the step, in arrival order: stamp order
unless a delay fault holds some back), "faults" ({name: magnitude} of the faults active during the
step), "time_ns" (simulated time at the end of the step), "pose" (ground truth x, y [m], yaw [rad]
in (-pi, pi]), "goal" (the task's goal x, y [m] in the arena, where it has one: ground truth an
agent may learn to predict in training, never an observation), and the task's keys ("is_success",
...). An episode is truncated after the task's episode_s of simulated time.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from fusion_attn.frames import NS_PER_S, CameraFrame, ImuSample, LidarFrame, Modality, OdometrySample
from fusion_attn.sync import MODALITY_OF

from .faults import FaultConfig, FaultInjector
from .scene import HIDDEN_POS, Layout, build_mjcf
from .sensors import MARKER_GROUPS, Camera, Imu, Lidar, Odometry, SensorConfig, geom_groups, lidar_ranges
from .tasks import TASKS, Task

V_RANGE = (-0.5, 1.0)  # m/s
OMEGA_RANGE = (-2.0, 2.0)  # rad/s
# stop, ahead, ahead left, ahead right, turn left, turn right, back
DISCRETE_ACTIONS = np.array([[0.0, 0.0], [0.8, 0.0], [0.8, 1.0], [0.8, -1.0], [0.0, 1.5], [0.0, -1.5],
                             [-0.4, 0.0]], np.float32)
DRIVE_ACCEL = (3.0, 10.0)  # the drive's limits: m/s^2 forward, rad/s^2 yaw
AGE_CAP_S = 10.0
SENSORS = ("camera", "lidar", "imu")


@dataclass
class _Schedule:
    name: str
    period_ns: int
    due_ns: int = 0


Frame = CameraFrame | LidarFrame | ImuSample | OdometrySample


class FrameList(Sequence):
    """The frames delivered in one step, in arrival order, and the sensor each came from (`modalities`:
    by its type, but a second IMU's samples are Modality.IMU2). Compares by content (frames hold arrays,
    so a plain list of them cannot be compared, which Gymnasium's env checker does with infos)."""

    __slots__ = ("_frames", "modalities")
    __hash__ = None

    def __init__(self, frames: Iterable[Frame] = (), modalities: Iterable[Modality] | None = None):
        self._frames = tuple(frames)
        self.modalities = (tuple(MODALITY_OF[type(f)] for f in self._frames) if modalities is None
                           else tuple(modalities))

    def __add__(self, other: FrameList) -> FrameList:
        return FrameList(self._frames + other._frames, self.modalities + other.modalities)

    def __getitem__(self, i):
        return self._frames[i]

    def __len__(self) -> int:
        return len(self._frames)

    def __eq__(self, other) -> bool:
        return (isinstance(other, FrameList) and len(self) == len(other) and self.modalities == other.modalities
                and all(map(_same_frame, self, other)))

    def __repr__(self) -> str:
        return f"FrameList({', '.join(f'{type(f).__name__}({f.stamp_ns})' for f in self._frames)})"


def _same_frame(a: Frame, b: Frame) -> bool:
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not (np.array_equal(x, y) if isinstance(x, np.ndarray) or isinstance(y, np.ndarray) else x == y):
            return False
    return True


def _ramp(value: float, target: float, max_change: float) -> float:
    return value + min(max(target - value, -max_change), max_change)


def _period_ns(hz: float) -> int:
    return round(NS_PER_S / hz)


class RobotEnv(gym.Env):
    def __init__(self, task: str | Task = "control", sensors: SensorConfig | None = None,
                 faults: FaultConfig | None = None, discrete: bool = False, control_hz: float = 50.0,
                 physics_hz: float = 200.0, task_options: dict | None = None):
        """task_options: keyword arguments of a task named by string, e.g. {"n_goals": 2} for memory
        (JSON-able, so a run's config.json rebuilds the same env)."""
        self.task = TASKS[task](**(task_options or {})) if isinstance(task, str) else task
        self.sensors = sensors or SensorConfig()
        self.faults = faults or self.task.default_faults()
        self.dt_ns = _period_ns(physics_hz)
        control_ns = _period_ns(control_hz)
        if control_ns % self.dt_ns:
            raise ValueError(f"the control period ({control_ns} ns) is not a multiple of the physics step "
                             f"({self.dt_ns} ns)")
        self.substeps = control_ns // self.dt_ns
        rates = {"camera": self.sensors.camera_hz, "lidar": self.sensors.lidar_hz, "imu": self.sensors.imu_hz,
                 "odometry": self.sensors.odometry_hz, "imu2": self.sensors.imu2_hz}
        for name, hz in rates.items():
            if hz > physics_hz:
                raise ValueError(f"{name} rate {hz} Hz exceeds the physics rate {physics_hz} Hz")
        self._enabled = {name: hz > 0 for name, hz in rates.items()}
        self._schedule = [_Schedule(name, _period_ns(hz)) for name, hz in rates.items() if hz > 0]
        self.imu_window = max(1, -(-round(self.sensors.imu_hz) // round(control_hz)))

        s = self.sensors
        rings = len(s.lidar_elevations_deg)
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, s.camera_image_shape, np.uint8),
            "lidar": spaces.Box(0.0, s.lidar_max_range_m, (rings, s.lidar_beams), np.float32),
            "imu": spaces.Box(-np.inf, np.inf, (self.imu_window, 6), np.float32),
            "ages": spaces.Box(0.0, AGE_CAP_S, (3,), np.float32),
            "task": spaces.Box(-np.inf, np.inf, (self.task.obs_dim,), np.float32),
        })
        self.action_space = (spaces.Discrete(len(DISCRETE_ACTIONS)) if discrete else
                             spaces.Box(np.array([V_RANGE[0], OMEGA_RANGE[0]], np.float32),
                                        np.array([V_RANGE[1], OMEGA_RANGE[1]], np.float32)))
        self.model: mujoco.MjModel | None = None
        self._camera: Camera | None = None

    @property
    def action_table(self) -> np.ndarray | None:
        """(n, 2) (v, omega) of each discrete action; None for Box actions."""
        return DISCRETE_ACTIONS if isinstance(self.action_space, spaces.Discrete) else None

    # --- episode -------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """options: {"faults": FaultConfig or {name: FaultSpec}} replaces faults for this episode only."""
        super().reset(seed=seed)
        streams = np.random.SeedSequence(int(self.np_random.integers(2**63))).spawn(3)
        layout_rng, sensor_rng, fault_rng = (np.random.Generator(np.random.PCG64(s)) for s in streams)
        self.layout = self.task.new_episode(layout_rng)
        self._build(self.layout, sensor_rng)
        faults = self.faults.updated((options or {}).get("faults"))
        self.injector = FaultInjector(faults, self.sensors, fault_rng)

        self.time_ns = 0
        self._drive = (0.0, 0.0)  # the (v, omega) the drive runs at, ramping to the command
        self._pending: list[tuple[int, int, Frame]] = []
        self._seq = 0
        self._image = np.zeros(self.observation_space["image"].shape, np.uint8)
        self._ranges = lidar_ranges(None, self.sensors)
        self._imu = np.zeros((self.imu_window, 6), np.float32)
        self._imu_seen = False
        self._newest_ns: dict[str, int] = {}
        for sched in self._schedule:  # every sensor samples the initial state
            self._capture(sched.name, 0)
            sched.due_ns = sched.period_ns
        frames = self._deliver(0)
        pose = self._pose()
        info = {"frames": frames, "faults": self.injector.active(0, 1), "time_ns": 0, "pose": pose, **self._goal()}
        return self._observation(pose), info

    def _build(self, layout: Layout, rng: np.random.Generator) -> None:
        """A fresh model for the episode's layout, its sensors, and the robot at its start pose."""
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(layout, self.sensors, self.dt_ns / NS_PER_S))
        self.data = mujoco.MjData(self.model)
        self.data.qpos[:3] = layout.start
        mujoco.mj_forward(self.model, self.data)
        s = self.sensors
        if self._enabled["camera"]:
            self._camera = self._camera or Camera(s)
            self._camera.bind(self.model, rng)
        self._devices = {"camera": self._camera,
                         "lidar": Lidar(self.model, s, rng) if self._enabled["lidar"] else None,
                         "imu": Imu(self.model, s, rng) if self._enabled["imu"] else None,
                         # a stream of its own: the other sensors' draws stay what they were before it existed
                         "odometry": Odometry(s, rng.spawn(1)[0]) if self._enabled["odometry"] else None,
                         "imu2": Imu(self.model, s, rng.spawn(1)[0], "imu2") if self._enabled["imu2"] else None}
        self._to_hide = [(int(self.model.body(g.name).mocapid[0]), round(g.hide_at_s * NS_PER_S))
                         for g in layout.geoms if g.hide_at_s is not None]

    # --- stepping ------------------------------------------------------------------------------

    def step(self, action):
        v_cmd, omega_cmd = (DISCRETE_ACTIONS[int(action)] if isinstance(self.action_space, spaces.Discrete)
                            else np.clip(action, self.action_space.low, self.action_space.high)).tolist()
        dt = self.dt_ns / NS_PER_S
        v, omega = self._drive
        t0 = self.time_ns
        if t0 < self.task.hold_s * NS_PER_S:
            v_cmd = omega_cmd = 0.0
        m, d = self.model, self.data
        for mocap, at_ns in self._to_hide:
            if t0 >= at_ns:
                d.mocap_pos[mocap] = HIDDEN_POS
        for _ in range(self.substeps):
            v = _ramp(v, v_cmd, DRIVE_ACCEL[0] * dt)
            omega = _ramp(omega, omega_cmd, DRIVE_ACCEL[1] * dt)
            yaw = float(d.qpos[2])
            d.ctrl[:] = (v * math.cos(yaw), v * math.sin(yaw), omega)  # a differential drive's world velocity
            # mj_step computes every derived quantity (poses, sensordata) at the state it starts from,
            # then integrates: afterwards `d` describes time_ns, as a sensor due now must read it.
            mujoco.mj_step(m, d)
            for sched in self._schedule:
                if self.time_ns >= sched.due_ns:
                    self._capture(sched.name, self.time_ns)
                    sched.due_ns += sched.period_ns
            self.time_ns += self.dt_ns
        self._drive = (v, omega)
        frames = self._deliver(self.time_ns)
        pose = self._pose()
        t_s = self.time_ns / NS_PER_S
        reward, terminated, task_info = self.task.evaluate(pose, t_s)
        truncated = not terminated and t_s >= self.task.episode_s
        info = {"frames": frames, "faults": self.injector.active(t0, self.time_ns), "time_ns": self.time_ns,
                "pose": pose, **self._goal(), **task_info}
        return self._observation(pose), float(reward), bool(terminated), bool(truncated), info

    def _capture(self, name: str, t_ns: int) -> None:
        frame = getattr(self.injector, name)(self._devices[name].capture(self.data, t_ns))
        if frame is not None:
            heapq.heappush(self._pending, (t_ns + self.injector.delay_ns(name, t_ns), self._seq, frame,
                                           Modality[name.upper()]))
            self._seq += 1

    def _deliver(self, now_ns: int) -> FrameList:
        """Frames whose arrival time has come, in arrival order; the observation follows them."""
        frames, modalities = [], []
        while self._pending and self._pending[0][0] <= now_ns:
            _, _, frame, modality = heapq.heappop(self._pending)
            frames.append(frame)
            modalities.append(modality)
        imu = [f for f, m in zip(frames, modalities) if m is Modality.IMU]  # the observation's: the first IMU
        for f in frames:
            if isinstance(f, CameraFrame):
                self._image = f.image
            elif isinstance(f, LidarFrame):
                self._ranges = lidar_ranges(f, self.sensors)
        if imu:
            new = np.array([np.concatenate([s.accel, s.gyro]) for s in imu[-self.imu_window:]], np.float32)
            if not self._imu_seen:  # until the window fills, it starts with copies of the first sample
                self._imu = np.repeat(new[:1], self.imu_window, axis=0)
                self._imu_seen = True
            self._imu = np.concatenate([self._imu[len(new):], new])
        for f in frames:
            self._newest_ns[f.frame_id] = max(self._newest_ns.get(f.frame_id, 0), f.stamp_ns)
        return FrameList(frames, modalities)

    def ground_truth(self, sectors: int = 16, rays_per_sector: int = 4) -> dict[str, np.ndarray]:
        """The true state now, never through the sensors or their faults (training labels, evaluation):

            velocity  (2,) forward speed [m/s], yaw rate [rad/s] of the robot
            obstacles (sectors,) free distance [m] per horizontal sector around the lidar site, sector 0
                      centred straight ahead, counter-clockwise; the lidar's max range where nothing is hit;
                      only what the robot can hit counts (no marker, though the lidar sees the goal post)
            goal      (2,) distance [m] and bearing [rad] (left positive) of the task's goal (nan: none)
        """
        m, d = self.model, self.data
        yaw = float(d.qpos[2])
        vx, vy, omega = d.qvel[:3]
        velocity = np.array([math.cos(yaw) * vx + math.sin(yaw) * vy, omega])
        site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "lidar")
        n = sectors * rays_per_sector
        az = 2.0 * np.pi * (np.arange(n) + 0.5) / n - np.pi / sectors  # rays spread evenly over each sector
        rot = d.site_xmat[site].reshape(3, 3)
        vec = np.stack([np.cos(az), np.sin(az), np.zeros(n)], axis=1) @ rot.T
        dist, geomid = np.zeros(n), np.zeros(n, np.int32)
        groups = geom_groups(*MARKER_GROUPS)
        max_range = self.sensors.lidar_max_range_m
        mujoco.mj_multiRay(m, d, d.site_xpos[site], vec.ravel(), groups, 1, int(m.site_bodyid[site]), geomid, dist,
                           None, n, max_range)
        dist = np.where((dist >= 0) & (dist <= max_range), dist, max_range)
        goal = np.full(2, np.nan)
        if (target := self.task.goal()) is not None:
            dx, dy = target[0] - d.qpos[0], target[1] - d.qpos[1]
            bearing = math.atan2(dy, dx) - yaw
            goal[:] = math.hypot(dx, dy), math.atan2(math.sin(bearing), math.cos(bearing))
        return {"velocity": velocity, "obstacles": dist.reshape(sectors, rays_per_sector).min(axis=1), "goal": goal}

    def _goal(self) -> dict[str, np.ndarray]:
        goal = self.task.goal()
        return {} if goal is None else {"goal": np.array(goal, np.float32)}

    def _pose(self) -> np.ndarray:
        x, y, yaw = self.data.qpos[:3]
        return np.array([x, y, np.arctan2(np.sin(yaw), np.cos(yaw))])

    def _observation(self, pose: np.ndarray) -> dict[str, np.ndarray]:
        newest = [self._newest_ns.get(n) for n in SENSORS]
        ages = [AGE_CAP_S if t is None else min((self.time_ns - t) / NS_PER_S, AGE_CAP_S) for t in newest]
        return {"image": self._image.copy(), "lidar": self._ranges.copy(), "imu": self._imu.copy(),
                "ages": np.array(ages, np.float32), "task": self.task.observe(pose, self.time_ns / NS_PER_S)}

    def close(self) -> None:
        if self._camera is not None:
            self._camera.close()
            self._camera = None
