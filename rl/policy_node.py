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
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Twist
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray
from std_srvs.srv import Trigger

from fusion_attn.contract import CONTRACT_KEY, PolicyContract, observation_vector
from fusion_attn.errors import ConfigError
from fusion_attn.frames import NS_PER_S, stamp_to_ns
from fusion_attn.messages import diagnostics_msg, to_rclpy
from fusion_attn.outputs import ERROR, OK, Status, parse_fused_state_rows
from fusion_attn.spin import accept_whole_numbers, spin

FUSION_STATUS = "fusion_attn: fusion"  # fusion_node's status that carries its contract terms


def fused_parts(msg: Image, contract: PolicyContract) -> dict[str, np.ndarray]:
    """A fused_state message (fusion_attn/outputs.py layout) -> its parts; ValueError saying why not."""
    layout = contract.observation
    if msg.encoding != "32FC1" or msg.width != layout.fused_dim:
        raise ValueError(f"{msg.encoding} {msg.height}x{msg.width}, expected 32FC1 rows of {layout.fused_dim}")
    rows = np.frombuffer(bytes(msg.data), np.float32).reshape(msg.height, msg.width)
    parts = parse_fused_state_rows(rows, contract.fusion_heads, layout.sensors, layout.ego_rate)
    if not all(np.all(np.isfinite(parts[k])) for k in ("fused", "attention", "ego_rate") if k in parts):
        raise ValueError("NaN/inf in it")
    return parts


def observation(parts: dict[str, np.ndarray], task: np.ndarray | None, contract: PolicyContract) -> np.ndarray:
    """The policy's input from a fused state's parts and the task input, as the simulator built it in training."""
    return observation_vector(contract.observation, parts["fused"], parts["attention"].mean(axis=1), task,
                              parts.get("ego_rate"))


class PolicyNode(Node):
    def __init__(self):
        super().__init__("policy_node")
        accept_whole_numbers(self, {"max_linear", "max_angular", "stale_after_s"})
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
            meta = self.session.get_modelmeta().custom_metadata_map
            self.info = json.loads(meta["fusion_attn.rl"])
            if CONTRACT_KEY not in meta:
                raise ConfigError("it records no fusion contract (exported before policies carried one): retrain it")
            self.contract = PolicyContract.from_dict(json.loads(meta[CONTRACT_KEY]))
        except Exception as exc:  # ORT has its own error types: say which file is wrong
            raise SystemExit(f"policy_node: cannot load policy {path}: {exc}") from exc
        self.fused = self.task = None  # (stamp_ns, array) of the newest of each
        self.refusal = "no /diagnostics from fusion_node yet: its fusion is unchecked"  # None once it matches
        self.reset_memory()
        self.cmd_pub = self.create_publisher(Twist, "cmd_vel", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(Image, "fused_state", self._on_fused, qos_profile_sensor_data)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        if self.contract.observation.task_dim:
            self.create_subscription(Float32MultiArray, "task_obs", self._on_task, 10)
        self.create_service(Trigger, "~/reset_memory", self._on_reset)
        self.create_timer(self.contract.decision_period_s, self._act)
        self.create_timer(1.0, self._publish_diagnostics)
        self.get_logger().info(f"policy {path}: {self.info['config']['agent']['kind']} agent, {self.info['config']['env_id']}, "
                               f"fusion {self.contract.fusion['weights_digest']}, decisions every "
                               f"{self.contract.decision_period_s:.3f} s")

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
        try:
            self.fused = (stamp_to_ns(msg.header.stamp), fused_parts(msg, self.contract))
        except ValueError as exc:
            self.get_logger().warning(f"fused_state dropped: {exc}", throttle_duration_sec=5.0)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        """Check the contract against every report of fusion_node's fusion status."""
        for status in msg.status:
            if status.name == FUSION_STATUS:
                wrong = self.contract.mismatches({kv.key: kv.value for kv in status.values})
                refusal = "; ".join(wrong) if wrong else None
                if refusal != self.refusal:
                    if refusal:
                        self.get_logger().error(f"refusing to drive: the fusion is not the one the policy was trained "
                                                f"on: {refusal}")
                    else:
                        self.get_logger().info("fusion matches the policy's contract: driving")
                self.refusal = refusal

    def _on_task(self, msg: Float32MultiArray) -> None:
        data = np.asarray(msg.data, np.float32)
        task_dim = self.contract.observation.task_dim
        if data.shape != (task_dim,) or not np.all(np.isfinite(data)):
            self.get_logger().warning(f"task_obs dropped: {data.shape[0]} values or non-finite, expected {task_dim}",
                                      throttle_duration_sec=5.0)
            return
        self.task = (self.get_clock().now().nanoseconds, data)

    def _act(self) -> None:
        now = self.get_clock().now().nanoseconds
        stale = self.get_parameter("stale_after_s").value * NS_PER_S
        task_dim = self.contract.observation.task_dim
        why = None
        if self.refusal:
            why = f"fusion contract: {self.refusal}"
        elif self.fused is None or now - self.fused[0] > stale:
            why = "no fused state" if self.fused is None else f"fused state {(now - self.fused[0]) / 1e6:.0f} ms old"
        elif task_dim and (self.task is None or now - self.task[0] > stale):
            why = "no task observation" if self.task is None else "task observation stale"
        if why is not None:
            self.cmd_pub.publish(Twist())
            self.get_logger().warning(f"stopped: {why}", throttle_duration_sec=2.0)
            return
        obs = observation(self.fused[1], self.task[1] if task_dim else None, self.contract)[None]
        action, _, self.memory, self.memory_mask, _ = self.session.run(
            None, {"obs": obs, "memory": self.memory, "memory_mask": self.memory_mask})
        actions = self.contract.actions
        v, omega = actions[int(action[0])] if actions is not None else action[0][:2]
        cmd = Twist()
        limit_v, limit_w = self.get_parameter("max_linear").value, self.get_parameter("max_angular").value
        cmd.linear.x = float(np.clip(v, -limit_v, limit_v))
        cmd.angular.z = float(np.clip(omega, -limit_w, limit_w))
        self.cmd_pub.publish(cmd)

    def _publish_diagnostics(self) -> None:
        level, message = (ERROR, f"refusing to drive: {self.refusal}") if self.refusal else (OK, "ok")
        values = {"weights_digest": self.contract.fusion["weights_digest"],
                  "decision_period_s": f"{self.contract.decision_period_s:g}"}
        status = Status("fusion_attn: policy", level, message, values)
        self.diag_pub.publish(to_rclpy(diagnostics_msg(self.get_clock().now().nanoseconds, [status], self.get_name())))


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
