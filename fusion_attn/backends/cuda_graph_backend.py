"""PyTorch on CUDA with CUDA graphs: the model's kernels captured once per input shape, then replayed.

At batch 1 the fusion model is a few dozen small kernels, so eager PyTorch spends most of its time
launching them; a replayed graph launches them all at once. The GPU path that runs without TensorRT.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..errors import BackendUnavailable
from ..model import FusionModel
from ..tokenize import OUTPUT_NAMES


class CudaGraphBackend:
    name = "torch-cudagraph"
    precision = "fp32"

    def __init__(self, model: FusionModel, device: str = "cuda:0", warmup: int = 3):
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA GPU is visible to torch")
        self.torch_device = torch.device(device)
        self.device = f"{self.torch_device} ({torch.cuda.get_device_name(self.torch_device)})"
        torch.cuda.set_device(self.torch_device)
        self.model = copy.deepcopy(model).eval().to(self.torch_device)  # the caller's model stays as it is
        self.warmup = warmup
        # input shapes -> (graph, static inputs, static outputs); replays read and write these tensors
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    @torch.no_grad()
    def _capture(self, inputs: dict[str, np.ndarray]):
        torch.cuda.set_device(self.torch_device)  # graphs capture and replay on the current device
        static = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.torch_device) for k, v in inputs.items()}
        side = torch.cuda.Stream(self.torch_device)
        side.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(self.warmup):
                self.model(**static)
        torch.cuda.current_stream(self.torch_device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.model(**static)
        return graph, static, outputs

    @torch.no_grad()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = tuple((k, v.shape) for k, v in inputs.items())
        if shapes not in self.graphs:
            self.graphs[shapes] = self._capture(inputs)
        graph, static, outputs = self.graphs[shapes]
        for name, value in inputs.items():
            static[name].copy_(torch.from_numpy(np.ascontiguousarray(value)), non_blocking=True)
        graph.replay()
        return {name: out.cpu().numpy() for name, out in zip(OUTPUT_NAMES, outputs)}
