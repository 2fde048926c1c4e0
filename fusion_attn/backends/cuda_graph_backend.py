"""PyTorch on CUDA with CUDA graphs: kernels captured once per input shape, then replayed.

At batch 1 the fusion is a few hundred small kernels, so eager PyTorch spends most of its time
launching them; a replayed graph launches them all at once. The GPU path that runs without TensorRT.

The model alone (`run`: tokens in) is one graph per input shape. The whole step (`run_step`:
snapshots in) is step.FusionStep in three kinds of graph: a camera frame's patches (one graph per
resolution and encoding), a lidar sweep's pillars (one per point bucket), and the fusion of a step's
frame tokens with its IMU window (one per IMU bucket and rows per call). A frame is tokenized once
and its tokens stay on the GPU while steps use it, as their newest and then as their previous frame
(tokenize.FrameTokens, which the host path keeps its tokens in too). A call of many rows (replay
--batch) replays the batch-1 fusion once per row inside one graph: the same kernels on the same
shapes as one row at a time, so the same bits, in one launch. Host arrays reach the GPU through
pinned buffers (asynchronous copies on the graph's stream). On the CPU (tests) the same code calls
its modules eagerly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from ..config import FusionConfig
from ..errors import BackendUnavailable
from ..frames import CameraFrame, LidarFrame
from ..model import FusionModel
from ..step import (
    Buckets,
    CameraTokenizer,
    FusionStep,
    lidar_tokens,
    pack_imu,
    step_frames,
    step_output_names,
)
from ..tokenize import FrameTokens, SensorSnapshot, output_names

FRAME_INPUTS = {"camera": ("camera", "camera_prev"),  # _Fuse's inputs for a frame's tokens, newest and previous
                "lidar": ("lidar", "lidar_mask", "lidar_prev", "lidar_prev_mask")}


class _Graph:
    """`copies` calls of `module`, each on its own static inputs, captured in one CUDA graph (called
    eagerly on the CPU). Calling it -> the outputs, each concatenated over the copies."""

    def __init__(self, module: torch.nn.Module, example: dict[str, torch.Tensor], device: torch.device,
                 warmup: int, copies: int = 1):
        self.module, self.cuda = module, device.type == "cuda"
        self.inputs = [{k: v.to(device, copy=True) for k, v in example.items()} for _ in range(copies)]
        self._host: list[dict[str, torch.Tensor]] = [{} for _ in range(copies)]  # pinned, made at first use
        self._read = [torch.cuda.Event() if self.cuda else None for _ in range(copies)]
        self.graph = None
        if self.cuda:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires; the
                for _ in range(warmup):  # copies run the same kernels, one warms them all
                    self.module(**self.inputs[0])
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._call()
            self._out = [torch.empty_like(t, device="cpu").pin_memory() for t in self.outputs]

    def _call(self) -> list[torch.Tensor]:
        outs = [self.module(**x) for x in self.inputs]
        return [torch.cat(o) if len(o) > 1 else o[0] for o in zip(*outs)]

    def upload(self, copy: int, fills: dict[str, Callable[[np.ndarray], None]]) -> None:
        """Each fill(array) writes one static input of one copy on the host; they then go to the device.
        Their pinned buffers are not written again before the GPU has read them."""
        if not self.cuda:
            for name, fill in fills.items():
                fill(self.inputs[copy][name].numpy())
            return
        self._read[copy].synchronize()
        for name, fill in fills.items():
            host = self._host[copy].get(name)
            if host is None:
                host = self._host[copy][name] = torch.empty_like(self.inputs[copy][name], device="cpu").pin_memory()
            fill(host.numpy())
            self.inputs[copy][name].copy_(host, non_blocking=True)
        self._read[copy].record()

    def __call__(self) -> list[torch.Tensor]:
        if self.graph is None:
            self.outputs = self._call()
        else:
            self.graph.replay()
        return self.outputs

    def download(self) -> list[np.ndarray]:
        """The last call's outputs on the host."""
        if not self.cuda:
            return [t.numpy().copy() for t in self.outputs]
        for host, out in zip(self._out, self.outputs):
            host.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return [h.numpy().copy() for h in self._out]


