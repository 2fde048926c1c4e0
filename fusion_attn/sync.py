"""Sensor sync: the latest frame per sensor with its age, IMU and odometry histories, and per-sensor health.

Frames are routed to a sensor by their type (MODALITY_OF), except where the front-end names the sensor:
a second IMU's ImuSamples come from a topic of their own (Modality.IMU2).

It never waits for all sensors: `snapshot(t)` hands over whatever is fresh at fusion time t and
masks (leaves out) a sensor whose newest data is older than its max age. Frames are fed in arrival
order; a sensor whose time goes back by more than `reset_on_jump_back_s` (a bag looping, a clock
reset) has its buffers cleared (see `SensorSync.add`), and other out-of-order stamps, stamps from the
future and values beyond physical limits are dropped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .config import FusionConfig
from .frames import (
    MODALITIES,
    NS_PER_S,
    CameraFrame,
    ImuSample,
    ImuWindow,
    LidarFrame,
    Modality,
    OdometrySample,
    OdometryWindow,
    kind_of,
)
from .params import PARAM_DEFAULTS, param
from .tokenize import SensorSnapshot

RATE_MEMORY = 10  # stamp intervals a sensor's measured period averages over (see SensorHealth.mean_dt_s)


@dataclass(frozen=True)
class SyncConfig:
    # the sensors the model reads (FusionConfig.sensors): another sensor's frames are not this fusion's data,
    # and are ignored (a simulator's odometry beside a model without it), not counted as dropped
    sensors: tuple[Modality, ...] = (Modality.CAMERA, Modality.LIDAR, Modality.IMU)
    max_age_s: tuple[float, ...] = tuple(PARAM_DEFAULTS[f"max_age_s.{m}"] for m in MODALITIES)
    # A sensor's next message is due one of its (measured) periods after the last. It is late once overdue
    # by more than its normal jitter: its publish jitter (stale_after_periods - 1 periods) or, where that is
    # shorter (a fast sensor), its delivery jitter (DDS, a busy executor: jitter_margin_s). Late, it is also
    # masked, but never sooner than stale_min_s: a fast IMU rides out a hiccup (reported late meanwhile).
    stale_after_periods: float = PARAM_DEFAULTS["stale_after_periods"]
    jitter_margin_s: float = PARAM_DEFAULTS["jitter_margin_s"]
    stale_min_s: float = 0.05
    imu_window_s: float = 0.25  # IMU history handed to the tokenizer: the model's imu.window_s
    imu_capacity: int = 4096  # samples kept (20 s at 200 Hz): bounds memory whatever the rate
    odometry_window_s: float = 0.5  # odometry history handed to the tokenizer: the model's odometry.window_s
    reset_on_jump_back_s: float = 1.0
    jump_back_confirm: int = 3  # frames in a row that stay back before a sensor is reset anyway (see `add`)
    # data stamped further ahead of the receiver's clock is dropped, ahead of the fusion time masked
    future_tolerance_s: float = PARAM_DEFAULTS["future_tolerance_s"]
    max_range_m: float = PARAM_DEFAULTS["limits.max_range_m"]
    max_acceleration_mps2: float = PARAM_DEFAULTS["limits.max_acceleration_mps2"]
    max_angular_rate_rad_s: float = PARAM_DEFAULTS["limits.max_angular_rate_rad_s"]
    max_speed_mps: float = PARAM_DEFAULTS["limits.max_speed_mps"]

    def __post_init__(self):
        # per Modality; one set before a sensor existed (camera, lidar, imu) takes the defaults for the rest
        defaults = SyncConfig.__dataclass_fields__["max_age_s"].default
        object.__setattr__(self, "max_age_s", tuple(self.max_age_s) + defaults[len(self.max_age_s):])

    @classmethod
    def for_model(cls, cfg: FusionConfig, params: dict | None = None) -> SyncConfig:
        """The sync a model reads from: its IMU and odometry windows; the rest from the node's parameters
        (config/fusion.yaml names; None: their defaults). The one mapping node, CLI, replay and training share."""
        windows = {"sensors": cfg.sensors, "imu_window_s": cfg.imu.window_s, "odometry_window_s": cfg.odometry.window_s}
        if params is None:
            return cls(**windows)
        return cls(max_age_s=tuple(float(param(params, f"max_age_s.{m}")) for m in MODALITIES),
                   stale_after_periods=float(param(params, "stale_after_periods")),
                   jitter_margin_s=float(param(params, "jitter_margin_s")), **windows,
                   future_tolerance_s=float(param(params, "future_tolerance_s")),
                   max_range_m=float(param(params, "limits.max_range_m")),
                   max_acceleration_mps2=float(param(params, "limits.max_acceleration_mps2")),
                   max_angular_rate_rad_s=float(param(params, "limits.max_angular_rate_rad_s")),
                   max_speed_mps=float(param(params, "limits.max_speed_mps")))


@dataclass
class SensorHealth:
    received: int = 0
    dropped: int = 0  # malformed, NaN, out of order: counted by whoever dropped it
    resets: int = 0  # times its buffers were cleared because its time went back
    last_stamp_ns: int | None = None
    # the stamps of the newest RATE_MEMORY intervals since the start or reset: the period is their mean
    # (a jittery first interval is soon averaged out; averaging dt, not 1/dt, one near-duplicate stamp
    # cannot blow it up). A window, not an exponential average, so that it depends on recent stamps only:
    # a replay of a later part of a recording (replay_windows) measures the same period as one of the whole
    recent_stamps: deque[int] = field(default_factory=lambda: deque(maxlen=RATE_MEMORY + 1))
    drop_reasons: dict[str, int] = field(default_factory=dict)
    last_drop: str | None = None  # the reason for the newest drop, with what was wrong where known

    @property
    def mean_dt_s(self) -> float:
        s = self.recent_stamps
        return (s[-1] - s[0]) / (len(s) - 1) / NS_PER_S if len(s) > 1 else 0.0

    @property
    def rate_hz(self) -> float:
        return 1.0 / self.mean_dt_s if self.mean_dt_s > 0 else 0.0

    def age_s(self, now_ns: int) -> float:
        return float("nan") if self.last_stamp_ns is None else (now_ns - self.last_stamp_ns) / NS_PER_S


class _History:
    """A stream of three-axis pairs (IMU accel and gyro, odometry velocity and turn rate) in preallocated
    arrays, samples lo..n. It keeps what a window can still ask for: the samples within keep_ns of the
    newest (older ones are forgotten as new ones come), at most `capacity` (then the newest half).
    Appends are O(1) amortised: the kept samples move to the front when the buffer is full."""

    def __init__(self, capacity: int, keep_ns: int):
        self.stamps = np.zeros(capacity, np.int64)
        self.first = np.zeros((capacity, 3))
        self.second = np.zeros((capacity, 3))
        self.orient = np.full((capacity, 4), np.nan)  # the IMU's, where known
        self.lo = self.n = 0
        self.keep_ns = keep_ns
        self.frame_id = ""

    def append(self, stamp_ns: int, frame_id: str, first, second, orientation=None) -> None:
        while self.lo < self.n and self.stamps[self.lo] < stamp_ns - self.keep_ns:
            self.lo += 1
        if self.n == len(self.stamps):
            start = max(self.lo, self.n - len(self.stamps) // 2)
            for a in (self.stamps, self.first, self.second, self.orient):
                a[:self.n - start] = a[start:self.n]
            self.lo, self.n = 0, self.n - start
        i = self.n
        self.stamps[i], self.first[i], self.second[i] = stamp_ns, first, second
        self.orient[i] = np.nan if orientation is None else orientation
        self.n += 1
        self.frame_id = frame_id

    def window(self, start_ns: int, end_ns: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """-> frame id, stamps, first, second and orientation (None unless every sample knew it) in (start, end]."""
        lo, hi = self.lo + np.searchsorted(self.stamps[self.lo:self.n], [start_ns, end_ns], side="right")
        orient = self.orient[lo:hi].copy()
        return (self.frame_id, self.stamps[lo:hi].copy(), self.first[lo:hi].copy(), self.second[lo:hi].copy(),
                None if np.isnan(orient).any() or hi == lo else orient)

    def clear(self) -> None:
        self.lo = self.n = 0

    def digest(self, h) -> None:
        """Add the kept samples to the hash `h` (SensorSync.state_digest)."""
        h.update(self.frame_id.encode())
        for a in (self.stamps, self.first, self.second, self.orient):
            h.update(a[self.lo:self.n].tobytes())


class SensorSync:
    def __init__(self, cfg: SyncConfig | None = None):
        self.cfg = cfg or SyncConfig()
        self.health = {m: SensorHealth() for m in Modality}
        self.resets = 0  # times time went back: a bag loop resets every sensor, and counts once (see `_reset`)
        self._camera: CameraFrame | None = None
        self._lidar: LidarFrame | None = None
        # per sensor, the newest frame a snapshot handed out and the one handed out before it: what changed
        # since the frame fused before is the model's evidence of motion and of a frozen sensor
        self._fused: dict[Modality, tuple] = {Modality.CAMERA: (None, None), Modality.LIDAR: (None, None)}
        # A window is asked for only while its sensor is fresh, so up to future_tolerance_s before the
        # sensor's newest sample and window_s back from there: older samples are never read again.
        keep_s = {Modality.IMU: self.cfg.imu_window_s, Modality.ODOMETRY: self.cfg.odometry_window_s,
                  Modality.IMU2: self.cfg.imu_window_s}
        tolerance_ns = int(self.cfg.future_tolerance_s * NS_PER_S)
        self._history = {m: _History(self.cfg.imu_capacity, int(w * NS_PER_S) + tolerance_ns + 1)
                         for m, w in keep_s.items()}
        self._behind = dict.fromkeys(Modality, 0)  # frames in a row stamped far behind the sensor's newest

    def add(self, frame: CameraFrame | LidarFrame | ImuSample | OdometrySample, now_ns: int | None = None,
            modality: Modality | None = None) -> str | None:
        """Take a frame of `modality` (None: its type's, MODALITY_OF); -> None when taken (or ignored: a sensor
        the model does not read), else why it was dropped (which is counted).

        now_ns: the receiver's clock at arrival (the live node's; replay has none, its data's time is its
        clock). A frame stamped more than future_tolerance_s after it is dropped as "future", one with a
        value beyond the physical limits (a lidar point's range, an IMU axis) as "out_of_limits".

        A stamp more than reset_on_jump_back_s behind the sensor's newest is time going back (a bag
        looping, a clock reset) or one stray old message among good ones, which must cost nothing. So it
        resets that sensor (only: each keeps its own time) and is taken when the receiver's clock went back
        with it (recent by now_ns, or no now_ns), or once jump_back_confirm frames in a row stayed back (an
        old recording looping under a live clock); until then it is dropped as out_of_order.
        """
        if modality is None:
            modality = MODALITY_OF[type(frame)]
        elif kind_of(modality) is not MODALITY_OF[type(frame)]:  # a front-end's mistake, not the data's
            raise TypeError(f"a {type(frame).__name__} is no {MODALITIES[modality]} frame")
        if modality not in self.cfg.sensors:
            return None
        h = self.health[modality]
        if modality is Modality.LIDAR and len(frame) == 0:
            return self.drop(modality, "empty")  # no point survived: the lidar gives no data this sweep
        if now_ns is not None and frame.stamp_ns - now_ns > self.cfg.future_tolerance_s * NS_PER_S:
            return self.drop(modality, "future")
        if not self._within_limits(frame):
            return self.drop(modality, "out_of_limits")
        jump_ns = self.cfg.reset_on_jump_back_s * NS_PER_S
        behind = h.last_stamp_ns is not None and h.last_stamp_ns - frame.stamp_ns > jump_ns
        self._behind[modality] = self._behind[modality] + 1 if behind else 0
        if behind:
            stray = now_ns is not None and now_ns - frame.stamp_ns > jump_ns
            if stray and self._behind[modality] < self.cfg.jump_back_confirm:
                return self.drop(modality, "out_of_order")
            self._reset(modality, frame.stamp_ns)
        elif h.last_stamp_ns is not None and frame.stamp_ns <= h.last_stamp_ns:
            return self.drop(modality, "duplicate_stamp" if frame.stamp_ns == h.last_stamp_ns else "out_of_order")
        h.recent_stamps.append(frame.stamp_ns)
        h.received += 1
        h.last_stamp_ns = frame.stamp_ns
        if modality is Modality.CAMERA:
            self._camera = frame
        elif modality is Modality.LIDAR:
            self._lidar = frame
        elif isinstance(frame, ImuSample):
            self._history[modality].append(frame.stamp_ns, frame.frame_id, frame.accel, frame.gyro, frame.orientation)
        else:
            self._history[modality].append(frame.stamp_ns, frame.frame_id, frame.linear, frame.angular)
        return None

    def drop(self, modality: Modality, reason: str, detail: str | None = None) -> str:
        """Count a message dropped for `reason` (the adapters' malformed ones too, `detail` saying what was
        wrong); -> reason."""
        h = self.health[modality]
        h.dropped += 1
        h.drop_reasons[reason] = h.drop_reasons.get(reason, 0) + 1
        h.last_drop = f"{reason}: {detail}" if detail else reason
        return reason

    def _within_limits(self, frame: CameraFrame | LidarFrame | ImuSample | OdometrySample) -> bool:
        """No value beyond the physical limits: such a message is corrupt, whatever else it holds."""
        c = self.cfg
        if isinstance(frame, LidarFrame):
            # Every value of the cloud (intensity too) within max_range / sqrt(3) puts every point within
            # max_range: one pass over contiguous memory, ten times cheaper than the ranges themselves.
            pts = frame.points
            if max(pts.max(), -pts.min()) <= c.max_range_m / np.sqrt(3):  # False for NaN: checked below
                return True
            xyz = pts[:, :3]
            with np.errstate(over="ignore"):  # an absurd coordinate's square overflows to inf: beyond, rightly
                return bool(np.einsum("ij,ij->i", xyz, xyz).max() <= c.max_range_m**2)
        if isinstance(frame, ImuSample):  # 3 values each, hundreds of times a second: plain floats are quicker
            return (all(abs(v) <= c.max_acceleration_mps2 for v in frame.accel.tolist())  # False for NaN
                    and all(abs(v) <= c.max_angular_rate_rad_s for v in frame.gyro.tolist()))
        if isinstance(frame, OdometrySample):
            return (all(abs(v) <= c.max_speed_mps for v in frame.linear.tolist())
                    and all(abs(v) <= c.max_angular_rate_rad_s for v in frame.angular.tolist()))
        return True

    def _reset(self, modality: Modality, stamp_ns: int) -> None:
        """Forget a sensor's buffered data (its time went back to stamp_ns); its counters survive, its rate
        restarts. A bag loop resets each sensor at its first frame from the new time; `resets` counts it once,
        at the first of them: the one no other sensor is near in time yet."""
        if modality is Modality.CAMERA:
            self._camera = None
        elif modality is Modality.LIDAR:
            self._lidar = None
        else:
            self._history[modality].clear()
        if modality in self._fused:
            self._fused[modality] = (None, None)
        h = self.health[modality]
        h.last_stamp_ns = None
        h.recent_stamps.clear()
        h.resets += 1
        near_ns = self.cfg.reset_on_jump_back_s * NS_PER_S
        if not any(o.last_stamp_ns is not None and abs(o.last_stamp_ns - stamp_ns) <= near_ns
                   for o in self.health.values()):
            self.resets += 1

    def newest_stamp_ns(self) -> int | None:
        stamps = [h.last_stamp_ns for h in self.health.values() if h.last_stamp_ns is not None]
        return max(stamps) if stamps else None

    def late_after_s(self, modality: Modality) -> float:
        """The age a healthy sensor's newest data stays within: stale_after_periods of its periods, or one
        period plus jitter_margin_s where that is longer; inf before its rate is known or with
        stale_after_periods 0."""
        dt = self.health[modality].mean_dt_s
        if dt > 0 and self.cfg.stale_after_periods > 0:
            return max(self.cfg.stale_after_periods * dt, dt + self.cfg.jitter_margin_s)
        return float("inf")

    def max_age_s(self, modality: Modality) -> float:
        """The age beyond which a sensor is masked: max_age_s, or sooner once late (never before stale_min_s)."""
        return min(self.cfg.max_age_s[modality], max(self.late_after_s(modality), self.cfg.stale_min_s))

    def fresh(self, modality: Modality, now_ns: int) -> bool:
        """Recent enough to fuse: not older than max_age_s, not stamped implausibly far in the future."""
        age = self.health[modality].age_s(now_ns)
        return bool(-self.cfg.future_tolerance_s <= age <= self.max_age_s(modality))  # False for nan (never seen)

    def snapshot(self, now_ns: int) -> SensorSnapshot:
        """The data to fuse at now_ns; a stale or never-seen sensor is None (masked). Each call is one
        fusion: a camera or lidar frame comes with the one fused before it (the newest an earlier snapshot
        handed out), when the two are at most the sensor's max age apart (consecutive). So the change the
        model sees spans one fusion period at any sensor rate, as in training (learn.data.previous_frames),
        and that frame's tokens are already cached."""
        camera = self._camera if self.fresh(Modality.CAMERA, now_ns) else None
        lidar = self._lidar if self.fresh(Modality.LIDAR, now_ns) else None
        imu = self._window(Modality.IMU, now_ns, self.cfg.imu_window_s)
        odometry = self._window(Modality.ODOMETRY, now_ns, self.cfg.odometry_window_s)
        imu2 = self._window(Modality.IMU2, now_ns, self.cfg.imu_window_s)
        return SensorSnapshot(now_ns, camera, lidar, imu and ImuWindow(*imu),
                              self._fused_before(Modality.CAMERA, camera), self._fused_before(Modality.LIDAR, lidar),
                              odometry and OdometryWindow(*odometry[:4]), imu2 and ImuWindow(*imu2))

    def _window(self, modality: Modality, now_ns: int, window_s: float):
        """An IMU's or the odometry's last window_s seconds up to now_ns (`_History.window`), None if not fresh."""
        if not self.fresh(modality, now_ns):
            return None
        end = min(now_ns, self.health[modality].last_stamp_ns)
        return self._history[modality].window(end - int(window_s * NS_PER_S), end)

    def _fused_before(self, modality: Modality, frame):
        """The frame fused before `frame` (now handed out), if consecutive; else None."""
        if frame is None:
            return None
        newest, before = self._fused[modality]
        if frame is not newest:
            newest, before = self._fused[modality] = (frame, newest)
        if before is None or frame.stamp_ns - before.stamp_ns > self.cfg.max_age_s[modality] * NS_PER_S:
            return None
        return before

    def ages_s(self, now_ns: int) -> np.ndarray:
        """(S,) per sensor read (cfg.sensors): its newest data's age at now_ns (nan: never seen)."""
        return np.array([self.health[m].age_s(now_ns) for m in self.cfg.sensors], np.float32)

    def state_digest(self) -> str:
        """A digest of everything that decides what the sync does with the frames still to come: the
        newest stamps, the periods' windows, the frames held and the histories' kept samples (not the
        counters, which only count). Two syncs with the same digest take, drop and hand out the same
        from here on: replay_windows checks with it that a window's warm-up reached the state a replay of
        the whole recording has at the window's start."""
        h = hashlib.blake2b(digest_size=16)
        for m in Modality:
            health = self.health[m]
            h.update(repr((health.last_stamp_ns, tuple(health.recent_stamps), self._behind[m])).encode())
        for frame in (self._camera, self._lidar, *self._fused[Modality.CAMERA], *self._fused[Modality.LIDAR]):
            _digest_frame(h, frame)
        for history in self._history.values():
            history.digest(h)
        return h.hexdigest()

    def clear_counts(self) -> None:
        """Start the counts (received, dropped, resets, drop reasons) from zero; the state is kept."""
        self.resets = 0
        for h in self.health.values():
            h.received = h.dropped = h.resets = 0
            h.drop_reasons, h.last_drop = {}, None

    def summary(self, now_ns: int) -> dict[str, dict]:
        """Per-sensor health as plain data (diagnostics, reports)."""
        return {name: {"received": h.received, "dropped": h.dropped, "resets": h.resets,
                       "rate_hz": round(h.rate_hz, 3), "age_s": h.age_s(now_ns), "masked": not self.fresh(m, now_ns),
                       "late": h.age_s(now_ns) > self.late_after_s(m),
                       "drop_reasons": dict(h.drop_reasons), "last_drop": h.last_drop}
                for name, m, h in ((MODALITIES[m], m, self.health[m]) for m in self.cfg.sensors)}


def _digest_frame(h, frame) -> None:
    if frame is None:
        h.update(b"none")
        return
    for f in dataclasses.fields(frame):
        value = getattr(frame, f.name)
        h.update(value.tobytes() + repr((value.dtype, value.shape)).encode() if isinstance(value, np.ndarray)
                 else repr(value).encode())


MODALITY_OF = {CameraFrame: Modality.CAMERA, LidarFrame: Modality.LIDAR, ImuSample: Modality.IMU,
                OdometrySample: Modality.ODOMETRY}
