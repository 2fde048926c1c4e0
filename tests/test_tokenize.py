"""Tokenizers: static shapes whatever the input, masks, ages, and the numbers inside the tokens."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_attn.config import CameraTokens, FusionConfig, ImuTokens, LidarTokens
from fusion_attn.frames import NS_PER_S, CameraFrame, ImuWindow, LidarFrame
from fusion_attn.tokenize import (
    IMU_AXES,
    IMU_COUNT,
    IMU_DT,
    LIDAR_FEATURES,
    LIDAR_INDEX,
    SensorSnapshot,
    Tokenizer,
    imu_samples,
    input_spec,
    tokenize_camera,
    tokenize_imu,
    tokenize_lidar,
)

CFG = FusionConfig()


def _cloud(n, seed=0, max_range=100.0):
    rng = np.random.default_rng(seed)
    r, a = rng.uniform(1, max_range, n), rng.uniform(-np.pi, np.pi, n)
    return np.stack([r * np.cos(a), r * np.sin(a), rng.uniform(-2, 3, n), rng.uniform(0, 255, n)], 1).astype(np.float32)


@pytest.mark.parametrize("n", [0, 1, 5, 1000, 130_000])
def test_lidar_shapes_are_static_for_any_point_count(n):
    points, mask = tokenize_lidar(LidarFrame(0, "l", _cloud(n)), CFG.lidar)
    assert points.shape == (64, 16, 9) and points.dtype == np.float32
    assert mask.shape == (64, 16) and mask.dtype == np.bool_
    assert np.isfinite(points).all()
    assert np.all(points[~mask] == 0)  # padding is zero, and masked


def test_lidar_few_points_mask_the_unused_budget():
    pts = np.array([[1.0, 1.0, 0.0, 10.0], [1.1, 1.05, 0.1, 20.0], [20.0, -5.0, 0.5, 5.0]], np.float32)
    points, mask = tokenize_lidar(LidarFrame(0, "l", pts), CFG.lidar)
    assert mask.any(axis=1).sum() == 2  # two occupied pillars, the other 62 tokens masked
    assert mask.sum() == 3
    # the features keep the geometry: x/R and y/R of the valid points
    xy = points[mask][:, [LIDAR_INDEX["x"], LIDAR_INDEX["y"]]] * CFG.lidar.range_m
    assert sorted(map(tuple, np.round(xy, 4))) == sorted(map(tuple, np.round(pts[:, :2], 4)))


def test_lidar_is_range_limited():
    far = np.array([[80.0, 0.0, 0.0, 1.0], [0.0, -60.0, 0.0, 1.0], [3.0, 3.0, 9.0, 1.0]], np.float32)  # out of grid / too high
    points, mask = tokenize_lidar(LidarFrame(0, "l", far), CFG.lidar)
    assert not mask.any() and not points.any()


def test_lidar_non_finite_and_huge_coordinates_are_dropped_by_a_float_test():
    """A NaN x beside finite y and z is no point of cell 0 (a NaN cast to int32 is 0 on ARM: the range is
    tested on the floats), nor is an infinite or a 1e9 coordinate, and none of them warns."""
    cfg = CFG.lidar
    bad = np.array([[np.nan, 1, 0, 5], [1, np.nan, 0, 5], [np.inf, 1, 0, 5], [1, -np.inf, 0, 5], [1e9, 1, 0, 5],
                    [-1e9, 1, 0, 5], [-cfg.range_m, 1, 0, 5]], np.float32)  # the last: on the edge, kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        points, mask = tokenize_lidar(LidarFrame(0, "l", bad), cfg)
    assert mask.sum() == 1 and points[mask][0, LIDAR_INDEX["x"]] == pytest.approx(-1.0)


def test_lidar_budget_takes_the_most_populated_pillars_deterministically():
    cfg = LidarTokens(pillars=2, points_per_pillar=4)
    dense = np.tile([[5.0, 5.0, 0.0, 1.0]], (10, 1))
    medium = np.tile([[-5.0, 5.0, 0.0, 1.0]], (6, 1))
    sparse = np.tile([[5.0, -5.0, 0.0, 1.0]], (2, 1))
    pts = np.concatenate([sparse, dense, medium]).astype(np.float32)
    a = tokenize_lidar(LidarFrame(0, "l", pts), cfg)
    b = tokenize_lidar(LidarFrame(0, "l", pts.copy()), cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    chosen_y = np.sign(a[0][:, 0, LIDAR_INDEX["y"]])
    assert sorted(chosen_y.tolist()) == [1.0, 1.0]  # both y=+5 pillars, not the sparse y=-5 one
    assert a[1].all()


def test_lidar_features_of_a_hand_built_cloud():
    # 1 m cells over +-10 m; two points in the cell centred at (3.5, 4.5), one in the cell at (-5.5, -7.5)
    cfg = LidarTokens(range_m=10.0, grid=20, z_max_m=5.0, pillars=4, points_per_pillar=4)
    pts = np.array([[3.0, 4.0, 1.0, 255.0], [3.6, 4.8, 2.0, 0.0], [-6.0, -8.0, 0.0, 15.0]], np.float32)
    points, mask = tokenize_lidar(LidarFrame(0, "l", pts), cfg)
    lone = {"x": -0.6, "y": -0.8, "z": 0.0, "log_intensity": 0.5, "range": 1.0,  # log 16 / log 256; 10 m of 10
            "dx": -0.5, "dy": -0.5, "dz": 0.0, "log_count": 0.5}  # one point of three: log 2 / log 4
    pair = {"log_count": math.log(3) / math.log(4)}
    first = {"x": 0.3, "y": 0.4, "z": 0.2, "log_intensity": 1.0, "range": 0.5,  # a 3-4-5 triangle
             "dx": -0.5, "dy": -0.5, "dz": -0.5, **pair}  # half a metre under the pair's mean height
    second = {"x": 0.36, "y": 0.48, "z": 0.4, "log_intensity": 0.0, "range": 0.6,
              "dx": 0.1, "dy": 0.3, "dz": 0.5, **pair}
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False]] + [[False] * 4] * 2
    for token, point, expected in ((0, 0, lone), (1, 0, first), (1, 1, second)):  # tokens in cell order
        np.testing.assert_allclose(points[token, point], [expected[name] for name in LIDAR_FEATURES], atol=1e-6)
    assert len(LIDAR_FEATURES) == cfg.features


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 2**31))
def test_lidar_property_valid_points_come_from_the_cloud(n, seed):
    pts = _cloud(n, seed, max_range=70)
    points, mask = tokenize_lidar(LidarFrame(0, "l", pts), CFG.lidar)
    assert np.isfinite(points).all()
    if n == 0:
        assert not mask.any()
    elif mask.any():  # (a cloud of a few points may lie wholly out of range: then no token, as above)
        xs = points[mask][:, LIDAR_INDEX["x"]] * CFG.lidar.range_m
        ref = np.sort(pts[:, 0])
        nearest = np.minimum(np.searchsorted(ref, xs), len(ref) - 1)
        gap = np.minimum(np.abs(ref[nearest] - xs), np.abs(ref[np.maximum(nearest - 1, 0)] - xs))
        assert gap.max() < 1e-4


def test_camera_patches_layout_and_normalisation():
    cfg = CameraTokens(height=32, width=48, patch=16)
    img = np.zeros((64, 96, 3), np.uint8)
    img[:32, 64:] = 255  # top-right sixth white -> patch (row 0, col 2) after resizing to 32x48
    patches, mask = tokenize_camera(CameraFrame(0, "c", img, "rgb8"), cfg)
    assert patches.shape == (6, 16 * 16 * 3) and mask.all()
    # white and black in ImageNet normalisation (the values torchvision's Normalize gives them)
    white, black = [2.2489, 2.4286, 2.6400], [-2.1179, -2.0357, -1.8044]
    per_patch = patches.reshape(6, 16 * 16, 3).mean(1)
    np.testing.assert_allclose(per_patch[2], white, atol=1e-4)  # row-major patch order
    np.testing.assert_allclose(per_patch[[0, 1, 3, 4, 5]], [black] * 5, atol=1e-4)


@pytest.mark.parametrize("encoding,dtype,channels", [("rgb8", np.uint8, 3), ("mono8", np.uint8, 1), ("mono16", np.uint16, 1),
                                                     ("16UC1", np.uint16, 1), ("32FC1", np.float32, 1)])
def test_camera_every_encoding_gives_finite_fixed_tokens(encoding, dtype, channels):
    rng = np.random.default_rng(0)
    img = (rng.random((480, 640, channels)) * (255 if dtype == np.uint8 else 5000)).astype(dtype)
    if dtype == np.float32:
        img[0, 0, 0] = np.nan  # depth holes are common
    patches, mask = tokenize_camera(CameraFrame(0, "c", img, encoding), CFG.camera)
    assert patches.shape == (48, 768) and np.isfinite(patches).all() and mask.all()


def _imu(rate_hz, duration_s, accel_fn=lambda t: np.zeros_like(t), start_s=10.0):
    t = start_s + np.arange(int(rate_hz * duration_s)) / rate_hz
    stamps = np.round(t * NS_PER_S).astype(np.int64)
    accel = np.stack([accel_fn(t - t[-1]), np.zeros_like(t), np.full_like(t, 9.80665)], 1)
    return ImuWindow("imu", stamps, accel, np.zeros((len(t), 3)))


def test_imu_resampling_is_rate_independent_and_exact_on_ramps():
    cfg = CFG.imu
    def ramp(rel):  # linear in time, so interpolation is exact
        return 2.0 * rel

    a, mask_a, _ = tokenize_imu(_imu(400, 0.5, ramp), cfg)
    b, mask_b, _ = tokenize_imu(_imu(200, 0.5, ramp), cfg)
    assert mask_a.all() and mask_b.all()
    np.testing.assert_allclose(imu_samples(a, cfg), imu_samples(b, cfg), atol=1e-5)  # same signal, other rates
    z = imu_samples(a, cfg)[..., IMU_AXES.index("accel_z")]
    np.testing.assert_allclose(z, 1.0, atol=1e-6)  # gravity in g
    # dt feature: 400 Hz -> 0.0025 s / 0.005 s = 0.5 ; 200 Hz -> 1.0
    np.testing.assert_allclose(a[:, IMU_DT], 0.5, atol=0.02)
    np.testing.assert_allclose(b[:, IMU_DT], 1.0, atol=0.02)


def test_imu_short_history_masks_the_early_chunks_and_empty_masks_all():
    chunks, mask, before_newest = tokenize_imu(_imu(200, 0.1), CFG.imu)  # 0.1 s of a 0.25 s window
    assert mask.tolist() == [False] * 4 + [True] * 4
    assert np.all(chunks[~mask] == 0)
    np.testing.assert_allclose(before_newest, 0.25 - 0.03125 * np.arange(1, 9), atol=1e-9)
    empty = ImuWindow("imu", np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3)))
    chunks, mask, _ = tokenize_imu(empty, CFG.imu)
    assert not mask.any() and not chunks.any()


def test_tokenizer_ages_and_absent_modalities():
    tok = Tokenizer(CFG)
    now = 10 * NS_PER_S + 400_000_000
    window = _imu(200, 0.5)  # newest sample at 10.495 s
    snap = SensorSnapshot(now, camera=CameraFrame(now - 50_000_000, "c", np.zeros((48, 64, 3), np.uint8), "rgb8"), imu=window)
    x = tok(snap, np.array([1, 2, 3, 4], np.float32))
    spec = input_spec(CFG)
    assert set(x) == set(spec)
    for name, (shape, dtype) in spec.items():
        assert x[name].shape == shape and x[name].dtype == dtype, name
    np.testing.assert_allclose(x["camera_age"], 0.05, atol=1e-6)
    assert not x["lidar_mask"].any() and not x["lidar_age"].any()
    newest_age = (now - window.stamps_ns[-1]) / NS_PER_S
    assert x["imu_age"].min() == pytest.approx(newest_age, abs=1e-6)
    assert np.all(np.diff(x["imu_age"]) < 0)  # later chunks are younger
    assert x["tau"].tolist() == [1, 2, 3, 4]


def test_tokens_of_a_frame_are_computed_once_and_follow_the_newest_frame():
    tok = Tokenizer(CFG)
    cloud = LidarFrame(0, "l", _cloud(2000))
    first = tok.prepare(cloud)
    assert tok.prepare(cloud) is first  # cached: the same arrays
    other = LidarFrame(1, "l", _cloud(2000, seed=1))
    assert not np.array_equal(tok.prepare(other)[0], first[0])
    x = tok(SensorSnapshot(2, lidar=cloud), np.ones(4, np.float32))
    np.testing.assert_array_equal(x["lidar_points"], tokenize_lidar(cloud, CFG.lidar)[0])


def test_imu_chunk_layout_by_name():
    # 200 Hz at rest, level, turning left at a quarter turn per second: 1 g up, 0.5 half turns/s of yaw
    t = 10.0 + np.arange(100) / 200
    window = ImuWindow("imu", np.round(t * NS_PER_S).astype(np.int64), np.tile([0.0, 0.0, 9.80665], (100, 1)),
                       np.tile([0.0, 0.0, math.pi / 2], (100, 1)))
    cfg = ImuTokens()
    chunks, mask, _ = tokenize_imu(window, cfg)
    assert mask.all() and chunks.shape == (cfg.chunks, cfg.features)
    samples = imu_samples(chunks, cfg)
    assert samples.shape == (cfg.chunks, cfg.samples_per_chunk, len(IMU_AXES))
    expected = {"accel_x": 0.0, "accel_y": 0.0, "accel_z": 1.0, "gyro_x": 0.0, "gyro_y": 0.0, "gyro_z": 0.5}
    for name, value in expected.items():
        np.testing.assert_allclose(samples[..., IMU_AXES.index(name)], value, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(chunks[:, IMU_DT], 1.0, atol=1e-6)  # 5 ms apart: the nominal 200 Hz
    # the window's last 0.25 s hold 51 of the samples (both ends included), each counted in one chunk
    assert round(float(chunks[:, IMU_COUNT].sum()) * cfg.samples_per_chunk) == 51


def _frame(t_ns, seed):
    return CameraFrame(t_ns, "c", np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8), "rgb8")


def test_tokenizer_fills_the_previous_frames_with_their_own_ages():
    tok = Tokenizer(CFG)
    now = 10 * NS_PER_S
    cam, cam_prev = _frame(now - 30_000_000, 1), _frame(now - 130_000_000, 2)
    cloud, cloud_prev = LidarFrame(now - 20_000_000, "l", _cloud(500, 1)), LidarFrame(now - 120_000_000, "l", _cloud(500, 2))
    x = tok(SensorSnapshot(now, camera=cam, lidar=cloud, camera_prev=cam_prev, lidar_prev=cloud_prev), np.ones(4, np.float32))
    spec = input_spec(CFG)
    for name in ("camera_prev_patches", "camera_prev_mask", "camera_prev_age", "lidar_prev_points", "lidar_prev_mask",
                 "lidar_prev_age"):
        assert x[name].shape == spec[name][0] and x[name].dtype == spec[name][1], name
    np.testing.assert_allclose(x["camera_prev_age"], 0.13, atol=1e-6)  # fusion time - the previous frame's stamp
    np.testing.assert_allclose(x["lidar_prev_age"], 0.12, atol=1e-6)
    np.testing.assert_allclose(x["camera_age"], 0.03, atol=1e-6)
    np.testing.assert_array_equal(x["camera_prev_patches"], tokenize_camera(cam_prev, CFG.camera)[0])
    np.testing.assert_array_equal(x["lidar_prev_points"], tokenize_lidar(cloud_prev, CFG.lidar)[0])
    np.testing.assert_array_equal(x["lidar_prev_mask"], tokenize_lidar(cloud_prev, CFG.lidar)[1])
    assert x["camera_prev_mask"].all()


def test_no_previous_frame_or_no_current_frame_leaves_the_previous_inputs_masked():
    tok = Tokenizer(CFG)
    now = 10 * NS_PER_S
    cam, cam_prev = _frame(now - 30_000_000, 1), _frame(now - 130_000_000, 2)
    x = tok(SensorSnapshot(now, camera=cam), np.ones(4, np.float32))
    assert x["camera_mask"].all() and not x["camera_prev_mask"].any()
    assert not x["camera_prev_patches"].any() and not x["camera_prev_age"].any()
    # a previous frame without its successor is never fed (the sync does not hand one over either)
    y = tok(SensorSnapshot(now, camera_prev=cam_prev, lidar_prev=LidarFrame(now, "l", _cloud(100))), np.ones(4, np.float32))
    for name in ("camera", "lidar"):
        assert not y[f"{name}_mask"].any() and not y[f"{name}_prev_mask"].any() and not y[f"{name}_prev_age"].any()


def test_the_previous_frame_is_a_cache_hit(monkeypatch):
    from fusion_attn import tokenize

    calls = []
    real = tokenize.tokenize_camera

    def counting(frame, cfg):
        calls.append(frame.stamp_ns)
        return real(frame, cfg)

    monkeypatch.setattr(tokenize, "tokenize_camera", counting)
    tok = Tokenizer(CFG)
    frames = [_frame(k * 100_000_000, k) for k in range(1, 5)]
    prev = None
    for frame in frames:
        tok.prepare(frame)  # the node tokenizes a frame as it arrives
        for dt in (10_000_000, 50_000_000):  # and fuses it twice while it is the newest
            x = tok(SensorSnapshot(frame.stamp_ns + dt, camera=frame, camera_prev=prev), np.ones(4, np.float32))
            if prev is not None:
                np.testing.assert_array_equal(x["camera_prev_patches"], real(prev, CFG.camera)[0])
        prev = frame
    assert calls == [f.stamp_ns for f in frames]  # each frame once: as the newest, then as the previous one
    # without `prepare`, the previous frame is still the one tokenized when it was the newest
    calls.clear()
    tok = Tokenizer(CFG)
    tok(SensorSnapshot(frames[1].stamp_ns, camera=frames[0]), np.ones(4, np.float32))
    tok(SensorSnapshot(frames[1].stamp_ns + 1, camera=frames[1], camera_prev=frames[0]), np.ones(4, np.float32))
    assert calls == [frames[0].stamp_ns, frames[1].stamp_ns]
    # a 60 Hz camera fused at 10 Hz, each frame tokenized as it arrives: the previous frame (the one
    # fused before, as the sync hands it over) is still cached, six arrivals later
    calls.clear()
    tok = Tokenizer(CFG)
    frames = [_frame(k * 50_000_000 // 3, k) for k in range(1, 31)]
    fused = None
    for k, frame in enumerate(frames):
        tok.prepare(frame)
        if k % 6 == 5:
            tok(SensorSnapshot(frame.stamp_ns, camera=frame, camera_prev=fused), np.ones(4, np.float32))
            fused = frame
    assert calls == [f.stamp_ns for f in frames]
    # replay: no `prepare`, only the fused frames are tokenized, each once
    calls.clear()
    tok = Tokenizer(CFG)
    for prev, frame in zip([None, *frames[5::6]], frames[5::6]):
        for _ in range(2):
            tok(SensorSnapshot(frame.stamp_ns, camera=frame, camera_prev=prev), np.ones(4, np.float32))
    assert calls == [f.stamp_ns for f in frames[5::6]]
