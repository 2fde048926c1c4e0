"""policy_node: drives the robot from the fused state with an exported attention-memory policy.

Subscribes fused_state (fusion_node's sensor_msgs/Image layout, fusion_attn/outputs.py) and, when the
policy was trained with a task observation, task_obs (std_msgs/Float32MultiArray: what the mission
layer gives the policy, e.g. the simulator bridge's obs["task"]). At the policy's decision rate it
builds the observation the policy was trained on, runs the ONNX policy (rl/export.py) on ONNX
Runtime, keeps the memory it returns, and publishes geometry_msgs/Twist on cmd_vel within max_linear
/ max_angular. It publishes a stop instead, and says why (throttled), whenever the fused state or the
task observation is older than stale_after_s, or missing. ~/reset_memory (std_srvs/Trigger) empties
the memory: call it at the start of each episode / mission.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import rclpy
from geometry_msgs.msg import Twist
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray
from std_srvs.srv import Trigger

from fusion_attn.frames import NS_PER_S, stamp_to_ns
from fusion_attn.outputs import parse_fused_state_rows
from fusion_attn.spin import spin


def discrete_actions() -> np.ndarray:
    from fusion_attn.sim.robot import DISCRETE_ACTIONS

    return DISCRETE_ACTIONS


class PolicyNode(Node):
    def __init__(self):
        super().__init__("policy_node")
        self.declare_parameter("policy", "")  # the ONNX file of `fusion-attn rl export`
        self.declare_parameter("max_linear", 0.8)  # m/s, both directions
        self.declare_parameter("max_angular", 1.5)  # rad/s
        self.declare_parameter("stale_after_s", 0.3)
        self.declare_parameter("threads", 1)
        path = self.get_parameter("policy").value
        if not path:
            raise SystemExit("policy_node: set the `policy` parameter to an exported policy (.onnx)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.get_parameter("threads").value
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.meta = json.loads(self.session.get_modelmeta().custom_metadata_map["fusion_attn.rl"])
        except Exception as exc:  # ORT has its own error types: say which file is wrong
            raise SystemExit(f"policy_node: cannot load policy {path}: {exc}") from exc
        obs = self.meta["observation"]
        self.fused_dim, self.heads, self.task_dim = obs["fused_dim"], obs["fusion_heads"], obs["task_dim"]
        self.discrete = self.meta["action_space"]["type"] == "discrete"
        self.fused = self.task = None  # (stamp_ns, array) of the newest of each
        self.reset_memory()
        self.cmd_pub = self.create_publisher(Twist, "cmd_vel", 10)
        self.create_subscription(Image, "fused_state", self._on_fused, qos_profile_sensor_data)
        if self.task_dim:
            self.create_subscription(Float32MultiArray, "task_obs", self._on_task, 10)
        self.create_service(Trigger, "~/reset_memory", self._on_reset)
        self.create_timer(self.meta["decision_period_s"], self._act)
        self.get_logger().info(f"policy {path}: {self.meta['config']['agent']['kind']} agent, "
                               f"{self.meta['config']['env_id']}, decisions every {self.meta['decision_period_s']:.3f} s")

    def reset_memory(self) -> None:
        memory = self.session.get_inputs()[1].shape
        k = self.session.get_inputs()[2].shape[1]
        self.memory = np.zeros((1, *memory[1:]), np.float32)
        self.memory_mask = np.zeros((1, k), np.bool_)

    def _on_reset(self, request, response):
        self.reset_memory()
        response.success, response.message = True, "memory cleared"
        return response

    def _on_fused(self, msg: Image) -> None:
        if msg.encoding != "32FC1" or msg.width != self.fused_dim:
            self.get_logger().warning(f"fused_state dropped: {msg.encoding} {msg.height}x{msg.width}, expected 32FC1 "
                                   f"rows of {self.fused_dim}", throttle_duration_sec=5.0)
            return
        rows = np.frombuffer(bytes(msg.data), np.float32).reshape(msg.height, msg.width)
        parts = parse_fused_state_rows(rows, self.heads)
        vector = np.concatenate([parts["fused"], parts["attention"].mean(axis=1)])
        if not np.all(np.isfinite(vector)):
            self.get_logger().warning("fused_state with NaN/inf dropped", throttle_duration_sec=5.0)
            return
        self.fused = (stamp_to_ns(msg.header.stamp), vector)

    def _on_task(self, msg: Float32MultiArray) -> None:
        data = np.asarray(msg.data, np.float32)
        if data.shape != (self.task_dim,) or not np.all(np.isfinite(data)):
            self.get_logger().warning(f"task_obs dropped: {data.shape[0]} values or non-finite, expected {self.task_dim}",
                                   throttle_duration_sec=5.0)
            return
        self.task = (self.get_clock().now().nanoseconds, data)

    def _act(self) -> None:
        now = self.get_clock().now().nanoseconds
        stale = self.get_parameter("stale_after_s").value * NS_PER_S
        why = None
        if self.fused is None or now - self.fused[0] > stale:
            why = "no fused state" if self.fused is None else f"fused state {(now - self.fused[0]) / 1e6:.0f} ms old"
        elif self.task_dim and (self.task is None or now - self.task[0] > stale):
            why = "no task observation" if self.task is None else "task observation stale"
        if why is not None:
            self.cmd_pub.publish(Twist())
            self.get_logger().warning(f"stopped: {why}", throttle_duration_sec=2.0)
            return
        obs = np.concatenate([self.fused[1]] + ([self.task[1]] if self.task_dim else []))[None].astype(np.float32)
        action, _, self.memory, self.memory_mask, _ = self.session.run(
            None, {"obs": obs, "memory": self.memory, "memory_mask": self.memory_mask})
        v, omega = discrete_actions()[int(action[0])] if self.discrete else action[0][:2]
        cmd = Twist()
        limit_v, limit_w = self.get_parameter("max_linear").value, self.get_parameter("max_angular").value
        cmd.linear.x = float(np.clip(v, -limit_v, limit_v))
        cmd.angular.z = float(np.clip(omega, -limit_w, limit_w))
        self.cmd_pub.publish(cmd)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args if args is not None else sys.argv)
    try:
        node = PolicyNode()
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    try:
        spin(node)
    finally:
        if rclpy.ok():  # after Ctrl-C/SIGTERM the context is gone: bases stop on their cmd_vel timeout
            node.cmd_pub.publish(Twist())  # leave the robot stopped
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
