"""Recordings in: rosbag2 (sqlite3, MCAP) and ROS 1 bags through `rosbags`, as adapted frames.

Sensor topics are found by message type. A topic whose messages cannot be decoded (no message
definition stored, an unknown vendor type) is reported and skipped; a malformed message is counted
and skipped; a bag that cannot be opened or is truncated raises BagError naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from .adapters import modality_of, to_frame
from .errors import BagError, MalformedMessageError
from .frames import CameraFrame, ImuSample, LidarFrame, Modality

log = logging.getLogger(__name__)


@dataclass
class BagTopics:
    """Which topic feeds which modality, and what was left out and why."""

    sensors: dict[Modality, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # topic -> reason


@dataclass
class BagMessage:
    log_time_ns: int  # when the recorder received it
    topic: str
    modality: Modality
    frame: CameraFrame | LidarFrame | ImuSample | None  # None: malformed, see `error`
    error: str | None = None


@contextmanager
def open_reader(paths: Sequence[str | Path]) -> Iterator[AnyReader]:
    """`with open_reader(paths) as reader`: one or more bags merged by time; BagError on any failure."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise BagError(f"bag not found: {p}")
    # Bags without stored definitions (e.g. some rosbag2 sqlite3 files) decode with the standard types.
    reader = AnyReader(paths, default_typestore=get_typestore(Stores.ROS2_KILTED))
    try:
        reader.open()
    except Exception as exc:  # rosbags raises per-format reader errors; all mean "unreadable bag"
        raise BagError(f"cannot open {', '.join(map(str, paths))}: {exc}") from exc
    try:
        yield reader
    finally:
        reader.close()


def find_topics(reader: AnyReader, overrides: dict[Modality, str] | None = None) -> BagTopics:
    """One topic per modality: the override if given, else the busiest topic of a sensor type."""
    topics = BagTopics()
    best: dict[Modality, tuple[int, str]] = {}
    for conn in reader.connections:
        if conn.msgtype not in reader.typestore.types:
            topics.skipped[conn.topic] = f"unreadable: no message definition for {conn.msgtype} in the bag"
            continue
        modality = modality_of(conn.msgtype)
        if modality is None:
            topics.skipped.setdefault(conn.topic, f"not a sensor type ({conn.msgtype})")
            continue
        if conn.msgcount > best.get(modality, (-1, ""))[0]:
            best[modality] = (conn.msgcount, conn.topic)
    topics.sensors = {m: t for m, (_, t) in best.items()}
    for modality, topic in (overrides or {}).items():
        if topic not in {c.topic for c in reader.connections}:
            raise BagError(f"topic {topic} is not in the bag (topics: {sorted({c.topic for c in reader.connections})})")
        topics.sensors[modality] = topic
    for t, reason in topics.skipped.items():
        log.info("skipping topic %s: %s", t, reason)
    return topics


def read_messages(reader: AnyReader, topics: BagTopics, start_ns: int | None = None,
                  stop_ns: int | None = None) -> Iterator[BagMessage]:
    """Sensor messages in recorded order, adapted to frames (malformed ones carry their error)."""
    by_topic = {t: m for m, t in topics.sensors.items()}
    conns = [c for c in reader.connections if c.topic in by_topic]
    if not conns:  # rosbags reads every connection when given none
        return
    try:
        for conn, log_time, raw in reader.messages(connections=conns, start=start_ns, stop=stop_ns):
            modality = by_topic[conn.topic]
            try:
                frame = to_frame(reader.deserialize(raw, conn.msgtype))
            except MalformedMessageError as exc:
                yield BagMessage(log_time, conn.topic, modality, None, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - bytes that do not decode as the declared type, any error
                yield BagMessage(log_time, conn.topic, modality, None, f"undecodable {conn.msgtype}: {exc}")
                continue
            yield BagMessage(log_time, conn.topic, modality, frame)
    except Exception as exc:  # truncated chunk, bad index, ...
        raise BagError(f"bag read failed (truncated or corrupt?): {exc}") from exc
