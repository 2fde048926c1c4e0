"""TensorRT backend: engine cache and key, I/O checks, precision report, fallback; GPU parity where possible.

Everything around TensorRT runs here with real files (exported ONNX graphs, cache folders). The
parity and CUDA-graph tests need TensorRT and/or a CUDA GPU and skip without them, saying which.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ros_domain
from graphs import random_model

from fusion_attn.backends import TENSORRT8_OPSET
from fusion_attn.backends.engine_cache import (
    EngineCache,
    EngineKey,
    TensorIO,
    TensorRTOptions,
    describe_precision,
    io_mismatches,
    layer_precisions,
    onnx_io,
    profile_shapes,
    step_camera,
    trtexec_command,
)
from fusion_attn.backends.export import example_inputs, export_onnx
from fusion_attn.cli import main
from fusion_attn.cli.build_engine import calibration_batches
from fusion_attn.config import FusionConfig, load_params
from fusion_attn.errors import BackendUnavailable, ConfigError
from fusion_attn.model import FusionModel
from fusion_attn.pipeline import FusionPipeline, create_backend, onnx_for
from fusion_attn.step import POINT_BUCKETS, step_ranges
from fusion_attn.tokenize import input_spec, output_spec

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
needs_gpu_trt = pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA),
                                   reason=f"needs TensorRT and a CUDA GPU (tensorrt importable: {HAS_TENSORRT}, "
                                          f"CUDA: {HAS_CUDA})")
# Documented in docs/TENSORRT.md: FP16 engine vs the PyTorch FP32 model on the same inputs.
FP16_TOLERANCE = {"fused": 5e-2, "latents": 5e-2, "attention": 1e-2}


def _model(seed: int) -> FusionModel:
    return random_model(seed)


@pytest.fixture(scope="module")
def onnx_graphs():
    """Real exported graphs from the run's cache (conftest): "a" at the default opset (test_export's plain
    graph), and at opset 17 (TensorRT 8.6) that model's and another's of other weights ("b17": this
    exporter takes a few seconds here, the default one 15-40 s)."""
    return {"a": onnx_for(_model(0)), "a17": onnx_for(_model(0), opset=TENSORRT8_OPSET),
            "b17": onnx_for(_model(1), opset=TENSORRT8_OPSET)}


def _key(onnx: Path, **changes) -> EngineKey:
    key = EngineKey.create(onnx, TensorRTOptions(), "10.3.0", "Orin (nvgpu)", "8.7")
    return dataclasses.replace(key, **changes)


# --- cache key -----------------------------------------------------------------------------------

def test_key_holds_every_field_the_issue_names(onnx_graphs):
    key = _key(onnx_graphs["a"]).to_dict()
    assert key["onnx_sha256"] == __import__("hashlib").sha256(onnx_graphs["a"].read_bytes()).hexdigest()
    assert key["token_budgets"] == {"camera": 48, "lidar": 64, "lidar_points_per_pillar": 16, "imu": 8}
    assert {"tensorrt_version", "gpu_name", "compute_capability", "precision", "workspace_mib"} <= set(key)


@pytest.mark.parametrize("change", [
    {"tensorrt_version": "8.6.2"}, {"gpu_name": "NVIDIA H100"}, {"compute_capability": "9.0"},
    {"precision": "fp32"}, {"workspace_mib": 2048}, {"token_budgets": (("camera", 96),)},
    {"batch_profile": (1, 1, 16)}, {"dla_core": 0}, {"calibration_sha256": "ab"},
])
def test_every_key_field_changes_the_digest(onnx_graphs, change):
    assert _key(onnx_graphs["a"], **change).digest() != _key(onnx_graphs["a"]).digest()


def test_other_weights_other_key(onnx_graphs):
    assert _key(onnx_graphs["a17"]).onnx_sha256 != _key(onnx_graphs["b17"]).onnx_sha256
    assert _key(onnx_graphs["a17"]).digest() != _key(onnx_graphs["b17"]).digest()


def test_key_reads_token_budgets_from_the_graph(tmp_path):
    cfg = FusionConfig.from_dict({"camera": {"height": 64, "width": 64}, "lidar": {"pillars": 32}})
    torch.manual_seed(0)
    onnx = export_onnx(FusionModel(cfg), tmp_path / "small.onnx", opset=TENSORRT8_OPSET)  # the quick exporter
    assert _key(onnx).to_dict()["token_budgets"] == {"camera": 16, "lidar": 32, "lidar_points_per_pillar": 16, "imu": 8}


# --- cache ---------------------------------------------------------------------------------------
# The cache stores engines as opaque bytes; these tests store a few labelled bytes, never run them.
PLAN = b"opaque bytes in the place of a serialized engine"


def _io(onnx):
    return onnx_io(onnx)


def test_cache_round_trip_with_sidecar(tmp_path, onnx_graphs):
    cache, key = EngineCache(tmp_path), _key(onnx_graphs["a"])
    assert cache.load(key) is None
    path = cache.store(key, PLAN, _io(onnx_graphs["a"]), {"build_seconds": 1.0})
    assert path.name == f"fusion-{key.digest()}.engine" and cache.load(key) == PLAN
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["key"] == key.to_dict() and meta["io"]["camera_patches"]["shape"] == [-1, 48, 768]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    # a step engine's key (with its profile's ranges) reads back from its sidecar as the same key
    ranged = EngineKey.create(onnx_graphs["b17"], TensorRTOptions(), "10.3.0", "Orin (nvgpu)", "8.7", ranges=step_ranges())
    cache.store(ranged, PLAN, _io(onnx_graphs["b17"]), {})
    assert cache.load(ranged) == PLAN


def test_cache_refuses_entries_it_cannot_vouch_for(tmp_path, onnx_graphs, caplog):
    cache, key = EngineCache(tmp_path), _key(onnx_graphs["a"])
    engine, sidecar = cache.paths(key)
    cache.store(key, PLAN, _io(onnx_graphs["a"]), {})
    sidecar.unlink()
    assert cache.load(key) is None and "sidecar" in caplog.text and "missing" in caplog.text
    sidecar.write_text("{not json")
    assert cache.load(key) is None and "unreadable" in caplog.text
    # an engine copied in from a machine with another TensorRT (e.g. before a JetPack upgrade)
    cache.store(dataclasses.replace(key, tensorrt_version="8.6.2"), PLAN, _io(onnx_graphs["a"]), {})
    old = cache.paths(dataclasses.replace(key, tensorrt_version="8.6.2"))
    old[0].replace(engine)
    old[1].replace(sidecar)
    caplog.clear()
    assert cache.load(key) is None and "built for another tensorrt_version" in caplog.text
    cache.store(key, b"", _io(onnx_graphs["a"]), {})
    assert cache.load(key) is None and "empty" in caplog.text
    cache.discard(key, "test")
    assert not engine.exists() and not sidecar.exists()


def test_dla_engines_have_a_fixed_batch(onnx_graphs):
    assert TensorRTOptions(opt_batch=2, max_batch=8).batch_profile == (1, 2, 8)
    dla = TensorRTOptions(dla_core=0, opt_batch=2, max_batch=8)
    assert dla.batch_profile == (2, 2, 2) and _key(onnx_graphs["a"]).batch_profile == (1, 1, 8)


def test_engine_dir_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSION_ATTN_CACHE", str(tmp_path))
    assert TensorRTOptions().engine_dir == tmp_path / "engines"
    assert TensorRTOptions(cache_dir=tmp_path / "x").engine_dir == tmp_path / "x"


# --- I/O check -----------------------------------------------------------------------------------

@pytest.mark.parametrize("graph", ["a", "a17"])
def test_onnx_io_is_the_model_spec(onnx_graphs, graph):
    io = onnx_io(onnx_graphs[graph])
    cfg = FusionConfig()
    dtype = {np.float32: "float", np.bool_: "bool"}
    want = {n: TensorIO("input", (-1, *s), dtype[d]) for n, (s, d) in input_spec(cfg).items()}
    want |= {n: TensorIO("output", (-1, *s), dtype[d]) for n, (s, d) in output_spec(cfg).items()}
    assert io == want
    assert io_mismatches(io, want) == []


def test_io_mismatches_name_the_difference(onnx_graphs):
    want = onnx_io(onnx_graphs["a"])
    got = dict(want)
    got["camera_patches"] = TensorIO("input", (-1, 96, 768), "float")
    got["all_masked"] = TensorIO("output", (-1,), "int32")
    del got["tau"]
    problems = io_mismatches(got, want)
    assert "missing input tau" in problems
    assert any(p.startswith("camera_patches") and "(-1, 96, 768)" in p for p in problems)
    assert any(p.startswith("all_masked") and "int32" in p for p in problems)


def test_opset17_export_matches_torch(onnx_graphs):
    backend = create_backend("onnxruntime", _model(0), onnx_path=onnx_graphs["a17"])
    x = example_inputs(_model(0), batch=3, seed=4)
    out = backend.run(x)
    with torch.no_grad():
        ref = _model(0)(*[torch.from_numpy(v) for v in x.values()])
    for (name, value), r in zip(out.items(), ref):
        np.testing.assert_allclose(value.astype(np.float64), r.numpy().astype(np.float64), atol=1e-5, err_msg=name)


# --- options and precision report ----------------------------------------------------------------

def test_options_from_the_node_parameter_file():
    opts = TensorRTOptions.from_params(load_params("config/fusion.yaml"))
    assert opts == TensorRTOptions()  # the file states the defaults
    opts = TensorRTOptions.from_params({"tensorrt.precision": "fp32", "tensorrt.max_batch": 4, "tensorrt.cache_dir": "/x"})
    assert (opts.precision, opts.max_batch, opts.engine_dir) == ("fp32", 4, Path("/x"))


@pytest.mark.parametrize("bad, words", [
    ({"precision": "fp8"}, "fp8"), ({"precision": "int8"}, "calibration"),
    ({"precision": "fp32", "dla_core": 0}, "DLA"), ({"opt_batch": 9, "max_batch": 8}, "opt_batch"),
    ({"workspace_mib": 0}, "workspace"),
])
def test_options_reject_what_tensorrt_would(bad, words):
    with pytest.raises(ConfigError, match=words):
        TensorRTOptions(**bad)


def _inspector(*formats):
    return json.dumps({"Layers": [{"Name": f"l{i}", "Outputs": [{"Format/Datatype": f}]} for i, f in enumerate(formats)],
                       "Bindings": []})


def test_layer_precisions_from_inspector_json():
    info = _inspector("Row major linear FP16 format", "Half", "Row major linear FP32", "Float", "Int8",
                      "N/A due to dynamic shapes", "Thirty-two wide channel vectorized row major Int8 format.")
    assert layer_precisions(info) == {"fp16": 2, "fp32": 2, "int8": 2}
    assert layer_precisions(json.dumps({"Layers": ["a", "b"]})) == {}  # not DETAILED: names only
    cast = {"Name": "cast", "Inputs": [{"Format/Datatype": "Half"}], "Outputs": [{"Format/Datatype": "Float"}]}
    myelin = {"Name": "{ForeignNode[/cross/MatMul.../out_norm]}", "Outputs": [{"Format/Datatype": "Float"}]}
    assert layer_precisions(json.dumps({"Layers": [cast, myelin]})) == {"fp16": 1, "fp32": 1, "fused": 1}


def test_precision_report_catches_silent_fp32():
    text, warning = describe_precision("fp16", {"fp16": 40, "fp32": 6})
    assert text == "fp16 (40 layers) + fp32 (6)" and warning is None
    text, warning = describe_precision("fp16", {"fp32": 46})
    assert "fp16 was requested but no layer runs in it" in warning and "fp32 (46 layers)" in text
    assert describe_precision("fp32", {})[0].startswith("fp32 (requested")
    assert describe_precision("fp16", {"fused": 1, "fp32": 2})[1] is None  # may run FP16 inside the fused node


def test_trtexec_command_matches_the_build_options(onnx_graphs, tmp_path):
    opts = TensorRTOptions(precision="int8", calibration_cache=tmp_path / "c.cache", max_batch=4, dla_core=1,
                           workspace_mib=512, cache_dir=tmp_path)
    cmd = trtexec_command(onnx_graphs["a"], opts, timing_cache=tmp_path / "t.cache").replace(" \\\n    ", " ").split()
    assert cmd[0] == "trtexec" and f"--onnx={onnx_graphs['a']}" in cmd
    assert {"--fp16", "--int8", f"--calib={tmp_path / 'c.cache'}", "--useDLACore=1", "--allowGPUFallback",
            "--memPoolSize=workspace:512M", f"--timingCacheFile={tmp_path / 't.cache'}"} <= set(cmd)
    shapes = dict(a.split("=", 1) for a in cmd if "Shapes" in a)
    # DLA has no dynamic shapes: min = opt = max = opt_batch; calibration runs at its own batch
    assert "camera_patches:1x48x768" in shapes["--minShapes"] and "lidar_points:1x64x16x9" in shapes["--maxShapes"]
    assert "lidar_points:8x64x16x9" in shapes["--optShapesCalib"]
    assert len(shapes["--maxShapes"].split(",")) == len(input_spec(FusionConfig()))
    gpu = trtexec_command(onnx_graphs["a"], TensorRTOptions(precision="fp32", max_batch=4))
    assert "--noTF32" in gpu and "lidar_points:4x64x16x9" in gpu and "--useDLACore" not in gpu


def test_build_engine_prints_trtexec_without_tensorrt(onnx_graphs, capsys):
    assert main(["build-engine", str(onnx_graphs["a"]), "--trtexec", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "trtexec" in out and "--noTF32" in out and str(onnx_graphs["a"]) in out


# --- the one-graph (step) engine's profile --------------------------------------------------------

def test_profile_shapes_cover_the_batch_and_the_step_graphs_point_and_imu_axes():
    assert profile_shapes("tau", (-1, 4), (1, 2, 8)) == ((1, 4), (2, 4), (8, 4))
    ranges = step_ranges()
    # every point bucket fits; the standard 120k-point sweep is what the profile is tuned for
    assert profile_shapes("points", (-1, -1, 4), (1, 1, 8), ranges) == (
        (1, POINT_BUCKETS[0], 4), (1, 131072, 4), (8, POINT_BUCKETS[-1], 4))
    assert profile_shapes("imu_values", (-1, -1, 6), (1, 1, 8), ranges)[1] == (1, 128, 6)
    with pytest.raises(ConfigError, match="points has a dynamic axis 1 with no range"):
        profile_shapes("points", (-1, -1, 4), (1, 1, 8))


def test_step_engines_are_keyed_by_their_ranges_and_token_engines_keep_their_key(onnx_graphs):
    plain = _key(onnx_graphs["a"])
    ranged = EngineKey.create(onnx_graphs["a"], TensorRTOptions(), "10.3.0", "Orin (nvgpu)", "8.7", ranges=step_ranges())
    assert "shape_ranges" not in plain.to_dict()  # engines cached before the step engine keep their digest
    assert ranged.digest() != plain.digest() and ("points", 1, (1024, 131072, 262144)) in ranged.shape_ranges


def test_step_camera_option():
    assert step_camera("480x640x3:rgb8") == ((480, 640, 3), "rgb8")
    assert step_camera("720X1280X1:mono16") == ((720, 1280, 1), "mono16")
    for bad in ("480x640:rgb8", "480x640x3", "480x640x3:bgr9", "0x640x3:rgb8", "axbxc:rgb8"):
        with pytest.raises(ConfigError, match="HEIGHTxWIDTHxCHANNELS:ENCODING"):
            TensorRTOptions(step_camera=bad)
    # the step graph takes dynamic point counts and float tokenizers: not on DLA, not calibrated INT8
    assert TensorRTOptions().uses_step and not TensorRTOptions(whole_step=False).uses_step
    assert not TensorRTOptions(precision="fp16", dla_core=0).uses_step


def test_build_engine_prints_the_step_engines_trtexec_without_tensorrt(capsys, shared_cache):
    assert main(["build-engine", "--step-camera", "48x64x3:rgb8", "--trtexec", "--max-batch", "4"]) == 0
    cmd = capsys.readouterr().out.replace(" \\\n    ", " ").split()
    shapes = dict(a.split("=", 1) for a in cmd if "Shapes" in a)
    assert "points:1x1024x4" in shapes["--minShapes"] and "points_prev:4x262144x4" in shapes["--maxShapes"]
    assert "image:1x48x64x3" in shapes["--optShapes"] and "imu_t:1x128" in shapes["--optShapes"]
    onnx = next(a.split("=", 1)[1] for a in cmd if a.startswith("--onnx="))
    assert Path(onnx).parent == shared_cache and onnx_io(onnx)["points"].shape == (-1, -1, 4)  # the cached step graph
    assert main(["build-engine", "--step-camera", "48x64x3:rgb8", "--trtexec", "--dla-core", "0"]) == 2
    assert "not built with int8, a DLA core" in capsys.readouterr().err


def test_a_snapshot_the_step_engine_refuses_is_fused_from_tokens():
    """The step backend's contract with the pipeline, without TensorRT: run_step returning None means
    "fuse this one from tokens" (TensorRTStepBackend for a camera it cannot build an engine for, a 16-bit
    camera, a cloud beyond its profile), and the snapshot is still fused, as the token path fuses it.
    ONNX Runtime plays the token-level engine."""
    from fusion_attn.frames import CameraFrame, LidarFrame
    from fusion_attn.tokenize import SensorSnapshot

    model = _model(0)
    tokens = create_backend("onnxruntime", model)

    class RefusesBigClouds:
        name, device, precision, whole_step = "tensorrt", "cpu", "fp32", True
        refused = 0

        def run_step(self, snaps, taus, cfg):  # returns None: every cloud here is beyond its 1,024 points
            assert all(len(s.lidar) > 1024 for s in snaps)
            self.refused += 1

        def run(self, inputs):
            return tokens.run(inputs)

    rng = np.random.default_rng(0)
    snap = SensorSnapshot(10**9, camera=CameraFrame(9 * 10**8, "cam", rng.integers(0, 255, (48, 64, 3), np.uint8), "rgb8"),
                          lidar=LidarFrame(9 * 10**8, "lidar", rng.normal(0, 5, (5000, 4)).astype(np.float32)))
    pipeline = FusionPipeline(model.cfg, RefusesBigClouds())
    state = pipeline.fuse(snap)
    reference = FusionPipeline(model.cfg, tokens).fuse(snap)
    assert pipeline.backend.refused == 1 and state.present.tolist() == [True, True, False]
    np.testing.assert_array_equal(state.pooled, reference.pooled)
    np.testing.assert_array_equal(state.trust, reference.trust)
    assert "tokenize" in state.timings_ms and "step" not in state.timings_ms
    pipeline.fuse(snap)
    assert pipeline.backend.refused == 2  # asked again for the next snapshot


# --- fallback ------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: no fallback to see")
def test_tensorrt_falls_back_to_onnxruntime_with_one_line(caplog):
    pipeline = FusionPipeline.create(None, backend="tensorrt", threads=1)
    assert pipeline.backend.name == "onnxruntime"
    info = pipeline.backend_info()
    assert info["backend_fallback"].startswith("tensorrt unavailable: TensorRT is not installed")
    lines = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(lines) == 1 and "tensorrt" in lines[0]
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        FusionPipeline.create(None, backend="tensorrt", fallback="fail")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is present: no fallback to see")
def test_cuda_graph_backend_falls_back_without_gpu():
    pipeline = FusionPipeline.create(None, backend="torch-cudagraph", threads=1)
    assert pipeline.backend.name == "onnxruntime"
    assert pipeline.backend_info()["backend_fallback"] == "torch-cudagraph unavailable: no CUDA GPU is visible to torch"


def test_the_cudagraph_compile_parameter_reaches_the_backend():
    """cudagraph.compile in a parameter file reaches the CUDA-graph backend (on the CPU here: its eager
    bookkeeping; nothing compiles before a first call)."""
    from fusion_attn.params import PARAM_DEFAULTS

    for compile_graphs in (False, True):
        params = {**PARAM_DEFAULTS, "backend": "torch-cudagraph", "device": "cpu", "cudagraph.compile": compile_graphs}
        backend = FusionPipeline.from_params(params).backend
        assert backend.name == "torch-cudagraph" and backend.compile is compile_graphs


def test_unknown_fallback_policy_is_refused():
    with pytest.raises(ConfigError, match="fallback"):
        FusionPipeline.create(None, backend="onnxruntime", fallback="maybe")


@pytest.mark.skipif(HAS_TENSORRT and HAS_CUDA, reason="TensorRT and a GPU are present: no fallback to see")
def test_replay_summary_and_diagnostics_name_the_backend_in_use(real_data, tmp_path, capsys):
    out = tmp_path / "replay"
    assert main(["replay", str(real_data / "euroc_v1_01_cam_imu"), "-o", str(out), "--backend", "tensorrt",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"]["backend"] == "onnxruntime"
    assert summary["backend"]["backend_fallback"].startswith("tensorrt unavailable")
    from rosbags.highlevel import AnyReader

    with AnyReader([out / "fused"]) as reader:
        conns = [c for c in reader.connections if c.topic == "/diagnostics"]
        msgs = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=conns)]
    fusion = [s for m in msgs for s in m.status if s.name == "fusion_attn: fusion"]
    values = {kv.key: kv.value for kv in fusion[-1].values}
    assert values["backend"] == "onnxruntime" and values["backend_fallback"].startswith("tensorrt unavailable")
    assert fusion[-1].level == 1 and fusion[-1].message.startswith("running on onnxruntime")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_names_the_problem(capsys):
    assert main(["build-engine"]) == 2
    err = capsys.readouterr().err
    assert "build-engine: error: TensorRT is not installed here" in err and "docs/TENSORRT.md" in err


@pytest.mark.skipif(HAS_TENSORRT and HAS_CUDA, reason="TensorRT and a GPU are present: the build would succeed")
def test_node_build_only_exits_non_zero_without_an_engine():
    env = dict(os.environ, ROS_DOMAIN_ID=ros_domain(6))
    run = subprocess.run([sys.executable, "-m", "fusion_attn.node", "--ros-args", "-p", "backend:=tensorrt",
                          "-p", "build_only:=true"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1, run.stderr
    assert "build_only: no tensorrt engine: tensorrt unavailable" in run.stdout + run.stderr
    run = subprocess.run([sys.executable, "-m", "fusion_attn.node", "--ros-args", "-p", "backend:=tensorrt",
                          "-p", "backend_fallback:=fail"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1 and "configure failed" in run.stdout + run.stderr


def test_calibration_batches_from_a_recording(real_data):
    cfg = FusionConfig()
    batches = list(calibration_batches([real_data / "euroc_v1_01_cam_imu"], cfg, {}, max_batches=3))
    assert len(batches) == 3
    for batch in batches:
        for name, (shape, dtype) in input_spec(cfg).items():
            assert batch[name].shape == (8, *shape) and batch[name].dtype == dtype
        assert batch["camera_mask"].any() and batch["imu_mask"].any()


# --- on a GPU with TensorRT ----------------------------------------------------------------------

@needs_gpu_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_parity_with_torch(tmp_path, onnx_graphs, precision):
    from fusion_attn.backends.tensorrt_backend import ONNX_OPSET, TensorRTBackend

    onnx = onnx_graphs["a" if ONNX_OPSET >= 18 else "a17"]
    backend = TensorRTBackend(onnx, TensorRTOptions(precision=precision, cache_dir=tmp_path), device="cuda:0")
    x = example_inputs(_model(0), batch=4, seed=7)
    out = backend.run(x)
    with torch.no_grad():
        ref = dict(zip(output_spec(FusionConfig()), _model(0)(*[torch.from_numpy(v) for v in x.values()])))
    for name, tol in FP16_TOLERANCE.items():
        np.testing.assert_allclose(out[name], ref[name].numpy(), atol=tol if precision == "fp16" else 1e-4, err_msg=name)
    np.testing.assert_array_equal(out["all_masked"], ref["all_masked"].numpy())


@needs_gpu_trt
def test_engine_is_reused_and_rebuilt_when_corrupt(tmp_path, onnx_graphs):
    from fusion_attn.backends.tensorrt_backend import ONNX_OPSET, TensorRTBackend

    onnx = onnx_graphs["a" if ONNX_OPSET >= 18 else "a17"]
    opts = TensorRTOptions(precision="fp32", cache_dir=tmp_path)
    first = TensorRTBackend(onnx, opts)
    built_at = first.sidecar["built_at"]
    again = TensorRTBackend(onnx, opts)
    assert again.engine_path == first.engine_path and again.sidecar["built_at"] == built_at
    first.engine_path.write_bytes(first.engine_path.read_bytes()[:1000])  # cut short, like a failed copy
    rebuilt = TensorRTBackend(onnx, opts)
    assert rebuilt.sidecar["engine_sha256"] != "" and rebuilt.engine_path.stat().st_size > 1000


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager():
    from fusion_attn.backends.cuda_graph_backend import CudaGraphBackend

    graphs, eager = CudaGraphBackend(_model(0)), create_backend("torch", _model(0), device="cuda:0")
    for batch, seed in ((1, 0), (1, 1), (3, 2)):  # a second call replays; a new shape captures anew
        x = example_inputs(_model(0), batch=batch, seed=seed)
        a, b = graphs.run(x), eager.run(x)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    assert len(graphs.graphs) == 2
