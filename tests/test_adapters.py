"""fusion_attn.adapters: sensor_msgs -> frames, for rclpy and rosbags messages alike.

Every unit test runs on both message kinds through the `make` fixture; the property tests compare
against an independent per-point `struct` decoding; the real-data tests convert whole recordings.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CompressedImage, Image, Imu, LaserScan, PointCloud2, PointField
from std_msgs.msg import Header

from fusion_attn import adapters
from fusion_attn.adapters import (
    SUPPORTED_TYPES,
    compressed_image_to_frame,
    image_to_frame,
    imu_to_sample,
    laserscan_to_frame,
    modality_of,
    msgtype_of,
    pointcloud2_to_frame,
    to_frame,
)
from fusion_attn.errors import MalformedMessageError
from fusion_attn.frames import CameraFrame, ImuSample, LidarFrame, Modality

TS = get_typestore(Stores.ROS2_KILTED if hasattr(Stores, "ROS2_KILTED") else Stores.LATEST)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- message makers: the same keyword arguments give an rclpy or a rosbags message ---------------


class RclpyMaker:
    kind = "rclpy"

    def header(self, sec=12, nanosec=345, frame_id="sensor"):
        return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame_id)

    def image(self, *, height, width, encoding, step, data, is_bigendian=0, **header):
        return Image(
            header=self.header(**header),
            height=height,
            width=width,
            encoding=encoding,
            is_bigendian=int(is_bigendian),
            step=step,
            data=bytes(data),
        )

    def compressed(self, *, format, data, **header):
        return CompressedImage(header=self.header(**header), format=format, data=bytes(data))

    def cloud(self, *, fields, width, height, point_step, row_step, data, is_bigendian=False, **header):
        return PointCloud2(
            header=self.header(**header),
            height=height,
            width=width,
            fields=[PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields],
            is_bigendian=bool(is_bigendian),
            point_step=point_step,
            row_step=row_step,
            data=bytes(data),
            is_dense=False,
        )

    def scan(
        self, *, ranges, intensities=(), angle_min=0.0, angle_increment=0.1, range_min=0.0, range_max=100.0
    ):
        return LaserScan(
            header=self.header(),
            angle_min=angle_min,
            angle_max=angle_min + angle_increment * max(len(ranges) - 1, 0),
            angle_increment=angle_increment,
            range_min=range_min,
            range_max=range_max,
            ranges=[float(r) for r in ranges],
            intensities=[float(i) for i in intensities],
        )

    def imu(
        self, *, accel=(0.0, 0.0, 9.81), gyro=(0.0, 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 1.0), cov0=0.0,
        accel_cov0=0.0, gyro_cov0=0.0,
    ):
        msg = Imu(header=self.header())
        msg.linear_acceleration.x, msg.linear_acceleration.y, msg.linear_acceleration.z = accel
        msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = gyro
        msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w = orientation
        msg.orientation_covariance[0] = cov0
        msg.linear_acceleration_covariance[0], msg.angular_velocity_covariance[0] = accel_cov0, gyro_cov0
        return msg


class RosbagsMaker(RclpyMaker):
    kind = "rosbags"

    def header(self, sec=12, nanosec=345, frame_id="sensor"):
        time = TS.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
        return TS.types["std_msgs/msg/Header"](stamp=time, frame_id=frame_id)

    def image(self, *, height, width, encoding, step, data, is_bigendian=0, **header):
        return TS.types["sensor_msgs/msg/Image"](
            self.header(**header), height, width, encoding, int(is_bigendian), step, _u8(data)
        )

    def compressed(self, *, format, data, **header):
        return TS.types["sensor_msgs/msg/CompressedImage"](self.header(**header), format, _u8(data))

    def cloud(self, *, fields, width, height, point_step, row_step, data, is_bigendian=False, **header):
        field = TS.types["sensor_msgs/msg/PointField"]
        return TS.types["sensor_msgs/msg/PointCloud2"](
            header=self.header(**header),
            height=height,
            width=width,
            fields=[field(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields],
            is_bigendian=bool(is_bigendian),
            point_step=point_step,
            row_step=row_step,
            data=_u8(data),
            is_dense=False,
        )

    def scan(
        self, *, ranges, intensities=(), angle_min=0.0, angle_increment=0.1, range_min=0.0, range_max=100.0
    ):
        return TS.types["sensor_msgs/msg/LaserScan"](
            header=self.header(),
            angle_min=angle_min,
            angle_max=angle_min + angle_increment * max(len(ranges) - 1, 0),
            angle_increment=angle_increment,
            time_increment=0.0,
            scan_time=0.0,
            range_min=range_min,
            range_max=range_max,
            ranges=np.asarray(ranges, np.float32),
            intensities=np.asarray(intensities, np.float32),
        )

    def imu(
        self, *, accel=(0.0, 0.0, 9.81), gyro=(0.0, 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 1.0), cov0=0.0,
        accel_cov0=0.0, gyro_cov0=0.0,
    ):
        vec = TS.types["geometry_msgs/msg/Vector3"]

        def covariance(first):
            return np.array([first] + [0.0] * 8)

        return TS.types["sensor_msgs/msg/Imu"](
            header=self.header(),
            orientation=TS.types["geometry_msgs/msg/Quaternion"](*orientation),
            orientation_covariance=covariance(cov0),
            angular_velocity=vec(*gyro),
            angular_velocity_covariance=covariance(gyro_cov0),
            linear_acceleration=vec(*accel),
            linear_acceleration_covariance=covariance(accel_cov0),
        )


def _u8(data) -> np.ndarray:
    return np.frombuffer(bytes(data), np.uint8).copy()


MAKERS = [RclpyMaker(), RosbagsMaker()]


@pytest.fixture(params=MAKERS, ids=lambda m: m.kind)
def make(request):
    return request.param


def _raises(fn, msg, *fragments: str) -> str:
    with pytest.raises(MalformedMessageError) as info:
        fn(msg)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


# --- message types -------------------------------------------------------------------------------


def test_msgtype_of_both_kinds(make):
    assert (
        msgtype_of(make.image(height=1, width=1, encoding="mono8", step=1, data=b"\0"))
        == "sensor_msgs/msg/Image"
    )
    assert msgtype_of(make.imu()) == "sensor_msgs/msg/Imu"
    assert msgtype_of(make.scan(ranges=[1.0])) == "sensor_msgs/msg/LaserScan"
    assert msgtype_of(make.compressed(format="png", data=b"")) == "sensor_msgs/msg/CompressedImage"


@pytest.mark.parametrize("garbage", [None, 3, "sensor_msgs/msg/Image", SimpleNamespace(width=1), object()])
def test_msgtype_of_garbage(garbage):
    _raises(msgtype_of, garbage, "cannot tell the ROS message type")
    _raises(to_frame, garbage, "cannot tell the ROS message type")


def test_dispatch_tables():
    assert set(SUPPORTED_TYPES) == {
        "sensor_msgs/msg/Image",
        "sensor_msgs/msg/CompressedImage",
        "sensor_msgs/msg/PointCloud2",
        "sensor_msgs/msg/LaserScan",
        "sensor_msgs/msg/Imu",
        "nav_msgs/msg/Odometry",
    }
    assert {t: modality_of(t) for t in SUPPORTED_TYPES} == {
        "sensor_msgs/msg/Image": Modality.CAMERA,
        "sensor_msgs/msg/CompressedImage": Modality.CAMERA,
        "sensor_msgs/msg/PointCloud2": Modality.LIDAR,
        "sensor_msgs/msg/LaserScan": Modality.LIDAR,
        "sensor_msgs/msg/Imu": Modality.IMU,
        "nav_msgs/msg/Odometry": Modality.ODOMETRY,
    }
    assert modality_of("sensor_msgs/msg/NavSatFix") is None
    with pytest.raises(TypeError):
        SUPPORTED_TYPES["x"] = image_to_frame  # type: ignore[index]


def test_to_frame_dispatches(make):
    assert isinstance(
        to_frame(make.image(height=1, width=1, encoding="mono8", step=1, data=b"\7")), CameraFrame
    )
    assert isinstance(to_frame(make.scan(ranges=[1.0])), LidarFrame)
    assert isinstance(to_frame(make.imu()), ImuSample)


def test_to_frame_unsupported_type():
    from sensor_msgs.msg import NavSatFix

    _raises(
        to_frame, NavSatFix(), "unsupported message type 'sensor_msgs/msg/NavSatFix'", "sensor_msgs/msg/Image"
    )
    _raises(to_frame, TS.types["std_msgs/msg/String"](data="hi"), "'std_msgs/msg/String'")


# --- Image ---------------------------------------------------------------------------------------

PIXELS = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7  # (H, W, 4) distinct bytes


@pytest.mark.parametrize(
    ("encoding", "channels", "expected"),
    [
        ("rgb8", 3, PIXELS[..., :3]),
        ("bgr8", 3, PIXELS[..., 2::-1]),
        ("rgba8", 4, PIXELS[..., :3]),
        ("bgra8", 4, PIXELS[..., 2::-1]),
        ("mono8", 1, PIXELS[..., :1]),
    ],
)
def test_image_8bit_encodings(make, encoding, channels, expected):
    raw = np.ascontiguousarray(PIXELS[..., :channels])
    frame = image_to_frame(
        make.image(
            height=2, width=3, encoding=encoding, step=3 * channels, data=raw.tobytes(), frame_id="cam", sec=5
        )
    )
    assert frame.encoding == ("mono8" if encoding == "mono8" else "rgb8")
    assert frame.image.dtype == np.uint8 and frame.image.flags.c_contiguous
    np.testing.assert_array_equal(frame.image, expected)
    assert (frame.stamp_ns, frame.frame_id) == (5_000_000_345, "cam")


@pytest.mark.parametrize(("encoding", "like"), [("8UC1", "mono8"), ("8UC3", "bgr8"), ("8UC4", "bgra8")])
def test_image_opencv_type_names_read_as_cv_bridge_does(make, encoding, like):
    channels = {"mono8": 1, "bgr8": 3, "bgra8": 4}[like]
    raw = np.ascontiguousarray(PIXELS[..., :channels]).tobytes()
    frames = [image_to_frame(make.image(height=2, width=3, encoding=e, step=3 * channels, data=raw))
              for e in (encoding, like)]
    assert frames[0].encoding == frames[1].encoding
    np.testing.assert_array_equal(frames[0].image, frames[1].image)


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_image_bayer_demosaics_to_the_colours_it_sampled(make, pattern):
    """A flat colour sampled through each ROS Bayer pattern comes back as that colour: the pattern's
    letters name the first two rows' filters (OpenCV names them otherwise)."""
    rgb = np.array([200, 90, 30])
    index = {"r": 0, "g": 1, "b": 2}
    mosaic = np.zeros((8, 10), np.uint8)
    for k, colour in enumerate(pattern):  # rows then columns of the 2 x 2 cell
        mosaic[k // 2::2, k % 2::2] = rgb[index[colour]]
    frame = image_to_frame(make.image(height=8, width=10, encoding=f"bayer_{pattern}8", step=10,
                                      data=mosaic.tobytes()))
    assert frame.encoding == "rgb8" and frame.image.shape == (8, 10, 3)
    np.testing.assert_array_equal(frame.image[2:-2, 2:-2], np.broadcast_to(rgb, (4, 6, 3)))


@pytest.mark.parametrize(("encoding", "order"), [("uyvy", "UYVY"), ("yuv422", "UYVY"), ("yuyv", "YUYV"),
                                                 ("yuv422_yuy2", "YUYV")])
def test_image_packed_yuv422(make, encoding, order):
    """Packed 4:2:2 (2 bytes a pixel, a U and a V per pixel pair; ROS's yuv422 is UYVY): BT.601 YUV of a
    grey, a red and a blue pixel pair, each back within rounding."""
    colours = np.array([[128, 128, 128], [255, 0, 0], [0, 0, 255]], float)
    y = 0.299 * colours[:, 0] + 0.587 * colours[:, 1] + 0.114 * colours[:, 2]
    u, v = 128 + 0.564 * (colours[:, 2] - y), 128 + 0.713 * (colours[:, 0] - y)
    pairs = [{"Y": y[i], "U": u[i], "V": v[i]} for i in range(3)]
    row = [pair[c] for pair in pairs for c in order]  # e.g. UYVY: U Y V Y, one pair's bytes
    data = np.clip(np.round(row), 0, 255).astype(np.uint8)
    frame = image_to_frame(make.image(height=1, width=6, encoding=encoding, step=12, data=data.tobytes()))
    assert frame.encoding == "rgb8"
    np.testing.assert_allclose(frame.image[0], np.repeat(colours, 2, axis=0), atol=3)


def test_image_bgr_swap_is_exact(make):
    bgr = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frame = image_to_frame(make.image(height=48, width=64, encoding="bgr8", step=192, data=bgr.tobytes()))
    np.testing.assert_array_equal(frame.image[..., 0], bgr[..., 2])
    np.testing.assert_array_equal(frame.image[..., 1], bgr[..., 1])
    np.testing.assert_array_equal(frame.image[..., 2], bgr[..., 0])


@pytest.mark.parametrize(
    ("encoding", "dtype"), [("mono16", np.uint16), ("16UC1", np.uint16), ("32FC1", np.float32)]
)
@pytest.mark.parametrize("bigendian", [False, True])
def test_image_wide_encodings_and_endianness(make, encoding, dtype, bigendian):
    values = np.array([[0, 1, 258], [4095, 65535 if dtype == np.uint16 else -1.5, 1000]], dtype)
    raw = values.astype(np.dtype(dtype).newbyteorder(">" if bigendian else "<")).tobytes()
    frame = image_to_frame(
        make.image(
            height=2, width=3, encoding=encoding, step=3 * values.itemsize, data=raw, is_bigendian=bigendian
        )
    )
    assert frame.encoding == encoding and frame.image.shape == (2, 3, 1)
    assert frame.image.dtype == dtype and frame.image.dtype.isnative
    np.testing.assert_array_equal(frame.image[..., 0], values)


def test_image_row_padding(make):
    rows = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    step = 5 * 3 + 7  # padding bytes that must not leak into the image
    padded = np.full((4, step), 0xEE, np.uint8)
    padded[:, :15] = rows.reshape(4, 15)
    frame = image_to_frame(make.image(height=4, width=5, encoding="rgb8", step=step, data=padded.tobytes()))
    np.testing.assert_array_equal(frame.image, rows)
    depth = np.arange(6, dtype=np.uint16).reshape(2, 3)
    padded16 = np.zeros((2, 4), np.uint16)
    padded16[:, :3] = depth
    frame = image_to_frame(make.image(height=2, width=3, encoding="16UC1", step=8, data=padded16.tobytes()))
    np.testing.assert_array_equal(frame.image[..., 0], depth)


def test_image_odd_step_unaligned_16bit(make):
    depth = np.array([[1, 2], [300, 65000]], np.uint16)
    data = b"".join(row.tobytes() + b"\x99" for row in depth)  # step 5: rows start at odd offsets
    frame = image_to_frame(make.image(height=2, width=2, encoding="mono16", step=5, data=data))
    np.testing.assert_array_equal(frame.image[..., 0], depth)


@pytest.mark.parametrize(("encoding", "pixel_bytes"), [("mono8", 1), ("bgr8", 3), ("32FC1", 4)])
def test_image_does_not_alias_message(make, encoding, pixel_bytes):
    msg = make.image(
        height=2, width=2, encoding=encoding, step=2 * pixel_bytes, data=bytes(range(1, 1 + 4 * pixel_bytes))
    )
    frame = image_to_frame(msg)
    before = frame.image.copy()
    assert not np.shares_memory(frame.image, np.frombuffer(msg.data, np.uint8))
    msg.data[0] = msg.data[-1] = 0xFF
    np.testing.assert_array_equal(frame.image, before)


def test_image_errors(make):
    def img(**kw):
        base = {"height": 2, "width": 3, "encoding": "rgb8", "step": 9, "data": bytes(18)}
        return make.image(**{**base, **kw})

    text = _raises(
        image_to_frame, img(encoding="bayer_rggb16"), "sensor_msgs/msg/Image", "unsupported encoding 'bayer_rggb16'"
    )
    for name in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1", "32FC1", "uyvy", "bayer_rggb8"):
        assert name in text
    _raises(image_to_frame, img(encoding="uyvy", step=6, data=bytes(12)), "uyvy needs an even width, got 3")
    _raises(image_to_frame, img(nanosec=1_000_000_000), "header.stamp.nanosec 1000000000 is not below 1e9")
    _raises(image_to_frame, img(data=bytes(17)), "17 bytes", "needs 18")
    _raises(image_to_frame, img(step=8), "step 8 < width 3 * 3")
    _raises(image_to_frame, img(encoding="mono16", step=5, data=bytes(10)), "step 5 < width 3 * 2")
    _raises(image_to_frame, img(width=0, step=0, data=b""), "empty image")
    _raises(image_to_frame, img(height=0, data=b""), "empty image")


# --- CompressedImage -----------------------------------------------------------------------------


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("fmt", ["png", "bgr8; png compressed bgr8", "rgb8; png compressed bgr8"])
def test_compressed_png_colour(make, fmt):
    bgr = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    frame = compressed_image_to_frame(make.compressed(format=fmt, data=_encode(".png", bgr), frame_id="c"))
    assert frame.encoding == "rgb8" and frame.frame_id == "c" and frame.stamp_ns == 12_000_000_345
    np.testing.assert_array_equal(frame.image, bgr[..., ::-1])


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "bgr8; jpeg compressed bgr8"])
def test_compressed_jpeg_colour(make, fmt):
    bgr = np.zeros((16, 16, 3), np.uint8)
    bgr[..., 0] = 200  # pure blue in BGR: must come out in the last RGB channel
    frame = compressed_image_to_frame(make.compressed(format=fmt, data=_encode(".jpg", bgr)))
    assert frame.image.shape == (16, 16, 3) and frame.image.dtype == np.uint8
    assert np.abs(frame.image.astype(int) - [0, 0, 200]).max() <= 3


