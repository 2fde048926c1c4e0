"""Frames and outputs -> standard ROS 2 messages (the inverse of `adapters`), built once.

Messages are `rosbags` objects, written to bags as they are; `to_rclpy` turns one into the rclpy
message of the same type through its CDR bytes, so the live front-ends publish the same messages
without a second converter.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
from rosbags.typesys import Stores, get_typestore

from .frames import MODALITIES, NS_PER_S, CameraFrame, FusedState, ImuSample, LidarFrame
from .outputs import Status, fused_state_layout, fused_state_rows

TYPES = get_typestore(Stores.ROS2_KILTED)
_T = TYPES.types
_ENCODING_DTYPES = {"rgb8": np.uint8, "mono8": np.uint8, "mono16": np.uint16, "16UC1": np.uint16, "32FC1": np.float32}


def header(stamp_ns: int, frame_id: str):
    sec, nsec = divmod(stamp_ns, NS_PER_S)
    return _T["std_msgs/msg/Header"](_T["builtin_interfaces/msg/Time"](sec, nsec), frame_id)


def image_msg(frame: CameraFrame):
    """sensor_msgs/Image in the frame's encoding, little-endian, unpadded rows."""
    img = np.ascontiguousarray(frame.image, dtype=np.dtype(_ENCODING_DTYPES[frame.encoding]).newbyteorder("<"))
    h, w = img.shape[:2]
    return _T["sensor_msgs/msg/Image"](header(frame.stamp_ns, frame.frame_id), h, w, frame.encoding, 0,
                                       img.nbytes // h, img.view(np.uint8).ravel())


def pointcloud2_msg(frame: LidarFrame):
    """sensor_msgs/PointCloud2: x, y, z, intensity float32 (16-byte points), unorganized, dense."""
    pts = np.ascontiguousarray(frame.points, dtype="<f4")
    fields = [_T["sensor_msgs/msg/PointField"](name, 4 * i, 7, 1) for i, name in enumerate(("x", "y", "z", "intensity"))]
    return _T["sensor_msgs/msg/PointCloud2"](header(frame.stamp_ns, frame.frame_id), 1, len(pts), fields, False, 16,
                                             16 * len(pts), pts.view(np.uint8).ravel(), True)


def imu_msg(sample: ImuSample):
    """sensor_msgs/Imu; an unknown orientation is flagged by orientation_covariance[0] = -1 (REP-145)."""
    vec, quat = _T["geometry_msgs/msg/Vector3"], _T["geometry_msgs/msg/Quaternion"]
    unknown = sample.orientation is None
    orientation = quat(0.0, 0.0, 0.0, 1.0) if unknown else quat(*map(float, sample.orientation))
    cov = np.zeros(9)
    if unknown:
        cov[0] = -1.0
    return _T["sensor_msgs/msg/Imu"](header(sample.stamp_ns, sample.frame_id), orientation, cov,
                                     vec(*map(float, sample.gyro)), np.zeros(9), vec(*map(float, sample.accel)), np.zeros(9))


def fused_state_msg(state: FusedState, stamp_ns: int | None = None):
    """The fused state's wire layout (see outputs.py) as a 32FC1 sensor_msgs/Image, stamped stamp_ns (the
    node's data time) or else the fusion instant (replay's, on recorded time)."""
    rows = fused_state_rows(state).astype("<f4")
    stamp_ns = state.stamp_ns if stamp_ns is None else stamp_ns
    return _T["sensor_msgs/msg/Image"](header(stamp_ns, state.frame_id), rows.shape[0], rows.shape[1], "32FC1", 0,
                                       rows.shape[1] * 4, rows.view(np.uint8).ravel())


def sensor_values_msg(stamp_ns: int, frame_id: str, values):
    """One value per sensor as geometry_msgs/Vector3Stamped, x, y, z = camera, lidar, imu: fixed fields
    that Foxglove, PlotJuggler and rqt_plot plot as they are (attention, trust). Three fields: a fourth or
    fifth sensor's (odometry, a second IMU) value is in the fused state's sensor rows and the diagnostics."""
    return _T["geometry_msgs/msg/Vector3Stamped"](header(stamp_ns, frame_id),
                                                  _T["geometry_msgs/msg/Vector3"](*map(float, values)))


def ego_twist_msg(stamp_ns: int, frame_id: str, ego_rate) -> object:
    """The fusion's own speed and yaw rate (FusedState.ego_rate) as geometry_msgs/TwistStamped in the robot's
    frame: linear.x [m/s], angular.z [rad/s], the rest 0 (not estimated)."""
    vec = _T["geometry_msgs/msg/Vector3"]
    speed, yaw_rate = map(float, ego_rate)
    return _T["geometry_msgs/msg/TwistStamped"](header(stamp_ns, frame_id),
                                                _T["geometry_msgs/msg/Twist"](vec(speed, 0.0, 0.0), vec(0.0, 0.0, yaw_rate)))


def fused_state_layout_msg(dim: int, fusion_tokens: int, heads: int, sensors: tuple[str, ...] = MODALITIES[:3],
                           ego_rate: bool = False):
    """std_msgs/String: outputs.fused_state_layout as JSON."""
    return _T["std_msgs/msg/String"](json.dumps(fused_state_layout(dim, fusion_tokens, heads, sensors, ego_rate)))


def diagnostics_msg(stamp_ns: int, statuses: list[Status], hardware_id: str):
    status = [_T["diagnostic_msgs/msg/DiagnosticStatus"](s.level, s.name, s.message, hardware_id,
                                                         [_T["diagnostic_msgs/msg/KeyValue"](k, v) for k, v in s.values.items()])
              for s in statuses]
    return _T["diagnostic_msgs/msg/DiagnosticArray"](header(stamp_ns, ""), status)


def cdr(msg) -> bytes:
    return bytes(TYPES.serialize_cdr(msg, msg.__msgtype__))


def rclpy_class(msgtype: str) -> type:
    """'sensor_msgs/msg/Image' -> the rclpy message class."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def to_rclpy(msg):
    """A rosbags message -> the same message as an rclpy object (through its CDR bytes)."""
    from rclpy.serialization import deserialize_message

    return deserialize_message(cdr(msg), rclpy_class(msg.__msgtype__))
