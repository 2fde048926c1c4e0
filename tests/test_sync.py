"""Sensor sync: latest frames and ages, stale sensors masked, IMU windows, time jumps, bounded memory."""

import numpy as np

from fusion_attn.config import FusionConfig
from fusion_attn.frames import NS_PER_S, CameraFrame, ImuSample, LidarFrame, Modality
from fusion_attn.sync import SensorSync, SyncConfig

MS = 1_000_000


def _cam(t_ns):
    return CameraFrame(t_ns, "cam", np.zeros((4, 4, 3), np.uint8), "rgb8")


def _imu(t_ns, ax=0.0):
    return ImuSample(t_ns, "imu", np.array([ax, 0.0, 9.8]), np.zeros(3))


def test_snapshot_keeps_latest_frame_and_masks_stale_sensors():
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    sync.add(_cam(1000 * MS))
    sync.add(_cam(1100 * MS))
    sync.add(LidarFrame(900 * MS, "lidar", np.ones((1, 4), np.float32)))
    for i in range(50):
        sync.add(_imu(1000 * MS + i * 5 * MS))
    snap = sync.snapshot(1250 * MS)
    assert snap.camera.stamp_ns == 1100 * MS  # the latest, 150 ms old
    assert snap.lidar is None  # 350 ms > 300 ms
    assert snap.imu is not None and snap.imu.stamps_ns[-1] == 1245 * MS
    np.testing.assert_allclose(sync.ages_s(1250 * MS), [0.15, 0.35, 0.005], atol=1e-9)
    later = sync.snapshot(1400 * MS)
    assert later.camera is None and later.imu is None  # a silent sensor is masked, never waited for


def test_silent_sensor_is_masked_after_a_few_of_its_periods():
    sync = SensorSync(SyncConfig(max_age_s=(1.0, 1.0, 1.0), stale_after_periods=1.5, jitter_margin_s=0.025))
    for i in range(10):
        sync.add(_cam(i * 50 * MS))  # 20 Hz: half a period of jitter allows more than the margin
    assert abs(sync.max_age_s(Modality.CAMERA) - 0.075) < 1e-9
    assert sync.snapshot(450 * MS + 74 * MS).camera is not None
    assert sync.snapshot(450 * MS + 76 * MS).camera is None  # 1.5 periods silent, long before max_age 1 s
    for i in range(100):
        sync.add(_imu(i * 2500_000))  # 400 Hz: 1.5 periods = 3.75 ms, but jitter_margin_s after it was due
    assert abs(sync.late_after_s(Modality.IMU) - 0.0275) < 1e-9
    assert sync.max_age_s(Modality.IMU) == 0.05  # and masked not before stale_min_s
    last = 99 * 2500_000
    assert not sync.summary(last + 27 * MS)["imu"]["late"] and sync.summary(last + 28 * MS)["imu"]["late"]
    assert not sync.summary(last + 50 * MS)["imu"]["masked"] and sync.summary(last + 51 * MS)["imu"]["masked"]


def test_the_period_is_the_mean_of_the_first_intervals_not_the_first_one():
    """A jittery start (a 20 Hz camera whose first interval is 90 ms) does not set a wrong period for long."""
    sync = SensorSync()
    stamps = [0, 90, 110, 150, 200, 250, 300, 350, 400, 450, 500]
    for t in stamps:
        sync.add(_cam(t * MS))
    assert abs(sync.health[Modality.CAMERA].mean_dt_s - 0.05) < 1e-9
    assert abs(sync.health[Modality.CAMERA].rate_hz - 20.0) < 1e-6


def test_never_seen_sensor_is_masked_not_an_error():
    sync = SensorSync()
    sync.add(_cam(5 * MS))
    snap = sync.snapshot(10 * MS)
    assert snap.camera is not None and snap.lidar is None and snap.imu is None
    assert np.isnan(sync.ages_s(10 * MS)[Modality.LIDAR])


