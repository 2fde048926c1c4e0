"""ONNX export: named inputs, dynamic batch only, parity with torch, TensorRT-parsable operators."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from graphs import OPTIONS, random_model
from sweeps import room_sweep, scan_inputs

from fusion_attn.backends import TENSORRT8_OPSET
from fusion_attn.backends.export import example_inputs, tensorrt_supported_ops, unsupported_ops
from fusion_attn.backends.onnxruntime_backend import OnnxRuntimeBackend
from fusion_attn.backends.torch_backend import TorchBackend
from fusion_attn.config import FusionConfig
from fusion_attn.errors import CheckpointError
from fusion_attn.model import FusionModel, lidar_scan_match
from fusion_attn.pipeline import onnx_for
from fusion_attn.tokenize import input_spec, output_names


# every model option in one of three graphs, and both exporters: the default opset's (torch.export's
# tracing, 15-40 s a graph here) and TensorRT 8.6's opset 17 (TorchScript's, a few seconds)
@pytest.fixture(scope="module", params=[({}, None), (OPTIONS, None),
                                        ({"fusion": "token", "lidar_motion": True, "lidar_motion_token": True},
                                         TENSORRT8_OPSET)],
                ids=["plain", "qknorm+headtau+lidar_motion+direct+imu_direct+stale+stem+rate_readout",
                     "token+lidar_motion_token@opset17"])
def exported(request):
    """A model and its graph, exported through the run's cache (conftest; tests/graphs.py exports the first
    two beside the run, and test_tensorrt's graph of the plain model is this one)."""
    options, opset = request.param
    model = random_model(0, **options)
    return model, onnx_for(model, opset=opset)


def _max_diff(a, b):
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def test_graph_inputs_outputs_and_only_batch_dynamic(exported):
    model, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(input_spec(model.cfg))
    assert [o.name for o in graph.output] == list(output_names(model.cfg))
    assert onnx.load(str(path)).opset_import[0].version >= 17
    for value, (shape, _) in zip(graph.input, input_spec(model.cfg).values()):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param  # symbolic batch
        assert [d.dim_value for d in dims[1:]] == list(shape), value.name


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_with_torch_on_random_inputs(exported, batch):
    model, path = exported
    x = example_inputs(model, batch=batch, seed=batch)
    x["tau"] = np.array([[0.3, 1.0, 2.0, 0.5]] * batch, np.float32)
    assert _max_diff(OnnxRuntimeBackend(path).run(x), TorchBackend(model).run(x)) <= 1e-4


def test_parity_with_torch_where_the_sweeps_match(exported):
    """Random points match nothing (the scan match's outputs all zero); two sweeps of a room do, so the
    match's graph and what takes it in (the pillars, its token, the direct path) are compared on a match."""
    model, path = exported
    if not model.cfg.model.lidar_motion:
        pytest.skip("this graph has no scan match")
    scan, _ = scan_inputs(room_sweep(0.04, 0.1), room_sweep(0.0, 0.0))
    x = example_inputs(model)
    x.update({k: v.numpy() for k, v in scan.items()})
    assert lidar_scan_match({k: torch.from_numpy(v) for k, v in x.items()}, model.cfg.lidar)[:, -1].all()  # matched
    assert _max_diff(OnnxRuntimeBackend(path).run(x), TorchBackend(model).run(x)) <= 1e-4


def test_tau_is_an_input_not_a_constant(exported):
    model, path = exported
    ort, ref = OnnxRuntimeBackend(path), TorchBackend(model)
    x = example_inputs(model)
    a = ort.run(x)
    x["tau"] = np.array([[1.0, 0.05, 1.0, 1.0]], np.float32)
    b = ort.run(x)
    assert np.abs(a["attention"] - b["attention"]).max() > 1e-3  # same graph, different τ, different attention
    assert np.abs(a["fused"] - b["fused"]).max() > 1e-3  # and a different fused state
    np.testing.assert_allclose(b["attention"], ref.run(x)["attention"], atol=1e-5)  # the τ torch sees too
    np.testing.assert_array_equal(a["trust"], b["trust"])  # τ steers the fusion, not the trust estimate


def test_all_masked_is_defined_in_onnx_too(exported):
    model, path = exported
    x = example_inputs(model)
    for k in ("camera_mask", "lidar_mask", "imu_mask"):
        x[k][:] = False
    out = OnnxRuntimeBackend(path).run(x)
    assert out["all_masked"].tolist() == [True]
    assert np.isfinite(out["fused"]).all() and not out["attention"].any() and not out["trust"].any()


