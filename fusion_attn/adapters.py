"""sensor_msgs (and nav_msgs/Odometry) messages -> typed frames, for rclpy messages and rosbags-deserialized ones alike.

Both kinds carry the same field names; only the containers differ (rclpy: `array.array`, rosbags:
numpy arrays). So every converter duck-types on field names and reads buffers through
`np.frombuffer` / `np.asarray`, which accept either, and copies once into a native-order array that
never aliases the message. Whatever is wrong with a message surfaces as MalformedMessageError.

Measured (2-core dev VM, median of 200 calls): a 120,000-point PointCloud2 of xyz+intensity float32
in 16-byte points 0.4 ms, the same as Velodyne-like 32-byte points with ring and time 0.65 ms; a 640x480
bgr8 Image 0.05 ms. Decoding a 1920x1200 PNG CompressedImage takes ~70 ms (cv2.imdecode itself).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import cv2
import numpy as np

from .errors import MalformedMessageError
from .frames import CameraFrame, ImuSample, LidarFrame, Modality, OdometrySample, stamp_to_ns

log = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_TYPES",
    "Frame",
    "compressed_image_to_frame",
    "image_to_frame",
    "imu_to_sample",
    "laserscan_to_frame",
    "modality_of",
    "msgtype_of",
    "odometry_to_sample",
    "pointcloud2_to_frame",
    "to_frame",
]

Frame = CameraFrame | LidarFrame | ImuSample | OdometrySample
_F = TypeVar("_F", bound=Callable[[Any], Any])

# Raw encoding -> (element dtype, channels in the message, cv2 conversion to rgb8 or None, output encoding).
# The 8UCn names read as cv_bridge reads them (8UC3 is bgr8); packed YUV 4:2:2 carries 2 bytes a pixel;
# OpenCV names a Bayer pattern by its second row's pair, so ROS's rggb8 is cv2's BayerBG.
_IMAGE_ENCODINGS: dict[str, tuple[str, int, int | None, str]] = {
    "rgb8": ("u1", 3, None, "rgb8"),
    "bgr8": ("u1", 3, cv2.COLOR_BGR2RGB, "rgb8"),
    "8UC3": ("u1", 3, cv2.COLOR_BGR2RGB, "rgb8"),
    "rgba8": ("u1", 4, cv2.COLOR_RGBA2RGB, "rgb8"),
    "bgra8": ("u1", 4, cv2.COLOR_BGRA2RGB, "rgb8"),
    "8UC4": ("u1", 4, cv2.COLOR_BGRA2RGB, "rgb8"),
    "uyvy": ("u1", 2, cv2.COLOR_YUV2RGB_UYVY, "rgb8"),
    "yuv422": ("u1", 2, cv2.COLOR_YUV2RGB_UYVY, "rgb8"),
    "yuyv": ("u1", 2, cv2.COLOR_YUV2RGB_YUYV, "rgb8"),
    "yuv422_yuy2": ("u1", 2, cv2.COLOR_YUV2RGB_YUYV, "rgb8"),
    "bayer_rggb8": ("u1", 1, cv2.COLOR_BayerBG2RGB, "rgb8"),
    "bayer_bggr8": ("u1", 1, cv2.COLOR_BayerRG2RGB, "rgb8"),
    "bayer_gbrg8": ("u1", 1, cv2.COLOR_BayerGR2RGB, "rgb8"),
    "bayer_grbg8": ("u1", 1, cv2.COLOR_BayerGB2RGB, "rgb8"),
    "mono8": ("u1", 1, None, "mono8"),
    "8UC1": ("u1", 1, None, "mono8"),
    "mono16": ("u2", 1, None, "mono16"),
    "16UC1": ("u2", 1, None, "16UC1"),
    "32FC1": ("f4", 1, None, "32FC1"),
}
# sensor_msgs/PointField datatype constants 1..8, and 9..11 (INT64, UINT64, BOOL) since ROS 2 Lyrical; a
# BOOL is read as its byte (0 or 1).
_POINTFIELD_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8", 9: "i8", 10: "u8", 11: "u1"}
_INTENSITY_NAMES = ("intensity", "i")
_TIME_NAMES = ("t", "time", "timestamp")
_STRAY_ERRORS = (AttributeError, TypeError, ValueError, LookupError, ArithmeticError, BufferError, cv2.error)


def _converter(msgtype: str) -> Callable[[_F], _F]:
    """Prefix errors with the message type, and turn stray errors from garbage input into ours."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def guarded(msg: Any) -> Any:
            try:
                return fn(msg)
            except MalformedMessageError as exc:
                raise MalformedMessageError(f"{msgtype}: {exc}") from exc
            except _STRAY_ERRORS as exc:
                raise MalformedMessageError(f"{msgtype}: {type(exc).__name__}: {exc}") from exc

        return guarded  # type: ignore[return-value]

    return wrap


