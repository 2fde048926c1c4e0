"""How every node of this package runs: spin until Ctrl-C or SIGTERM, and call that a clean exit; and how
it takes its float parameters."""

from __future__ import annotations

import rclpy
import rclpy.executors
from rclpy.node import Node
from rclpy.parameter import Parameter

# rclpy.spin waits for work with no timeout, and only a wake-up from the shutdown ends that wait. Once in
# a test run (2026-12-02) a node sat in that wait 30 s after SIGTERM; rclpy has known races between a
# shutdown and an executor building its wait set. Waking this often to look at the context bounds such
# a missed wake-up to one period.
WAKE_S = 0.5


def spin(node: Node) -> None:
    """Run the node's callbacks until shutdown. A signal shuts the context down at once; a callback running
    at that moment then fails (e.g. "publisher's context is invalid"), which is the shutdown, not an error."""
    executor = rclpy.get_global_executor()
    try:
        executor.add_node(node)
        try:
            while executor.context.ok():
                executor.spin_once(timeout_sec=WAKE_S)
        finally:
            executor.remove_node(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    except Exception:
        if node.context.ok():
            raise


def accept_whole_numbers(node: Node, floats: set[str]) -> None:
    """Call before declaring: an integer given for a float parameter of `floats` (a parameter file's `1`,
    `-p name:=1`, `ros2 param set ... name 1`: integers all) is taken as that float. rclpy refuses it
    otherwise, at declaration by raising: the node would not start. The command line's and the parameter
    file's values are rclpy's own dict; there is no public way to read them before declaring."""
    def as_floats(params: list[Parameter]) -> list[Parameter]:
        return [Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
                if p.name in floats and p.type_ == Parameter.Type.INTEGER else p for p in params]

    overrides = getattr(node, "_parameter_overrides", {})
    overrides.update({p.name: p for p in as_floats(list(overrides.values()))})
    node.add_pre_set_parameters_callback(as_floats)
