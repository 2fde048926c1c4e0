"""Sensor faults: one dataclass config, drawn into a per-episode schedule, applied to clean frames.

Each fault is a `FaultSpec`: the chance it happens in an episode, when (start and duration drawn
uniformly from ranges, in seconds of episode time) and how strongly (`magnitude`, per fault):

    camera_blackout   the image is all black                               -
    camera_freeze     the image repeats the last one before the fault      -
    camera_noise      gaussian pixel noise                                 std [8-bit levels]
    camera_dropout    no frame                                             -
    lidar_dropout     no frame                                             -
    lidar_freeze      the sweep repeats the last one before the fault      -
    lidar_sparse      a random subset of the points is kept                fraction kept
    lidar_spurious    extra points at random directions and ranges         points per frame
    imu_dropout       no sample                                            -
    imu_freeze        every sample repeats the reading before the fault    -
    imu_bias_jump     a constant offset, drawn once per episode            std [m/s^2] per accel axis
    imu_noise_burst   extra white noise                                    std [m/s^2]
    odometry_dropout  no twist                                             -
    odometry_freeze   every twist repeats the one before the fault         -
    imu2_dropout      the second IMU sends no sample                       -
    imu2_freeze       its samples repeat the reading before the fault      -
    {sensor}_delay    frames are delivered late; stamps stay capture time  delay [s]

IMU faults hit the gyro with GYRO_PER_ACCEL rad/s per m/s^2 of magnitude. A frame is affected when
it is captured inside the fault's window [start, start + duration); faults apply in the order above.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from fusion_attn.frames import NS_PER_S, CameraFrame, ImuSample, LidarFrame, OdometrySample

from .sensors import SensorConfig

GYRO_PER_ACCEL = 0.1  # rad/s of gyro fault per m/s^2 of IMU fault magnitude
NEVER_NS = 2**62  # the end of a window that lasts the whole episode


@dataclass(frozen=True)
class FaultSpec:
    prob: float = 0.0  # chance that the fault happens in an episode
    start_s: tuple[float, float] = (0.0, 0.0)  # uniform range of its start [s]
    duration_s: tuple[float, float] = (math.inf, math.inf)  # uniform range of its length [s]
    magnitude: float = 1.0

    @classmethod
    def window(cls, start_s: float = 0.0, duration_s: float = math.inf, magnitude: float = 1.0) -> FaultSpec:
        """A fault that always happens, at a fixed time."""
        return cls(1.0, (start_s, start_s), (duration_s, duration_s), magnitude)


@dataclass(frozen=True)
class FaultConfig:
    camera_blackout: FaultSpec = field(default_factory=FaultSpec)
    camera_freeze: FaultSpec = field(default_factory=FaultSpec)
    camera_noise: FaultSpec = field(default_factory=FaultSpec)
    camera_dropout: FaultSpec = field(default_factory=FaultSpec)
    lidar_dropout: FaultSpec = field(default_factory=FaultSpec)
    lidar_sparse: FaultSpec = field(default_factory=FaultSpec)
    lidar_spurious: FaultSpec = field(default_factory=FaultSpec)
    imu_dropout: FaultSpec = field(default_factory=FaultSpec)
    imu_bias_jump: FaultSpec = field(default_factory=FaultSpec)
    imu_noise_burst: FaultSpec = field(default_factory=FaultSpec)
    camera_delay: FaultSpec = field(default_factory=FaultSpec)
    lidar_delay: FaultSpec = field(default_factory=FaultSpec)
    imu_delay: FaultSpec = field(default_factory=FaultSpec)
    # appended: the schedule draws of the faults above stay what they were for a seed
    lidar_freeze: FaultSpec = field(default_factory=FaultSpec)
    imu_freeze: FaultSpec = field(default_factory=FaultSpec)
    # drawn after the IMU's bias jump (see FaultInjector), so every draw above stays what it was
    odometry_dropout: FaultSpec = field(default_factory=FaultSpec)
    odometry_freeze: FaultSpec = field(default_factory=FaultSpec)
    odometry_delay: FaultSpec = field(default_factory=FaultSpec)
    imu2_dropout: FaultSpec = field(default_factory=FaultSpec)
    imu2_freeze: FaultSpec = field(default_factory=FaultSpec)
    imu2_delay: FaultSpec = field(default_factory=FaultSpec)

    def updated(self, overrides: FaultConfig | dict[str, FaultSpec] | None) -> FaultConfig:
        """This config with some faults replaced (a whole FaultConfig, or {name: FaultSpec})."""
        if overrides is None:
            return self
        if isinstance(overrides, FaultConfig):
            return overrides
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class FaultWindow:
    start_ns: int
    end_ns: int
    magnitude: float


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    u = rng.random()  # always drawn, so one fault's settings never shift another's draws
    return lo if lo == hi else lo + (hi - lo) * u


def _to_ns(seconds: float) -> int:
    return NEVER_NS if math.isinf(seconds) else round(seconds * NS_PER_S)


class FaultInjector:
    """One episode's faults: the drawn schedule and the frame transformations."""

    def __init__(self, cfg: FaultConfig, sensors: SensorConfig, rng: np.random.Generator):
        self._sensors, self._rng = sensors, rng
        self.schedule: dict[str, FaultWindow] = {}
        names = [f.name for f in dataclasses.fields(cfg)]
        later = [n for n in names if n.startswith(("odometry_", "imu2_"))]  # the sensors added later, in order
        for name in [n for n in names if n not in later]:
            self._draw(name, getattr(cfg, name), rng)
        jump = rng.normal(0.0, 1.0, 6)
        for name in later:
            self._draw(name, getattr(cfg, name), rng)
        m = self.schedule["imu_bias_jump"].magnitude if "imu_bias_jump" in self.schedule else 0.0
        self._accel_jump, self._gyro_jump = m * jump[:3], m * GYRO_PER_ACCEL * jump[3:]
        self._last_image: np.ndarray | None = None
        self._held: np.ndarray | None = None  # the image a freeze repeats
        # a frozen lidar or IMU driver re-sends its last data with fresh stamps: what it last sent, and
        # what it holds while frozen
        self._last_sweep: LidarFrame | None = None
        self._held_sweep: LidarFrame | None = None
        # per sensor re-sending its readings (imu, odometry, imu2): the last one it sent, and the one a freeze holds
        self._last_reading: dict[str, ImuSample | OdometrySample | None] = dict.fromkeys(("imu", "odometry", "imu2"))
        self._held_reading: dict[str, ImuSample | OdometrySample | None] = dict.fromkeys(("imu", "odometry", "imu2"))

    def _draw(self, name: str, spec: FaultSpec, rng: np.random.Generator) -> None:
        happens = rng.random() < spec.prob
        start, duration = _uniform(rng, spec.start_s), _uniform(rng, spec.duration_s)
        if happens:
            start_ns = _to_ns(start)
            self.schedule[name] = FaultWindow(start_ns, min(start_ns + _to_ns(duration), NEVER_NS), spec.magnitude)

    def magnitude(self, name: str, t_ns: int) -> float | None:
        """The fault's magnitude when it is active at t_ns, else None."""
        w = self.schedule.get(name)
        return w.magnitude if w is not None and w.start_ns <= t_ns < w.end_ns else None

    def active(self, t0_ns: int, t1_ns: int) -> dict[str, float]:
        """{name: magnitude} of the faults active at some time in [t0, t1)."""
        return {n: w.magnitude for n, w in self.schedule.items() if w.start_ns < t1_ns and t0_ns < w.end_ns}

    def delay_ns(self, sensor: str, t_ns: int) -> int:
        delay = self.magnitude(f"{sensor}_delay", t_ns)
        return 0 if delay is None else round(delay * NS_PER_S)

    def camera(self, frame: CameraFrame) -> CameraFrame | None:
        t, image = frame.stamp_ns, frame.image
        if self.magnitude("camera_blackout", t) is not None:
            image = np.zeros_like(image)
        if self.magnitude("camera_freeze", t) is not None:
            if self._held is None:
                self._held = self._last_image if self._last_image is not None else image
            image = self._held
        else:
            self._held = None
        if (std := self.magnitude("camera_noise", t)) is not None:
            image = np.clip(image + self._rng.normal(0.0, std, image.shape), 0, 255).astype(np.uint8)
        self._last_image = image
        if self.magnitude("camera_dropout", t) is not None:
            return None
        return frame if image is frame.image else dataclasses.replace(frame, image=image)

    def lidar(self, frame: LidarFrame) -> LidarFrame | None:
        t = frame.stamp_ns
        if self.magnitude("lidar_dropout", t) is not None:
            return None
        if self.magnitude("lidar_freeze", t) is not None:
            if self._held_sweep is None:
                self._held_sweep = self._last_sweep if self._last_sweep is not None else frame
            frame = dataclasses.replace(frame, points=self._held_sweep.points, ring=self._held_sweep.ring)
        else:
            self._held_sweep = None
        points, ring = frame.points, frame.ring
        if (keep := self.magnitude("lidar_sparse", t)) is not None:
            idx = np.flatnonzero(self._rng.random(len(points)) < keep)
            points, ring = points[idx], ring[idx]
        if (count := self.magnitude("lidar_spurious", t)) is not None:
            n, cfg = int(count), self._sensors
            extra_ring = self._rng.integers(len(cfg.lidar_elevations_deg), size=n).astype(np.uint16)
            el = np.radians(np.asarray(cfg.lidar_elevations_deg))[extra_ring]
            az = self._rng.uniform(-np.pi, np.pi, n)
            r = self._rng.uniform(0.1, cfg.lidar_max_range_m, n)
            extra = np.stack([r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az), r * np.sin(el),
                              self._rng.uniform(0.0, 255.0, n)], axis=1).astype(np.float32)
            points, ring = np.concatenate([points, extra]), np.concatenate([ring, extra_ring])
        out = frame if points is frame.points else dataclasses.replace(frame, points=points, ring=ring)
        self._last_sweep = out
        return out

    def imu(self, sample: ImuSample) -> ImuSample | None:
        t = sample.stamp_ns
        if self.magnitude("imu_dropout", t) is not None:
            return None
        sample = self._frozen("imu", sample, ("accel", "gyro"))
        accel, gyro = sample.accel, sample.gyro
        if self.magnitude("imu_bias_jump", t) is not None:
            accel, gyro = accel + self._accel_jump, gyro + self._gyro_jump
        if (std := self.magnitude("imu_noise_burst", t)) is not None:
            noise = self._rng.normal(0.0, std, 6)
            accel, gyro = accel + noise[:3], gyro + GYRO_PER_ACCEL * noise[3:]
        return sample if accel is sample.accel else dataclasses.replace(sample, accel=accel, gyro=gyro)

    def odometry(self, sample: OdometrySample) -> OdometrySample | None:
        if self.magnitude("odometry_dropout", sample.stamp_ns) is not None:
            return None
        return self._frozen("odometry", sample, ("linear", "angular"))

    def imu2(self, sample: ImuSample) -> ImuSample | None:
        if self.magnitude("imu2_dropout", sample.stamp_ns) is not None:
            return None
        return self._frozen("imu2", sample, ("accel", "gyro"))

    def _frozen(self, sensor: str, sample, values: tuple[str, str]):
        """While <sensor>_freeze is on: the sample with the values of the one sent before the fault began
        (its stamp fresh: a driver re-sending its last reading); else the sample."""
        if self.magnitude(f"{sensor}_freeze", sample.stamp_ns) is None:
            self._held_reading[sensor] = None
        else:
            held = self._held_reading[sensor]
            if held is None:
                last = self._last_reading[sensor]
                held = self._held_reading[sensor] = last if last is not None else sample
            sample = dataclasses.replace(sample, **{v: getattr(held, v) for v in values})
        self._last_reading[sensor] = sample
        return sample