def test_compressed_png_alpha_dropped(make):
    bgra = np.random.default_rng(3).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    frame = compressed_image_to_frame(make.compressed(format="png", data=_encode(".png", bgra)))
    np.testing.assert_array_equal(frame.image, bgra[..., 2::-1])


def test_compressed_mono(make):
    grey = np.random.default_rng(4).integers(0, 256, (7, 3), dtype=np.uint8)
    frame = compressed_image_to_frame(
        make.compressed(format="mono8; png compressed mono8", data=_encode(".png", grey))
    )
    assert frame.encoding == "mono8" and frame.image.shape == (7, 3, 1)
    np.testing.assert_array_equal(frame.image[..., 0], grey)


@pytest.mark.parametrize(
    ("fmt", "encoding"),
    [("png", "mono16"), ("mono16; png compressed", "mono16"), ("16UC1; png compressed", "16UC1")],
)
def test_compressed_png_16bit(make, fmt, encoding):
    depth = np.random.default_rng(5).integers(0, 65536, (4, 6), dtype=np.uint16)
    frame = compressed_image_to_frame(make.compressed(format=fmt, data=_encode(".png", depth)))
    assert frame.encoding == encoding and frame.image.dtype == np.uint16 and frame.image.shape == (4, 6, 1)
    np.testing.assert_array_equal(frame.image[..., 0], depth)