# --- field access: every read names the field it failed on -------------------------------------


def _field(obj: Any, path: str) -> Any:
    for name in path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise MalformedMessageError(f"missing field '{path}'") from None
    return obj


def _int(obj: Any, path: str, minimum: int | None = 0) -> int:
    value = _field(obj, path)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise MalformedMessageError(f"field '{path}' must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise MalformedMessageError(f"field '{path}' must be >= {minimum}, got {value}")
    return int(value)


def _float(obj: Any, path: str) -> float:
    value = _field(obj, path)
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise MalformedMessageError(f"field '{path}' must be a number, got {type(value).__name__}")
    return float(value)


def _vector(obj: Any, path: str, axes: str) -> np.ndarray:
    """A geometry_msgs vector or quaternion (`axes`: "xyz", "xyzw") as float64; per field, as `_float`
    checks it. The IMU's fields are read 400 times a second: plain floats take the short way."""
    parent = _field(obj, path)
    values = []
    for axis in axes:
        value = getattr(parent, axis, None)
        if not isinstance(value, float):  # float or numpy float64; anything else: checked, converted or refused by name
            value = _float(obj, f"{path}.{axis}")
        values.append(value)
    return np.array(values, np.float64)


def _floats(obj: Any, path: str) -> np.ndarray:
    """A float[] field (array.array('f'), numpy array or list) as a 1-D float64 array."""
    value = _field(obj, path)
    array = None if isinstance(value, str | bytes) else np.asarray(value)
    if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "fiu"):
        raise MalformedMessageError(f"field '{path}' must be a 1-D numeric array, got {type(value).__name__}")
    return array.astype(np.float64)


def _bytes(obj: Any, path: str) -> np.ndarray:
    """A uint8[] field (array.array('B'), numpy uint8, bytes) as a read-only uint8 view, no copy."""
    value = _field(obj, path)
    try:
        view = memoryview(value)
    except TypeError:
        raise MalformedMessageError(f"field '{path}' must be bytes, got {type(value).__name__}") from None
    if view.itemsize != 1:
        raise MalformedMessageError(f"field '{path}' must hold bytes, got {view.itemsize}-byte items")
    return np.frombuffer(value, np.uint8)


def _header(msg: Any) -> tuple[int, str]:
    _int(msg, "header.stamp.sec", minimum=None)
    if _int(msg, "header.stamp.nanosec") >= 1_000_000_000:
        raise MalformedMessageError(f"header.stamp.nanosec {msg.header.stamp.nanosec} is not below 1e9")
    frame_id = _field(msg, "header.frame_id")
    if not isinstance(frame_id, str):
        raise MalformedMessageError(f"field 'header.frame_id' must be a str, got {type(frame_id).__name__}")
    return stamp_to_ns(msg.header.stamp), frame_id


def _is_bigendian(msg: Any) -> bool:
    value = _field(msg, "is_bigendian")
    if not isinstance(value, bool | np.bool_ | int | np.integer):
        raise MalformedMessageError(f"field 'is_bigendian' must be a bool, got {type(value).__name__}")
    return bool(value)


# --- message type --------------------------------------------------------------------------------


