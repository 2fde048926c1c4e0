"""PyTorch eager backend (CPU or CUDA). It takes the host tokenizers' tokens; `whole_step=True` makes it
run the whole step instead (step.FusionStep: the tokenizers too, on its device). Eager, that is slower
than the host tokenizers even on a GPU (docs/BENCHMARKS.md): the whole step pays on torch-cudagraph."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..config import FusionConfig
from ..model import FusionModel
from ..step import FusionStep, camera_key, step_inputs, step_output_names
from ..tokenize import SensorSnapshot, output_names


class TorchBackend:
    name = "torch"
    precision = "fp32"

    def __init__(self, model: FusionModel, device: str = "cpu", threads: int | None = None, whole_step: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        # its own copy: the caller's model may feed other backends (the ONNX export runs on the CPU) and
        # must keep its device, dtype and training flag
        self.model = copy.deepcopy(model).eval().to(device)
        self.whole_step = whole_step  # FusionPipeline hands it sensor arrays (run_step), not tokens
        self.steps: dict[tuple, FusionStep] = {}  # (image shape, encoding) -> its step module

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        return {name: out.cpu().numpy() for name, out in zip(output_names(self.model.cfg), self.model(**args))}

    @torch.inference_mode()
    def run_step(self, snaps: list[SensorSnapshot], taus: np.ndarray, cfg: FusionConfig) -> dict[str, np.ndarray]:
        """Snapshots of one step.step_key and their τ rows -> step_output_names, tokenized and fused on this
        backend's device."""
        inputs = step_inputs(snaps, taus, cfg)
        encoding = camera_key(snaps[0], cfg)[1]
        key = (inputs["image"].shape[1:], encoding)
        if key not in self.steps:
            self.steps[key] = FusionStep(self.model, key[0], encoding).to(self.device).eval()
        args = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        return {name: out.cpu().numpy() for name, out in zip(step_output_names(cfg), self.steps[key](**args))}