def test_compressed_errors(make):
    png = _encode(".png", np.zeros((2, 2, 3), np.uint8))
    _raises(
        compressed_image_to_frame,
        make.compressed(format="png", data=b""),
        "sensor_msgs/msg/CompressedImage",
        "empty data",
    )
    _raises(
        compressed_image_to_frame,
        make.compressed(format="jpeg", data=b"\xff\xd8 not a jpeg"),
        "cannot decode",
        "'jpeg'",
    )
    _raises(compressed_image_to_frame, make.compressed(format="tiff", data=png), "unsupported format 'tiff'")
    _raises(compressed_image_to_frame, make.compressed(format="", data=png), "unsupported format ''")
    depth_fmt = "16UC1; compressedDepth png"
    _raises(
        compressed_image_to_frame,
        make.compressed(format=depth_fmt, data=png),
        "unsupported format",
        depth_fmt,
    )
    colour16 = _encode(".png", np.zeros((2, 2, 3), np.uint16))
    _raises(compressed_image_to_frame, make.compressed(format="png", data=colour16), "3 channels of uint16")


# --- PointCloud2 ---------------------------------------------------------------------------------

XYZI = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("intensity", 12, 7, 1)]
F32 = {"names": ["x", "y", "z", "intensity"], "formats": ["f4"] * 4, "offsets": [0, 4, 8, 12]}


def _pack(values: np.ndarray, dtype: dict, itemsize: int, bigendian=False, row_pad=0) -> tuple[bytes, int]:
    """(H, W, k) values into rows of points with `dtype`'s fields; returns (data, row_step)."""
    order = ">" if bigendian else "<"
    dt = np.dtype({**dtype, "formats": [order + f for f in dtype["formats"]], "itemsize": itemsize})
    cloud = np.zeros(values.shape[:2], dt)
    for k, name in enumerate(dtype["names"]):
        cloud[name] = values[..., k]
    row_step = values.shape[1] * itemsize + row_pad
    rows = [row.tobytes() + b"\xab" * row_pad for row in cloud]
    return b"".join(rows), row_step


def test_cloud_basic(make):
    xyzi = np.array([[[1, 2, 3, 4], [-5, 6.5, -7, 0.25], [100, -100, 0, 255]]], np.float32)
    data, row_step = _pack(xyzi, F32, 16)
    msg = make.cloud(
        fields=XYZI, width=3, height=1, point_step=16, row_step=row_step, data=data, frame_id="lidar"
    )
    frame = pointcloud2_to_frame(msg)
    assert (
        frame.points.dtype == np.float32 and frame.points.shape == (3, 4) and frame.points.flags.c_contiguous
    )
    np.testing.assert_array_equal(frame.points, xyzi[0])
    assert frame.ring is None and frame.time is None and frame.frame_id == "lidar"
    before = frame.points.copy()
    msg.data[0:4] = msg.data[4:8]  # mutating the message must not reach the frame
    np.testing.assert_array_equal(frame.points, before)