def msgtype_of(msg: Any) -> str:
    """'pkg/msg/Name' of a rosbags message (its __msgtype__) or an rclpy one (from its class module)."""
    msgtype = getattr(msg, "__msgtype__", None)
    if isinstance(msgtype, str):
        return msgtype
    cls = type(msg)
    parts = cls.__module__.split(".")  # rclpy: 'sensor_msgs.msg._image'
    if len(parts) == 3 and parts[1] in ("msg", "srv", "action") and parts[2].startswith("_"):
        return f"{parts[0]}/{parts[1]}/{cls.__name__}"
    raise MalformedMessageError(f"cannot tell the ROS message type of a {cls.__module__}.{cls.__qualname__}")


def modality_of(msgtype: str) -> Modality | None:
    """The modality a supported message type feeds, or None for any other type."""
    return _MODALITIES.get(msgtype)


# --- cameras -------------------------------------------------------------------------------------


@_converter("sensor_msgs/msg/Image")
def image_to_frame(msg: Any) -> CameraFrame:
    """sensor_msgs/Image -> CameraFrame: colour becomes rgb8, mono/depth keep their encoding, (H, W, C)."""
    stamp_ns, frame_id = _header(msg)
    encoding = _field(msg, "encoding")
    if not isinstance(encoding, str) or encoding not in _IMAGE_ENCODINGS:
        raise MalformedMessageError(
            f"unsupported encoding {encoding!r}; supported: {', '.join(_IMAGE_ENCODINGS)}"
        )
    kind, channels, to_rgb, out_encoding = _IMAGE_ENCODINGS[encoding]
    height, width, step = _int(msg, "height"), _int(msg, "width"), _int(msg, "step")
    data = _bytes(msg, "data")
    if width == 0 or height == 0:
        raise MalformedMessageError(f"empty image: width {width}, height {height}")
    dtype = np.dtype(kind).newbyteorder(">" if _is_bigendian(msg) else "<")
    pixel_bytes = channels * dtype.itemsize
    if step < width * pixel_bytes:
        raise MalformedMessageError(
            f"step {step} < width {width} * {pixel_bytes} bytes per pixel ({encoding})"
        )
    if data.size < step * height:
        raise MalformedMessageError(
            f"data has {data.size} bytes, step {step} * height {height} needs {step * height}"
        )
    if channels == 2 and width % 2:  # YUV 4:2:2: a U and a V for each pair of pixels
        raise MalformedMessageError(f"{encoding} needs an even width, got {width}")
    # A strided view skips the row padding; cvtColor (10x faster than a numpy channel flip) or astype
    # then makes the one native-order, contiguous copy.
    pixels = np.ndarray((height, width, channels), dtype, data, strides=(step, pixel_bytes, dtype.itemsize))
    if to_rgb is None:
        image = pixels.astype(dtype.newbyteorder("="), order="C")
    else:
        image = cv2.cvtColor(pixels, to_rgb)
    return CameraFrame(stamp_ns, frame_id, image, out_encoding)


@_converter("sensor_msgs/msg/CompressedImage")
def compressed_image_to_frame(msg: Any) -> CameraFrame:
    """sensor_msgs/CompressedImage (jpeg or png, image_transport format strings) -> CameraFrame."""
    stamp_ns, frame_id = _header(msg)
    fmt = _field(msg, "format")
    if not isinstance(fmt, str):
        raise MalformedMessageError(f"field 'format' must be a string, got {type(fmt).__name__}")
    # 'png', 'jpeg', 'bgr8; jpeg compressed bgr8', '16UC1; png compressed', ...; compressedDepth
    # carries a private header before the png and is not decoded here.
    declared, _, codec = fmt.lower().rpartition(";")
    if "compresseddepth" in codec or not any(name in codec for name in ("jpeg", "jpg", "png")):
        raise MalformedMessageError(
            f"unsupported format {fmt!r}; supported: jpeg, png (image_transport compressed)"
        )
    data = _bytes(msg, "data")
    if data.size == 0:
        raise MalformedMessageError("empty data")
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise MalformedMessageError(f"cannot decode {data.size} bytes as {fmt!r}")
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if decoded.dtype == np.uint8 and channels in (3, 4):
        code = cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGB
        return CameraFrame(stamp_ns, frame_id, cv2.cvtColor(decoded, code), "rgb8")
    if channels == 1 and decoded.dtype in (np.uint8, np.uint16):
        depth = declared.strip() == "16uc1"
        encoding = "mono8" if decoded.dtype == np.uint8 else "16UC1" if depth else "mono16"
        return CameraFrame(stamp_ns, frame_id, decoded.reshape(*decoded.shape[:2], 1), encoding)
    raise MalformedMessageError(
        f"unsupported decoded image: {channels} channels of {decoded.dtype} from {fmt!r}"
    )


