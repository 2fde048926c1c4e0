"""The simulator bridge over real DDS: it publishes the sensors and /clock, moves on cmd_vel, and the live
fusion_node (use_sim_time) fuses its camera, lidar and IMU in a closed loop."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import Spinner, ros_domain, stop_nodes, wait_until

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
from geometry_msgs.msg import PoseStamped, Twist
from nav_msgs.msg import Odometry
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, Imu, PointCloud2

from fusion_attn.outputs import parse_fused_state_rows

# the bridge simulates and renders in real time and the node keeps up with its 200 Hz IMU: with both cores
# busy elsewhere the node fell behind the IMU (its max age 50 ms) and masked it in most states fused then
pytestmark = pytest.mark.alone


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    domain = ros_domain(5)
    env = dict(os.environ, ROS_DOMAIN_ID=domain, PYTHONUNBUFFERED="1")
    os.environ["ROS_DOMAIN_ID"] = domain
    logs = tmp_path_factory.mktemp("logs")
    procs = [subprocess.Popen([sys.executable, "-m", "fusion_attn.sim.bridge", "--ros-args", "-p", "env_id:=FusionAttn/Control-v0"],
                              env=env, stdout=open(logs / "bridge.log", "w"), stderr=subprocess.STDOUT),  # noqa: SIM115
             subprocess.Popen([sys.executable, "-m", "fusion_attn.cli", "launch", "use_sim_time:=true"],
                              env=env, stdout=open(logs / "node.log", "w"), stderr=subprocess.STDOUT)]  # noqa: SIM115
    rclpy.init()
    node = rclpy.create_node("bridge_tester")
    seen = {"camera": 0, "lidar": 0, "imu": 0, "clock": [], "odom": [], "truth": [], "fused": []}

    def count(key):
        return lambda _msg: seen.__setitem__(key, seen[key] + 1)

    node.create_subscription(Image, "camera/image_raw", count("camera"), qos_profile_sensor_data)
    node.create_subscription(PointCloud2, "lidar/points", count("lidar"), qos_profile_sensor_data)
    node.create_subscription(Imu, "imu/data", count("imu"), qos_profile_sensor_data)
    node.create_subscription(Clock, "/clock", lambda m: seen["clock"].append(m.clock.sec * 10**9 + m.clock.nanosec), 10)
    node.create_subscription(Odometry, "odom", lambda m: seen["odom"].append(m), 10)
    node.create_subscription(PoseStamped, "ground_truth/pose", lambda m: seen["truth"].append(m), 10)
    node.create_subscription(Image, "fused_state", lambda m: seen["fused"].append(m), 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    Spinner(executor)
    yield node, seen, logs
    try:
        stop_nodes((procs[0], logs / "bridge.log"), (procs[1], logs / "node.log"))  # the launcher: 10 s for its nodes
    finally:  # a hung node fails this test; rclpy is shut down all the same, for the modules after it
        executor.shutdown()
        rclpy.shutdown()


def test_bridge_publishes_sensors_and_clock_and_moves_on_cmd_vel(graph):
    node, seen, logs = graph
    assert wait_until(lambda: len(seen["truth"]) > 20 and len(seen["odom"]) > 20 and seen["lidar"] > 2, 60), \
        (logs / "bridge.log").read_text()
    assert seen["camera"] > 0 and seen["imu"] > 10
    clock = np.array(seen["clock"])
    assert np.all(np.diff(clock) >= 0) and clock[-1] > clock[0]
    still = seen["truth"][-1].pose.position
    time.sleep(0.5)
    assert abs(seen["truth"][-1].pose.position.x - still.x) < 0.01  # no command: it stays

    cmd = node.create_publisher(Twist, "cmd_vel", 10)
    assert wait_until(lambda: cmd.get_subscription_count() > 0, 10)  # a command before discovery is lost
    start = seen["truth"][-1].pose.position
    forward = Twist()
    forward.linear.x = 0.5
    for _ in range(30):  # 1.5 s of "ahead at 0.5 m/s", refreshed faster than the bridge's timeout
        cmd.publish(forward)
        time.sleep(0.05)
    end = seen["truth"][-1].pose.position
    moved = np.hypot(end.x - start.x, end.y - start.y)
    assert 0.2 < moved < 1.0, moved  # about 0.5 m/s for 1.5 s, less the ramp-up and any wall
    assert max(m.twist.twist.linear.x for m in seen["odom"][-20:]) > 0.3  # the wheel odometry read it too


def test_fusion_node_fuses_the_simulated_sensors_in_closed_loop(graph):
    _, seen, logs = graph
    # judged: states fused while this test runs alone. The bridge and node (the fixture's) keep running
    # between the module's tests, when the other worker may run; half a second of states is skipped so
    # that a queue that fell behind then has drained, and the node's first 20 (its start) are not judged
    first = max(len(seen["fused"]) + 5, 20)
    assert wait_until(lambda: len(seen["fused"]) >= first + 10, 60), (logs / "node.log").read_text()
    attention = [parse_fused_state_rows(np.frombuffer(bytes(m.data), np.float32).reshape(m.height, m.width), heads=4)
                 ["attention"] for m in seen["fused"]]
    judged = attention[first:first + 10]
    present = [bool(np.all(a.sum(1) > 0)) for a in judged]  # camera, lidar and IMU all attended
    print(f"all three sensors attended in {sum(present)} of the 10 fused states judged; the IMU masked in "
          f"{sum(not a[2].sum() > 0 for a in attention)} of all {len(attention)}")
    assert sum(present) >= 8, judged
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in seen["fused"][first:first + 10]]
    assert max(stamps) <= seen["clock"][-1]  # stamped on the simulated clock