@pytest.mark.parametrize("sensor,mask", [(0, "camera_mask"), (1, "lidar_mask"), (2, "imu_mask")])
def test_an_absent_sensor_has_exactly_zero_trust_and_weight_in_onnx(exported, sensor, mask):
    model, path = exported
    x = example_inputs(model, batch=2, seed=11)
    x[mask][1] = False  # the second sample lacks the sensor
    x["tau"] = np.array([[0.5, 1.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0]], np.float32)
    out = OnnxRuntimeBackend(path).run(x)
    assert out["trust"].shape == (2, 3) and out["trust"].dtype == np.float32
    assert out["trust"][1, sensor] == 0.0 and not out["attention"][1, sensor].any()
    present = np.ones((2, 3), bool)
    present[1, sensor] = False
    assert np.all((out["trust"][present] > 0) & (out["trust"][present] < 1))
    np.testing.assert_allclose(out["trust"], TorchBackend(model).run(x)["trust"], atol=1e-5)


def test_sensor_fusion_attention_is_the_sensor_weights_in_onnx(exported):
    model, path = exported
    if model.cfg.model.fusion != "sensor":
        pytest.skip("the token fusion's attention is a mass per head, not one weight per sensor")
    x = example_inputs(model, batch=2, seed=4)
    x["tau"] = np.array([[0.2, 1.0, 1.0, 1.0], [0.2, 1.0, 3.0, 1.0]], np.float32)
    out = OnnxRuntimeBackend(path).run(x)
    att = out["attention"]  # (B, 3, H): the same weight on every head, summing to 1 over the sensors
    np.testing.assert_array_equal(att, np.repeat(att[..., :1], att.shape[-1], axis=-1))
    np.testing.assert_allclose(att.sum(1), 1.0, atol=1e-6)
    # weights ∝ trust^(1 / (τ_global τ_sensor)), computed here from the graph's own trust output
    power = out["trust"].astype(np.float64) ** (1.0 / (x["tau"][:, :1] * x["tau"][:, 1:]))
    np.testing.assert_allclose(att[..., 0], power / power.sum(1, keepdims=True), atol=1e-5)


def test_only_tensorrt_supported_operators(exported):
    _, path = exported
    assert unsupported_ops(path) == []


def test_allow_list_is_the_published_table_not_a_catch_all():
    ops = tensorrt_supported_ops()
    assert {"MatMul", "Softmax", "LayerNormalization", "Where", "ReduceMax"} <= ops
    assert "Unique" not in ops and "StringNormalizer" not in ops  # ops TensorRT lacks stay out


def test_unsupported_op_is_reported(tmp_path):
    node = onnx.helper.make_node("Unique", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "u.onnx"))
    assert unsupported_ops(tmp_path / "u.onnx") == ["Unique"]


def test_corrupt_onnx_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot load"):
        OnnxRuntimeBackend(bad)


# --- a backend never changes the model it is given (benchmarks/gpu_latency.py builds them all from one) ------


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def _small_model() -> FusionModel:
    """A model mid-training: train mode, one parameter frozen; what a backend could change shows."""
    torch.manual_seed(0)
    model = FusionModel(FusionConfig.from_dict({"camera": {"height": 64, "width": 64}, "lidar": {"pillars": 32}}))
    next(model.parameters()).requires_grad_(False)
    return model.train()


def _snapshot(model: FusionModel):
    return (model.training, {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (t.device, t.dtype, t.detach().clone()) for n, t in model.state_dict().items()})


def _assert_unchanged(model: FusionModel, before) -> None:
    training, requires_grad, tensors = before
    assert model.training == training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for name, (device, dtype, value) in tensors.items():
        assert (now[name].device, now[name].dtype) == (device, dtype), name
        assert torch.equal(now[name], value), name


def test_no_backend_changes_the_model_it_is_given(onnx_cache, monkeypatch):
    """Every backend, from one model: those that run here, and those that refuse (no GPU, no TensorRT)."""
    from fusion_attn.backends import BACKENDS
    from fusion_attn.errors import BackendUnavailable
    from fusion_attn.pipeline import create_backend

    monkeypatch.setenv("FUSION_ATTN_CACHE", str(onnx_cache))
    model = _small_model()
    before = _snapshot(model)
    created = []
    for name in BACKENDS:
        try:
            created.append(create_backend(name, model).name)
        except BackendUnavailable:
            pass
        _assert_unchanged(model, before)
    assert {"torch", "onnxruntime"} <= set(created)


