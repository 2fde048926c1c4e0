"""The whole step on tensors (step.py): the same tokens as the host tokenizers, on the real recordings
and on edge cases, on the CPU and (where one is visible) on a CUDA GPU; its one-graph ONNX export."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from graphs import STEP_CAMERA

from fusion_attn.backends.cuda_graph_backend import CudaGraphBackend
from fusion_attn.backends.export import TOKENIZER_NODE_PREFIX, unsupported_ops
from fusion_attn.backends.onnxruntime_backend import OnnxRuntimeBackend
from fusion_attn.backends.torch_backend import TorchBackend
from fusion_attn.bag import open_reader
from fusion_attn.frames import CameraFrame, ImuWindow, LidarFrame
from fusion_attn.pipeline import FusionPipeline, create_backend, load_model, step_onnx_for
from fusion_attn.replay import Recording, ReplayOptions, fused_difference, recorded_snapshots, replay
from fusion_attn.step import (
    STEP_INPUTS,
    Buckets,
    FusionStep,
    camera_key,
    resize_matrix,
    step_inputs,
    step_key,
    step_output_names,
)
from fusion_attn.sync import SensorSync, SyncConfig
from fusion_attn.tokenize import IMAGENET_STD, SensorSnapshot, Tokenizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GREY_LEVEL = 1 / 255 / IMAGENET_STD.min()  # one 8-bit grey level, normalised
RECORDINGS = ["euroc_v1_01_cam_imu", "lidar_camera_frame", "sick_lms1xx_scan_cloud_radar.bag", "husky_imu_odom_gps.bag"]


@pytest.fixture(scope="module")
def model():
    return load_model(None)[0]


def _step_tokens(model, snaps, device):
    x = step_inputs(snaps, np.ones((len(snaps), 4), np.float32), model.cfg)
    shape, encoding, _ = camera_key(snaps[0], model.cfg)
    step = FusionStep(model, shape, encoding).to(device).eval()
    with torch.no_grad():
        t = {k: torch.from_numpy(v).to(device) for k, v in x.items()}
        frames = step.frame_tokens(*(t[k] for k in STEP_INPUTS[:6]))
        got = step.tokens(*frames, *(t[k] for k in STEP_INPUTS[6:-1]))
    return {k: v.cpu().numpy() for k, v in got.items()}


def assert_same_tokens(model, snaps, device):
    """Each snapshot's step tokens against the host Tokenizer's: masks exact, values within rounding."""
    got = _step_tokens(model, snaps, device)
    for b, snap in enumerate(snaps):
        ref = Tokenizer(model.cfg)(snap, np.ones(4, np.float32))
        for name, want in ref.items():
            if name == "tau":
                continue
            have = got[name][b]
            if want.dtype == np.bool_:
                np.testing.assert_array_equal(have, want, err_msg=name)
            elif name.startswith("camera") and name.endswith("patches"):
                diff = np.abs(have - want)
                assert diff.max() <= GREY_LEVEL + 1e-5, (name, diff.max())
                # off by a grey level where cv2 rounds in fixed point: a few % of pixels of an enlarged image
                assert (diff > 1e-4).mean() < 0.1, name
            else:
                np.testing.assert_allclose(have, want, atol=1e-5, rtol=1e-5, err_msg=name)


def _snapshots(real_data, model, recording, end_s):
    sync = SensorSync(SyncConfig.for_model(model.cfg))
    with open_reader([real_data / recording]) as reader:
        return list(recorded_snapshots(reader, sync, ReplayOptions(progress=False, end_s=end_s), Recording()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recording", RECORDINGS)
def test_step_tokens_match_the_host_tokenizers_on_real_recordings(real_data, model, recording, device):
    snaps = _snapshots(real_data, model, recording, 10)
    assert snaps
    for snap in snaps:
        assert_same_tokens(model, [snap], device)
    if len({camera_key(s, model.cfg) for s in snaps}) == 1:  # one batch of them all: rows independent
        assert_same_tokens(model, snaps, device)


def _cloud(rng, n, spread=30.0):
    return (rng.normal(size=(n, 4)) * [spread, spread, 2, 60]).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_clouds(model, device):
    rng = np.random.default_rng(1)
    cfg = model.cfg.lidar
    cloud = _cloud(rng, 5000)
    cloud[::7, 0] = np.nan  # NaN, infinite and out-of-range points are never binned
    cloud[1::7, 2] = np.inf
    cloud[2::7, :2] = 1e9
    # many cells with equal counts: the K most populated are chosen by count, then by cell
    per_cell = np.arange(3 * cfg.pillars)
    ties = np.stack([(per_cell % 64 - 31.5) * 1.6, (per_cell // 64 - 1.5) * 1.6, np.zeros_like(per_cell), per_cell], 1)
    ties = np.repeat(ties, 3, axis=0).astype(np.float32)
    edge = np.array([[cfg.range_m, 0, 0, 1], [-cfg.range_m, 0, 0, 1], [0, 0, cfg.z_max_m, 1]], np.float32)  # on the borders
    for points in (cloud, ties, edge, np.zeros((0, 4), np.float32), _cloud(rng, 3)):
        snap = SensorSnapshot(10**9, lidar=LidarFrame(9 * 10**8, "l", points),
                              lidar_prev=LidarFrame(8 * 10**8, "l", _cloud(rng, 300)))
        assert_same_tokens(model, [snap], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoding, dtype, channels", [("rgb8", np.uint8, 3), ("mono8", np.uint8, 1),
                                                       ("mono16", np.uint16, 1), ("16UC1", np.uint16, 1),
                                                       ("32FC1", np.float32, 1)])
@pytest.mark.parametrize("height, width", [(480, 640), (100, 133), (50, 60)])  # integer, fractional, enlarged
def test_camera_encodings_and_sizes(model, device, encoding, dtype, channels, height, width):
    rng = np.random.default_rng(2)
    if dtype == np.float32:
        image = rng.uniform(0, 12, (height, width, channels)).astype(np.float32)
        image[::5, ::3] = np.nan
    else:
        image = rng.integers(0, np.iinfo(dtype).max, (height, width, channels), dtype=dtype, endpoint=True)
    snap = SensorSnapshot(10**9, camera=CameraFrame(9 * 10**8, "c", image, encoding),
                          camera_prev=CameraFrame(8 * 10**8, "c", image[::-1].copy(), encoding))
    assert_same_tokens(model, [snap], device)


@pytest.mark.parametrize("device", DEVICES)
def test_irregular_and_short_imu_windows(model, device):
    rng = np.random.default_rng(3)
    snaps = []
    for n, rate in ((400, 400), (7, 200), (1, 100), (60, 37)):
        stamps = np.cumsum(rng.uniform(0.2, 1.8, n) * 1e9 / rate).astype(np.int64) + 10**9
        window = ImuWindow("imu", stamps, rng.normal(0, 3, (n, 3)), rng.normal(0, 1, (n, 3)))
        snaps.append(SensorSnapshot(int(stamps[-1]) + 3_000_000, imu=window))
    for snap in snaps:
        assert_same_tokens(model, [snap], device)
    assert_same_tokens(model, snaps, device)


def test_resize_matrices_rows_are_weights():
    for size_in, size_out in ((480, 96), (752, 128), (50, 96)):
        m = resize_matrix(size_in, size_out, area=size_in >= size_out)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
        assert (m >= 0).all()


def test_buckets_fit():
    b = Buckets(points=(1024, 4096), imu=(32,))
    assert [b.fit(n, b.points) for n in (0, 1024, 1025, 4096, 4097, 9000)] == [1024, 1024, 4096, 4096, 8192, 12288]


def test_a_batch_needs_one_camera_key(model):
    a = SensorSnapshot(1, camera=CameraFrame(0, "c", np.zeros((48, 64, 3), np.uint8), "rgb8"))
    b = SensorSnapshot(1, camera=CameraFrame(0, "c", np.zeros((48, 64, 1), np.uint8), "mono8"))
    with pytest.raises(ValueError, match="camera_key"):
        step_inputs([a, b], np.ones((2, 4), np.float32), model.cfg)


def test_whole_step_pipeline_fuses_real_data_as_the_host_path(real_data, model):
    """The pipeline's whole-step path (what GPU backends take), run here by the torch backend on the
    CPU, against the CPU default on the same recording."""
    whole = FusionPipeline(model.cfg, TorchBackend(model, whole_step=True))
    host = FusionPipeline(model.cfg, create_backend("torch", model))
    sync = SensorSync(SyncConfig.for_model(model.cfg))
    with open_reader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        snaps = list(recorded_snapshots(reader, sync, ReplayOptions(progress=False, end_s=1), Recording()))
    for snap in snaps:
        a, b = whole.fuse(snap), host.fuse(snap)
        np.testing.assert_array_equal(a.present, b.present)
        np.testing.assert_allclose(a.ages_s, b.ages_s, atol=1e-6)
        for name in ("pooled", "latents", "attention", "trust"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=2e-4, err_msg=name)


class _CountingTorch(TorchBackend):
    """The torch backend (whole step, CPU), counting its calls and the rows of each."""

    def __init__(self, model, max_batch=None):
        super().__init__(model, whole_step=True)
        self.rows: list[tuple[str, int]] = []
        if max_batch:
            self.max_batch = max_batch

    def run(self, inputs):
        self.rows.append(("tokens", len(inputs["tau"])))
        return super().run(inputs)

    def run_step(self, snaps, taus, cfg):
        self.rows.append(("step", len(taus)))
        refuse = step_key(snaps[0], cfg)[1] == 8192  # as TensorRT refuses a cloud beyond its profile
        return None if refuse else super().run_step(snaps, taus, cfg)


def test_fuse_many_batches_by_step_shape_and_gives_each_snapshot_its_own_states(real_data, model):
    """Snapshots of a recording and a few of other shapes, fused in one fuse_many: one call per step
    shape (camera, point and IMU buckets; a cloud the step refuses goes by tokens), each snapshot's
    states as fusing it alone gives them, at every τ row."""
    sync = SensorSync(SyncConfig.for_model(model.cfg))
    with open_reader([real_data / "lidar_camera_frame"]) as reader:
        snaps = list(recorded_snapshots(reader, sync, ReplayOptions(progress=False, end_s=2), Recording()))
    rng = np.random.default_rng(3)
    big, small = LidarFrame(snaps[3].stamp_ns, "l", _cloud(rng, 5000)), LidarFrame(snaps[5].stamp_ns, "l", _cloud(rng, 700))
    snaps[3], snaps[5] = dataclasses.replace(snaps[3], lidar=big), dataclasses.replace(snaps[5], lidar=small)
    taus = np.array([[1, 1, 1, 1], [0.3, 1, 2, 1]], np.float32)
    batched = FusionPipeline(model.cfg, _CountingTorch(model))
    fused = batched.fuse_many(snaps, taus)
    keys = {step_key(s, model.cfg) for s in snaps}
    assert len(keys) >= 3 and len([r for r in batched.backend.rows if r[0] == "step"]) == len(keys)
    assert ("tokens", 2) in batched.backend.rows  # the big cloud's snapshot, refused by the step: by tokens
    single = FusionPipeline(model.cfg, _CountingTorch(model))
    for snap, states in zip(snaps, fused):
        alone = single.fuse_many([snap], taus)[0]
        assert [s.stamp_ns for s in states] == [snap.stamp_ns] * 2 and np.array_equal(states[1].tau, taus[1])
        for a, b in zip(states, alone):
            np.testing.assert_array_equal(a.present, b.present)
            for name in ("pooled", "latents", "attention", "trust"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-5, err_msg=name)
    # a backend with a largest batch (a TensorRT profile) gets calls of at most that many rows
    capped = FusionPipeline(model.cfg, _CountingTorch(model, max_batch=5))
    capped.fuse_many(snaps, taus)
    assert max(rows for _, rows in capped.backend.rows) == 4  # two snapshots x two τ rows


def test_one_graph_export_runs_in_onnx_runtime_as_in_torch(model):
    """The step as one ONNX graph: only operators TensorRT parses, the same outputs as torch, at other
    point and IMU counts than it was traced with (dynamic dimensions)."""
    path = step_onnx_for(model, *STEP_CAMERA)  # the run's cache (tests/graphs.py exports it beside the run)
    assert unsupported_ops(path) == []
    # the tokenizers' nodes are named so (an FP16 engine keeps them in FP32), the model's are not
    nodes = onnx.load(str(path)).graph.node
    tokenizer = {n.op_type for n in nodes if n.name.startswith(TOKENIZER_NODE_PREFIX)}
    model_ops = {n.op_type for n in nodes if not n.name.startswith(TOKENIZER_NODE_PREFIX)}
    assert {"ScatterElements", "TopK", "CumSum", "Floor", "GatherElements"} <= tokenizer
    assert "LayerNormalization" in model_ops and "LayerNormalization" not in tokenizer
    rng = np.random.default_rng(4)
    snap = SensorSnapshot(10**9, camera=CameraFrame(9 * 10**8, "c", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "rgb8"),
                          lidar=LidarFrame(9 * 10**8, "l", _cloud(rng, 3000)),
                          imu=ImuWindow("i", np.arange(50, dtype=np.int64) * 5_000_000 + 7 * 10**8,
                                        rng.normal(size=(50, 3)), rng.normal(size=(50, 3))),
                          lidar_prev=LidarFrame(8 * 10**8, "l", _cloud(rng, 20000)))
    x = step_inputs([snap, SensorSnapshot(10**9)], np.array([[1, 1, 1, 1], [0.5, 1, 2, 1]], np.float32), model.cfg)
    got = OnnxRuntimeBackend(path, threads=1).run(x)
    with torch.no_grad():
        want = FusionStep(model, (48, 64, 3), "rgb8").eval()(**{k: torch.from_numpy(x[k]) for k in STEP_INPUTS})
    for name, w in zip(step_output_names(model.cfg), want):
        np.testing.assert_allclose(got[name], w.numpy(), atol=1e-4, err_msg=name)
    assert got["present"].tolist() == [[True, True, True], [False, False, False]]


def test_cuda_graph_backend_tokenizes_each_frame_once_and_batches_to_the_bit(real_data, model):
    """CudaGraphBackend's bookkeeping, run eagerly on the CPU (the code a GPU captures in graphs): the
    step from each frame's kept tokens fuses as FusionStep in one piece does; each camera and lidar
    frame is tokenized once however many steps use it; a call of many rows gives every row the bits
    that row alone gets (replay --batch)."""
    snaps = _snapshots(real_data, model, "lidar_camera_frame", 2)
    backend = CudaGraphBackend(model, device="cpu")
    tokenized = []
    backend.frames.tokenize = lambda frame: tokenized.append(frame) or backend._tokenize(frame)
    alone, whole = FusionPipeline(model.cfg, backend), FusionPipeline(model.cfg, TorchBackend(model, whole_step=True))
    for snap in snaps:
        a, b = alone.fuse(snap), whole.fuse(snap)
        np.testing.assert_array_equal(a.present, b.present)
        np.testing.assert_array_equal(a.ages_s, b.ages_s)
        for name in ("pooled", "latents", "attention", "trust"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-6, err_msg=name)
    used = {id(f) for s in snaps for new, prev in ((s.camera, s.camera_prev), (s.lidar, s.lidar_prev))
            if new is not None for f in (new, prev) if f is not None}
    assert len(tokenized) == len(used) and len({id(f) for f in tokenized}) == len(used)
    assert {key[0] for key in backend.graphs} == {"camera", "lidar", "fuse"}
    # a frame prepared as it arrives (the node does) is not tokenized again by the fusion that uses it
    last = snaps[-1]
    fresh = dataclasses.replace(last.lidar, stamp_ns=last.lidar.stamp_ns + 1)
    alone.prepare(fresh)
    assert tokenized[-1] is fresh
    alone.fuse(dataclasses.replace(last, stamp_ns=last.stamp_ns + 1, lidar=fresh, lidar_prev=last.lidar))
    assert tokenized[-1] is fresh and len(tokenized) == len(used) + 1

    taus = np.array([[1, 1, 1, 1], [0.5, 2, 1, 1]], np.float32)
    batched = FusionPipeline(model.cfg, CudaGraphBackend(model, device="cpu"))
    many = batched.fuse_many(snaps, taus)
    assert max(key[2] for key in batched.backend.graphs if key[0] == "fuse") > len(taus)  # several snapshots a call
    single = FusionPipeline(model.cfg, CudaGraphBackend(model, device="cpu"))
    for snap, states in zip(snaps, many):
        for a, b in zip(states, single.fuse_many([snap], taus)[0]):
            for name in ("pooled", "latents", "attention", "trust"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_compiled_graphs_take_more_shapes_than_the_compilers_default_limit(model, monkeypatch):
    """cudagraph.compile: each point bucket recompiles the one lidar module's code, each IMU bucket and
    row count the fusion's; past the compiler's recompile limit (8 by default, 2 here) a full-graph
    compile fails for good, so the backend raises the limit. torch.compile's eager backend here (no
    code generation): it counts recompiles as inductor does."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile_(module, backend="eager", **kw))
    rng = np.random.default_rng(5)
    with torch._dynamo.config.patch(recompile_limit=2):
        backend = CudaGraphBackend(model, device="cpu", compile=True)
        for n in (1000, 2000, 4000, 8000):
            _, mask = backend._tokenize(LidarFrame(0, "l", _cloud(rng, n)))
            assert mask.any()
    assert sorted(key[1] for key in backend.graphs) == [1024, 2048, 4096, 8192]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU machine, a Jetson)")