class _Camera(torch.nn.Module):
    def __init__(self, tokenizer: CameraTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, image):  # (1, H, W, C) -> ((1, tokens, features),)
        return (self.tokenizer(image),)


class _Lidar(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, points, count):  # (1, N, 4), (1,) -> (1, K, P, F) tokens, (1, K, P) mask
        return lidar_tokens(points, count, self.cfg)


class _Fuse(torch.nn.Module):
    """FusionStep.fuse on one row whose small inputs come packed in one float32 array (one copy to the
    GPU): imu_t (T), imu_values (6T), imu_count, frame_present (4), frame_age (5), tau (4)."""

    def __init__(self, step: FusionStep):
        super().__init__()
        self.step = step

    def forward(self, camera, camera_prev, lidar, lidar_mask, lidar_prev, lidar_prev_mask, packed):
        T = (packed.shape[1] - 14) // 7
        # copies, not views: every row's kernels then read memory laid out as one row alone's does
        imu_t, values, rest = packed[:, :T].clone(), packed[:, T:7 * T].reshape(1, T, 6).clone(), packed[:, 7 * T:]
        return self.step.fuse(camera, camera_prev, lidar, lidar_mask, lidar_prev, lidar_prev_mask, imu_t, values,
                              rest[:, 0].long(), rest[:, 1:5] > 0.5, rest[:, 5:10].clone(), rest[:, 10:14].clone())


def _pack_row(row: np.ndarray, snap: SensorSnapshot, present: np.ndarray, age: np.ndarray, tau: np.ndarray) -> None:
    T = (len(row) - 14) // 7
    row[:] = 0
    if snap.imu is not None and len(snap.imu):
        row[7 * T] = pack_imu(snap.imu, row[:T], row[T:7 * T].reshape(T, 6))
    row[7 * T + 1:] = np.concatenate([present, age, tau])


