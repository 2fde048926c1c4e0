"""Inference backends behind one interface: named numpy inputs in, named numpy outputs out.

    onnxruntime       the exported graph on the CPU: the embedded default
    torch             the PyTorch model, eager, on the CPU or a GPU
    torch-cudagraph   the PyTorch model on a GPU, replayed as CUDA graphs
    tensorrt          a TensorRT engine built from the exported graph (Jetson, x86 GPUs)

A GPU backend that cannot run here (no TensorRT, no GPU, an engine that cannot be built) raises
BackendUnavailable; FusionPipeline then falls back to onnxruntime, or fails if so configured.
Optional members a backend may have: `whole_step` and `run_step` (snapshots in, tokenized on the
backend's device: step.py), and
`max_batch` (the most rows one call takes; FusionPipeline.fuse_many splits its batches to it).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

BACKENDS = ("onnxruntime", "torch", "torch-cudagraph", "tensorrt")
FALLBACKS = ("onnxruntime", "fail")  # what to do when the configured backend is unavailable
OPSET = 18  # what torch.export-based export emits natively; TensorRT 10.x parses it
TENSORRT8_OPSET = 17  # TensorRT 8.6 (JetPack 5) parses up to opset 17
# The exported graph's revision: part of the ONNX cache's file name (pipeline.onnx_for), so a cached
# export of the same weights is rebuilt when the code that traces it (model.py, step.py) changes. Bump it
# with any change to the graph, even one that keeps every output (as 2 did: broadcast Where -> Add of a
# log mask; 3: the step graph's rank scan in blocks). Here, not in model.py: naming a cached graph needs no torch.
GRAPH_REVISION = 3


class Backend(Protocol):
    name: str  # one of BACKENDS
    device: str  # "cpu", "cuda:0 (Orin)", ...
    precision: str  # "fp32", or what a TensorRT engine reports, e.g. "fp16 (40 layers) + fp32 (6)"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batched named inputs (tokenize.input_spec + batch dim) -> named outputs (tokenize.output_spec)."""
        ...
