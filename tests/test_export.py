"""ONNX export: named inputs, dynamic batch only, parity with torch, TensorRT-parsable operators."""

import numpy as np
import onnx
import pytest
import torch

from fusion_attn.backends.export import example_inputs, export_onnx, tensorrt_supported_ops, unsupported_ops
from fusion_attn.backends.onnxruntime_backend import OnnxRuntimeBackend
from fusion_attn.backends.torch_backend import TorchBackend
from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.errors import CheckpointError
from fusion_attn.model import FusionModel
from fusion_attn.tokenize import OUTPUT_NAMES, input_spec


@pytest.fixture(scope="module", params=[{}, {"qk_norm": True, "learned_head_temperature": True}], ids=["plain", "qknorm+headtau"])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(model=ModelConfig(**request.param))).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "fusion.onnx")
    return model, path


def _max_diff(a, b):
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def test_graph_inputs_outputs_and_only_batch_dynamic(exported):
    model, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(input_spec(model.cfg))
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
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


def test_tau_is_an_input_not_a_constant(exported):
    model, path = exported
    ort = OnnxRuntimeBackend(path)
    x = example_inputs(model)
    a = ort.run(x)["attention"]
    x["tau"] = np.array([[1.0, 0.05, 1.0, 1.0]], np.float32)
    b = ort.run(x)["attention"]
    assert np.abs(a - b).max() > 1e-3  # same graph, different τ, different attention


def test_all_masked_is_defined_in_onnx_too(exported):
    model, path = exported
    x = example_inputs(model)
    for k in ("camera_mask", "lidar_mask", "imu_mask"):
        x[k][:] = False
    out = OnnxRuntimeBackend(path).run(x)
    assert out["all_masked"].tolist() == [True]
    assert np.isfinite(out["fused"]).all() and not out["attention"].any()


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
