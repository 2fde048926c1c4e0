"""Inference backends behind one interface: named numpy inputs in, named numpy outputs out.

torch (CPU/CUDA) runs the PyTorch model; onnxruntime (the CPU default) runs the exported graph;
tensorrt plugs in behind the same interface for embedded GPUs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

BACKENDS = ("torch", "onnxruntime")


class Backend(Protocol):
    name: str  # "torch", "onnxruntime", ...
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "fp32", "fp16"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batched named inputs (tokenize.input_spec + batch dim) -> named outputs (tokenize.OUTPUT_NAMES)."""
        ...
