"""Offline replay: recordings in, fused state out, as the live node would have produced it.

The bags' messages go, in recorded order, through the node's adapters and sensor sync; a fusion
timer ticks at `fusion_rate_hz` on the recorded clock (header stamps, or receive times with
`clock="receive"`). Outputs, all deterministic for the same bags, checkpoint and options:

    OUT/fused/            rosbag2 MCAP: /fused_state (sensor_msgs/Image, the node's layout), /diagnostics
    OUT/summary.json      what was read, skipped, dropped; attention and presence per modality; τ sweep
    OUT/attention.png, health.png, latency.png (and sweep.png, sweep.csv for a τ sweep)

Wall-clock figures (speed, processing time) are not deterministic and go to OUT/timing.json only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from .bag import find_topics, open_reader, read_messages
from .errors import BagError
from .frames import MODALITIES, NS_PER_S, FusedState, Modality
from .outputs import diagnostics, fused_state_rows
from .pipeline import FusionPipeline
from .sync import SensorSync, SyncConfig

_TYPES = get_typestore(Stores.ROS2_KILTED)


@dataclass(frozen=True)
class ReplayOptions:
    fusion_rate_hz: float = 20.0
    clock: str = "header"  # header: frames keep their header stamps; receive: stamped with the bag's receive time
    start_s: float | None = None  # seconds after the first bag's start
    end_s: float | None = None
    topics: dict[Modality, str] = field(default_factory=dict)  # overrides of the detected topics
    taus: tuple[tuple[float, float, float, float], ...] = ((1.0, 1.0, 1.0, 1.0),)  # first: written; all: sweep
    diagnostics_period_s: float = 1.0
    progress: bool = True


@dataclass
class _Trace:
    """Per fusion, deterministic: what the summary and the plots are made of."""

    stamps: list[int] = field(default_factory=list)
    attention: list[np.ndarray] = field(default_factory=list)  # (K taus, 3) mean over heads
    present: list[np.ndarray] = field(default_factory=list)
    ages: list[np.ndarray] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)  # fusion time - newest sensor stamp
    masked: list[np.ndarray] = field(default_factory=list)  # per configured modality at diagnostics times
    masked_stamps: list[int] = field(default_factory=list)


class _FusedBag:
    """rosbag2 MCAP of /fused_state and /diagnostics, the node's message layout."""

    def __init__(self, path: Path):
        self.writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.fused = self.writer.add_connection("/fused_state", "sensor_msgs/msg/Image", typestore=_TYPES)
        self.diag = self.writer.add_connection("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", typestore=_TYPES)

    def write_state(self, state: FusedState) -> None:
        T = _TYPES.types
        rows = fused_state_rows(state)
        msg = T["sensor_msgs/msg/Image"](_header(state.stamp_ns, state.frame_id), rows.shape[0], rows.shape[1], "32FC1",
                                         0, rows.shape[1] * 4, rows.astype("<f4").view(np.uint8).ravel())
        self.writer.write(self.fused, state.stamp_ns, _TYPES.serialize_cdr(msg, "sensor_msgs/msg/Image"))

    def write_diagnostics(self, stamp_ns: int, statuses) -> None:
        T = _TYPES.types
        status = [T["diagnostic_msgs/msg/DiagnosticStatus"](s.level, s.name, s.message, "replay",
                                                             [T["diagnostic_msgs/msg/KeyValue"](k, v) for k, v in s.values.items()])
                  for s in statuses]
        msg = T["diagnostic_msgs/msg/DiagnosticArray"](_header(stamp_ns, ""), status)
        self.writer.write(self.diag, stamp_ns, _TYPES.serialize_cdr(msg, "diagnostic_msgs/msg/DiagnosticArray"))

    def close(self) -> None:
        self.writer.close()


def _header(stamp_ns: int, frame_id: str):
    sec, nsec = divmod(stamp_ns, NS_PER_S)
    return _TYPES.types["std_msgs/msg/Header"](_TYPES.types["builtin_interfaces/msg/Time"](sec, nsec), frame_id)


