"""Offline replay: recordings in, fused state out, as the live node would have produced it.

The bags' messages go, in recorded order, through the node's adapters and sensor sync; a fusion
timer ticks at `fusion_rate_hz` on the recorded clock (header stamps, or receive times with
`clock="receive"`). Outputs, all deterministic for the same bags, checkpoint and options:

    OUT/fused/            rosbag2 MCAP: /fused_state (sensor_msgs/Image, the node's layout), /diagnostics
    OUT/summary.json      what was read, skipped, dropped; attention, trust and presence per modality; τ sweep
    OUT/attention.png, trust.png, health.png, latency.png (and sweep.png, sweep.csv for a τ sweep)
    OUT/attention_<t>.png, attention.mp4   where the fusion looks, when asked (see _AttentionMaps)

Wall-clock figures (speed, processing time) are not deterministic and go to OUT/timing.json only.
The outputs are written into OUT/.partial and moved into place when the replay ends: a run that fails
leaves an earlier run's outputs in OUT as they were.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer

from .attention_maps import MASKS, attend, camera_rgb, occlusion, picture, picture_size
from .bag import BagTopics, find_topics, open_reader, read_messages
from .clock import MAX_GAP_S, FusionClock, trigger_modality
from .config import FusionConfig
from .errors import BagError, ConfigError
from .frames import MODALITIES, NS_PER_S, FusedState, Modality
from .messages import TYPES, cdr, diagnostics_msg, fused_state_msg
from .outputs import TRUST_THRESHOLD, diagnostics, trust_values
from .params import PARAM_DEFAULTS, TAU_NAMES
from .pipeline import FusionPipeline, validate_tau, weights_digest
from .sync import SensorSync, SyncConfig
from .tokenize import SensorSnapshot, Tokenizer

if TYPE_CHECKING:
    from .model import FusionModel

NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class ReplayOptions:
    fusion_rate_hz: float = PARAM_DEFAULTS["fusion_rate_hz"]
    clock: str = "header"  # header: frames keep their header stamps; receive: stamped with the bag's receive time
    start_s: float | None = None  # seconds after the first bag's start
    end_s: float | None = None
    topics: dict[Modality, str] = field(default_factory=dict)  # overrides of the detected topics
    # the first τ is written to the bag; all of them make the τ sweep
    taus: tuple[tuple[float, float, float, float], ...] = (tuple(PARAM_DEFAULTS[n] for n in TAU_NAMES),)
    # timer, or camera | lidar | imu: fuse at each message of that sensor, as the node can
    trigger: str = PARAM_DEFAULTS["trigger"]
    sensors: tuple[str, ...] = MODALITIES  # the node's *_type: none leaves a sensor out
    diagnostics_period_s: float = PARAM_DEFAULTS["diagnostics_period_s"]
    progress: bool = True
    attention_at_s: tuple[float, ...] = ()  # attention_<t>.png at these instants, seconds after the bag's start
    attention_video: bool = False  # attention.mp4 over the recording
    batch: int = 1  # fusion instants per backend call (a GPU's throughput): the same messages, values to rounding


@dataclass
class _Trace:
    """Per fusion, deterministic: what the summary and the plots are made of."""

    sensors: tuple[str, ...] = MODALITIES[:3]  # the model's (FusedState.sensors): the per-sensor arrays follow them
    stamps: list[int] = field(default_factory=list)
    attention: list[np.ndarray] = field(default_factory=list)  # (K taus, S) mean over heads
    trust: list[np.ndarray] = field(default_factory=list)  # (K taus, S); NaN from a model without trust output
    present: list[np.ndarray] = field(default_factory=list)
    ages: list[np.ndarray] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)  # fusion time - newest sensor stamp
    masked: list[np.ndarray] = field(default_factory=list)  # per configured modality: sync's mask, not absence


class _FusedBag:
    """rosbag2 MCAP of /fused_state and /diagnostics, the node's messages."""

    def __init__(self, path: Path):
        self.writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.fused = self.writer.add_connection("/fused_state", "sensor_msgs/msg/Image", typestore=TYPES)
        self.diag = self.writer.add_connection("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", typestore=TYPES)

    def write_state(self, state: FusedState) -> None:
        self.writer.write(self.fused, state.stamp_ns, cdr(fused_state_msg(state)))

    def write_diagnostics(self, stamp_ns: int, statuses) -> None:
        self.writer.write(self.diag, stamp_ns, cdr(diagnostics_msg(stamp_ns, statuses, "replay")))

    def close(self) -> None:
        self.writer.close()


