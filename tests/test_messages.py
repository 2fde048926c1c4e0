"""frames -> messages is the exact inverse of the adapters, in the rosbags and the rclpy form alike."""

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from fusion_attn.adapters import to_frame
from fusion_attn.frames import CameraFrame, ImuSample, LidarFrame, stamp_to_ns
from fusion_attn.messages import image_msg, imu_msg, pointcloud2_msg, sensor_values_msg, to_rclpy

rng = np.random.default_rng(0)


@pytest.mark.parametrize("frame", [
    CameraFrame(1_500_000_123, "cam", rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "rgb8"),
    CameraFrame(7, "cam", rng.integers(0, 65535, (3, 2, 1), dtype=np.uint16), "mono16"),
    CameraFrame(7, "depth", rng.random((3, 4, 1), dtype=np.float32), "32FC1"),
])
def test_image_round_trip(frame):
    for msg in (image_msg(frame), to_rclpy(image_msg(frame))):
        back = to_frame(msg)
        assert back.stamp_ns == frame.stamp_ns and back.frame_id == frame.frame_id and back.encoding == frame.encoding
        np.testing.assert_array_equal(back.image, frame.image)


def test_pointcloud_round_trip():
    frame = LidarFrame(42, "lidar", rng.normal(size=(100, 4)).astype(np.float32))
    for msg in (pointcloud2_msg(frame), to_rclpy(pointcloud2_msg(frame))):
        np.testing.assert_array_equal(to_frame(msg).points, frame.points)


@pytest.mark.parametrize("orientation", [None, np.array([0.0, 0.0, 0.38268343, 0.92387953])])
def test_imu_round_trip(orientation):
    sample = ImuSample(3, "imu", np.array([0.1, -0.2, 9.81]), np.array([0.0, 0.01, 0.5]), orientation)
    for msg in (imu_msg(sample), to_rclpy(imu_msg(sample))):
        back = to_frame(msg)
        np.testing.assert_array_equal(back.accel, sample.accel)
        np.testing.assert_array_equal(back.gyro, sample.gyro)
        assert (back.orientation is None) == (orientation is None)


def test_ros1_bag_messages_convert_through_the_ros2_types(real_data):
    """A ROS 1 bag's types carry Header.seq; play converts them (to_rclpy) through the standard ROS 2 types."""
    with AnyReader([real_data / "husky_imu_odom_gps.bag"]) as reader:
        conn = next(c for c in reader.connections if c.topic == "/imu/data")
        _, _, raw = next(reader.messages([conn]))
        ros1 = reader.deserialize(raw, conn.msgtype)
    msg = to_rclpy(ros1)
    assert type(msg).__name__ == "Imu" and type(msg).__module__.startswith("sensor_msgs.msg")
    assert msg.header.frame_id == ros1.header.frame_id and msg.header.stamp.sec == ros1.header.stamp.sec
    assert msg.linear_acceleration.y == ros1.linear_acceleration.y


def test_per_sensor_values_are_a_standard_stamped_vector():
    """fused_state/attention and /trust: geometry_msgs/Vector3Stamped, x, y, z = camera, lidar, imu."""
    msg = to_rclpy(sensor_values_msg(1_500_000_123, "base_link", np.array([0.25, 0.0, 0.75], np.float32)))
    assert type(msg).__name__ == "Vector3Stamped" and type(msg).__module__.startswith("geometry_msgs.msg")
    assert (msg.vector.x, msg.vector.y, msg.vector.z) == (0.25, 0.0, 0.75)
    assert stamp_to_ns(msg.header.stamp) == 1_500_000_123 and msg.header.frame_id == "base_link"
