"""Typed sensor frames: the one data shape every front-end produces and the core consumes.

Stamps are integer nanoseconds (ROS `sec * 1e9 + nanosec`) so that replay is exact and
deterministic; ages and windows are float seconds. Arrays are numpy, native byte order.
REP-103 conventions: metres, m/s^2, rad/s, x forward, y left, z up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

NS_PER_S = 1_000_000_000


class Modality(IntEnum):
    """Order of the modalities everywhere: token blocks, attention mass, masks."""

    CAMERA = 0
    LIDAR = 1
    IMU = 2
    ODOMETRY = 3  # wheel odometry's twist; a model reads it only when built to (FusionConfig.sensors)
    IMU2 = 4  # a second IMU (ImuSample frames, told apart by their topic); read only when built to, as odometry


MODALITIES: tuple[str, ...] = tuple(m.name.lower() for m in Modality)


def kind_of(modality: Modality) -> Modality:
    """The modality whose messages and frames this one takes: a second IMU's are an IMU's."""
    return Modality.IMU if modality is Modality.IMU2 else modality

# Encodings a CameraFrame may carry after adaptation (colour is always converted to rgb8), and the
# dtype of its image in each.
CAMERA_ENCODINGS = {"rgb8": np.uint8, "mono8": np.uint8, "mono16": np.uint16, "16UC1": np.uint16, "32FC1": np.float32}


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (rclpy or rosbags) -> integer nanoseconds."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


@dataclass(frozen=True, slots=True)
class CameraFrame:
    stamp_ns: int
    frame_id: str
    image: np.ndarray  # (H, W, C): uint8 rgb8 (C=3) / mono8 (C=1), uint16 mono16 or 16UC1 depth [mm], float32 32FC1 depth [m]
    encoding: str  # one of CAMERA_ENCODINGS

    @property
    def is_depth(self) -> bool:
        return self.encoding in ("16UC1", "32FC1")


@dataclass(frozen=True, slots=True)
class LidarFrame:
    stamp_ns: int
    frame_id: str
    points: np.ndarray  # (N, 4) float32: x, y, z [m], intensity (0 when the sensor gives none); all finite
    ring: np.ndarray | None = None  # (N,) uint16 laser ring, when the cloud has one
    time: np.ndarray | None = None  # (N,) float32 per-point time [s] from the cloud's earliest point, when it has one

    def __len__(self) -> int:
        return int(self.points.shape[0])


@dataclass(frozen=True, slots=True)
class ImuSample:
    stamp_ns: int
    frame_id: str
    accel: np.ndarray  # (3,) float64 linear acceleration [m/s^2]
    gyro: np.ndarray  # (3,) float64 angular velocity [rad/s]
    orientation: np.ndarray | None = None  # (4,) x, y, z, w; None when the driver flags it unknown


@dataclass(frozen=True, slots=True)
class ImuWindow:
    """Consecutive IMU samples, oldest first, as kept by the sensor sync."""

    frame_id: str
    stamps_ns: np.ndarray  # (T,) int64, strictly increasing
    accel: np.ndarray  # (T, 3) float64
    gyro: np.ndarray  # (T, 3) float64
    orientation: np.ndarray | None = None  # (T, 4) when every sample knew it

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])

    @classmethod
    def from_samples(cls, samples: list[ImuSample]) -> ImuWindow:
        if not samples:
            return cls("", np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3)))
        known = all(s.orientation is not None for s in samples)
        return cls(
            frame_id=samples[-1].frame_id,
            stamps_ns=np.array([s.stamp_ns for s in samples], np.int64),
            accel=np.stack([s.accel for s in samples]),
            gyro=np.stack([s.gyro for s in samples]),
            orientation=np.stack([s.orientation for s in samples]) if known else None,
        )


@dataclass(frozen=True, slots=True)
class OdometrySample:
    """A twist from wheel odometry (nav_msgs/Odometry), in the robot's base frame (child_frame_id)."""

    stamp_ns: int
    frame_id: str  # the base frame the twist is expressed in
    linear: np.ndarray  # (3,) float64 velocity [m/s]
    angular: np.ndarray  # (3,) float64 angular velocity [rad/s]


@dataclass(frozen=True, slots=True)
class OdometryWindow:
    """Consecutive odometry twists, oldest first, as kept by the sensor sync."""

    frame_id: str
    stamps_ns: np.ndarray  # (T,) int64, strictly increasing
    linear: np.ndarray  # (T, 3) float64
    angular: np.ndarray  # (T, 3) float64

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])


@dataclass(frozen=True, slots=True)
class FusedState:
    """What the fusion produces for one instant; every front-end publishes or consumes this."""

    stamp_ns: int  # the time the fusion refers to
    frame_id: str
    pooled: np.ndarray  # (D,) float32 fused state vector
    latents: np.ndarray  # (M, D) float32 fusion tokens after the latent blocks
    # per sensor: S of the model's (`sensors`)
    attention: np.ndarray  # (S, H) float32 attention mass per sensor and head (columns sum to 1 unless all masked)
    present: np.ndarray  # (S,) bool: sensor had at least one valid token
    ages_s: np.ndarray  # (S,) float32 age of each sensor's newest data at stamp_ns (nan when absent)
    tau: np.ndarray  # (1 + S,) float32: global, then per sensor
    all_masked: bool = False  # no sensor contributed: the state is the model's defined empty output
    timings_ms: dict[str, float] = field(default_factory=dict)
    # (S,) float32 the model's trust in each sensor's content, in [0, 1]: near 1 healthy, near 0 failed
    # (black, frozen, noisy, occluded); exactly 0 for an absent one. None: a model without a trust output
    trust: np.ndarray | None = None
    sensors: tuple[str, ...] = MODALITIES[:3]  # the sensors its per-sensor arrays follow: the model's (FusionConfig.sensor_names)
    # (2,) float32 the fusion's own ego-motion: speed [m/s] and yaw rate [rad/s] (ModelConfig.rate_output);
    # None: a model without that output
    ego_rate: np.ndarray | None = None

    @property
    def modality_attention(self) -> np.ndarray:
        """(S,) attention mass per sensor, averaged over heads."""
        return self.attention.mean(axis=1)