def fused_difference(a: str | Path, b: str | Path) -> dict:
    """Two replays' outputs (OUT folders) message by message: how many are byte-identical, whether
    the topics and stamps agree, and the largest difference of a /fused_state value. For checking a
    batched replay against one fusion at a time, or two machines against each other."""
    def messages(out):
        with open_reader([Path(out) / "fused"]) as reader:
            return [(conn.topic, stamp, bytes(raw)) for conn, stamp, raw in reader.messages()]

    def values(raw):
        return np.frombuffer(bytes(TYPES.deserialize_cdr(raw, "sensor_msgs/msg/Image").data), "<f4").astype(np.float64)

    ma, mb = messages(a), messages(b)
    same_stamps = [m[:2] for m in ma] == [m[:2] for m in mb]
    diff = max((float(np.abs(values(x[2]) - values(y[2])).max()) for x, y in zip(ma, mb)
                if same_stamps and x[0] == "/fused_state"), default=0.0)
    return {"messages": [len(ma), len(mb)], "same_topics_and_stamps": same_stamps,
            "byte_identical": sum(x == y for x, y in zip(ma, mb)) if same_stamps else 0, "max_abs_diff": diff}


@dataclass
class StampRate:
    """A sensor's rate over a recording: steps forward in time per second of them, counting only messages
    stamped after every earlier one (time going back, a loop or a stray old stamp, adds none) and no step
    over MAX_GAP_S (a gap in the recording, which the fusion clock skips too)."""

    newest_ns: int | None = None
    steps: int = 0
    span_ns: int = 0

    def add(self, stamp_ns: int) -> None:
        if self.newest_ns is not None and 0 < stamp_ns - self.newest_ns <= MAX_GAP_S * NS_PER_S:
            self.steps += 1
            self.span_ns += stamp_ns - self.newest_ns
        self.newest_ns = stamp_ns if self.newest_ns is None else max(self.newest_ns, stamp_ns)

    @property
    def hz(self) -> float:
        return self.steps * NS_PER_S / self.span_ns if self.steps else 0.0


@dataclass
class Recording:
    """What `fuse_recording` learned about the bags while it went (filled in as it runs)."""

    topics: BagTopics | None = None
    configured: tuple[str, ...] = ()
    messages: int = 0
    fault: str | None = None  # why reading broke off before the end, if it did
    read_notes: list[str] = field(default_factory=list)  # what the reader worked around: a bad index, damaged chunks
    events: list[str] = field(default_factory=list)  # gaps, resets, in recorded order; not per-message drops
    first_error: dict[Modality, str] = field(default_factory=dict)  # of each sensor's first malformed message
    rates: dict[Modality, StampRate] = field(default_factory=lambda: {m: StampRate() for m in Modality})
    # per sensor, its header stamp minus the bag's receive time at its first and its latest frame
    clock_offsets_ns: dict[Modality, list[int]] = field(default_factory=dict)

    def clear_counts(self) -> None:
        """Count from here (a window's own part, replay_windows); the rates' newest stamps are kept: they decide
        what the next message adds."""
        self.messages = 0
        self.events.clear()  # in place: the clock holds this list
        self.first_error.clear()
        self.clock_offsets_ns.clear()
        for rate in self.rates.values():
            rate.steps = rate.span_ns = 0

    def extend(self, later: Recording) -> None:
        """Add what `later`, the counts of the part of the recording after this one, found."""
        self.messages += later.messages
        self.events += later.events
        for m, error in later.first_error.items():
            self.first_error.setdefault(m, error)
        for m, rate in later.rates.items():
            self.rates[m].steps += rate.steps
            self.rates[m].span_ns += rate.span_ns
        for m, (first, last) in later.clock_offsets_ns.items():
            self.clock_offsets_ns.setdefault(m, [first, last])[1] = last
        self.fault = later.fault

    def note_clocks(self, cfg: SyncConfig, opts: ReplayOptions) -> None:
        """After the last message: the note on disagreeing sensor clocks, if they do (`clock_note`)."""
        if opts.clock == "header" and (note := self.clock_note(int(max(cfg.max_age_s) * NS_PER_S))):
            self.events.append(note)

    def clock_note(self, tolerance_ns: int) -> str | None:
        """A note where the sensors' header clocks disagree by more than `tolerance_ns` (against the bag's
        receive times) at the start or the end: a sensor whose clock is behind is stale at every fusion."""
        for when, i in (("first", 0), ("last", 1)):
            offsets = {m: o[i] for m, o in self.clock_offsets_ns.items()}
            if len(offsets) > 1 and max(offsets.values()) - min(offsets.values()) > tolerance_ns:
                each = ", ".join(f"{MODALITIES[m]} {o / NS_PER_S:+.3f} s" for m, o in sorted(offsets.items()))
                return (f"the sensors' header clocks disagree (header stamp - receive time at their {when} frames: "
                        f"{each}): a sensor whose clock is behind is stale at every fusion; --clock receive "
                        "stamps each frame with its receive time")
        return None

    def notes(self, sync: SensorSync) -> list[str]:
        """What happened, the read fault first, then per-message drops per sensor and reason (counted by
        `sync`, not listed one by one: thousands of them must not hide the rest), then what the reader
        worked around, then `events`."""
        notes = [f"read stopped: {self.fault}"] if self.fault else []
        for m, h in sync.health.items():
            for reason, n in h.drop_reasons.items():
                detail = f"; the first: {self.first_error[m]}" if reason == "malformed" and m in self.first_error else ""
                notes.append(f"{MODALITIES[m]}: {n} of {h.received + h.dropped} dropped: {reason}{detail}")
        return notes + self.read_notes + self.events


