"""One recording replayed in time windows, a process each, with the outputs of one replay of the whole.

    replay(bags, pipeline, out, opts, sync_cfg, jobs=8, params=params)    # `fusion-attn replay --jobs 8`

The recording is cut by receive time into `jobs` windows. Each window's process first reads a warm-up
before its window, fusing nothing, so that its sync holds what a replay of the whole holds at the
window's start (the latest frames, the IMU history, each sensor's period; the fusion clock ticks on the
whole recording's instants: FusionClock's phase_ns). Then it fuses its window, counting from zero.

This process checks each window's start against the end of the window before it (`_state_key`: the
sync's state digest, the clock's next tick, the rates' newest stamps). Where they differ (a sensor
silent for longer than the warm-up; time gone back before the window) it replays that window again here,
from the state the window before ended in. Then it writes the windows' fusions in order, with the
counts of the windows before added to each window's: the fused bag, summary.json and the plots are
those of one replay of the whole (byte-identical at batch 1 and on torch-cudagraph at any batch; a
batch of ONNX Runtime fusions differs in the last bits from one at a time, and windows cut batches).

Replayed whole instead (timing.json says why): a recording read without its index (every process
would read it all), or one whose reading had to work around damage (each window would note it).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from .bag import IndexedReader
from .errors import BagError, FusionAttnError
from .frames import MODALITIES, NS_PER_S, FusedState, Modality
from .pipeline import FusionPipeline
from .replay import (
    NS_PER_MS,
    RecordedFeed,
    Recording,
    ReplayOptions,
    ReplayWriter,
    Tick,
    _advance,
    _progress,
    _window_ms,
    _window_ns,
    finish_replay,
    fuse_snapshots,
)
from .sync import RATE_MEMORY, SensorHealth, SensorSync, SyncConfig

WARM_UP_MIN_S = 1.0


@dataclass(frozen=True)
class Window:
    """A part of the recording by receive time: fused over [start_ns, stop_ns), read from warm_start_ns.
    None: the recording's (or --start/--end's) own bound."""

    index: int
    warm_start_ns: int | None
    start_ns: int | None
    stop_ns: int | None
    last: bool  # the recording's end: the timer's trailing ticks follow


@dataclass
class WindowResult:
    fusions: list[tuple[Tick, list[FusedState]]]  # the ticks without their snapshots
    rec: Recording  # what the window itself read and noted
    health: dict[Modality, SensorHealth]  # its counts, and at its end the sync's state for the summary
    resets: int
    start_key: str | None  # the state its warm-up reached (None: read from the recording's start, or failed)
    end_key: str
    end_state: bytes  # the sync, clock and recording at its end: where the next window starts when redone
    processing_s: float


def replay_windows(reader, bags, pipeline: FusionPipeline, params: dict, out: Path, opts: ReplayOptions,
                   taus: np.ndarray, sync_cfg: SyncConfig | None, jobs: int, wall_start: float) -> tuple[dict | None, str]:
    """`replay`'s run in windows (see the module); -> (summary, "") or (None, why the recording is to be
    replayed whole), in which case `out` is left as it was."""
    from .batch import run_jobs

    if not isinstance(reader, IndexedReader) or reader.notes:
        return None, "read without its index" if not isinstance(reader, IndexedReader) else reader.notes[0]
    sync_cfg = sync_cfg or SyncConfig.for_model(pipeline.cfg)
    rec = Recording()
    feed = RecordedFeed(reader, SensorSync(sync_cfg), opts, rec)
    start, stop = _window_ns(reader, opts)
    phase_ns = feed.first_stamp(start, stop)
    warm_up_s = _warm_up_s(reader, rec, sync_cfg)
    origin = start if start is not None else reader.start_time
    windows = _windows(origin, stop if stop is not None else reader.end_time, jobs, warm_up_s, start)
    job_args = [(params, bags, opts, sync_cfg, taus, w, phase_ns, None) for w in windows]
    writer = ReplayWriter(out, opts, pipeline.backend_info())
    progress = _progress(_window_ms(reader, opts), opts.progress)  # moved on as each window is written
    counts = {m: SensorHealth() for m in Modality}
    resets, processing_s, redone, previous = 0, 0.0, 0, None
    _PIPELINES.setdefault(_params_key(params), pipeline)  # the first window runs here, on this pipeline
    try:
        for job in run_jobs(_replay_window, job_args, jobs=jobs, first_here=True):
            window = job.args[5]
            if not job.ok:
                raise FusionAttnError(f"window {window.index + 1} of {len(windows)} failed: {job.error}")
            result: WindowResult = job.value
            if previous is not None and result.start_key != previous.end_key:
                result = _replay_window(params, bags, opts, sync_cfg, taus, window, None, previous.end_state)
                redone += 1
            if result.rec.read_notes:  # reading worked around damage: one replay notes it once
                writer.close()
                _clear(out)
                return None, result.rec.read_notes[0]
            for tick, states in result.fusions:
                writer.add(dataclasses.replace(tick, health=_counted(tick.health, counts)), states, rec.configured)
            rec.extend(result.rec)
            resets += result.resets
            _add_counts(counts, result.health)
            processing_s += result.processing_s
            previous = result
            _advance(progress, (window.stop_ns - origin) // NS_PER_MS)
            if rec.fault:  # a replay of the whole stops there
                break
    finally:
        progress.close()
        writer.close()
    sync, _, _ = pickle.loads(previous.end_state)
    for m, h in counts.items():
        sync.health[m].received, sync.health[m].dropped, sync.health[m].resets = h.received, h.dropped, h.resets
        sync.health[m].drop_reasons, sync.health[m].last_drop = h.drop_reasons, h.last_drop
    sync.resets = resets
    if not rec.fault:
        rec.note_clocks(sync.cfg, opts)
    timing = {"wall_s": time.perf_counter() - wall_start, "processing_s": processing_s,
              "windows": {"jobs": jobs, "windows": len(windows), "redone": redone, "warm_up_s": round(warm_up_s, 3)}}
    return finish_replay(out, bags, rec, sync, writer, opts, taus, pipeline.backend_info(), pipeline.frame_id,
                         timing, {}), ""


def _replay_window(params: dict, bags, opts: ReplayOptions, sync_cfg: SyncConfig, taus: np.ndarray, window: Window,
                   phase_ns: int | None, resume: bytes | None) -> WindowResult:
    """In a job's process: one window, after its warm-up, or from `resume` (the end state of the window
    before, with no warm-up)."""
    from .bag import open_reader

    pipeline = _pipeline(params)
    with open_reader(bags) as reader:
        start_key = None
        if resume is None:
            sync, rec = SensorSync(sync_cfg), Recording()
            feed = RecordedFeed(reader, sync, opts, rec, phase_ns)
            if window.index > 0:
                try:
                    for _ in feed.read(window.warm_start_ns, window.start_ns):
                        pass  # the warm-up: the sync's state, nothing fused
                    start_key = _state_key(feed)
                except BagError:
                    pass  # no key: the window is redone from the state of the one before
        else:
            sync, clock, rec = pickle.loads(resume)
            feed = RecordedFeed(reader, sync, opts, rec, clock=clock)
        sync.clear_counts()
        rec.clear_counts()
        start = time.perf_counter()
        snaps = feed.read(window.start_ns, window.stop_ns)
        if window.last:
            snaps = chain(snaps, feed.clock.drain())  # not after a read fault: the error ends the chain
        fusions = [(dataclasses.replace(tick, snap=None), states)
                   for tick, states in fuse_snapshots(snaps, pipeline, sync, opts, taus, rec)]
        processing_s = time.perf_counter() - start
    return WindowResult(fusions, rec, sync.health, sync.resets, start_key, _state_key(feed),
                        pickle.dumps((sync, feed.clock, rec)), processing_s)


def _state_key(feed: RecordedFeed) -> str:
    """What decides everything a feed does from here: equal keys, equal fusions and counts."""
    newest = tuple(rate.newest_ns for rate in feed.rec.rates.values())
    return json.dumps([feed.sync.state_digest(), feed.clock.next_tick, feed.clock.phase_ns, newest])


_PIPELINES: dict[str, FusionPipeline] = {}


def _pipeline(params: dict) -> FusionPipeline:
    """The process's pipeline for `params`, built once (a process may take several windows)."""
    key = _params_key(params)
    if key not in _PIPELINES:
        _PIPELINES[key] = FusionPipeline.from_params(params)
    return _PIPELINES[key]