# --- lidars --------------------------------------------------------------------------------------


def _point_fields(msg: Any, point_step: int, bigendian: bool) -> dict[str, tuple[np.dtype, int]]:
    """Validate every PointField; return name -> (dtype with byte order, offset), first occurrence wins."""
    fields = _field(msg, "fields")
    order = ">" if bigendian else "<"
    layout: dict[str, tuple[np.dtype, int]] = {}
    for index, field in enumerate(fields):
        where = f"fields[{index}]"
        name = _field(field, "name")
        if not isinstance(name, str):
            raise MalformedMessageError(f"{where}.name must be a string, got {type(name).__name__}")
        datatype = _int(field, "datatype")
        offset = _int(field, "offset")
        count = _int(field, "count")
        if datatype not in _POINTFIELD_DTYPES:
            raise MalformedMessageError(f"{where} '{name}': unknown datatype {datatype} (expected 1..11)")
        dtype = np.dtype(order + _POINTFIELD_DTYPES[datatype])
        if offset + dtype.itemsize * max(count, 1) > point_step:
            size = f"{count} x {dtype.itemsize} bytes"
            raise MalformedMessageError(
                f"{where} '{name}' at offset {offset} ({size}) does not fit point_step {point_step}"
            )
        layout.setdefault(name, (dtype, offset))
    return layout


