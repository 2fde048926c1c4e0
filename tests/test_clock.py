"""FusionClock: the one loop from time-ordered frames to fusion ticks (replay, simulated data, the sim's observation)."""

import numpy as np
import pytest

from fusion_attn.clock import FusionClock
from fusion_attn.errors import ConfigError
from fusion_attn.frames import NS_PER_S, CameraFrame, ImuSample, Modality
from fusion_attn.sync import SensorSync, SyncConfig

MS = 1_000_000


def imu(t_ms: float) -> ImuSample:
    return ImuSample(int(t_ms * MS), "imu", np.zeros(3), np.zeros(3))


def feed(clock: FusionClock, stamps_ms) -> list[tuple[int, int]]:
    """-> (tick stamp [ms], newest IMU stamp the tick saw [ms]) for every tick."""
    out = []
    for t in stamps_ms:
        out += [(s.stamp_ns // MS, int(s.imu.stamps_ns[-1]) // MS) for s in clock.add(imu(t))]
    return out


def test_ticks_follow_the_data_and_data_stamped_at_a_tick_belongs_to_it():
    clock = FusionClock(SensorSync(SyncConfig()), rate_hz=10.0)
    ticks = feed(clock, range(0, 401, 50))  # first tick one period after the first frame
    assert ticks == [(100, 100), (200, 200), (300, 300)]
    assert clock.next_tick == 400 * MS  # 400 ms is not due before data past it arrives ...
    assert [s.stamp_ns // MS for s in clock.advance(400 * MS)] == [400]  # ... or time passes it


def test_start_ns_and_advance_tick_without_new_frames():
    clock = FusionClock(SensorSync(SyncConfig(max_age_s=(1.0, 1.0, 1.0), stale_after_periods=0)), 20.0, start_ns=0)
    assert feed(clock, [0]) == []
    assert [s.stamp_ns // MS for s in clock.advance(120 * MS)] == [0, 50, 100]
    assert list(clock.advance(120 * MS)) == []  # nothing is ticked twice


def test_a_simulator_step_gives_its_frames_ticks_then_those_up_to_its_end():
    clock = FusionClock(SensorSync(SyncConfig(max_age_s=(1.0, 1.0, 1.0), stale_after_periods=0)), 20.0, start_ns=0)
    snaps = clock.step([imu(0), imu(60)], 120 * MS)  # the 60 ms frame passes ticks 0 and 50, the step's end 100
    assert [(s.stamp_ns // MS, s.imu.stamps_ns[-1] // MS) for s in snaps] == [(0, 0), (50, 0), (100, 60)]
    assert clock.step([], 120 * MS) == []


def test_rejected_frames_are_counted_and_named():
    sync = SensorSync(SyncConfig())
    clock = FusionClock(sync, 10.0)
    feed(clock, [0, 50, 40, 50])
    assert sync.health[Modality.IMU].drop_reasons == {"out_of_order": 1, "duplicate_stamp": 1}
    assert clock.events == ["ImuSample: dropped (out_of_order) at stamp 40000000",
                            "ImuSample: dropped (duplicate_stamp) at stamp 50000000"]


def test_time_jumping_back_restarts_the_ticks_and_a_gap_is_skipped():
    clock = FusionClock(SensorSync(SyncConfig()), 10.0)
    feed(clock, [5000, 5050, 5150])
    ticks = feed(clock, [0, 50, 150])  # a bag looping: buffers reset, ticks start again after 0
    assert ticks == [(100, 50)] and clock.events[-1] == "ImuSample: time jumped back: buffers reset"
    ticks = feed(clock, [60_000, 60_050])  # a minute of silence: no minute of fusions for it
    assert clock.events[-1] == "gap of 59.8 s before ImuSample" and ticks == [(60_000, 60_000)]


def test_trigger_fuses_at_each_frame_of_that_sensor():
    clock = FusionClock(SensorSync(SyncConfig()), 10.0, trigger=Modality.IMU)
    assert feed(clock, [0, 30, 30, 70]) == [(0, 0), (30, 30), (70, 70)]  # the duplicate is not fused
    assert list(clock.drain()) == []


def test_a_silent_trigger_sensor_hands_the_fusion_to_the_timer():
    clock = FusionClock(SensorSync(SyncConfig()), 10.0, trigger=Modality.CAMERA)

    def run(until_ms: int, camera_ms=()) -> list[int]:
        """IMU every 10 ms up to until_ms, camera frames at camera_ms: the stamps fused, in order."""
        frames = sorted([imu(t) for t in range(run.t, until_ms, 10)] + [camera(t) for t in camera_ms],
                        key=lambda f: f.stamp_ns)
        run.t = until_ms
        return [s.stamp_ns // MS for f in frames for s in clock.add(f)]
    run.t = 0

    assert run(350) == [100, 200, 300]  # no camera yet: the timer fuses the IMU
    assert run(705, range(400, 701, 100)) == [400, 500, 600, 700]  # each frame, no tick between
    # the camera stops: masked once late (1.5 periods), and the timer takes over from there
    assert run(1305) == [900, 1000, 1100, 1200]


def camera(t_ms: float) -> CameraFrame:
    return CameraFrame(int(t_ms * MS), "cam", np.zeros((4, 4, 3), np.uint8), "rgb8")


def test_drain_ticks_while_a_sensor_is_fresh():
    clock = FusionClock(SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.2), stale_after_periods=0)), 20.0)
    feed(clock, [0, 60])
    assert [s.stamp_ns // MS for s in clock.drain()] == [100, 150, 200, 250]  # until the IMU is 0.2 s old


def test_rate_must_be_positive():
    with pytest.raises(ConfigError, match="fusion rate"):
        FusionClock(SensorSync(), 0.0)
    assert NS_PER_S // FusionClock(SensorSync(), 20.0).period_ns == 20