@pytest.mark.parametrize("bigendian", [False, True])
def test_cloud_padded_velodyne_layout(make, bigendian):
    # x y z at 0..12, 4 pad bytes, intensity at 16, ring uint16 at 20, time float32 at 24, point_step 32.
    fields = [
        ("x", 0, 7, 1),
        ("y", 4, 7, 1),
        ("z", 8, 7, 1),
        ("intensity", 16, 7, 1),
        ("ring", 20, 4, 1),
        ("time", 24, 7, 1),
    ]
    layout = {
        "names": ["x", "y", "z", "intensity", "ring", "time"],
        "formats": ["f4", "f4", "f4", "f4", "u2", "f4"],
        "offsets": [0, 4, 8, 16, 20, 24],
    }
    values = np.array(
        [
            [[1, 2, 3, 10, 0, -0.05], [4, 5, 6, 20, 15, 0.0]],
            [[7, 8, 9, 30, 7, 0.025], [0.5, 0.5, 0.5, 0, 3, 0.05]],
        ]
    )
    data, row_step = _pack(values, layout, 32, bigendian, row_pad=12)
    msg = make.cloud(
        fields=fields, width=2, height=2, point_step=32, row_step=row_step, data=data, is_bigendian=bigendian
    )
    frame = pointcloud2_to_frame(msg)
    flat = values.reshape(-1, 6)
    np.testing.assert_array_equal(frame.points, flat[:, :4].astype(np.float32))
    assert frame.ring.dtype == np.uint16 and frame.ring.tolist() == [0, 15, 7, 3]
    assert frame.time.dtype == np.float32  # Velodyne's offsets from the stamp, now from the earliest point
    np.testing.assert_allclose(frame.time, [0.0, 0.05, 0.075, 0.1], rtol=1e-6)


def test_cloud_numpy_bool_flag_is_a_bool():
    """A hand-built rosbags message may carry numpy's bool where a deserialized one has Python's."""
    data, row_step = _pack(np.array([[[1, 2, 3, 4]]]), F32, 16, True)
    msg = RosbagsMaker().cloud(fields=XYZI, width=1, height=1, point_step=16, row_step=row_step, data=data)
    msg.is_bigendian = np.bool_(True)
    np.testing.assert_array_equal(pointcloud2_to_frame(msg).points, [[1, 2, 3, 4]])


def test_cloud_big_and_little_endian_agree(make):
    xyzi = np.random.default_rng(6).normal(0, 50, (3, 5, 4)).astype(np.float32)
    frames = []
    for bigendian in (False, True):
        data, row_step = _pack(xyzi, F32, 16, bigendian)
        frames.append(
            pointcloud2_to_frame(
                make.cloud(
                    fields=XYZI,
                    width=5,
                    height=3,
                    point_step=16,
                    row_step=row_step,
                    data=data,
                    is_bigendian=bigendian,
                )
            )
        )
    np.testing.assert_array_equal(frames[0].points, frames[1].points)
    np.testing.assert_array_equal(frames[0].points, xyzi.reshape(-1, 4))


def test_cloud_organized_with_nans(make):
    xyzi = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    xyzi[0, 1, 0] = np.nan  # no return: NaN x
    xyzi[1, 2, 2] = np.inf
    xyzi[1, 3, 3] = np.nan  # bad intensity also drops the point
    data, row_step = _pack(xyzi, F32, 16)
    frame = pointcloud2_to_frame(
        make.cloud(fields=XYZI, width=4, height=2, point_step=16, row_step=row_step, data=data)
    )
    flat = xyzi.reshape(-1, 4)
    np.testing.assert_array_equal(frame.points, flat[[0, 2, 3, 4, 5]])
    assert np.isfinite(frame.points).all()


def test_cloud_empty_is_valid(make):
    for width, height in ((0, 1), (5, 0), (0, 0)):
        frame = pointcloud2_to_frame(
            make.cloud(fields=XYZI, width=width, height=height, point_step=16, row_step=16 * width, data=b"")
        )
        assert frame.points.shape == (0, 4) and frame.points.dtype == np.float32 and len(frame) == 0
    assert (
        len(
            pointcloud2_to_frame(make.cloud(fields=[], width=0, height=0, point_step=0, row_step=0, data=b""))
        )
        == 0
    )


def test_cloud_field_order_types_and_fallbacks(make):
    # Reversed order, float64 x, int16 y, uint8 z, 'i' as intensity, a count=3 'normal' field ignored.
    fields = [("i", 0, 2, 1), ("normal", 1, 7, 3), ("z", 13, 2, 1), ("y", 14, 3, 1), ("x", 16, 8, 1)]
    layout = {"names": ["i", "z", "y", "x"], "formats": ["u1", "u1", "i2", "f8"], "offsets": [0, 13, 14, 16]}
    values = np.array([[[200, 3, -300, 1.5e3], [0, 255, 32767, -2.25]]])
    data, row_step = _pack(values, layout, 24)
    frame = pointcloud2_to_frame(
        make.cloud(fields=fields, width=2, height=1, point_step=24, row_step=row_step, data=data)
    )
    np.testing.assert_array_equal(frame.points, [[1.5e3, -300, 3, 200], [-2.25, 32767, 255, 0]])
    no_intensity = [f for f in fields if f[0] != "i"]
    frame = pointcloud2_to_frame(
        make.cloud(fields=no_intensity, width=2, height=1, point_step=24, row_step=row_step, data=data)
    )
    np.testing.assert_array_equal(frame.points[:, 3], [0, 0])


def test_cloud_intensity_preferred_over_i(make):
    fields = [("i", 12, 7, 1), ("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("intensity", 16, 7, 1)]
    layout = {"names": ["x", "y", "z", "i", "intensity"], "formats": ["f4"] * 5, "offsets": [0, 4, 8, 12, 16]}
    data, row_step = _pack(np.array([[[1, 2, 3, 9, 42]]]), layout, 20)
    msg = make.cloud(fields=fields, width=1, height=1, point_step=20, row_step=row_step, data=data)
    np.testing.assert_array_equal(pointcloud2_to_frame(msg).points, [[1, 2, 3, 42]])


def test_cloud_integer_time_is_ns_offset(make):
    fields = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("t", 12, 6, 1)]
    layout = {"names": ["x", "y", "z", "t"], "formats": ["f4", "f4", "f4", "u4"], "offsets": [0, 4, 8, 12]}
    values = np.array([[[1, 1, 1, 5_000_000], [2, 2, 2, 1_000_000], [3, 3, 3, 101_000_000]]])
    data, row_step = _pack(values, layout, 16)
    frame = pointcloud2_to_frame(
        make.cloud(fields=fields, width=3, height=1, point_step=16, row_step=row_step, data=data)
    )
    np.testing.assert_allclose(frame.time, [0.004, 0.0, 0.1], rtol=1e-6)
    assert frame.time.dtype == np.float32 and frame.ring is None


@pytest.mark.parametrize(("kind", "values", "seconds"), [
    ("f8", 1_700_000_000.0 + np.array([2e-5, 0.0, 1e-5]), [2e-5, 0.0, 1e-5]),  # Hesai: epoch seconds
    ("f8", 1.7e18 + np.array([2e4, 0.0, 1e4]), [2e-5, 0.0, 1e-5]),  # Livox: epoch nanoseconds as a double
    ("u8", 1_700_000_000_000_000_000 + np.array([20_000, 0, 10_000], np.uint64), [2e-5, 0.0, 1e-5]),  # UINT64
    ("f4", np.array([0.05, -0.05, np.nan]), [0.1, 0.0, np.nan]),  # offsets from the stamp; NaN: unknown
])
def test_cloud_point_times_are_seconds_from_the_earliest_point(make, kind, values, seconds):
    datatype = {"f4": 7, "f8": 8, "u8": 10}[kind]
    fields = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("timestamp", 16, datatype, 1)]
    layout = {"names": ["x", "y", "z", "timestamp"], "formats": ["f4", "f4", "f4", kind], "offsets": [0, 4, 8, 16],
              "itemsize": 24}
    rows = np.zeros(3, np.dtype(layout))
    rows["x"], rows["timestamp"] = [1, 2, 3], values
    msg = make.cloud(fields=fields, width=3, height=1, point_step=24, row_step=72, data=rows.tobytes())
    frame = pointcloud2_to_frame(msg)
    assert frame.time.dtype == np.float32
    np.testing.assert_allclose(frame.time, seconds, rtol=1e-4, atol=1e-7, equal_nan=True)