def test_imu_window_covers_only_the_configured_duration_up_to_fusion_time():
    sync = SensorSync(SyncConfig(imu_window_s=0.1))
    for i in range(220):  # 1.1 s at 200 Hz: the buffer also holds samples after the fusion time
        sync.add(_imu(i * 5 * MS, ax=i))
    snap = sync.snapshot(1000 * MS)
    w = snap.imu
    assert w.stamps_ns[-1] == 1000 * MS and w.stamps_ns[0] == 905 * MS  # (900 ms, 1000 ms]
    assert np.all(np.diff(w.stamps_ns) > 0)
    np.testing.assert_array_equal(w.accel[:, 0], np.arange(181, 201))


def test_out_of_order_is_dropped_and_counted_and_jump_back_resets():
    sync = SensorSync(SyncConfig(reset_on_jump_back_s=1.0))
    assert sync.add(_imu(2 * NS_PER_S)) is None
    assert sync.add(_imu(2 * NS_PER_S - 10 * MS)) == "out_of_order"  # 10 ms back: a reordered message
    assert sync.add(_imu(2 * NS_PER_S)) == "duplicate_stamp"  # the same stamp again
    assert sync.health[Modality.IMU].drop_reasons == {"out_of_order": 1, "duplicate_stamp": 1}
    sync.add(_cam(2 * NS_PER_S))
    assert sync.add(_imu(0)) is None  # 2 s back: the bag looped
    assert sync.resets == 1
    snap = sync.snapshot(0)
    assert snap.camera is None  # the camera frame from "the future" was forgotten
    assert len(snap.imu) == 1


def test_imu_history_memory_is_bounded():
    # ax is the sample's index here, not a physical value: the limit is lifted out of its way
    sync = SensorSync(SyncConfig(imu_capacity=64, imu_window_s=10.0, max_acceleration_mps2=1e4))
    for i in range(1000):
        sync.add(_imu(i * MS, ax=i))
    w = sync.snapshot(999 * MS).imu
    assert 32 <= len(w) <= 64 and w.accel[-1, 0] == 999
    assert sync._history[Modality.IMU].stamps.shape == (64,)


def test_empty_cloud_is_dropped_and_counted():
    sync = SensorSync()
    assert sync.add(LidarFrame(1, "lidar", np.zeros((0, 4), np.float32))) == "empty"
    assert sync.health[Modality.LIDAR].drop_reasons == {"empty": 1}
    assert sync.snapshot(1).lidar is None


def test_rate_averages_intervals_so_one_near_duplicate_stamp_does_not_mask_a_healthy_sensor():
    sync = SensorSync()
    for i in range(20):
        sync.add(_cam(i * 50 * MS))
    sync.add(_cam(19 * 50 * MS + 1000))  # 1 µs after the previous frame
    assert 15 < sync.health[Modality.CAMERA].rate_hz < 25
    for i in range(20, 25):
        sync.add(_cam(i * 50 * MS))
    assert sync.snapshot(24 * 50 * MS + 60 * MS).camera is not None  # 60 ms old at 20 Hz: still fresh


def test_data_stamped_far_in_the_future_is_not_fresh():
    sync = SensorSync(SyncConfig(future_tolerance_s=0.5))
    sync.add(_cam(10 * NS_PER_S))
    assert sync.snapshot(10 * NS_PER_S - 400 * MS).camera is not None  # a little ahead: clock skew
    assert sync.snapshot(10 * NS_PER_S - 600 * MS).camera is None  # far ahead: masked, not "fresh for ever"


def test_rate_and_summary():
    sync = SensorSync()
    for i in range(100):
        sync.add(_imu(i * 5 * MS))
    sync.drop(Modality.CAMERA, "malformed")
    s = sync.summary(500 * MS)
    assert abs(s["imu"]["rate_hz"] - 200.0) < 1e-6
    assert s["camera"]["dropped"] == 1 and s["camera"]["masked"]
    assert not s["imu"]["masked"]


def _lidar(t_ns, seed=0):
    rng = np.random.default_rng(seed)
    return LidarFrame(t_ns, "lidar", rng.uniform(-5, 5, (50, 4)).astype(np.float32))


