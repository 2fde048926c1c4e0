"""Record simulated episodes as a rosbag2 MCAP (`fusion-attn sim-record`), for the replay tool.

Topics: /camera/image_raw (sensor_msgs/Image rgb8), /lidar/points (PointCloud2), /imu/data (Imu),
/odom (nav_msgs/Odometry: the simulated wheel odometry's twist, as a base controller publishes it; its
pose is left at the origin), /imu2/data (Imu, a second IMU, when the rig has one), and the ground truth at each control step: /ground_truth/pose
(geometry_msgs/PoseStamped of base_link in odom, the world frame) and /tf (odom -> base_link). The truth
is no sensor type, so replay never takes it for the odometry. Episodes follow each other on one clock: episode k starts
one second after episode k-1 ended, so a recording never goes back in time.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer

import fusion_attn.sim  # noqa: F401 - registers the ids (and picks the headless GL backend)
from fusion_attn.errors import ConfigError
from fusion_attn.frames import NS_PER_S, Modality, OdometrySample
from fusion_attn.messages import TYPES, cdr, header, image_msg, imu_msg, pointcloud2_msg

_T = TYPES.types


def record(env_id: str, out: str | Path, episodes: int = 1, seconds: float | None = None, seed: int = 0) -> dict:
    """Run `episodes` episodes with random actions (seeded) and write them; -> counts per topic. The bag is
    written aside and moved to OUT when complete: a run that fails or is stopped leaves no bag."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; rosbag2 writes a new folder")
    if episodes < 1 or (seconds is not None and not (math.isfinite(seconds) and seconds > 0)):
        raise ConfigError(f"--episodes {episodes} must be >= 1 and --seconds {seconds} finite and > 0")
    try:
        env = gym.make(env_id)
    except ImportError as exc:  # MODULE:EnvId with no such module
        raise ConfigError(f"{env_id}: {exc}") from exc
    aside = out.with_name(f".{out.name}.partial")  # the bag under its own name in there: its files name it
    shutil.rmtree(aside, ignore_errors=True)  # a run stopped before its end leaves one
    aside.mkdir(parents=True)
    try:
        counts = _record(env, aside / out.name, episodes, seconds, seed)
        (aside / out.name).rename(out)
    finally:
        env.close()
        shutil.rmtree(aside, ignore_errors=True)
    return counts


def _record(env, out: Path, episodes: int, seconds: float | None, seed: int) -> dict:
    env.action_space.seed(seed)
    counts: dict[str, int] = {}
    offset_ns = 0
    with Writer(out, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {topic: writer.add_connection(topic, msgtype, typestore=TYPES)
                 for m, (topic, msgtype, _) in TOPICS.items() if m is not Modality.IMU2}
        conns["/ground_truth/pose"] = writer.add_connection("/ground_truth/pose", "geometry_msgs/msg/PoseStamped",
                                                            typestore=TYPES)
        conns["/tf"] = writer.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=TYPES)

        def write(topic: str, stamp_ns: int, msg) -> None:
            if topic not in conns:  # a second IMU's, at its first sample: a rig without one records no topic for it
                conns[topic] = writer.add_connection(topic, msg.__msgtype__, typestore=TYPES)
            writer.write(conns[topic], stamp_ns, cdr(msg))
            counts[topic] = counts.get(topic, 0) + 1

        for episode in range(episodes):
            _, info = env.reset(seed=seed + episode)
            if "frames" not in info:
                raise ConfigError(f"{env.spec.id if env.spec else env}: not a FusionAttn env (its info has no "
                                  "sensor frames to record)")
            for frame, modality in zip(info["frames"], info["frames"].modalities):
                _write_frame(write, frame, modality, offset_ns)
            end_ns = int(seconds * NS_PER_S) if seconds else None
            done = False
            while not done:
                _, _, terminated, truncated, info = env.step(env.action_space.sample())
                done = terminated or truncated or (end_ns is not None and info["time_ns"] >= end_ns)
                for frame, modality in zip(info["frames"], info["frames"].modalities):
                    _write_frame(write, frame, modality, offset_ns)
                t = info["time_ns"]
                write("/ground_truth/pose", offset_ns + t, ground_truth_msg(offset_ns + t, info["pose"]))
                write("/tf", offset_ns + t, tf_msg(offset_ns + t, info["pose"]))
            offset_ns += info["time_ns"] + NS_PER_S
    return counts


def _write_frame(write, frame, modality: Modality, offset_ns: int) -> None:
    topic, _, to_msg = TOPICS[modality]
    stamp = frame.stamp_ns + offset_ns
    write(topic, stamp, to_msg(dataclasses.replace(frame, stamp_ns=stamp)))


def odometry_msg(sample: OdometrySample):
    """nav_msgs/Odometry of the simulated wheel odometry: its twist in base_link (REP-103); the pose at the
    origin (fusion_attn reads the twist; the truth is ground_truth_msg's)."""
    vec, cov = _T["geometry_msgs/msg/Vector3"], np.zeros(36)
    pose_msg = _T["geometry_msgs/msg/PoseWithCovariance"](
        _T["geometry_msgs/msg/Pose"](_T["geometry_msgs/msg/Point"](0.0, 0.0, 0.0), _yaw_quaternion(0.0)), cov)
    twist = _T["geometry_msgs/msg/TwistWithCovariance"](
        _T["geometry_msgs/msg/Twist"](vec(*map(float, sample.linear)), vec(*map(float, sample.angular))), cov)
    return _T["nav_msgs/msg/Odometry"](header(sample.stamp_ns, "odom"), sample.frame_id, pose_msg, twist)


def ground_truth_msg(stamp_ns: int, pose):
    """geometry_msgs/PoseStamped: the robot's true pose (x, y, yaw) in odom, the simulated world's frame."""
    x, y, yaw = map(float, pose)
    return _T["geometry_msgs/msg/PoseStamped"](
        header(stamp_ns, "odom"), _T["geometry_msgs/msg/Pose"](_T["geometry_msgs/msg/Point"](x, y, 0.0), _yaw_quaternion(yaw)))


def tf_msg(stamp_ns: int, pose):
    """tf2_msgs/TFMessage with the odom -> base_link transform."""
    x, y, yaw = map(float, pose)
    transform = _T["geometry_msgs/msg/Transform"](_T["geometry_msgs/msg/Vector3"](x, y, 0.0), _yaw_quaternion(yaw))
    return _T["tf2_msgs/msg/TFMessage"]([_T["geometry_msgs/msg/TransformStamped"](header(stamp_ns, "odom"), "base_link", transform)])


def _yaw_quaternion(yaw: float):
    return _T["geometry_msgs/msg/Quaternion"](0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


# each simulated sensor's topic, message type and message (the sim bridge publishes the same)
TOPICS = {Modality.CAMERA: ("/camera/image_raw", "sensor_msgs/msg/Image", image_msg),
          Modality.LIDAR: ("/lidar/points", "sensor_msgs/msg/PointCloud2", pointcloud2_msg),
          Modality.IMU: ("/imu/data", "sensor_msgs/msg/Imu", imu_msg),
          Modality.ODOMETRY: ("/odom", "nav_msgs/msg/Odometry", odometry_msg),
          Modality.IMU2: ("/imu2/data", "sensor_msgs/msg/Imu", imu_msg)}