@dataclass(frozen=True)
class Tick:
    """One fusion instant: the sync's view at that instant (a batched replay fuses the snapshot later,
    when the sync has moved on), and the snapshot (None once sent back from a window: replay_windows)."""

    stamp_ns: int
    fresh: np.ndarray  # (len(Modality),) per Modality: the sync would fuse its frames (not stale, not silent)
    newest_ns: int | None  # the newest sensor stamp seen
    health: dict  # sync.summary at the instant, for /diagnostics
    snap: SensorSnapshot | None


def fuse_recording(reader, pipeline: FusionPipeline, sync: SensorSync, opts: ReplayOptions, taus: np.ndarray,
                   rec: Recording, progress=None, trailing: bool = True) -> Iterator[tuple[Tick, list[FusedState]]]:
    """The node's behaviour on recorded time: feed messages in order, fuse on the timer (or trigger).

    Yields each fusion instant and its fused states (one per τ row); see `recorded_snapshots` and
    `fuse_snapshots`. Where reading breaks off (truncated, corrupt) the fusions end, with the fault in
    `rec.fault`.
    """
    yield from fuse_snapshots(recorded_snapshots(reader, sync, opts, rec, progress, trailing),
                              pipeline, sync, opts, taus, rec)


def fuse_snapshots(snaps: Iterator[SensorSnapshot], pipeline: FusionPipeline, sync: SensorSync, opts: ReplayOptions,
                   taus: np.ndarray, rec: Recording) -> Iterator[tuple[Tick, list[FusedState]]]:
    """Each snapshot (taken from `sync` as it comes) and its fused states. Up to `opts.batch` instants
    are fused in one call (pipeline.fuse_many: the states one by one gives, to float rounding). A
    BagError from `snaps` ends them, in `rec.fault`, after the instants before it are fused."""
    ticks: list[Tick] = []

    def fused() -> list[tuple[Tick, list[FusedState]]]:
        done = list(zip(ticks, pipeline.fuse_many([t.snap for t in ticks], taus))) if ticks else []
        ticks.clear()
        return done

    try:
        for snap in snaps:
            fresh = np.array([sync.fresh(m, snap.stamp_ns) for m in Modality])
            ticks.append(Tick(snap.stamp_ns, fresh, sync.newest_stamp_ns(), sync.summary(snap.stamp_ns), snap))
            if len(ticks) >= opts.batch:
                yield from fused()
    except BagError as exc:
        rec.fault = str(exc)
    yield from fused()  # the instants read before the end (or the fault)


def recorded_snapshots(reader, sync: SensorSync, opts: ReplayOptions, rec: Recording, progress=None,
                       trailing: bool = True) -> Iterator[SensorSnapshot]:
    """What the node would fuse, instant by instant: messages fed in recorded order into `sync`, a
    snapshot at each timer tick (or trigger message). Replay fuses them; training tokenizes them.

    Ends with the trailing ticks a live node's timer would still make while some sensor is fresh (at
    most its max age), and raises BagError only where reading broke off (after everything before the
    fault).
    """
    feed = RecordedFeed(reader, sync, opts, rec)
    start, stop = _window_ns(reader, opts)
    yield from feed.read(start, stop, progress)
    if progress is not None:
        _advance(progress, progress.total)  # read to the end: the last message need not be at the very end
    rec.note_clocks(sync.cfg, opts)
    if trailing:
        yield from feed.clock.drain()