def test_previous_frame_is_the_one_fused_before_when_consecutive():
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    first, second = _cam(1000 * MS), _cam(1100 * MS)
    sync.add(first)
    assert sync.snapshot(1050 * MS).camera_prev is None  # one frame: nothing to compare with
    sync.add(second)
    snap = sync.snapshot(1150 * MS)
    assert snap.camera is second and snap.camera_prev is first
    assert sync.snapshot(1160 * MS).camera_prev is first  # fused again while the newest: the same pair
    assert sync.snapshot(1350 * MS).camera is None and sync.snapshot(1350 * MS).camera_prev is None  # stale: neither
    sync.add(third := _cam(1350 * MS))
    snap = sync.snapshot(1360 * MS)
    assert snap.camera is third and snap.camera_prev is None  # a gap (250 ms > 200): no evidence of this one
    # lidar alike, with its own max age: 300 ms apart is still consecutive, 301 ms is not
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    sync.add(a := _lidar(1000 * MS))
    sync.snapshot(1010 * MS)
    sync.add(b := _lidar(1300 * MS, seed=1))
    snap = sync.snapshot(1310 * MS)
    assert snap.lidar is b and snap.lidar_prev is a
    sync.add(c := _lidar(1601 * MS, seed=2))
    snap = sync.snapshot(1610 * MS)
    assert snap.lidar is c and snap.lidar_prev is None


def test_the_previous_frame_spans_one_fusion_period_as_in_training():
    from fusion_attn.learn.data import previous_frames

    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    frames = iter(_cam(1000 * MS + k * 100 * MS // 3) for k in range(40))  # a 30 Hz camera
    frame, fused, previous = next(frames), [], []
    for tick in range(1, 12):  # fused at 10 Hz
        now = 1000 * MS + tick * 100 * MS
        while frame.stamp_ns <= now:
            sync.add(frame)
            frame = next(frames)
        snap = sync.snapshot(now)
        fused.append(snap.camera.stamp_ns)
        previous.append(snap.camera_prev.stamp_ns if snap.camera_prev else None)
    assert previous[1:] == fused[:-1]  # 100 ms before, not the camera's 33 ms: the frame fused before
    linked = previous_frames(np.array(fused) / NS_PER_S, np.ones(len(fused), np.bool_), 0.2)
    assert previous == [fused[j] if j >= 0 else None for j in linked]  # what the training data pairs


def test_dropped_frames_do_not_become_the_previous_frame():
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    sync.add(a := _cam(1000 * MS))
    sync.snapshot(1010 * MS)
    sync.add(b := _cam(1100 * MS))
    assert sync.add(_cam(1050 * MS)) == "out_of_order"
    assert sync.add(_cam(1100 * MS)) == "duplicate_stamp"
    snap = sync.snapshot(1120 * MS)
    assert snap.camera is b and snap.camera_prev is a


def test_reset_forgets_previous_frames():
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05), reset_on_jump_back_s=1.0))
    sync.add(_cam(2 * NS_PER_S))
    sync.add(_cam(2 * NS_PER_S + 100 * MS))
    sync.add(_lidar(2 * NS_PER_S))
    sync.add(_lidar(2 * NS_PER_S + 100 * MS))
    sync.add(_cam(50 * MS))  # 2 s back: a looped bag
    assert sync.resets == 1
    sync.add(after := _lidar(60 * MS))
    snap = sync.snapshot(70 * MS)
    assert snap.camera.stamp_ns == 50 * MS and snap.camera_prev is None
    assert snap.lidar is after and snap.lidar_prev is None


def test_a_frozen_camera_gives_identical_current_and_previous_tokens():
    from fusion_attn.tokenize import Tokenizer

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    points = rng.uniform(-5, 5, (300, 4)).astype(np.float32)
    sync, tok = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05))), Tokenizer(FusionConfig())
    for k in range(3):  # a stuck driver: the same buffer re-sent with fresh stamps, fused as it comes
        sync.add(CameraFrame(1000 * MS + k * 100 * MS, "cam", image.copy(), "rgb8"))
        sync.add(LidarFrame(1000 * MS + k * 100 * MS, "lidar", points.copy()))
        x = tok(sync.snapshot(1020 * MS + k * 100 * MS), np.ones(4, np.float32))
    assert x["camera_prev_mask"].all() and x["lidar_prev_mask"].any()
    np.testing.assert_array_equal(x["camera_patches"], x["camera_prev_patches"])
    np.testing.assert_array_equal(x["lidar_points"], x["lidar_prev_points"])
    np.testing.assert_array_equal(x["lidar_mask"], x["lidar_prev_mask"])
    np.testing.assert_allclose(x["camera_prev_age"] - x["camera_age"], 0.1, atol=1e-6)  # only the stamps move on
    # a live camera's previous frame differs
    sync.add(CameraFrame(1300 * MS, "cam", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "rgb8"))
    y = tok(sync.snapshot(1310 * MS), np.ones(4, np.float32))
    assert not np.array_equal(y["camera_patches"], y["camera_prev_patches"])
    np.testing.assert_array_equal(y["camera_prev_patches"], x["camera_patches"])