def test_cuda_graph_whole_step_fuses_real_data_as_the_cpu_path(real_data, model):
    gpu = FusionPipeline(model.cfg, create_backend("torch-cudagraph", model))
    cpu = FusionPipeline(model.cfg, create_backend("torch", model))
    for recording in RECORDINGS:
        sync = SensorSync(SyncConfig.for_model(model.cfg))
        with open_reader([real_data / recording]) as reader:
            for snap in recorded_snapshots(reader, sync, ReplayOptions(progress=False, end_s=3), Recording()):
                a, b = gpu.fuse(snap), cpu.fuse(snap)
                np.testing.assert_array_equal(a.present, b.present)
                for name in ("pooled", "latents", "attention", "trust"):
                    np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=5e-4, err_msg=(recording, name))
    # one graph per camera size, point bucket and IMU bucket, not per call
    assert len(gpu.backend.graphs) <= 12, list(gpu.backend.graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU machine, a Jetson)")
def test_batched_replay_on_cuda_graphs_writes_the_same_bytes(real_data, tmp_path):
    """replay --batch on torch-cudagraph: each row through the batch-1 kernels, so every message is
    byte for byte the one a replay of one instant at a time writes on the same GPU."""
    bag = real_data / "lidar_camera_frame"
    for batch in (1, 8):
        pipeline = FusionPipeline.create(None, backend="torch-cudagraph", threads=1)
        assert pipeline.backend.name == "torch-cudagraph"
        replay([bag], pipeline, tmp_path / str(batch), ReplayOptions(progress=False, batch=batch))
    diff = fused_difference(tmp_path / "1", tmp_path / "8")
    assert diff["same_topics_and_stamps"] and diff["messages"][0] >= 5
    assert diff["byte_identical"] == diff["messages"][0], diff
