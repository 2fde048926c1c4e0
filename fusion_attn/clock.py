"""The fusion clock: a time-ordered stream of frames in, the snapshots to fuse out, at a fixed rate.

Every front-end that fuses on its own data's time uses this one loop -- replay (recorded time), the
simulated training data and the simulator's fused observation (simulated time) -- so they tick,
drop and reset by the same rules as each other and as the live node's timer:

- a tick at T fuses what `SensorSync` holds once every frame stamped <= T has been added (data
  stamped exactly at a tick belongs to it);
- a frame the sync rejects (out of order, duplicate stamp, empty cloud) is counted there and named
  in `events`;
- time jumping back past the sync's reset threshold clears the sync and restarts the ticks from the
  new time; a gap of more than `MAX_GAP_S` skips the silent part instead of fusing nothing for it.

    clock = FusionClock(SensorSync(cfg), rate_hz=20.0)
    for frame in frames:                      # arrival order
        for snap in clock.add(frame):         # iterate to the end: the frame is taken after its ticks
            state = pipeline.fuse(snap)
    for snap in clock.drain():                # the timer's last ticks while a sensor is fresh
        ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from .errors import ConfigError
from .frames import MODALITIES, NS_PER_S, CameraFrame, ImuSample, LidarFrame, Modality, OdometrySample
from .sync import MODALITY_OF, SensorSync
from .tokenize import SensorSnapshot

MAX_GAP_S = 10.0  # a longer silence in the data is a gap in the recording, not a time to fuse through


class FusionClock:
    """Ticks every 1/rate_hz of data time. The first tick is at `start_ns` when given, else one period
    after the first frame (a live node's timer has no earlier data). trigger: fuse at the stamp of each
    frame of that sensor the sync takes (the node's `trigger` parameter), and on the timer only while
    that sensor is not fresh: a silent or failed trigger sensor does not stop the fusion of the others.
    events: the list the clock appends its notes to (default a new one). phase_ns: the stamp of the first
    frame of a recording this clock starts in the middle of, so that it ticks on the same instants as a
    clock that started there (one period after it, then every period)."""

    def __init__(self, sync: SensorSync, rate_hz: float, trigger: Modality | None = None,
                 start_ns: int | None = None, events: list[str] | None = None, phase_ns: int | None = None):
        if not (math.isfinite(rate_hz) and rate_hz > 0):
            raise ConfigError(f"fusion rate must be > 0 Hz, got {rate_hz}")
        self.sync, self.trigger = sync, trigger
        self.period_ns = round(NS_PER_S / rate_hz)
        self.next_tick = start_ns
        self.phase_ns = phase_ns
        self.events = [] if events is None else events  # what was dropped or reset, and why, in order

    def add(self, frame: CameraFrame | LidarFrame | ImuSample | OdometrySample, source: str = "",
            modality: Modality | None = None) -> Iterator[SensorSnapshot]:
        """Feed one frame of `modality` (None: its type's, as SensorSync.add): yields the snapshots due,
        timer ticks before its stamp, then (trigger) its own.

        A generator, so that whoever handles a tick sees the sync as it was at that tick (its health,
        its newest stamp); the frame is taken once the ticks before it are consumed: iterate to the end.
        """
        t = frame.stamp_ns
        source = source or type(frame).__name__
        if self.next_tick is not None:
            if t - self.next_tick > MAX_GAP_S * NS_PER_S:
                self.events.append(f"gap of {(t - self.next_tick) / NS_PER_S:.1f} s before {source}")
                self.next_tick = t - (t - self.next_tick) % self.period_ns
            yield from self._ticks_before(t)
        resets = self.sync.resets
        modality = MODALITY_OF[type(frame)] if modality is None else modality
        rejected = self.sync.add(frame, modality=modality)
        if rejected:
            self.events.append(f"{source}: dropped ({rejected}) at stamp {t}")
        elif self.sync.resets != resets:
            self.events.append(f"{source}: time jumped back: buffers reset")
            self.next_tick = None
        if self.trigger is not None and not rejected and modality is self.trigger:
            yield self.sync.snapshot(t)
        if self.next_tick is None:
            self.next_tick = t + self.period_ns if self.phase_ns is None else self._tick_after(t)
            self.phase_ns = None  # time going back later starts the ticks afresh, as for any clock

    def _tick_after(self, t: int) -> int:
        """The first tick at or after t (at least one period after phase_ns) of a clock started at phase_ns:
        its next tick once it has taken a frame stamped t."""
        return self.phase_ns + self.period_ns * max(1, -(-(t - self.phase_ns) // self.period_ns))

    def advance(self, now_ns: int) -> Iterator[SensorSnapshot]:
        """The ticks up to and including now_ns: time passed without a frame (a simulator's step end)."""
        if self.next_tick is not None:
            yield from self._ticks_before(now_ns + 1)

    def step(self, frames, now_ns: int) -> list[SensorSnapshot]:
        """A simulator step: its frames in arrival order, then the time to its end -> every snapshot fused.
        A simulator's FrameList names each frame's sensor (a second IMU's samples); other frames go by type."""
        modalities = getattr(frames, "modalities", (None,) * len(frames))
        return [snap for frame, m in zip(frames, modalities) for snap in self.add(frame, modality=m)] + list(
            self.advance(now_ns))

    def drain(self) -> Iterator[SensorSnapshot]:
        """After the last frame: the ticks a live timer would still make while some sensor is fresh
        (bounded by the largest max age, whatever the stamps say)."""
        newest = self.sync.newest_stamp_ns()
        if self.next_tick is None or newest is None:
            return
        end = newest + int(max(self.sync.cfg.max_age_s) * NS_PER_S)
        while self.next_tick <= end and any(self.sync.fresh(m, self.next_tick) for m in Modality):
            if self.timer_fuses(self.next_tick):
                yield self.sync.snapshot(self.next_tick)
            self.next_tick += self.period_ns

    def timer_fuses(self, now_ns: int) -> bool:
        """Whether a timer tick at now_ns fuses: always without a trigger, else while the trigger sensor
        is not fresh (never seen, silent, failed)."""
        return self.trigger is None or not self.sync.fresh(self.trigger, now_ns)

    def _ticks_before(self, t: int) -> Iterator[SensorSnapshot]:
        while t > self.next_tick:
            if self.timer_fuses(self.next_tick):
                yield self.sync.snapshot(self.next_tick)
            self.next_tick += self.period_ns


def trigger_modality(trigger: str) -> Modality | None:
    """The node's `trigger` parameter (timer | camera | lidar | imu) -> FusionClock's trigger (None: the timer)."""
    if trigger not in ("timer", *MODALITIES):
        raise ConfigError(f"trigger must be timer or one of {MODALITIES}, got {trigger!r}")
    return None if trigger == "timer" else Modality(MODALITIES.index(trigger))

