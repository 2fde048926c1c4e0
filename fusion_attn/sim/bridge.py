"""sim_bridge: the simulator on ROS 2 topics, for closed-loop tests of the live nodes over DDS.

Publishes camera/image_raw (Image), lidar/points (PointCloud2), imu/data (Imu), odom (Odometry: the
wheel odometry's twist), ground_truth/pose (PoseStamped: the robot's true pose), task_obs (Float32MultiArray: the task's observation, what a mission layer would give
a policy) and /clock (simulated time; run the other nodes with use_sim_time:=true), and drives
the robot with the latest geometry_msgs/Twist on cmd_vel (linear.x [m/s], angular.z [rad/s]; zero
when none has arrived for half a second). Episodes restart when they end, on the same clock; at each
start the bridge calls reset_service (std_srvs/Trigger, default /policy_node/reset_memory) when it
is there, and logs each episode's end and success.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import gymnasium as gym
import numpy as np
import rclpy
from geometry_msgs.msg import Twist
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from std_msgs.msg import Float32MultiArray
from std_srvs.srv import Trigger

from fusion_attn.frames import NS_PER_S
from fusion_attn.messages import rclpy_class, to_rclpy
from fusion_attn.sim.record import TOPICS, ground_truth_msg
from fusion_attn.spin import accept_whole_numbers, spin

CMD_TIMEOUT_NS = NS_PER_S // 2


class SimBridge(Node):
    def __init__(self):
        super().__init__("sim_bridge")
        accept_whole_numbers(self, {"real_time_factor"})
        self.declare_parameter("env_id", "FusionAttn/Navigate-v0")
        self.declare_parameter("seed", 0)
        self.declare_parameter("real_time_factor", 1.0)
        self.declare_parameter("reset_service", "/policy_node/reset_memory")
        self.env = gym.make(self.get_parameter("env_id").value)
        self.seed = self.get_parameter("seed").value
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)  # best-effort subscribers match too
        self.pubs = {m: self.create_publisher(rclpy_class(msgtype), topic.lstrip("/"), qos)
                     for m, (topic, msgtype, _) in TOPICS.items()}
        self.truth_pub = self.create_publisher(rclpy_class("geometry_msgs/msg/PoseStamped"), "ground_truth/pose", 10)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10)
        self.task_pub = self.create_publisher(Float32MultiArray, "task_obs", 10)
        self.reset_client = self.create_client(Trigger, self.get_parameter("reset_service").value)
        self.episodes: list[dict] = []
        self.create_subscription(Twist, "cmd_vel", self._on_cmd_vel, 10)
        self.command, self.command_ns = (0.0, 0.0), None
        self.offset_ns = 0
        self._reset()
        sim = self.env.unwrapped
        period = sim.dt_ns * sim.substeps / NS_PER_S / self.get_parameter("real_time_factor").value
        self.create_timer(period, self._step)  # wall time: this node makes the clock

    def _on_cmd_vel(self, msg: Twist) -> None:
        self.command, self.command_ns = (msg.linear.x, msg.angular.z), self.sim_ns

    def _reset(self) -> None:
        obs, info = self.env.reset(seed=self.seed)
        self.seed += 1
        if self.reset_client.service_is_ready():
            self.reset_client.call_async(Trigger.Request())
        self._publish(obs, info)

    def _step(self) -> None:
        fresh = self.command_ns is not None and self.sim_ns - self.command_ns < CMD_TIMEOUT_NS
        v, omega = self.command if fresh else (0.0, 0.0)
        space = self.env.action_space
        action = np.clip(np.array([v, omega], np.float32), space.low, space.high)
        obs, _, terminated, truncated, info = self.env.step(action)
        self._publish(obs, info)
        if terminated or truncated:
            self.episodes.append({"success": bool(info.get("is_success")), "time_s": info["time_ns"] / NS_PER_S})
            self.get_logger().info(f"episode {len(self.episodes)} ended after {info['time_ns'] / NS_PER_S:.1f} s, "
                                   f"success {bool(info.get('is_success'))}")
            self.offset_ns += info["time_ns"] + NS_PER_S // 10
            self._reset()

    def _publish(self, obs, info) -> None:
        self.sim_ns = self.offset_ns + info["time_ns"]
        for frame, modality in zip(info["frames"], info["frames"].modalities):
            _, _, to_msg = TOPICS[modality]
            self.pubs[modality].publish(to_rclpy(to_msg(replace(frame, stamp_ns=frame.stamp_ns + self.offset_ns))))
        self.task_pub.publish(Float32MultiArray(data=[float(v) for v in obs["task"]]))
        self.truth_pub.publish(to_rclpy(ground_truth_msg(self.sim_ns, info["pose"])))
        # the clock last: a node whose timer the clock drives finds this instant's data there already, not
        # only the step before's (20 ms of a 200 Hz IMU's 50 ms max age, before any delivery delay)
        clock = Clock()
        clock.clock.sec, clock.clock.nanosec = divmod(self.sim_ns, NS_PER_S)
        self.clock_pub.publish(clock)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args if args is not None else sys.argv)
    node = SimBridge()
    try:
        spin(node)
    finally:
        node.env.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
