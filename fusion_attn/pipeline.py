"""The one object every front-end calls: a snapshot of sensor data in, a FusedState out.

    pipeline = FusionPipeline.create(checkpoint=None, backend="onnxruntime")
    state = pipeline.fuse(sync.snapshot(now_ns))
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS, Backend
from .checkpoint import load_checkpoint
from .config import FusionConfig
from .errors import CheckpointError, ConfigError
from .frames import FusedState, Modality
from .model import FusionModel
from .tokenize import SensorSnapshot, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).parent / "data" / "fusion_default.safetensors"


def validate_tau(tau) -> np.ndarray:
    """(global, camera, lidar, imu) -> float32 (4,); every value finite and > 0, or ConfigError."""
    tau = np.asarray(tau, np.float32).reshape(-1)
    if tau.shape != (4,):
        raise ConfigError(f"tau needs 4 values (global, camera, lidar, imu), got {tau.shape[0]}")
    if not np.all(np.isfinite(tau)) or np.any(tau <= 0):
        raise ConfigError(f"tau must be finite and > 0, got {tau.tolist()}")
    return tau


def load_model(checkpoint: str | Path | None = None) -> tuple[FusionModel, str]:
    """-> (model, description). None: the packaged default model, else seed-0 initial weights."""
    if checkpoint is None and DEFAULT_CHECKPOINT.is_file():
        checkpoint = DEFAULT_CHECKPOINT
    if checkpoint is not None:
        return load_checkpoint(checkpoint), str(checkpoint)
    log.warning("no checkpoint given and no packaged default: using UNTRAINED seed-0 weights")
    torch.manual_seed(0)
    return FusionModel(FusionConfig()).eval(), "untrained (seed 0)"


def weights_digest(model: FusionModel) -> str:
    h = hashlib.sha256(model.cfg.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def onnx_for(model: FusionModel, cache_dir: str | Path | None = None) -> Path:
    """The model's ONNX graph, exported once and cached under a digest of its weights and config."""
    from .backends.export import OPSET, export_onnx

    cache = Path(cache_dir or os.environ.get("FUSION_ATTN_CACHE", Path.home() / ".cache" / "fusion_attn"))
    path = cache / f"fusion-{weights_digest(model)}-opset{OPSET}.onnx"
    if not path.is_file():
        log.info("exporting ONNX graph to %s", path)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            export_onnx(model, tmp)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        except OSError as exc:
            raise CheckpointError(f"cannot write the ONNX cache {path} ({exc}); set FUSION_ATTN_CACHE to a "
                                  "writable folder") from exc
    return path


def create_backend(name: str, model: FusionModel, threads: int | None = None, device: str = "cpu",
                   onnx_path: str | Path | None = None) -> Backend:
    if name == "torch":
        from .backends.torch_backend import TorchBackend

        return TorchBackend(model, device=device, threads=threads)
    if name == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx_path or onnx_for(model), threads=threads)
    raise ConfigError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")


class FusionPipeline:
    def __init__(self, cfg: FusionConfig, backend: Backend, tau=(1.0, 1.0, 1.0, 1.0), frame_id: str = "base_link"):
        self.cfg = cfg
        self.backend = backend
        self.tokenizer = Tokenizer(cfg)
        self.tau = validate_tau(tau)
        self.frame_id = frame_id

    @classmethod
    def create(cls, checkpoint: str | Path | None = None, backend: str = "onnxruntime", threads: int | None = None,
               device: str = "cpu", tau=(1.0, 1.0, 1.0, 1.0), frame_id: str = "base_link") -> FusionPipeline:
        model, source = load_model(checkpoint)
        pipeline = cls(model.cfg, create_backend(backend, model, threads=threads, device=device), tau, frame_id)
        pipeline.model_source = source
        return pipeline

    def set_tau(self, tau) -> None:
        """Takes effect at the next fuse(); τ is a model input, nothing is re-exported."""
        self.tau = validate_tau(tau)

    def fuse(self, snap: SensorSnapshot) -> FusedState:
        return self.fuse_sweep(snap, self.tau[None])[0]

    def fuse_sweep(self, snap: SensorSnapshot, taus: np.ndarray) -> list[FusedState]:
        """One snapshot fused at each τ row of `taus` (K, 4): tokenized once, one batched model call."""
        taus = np.stack([validate_tau(t) for t in taus])
        t0 = time.perf_counter()
        inputs = self.tokenizer(snap, taus[0])
        t1 = time.perf_counter()
        batch = {k: np.broadcast_to(v, (len(taus), *v.shape)) for k, v in inputs.items()}
        batch["tau"] = taus
        out = self.backend.run({k: np.ascontiguousarray(v) for k, v in batch.items()})
        t2 = time.perf_counter()
        present = np.array([inputs["camera_mask"].any(), inputs["lidar_mask"].any(), inputs["imu_mask"].any()])
        ages = np.full(3, np.nan, np.float32)
        for m, key in ((Modality.CAMERA, "camera_age"), (Modality.LIDAR, "lidar_age"), (Modality.IMU, "imu_age")):
            if present[m]:
                ages[m] = inputs[key].min()
        timings = {"tokenize": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3}
        return [FusedState(stamp_ns=snap.stamp_ns, frame_id=self.frame_id, pooled=out["fused"][i],
                           latents=out["latents"][i], attention=out["attention"][i], present=present, ages_s=ages,
                           tau=taus[i].copy(), all_masked=bool(out["all_masked"][i]), timings_ms=timings)
                for i in range(len(taus))]
