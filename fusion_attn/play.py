"""Play recorded sensor topics onto live ROS 2 topics, at their recorded rate.

Any bag `rosbags` reads (rosbag2 sqlite3/MCAP, ROS 1) is re-serialized to CDR and handed to rclpy,
so one code path serves every format. With `restamp`, header stamps are shifted by the same offset
(recording start -> now), so a live node sees fresh data with the recording's relative timing, as
from real sensors.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rclpy.serialization import deserialize_message

from .bag import find_topics, open_reader
from .frames import NS_PER_S, stamp_to_ns


def message_class(msgtype: str) -> type:
    """'sensor_msgs/msg/Image' -> the rclpy message class."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def play(node: Node, bags: Sequence[str | Path], remap: dict[str, str] | None = None, rate: float = 1.0,
         restamp: bool = True, keep: Callable[[str, float], bool] | None = None) -> int:
    """Publish the bags' sensor topics from `node`; -> messages published.

    remap: recorded topic -> published topic. keep(topic, seconds_into_bag) -> False skips a message
    (a test can silence a sensor mid-stream this way).
    """
    remap = remap or {}
    published = 0
    with open_reader(bags) as reader:
        topics = find_topics(reader)
        wanted = {t: m for m, t in topics.sensors.items()}
        conns = [c for c in reader.connections if c.topic in wanted]
        pubs = {c.topic: node.create_publisher(message_class(c.msgtype), remap.get(c.topic, c.topic), qos_profile_sensor_data)
                for c in conns}
        wall_start = time.monotonic()
        # one constant shift maps the recording's clock onto now, keeping every relative offset
        shift = node.get_clock().now().nanoseconds - reader.start_time
        for conn, log_time, raw in reader.messages(connections=conns):
            offset_s = (log_time - reader.start_time) / NS_PER_S
            if keep is not None and not keep(conn.topic, offset_s):
                continue
            delay = wall_start + offset_s / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            cdr = reader.typestore.serialize_cdr(reader.deserialize(raw, conn.msgtype), conn.msgtype)
            msg = deserialize_message(bytes(cdr), message_class(conn.msgtype))
            if restamp:
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_to_ns(msg.header.stamp) + shift, NS_PER_S)
            pubs[conn.topic].publish(msg)
            published += 1
        for pub in pubs.values():
            node.destroy_publisher(pub)
    return published