def test_cloud_dropped_point_does_not_move_the_others_times(make):
    fields = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("t", 12, 6, 1)]
    layout = {"names": ["x", "y", "z", "t"], "formats": ["f4", "f4", "f4", "u4"], "offsets": [0, 4, 8, 12]}
    values = np.array([[[np.nan, 1, 1, 0], [2, 2, 2, 1000], [3, 3, 3, 2000]]])  # the earliest point is NaN
    data, row_step = _pack(values, layout, 16)
    frame = pointcloud2_to_frame(make.cloud(fields=fields, width=3, height=1, point_step=16, row_step=row_step,
                                            data=data))
    np.testing.assert_allclose(frame.time, [1e-6, 2e-6], rtol=1e-6)


def test_cloud_lyrical_datatypes_int64_uint64_bool(make):
    fields = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("t", 16, 9, 1), ("valid", 24, 11, 1)]
    layout = {"names": ["x", "y", "z", "t", "valid"], "formats": ["f4", "f4", "f4", "i8", "?"],
              "offsets": [0, 4, 8, 16, 24], "itemsize": 32}
    rows = np.zeros(2, np.dtype(layout))
    rows["x"], rows["t"], rows["valid"] = [1, 2], [-5_000, 5_000], True
    frame = pointcloud2_to_frame(make.cloud(fields=fields, width=2, height=1, point_step=32, row_step=64,
                                            data=rows.tobytes()))
    np.testing.assert_array_equal(frame.points[:, 0], [1, 2])
    np.testing.assert_allclose(frame.time, [0.0, 1e-5], rtol=1e-6)


@pytest.mark.parametrize("rings, expected", [([0.0, 15.0, 3.0], [0, 15, 3]), ([0.5, 1.0, float("nan")], None)])
def test_cloud_float_ring_never_costs_the_cloud(make, rings, expected, caplog, monkeypatch):
    """A float32 ring field (as a public driving dataset's lidar sends): whole numbers are ring ids, any
    other values leave the ring out with one note; the points are kept either way."""
    fields = [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("ring", 12, 7, 1)]
    layout = {"names": ["x", "y", "z", "ring"], "formats": ["f4"] * 4, "offsets": [0, 4, 8, 12]}
    values = np.array([[[1, 1, 1, rings[0]], [2, 2, 2, rings[1]], [3, 3, 3, rings[2]]]])
    data, row_step = _pack(values, layout, 16)
    msg = make.cloud(fields=fields, width=3, height=1, point_step=16, row_step=row_step, data=data)
    monkeypatch.setattr(adapters, "_noted", set())  # notes already made by other tests
    with caplog.at_level("WARNING", logger="fusion_attn.adapters"):
        frames = [pointcloud2_to_frame(msg) for _ in range(2)]
    assert len(frames[0]) == 3
    if expected is None:
        assert frames[0].ring is None
        assert len([r for r in caplog.records if "ring left out" in r.message]) == 1  # noted once, not per cloud
    else:
        np.testing.assert_array_equal(frames[0].ring, expected)
        assert frames[0].ring.dtype == np.uint16


def test_cloud_errors(make):
    def cloud(fields=XYZI, width=2, height=1, point_step=16, row_step=32, data=bytes(32)):
        return make.cloud(
            fields=fields, width=width, height=height, point_step=point_step, row_step=row_step, data=data
        )

    _raises(pointcloud2_to_frame, cloud(fields=XYZI[1:]), "sensor_msgs/msg/PointCloud2", "no x field")
    _raises(pointcloud2_to_frame, cloud(fields=[("intensity", 0, 7, 1)]), "no x/y/z field")
    _raises(
        pointcloud2_to_frame,
        cloud(fields=[*XYZI, ("ring", 15, 4, 1)]),
        "fields[4] 'ring'",
        "does not fit point_step 16",
    )
    _raises(pointcloud2_to_frame, cloud(fields=[*XYZI[:3], ("v", 8, 7, 3)]), "'v' at offset 8 (3 x 4 bytes)")
    _raises(pointcloud2_to_frame, cloud(point_step=0, row_step=0), "point_step 0 with 2 points")
    _raises(pointcloud2_to_frame, cloud(data=bytes(31)), "31 bytes", "needs 32")
    _raises(pointcloud2_to_frame, cloud(row_step=31), "row_step 31 < width 2 * point_step 16")
    _raises(pointcloud2_to_frame, cloud(fields=[*XYZI[:3], ("rgb", 12, 12, 1)]), "unknown datatype 12")


# --- LaserScan -----------------------------------------------------------------------------------


def test_scan_geometry(make):
    msg = make.scan(
        ranges=[1.0, 2.0, 3.0, 4.0],
        intensities=[10, 20, 30, 40],
        angle_min=-math.pi / 2,
        angle_increment=math.pi / 2,
    )
    frame = laserscan_to_frame(msg)
    expected = [[0, -1, 0, 10], [2, 0, 0, 20], [0, 3, 0, 30], [-4, 0, 0, 40]]
    np.testing.assert_allclose(frame.points, expected, atol=1e-6)
    assert (
        frame.points.dtype == np.float32 and frame.stamp_ns == 12_000_000_345 and frame.frame_id == "sensor"
    )


def test_scan_filters_ranges(make):
    ranges = [0.05, 0.5, np.nan, np.inf, 30.0, 10.0, -1.0, 20.0]
    msg = make.scan(
        ranges=ranges,
        intensities=[1, 2, 3, 4, 5, 6, 7, 8],
        angle_increment=0.01,
        range_min=0.1,
        range_max=20.0,
    )
    frame = laserscan_to_frame(msg)
    kept = [1, 5, 7]  # inside [range_min, range_max]; range_max itself is kept
    np.testing.assert_allclose(
        np.hypot(frame.points[:, 0], frame.points[:, 1]), [ranges[i] for i in kept], rtol=1e-6
    )
    np.testing.assert_allclose(frame.points[:, 3], [2, 6, 8])


def test_scan_infinite_range_max_keeps_the_finite_beams_quietly(make, recwarn):
    frame = laserscan_to_frame(make.scan(ranges=[np.inf, 1.0], range_max=np.inf))
    np.testing.assert_allclose(frame.points[:, :2], [[np.cos(0.1), np.sin(0.1)]], rtol=1e-6)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_scan_intensity_mismatch_ignored(make):
    frame = laserscan_to_frame(make.scan(ranges=[1.0, 2.0, 3.0], intensities=[5.0]))
    assert len(frame) == 3 and (frame.points[:, 3] == 0).all()
    frame = laserscan_to_frame(make.scan(ranges=[1.0, 2.0], intensities=[]))
    assert (frame.points[:, 3] == 0).all()


