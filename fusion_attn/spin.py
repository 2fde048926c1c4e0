"""How every node of this package runs: spin until Ctrl-C or SIGTERM, and call that a clean exit."""

from __future__ import annotations

import rclpy
import rclpy.executors
from rclpy.node import Node


def spin(node: Node) -> None:
    """rclpy.spin until shutdown. A signal shuts the context down at once; a callback running at that
    moment then fails (e.g. "publisher's context is invalid"), which is the shutdown, not an error."""
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    except Exception:
        if node.context.ok():
            raise