class RecordedFeed:
    """The loop of `recorded_snapshots` in parts: `read` a span of the recording (any number of spans,
    in order), then the clock's drain. replay_windows replays a window of a recording so, after a warm-up.
    phase_ns: see FusionClock (a window's clock ticks where the whole recording's would); clock: one
    carried on from the part of the recording before (replay_windows), instead of a new one."""

    def __init__(self, reader, sync: SensorSync, opts: ReplayOptions, rec: Recording, phase_ns: int | None = None,
                 clock: FusionClock | None = None):
        _check(opts)
        leave_out = {m: f"{MODALITIES[m]} is configured as none" for m in Modality if MODALITIES[m] not in opts.sensors}
        leave_out |= {m: f"the model does not read {MODALITIES[m]}" for m in Modality if m not in sync.cfg.sensors}
        rec.topics = find_topics(reader, opts.topics, leave_out)
        rec.configured = tuple(MODALITIES[m] for m in sorted(rec.topics.sensors))
        rec.read_notes = reader.notes  # the reader's own list: what it notes while reading shows too
        self.reader, self.sync, self.opts, self.rec = reader, sync, opts, rec
        self.clock = clock or FusionClock(sync, opts.fusion_rate_hz, trigger_modality(opts.trigger),
                                          events=rec.events, phase_ns=phase_ns)  # its notes join the recording's

    def read(self, start: int | None, stop: int | None, progress=None) -> Iterator[SensorSnapshot]:
        """The snapshots due while the messages received in [start, stop) are fed in (None: no bound)."""
        sync, rec = self.sync, self.rec
        for msg in read_messages(self.reader, rec.topics, start, stop):
            rec.messages += 1
            if progress is not None:
                _advance(progress, (msg.log_time_ns - (self.reader.start_time if start is None else start)) // NS_PER_MS)
            if msg.frame is None:
                sync.drop(msg.modality, "malformed", msg.error)
                rec.first_error.setdefault(msg.modality, f"{msg.topic}: {msg.error}")
                continue
            offset = msg.frame.stamp_ns - msg.log_time_ns
            rec.clock_offsets_ns.setdefault(msg.modality, [offset, offset])[1] = offset
            frame = msg.frame if self.opts.clock == "header" else dataclasses.replace(msg.frame, stamp_ns=msg.log_time_ns)
            rec.rates[msg.modality].add(frame.stamp_ns)
            dropped = sync.health[msg.modality].dropped
            yield from self.clock.add(frame, msg.topic, msg.modality)
            if sync.health[msg.modality].dropped != dropped:
                rec.events.pop()  # the clock's one note on a refused frame, its last: `notes` sums drops per sensor

    def first_stamp(self, start: int | None, stop: int | None) -> int | None:
        """The stamp of the first frame in [start, stop) that the clock would take: where its ticks start."""
        for msg in read_messages(self.reader, self.rec.topics, start, stop):
            if msg.frame is not None:
                return msg.frame.stamp_ns if self.opts.clock == "header" else msg.log_time_ns
        return None


def recorded_inputs(bags: Sequence[str | Path], cfg: FusionConfig, opts: ReplayOptions = ReplayOptions(progress=False),
                    sync_cfg: SyncConfig | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(stamp, model inputs at τ = 1) at each instant the node would fuse a recording: for training
    on recordings and for INT8 calibration. A recording cut short ends at the fault, as replay does."""
    tokenizer = Tokenizer(cfg)
    sync = SensorSync(sync_cfg or SyncConfig.for_model(cfg))
    ones = np.ones(1 + len(cfg.sensors), np.float32)
    with open_reader(bags) as reader:
        try:
            for snap in recorded_snapshots(reader, sync, opts, Recording()):
                yield snap.stamp_ns, tokenizer(snap, ones)
        except BagError:
            pass


def _check(opts: ReplayOptions) -> None:
    if not (math.isfinite(opts.fusion_rate_hz) and opts.fusion_rate_hz > 0):
        raise ConfigError(f"fusion rate must be > 0 Hz, got {opts.fusion_rate_hz}")
    if opts.clock not in ("header", "receive"):
        raise ConfigError(f"clock must be header or receive, got {opts.clock!r}")
    trigger_modality(opts.trigger)
    if not (isinstance(opts.batch, int) and opts.batch >= 1):
        raise ConfigError(f"batch must be an integer >= 1, got {opts.batch!r}")
    if not all(t is None or math.isfinite(t) for t in (opts.start_s, opts.end_s)):
        raise ConfigError(f"--start and --end must be finite seconds, got {opts.start_s} and {opts.end_s}")
    if opts.start_s is not None and opts.end_s is not None and opts.end_s <= opts.start_s:
        raise ConfigError(f"--end {opts.end_s} must be after --start {opts.start_s}")
    if not all(math.isfinite(t) and t >= 0 for t in opts.attention_at_s):
        raise ConfigError(f"attention instants must be seconds >= 0 after the bag's start, "
                          f"got {list(opts.attention_at_s)}")


OUTPUTS = ("fused", "summary.json", "timing.json", "attention.png", "trust.png", "health.png", "latency.png", "sweep.png",
           "sweep.csv", "attention.mp4")
MARKER = ".fusion_attn_replay"  # written first: this folder holds replay output that a new run may replace
STAGE = ".partial"  # the outputs while the replay runs, moved into OUT when it ends


def replay(bags: Sequence[str | Path], pipeline: FusionPipeline, out_dir: str | Path,
           opts: ReplayOptions = ReplayOptions(), sync_cfg: SyncConfig | None = None,
           attention_model: FusionModel | None = None, jobs: int = 1, params: dict | None = None) -> dict:
    """Replay `bags` into `out_dir`; -> the summary (also written as summary.json).

    A bag that breaks off part-way (truncated, corrupt) is processed up to the fault; the outputs are
    closed properly and the summary names the error. BagError only when nothing could be read. Options,
    τ, the bags and the window are checked before `out_dir` is touched, and the outputs are written aside
    (STAGE) and replace an earlier replay's only at the end: a run that fails leaves them as they were.
    `attention_model`: the torch model the pipeline runs, for the attention maps (opts.attention_*).
    jobs > 1: the recording in that many time windows at once, a process each, each building its pipeline
    from `params` (the node's parameters `pipeline` was built from): the same outputs (replay_windows).
    """
    _check(opts)
    maps_asked = bool(opts.attention_at_s) or opts.attention_video
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ConfigError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and maps_asked:
        raise ConfigError("attention maps come from one replay of the whole recording: leave out --jobs")
    if jobs > 1 and params is None:
        raise ConfigError("a replay in windows builds a pipeline per process from the node's parameters: pass params")
    if maps_asked and (attention_model is None or weights_digest(attention_model) != pipeline.weights_digest):
        raise ConfigError("attention maps need the torch model that the pipeline runs (attention_model)")
    for tau in opts.taus:
        validate_tau(tau, pipeline.cfg.sensors)
    taus = np.array(opts.taus, np.float32)
    wall_start = time.perf_counter()
    with open_reader(bags) as reader:  # every check before the output folder is touched
        span_s = max(reader.end_time - reader.start_time, 0) / NS_PER_S  # an empty bag's times are sentinels
        if (opts.start_s is not None and opts.start_s > span_s) or (opts.end_s is not None and opts.end_s < 0):
            raise BagError(f"--start {opts.start_s} / --end {opts.end_s} select nothing: the recording spans "
                           f"0 .. {span_s:.3f} s")
        out = Path(out_dir)
        stage = _prepare_output(out)
        try:
            summary, whole = None, {}
            if jobs > 1:
                from .replay_windows import replay_windows

                summary, why = replay_windows(reader, bags, pipeline, params, stage, opts, taus, sync_cfg, jobs,
                                              wall_start)
                whole = {"windows": {"jobs": jobs, "replayed_whole": why}}
            if summary is None:
                summary = _replay(reader, bags, pipeline, stage, opts, taus, sync_cfg,
                                  attention_model if maps_asked else None, wall_start, whole)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    _commit(stage, out)
    return summary


def _replay(reader, bags, pipeline: FusionPipeline, out: Path, opts: ReplayOptions, taus: np.ndarray,
            sync_cfg: SyncConfig | None, attention_model: FusionModel | None, wall_start: float,
            timing_notes: dict) -> dict:
    """`replay`'s run, from an open reader into the staging folder `out`; `timing_notes` go to timing.json."""
    sync = SensorSync(sync_cfg or SyncConfig.for_model(pipeline.cfg))
    rec = Recording()
    processing_s = 0.0
    progress = _progress(_window_ms(reader, opts), opts.progress)
    writer = ReplayWriter(out, opts, pipeline.backend_info())
    maps = None if attention_model is None else _AttentionMaps(out, attention_model, pipeline, opts)
    try:  # a read fault ends the loop, in rec.fault
        states_iter = fuse_recording(reader, pipeline, sync, opts, taus, rec, progress)
        while True:
            tick_start = time.perf_counter()
            tick, states = next(states_iter, (None, None))
            if states is None:
                break
            processing_s += time.perf_counter() - tick_start
            if maps is not None:  # the bag's start on the fusion's clock: the first frame's offset
                first_offset = next(iter(rec.clock_offsets_ns.values()))[0] if opts.clock == "header" else 0
                maps.add(tick.snap, reader.start_time + first_offset)
            writer.add(tick, states, rec.configured)
    finally:
        progress.close()
        writer.close()
        if maps is not None:
            maps.close()
    timing = {"wall_s": time.perf_counter() - wall_start, "processing_s": processing_s, **timing_notes}
    extra = {"attention_maps": maps.summary()} if maps is not None else {}
    return finish_replay(out, bags, rec, sync, writer, opts, taus, pipeline.backend_info(), pipeline.frame_id,
                         timing, extra)


class ReplayWriter:
    """The fused bag and the trace, fusion by fusion, as the node publishes: a state per fusion (none
    where every sensor is masked), /diagnostics every diagnostics period."""

    def __init__(self, out: Path, opts: ReplayOptions, backend_info: dict):
        self.out, self.opts, self.backend_info = out, opts, backend_info
        self.diag_every = max(1, round(opts.diagnostics_period_s * opts.fusion_rate_hz))
        self.trace = _Trace()
        self.fused_bag: _FusedBag | None = None
        self.withheld = 0

    def add(self, tick: Tick, states: list[FusedState], configured: tuple[str, ...]) -> None:
        self.fused_bag = self.fused_bag or _FusedBag(self.out / "fused")
        _record(self.trace, states, tick, configured)
        if states[0].all_masked:  # withheld, as the node does: the model's output from nothing
            self.withheld += 1
        else:
            self.fused_bag.write_state(states[0])
        if len(self.trace.stamps) % self.diag_every == 0:
            self.fused_bag.write_diagnostics(tick.stamp_ns, diagnostics(
                tick.health, states[0], self.backend_info, None, self.trace.latency_ms[-1],
                1.0 / self.opts.fusion_rate_hz, configured))

    def close(self) -> None:
        if self.fused_bag is not None:
            self.fused_bag.close()


def finish_replay(out: Path, bags, rec: Recording, sync: SensorSync, writer: ReplayWriter, opts: ReplayOptions,
                  taus: np.ndarray, backend_info: dict, frame_id: str, timing: dict, extra: dict) -> dict:
    """After the fusions: BagError where nothing came of the recording, else summary.json, timing.json
    (`timing`: wall_s, processing_s, and what else the run reports) and the plots; -> the summary."""
    trace = writer.trace
    if rec.messages == 0:
        reason = (f"read stopped: {rec.fault}" if rec.fault
                  else f"no readable camera, lidar or IMU message (skipped: {rec.topics.skipped})")
        raise BagError(f"nothing could be read from {', '.join(map(str, bags))}: {reason}")
    if not trace.stamps:  # read, but every frame dropped, or never fresh at a fusion
        stamps_off = any(r in ("out_of_order", "duplicate_stamp") for h in sync.health.values() for r in h.drop_reasons)
        hint = "; --clock receive stamps each frame with its receive time" if opts.clock == "header" and stamps_off else ""
        raise BagError(f"no fused state from {', '.join(map(str, bags))}: "
                       + "; ".join(rec.notes(sync)[:4] or ["no sensor frame was fresh at any fusion"]) + hint)
    summary = _summary(bags, rec, trace, taus, sync, opts)
    summary["backend"] = backend_info
    summary["frame_id"] = frame_id  # of the fused states written
    summary["withheld_all_masked"] = writer.withheld  # fusion ticks with every sensor masked: no state written
    summary |= extra
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    recorded_s, wall_s = _span_s(trace.stamps), timing.pop("wall_s")
    timing = {"wall_s": wall_s, "recorded_s": recorded_s, "speed_x_real_time": recorded_s / wall_s if wall_s else None,
              "fusion_ms_mean": 1e3 * timing.pop("processing_s") / max(len(trace.stamps), 1), "batch": opts.batch,
              **timing}
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    from .plots import replay_plots

    replay_plots(out, trace, rec.configured, taus)
    summary["timing"] = timing
    return summary


VIDEO_HZ = 2.0  # attention.mp4 frames per second of recorded time, played in real time: cheap, enough to follow
OCCLUSION_K, OCCLUSION_DRAWS = 5, 16  # each picture's occlusion check: top 5 tokens against 16 random sets of 5


class _AttentionMaps:
    """attention_<t>.png at the first fusion at or after each asked instant, and attention.mp4 over the
    recording at VIDEO_HZ (attention_maps.picture, at the first τ). The torch model gives the token weights,
    which the backends do not output. Each picture's occlusion check goes to the summary: the fused state's
    change when the OCCLUSION_K most-attended tokens of a sensor are masked, and when as many random ones are."""

    def __init__(self, out: Path, model: FusionModel, pipeline: FusionPipeline, opts: ReplayOptions):
        self.out, self.model, self.tokenizer = out, model, pipeline.tokenizer
        self.tau = np.array(opts.taus[0], np.float32)
        self.pending = sorted(set(opts.attention_at_s))
        self.instants: dict[str, dict] = {}
        self.video, self.frames, self.last_frame_ns = None, 0, None
        self.last_s: float | None = None  # the latest fusion, for the note on an instant never reached
        if opts.attention_video:
            self.video = cv2.VideoWriter(str(out / "attention.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_HZ,
                                         picture_size(model.cfg))
            if not self.video.isOpened():
                raise ConfigError("cannot write attention.mp4: this OpenCV has no MP4 encoder")

    def add(self, snap: SensorSnapshot, origin_ns: int) -> None:
        """`origin_ns`: the bag's start on the clock the snapshot is stamped with."""
        t_s = self.last_s = (snap.stamp_ns - origin_ns) / NS_PER_S
        due = [t for t in self.pending if t <= t_s]
        # abs: a frame on each jump back in recorded time too
        frame_due = self.video is not None and (self.last_frame_ns is None
                                                or abs(snap.stamp_ns - self.last_frame_ns) >= NS_PER_S / VIDEO_HZ)
        if not (due or frame_due):
            return
        x = self.tokenizer(snap, self.tau)  # the pipeline's tokenizer: this snapshot's tokens are cached
        att = attend(self.model, x)
        caption = f"{t_s:.2f} s after the bag's start   tau " + "/".join(f"{v:g}" for v in self.tau)
        bgr = np.ascontiguousarray(picture(x, att, self.model.cfg, camera_rgb(snap.camera), caption)[..., ::-1])
        for t in due:
            self.pending.remove(t)
            name = f"attention_{t:g}.png"
            cv2.imwrite(str(self.out / name), bgr)
            self.instants[f"{t:g}"] = {"file": name, "fused_at_s": round(t_s, 6), "occlusion": self._occlusion(x)}
        if frame_due:
            self.video.write(bgr)
            self.frames, self.last_frame_ns = self.frames + 1, snap.stamp_ns

    def _occlusion(self, x: dict[str, np.ndarray]) -> dict:
        """Per sensor: the fused state's L2 change with its top-k tokens masked, and with k random ones
        (mean of the draws); None without 2k valid tokens. Seeded per picture: the summary is deterministic."""
        rng = np.random.default_rng(0)
        result: dict = {"k": OCCLUSION_K}
        for sensor in MASKS:
            top, rand = occlusion(self.model, x, sensor, OCCLUSION_K, OCCLUSION_DRAWS, rng)
            result[sensor] = None if math.isnan(top) else {"top": round(top, 6), "random": round(rand, 6)}
        return result

    def close(self) -> None:
        if self.video is not None:
            self.video.release()

    def summary(self) -> dict:
        last = "none at all" if self.last_s is None else f"the last at {self.last_s:.3f} s"
        missed = {f"{t:g}": {"file": None, "note": f"no fusion at or after it ({last})"} for t in self.pending}
        video = {"file": "attention.mp4", "frames": self.frames, "hz": VIDEO_HZ} if self.video is not None else None
        return {"instants": {**self.instants, **missed}, "video": video}


def _prepare_output(out: Path) -> Path:
    """Check that `out` may take the outputs (a new folder, or an earlier replay's) -> an empty staging
    folder in it, which `_commit` moves into place."""
    if out.exists() and not out.is_dir():
        raise BagError(f"output {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BagError(f"cannot create the output folder {out}: {exc}") from exc
    if not (out / MARKER).exists() and (theirs := [p.name for p in written_outputs(out)]):
        raise BagError(f"{out} holds {', '.join(theirs)}, not the output of an earlier replay; choose another -o")
    (out / MARKER).touch()
    stage = out / STAGE
    shutil.rmtree(stage, ignore_errors=True)  # a run killed before its end leaves one
    stage.mkdir()
    return stage


def written_outputs(folder: Path) -> list[Path]:
    """What a replay writes that is in `folder`."""
    return [p for p in (*(folder / name for name in OUTPUTS), *sorted(folder.glob("attention_*.png"))) if p.exists()]


def _commit(stage: Path, out: Path) -> None:
    """The finished run's outputs replace the earlier run's."""
    for path in written_outputs(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in stage.iterdir():
        path.rename(out / path.name)
    stage.rmdir()


def _span_s(stamps: list[int]) -> float:
    """Recorded time covered by the fusions: forward steps only (time may have jumped back), none over
    MAX_GAP_S (a gap the fusion clock skipped)."""
    steps = np.diff(np.array(stamps, np.int64))
    return float(steps[(steps > 0) & (steps <= MAX_GAP_S * NS_PER_S)].sum()) / NS_PER_S if len(stamps) > 1 else 0.0


def _record(trace: _Trace, states: list[FusedState], tick: Tick, configured: tuple[str, ...]) -> None:
    s = states[0]
    trace.sensors = s.sensors
    trace.stamps.append(tick.stamp_ns)
    trace.masked.append(np.array([not tick.fresh[Modality[m.upper()]] for m in configured]))
    trace.attention.append(np.stack([st.modality_attention for st in states]))
    trace.trust.append(np.stack([trust_values(st) for st in states]))
    trace.present.append(s.present)
    trace.ages.append(s.ages_s)
    trace.latency_ms.append(float("nan") if tick.newest_ns is None else (tick.stamp_ns - tick.newest_ns) / 1e6)


def _summary(bags, rec: Recording, trace: _Trace, taus, sync, opts) -> dict:
    names = tuple(MODALITIES[m] for m in sync.cfg.sensors)  # the model's: its per-sensor arrays follow them
    attention = np.array(trace.attention) if trace.attention else np.zeros((0, len(taus), len(names)))
    trust = np.array(trace.trust) if trace.trust else np.zeros((0, len(taus), len(names)))
    present = np.array(trace.present) if trace.present else np.zeros((0, len(names)), bool)
    lat = np.array(trace.latency_ms, np.float64)
    lat = lat[np.isfinite(lat)]
    notes = rec.notes(sync)

    def r(x):
        return round(float(x), 6)

    health = sync.summary(trace.stamps[-1] if trace.stamps else 0)
    return {
        "bags": [str(b) for b in bags],
        "topics": {MODALITIES[m]: t for m, t in sorted(rec.topics.sensors.items())},
        "skipped_topics": rec.topics.skipped,
        "options": {"fusion_rate_hz": opts.fusion_rate_hz, "trigger": opts.trigger, "clock": opts.clock,
                    "start_s": opts.start_s, "end_s": opts.end_s, "max_age_s": list(sync.cfg.max_age_s)},
        "messages": rec.messages,
        "fusions": len(trace.stamps),
        "fused_rate_hz": r((len(trace.stamps) - 1) / span) if (span := _span_s(trace.stamps)) > 0 else 0.0,
        # the rate over the whole recording, not sync's moving one (its value at the last message)
        "sensors": {name: {**{k: v for k, v in health[name].items() if k not in ("age_s", "masked", "late")},
                           "rate_hz": round(rec.rates[m].hz, 3)}
                    for m, name in zip(Modality, MODALITIES) if name in rec.configured},
        "present_fraction": {m: r(present[:, i].mean()) if len(present) else 0.0 for i, m in enumerate(names)},
        "attention_mean": {m: r(attention[:, 0, i].mean()) if len(attention) else 0.0 for i, m in enumerate(names)},
        **_trust_summary(trust[:, 0], present, names),
        "tau_sweep": [{"tau": [r(v) for v in tau],
                       "attention_mean": {m: r(attention[:, k, i].mean()) if len(attention) else 0.0
                                          for i, m in enumerate(names)},
                       **_trust_summary(trust[:, k], present, names)} for k, tau in enumerate(taus)],
        "pipeline_latency_ms": {"p50": r(np.percentile(lat, 50)), "p99": r(np.percentile(lat, 99))} if len(lat) else None,
        "resets": sync.resets,
        "read_fault": rec.fault,
        "events": notes[:100],  # the fault and the drops come first: never cut off
        "events_total": len(notes),
    }


def _trust_summary(trust: np.ndarray, present: np.ndarray, names: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """trust (n, S) at one τ, present (n, S) -> per sensor (`names`): trust_mean over the fusions it was present
    in (an absent sensor's trust is 0 by definition, which present_fraction already tells; None: never
    present) and untrusted_share, of all fusions, present and trusted below TRUST_THRESHOLD. Both None
    from a model without trust output."""
    n = max(len(trust), 1)
    mean, share = {}, {}
    for i, m in enumerate(names):
        seen = trust[present[:, i], i]
        unknown = bool(np.isnan(trust[:, i]).any())
        mean[m] = None if unknown or not len(seen) else round(float(seen.mean()), 6)
        share[m] = None if unknown else round(float((seen < TRUST_THRESHOLD).sum()) / n, 6)
    return {"trust_mean": mean, "untrusted_share": share}


def _window_ns(reader, opts: ReplayOptions) -> tuple[int | None, int | None]:
    """--start and --end as the bag's receive times, within the bag (None: from its start, to its end)."""
    def at(s):
        return min(max(reader.start_time + int(s * NS_PER_S), reader.start_time), reader.end_time + 1)

    return (None if opts.start_s is None else at(opts.start_s)), (None if opts.end_s is None else at(opts.end_s))


def _window_ms(reader, opts: ReplayOptions) -> int:
    """The recorded time to be read, --start to --end within the bag, in whole milliseconds."""
    start, stop = _window_ns(reader, opts)
    return max(0, (min(stop or reader.end_time, reader.end_time) - (start or reader.start_time)) // NS_PER_MS)


def _progress(total_ms: int, enabled: bool):
    """A bar of recorded time read; whole milliseconds, so that it ends at its total exactly (floats
    summed step by step fall short of it or pass it)."""
    from tqdm import tqdm

    return tqdm(total=total_ms, unit="s rec", unit_scale=1e-3, disable=not enabled, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s recorded [{elapsed}<{remaining}, {rate_fmt}]")


def _advance(progress, done_ms: int) -> None:
    """Move the bar on to `done_ms`, never back (time may go back) and never past its total."""
    progress.update(max(0, min(done_ms, progress.total) - progress.n))