def test_scan_zero_increment(make):
    _raises(
        laserscan_to_frame,
        make.scan(ranges=[1.0, 2.0], angle_increment=0.0),
        "sensor_msgs/msg/LaserScan",
        "angle_increment 0 with 2 ranges",
    )
    frame = laserscan_to_frame(make.scan(ranges=[2.0], angle_min=math.pi, angle_increment=0.0))
    np.testing.assert_allclose(frame.points, [[-2, 0, 0, 0]], atol=1e-6)
    assert len(laserscan_to_frame(make.scan(ranges=[], angle_increment=0.0))) == 0


def test_scan_non_finite_angle(make):
    _raises(laserscan_to_frame, make.scan(ranges=[1.0], angle_min=math.nan), "non-finite angle_min")


# --- Imu -----------------------------------------------------------------------------------------


def test_imu_values(make):
    sample = imu_to_sample(
        make.imu(accel=(0.1, -0.2, 9.8), gyro=(0.01, 0.02, -0.03), orientation=(0, 0, 0.6, 0.8))
    )
    assert sample.accel.dtype == np.float64 and sample.accel.tolist() == [0.1, -0.2, 9.8]
    assert sample.gyro.tolist() == [0.01, 0.02, -0.03]
    assert sample.orientation.tolist() == [0, 0, 0.6, 0.8]
    assert (sample.stamp_ns, sample.frame_id) == (12_000_000_345, "sensor")


def test_imu_unknown_orientation(make):
    assert imu_to_sample(make.imu(orientation=(0, 0, 0.6, 0.8), cov0=-1.0)).orientation is None
    assert imu_to_sample(make.imu(orientation=(0, 0, 0, 0))).orientation is None  # all-zero: unknown
    assert imu_to_sample(make.imu(orientation=(0, 0, np.nan, 1))).orientation is None


@pytest.mark.parametrize(
    ("accel", "gyro"),
    [((np.nan, 0, 9.8), (0, 0, 0)), ((0, 0, 9.8), (0, np.inf, 0)), ((-np.inf, 0, 0), (np.nan,) * 3)],
)
def test_imu_non_finite_rejected(make, accel, gyro):
    _raises(imu_to_sample, make.imu(accel=accel, gyro=gyro), "sensor_msgs/msg/Imu", "non-finite")


@pytest.mark.parametrize("missing", ["linear_acceleration", "angular_velocity"])
def test_imu_without_accel_or_gyro_is_refused_not_read_as_zero(make, missing):
    """REP-145: covariance[0] = -1 says the IMU does not provide that vector; its zeros are no reading
    (free fall, a robot standing still), so the sample is refused by name."""
    flags = {"accel_cov0": -1.0} if missing == "linear_acceleration" else {"gyro_cov0": -1.0}
    _raises(imu_to_sample, make.imu(accel=(0, 0, 0), gyro=(0, 0, 0), **flags), f"{missing} not provided")


# --- missing and wrong-typed fields --------------------------------------------------------------


def test_missing_field_named():
    msg = MAKERS[1].image(height=1, width=1, encoding="mono8", step=1, data=b"\0")
    ns = SimpleNamespace(
        **{
            name: getattr(msg, name)
            for name in ("header", "height", "width", "encoding", "is_bigendian", "data")
        }
    )
    _raises(image_to_frame, ns, "missing field 'step'")
    _raises(imu_to_sample, SimpleNamespace(header=msg.header), "missing field 'linear_acceleration'")
    _raises(
        laserscan_to_frame,
        SimpleNamespace(header=SimpleNamespace(stamp=msg.header.stamp)),
        "missing field 'header.frame_id'",
    )
    _raises(pointcloud2_to_frame, None, "missing field 'header.stamp.sec'")


# --- property tests ------------------------------------------------------------------------------

STRUCT = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 8: "d", 9: "q", 10: "Q", 11: "B"}  # BOOL: a byte
NAMES = ["x", "y", "z", "intensity", "i", "ring", "t", "time", "timestamp", "vrad", "x"]


def _mostly(usual, rare, odds=10):
    """`rare` one time in `odds`, else `usual`: keeps most examples valid while still probing the edges."""
    return st.integers(1, odds).flatmap(lambda roll: rare if roll == 1 else usual)


@st.composite
def cloud_cases(draw):
    names = draw(st.lists(st.sampled_from(NAMES), max_size=6))
    if draw(_mostly(st.just(True), st.just(False))):
        names = draw(st.permutations(["x", "y", "z", *[n for n in names if n not in "xyz"]]))
    fields, end = [], 0
    for name in names:
        datatype = draw(
            _mostly(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 7, 7, 8]), st.sampled_from([0, 12, 255]), 40)
        )
        count = draw(_mostly(st.just(1), st.sampled_from([0, 2, 3]), 4))
        offset = draw(
            _mostly(st.integers(end, end + 3), st.integers(0, 40), 5)
        )  # gaps, or anywhere (overlaps)
        fields.append((name, offset, datatype, count))
        end = max(end, offset + struct.calcsize(STRUCT.get(datatype, "b")) * max(count, 1))
    point_step = draw(_mostly(st.integers(end, end + 6), st.integers(0, 40)))
    width, height = draw(
        _mostly(st.tuples(st.integers(1, 5), st.integers(1, 3)), st.sampled_from([(0, 0), (0, 2), (3, 0)]))
    )
    row_step = draw(_mostly(st.integers(width * point_step, width * point_step + 5), st.integers(0, 80)))
    size = draw(_mostly(st.integers(row_step * height, row_step * height + 4), st.integers(0, 200)))
    bigendian = draw(st.booleans())
    data = draw(st.binary(min_size=size, max_size=size))
    return {
        "fields": fields,
        "width": width,
        "height": height,
        "point_step": point_step,
        "row_step": row_step,
        "data": data,
        "is_bigendian": bigendian,
    }