def _params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _warm_up_s(reader, rec: Recording, cfg: SyncConfig) -> float:
    """Recorded time before a window that brings its sync to the whole replay's state there: per sensor,
    its period's window (RATE_MEMORY + 1 frames at its mean rate over the recording), its max age, and
    for the IMUs and odometry the history a window reads; the longest of them and a quarter more for jitter.
    Too short costs time, not correctness: the window is then redone."""
    span_s = max(reader.end_time - reader.start_time, 1) / NS_PER_S
    counts = {c.topic: c.msgcount for c in reader.connections}
    history_s = {Modality.IMU: cfg.imu_window_s + cfg.future_tolerance_s,
                 Modality.ODOMETRY: cfg.odometry_window_s + cfg.future_tolerance_s,
                 Modality.IMU2: cfg.imu_window_s + cfg.future_tolerance_s}
    need = [max((RATE_MEMORY + 1) * span_s / max(counts.get(topic, 0), 1), cfg.max_age_s[m], history_s.get(m, 0.0))
            for m, topic in rec.topics.sensors.items()]
    return max(WARM_UP_MIN_S, 1.25 * max(need, default=0.0) + 0.2)


def _windows(start_ns: int, stop_ns: int, n: int, warm_up_s: float, first_bound: int | None) -> list[Window]:
    """n windows of equal recorded time over [start_ns, stop_ns); the first starts at `first_bound` (None:
    the recording's start, as a replay of the whole reads it), the last runs to the end."""
    cuts = [start_ns + (stop_ns - start_ns) * k // n for k in range(n + 1)]
    warm_ns = int(warm_up_s * NS_PER_S)
    return [Window(k, max(start_ns, cuts[k] - warm_ns) if k else None, cuts[k] if k else first_bound,
                   cuts[k + 1] if k < n - 1 else stop_ns, k == n - 1) for k in range(n)]


def _counted(health: dict[str, dict], before: dict[Modality, SensorHealth]) -> dict[str, dict]:
    """A window's sync summary (its own counts) with the counts of the windows `before` it added."""
    for name, h in health.items():
        b = before[Modality(MODALITIES.index(name))]
        h["received"] += b.received
        h["dropped"] += b.dropped
        h["resets"] += b.resets
        h["drop_reasons"] = _sum_reasons(b.drop_reasons, h["drop_reasons"])
        h["last_drop"] = h["last_drop"] if h["last_drop"] is not None else b.last_drop
    return health


def _add_counts(total: dict[Modality, SensorHealth], window: dict[Modality, SensorHealth]) -> None:
    for m, h in window.items():
        t = total[m]
        t.received, t.dropped, t.resets = t.received + h.received, t.dropped + h.dropped, t.resets + h.resets
        t.drop_reasons = _sum_reasons(t.drop_reasons, h.drop_reasons)
        t.last_drop = h.last_drop if h.last_drop is not None else t.last_drop


def _sum_reasons(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Drop counts per reason, in the order the reasons first came (as one sync counts them)."""
    total = dict(before)
    for reason, n in after.items():
        total[reason] = total.get(reason, 0) + n
    return total


def _clear(out: Path) -> None:
    """Empty the staging folder `out` for a replay of the whole."""
    import shutil

    for path in out.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