class CudaGraphBackend:
    name = "torch-cudagraph"
    precision = "fp32"
    whole_step = True  # the pipeline hands it snapshots (run_step), not tokens

    def __init__(self, model: FusionModel, device: str = "cuda:0", warmup: int = 3, compile: bool = False):
        """compile: each module through torch.compile (inductor: fewer, fused kernels) before capture."""
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable("no CUDA GPU is visible to torch")
            torch.cuda.set_device(self.torch_device)
            self.device = f"{self.torch_device} ({torch.cuda.get_device_name(self.torch_device)})"
        else:
            self.device = str(self.torch_device)
        self.model = copy.deepcopy(model).eval().to(self.torch_device)  # the caller's model stays as it is
        self.warmup, self.compile = warmup, compile
        if compile:  # every point bucket, IMU bucket x rows and camera is a recompile of one module's code
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
        self.graphs: dict[tuple, _Graph] = {}
        self.frames = FrameTokens(self._tokenize)

    @torch.no_grad()
    def _graph(self, key: tuple, module: Callable[[], torch.nn.Module], example: Callable[[], dict[str, torch.Tensor]],
               copies: int = 1) -> _Graph:
        """The graph of `key`, captured at its first use from module() on example() (host tensors)."""
        if self.torch_device.type == "cuda":
            torch.cuda.set_device(self.torch_device)  # graphs capture and replay on the current device
        if key not in self.graphs:
            module = module().to(self.torch_device).eval()
            if self.compile:
                module = torch.compile(module, fullgraph=True, dynamic=False)
            self.graphs[key] = _Graph(module, example(), self.torch_device, self.warmup, copies)
        return self.graphs[key]

    @torch.no_grad()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tokens in (tokenize.input_spec, batched) -> tokenize.output_names."""
        key = ("model", tuple((k, v.shape, v.dtype.str) for k, v in inputs.items()))
        graph = self._graph(key, lambda: self.model, lambda: {k: torch.from_numpy(np.ascontiguousarray(v))
                                                               for k, v in inputs.items()})
        graph.upload(0, {name: lambda host, value=value: np.copyto(host, value) for name, value in inputs.items()})
        graph()
        return dict(zip(output_names(self.model.cfg), graph.download()))

    @torch.no_grad()
    def _tokenize(self, frame: CameraFrame | LidarFrame) -> tuple[torch.Tensor, ...]:
        """One frame's tokens on the device (FrameTokens keeps them)."""
        if isinstance(frame, CameraFrame):
            image = frame.image
            key = ("camera", image.shape, frame.encoding, image.dtype.str)
            tokenizer = lambda: _Camera(CameraTokenizer(self.model.cfg.camera, *image.shape[:2], frame.encoding))
            graph = self._graph(key, tokenizer, lambda: {"image": torch.from_numpy(np.zeros((1, *image.shape), image.dtype))})
            graph.upload(0, {"image": lambda host: np.copyto(host[0], image)})
        else:
            n = Buckets.fit(max(len(frame), 1), Buckets().points)
            graph = self._graph(("lidar", n), lambda: _Lidar(self.model.cfg.lidar),
                                lambda: {"points": torch.zeros(1, n, 4), "count": torch.zeros(1, dtype=torch.long)})
            # the padding is never read: points beyond `count` are masked before any use
            graph.upload(0, {"points": lambda host: np.copyto(host[0, : len(frame)], frame.points),
                             "count": lambda host: host.fill(len(frame))})
        return tuple(t.clone() for t in graph())  # the graph's outputs are overwritten by its next replay

    def run_step(self, snaps: list[SensorSnapshot], taus: np.ndarray, cfg: FusionConfig) -> dict[str, np.ndarray]:
        """Snapshots of one IMU bucket and their τ rows -> step_output_names: each new frame tokenized, then
        every row fused, on the GPU; in graphs of a power of two of rows (a few graphs for any batch)."""
        outs, start = [], 0
        while start < len(snaps):
            rows = 1 << ((len(snaps) - start).bit_length() - 1)
            outs.append(self._fuse_rows(snaps[start:start + rows], taus[start:start + rows], cfg))
            start += rows
        return {name: np.concatenate([out[name] for out in outs]) for name in step_output_names(cfg)}

    @torch.no_grad()
    def _fuse_rows(self, snaps: list[SensorSnapshot], taus: np.ndarray, cfg: FusionConfig) -> dict[str, np.ndarray]:
        T = Buckets.fit(max([len(s.imu) for s in snaps if s.imu is not None] + [1]), Buckets().imu)
        c, li = cfg.camera, cfg.lidar

        def example():
            camera = torch.zeros(1, c.tokens, c.features)
            lidar = torch.zeros(1, li.tokens, li.points_per_pillar, li.features)
            mask = torch.zeros(1, li.tokens, li.points_per_pillar, dtype=torch.bool)
            return {"camera": camera, "camera_prev": camera, "lidar": lidar, "lidar_mask": mask, "lidar_prev": lidar,
                    "lidar_prev_mask": mask, "packed": torch.zeros(1, 7 * T + 14)}

        # FusionStep's fuse takes no camera size: any camera's step module fuses
        fusion = lambda: _Fuse(FusionStep(self.model, (c.height, c.width, 3), "rgb8"))
        graph = self._graph(("fuse", T, len(snaps)), fusion, example, copies=len(snaps))
        for row, (snap, tau) in enumerate(zip(snaps, taus)):
            frames, present, age = step_frames(snap, cfg)
            for sensor, (frame, prev) in (("camera", frames[:2]), ("lidar", frames[2:])):
                if frame is not None:  # else both masked: a previous frame alone is no evidence
                    tokens = [t for pair in self.frames.pair(frame, prev) if pair is not None for t in pair]
                    for name, t in zip(FRAME_INPUTS[sensor], tokens):
                        graph.inputs[row][name].copy_(t, non_blocking=True)
            graph.upload(row, {"packed": lambda host, s=snap, p=present, a=age, t=tau: _pack_row(host[0], s, p, a, t)})
        graph()
        return dict(zip(step_output_names(cfg), graph.download()))