def reference_cloud(fields, width, height, point_step, row_step, data, is_bigendian):
    """Per-point struct decoding of the adapter's contract; None where it must reject the cloud."""
    if width * height == 0:
        return np.zeros((0, 4), np.float32), None, None
    if point_step == 0 or row_step < width * point_step or len(data) < row_step * height:
        return None
    layout = {}
    for name, offset, datatype, count in fields:
        if datatype not in STRUCT or offset + struct.calcsize(STRUCT[datatype]) * max(count, 1) > point_step:
            return None
        layout.setdefault(name, (STRUCT[datatype], offset))
    if not {"x", "y", "z"} <= layout.keys():
        return None
    order = ">" if is_bigendian else "<"
    intensity = next((n for n in ("intensity", "i") if n in layout), None)
    time = next((n for n in ("t", "time", "timestamp") if n in layout), None)
    columns = ["x", "y", "z", intensity, "ring" if "ring" in layout else None, time]
    rows = [
        [
            struct.unpack_from(
                order + layout[name][0], data, r * row_step + c * point_step + layout[name][1]
            )[0]
            if name
            else 0
            for name in columns
        ]
        for r in range(height)
        for c in range(width)
    ]
    values = np.array(rows, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        points = values[:, :4].astype(np.float32)
    keep = np.isfinite(points).all(axis=1)
    def exact(name):  # a column's integers as Python ints, every point
        return [struct.unpack_from(order + layout[name][0], data, r * row_step + c * point_step + layout[name][1])[0]
                for r in range(height) for c in range(width)]

    ring = None
    if "ring" in layout and layout["ring"][0] not in "fd":
        ring = np.array([n % 65536 for n in exact("ring")], np.uint16)[keep]
    elif "ring" in layout:  # float ring ids: kept when every one is a whole number in uint16's range
        r = values[keep, 4]
        with np.errstate(invalid="ignore"):
            ring = r.astype(np.uint16) if np.all((r == np.round(r)) & (r >= 0) & (r <= 65535)) else None
    times = None
    if time and layout[time][0] in "fd":  # seconds (nanoseconds beyond 1e12) from the earliest of all points
        t = values[:, 5]
        finite = t[np.isfinite(t)]
        with np.errstate(over="ignore", invalid="ignore"):
            t = t * 1e-9 if finite.size and np.abs(finite).max() > 1e12 else t
            times = (t - (t[np.isfinite(t)].min() if finite.size else np.nan)).astype(np.float32)[keep]
    elif time:  # integer nanoseconds, exactly (Python ints), from the earliest of all points
        ns = exact(time)
        times = np.array([(n - min(ns)) * 1e-9 for n in ns], np.float32)[keep]
    return points[keep], ring, times


@pytest.mark.parametrize("maker", MAKERS, ids=lambda m: m.kind)
@FUZZ
@given(case=cloud_cases())
def test_cloud_property(maker, case):
    expected = reference_cloud(**case)
    msg = maker.cloud(**case)
    if expected is None:
        with pytest.raises(MalformedMessageError):
            pointcloud2_to_frame(msg)
        return
    frame = pointcloud2_to_frame(msg)
    points, ring, times = expected
    assert frame.points.dtype == np.float32 and frame.points.shape == points.shape
    np.testing.assert_array_equal(frame.points, points)
    assert np.isfinite(frame.points).all()
    if ring is None:
        assert frame.ring is None
    else:
        np.testing.assert_array_equal(frame.ring, ring)
    if times is None:
        assert frame.time is None
    else:
        np.testing.assert_allclose(frame.time, times, rtol=1e-6, equal_nan=True)


IMAGE_LAYOUT = {  # encoding -> (struct char, channels, output channel order)
    "rgb8": ("B", 3, [0, 1, 2]),
    "bgr8": ("B", 3, [2, 1, 0]),
    "rgba8": ("B", 4, [0, 1, 2]),
    "bgra8": ("B", 4, [2, 1, 0]),
    "mono8": ("B", 1, [0]),
    "8UC1": ("B", 1, [0]),
    "8UC3": ("B", 3, [2, 1, 0]),
    "8UC4": ("B", 4, [2, 1, 0]),
    "mono16": ("H", 1, [0]),
    "16UC1": ("H", 1, [0]),
    "32FC1": ("f", 1, [0]),
}


@st.composite
def image_cases(draw):
    invalid = st.sampled_from(["RGB8", "bgr16", "8UC2", "", "mono8 "]) | st.text(max_size=6)
    encoding = draw(_mostly(st.sampled_from(list(IMAGE_LAYOUT)), invalid))
    char, channels, _ = IMAGE_LAYOUT.get(encoding, ("B", 3, None))
    width, height = draw(_mostly(st.integers(1, 5), st.just(0))), draw(_mostly(st.integers(1, 4), st.just(0)))
    pixel = struct.calcsize(char) * channels
    step = draw(_mostly(st.integers(width * pixel, width * pixel + 5), st.integers(0, 40)))
    size = draw(_mostly(st.integers(step * height, step * height + 3), st.integers(0, 120)))
    data = draw(st.binary(min_size=size, max_size=size))
    bigendian = draw(st.booleans())
    return {
        "height": height,
        "width": width,
        "encoding": encoding,
        "step": step,
        "data": data,
        "is_bigendian": bigendian,
    }


def reference_image(height, width, encoding, step, data, is_bigendian):
    if encoding not in IMAGE_LAYOUT or width == 0 or height == 0:
        return None
    char, channels, order = IMAGE_LAYOUT[encoding]
    size = struct.calcsize(char)
    if step < width * channels * size or len(data) < step * height:
        return None
    fmt = (">" if is_bigendian else "<") + char
    pixels = [
        [
            [struct.unpack_from(fmt, data, r * step + (c * channels + ch) * size)[0] for ch in order]
            for c in range(width)
        ]
        for r in range(height)
    ]
    return np.array(pixels, {"B": np.uint8, "H": np.uint16, "f": np.float32}[char])


@pytest.mark.parametrize("maker", MAKERS, ids=lambda m: m.kind)
@FUZZ
@given(case=image_cases())
def test_image_property(maker, case):
    expected = reference_image(**case)
    msg = maker.image(**case)
    if expected is None:
        with pytest.raises(MalformedMessageError):
            image_to_frame(msg)
        return
    frame = image_to_frame(msg)
    assert frame.image.dtype == expected.dtype and frame.image.flags.c_contiguous
    np.testing.assert_array_equal(frame.image, expected)


# Valid messages as plain namespaces, holding only the fields each converter reads.
def _ns_header():
    return SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=2), frame_id="f")


def _valid_namespaces():
    vec = SimpleNamespace  # geometry_msgs Vector3 / Quaternion stand-in
    return {
        "sensor_msgs/msg/Image": SimpleNamespace(
            header=_ns_header(), height=1, width=2, encoding="mono8", is_bigendian=0, step=2, data=b"ab"
        ),
        "sensor_msgs/msg/CompressedImage": SimpleNamespace(
            header=_ns_header(), format="png", data=_encode(".png", np.zeros((2, 2), np.uint8))
        ),
        "sensor_msgs/msg/PointCloud2": SimpleNamespace(
            header=_ns_header(),
            height=1,
            width=1,
            fields=[
                SimpleNamespace(name=n, offset=o, datatype=7, count=1)
                for n, o in (("x", 0), ("y", 4), ("z", 8))
            ],
            is_bigendian=False,
            point_step=12,
            row_step=12,
            data=bytes(12),
        ),
        "sensor_msgs/msg/LaserScan": SimpleNamespace(
            header=_ns_header(),
            angle_min=0.0,
            angle_increment=0.1,
            range_min=0.0,
            range_max=9.0,
            ranges=[1.0, 2.0],
            intensities=[],
        ),
        "sensor_msgs/msg/Imu": SimpleNamespace(
            header=_ns_header(),
            orientation=vec(x=0.0, y=0.0, z=0.0, w=1.0),
            orientation_covariance=[0.0] * 9,
            angular_velocity=vec(x=0.0, y=0.0, z=0.0),
            angular_velocity_covariance=[0.0] * 9,
            linear_acceleration=vec(x=0.0, y=0.0, z=9.8),
            linear_acceleration_covariance=[0.0] * 9,
        ),
    }


def _leaf_paths(obj, prefix=""):
    for name, value in vars(obj).items():
        path = f"{prefix}{name}"
        yield path
        if isinstance(value, SimpleNamespace):
            yield from _leaf_paths(value, path + ".")


TEXT_FIELDS = {"encoding", "format", "header.frame_id"}
NOT_TEXT = [None, 7, 1.5, object(), [1, 2]]
NOT_NUMBER = [None, "7", object(), {"a": 1}, SimpleNamespace()]


def test_namespaces_are_valid():
    for msgtype, ns in _valid_namespaces().items():
        SUPPORTED_TYPES[msgtype](ns)


