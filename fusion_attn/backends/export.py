"""ONNX export of the fusion model, and the check that TensorRT's ONNX parser can take the graph.

Only the batch dimension is dynamic; every other shape is fixed by the token budgets.
"""

from __future__ import annotations

import copy
import logging
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from ..frames import CAMERA_ENCODINGS
from ..model import FusionModel
from ..step import STEP_INPUTS, FusionStep, step_inputs, step_output_names
from ..tokenize import SensorSnapshot, input_spec, output_names
from . import OPSET

MAX_BATCH = 64
# Nodes of the step graph's tokenizers: cell indices and point offsets need FP32 (an FP16 engine keeps them so)
TOKENIZER_NODE_PREFIX = "tokenize/"


def example_inputs(model: FusionModel, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the right names, shapes and dtypes (masks mostly True, τ = 1)."""
    rng = np.random.default_rng(seed)
    x = {}
    for name, (shape, dtype) in input_spec(model.cfg).items():
        full = (batch, *shape)
        x[name] = rng.random(full) > 0.2 if dtype == np.bool_ else rng.normal(size=full).astype(np.float32)
    x["tau"] = np.ones((batch, 1 + len(model.cfg.sensors)), np.float32)
    return x


def export_onnx(model: FusionModel, path: str | Path, opset: int = OPSET) -> Path:
    """Export with named inputs/outputs (see tokenize.input_spec / output_names), weights embedded.

    Opset 18 and later: the torch.export-based exporter. Opset 17 (for TensorRT 8.6): the TorchScript
    exporter, because converting the opset-18 graph down fails on the Reduce ops (axes moved from
    attribute to input in 18).
    """
    import onnx  # here, not at the top: a start on a cached export needs none of its 1.8 s of imports

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a CPU copy in eval mode: the example inputs are CPU tensors, the caller's model may be on a GPU (a
    # torch backend's), and exporting must not change it (training flag, device)
    model = copy.deepcopy(model).cpu().eval()
    # by name after τ: a model with a second IMU and no odometry has no odometry_* inputs to place
    example = {n: torch.from_numpy(v) for n, v in example_inputs(model, batch=2).items()}
    names, outputs = list(example), list(output_names(model.cfg))
    first = names.index("tau") + 1
    args, kwargs = tuple(example[n] for n in names[:first]), {n: example[n] for n in names[first:]}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opset >= 18:
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            program = torch.onnx.export(model, args, kwargs=kwargs, input_names=names, output_names=outputs,
                                        opset_version=opset, dynamo=True, external_data=False, verbose=False,
                                        dynamic_shapes={n: {0: batch} for n in names})
            program.save(str(path))
        else:
            torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=names, output_names=outputs,
                              opset_version=opset, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in (*names, *outputs)})
            # this exporter leaves the output shapes symbolic; infer them, so the graph states its I/O
            onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_step_onnx(model: FusionModel, image_shape: tuple[int, int, int], encoding: str, path: str | Path,
                     opset: int = OPSET) -> Path:
    """Export the whole step (step.FusionStep: sensor arrays -> tokens -> fused state) for one camera
    resolution and encoding, as one graph for one TensorRT engine. Dynamic: the batch, the point counts
    (`points`, `points_prev`) and the IMU samples (`imu_t`, `imu_values`); opset 18 and later only."""
    import onnx  # here, not at the top: a start on a cached export needs none of its 1.8 s of imports

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    step = FusionStep(model, image_shape, encoding).eval()
    example = step_inputs([SensorSnapshot(0)] * 2, np.ones((2, 4), np.float32), model.cfg)
    example["image"] = example["image_prev"] = np.zeros((2, *image_shape), CAMERA_ENCODINGS[encoding])
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    points, points_prev = torch.export.Dim("points", min=2, max=1 << 21), torch.export.Dim("points_prev", min=2, max=1 << 21)
    imu = torch.export.Dim("imu", min=2, max=1 << 14)
    dynamic = {name: {0: batch} for name in STEP_INPUTS}
    dynamic.update(points={0: batch, 1: points}, points_prev={0: batch, 1: points_prev},
                   imu_t={0: batch, 1: imu}, imu_values={0: batch, 1: imu})
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(step, tuple(torch.from_numpy(example[n]) for n in STEP_INPUTS),
                                    input_names=list(STEP_INPUTS), output_names=list(step_output_names(model.cfg)),
                                    opset_version=opset, dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes=dynamic)
    program.save(str(path))
    graph = onnx.load(str(path))
    for node in graph.graph.node:  # name the tokenizers' nodes, so that an engine can keep them in FP32
        trace = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.stack_trace"), "")
        # FusionStep's calls of its tokenizers (each a line of its own: a trace holds its callers' lines)
        if "self.frame_tokens(" in trace or "self.tokens(" in trace:
            node.name = TOKENIZER_NODE_PREFIX + node.name
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def tensorrt_supported_ops() -> set[str]:
    """ONNX op types TensorRT's parser supports (10.x), from the allow-list kept beside this module."""
    text = files(__package__).joinpath("tensorrt_onnx_ops.txt").read_text()
    return {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}


def unsupported_ops(onnx_path: str | Path) -> list[str]:
    """Op types in the graph (any domain but the default counts as unsupported) not on the allow-list."""
    import onnx  # here, not at the top: a start on a cached export needs none of its 1.8 s of imports

    graph = onnx.load(str(onnx_path)).graph
    allowed = tensorrt_supported_ops()
    used = {(n.domain or "ai.onnx", n.op_type) for n in graph.node}
    return sorted(f"{d}:{op}" if d != "ai.onnx" else op for d, op in used if d != "ai.onnx" or op not in allowed)
