"""Recordings in: rosbag2 (sqlite3, MCAP) and ROS 1 bags through `rosbags`, as adapted frames.

Sensor topics are found by message type, the busiest of each (a lidar: the one with the most points,
since a radar's cloud of a few targets often comes faster); every other topic is reported with why it is
left out (a sensor topic also with the option that chooses it). A topic whose messages cannot be
decoded (no message definition stored, an unknown vendor type) is reported and skipped; a malformed
message is counted and skipped; a bag that cannot be opened or is truncated raises BagError naming the
file. A single bag whose index is missing or damaged is read record by record instead, a ROS 1 bag's
damaged chunks skipped; the reader's `notes` say so.
"""

from __future__ import annotations

import bz2
import contextlib
import logging
import mmap
import struct
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame
import zstandard
from mcap import records as mcap_records
from mcap.stream_reader import StreamReader, breakup_chunk
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from .adapters import SUPPORTED_TYPES, modality_of, to_frame
from .errors import BagError, ConfigError, MalformedMessageError
from .frames import MODALITIES, CameraFrame, ImuSample, LidarFrame, Modality, kind_of
from .messages import TYPES

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
def open_reader(paths: Sequence[str | Path]) -> Iterator[IndexedReader | SequentialReader]:
    """`with open_reader(paths) as reader`: one or more bags merged by time; BagError on any failure."""
    paths, notes = _storage_paths([Path(p) for p in paths])
    try:
        reader = IndexedReader(paths)
        reader.open()
    except Exception as exc:  # rosbags raises per-format reader errors; all mean "unreadable bag"
        single = _single_file(paths)
        if single is None:
            raise BagError(_why_unopened(paths, exc)) from exc
        log.warning("%s: %s; reading its records in sequence instead", single, exc)
        # a bag cut short has no index and a damaged one misleads, but the records themselves are fine
        reader = StreamedMcap(single) if single.suffix == ".mcap" else StreamedRos1(single)
        reader.notes.insert(0, f"no usable index ({exc}): the bag was read record by record")
    reader.notes[:0] = notes
    try:
        yield reader
    finally:
        reader.close()


