"""Play recorded sensor topics onto live ROS 2 topics, at their recorded rate (`fusion-attn play`).

Any bag `rosbags` reads (rosbag2 sqlite3/MCAP, ROS 1) is re-serialized to CDR and handed to rclpy,
so one code path serves every format. With `restamp`, header stamps are shifted by the same offset
(recording start -> now), so a live node sees fresh data with the recording's relative timing, as
from real sensors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock

from .bag import find_topics, open_reader, read_decoded
from .errors import BagError, ConfigError
from .frames import NS_PER_S, stamp_to_ns
from .messages import rclpy_class, to_rclpy

log = logging.getLogger(__name__)


class StopRequest:
    """A stop flag to install as the SIGINT/SIGTERM handler. Lock-free on purpose: a threading.Event
    set from a handler deadlocks when the signal lands while the main thread holds the event's lock,
    and a KeyboardInterrupt raised inside rclpy's C++ code surfaces as a TypeError. A second signal
    raises KeyboardInterrupt, for a user who will not wait for the flush."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, *_signal) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def sleep(self, seconds: float) -> bool:
        """Sleep, in slices short enough to answer a stop promptly; -> whether a stop was requested."""
        end = time.monotonic() + seconds
        while not self.requested and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        return self.requested


def play(node: Node, bags: Sequence[str | Path], remap: dict[str, str] | None = None, rate: float = 1.0,
         restamp: bool = True, clock: bool = False, loop: bool = False,
         keep: Callable[[str, float], bool] | None = None, wait_s: float = 2.0,
         stop: StopRequest | None = None) -> int:
    """Publish the bags' sensor topics from `node`; -> messages published.

    restamp: shift header stamps onto now (live-sensor behaviour). clock: publish /clock with the
    recorded time instead, for nodes with use_sim_time (stamps stay as recorded). loop: start over at
    the end (with /clock, time then jumps back and a live node resets its buffers). remap: recorded
    topic -> published topic. keep(topic, seconds_into_bag) -> False skips a message (a test can
    silence a sensor mid-stream this way). Playing starts once every topic has a subscriber, or
    after wait_s: the first messages are not lost to DDS discovery. stop: once requested (the CLI
    installs it for Ctrl-C and SIGTERM), playing ends after the message in flight.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"play rate must be > 0, got {rate}")
    remap = remap or {}
    stop = stop if stop is not None else StopRequest()
    published = 0
    with open_reader(bags) as reader:
        topics = find_topics(reader)
        if not topics.sensors:
            raise BagError(f"no camera, lidar, IMU or odometry topic to play in {', '.join(map(str, bags))}; "
                           f"skipped: {topics.skipped}")
        conns = [c for c in reader.connections if c.topic in topics.sensors.values()]
        # reliable: a reliable subscriber gets every message; best-effort ones (sensor QoS) still match
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        pubs = {c.topic: node.create_publisher(rclpy_class(c.msgtype), remap.get(c.topic, c.topic), qos) for c in conns}
        clock_pub = node.create_publisher(Clock, "/clock", 10) if clock else None
        _wait_for_subscribers(list(pubs.values()), wait_s, stop)
        try:
            while not stop.requested:
                published += _play_once(node, reader, topics, pubs, clock_pub, rate, restamp and not clock, keep, stop)
                if not loop:
                    break
        finally:
            for pub in [*pubs.values(), *([clock_pub] if clock_pub else [])]:
                pub.wait_for_all_acked(Duration(seconds=2))  # the last messages leave before we exit
                node.destroy_publisher(pub)
    return published


def _wait_for_subscribers(pubs, wait_s: float, stop: StopRequest) -> None:
    end = time.monotonic() + wait_s
    while time.monotonic() < end and any(p.get_subscription_count() == 0 for p in pubs):
        if stop.sleep(0.02):
            return
    if all(p.get_subscription_count() for p in pubs):
        time.sleep(0.2)  # the writer has matched; give the readers' side of the match a moment too
    elif not stop.requested:
        alone = [p.topic_name for p in pubs if not p.get_subscription_count()]
        log.warning("no subscriber on %s after %.1f s: playing anyway (a subscriber that is still being "
                    "discovered misses the first messages; a longer --wait avoids that)", ", ".join(alone), wait_s)


def _play_once(node, reader, topics, pubs, clock_pub, rate, restamp, keep, stop) -> int:
    published = 0
    _warm_up(reader, topics)
    # the schedule starts at the first message, once it is ready to go: started before, the bag's opening
    # and each type's first decode would send the first messages late, stamped in the past
    # (tests/test_node_dds.py's rate test: the node masked the IMU in its first fusions)
    wall_start = shift = None
    for conn, log_time, decoded, error in read_decoded(reader, topics):
        offset_s = (log_time - reader.start_time) / NS_PER_S
        if decoded is None:
            log.warning("skipped a message of %s: %s", conn.topic, error)
            continue
        if keep is not None and not keep(conn.topic, offset_s):
            continue
        msg = to_rclpy(decoded)  # through the standard ROS 2 types: a ROS 1 bag's own ones differ (Header.seq)
        if wall_start is None:  # as if playing had begun at the recording's start, offset_s / rate ago
            wall_start = time.monotonic() - offset_s / rate
            # one constant shift maps the recording's clock onto now, keeping every relative offset
            shift = node.get_clock().now().nanoseconds - round(offset_s / rate * NS_PER_S) - reader.start_time
        if stop.sleep(wall_start + offset_s / rate - time.monotonic()):
            break
        if restamp:
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_to_ns(msg.header.stamp) + shift, NS_PER_S)
        if clock_pub is not None:
            now = Clock()
            now.clock.sec, now.clock.nanosec = divmod(log_time, NS_PER_S)
            clock_pub.publish(now)
        pubs[conn.topic].publish(msg)
        published += 1
    return published


def _warm_up(reader, topics) -> None:
    """Decode and convert the first message of each played topic, unpublished: a type's first decode and
    conversion set up its code, which must not delay that topic's first message."""
    for conn in reader.connections:
        if conn.topic in topics.sensors.values():
            messages = reader.messages(connections=[conn])
            # a bad first message, or a bag that breaks off, is reported when playing reaches it
            with contextlib.suppress(Exception), contextlib.closing(messages):
                if (first := next(messages, None)) is not None:
                    to_rclpy(reader.deserialize(first[2], conn.msgtype))