def _good_stream_with_strays(sync: SensorSync, start_s: float, seconds: float, stray_back_s: float = 10.0):
    """Camera 20 Hz, lidar 10 Hz, IMU 200 Hz on the receiver's clock, every 5th IMU sample followed by
    one stamped stray_back_s back; -> the snapshots at 20 Hz."""
    snaps = []
    for k in range(int(seconds * 200)):
        t = int(start_s * NS_PER_S) + k * 5 * MS
        if k % 10 == 0:
            sync.add(_cam(t), now_ns=t)
        if k % 20 == 0:
            sync.add(_lidar(t, seed=k), now_ns=t)
        sync.add(_imu(t), now_ns=t)
        if k % 5 == 0:
            sync.add(_imu(t - int(stray_back_s * NS_PER_S)), now_ns=t)
        if k % 10 == 9:
            snaps.append(sync.snapshot(t))
    return snaps


def test_stray_old_messages_are_dropped_without_resetting_anything():
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    snaps = _good_stream_with_strays(sync, 100.0, 3.0)
    assert sync.resets == 0 and all(h.resets == 0 for h in sync.health.values())
    assert sync.health[Modality.IMU].drop_reasons == {"out_of_order": 120}  # 3 s x 200 Hz / 5
    assert all(s.camera is not None and s.lidar is not None for s in snaps)
    assert min(len(s.imu) for s in snaps[5:]) == 50  # once filled, the IMU window stays whole: 0.25 s at 200 Hz


def test_time_going_back_with_the_clock_resets_each_sensor_alone_and_counts_once():
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    _good_stream_with_strays(sync, 100.0, 1.0)
    # a bag loop under sim time: the clock goes back with the data, the IMU's first frame arrives first
    assert sync.add(_imu(50 * NS_PER_S), now_ns=50 * NS_PER_S) is None
    assert sync.health[Modality.IMU].resets == 1 and sync.resets == 1
    assert sync.health[Modality.CAMERA].resets == 0 and sync._camera is not None  # not the IMU's business
    assert sync.add(_cam(50 * NS_PER_S + MS), now_ns=50 * NS_PER_S + MS) is None
    assert sync.health[Modality.CAMERA].resets == 1 and sync.resets == 1  # the same jump, counted once
    assert sync.summary(50 * NS_PER_S)["imu"]["resets"] == 1


def test_time_going_back_under_a_live_clock_resets_once_frames_stay_back():
    """An old recording looping, played on a live clock: every stamp is far behind the clock, so only
    jump_back_confirm frames in a row that stay back tell it from stray ones."""
    sync = SensorSync(SyncConfig(jump_back_confirm=3))
    now = 1000 * NS_PER_S
    for t in (20, 21, 22):
        assert sync.add(_cam(t * NS_PER_S), now_ns=now) is None
    assert sync.add(_cam(5 * NS_PER_S), now_ns=now) == "out_of_order"
    assert sync.add(_cam(23 * NS_PER_S), now_ns=now) is None  # a stray: the stream goes on
    assert sync.add(_cam(5 * NS_PER_S), now_ns=now) == "out_of_order"
    assert sync.add(_cam(5 * NS_PER_S + 50 * MS), now_ns=now) == "out_of_order"
    assert sync.add(_cam(5 * NS_PER_S + 100 * MS), now_ns=now) is None  # the third in a row: time went back
    assert sync.health[Modality.CAMERA].resets == 1 and sync.health[Modality.CAMERA].last_stamp_ns == 5_100 * MS