def _storage_paths(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The paths to open, and notes: a rosbag2 folder without its metadata.yaml (a recorder killed before
    writing it) is read through its storage files directly. BagError for a path that is no bag at all."""
    opened, notes = [], []
    for p in paths:
        if not p.exists():
            raise BagError(f"bag not found: {p}")
        if not p.is_dir() or (p / "metadata.yaml").exists():
            opened.append(p)
            continue
        files = sorted([*p.glob("*.mcap"), *p.glob("*.db3")])
        if not files:
            raise BagError(f"{p} is no rosbag2 folder: no metadata.yaml and no .mcap or .db3 file in it")
        opened += files
        notes.append(f"{p} has no metadata.yaml: its {len(files)} storage file(s) were read directly")
    return opened, notes


def _why_unopened(paths: list[Path], exc: Exception) -> str:
    """Which of several bags cannot be opened, and why: one tried at a time."""
    if len(paths) > 1:
        if len({p.suffix == ".bag" for p in paths}) > 1:
            return f"cannot open {', '.join(map(str, paths))} together: ROS 1 and ROS 2 bags are not merged; replay each"
        for p in paths:
            alone_reader = AnyReader([p], default_typestore=TYPES)
            try:
                alone_reader.open()
                alone_reader.close()
            except Exception as alone:  # noqa: BLE001 - rosbags raises per-format reader errors
                return (f"cannot open {p}: {_why(alone)} (a bag cut short is read up to its fault only on its own; "
                        "replay it alone)")
    return f"cannot open {', '.join(map(str, paths))}: {_why(exc)}"


def _single_file(paths: list[Path]) -> Path | None:
    """The one .mcap or ROS 1 .bag behind `paths`, if that is what they are."""
    if len(paths) != 1:
        return None
    p = paths[0]
    files = [p] if p.suffix in (".mcap", ".bag") else sorted(p.glob("*.mcap")) if p.is_dir() else []
    return files[0] if len(files) == 1 else None


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class IndexedReader(AnyReader):
    """rosbags' reader (bags merged by time through their indexes), with `notes` on what reading had to
    work around. A single ROS 1 bag's index is checked when opened (BagError where it contradicts
    itself), and where reading through it fails part-way (a damaged chunk, a bad entry) the rest of the
    bag is read in sequence, damaged chunks skipped."""

    def __init__(self, paths: list[Path]):
        # Bags without stored definitions (e.g. some rosbag2 sqlite3 files) decode with the standard types.
        super().__init__(paths, default_typestore=TYPES)  # read, never changed: AnyReader builds its own
        self.notes: list[str] = []
        single = _single_file(paths)
        self.ros1 = single if single is not None and single.suffix == ".bag" else None

    def open(self) -> None:
        super().open()
        if self.ros1 is not None and (problem := _index_problem(self.readers[0])):
            self.close()
            raise BagError(f"the index contradicts itself: {problem}")

    def messages(self, connections: Collection = (), start: int | None = None, stop: int | None = None):
        last = None  # the time of the last message yielded: read in time order, all before it are done
        try:
            for conn, log_time, raw in super().messages(connections, start, stop):
                last = log_time
                yield conn, log_time, raw
            return
        except Exception as exc:
            if self.ros1 is None:
                raise
            why = _why(exc)
        rest = StreamedRos1(self.ros1)
        self.notes += [f"reading through the index failed part-way ({why}): the rest was read chunk by chunk",
                       *rest.notes]
        # messages stamped the same nanosecond as the last one yielded are not told apart, and left out
        yield from rest.messages(connections, start if last is None else last + 1, stop)


def _index_problem(bag) -> str | None:
    """How a ROS 1 bag's index contradicts itself (damaged bytes read as numbers), if it does: an entry
    outside its chunk's time span, or entries that do not add up to the chunks' message counts.
    `bag`: a rosbags rosbag1 Reader, open."""
    chunks = {c.pos: c for c in bag.chunk_infos}
    counts: Counter[tuple[int, int]] = Counter()
    for conn, entries in bag.indexes.items():
        for entry in entries:
            chunk = chunks[entry.chunk_pos]
            if not chunk.start_time <= entry.time < chunk.end_time:
                return f"a message of connection {conn} at {entry.time} ns lies outside its chunk's time span"
            counts[entry.chunk_pos, conn] += 1
    if counts != Counter({(c.pos, conn): n for c in bag.chunk_infos for conn, n in c.connection_counts.items()}):
        return "its entries do not add up to the chunks' message counts"
    return None


@dataclass(frozen=True)
class _Connection:
    topic: str
    msgtype: str
    msgcount: int


class SequentialReader:
    """The part of AnyReader's interface this package uses, over a bag read record by record.

    For files whose index is missing (a recording cut short) or damaged: every complete message before
    a fault is read, then BagError says where it stopped. Subclasses yield the file's records, and add
    to `notes` what they skipped.
    """

    def __init__(self, path: Path, typestore: Typestore):
        self.path = path
        self.typestore = typestore
        self.fault: str | None = None
        self.notes: list[str] = []
        topics: dict[object, tuple[str, str]] = {}
        counts: dict[object, int] = {}
        times = []
        for kind, key, a, b in self._guarded():
            if kind == "connection":
                topics.setdefault(key, (a, b))
            else:
                counts[key] = counts.get(key, 0) + 1
                times.append(a)
        if not times:
            raise BagError(f"{path}: no complete message ({self.fault or 'empty'})")
        self._by_key = {k: _Connection(topic, msgtype, counts.get(k, 0)) for k, (topic, msgtype) in topics.items()}
        self.connections = list({c.topic: c for c in self._by_key.values()}.values())
        self.start_time, self.end_time = min(times), max(times) + 1

    def _records(self):
        """Yield ("connection", key, topic, msgtype) and ("message", key, log_time_ns, raw)."""
        raise NotImplementedError

    def _guarded(self):
        try:
            yield from self._records()
        except Exception as exc:  # noqa: BLE001 - the end of a cut file shows up as any of several errors
            self.fault = _why(exc)

    def messages(self, connections=(), start: int | None = None, stop: int | None = None):
        wanted = {c.topic for c in connections}
        for kind, key, log_time, raw in self._guarded():
            conn = self._by_key.get(key) if kind == "message" else None
            if conn is None or (wanted and conn.topic not in wanted):
                continue
            if (start is None or log_time >= start) and (stop is None or log_time < stop):
                yield conn, log_time, raw
        if self.fault:
            raise BagError(f"{self.path}: the file ends part-way ({self.fault}); read up to there")

    def close(self) -> None:
        pass


class StreamedMcap(SequentialReader):
    def __init__(self, path: Path):
        super().__init__(path, TYPES)

    def _records(self):
        schemas = {}

        def named(records):
            for record in records:
                if isinstance(record, mcap_records.Schema):
                    schemas[record.id] = record.name
                elif isinstance(record, mcap_records.Channel):
                    yield "connection", record.id, record.topic, schemas.get(record.schema_id, "")
                elif isinstance(record, mcap_records.Message):
                    yield "message", record.channel_id, record.log_time, record.data

        with open(self.path, "rb") as f:
            end = 0  # where the last whole record ends
            try:
                for record in StreamReader(f, emit_chunks=True).records:
                    yield from named(breakup_chunk(record) if isinstance(record, mcap_records.Chunk) else [record])
                    end = f.tell()
            except Exception:
                f.seek(end)  # a record cut short: the whole messages at the start of a chunk cut short, then the fault
                yield from named(_mcap_chunk_start(f.read()))
                raise

    def deserialize(self, raw: bytes, msgtype: str):
        return self.typestore.deserialize_cdr(raw, msgtype)


def _mcap_chunk_start(rest: bytes) -> list:
    """The whole records at the start of an MCAP chunk record cut short (`rest`: the file from the chunk
    on), decompressed as far as the bytes go; [] for anything else."""
    if len(rest) < 41 or rest[0] != 0x06:  # opcode, length, 3 times, crc, compression's length
        return []
    pos = 1 + 8 + 3 * 8 + 4
    size = struct.unpack_from("<I", rest, pos)[0]
    compression = rest[pos + 4:pos + 4 + size].decode("ascii", "replace")
    start = pos + 4 + size + 8
    if len(rest) < start:
        return []
    data = rest[start:start + struct.unpack_from("<Q", rest, start - 8)[0]]  # its records, as far as the file goes
    try:
        if compression == "zstd":
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif compression == "lz4":
            data = lz4.frame.LZ4FrameDecompressor().decompress(data)
        elif compression:
            return []
    except Exception:  # noqa: BLE001 - damaged bytes fail in any of several ways: nothing to recover
        return []
    whole = 0
    while whole + 9 <= len(data) and whole + 9 + (n := struct.unpack_from("<Q", data, whole + 1)[0]) <= len(data):
        whole += 9 + n
    chunk = mcap_records.Chunk(compression="", data=data[:whole], message_start_time=0, message_end_time=0,
                               uncompressed_crc=0, uncompressed_size=whole)
    return breakup_chunk(chunk)


ROS1_MAGIC = b"#ROSBAG V2.0\n"
BAG_HEADER, CHUNK = b"\x03", b"\x05"  # record ops
CHUNK_OP_FIELD = b"\x04\x00\x00\x00op=\x05"  # a chunk record's op header field, with its length


class StreamedRos1(SequentialReader):
    """ROS 1 bag format 2.0: records of (header fields, data). Chunk records, each followed by its index
    data, hold the connections and messages; the index proper (connection and chunk info records) comes
    after them, at the bag header's index_pos. A damaged chunk is skipped (noted) and reading goes on
    at the next intact one, found by its header."""

    def __init__(self, path: Path):
        self.damaged: dict[int, str] = {}  # byte offset -> why, of each part skipped
        # a store of its own, not messages.TYPES: ROS 1 types, and _chunk registers the bag's definitions in it
        super().__init__(path, get_typestore(Stores.ROS1_NOETIC))
        if self.damaged:
            at, why = next(iter(self.damaged.items()))
            self.notes.append(f"{len(self.damaged)} damaged part(s) of the bag skipped, reading on at the next "
                              f"intact chunk (the first at byte {at}: {why})")

    def _records(self):
        with open(self.path, "rb") as f:
            if f.read(len(ROS1_MAGIC)) != ROS1_MAGIC:
                raise BagError(f"{self.path} is not a ROS 1 bag (format 2.0)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                end = _index_pos(buf) or len(buf)  # only the index follows the chunks
                pos = len(ROS1_MAGIC)
                while pos < end:
                    try:
                        fields, data, after = _ros1_record(buf, pos)
                    except (EOFError, ValueError) as exc:
                        resume = _next_chunk(buf, pos + 1, end)
                        if resume is None and isinstance(exc, EOFError) and end == len(buf):
                            yield from self._cut_chunk(buf, pos)  # a cut file: nothing follows its start
                            raise
                        self.damaged.setdefault(pos, _why(exc))
                        if resume is None:
                            return
                        pos = resume
                        continue
                    if fields.get("op") == CHUNK:
                        try:
                            yield from self._chunk(fields, data)
                        except Exception as exc:  # noqa: BLE001 - damaged bytes fail to decompress or parse, any error
                            self.damaged.setdefault(pos, _why(exc))
                    pos = after

    def _cut_chunk(self, buf, pos: int):
        """The whole records at the start of a chunk record cut short at the end of the file, decompressed
        as far as its bytes go; nothing where its header is cut too, or damaged."""
        try:
            data_at = pos + 8 + _u32(buf, pos)
            fields = _ros1_fields(buf[pos + 4:data_at - 4])
        except (EOFError, ValueError, struct.error):
            return
        if fields.get("op") == CHUNK:
            with contextlib.suppress(Exception):  # damaged bytes fail in any of several ways: nothing more to read
                yield from self._chunk(fields, buf[data_at:], cut=True)

    def _chunk(self, fields: dict[str, bytes], data: bytes, cut: bool = False):
        """A chunk's connections and messages; `cut`: the chunk's start only, read up to its first record
        cut short (decompressed as a stream, as far as the bytes go)."""
        compression = fields.get("compression", b"none")
        if compression == b"bz2":
            data = bz2.BZ2Decompressor().decompress(data) if cut else bz2.decompress(data)
        elif compression == b"lz4":
            data = lz4.frame.LZ4FrameDecompressor().decompress(data) if cut else lz4.frame.decompress(data)
        pos = 0
        while pos < len(data):
            try:
                inner, payload, pos = _ros1_record(data, pos)
            except EOFError:
                if cut:
                    return
                raise
            op = inner.get("op")
            conn = struct.unpack("<I", inner["conn"])[0] if "conn" in inner else None
            if op == b"\x07":  # connection: its data is more header fields (type, definition)
                info = _ros1_fields(payload)
                msgtype = _ros2_name(info["type"].decode())
                if msgtype not in self.typestore.types:
                    with contextlib.suppress(Exception):  # unknown types stay unreadable, and are reported so
                        self.typestore.register(get_types_from_msg(info["message_definition"].decode(), msgtype))
                yield "connection", conn, inner["topic"].decode(), msgtype
            elif op == b"\x02":  # message data
                sec, nsec = struct.unpack("<II", inner["time"])
                yield "message", conn, sec * 1_000_000_000 + nsec, payload

    def deserialize(self, raw: bytes, msgtype: str):
        return self.typestore.deserialize_ros1(raw, msgtype)


def _ros1_record(buf, pos: int) -> tuple[dict[str, bytes], bytes, int]:
    """The record at `pos` of `buf` (bytes, mmap): (header fields, data, where the next record starts).
    EOFError where it runs past the end of `buf`, ValueError where its header does not parse."""
    if pos + 4 > len(buf):
        raise EOFError("record length cut short")
    data_at = pos + 8 + _u32(buf, pos)
    if data_at > len(buf):
        raise EOFError("record cut short")
    fields = _ros1_fields(buf[pos + 4:data_at - 4])
    after = data_at + _u32(buf, data_at - 4)
    if after > len(buf):
        raise EOFError("record data cut short")
    return fields, buf[data_at:after], after


def _ros1_fields(buf: bytes) -> dict[str, bytes]:
    """A record header's name=value fields; ValueError unless they fill it exactly (damaged lengths do not)."""
    fields, i = {}, 0
    while i < len(buf):
        end = i + 4 + (_u32(buf, i) if i + 4 <= len(buf) else len(buf))
        name, eq, value = buf[i + 4:end].partition(b"=")
        if end > len(buf) or not eq:
            raise ValueError("record header damaged")
        fields[name.decode("ascii")] = value
        i = end
    return fields