def test_a_torch_backend_on_another_device_leaves_the_model_exportable(onnx_cache, monkeypatch):
    """gpu_latency.py's order: torch on the GPU, then ONNX Runtime exported from the same model (which
    failed: the export found the weights on cuda:0). Without a GPU, "meta" is the other device."""
    from fusion_attn.pipeline import create_backend

    monkeypatch.setenv("FUSION_ATTN_CACHE", str(onnx_cache))
    model = _small_model()
    before = _snapshot(model)
    other = create_backend("torch", model, device="cuda:0" if torch.cuda.is_available() else "meta")
    assert next(other.model.parameters()).device.type != "cpu"
    ort = create_backend("onnxruntime", model)
    _assert_unchanged(model, before)
    x = example_inputs(model, batch=2, seed=3)
    assert _max_diff(ort.run(x), TorchBackend(model).run(x)) <= 1e-4


def test_a_graph_another_process_is_exporting_is_waited_for_not_exported_again(tmp_path):
    """pipeline._cached_export: while one process holds a graph's lock (exporting it), another that needs
    the graph waits, then takes the one written, without exporting it itself."""
    import fcntl
    import subprocess
    import sys

    model = random_model(5)
    made = onnx_for(model, tmp_path / "first", opset=TENSORRT8_OPSET)  # the graph the other process writes
    cache = tmp_path / "shared"
    cache.mkdir()
    script = ("import logging, sys; from graphs import random_model; from fusion_attn.pipeline import onnx_for; "
              "logging.basicConfig(level=logging.INFO); print('ready', flush=True); "
              f"onnx_for(random_model(5), {str(cache)!r}, opset={TENSORRT8_OPSET}); print('done', flush=True)")
    with open(cache / made.with_suffix(".lock").name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # this process is "exporting" it
        waiting = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert waiting.stdout.readline().strip() == "ready"
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=2)  # blocked on the lock
        (cache / made.name).write_bytes(made.read_bytes())
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and out.strip() == "done", err
    assert "exporting ONNX graph" not in err  # it took the written graph


# --- the embedded default needs no torch once the weights' graph is cached ---------------------------------


def test_onnxruntime_on_a_cached_graph_runs_without_importing_torch(onnx_cache, tmp_path, monkeypatch):
    """pipeline._cached_graph: a process that builds the ONNX Runtime pipeline of a checkpoint whose graph
    is cached reads the weights as numpy arrays and never imports torch, even with the node and replay
    modules loaded; it names the weights as weights_digest does from the torch model, and fuses to the
    bit as ONNX Runtime on that model's own export (onnx_for)."""
    import json
    import subprocess
    import sys

    from fusion_attn.checkpoint import save_checkpoint
    from fusion_attn.pipeline import weights_digest

    monkeypatch.setenv("FUSION_ATTN_CACHE", str(onnx_cache))  # the tests above exported this model's graph there
    model = _small_model().eval()
    checkpoint = save_checkpoint(model, tmp_path / "m.safetensors")
    own_graph = OnnxRuntimeBackend(onnx_for(model), threads=1)  # exported here if the tests above did not
    x = example_inputs(model, batch=2, seed=3)
    np.savez(tmp_path / "inputs.npz", **x)
    script = (
        "import json, sys; import numpy as np; import fusion_attn.node, fusion_attn.replay, fusion_attn.cli.replay; "
        "from fusion_attn.pipeline import FusionPipeline; "
        f"p = FusionPipeline.create({str(checkpoint)!r}, backend='onnxruntime', threads=1); "
        f"np.savez({str(tmp_path / 'outputs.npz')!r}, **p.backend.run(dict(np.load({str(tmp_path / 'inputs.npz')!r})))); "
        "print(json.dumps({'torch': 'torch' in sys.modules, 'digest': p.weights_digest, 'source': p.model_source}))")
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"torch": False, "digest": weights_digest(model), "source": str(checkpoint)}
    out, expected = np.load(tmp_path / "outputs.npz"), own_graph.run(x)
    for name in output_names(model.cfg):
        np.testing.assert_array_equal(out[name], expected[name], err_msg=name)


def test_a_checkpoint_numpy_cannot_take_is_loaded_the_torch_way_which_names_the_fault(tmp_path, monkeypatch):
    """A cached graph is only a shortcut: NaN weights are refused even where the cache holds a file named
    for their digest (not a graph: the shortcut taken would fail on it with another error), and the error
    is load_checkpoint's, naming the fault as it always did."""
    from safetensors.torch import save_file

    from fusion_attn.backends import OPSET
    from fusion_attn.pipeline import FusionPipeline, _graph_path, arrays_digest

    monkeypatch.setenv("FUSION_ATTN_CACHE", str(tmp_path / "cache"))
    model = _small_model().eval()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["queries"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={"format": "fusion_attn/1", "config": model.cfg.to_json()})
    named = _graph_path(arrays_digest(model.cfg, {k: v.numpy() for k, v in tensors.items()}), OPSET)
    named.parent.mkdir(parents=True)
    named.write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="queries hold NaN or inf"):
        FusionPipeline.create(tmp_path / "nan.safetensors", backend="onnxruntime")
