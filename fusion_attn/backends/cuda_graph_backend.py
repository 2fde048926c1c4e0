"""PyTorch on CUDA with CUDA graphs: kernels captured once per input shape, then replayed.

At batch 1 the fusion model is a few dozen small kernels, so eager PyTorch spends most of its time
launching them; a replayed graph launches them all at once. The GPU path that runs without TensorRT.

Two kinds of graph: the model alone (`run`: tokens in), and the whole step (`run_step`: adapted sensor
arrays in, tokenized on the GPU; step.FusionStep), one graph per camera resolution and per point and
IMU bucket (step.Buckets). Inputs go through pinned host buffers, so their copies to the GPU and the
outputs' copies back are asynchronous DMA on the graph's stream.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..errors import BackendUnavailable
from ..model import FusionModel
from ..step import STEP_OUTPUTS, FusionStep
from ..tokenize import OUTPUT_NAMES


class _Captured:
    """One captured graph with its static device inputs/outputs and their pinned host mirrors."""

    def __init__(self, module: torch.nn.Module, inputs: dict[str, np.ndarray], device: torch.device, warmup: int):
        self.host_in = {k: torch.from_numpy(np.ascontiguousarray(v)).pin_memory() for k, v in inputs.items()}
        self.device_in = {k: v.to(device) for k, v in self.host_in.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                module(**self.device_in)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.device_out = module(**self.device_in)
        self.host_out = [torch.empty_like(t, device="cpu").pin_memory() for t in self.device_out]

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, value in inputs.items():
            np.copyto(self.host_in[name].numpy(), value)
            self.device_in[name].copy_(self.host_in[name], non_blocking=True)
        self.graph.replay()
        for host, out in zip(self.host_out, self.device_out):
            host.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return [h.numpy().copy() for h in self.host_out]


class CudaGraphBackend:
    name = "torch-cudagraph"
    precision = "fp32"
    whole_step = True  # the pipeline hands it adapted sensor arrays (run_step), not tokens

    def __init__(self, model: FusionModel, device: str = "cuda:0", warmup: int = 3):
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA GPU is visible to torch")
        self.torch_device = torch.device(device)
        self.device = f"{self.torch_device} ({torch.cuda.get_device_name(self.torch_device)})"
        torch.cuda.set_device(self.torch_device)
        self.model = copy.deepcopy(model).eval().to(self.torch_device)  # the caller's model stays as it is
        self.warmup = warmup
        self.steps: dict[tuple, FusionStep] = {}  # (image shape, encoding) -> its step module
        self.graphs: dict[tuple, _Captured] = {}  # (module key, input shapes) -> its graph

    @torch.no_grad()
    def _replay(self, module: torch.nn.Module, key: tuple, inputs: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
        torch.cuda.set_device(self.torch_device)  # graphs capture and replay on the current device
        key = (key, tuple((k, v.shape, v.dtype.str) for k, v in inputs.items()))
        if key not in self.graphs:
            self.graphs[key] = _Captured(module, inputs, self.torch_device, self.warmup)
        return dict(zip(names, self.graphs[key](inputs)))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._replay(self.model, ("model",), inputs, OUTPUT_NAMES)

    def run_step(self, inputs: dict[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
        """step.step_inputs' arrays -> STEP_OUTPUTS, tokenized and fused in one graph."""
        key = (inputs["image"].shape[1:], encoding)
        if key not in self.steps:
            self.steps[key] = FusionStep(self.model, key[0], encoding).to(self.torch_device).eval()
        return self._replay(self.steps[key], key, inputs, STEP_OUTPUTS)