@_converter("sensor_msgs/msg/PointCloud2")
def pointcloud2_to_frame(msg: Any) -> LidarFrame:
    """sensor_msgs/PointCloud2 -> LidarFrame of finite x, y, z, intensity (+ ring, time when present)."""
    stamp_ns, frame_id = _header(msg)
    height, width = _int(msg, "height"), _int(msg, "width")
    point_step, row_step = _int(msg, "point_step"), _int(msg, "row_step")
    if width * height == 0:  # a valid, empty scan whatever its layout
        return LidarFrame(stamp_ns, frame_id, np.zeros((0, 4), np.float32))
    if point_step == 0:
        raise MalformedMessageError(f"point_step 0 with {width * height} points")
    if row_step < width * point_step:
        raise MalformedMessageError(f"row_step {row_step} < width {width} * point_step {point_step}")
    data = _bytes(msg, "data")
    if data.size < row_step * height:
        needs = row_step * height
        raise MalformedMessageError(
            f"data has {data.size} bytes, row_step {row_step} * height {height} needs {needs}"
        )
    layout = _point_fields(msg, point_step, _is_bigendian(msg))
    missing = [axis for axis in "xyz" if axis not in layout]
    if missing:
        raise MalformedMessageError(f"no {'/'.join(missing)} field; fields are {list(layout)}")

    intensity = next((name for name in _INTENSITY_NAMES if name in layout), None)
    time = next((name for name in _TIME_NAMES if name in layout), None)
    ring = "ring" if "ring" in layout else None
    wanted = [name for name in ("x", "y", "z", intensity, ring, time) if name]
    point = np.dtype(
        {
            "names": wanted,
            "formats": [layout[name][0] for name in wanted],
            "offsets": [layout[name][1] for name in wanted],
            "itemsize": point_step,
        }
    )
    # One strided view over the whole buffer (row padding skipped by the strides); each column is copied
    # once, straight into the output, which also casts to float32 and swaps big-endian data to native.
    cloud = np.ndarray((height, width), point, data, strides=(row_step, point_step)).reshape(-1)
    points = np.zeros((cloud.size, 4), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf, dropped below
        for column, name in enumerate(("x", "y", "z", intensity)):
            if name:
                points[:, column] = cloud[name]
    # Row-wise all() over 4 bools is slow in numpy; read each row's 4 bools as one uint32 instead.
    finite = np.isfinite(points).view(np.uint32)[:, 0] == 0x01010101
    keep = slice(None) if finite.all() else finite
    rings = _ring_ids(cloud[ring][keep]) if ring else None
    times = _point_times(cloud[time])[keep] if time else None
    return LidarFrame(stamp_ns, frame_id, points[keep], rings, times)


def _point_times(raw: np.ndarray) -> np.ndarray:
    """Per-point times -> float32 seconds from the cloud's earliest point (every point's, before any is
    dropped, so a dropped point never moves the others). Integers are nanoseconds (Ouster's t); floats
    are seconds (Velodyne's offsets, Hesai's and Robosense's stamps since the epoch), or nanoseconds
    beyond 1e12, which no scan's seconds reach (Livox's stamps since the epoch). Rebased in float64:
    float32 steps 128 s at an epoch stamp. NaN stays NaN (the time unknown, the point kept)."""
    if raw.size == 0:
        return np.zeros(0, np.float32)
    if raw.dtype.kind in "iu":  # the difference as uint64: exact, and no overflow for any two int64s
        ns = raw.astype(np.int64 if raw.dtype.kind == "i" else np.uint64)
        return ((ns - ns.min()).view(np.uint64) * 1e-9).astype(np.float32)
    t = raw.astype(np.float64)
    finite = np.isfinite(t)
    if not finite.any():
        return np.full(t.shape, np.nan, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # garbage beyond float32 becomes inf
        if np.abs(t[finite]).max() > 1e12:
            t = t * 1e-9
        return (t - t[finite].min()).astype(np.float32)


def _ring_ids(raw: np.ndarray) -> np.ndarray | None:
    """Laser ring ids as uint16. Some drivers send them as floats: whole numbers convert exactly; other
    values are no ring ids, so the field is left out (noted once) -- the tokenizer does not need it,
    and a field it does not need must never cost the cloud."""
    if raw.dtype.kind in "iu":
        return raw.astype(np.uint16)
    with np.errstate(invalid="ignore"):
        whole = raw.dtype.kind == "f" and bool(np.all((raw == np.round(raw)) & (raw >= 0) & (raw <= 65535)))
    if whole:
        return raw.astype(np.uint16)
    _note_once(f"PointCloud2 field 'ring' ({raw.dtype.name}) holds values that are no ring ids: ring left out")
    return None


_noted: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        log.warning(message)


@_converter("sensor_msgs/msg/LaserScan")
def laserscan_to_frame(msg: Any) -> LidarFrame:
    """sensor_msgs/LaserScan -> LidarFrame: beams in [range_min, range_max] as points in the scan plane."""
    stamp_ns, frame_id = _header(msg)
    ranges = _floats(msg, "ranges")
    intensities = _floats(msg, "intensities")
    angle_min, increment = _float(msg, "angle_min"), _float(msg, "angle_increment")
    range_min, range_max = _float(msg, "range_min"), _float(msg, "range_max")
    if not (np.isfinite(angle_min) and np.isfinite(increment)):
        raise MalformedMessageError(f"non-finite angle_min {angle_min} or angle_increment {increment}")
    if increment == 0 and ranges.size > 1:
        raise MalformedMessageError(f"angle_increment 0 with {ranges.size} ranges")
    if intensities.size != ranges.size:  # drivers often leave intensities empty
        intensities = np.zeros_like(ranges)
    angles = angle_min + increment * np.arange(ranges.size)
    valid = (ranges >= range_min) & (ranges <= range_max)  # nan compares False: dropped
    r, a = ranges[valid], angles[valid]
    with np.errstate(over="ignore", invalid="ignore"):  # an infinite range_max lets inf in; dropped below
        points = np.stack([r * np.cos(a), r * np.sin(a), np.zeros_like(r), intensities[valid]], axis=1)
        points = points.astype(np.float32)
    return LidarFrame(stamp_ns, frame_id, points[np.isfinite(points).all(axis=1)])


# --- imu -----------------------------------------------------------------------------------------


@_converter("sensor_msgs/msg/Imu")
def imu_to_sample(msg: Any) -> ImuSample:
    """sensor_msgs/Imu -> ImuSample; orientation None when flagged unknown (REP-145), zero or non-finite."""
    stamp_ns, frame_id = _header(msg)
    accel = _vector(msg, "linear_acceleration", "xyz")
    gyro = _vector(msg, "angular_velocity", "xyz")
    for name in ("linear_acceleration", "angular_velocity"):  # REP-145: covariance[0] = -1, not provided
        covariance = _floats(msg, f"{name}_covariance")
        if covariance.size and covariance[0] == -1:
            raise MalformedMessageError(f"{name} not provided ({name}_covariance[0] = -1); the fusion needs both")
    if not (np.isfinite(accel).all() and np.isfinite(gyro).all()):
        raise MalformedMessageError(f"non-finite linear_acceleration {accel} or angular_velocity {gyro}")
    covariance = _floats(msg, "orientation_covariance")
    if covariance.size != 9:
        raise MalformedMessageError(f"orientation_covariance has {covariance.size} values, expected 9")
    quaternion = _vector(msg, "orientation", "xyzw")
    known = covariance[0] != -1 and np.isfinite(quaternion).all() and quaternion.any()
    return ImuSample(stamp_ns, frame_id, accel, gyro, quaternion if known else None)


# --- wheel odometry ------------------------------------------------------------------------------


@_converter("nav_msgs/msg/Odometry")
def odometry_to_sample(msg: Any) -> OdometrySample:
    """nav_msgs/Odometry -> its twist, in child_frame_id (the robot's base; header.frame_id where empty).
    The pose is left out: it integrates the same twist, with the drift of a robot's whole run."""
    stamp_ns, frame_id = _header(msg)
    child = _field(msg, "child_frame_id")
    if not isinstance(child, str):
        raise MalformedMessageError(f"field 'child_frame_id' must be a str, got {type(child).__name__}")
    linear = _vector(msg, "twist.twist.linear", "xyz")
    angular = _vector(msg, "twist.twist.angular", "xyz")
    if not (np.isfinite(linear).all() and np.isfinite(angular).all()):
        raise MalformedMessageError(f"non-finite twist linear {linear} or angular {angular}")
    return OdometrySample(stamp_ns, child or frame_id, linear, angular)


# --- dispatch ------------------------------------------------------------------------------------

SUPPORTED_TYPES: Mapping[str, Callable[[Any], Frame]] = MappingProxyType(
    {
        "sensor_msgs/msg/Image": image_to_frame,
        "sensor_msgs/msg/CompressedImage": compressed_image_to_frame,
        "sensor_msgs/msg/PointCloud2": pointcloud2_to_frame,
        "sensor_msgs/msg/LaserScan": laserscan_to_frame,
        "sensor_msgs/msg/Imu": imu_to_sample,
        "nav_msgs/msg/Odometry": odometry_to_sample,
    }
)
_MODALITIES: Mapping[str, Modality] = {
    "sensor_msgs/msg/Image": Modality.CAMERA,
    "sensor_msgs/msg/CompressedImage": Modality.CAMERA,
    "sensor_msgs/msg/PointCloud2": Modality.LIDAR,
    "sensor_msgs/msg/LaserScan": Modality.LIDAR,
    "sensor_msgs/msg/Imu": Modality.IMU,
    "nav_msgs/msg/Odometry": Modality.ODOMETRY,
}


def to_frame(msg: Any) -> Frame:
    """Convert any supported sensor message by its type; MalformedMessageError for any other type."""
    msgtype = msgtype_of(msg)
    convert = SUPPORTED_TYPES.get(msgtype)
    if convert is None:
        raise MalformedMessageError(
            f"unsupported message type {msgtype!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    return convert(msg)