@FUZZ
@given(data=st.data())
def test_garbage_objects(data):
    msgtype, ns = data.draw(st.sampled_from(sorted(_valid_namespaces().items())))
    paths = data.draw(st.lists(st.sampled_from(list(_leaf_paths(ns))), min_size=1, max_size=3, unique=True))
    for path in paths:
        *parents, leaf = path.split(".")
        holder = ns
        for parent in parents:
            holder = getattr(holder, parent, None)
        if not isinstance(holder, SimpleNamespace) or not hasattr(holder, leaf):
            continue  # an earlier corruption already removed or replaced this branch
        if data.draw(st.booleans()):
            delattr(holder, leaf)
        else:
            setattr(holder, leaf, data.draw(st.sampled_from(NOT_TEXT if path in TEXT_FIELDS else NOT_NUMBER)))
    with pytest.raises(MalformedMessageError):
        SUPPORTED_TYPES[msgtype](ns)
    ns.__msgtype__ = msgtype
    with pytest.raises(MalformedMessageError):
        to_frame(ns)


@FUZZ
@given(
    garbage=st.one_of(
        st.none(), st.integers(), st.text(), st.binary(), st.lists(st.integers()), st.builds(object)
    )
)
def test_garbage_values(garbage):
    for convert in SUPPORTED_TYPES.values():
        with pytest.raises(MalformedMessageError):
            convert(garbage)


# --- real recordings -----------------------------------------------------------------------------


def _read(path: Path, topics: set[str]) -> dict[str, list]:
    """topic -> [(msgtype, message), ...] for the topics given, in bag order."""
    from rosbags.highlevel import AnyReader

    found: dict[str, list] = {topic: [] for topic in topics}
    with AnyReader([path]) as reader:
        connections = [c for c in reader.connections if c.topic in topics]
        for connection, _, raw in reader.messages(connections=connections):
            found[connection.topic].append(reader.deserialize(raw, connection.msgtype))
    return found


def _increasing(stamps: list[int], strictly=True) -> bool:
    d = np.diff(stamps)
    return bool((d > 0).all() if strictly else (d >= 0).all())


def test_real_euroc(real_data):
    found = _read(real_data / "euroc_v1_01_cam_imu", {"/cam0/image_raw", "/imu0"})
    images = [to_frame(m) for m in found["/cam0/image_raw"]]
    assert len(images) == 40
    for frame in images:
        assert (
            frame.encoding == "mono8" and frame.image.shape == (480, 752, 1) and frame.image.dtype == np.uint8
        )
        assert frame.frame_id == "cam0" and 20 < frame.image.mean() < 235  # a real exposure, not blank
    assert _increasing([f.stamp_ns for f in images])
    np.testing.assert_allclose(np.diff([f.stamp_ns for f in images]) / 1e9, 0.05, atol=1e-3)  # 20 Hz
    samples = [to_frame(m) for m in found["/imu0"]]
    assert len(samples) == 401 and all(s.orientation is None for s in samples)  # covariance[0] == -1
    accel = np.stack([s.accel for s in samples])
    assert np.isfinite(accel).all() and 8.0 < np.linalg.norm(accel, axis=1).mean() < 11.5  # gravity
    assert np.abs(np.stack([s.gyro for s in samples])).max() < 5.0
    assert _increasing([s.stamp_ns for s in samples])
    assert images[0].stamp_ns == samples[0].stamp_ns  # hardware-synchronised clocks


def test_real_lidar_camera_frame(real_data):
    found = _read(real_data / "lidar_camera_frame", {"/lidar/points", "/camera/image_raw/compressed"})
    (cloud_msg,), (image_msg,) = found["/lidar/points"], found["/camera/image_raw/compressed"]
    cloud = to_frame(cloud_msg)
    assert len(cloud) == 78_238  # every point of this cloud is finite
    assert cloud.points.dtype == np.float32 and np.isfinite(cloud.points).all()
    ranges = np.linalg.norm(cloud.points[:, :3], axis=1)
    assert 100 < ranges.max() < 200 and cloud.points[:, 3].min() >= 0 and cloud.points[:, 3].max() <= 255
    np.testing.assert_array_equal(cloud.points, np.frombuffer(cloud_msg.data, "<f4").reshape(-1, 4))
    image = to_frame(image_msg)
    assert image.encoding == "rgb8" and image.image.shape == (1200, 1920, 3)
    assert (
        image.stamp_ns == cloud.stamp_ns
        and image.frame_id == "center_camera"
        and cloud.frame_id == "top_center_lidar"
    )
    decoded = cv2.imdecode(image_msg.data, cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(image.image, decoded[..., ::-1])


def test_real_sick_scan_and_clouds(real_data):
    topics = {"/sick_lms_1xx/scan", "/cloud", "/cloud_radar_rawtarget", "/cloud_radar_track"}
    found = _read(real_data / "sick_lms1xx_scan_cloud_radar.bag", topics)
    scans = [(m, to_frame(m)) for m in found["/sick_lms_1xx/scan"]]
    assert len(scans) == 89
    for msg, frame in scans:
        assert len(msg.ranges) == 541 and 0 < len(frame) <= 541
        r = np.hypot(frame.points[:, 0], frame.points[:, 1])
        assert (r >= msg.range_min * 0.999).all() and (r <= msg.range_max * 1.001).all()
        assert (frame.points[:, 2] == 0).all()
    assert _increasing([f.stamp_ns for _, f in scans])

    clouds = {f.stamp_ns: f for f in map(to_frame, found["/cloud"])}
    assert len(clouds) == 89
    for msg, scan in scans:
        # The driver's /cloud keeps every beam (too-short ones too); its in-range points are the scan's.
        cloud = clouds[scan.stamp_ns].points
        assert cloud.shape == (541, 4) and np.isfinite(cloud).all()
        r = np.linalg.norm(cloud[:, :3], axis=1)
        in_range = cloud[(r >= msg.range_min) & (r <= msg.range_max)]
        np.testing.assert_allclose(in_range[:, :2], scan.points[:, :2], atol=1e-3)

    for topic, extra in (("/cloud_radar_rawtarget", "vrad"), ("/cloud_radar_track", "vx")):
        msgs = found[topic]
        assert msgs and all(extra in [f.name for f in m.fields] for m in msgs)
        frames = [to_frame(m) for m in msgs]
        assert all(len(f) > 0 and (f.points[:, 3] == 0).all() for f in frames)  # no intensity field
        assert np.linalg.norm(np.concatenate([f.points[:, :3] for f in frames]), axis=1).max() < 200
        assert frames[0].frame_id == "radar" and _increasing([f.stamp_ns for f in frames], strictly=False)


def test_physically_impossible_messages_are_dropped_and_counted_before_the_tokenizer(make, recwarn):
    """Finite but absurd values pass the adapters (they are well-formed messages) and stop at the sensor
    sync, counted per reason: the tokenizer never sees them (it warned of an invalid cast on that cloud)."""
    from fusion_attn.config import FusionConfig
    from fusion_attn.sync import SensorSync
    from fusion_attn.tokenize import Tokenizer

    xyzi = np.array([[[1, 2, 3, 4], [3e38, -3e38, 1, 1]]], np.float32)
    data, row_step = _pack(xyzi, F32, 16)
    cloud = to_frame(make.cloud(fields=XYZI, width=2, height=1, point_step=16, row_step=row_step, data=data))
    imu = to_frame(make.imu(accel=(0.0, 0.0, 1e30)))
    spinning = to_frame(make.imu(gyro=(0.0, 0.0, 1e3)))
    sync = SensorSync()
    assert [sync.add(f) for f in (cloud, imu, spinning)] == ["out_of_limits"] * 3
    health = sync.summary(0)
    assert health["lidar"]["drop_reasons"] == {"out_of_limits": 1} and health["lidar"]["received"] == 0
    assert health["imu"]["drop_reasons"] == {"out_of_limits": 2}
    Tokenizer(FusionConfig())(sync.snapshot(cloud.stamp_ns), np.ones(4, np.float32))
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
