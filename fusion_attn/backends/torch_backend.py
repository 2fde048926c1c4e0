"""PyTorch eager backend (CPU or CUDA)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..model import FusionModel
from ..tokenize import OUTPUT_NAMES


class TorchBackend:
    name = "torch"
    precision = "fp32"

    def __init__(self, model: FusionModel, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        # its own copy: the caller's model may feed other backends (the ONNX export runs on the CPU) and
        # must keep its device, dtype and training flag
        self.model = copy.deepcopy(model).eval().to(device)

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        return {name: out.cpu().numpy() for name, out in zip(OUTPUT_NAMES, self.model(**args))}