def test_without_a_clock_a_jump_back_resets_that_sensor_only():
    """Replay: the data's time is the only clock, a jump back is taken at once, by the sensor that made it."""
    sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.05)))
    sync.add(cam := _cam(2 * NS_PER_S))
    sync.add(_imu(2 * NS_PER_S))
    assert sync.add(_imu(2 * NS_PER_S - 1500 * MS)) is None
    assert sync.health[Modality.IMU].resets == 1 and sync.health[Modality.CAMERA].resets == 0
    assert sync.snapshot(2 * NS_PER_S + 10 * MS).camera is cam


def test_frames_stamped_ahead_of_the_receiver_clock_are_dropped_as_future():
    sync = SensorSync(SyncConfig(future_tolerance_s=0.5))
    now = 10 * NS_PER_S
    assert sync.add(_cam(now + 5676 * MS), now_ns=now) == "future"
    assert sync.add(_imu(now + 600 * MS), now_ns=now) == "future"
    assert sync.add(_imu(now + 400 * MS), now_ns=now) is None  # within the tolerance: clock skew
    camera = sync.health[Modality.CAMERA]
    assert camera.drop_reasons == {"future": 1} and camera.received == 0
    assert sync.health[Modality.IMU].drop_reasons == {"future": 1}
    assert np.isnan(sync.summary(now)["camera"]["age_s"])  # never took the future frame


def test_values_beyond_physical_limits_are_dropped_and_counted():
    params = {"limits.max_range_m": 100.0, "limits.max_acceleration_mps2": 50.0,
              "limits.max_angular_rate_rad_s": 5.0}
    cfg = SyncConfig.for_model(FusionConfig(), params)
    assert (cfg.max_range_m, cfg.max_acceleration_mps2, cfg.max_angular_rate_rad_s) == (100.0, 50.0, 5.0)
    sync = SensorSync(cfg)
    points = np.zeros((10, 4), np.float32)
    points[:, 0] = 99.0
    assert sync.add(LidarFrame(1, "lidar", points.copy())) is None
    points[3] = (60.0, 60.0, 60.0, 1.0)  # every coordinate within 100 m, the range (104 m) is not
    assert sync.add(LidarFrame(2, "lidar", points.copy())) == "out_of_limits"
    points[3] = (3e38, -3e38, 1.0, 1.0)  # finite float32, squares overflow: no warning, dropped
    with np.errstate(all="raise"):
        assert sync.add(LidarFrame(3, "lidar", points)) == "out_of_limits"
    assert sync.add(ImuSample(1, "imu", np.array([0.0, 0.0, 1e30]), np.zeros(3))) == "out_of_limits"
    assert sync.add(ImuSample(2, "imu", np.array([49.0, 0.0, 9.8]), np.array([0.0, -6.0, 0.0]))) == "out_of_limits"
    assert sync.add(ImuSample(3, "imu", np.array([-49.0, 0.0, 9.8]), np.array([0.0, -4.9, 0.0]))) is None
    assert sync.add(ImuSample(4, "imu", np.array([1.0, np.nan, 9.8]), np.zeros(3))) == "out_of_limits"
    bright = np.array([[1.0, 2.0, 0.0, 65535.0]], np.float32)  # a 16-bit intensity is no range
    assert sync.add(LidarFrame(4, "lidar", bright)) is None
    assert sync.health[Modality.LIDAR].drop_reasons == {"out_of_limits": 2}
    assert sync.health[Modality.IMU].drop_reasons == {"out_of_limits": 3}
    snap = sync.snapshot(4)
    assert snap.lidar.stamp_ns == 4 and snap.imu.stamps_ns.tolist() == [3]  # only the good ones were kept


def test_default_limits_pass_what_real_sensors_can_measure():
    sync = SensorSync()
    far = np.array([[600.0, 0.0, 0.0, 1.0]], np.float32)  # a long-range lidar's farthest return
    assert sync.add(LidarFrame(1, "lidar", far)) is None
    saturated = ImuSample(1, "imu", np.full(3, 40 * 9.80665), np.full(3, np.radians(4000)))  # +-40 g, +-4000 deg/s
    assert sync.add(saturated) is None