def _u32(buf, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


def _index_pos(buf) -> int | None:
    """Where the index starts, from the bag header; None for a bag cut short or never closed (no index
    there), or a damaged header."""
    with contextlib.suppress(EOFError, ValueError, struct.error):
        fields, _, _ = _ros1_record(buf, len(ROS1_MAGIC))
        (pos,) = struct.unpack("<Q", fields.get("index_pos", b""))
        if fields.get("op") == BAG_HEADER and len(ROS1_MAGIC) < pos <= len(buf):
            return pos
    return None


def _next_chunk(buf, start: int, end: int) -> int | None:
    """Where the first intact chunk record in buf[start:end] begins, if any: found by its op field, and
    taken only where a whole record parses around it (compressed bytes can hold the pattern by chance)."""
    while (at := buf.find(CHUNK_OP_FIELD, start, end)) >= 0:
        for pos in range(max(start, at - 64), at - 3):  # the header's other fields come first, in name order
            with contextlib.suppress(EOFError, ValueError):
                fields, _, after = _ros1_record(buf, pos)
                if fields.get("op") == CHUNK and after <= end:
                    return pos
        start = at + 1
    return None


def _ros2_name(ros1_type: str) -> str:
    package, _, name = ros1_type.partition("/")
    return f"{package}/msg/{name}"


def topic_flag(modality: Modality) -> str:
    """The option of `replay` and `fuse` that chooses this modality's topic (named where a topic is left out)."""
    return f"--{MODALITIES[modality]}-topic"


def find_topics(reader: AnyReader, overrides: dict[Modality, str] | None = None,
                leave_out: Mapping[Modality, str] | None = None) -> BagTopics:
    """One topic per modality: the override if given, else the busiest topic of a sensor type, a lidar's
    busiest by points (messages x points in its first sweeps: a radar's cloud of a few targets is no
    lidar, however often it comes). A second IMU (Modality.IMU2) takes the busiest IMU topic the IMU did not.

    Every other topic is in `skipped` with the reason; a sensor topic not chosen also names the option
    that chooses it. leave_out: modalities not fused -> why (configured as none by the node's *_type, not
    read by the model); their topics are skipped with that reason. ConfigError for an
    override that is not in the bag, or not of its modality's types.
    """
    counts: dict[str, int] = {}  # messages per topic, over every bag that holds it
    msgtypes: dict[str, str] = {}
    for conn in reader.connections:
        counts[conn.topic] = counts.get(conn.topic, 0) + conn.msgcount
        msgtypes.setdefault(conn.topic, conn.msgtype)
    topics = BagTopics()
    candidates: dict[Modality, list[str]] = {}
    for topic, msgtype in msgtypes.items():
        if msgtype not in reader.typestore.types:
            topics.skipped[topic] = f"unreadable: no message definition for {msgtype} in the bag"
        elif (modality := modality_of(msgtype)) is None:
            topics.skipped[topic] = f"not a sensor type ({msgtype})"
        else:
            candidates.setdefault(modality, []).append(topic)
    overrides = overrides or {}
    for modality, topic in overrides.items():
        _check_override(modality, topic, msgtypes, topics.skipped)
    for modality in Modality:
        # a topic another sensor is given (or took) is not this one's to choose
        names = [t for t in candidates.get(kind_of(modality), [])
                 if t not in topics.sensors.values() and t not in overrides.values()]
        name, flag = MODALITIES[modality], topic_flag(modality)
        if modality in (leave_out or {}):
            topics.skipped.update((t, leave_out[modality]) for t in names if t not in topics.skipped)
            continue
        chosen = overrides.get(modality)
        if chosen in topics.sensors.values():
            taken = next(MODALITIES[m] for m, t in topics.sensors.items() if t == chosen)
            raise ConfigError(f"{flag} {chosen}: that is the {taken} topic; two sensors cannot read one topic")
        if chosen is None and not names:
            continue
        busy = {t: f"{counts[t]} messages" for t in names}
        load = dict(counts)
        if kind_of(modality) is Modality.LIDAR and chosen is None and len(names) > 1:
            for t in names:
                points = _points_per_sweep(reader, t)
                load[t] = counts[t] * points
                busy[t] = f"{load[t]:,} points: {counts[t]} messages of {points:,}"
        chosen = chosen or max(names, key=load.__getitem__)  # the first of equally busy ones
        topics.sensors[modality] = chosen
        topics.skipped.pop(chosen, None)  # a second IMU's: named another IMU topic by the first
        tied = modality not in overrides and sum(load[t] == load[chosen] for t in names) > 1
        why = (f"{flag} chose {chosen}" if modality in overrides
               else f"{chosen} is as busy ({busy[chosen]}) and listed first" if tied
               else f"{chosen} is busier ({busy[chosen]})")
        topics.skipped.update((t, f"another {name} topic ({busy[t]}): {why}; choose this one with {flag} {t}")
                              for t in names if t != chosen)
    for t, reason in topics.skipped.items():
        log.info("skipping topic %s: %s", t, reason)
    return topics


def _points_per_sweep(reader: AnyReader, topic: str, sweeps: int = 3) -> int:
    """The most points among the topic's first few sweeps as the adapter reads them (a lidar spinning up
    may send an empty one first); 0 where none of them reads. Cheap through an index; a bag read record
    by record is read up to them."""
    conns = [c for c in reader.connections if c.topic == topic]
    notes = list(reader.notes)  # what this look had to work around is the full read's to report
    most = 0
    with contextlib.suppress(Exception):  # a bag that breaks off is reported where it is read in full
        for k, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
            with contextlib.suppress(Exception):  # a message that does not decode or adapt counts as no sweep
                most = max(most, len(to_frame(reader.deserialize(raw, conn.msgtype))))
            if k + 1 == sweeps:
                break
    reader.notes[:] = notes
    return most


def _check_override(modality: Modality, topic: str, msgtypes: dict[str, str], skipped: dict[str, str]) -> None:
    """ConfigError unless `topic` is in the bag, readable and of a type that feeds `modality`."""
    flag = topic_flag(modality)
    if topic not in msgtypes:
        raise ConfigError(f"{flag}: topic {topic} is not in the bag (topics: {sorted(msgtypes)})")
    if modality_of(msgtypes[topic]) is not kind_of(modality):
        takes = " or ".join(t for t in SUPPORTED_TYPES if modality_of(t) is kind_of(modality))
        raise ConfigError(f"{flag} {topic}: its messages are {msgtypes[topic]}; the {MODALITIES[modality]} input "
                          f"takes {takes}")
    if topic in skipped:  # a sensor type, but the bag holds no definition to decode it with
        raise ConfigError(f"{flag} {topic}: {skipped[topic]}")


def read_decoded(reader: AnyReader, topics: BagTopics, start_ns: int | None = None,
                 stop_ns: int | None = None) -> Iterator[tuple[object, int, object, str | None]]:
    """(connection, log time, decoded message or None, error) of the sensor topics, in recorded order.

    A message whose bytes do not decode as its type yields None and the error; a read that breaks off
    (truncated chunk, bad index) raises BagError after everything before the fault.
    """
    conns = [c for c in reader.connections if c.topic in topics.sensors.values()]
    if not conns:  # rosbags reads every connection when given none
        return
    try:
        for conn, log_time, raw in reader.messages(connections=conns, start=start_ns, stop=stop_ns):
            try:
                yield conn, log_time, reader.deserialize(raw, conn.msgtype), None
            except Exception as exc:  # noqa: BLE001 - bytes that do not decode as the declared type, any error
                yield conn, log_time, None, f"undecodable {conn.msgtype}: {exc}"
    except BagError:
        raise
    except Exception as exc:
        raise BagError(f"bag read failed (truncated or corrupt?): {exc}") from exc


def read_messages(reader: AnyReader, topics: BagTopics, start_ns: int | None = None,
                  stop_ns: int | None = None) -> Iterator[BagMessage]:
    """Sensor messages in recorded order, adapted to frames (malformed ones carry their error)."""
    by_topic = {t: m for m, t in topics.sensors.items()}
    for conn, log_time, msg, error in read_decoded(reader, topics, start_ns, stop_ns):
        modality = by_topic[conn.topic]
        if msg is None:
            yield BagMessage(log_time, conn.topic, modality, None, error)
            continue
        try:
            yield BagMessage(log_time, conn.topic, modality, to_frame(msg))
        except MalformedMessageError as exc:
            yield BagMessage(log_time, conn.topic, modality, None, str(exc))