def replay(bags: Sequence[str | Path], pipeline: FusionPipeline, out_dir: str | Path,
           opts: ReplayOptions = ReplayOptions(), sync_cfg: SyncConfig | None = None) -> dict:
    """Replay `bags` into `out_dir`; -> the summary (also written as summary.json).

    A bag that breaks off part-way (truncated, corrupt) is processed up to the fault; the outputs are
    closed properly and the summary names the error. BagError only when nothing could be read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "fused").exists():  # a previous replay's output is replaced; anything else is left alone
        if not (out / "summary.json").is_file():
            raise BagError(f"{out / 'fused'} exists and is not the output of an earlier replay; choose another -o")
        shutil.rmtree(out / "fused")
    taus = np.array(opts.taus, np.float32)
    pipeline.set_tau(taus[0])
    sync = SensorSync(sync_cfg or SyncConfig())
    period_ns = round(NS_PER_S / opts.fusion_rate_hz)
    diag_every = max(1, round(opts.diagnostics_period_s * opts.fusion_rate_hz))
    trace, events = _Trace(), []
    counts = {"messages": 0, "fusions": 0}
    wall_start = time.perf_counter()
    processing_s = 0.0

    with open_reader(bags) as reader:
        topics = find_topics(reader, opts.topics)
        configured = tuple(MODALITIES[m] for m in sorted(topics.sensors))
        start = reader.start_time + int(opts.start_s * NS_PER_S) if opts.start_s is not None else None
        stop = reader.start_time + int(opts.end_s * NS_PER_S) if opts.end_s is not None else None
        span_s = ((stop or reader.end_time) - (start or reader.start_time)) / NS_PER_S
        progress = _progress(span_s, opts.progress)
        fused_bag = _FusedBag(out / "fused") if topics.sensors else None
        next_tick = first_log = None

        def tick(stamp_ns: int) -> float:
            """Fuse at stamp_ns, write and record it; -> seconds spent fusing."""
            tick_start = time.perf_counter()
            states = pipeline.fuse_sweep(sync.snapshot(stamp_ns), taus)
            spent = time.perf_counter() - tick_start
            _record(trace, states, sync, stamp_ns)
            fused_bag.write_state(states[0])
            counts["fusions"] += 1
            if counts["fusions"] % diag_every == 0:
                health = sync.summary(stamp_ns)
                trace.masked.append(np.array([health[m]["masked"] for m in configured]))
                trace.masked_stamps.append(stamp_ns)
                fused_bag.write_diagnostics(stamp_ns, diagnostics(
                    health, states[0], pipeline.backend.name, pipeline.backend.precision, None,
                    trace.latency_ms[-1], 1.0 / opts.fusion_rate_hz, configured))
            return spent

        try:
            for msg in read_messages(reader, topics, start, stop):
                counts["messages"] += 1
                first_log = msg.log_time_ns if first_log is None else first_log
                progress.update((msg.log_time_ns - first_log) / NS_PER_S - progress.n)
                if msg.frame is None:
                    sync.drop(msg.modality, "malformed")
                    events.append(f"{msg.topic}: dropped: {msg.error}")
                    continue
                frame = msg.frame if opts.clock == "header" else dataclasses.replace(msg.frame, stamp_ns=msg.log_time_ns)
                t = frame.stamp_ns
                if next_tick is None or t < next_tick - period_ns - int(sync.cfg.reset_on_jump_back_s * NS_PER_S):
                    if next_tick is not None:
                        events.append(f"time jumped back by {(next_tick - t) / NS_PER_S:.3f} s at {msg.topic}: buffers reset")
                    next_tick = t + period_ns
                if t - next_tick > 10 * NS_PER_S:  # a gap in the recording: no fusions for the silent part
                    events.append(f"gap of {(t - next_tick) / NS_PER_S:.1f} s before {msg.topic}")
                    next_tick = t - (t - next_tick) % period_ns
                while t > next_tick:  # data stamped exactly at a tick belongs to it
                    processing_s += tick(next_tick)
                    next_tick += period_ns
                if not sync.add(frame):
                    events.append(f"{msg.topic}: dropped: stamp {frame.stamp_ns} not after the previous one")
            # the node's timer goes on after the last message, while some sensor is still fresh
            while next_tick is not None and any(sync.fresh(m, next_tick) for m in topics.sensors):
                processing_s += tick(next_tick)
                next_tick += period_ns
        except BagError as exc:
            events.append(f"read stopped: {exc}")
        finally:
            progress.close()
            if fused_bag is not None:
                fused_bag.close()
        wall_s = time.perf_counter() - wall_start

    if counts["messages"] == 0:
        reason = "; ".join(events) or (f"no readable camera, lidar or IMU message (skipped: {topics.skipped})")
        raise BagError(f"nothing could be read from {', '.join(map(str, bags))}: {reason}")
    summary = _summary(bags, topics, configured, counts, trace, taus, sync, events, opts)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    recorded_s = (trace.stamps[-1] - trace.stamps[0]) / NS_PER_S if len(trace.stamps) > 1 else 0.0
    timing = {"wall_s": wall_s, "recorded_s": recorded_s, "speed_x_real_time": recorded_s / wall_s if wall_s else None,
              "fusion_ms_mean": 1e3 * processing_s / max(counts["fusions"], 1)}
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    from .plots import replay_plots

    replay_plots(out, trace, configured, taus)
    summary["timing"] = timing
    return summary


def _record(trace: _Trace, states: list[FusedState], sync: SensorSync, tick: int) -> None:
    s = states[0]
    trace.stamps.append(tick)
    trace.attention.append(np.stack([st.modality_attention for st in states]))
    trace.present.append(s.present)
    trace.ages.append(s.ages_s)
    newest = sync.newest_stamp_ns()
    trace.latency_ms.append(float("nan") if newest is None else (tick - newest) / 1e6)


def _summary(bags, topics, configured, counts, trace, taus, sync, events, opts) -> dict:
    attention = np.array(trace.attention) if trace.attention else np.zeros((0, len(taus), 3))
    present = np.array(trace.present) if trace.present else np.zeros((0, 3), bool)
    lat = np.array(trace.latency_ms, np.float64)
    lat = lat[np.isfinite(lat)]

    def r(x):
        return round(float(x), 6)

    return {
        "bags": [str(b) for b in bags],
        "topics": {MODALITIES[m]: t for m, t in sorted(topics.sensors.items())},
        "skipped_topics": topics.skipped,
        "options": {"fusion_rate_hz": opts.fusion_rate_hz, "clock": opts.clock, "start_s": opts.start_s, "end_s": opts.end_s,
                    "max_age_s": list(sync.cfg.max_age_s)},
        "messages": counts["messages"],
        "fusions": counts["fusions"],
        "fused_rate_hz": r((counts["fusions"] - 1) / ((trace.stamps[-1] - trace.stamps[0]) / NS_PER_S))
        if len(trace.stamps) > 1 else 0.0,
        "sensors": {name: {k: v for k, v in h.items() if k != "age_s" and k != "masked"}
                    for name, h in sync.summary(trace.stamps[-1] if trace.stamps else 0).items() if name in configured},
        "present_fraction": {m: r(present[:, i].mean()) if len(present) else 0.0 for i, m in enumerate(MODALITIES)},
        "attention_mean": {m: r(attention[:, 0, i].mean()) if len(attention) else 0.0 for i, m in enumerate(MODALITIES)},
        "tau_sweep": [{"tau": [r(v) for v in tau],
                       "attention_mean": {m: r(attention[:, k, i].mean()) if len(attention) else 0.0
                                          for i, m in enumerate(MODALITIES)}} for k, tau in enumerate(taus)],
        "pipeline_latency_ms": {"p50": r(np.percentile(lat, 50)), "p99": r(np.percentile(lat, 99))} if len(lat) else None,
        "resets": sync.resets,
        "events": events[:100],
        "events_total": len(events),
    }


def _progress(total_s: float, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=round(total_s, 3), unit="s rec", disable=not enabled, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s recorded [{elapsed}<{remaining}, {rate_fmt}]")
