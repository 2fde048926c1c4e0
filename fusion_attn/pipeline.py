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

from .backends import BACKENDS, FALLBACKS, Backend
from .backends.engine_cache import TensorRTOptions
from .checkpoint import load_checkpoint
from .config import FusionConfig
from .config import cache_dir as config_cache_dir
from .contract import fusion_terms
from .errors import BackendUnavailable, CheckpointError, ConfigError
from .frames import FusedState, Modality
from .model import FusionModel
from .params import TAU_NAMES, param
from .step import camera_key, step_inputs
from .sync import SyncConfig
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


def onnx_for(model: FusionModel, cache_dir: str | Path | None = None, opset: int | None = None) -> Path:
    """The model's ONNX graph, exported once and cached under a digest of its weights and config, the
    graph's revision and the opset."""
    from .backends.export import OPSET, export_onnx
    from .model import GRAPH_REVISION

    opset = opset or OPSET
    name = f"fusion-{weights_digest(model)}-g{GRAPH_REVISION}-opset{opset}.onnx"
    return _cached_export(Path(cache_dir or config_cache_dir()) / name, lambda path: export_onnx(model, path, opset))


def step_onnx_for(model: FusionModel, image_shape: tuple[int, ...], encoding: str,
                  cache_dir: str | Path | None = None) -> Path:
    """The whole step's ONNX graph (sensor arrays in: export.export_step_onnx) for one camera resolution
    and encoding, cached as onnx_for caches the model's."""
    from .backends.export import OPSET, export_step_onnx
    from .model import GRAPH_REVISION

    camera = "x".join(map(str, image_shape)) + f"-{encoding}"
    name = f"step-{weights_digest(model)}-g{GRAPH_REVISION}-{camera}-opset{OPSET}.onnx"
    return _cached_export(Path(cache_dir or config_cache_dir()) / name,
                          lambda path: export_step_onnx(model, tuple(image_shape), encoding, path))


def _cached_export(path: Path, export) -> Path:
    if not path.is_file():
        log.info("exporting ONNX graph to %s", path)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            export(tmp)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        except OSError as exc:
            raise CheckpointError(f"cannot write the ONNX cache {path} ({exc}); set FUSION_ATTN_CACHE to a "
                                  "writable folder") from exc
    return path


def create_backend(name: str, model: FusionModel, threads: int | None = None, device: str | None = None,
                   onnx_path: str | Path | None = None, tensorrt: TensorRTOptions | None = None) -> Backend:
    """The named backend for `model`; BackendUnavailable where a GPU backend cannot run here. `model` is
    left as it was (device, dtype, training flag): backends run copies or its exported graph, so one
    model can feed several."""
    if name == "torch":
        from .backends.torch_backend import TorchBackend

        return TorchBackend(model, device=device or "cpu", threads=threads)
    if name == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx_path or onnx_for(model), threads=threads)
    if name == "torch-cudagraph":
        from .backends.cuda_graph_backend import CudaGraphBackend

        return CudaGraphBackend(model, device=device or "cuda:0")
    if name == "tensorrt":
        try:
            from .backends import tensorrt_backend
        except (ImportError, OSError) as exc:  # OSError: the package is there, libnvinfer is not
            raise BackendUnavailable(f"TensorRT is not installed ({type(exc).__name__}: {exc})") from exc
        opts = tensorrt or TensorRTOptions()
        if opts.uses_step and onnx_path is None:
            return tensorrt_backend.TensorRTStepBackend(model, opts, device=device or "cuda:0")
        onnx = onnx_path or onnx_for(model, opset=tensorrt_backend.ONNX_OPSET)
        return tensorrt_backend.TensorRTBackend(onnx, opts, device=device or "cuda:0")
    raise ConfigError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")


class FusionPipeline:
    def __init__(self, cfg: FusionConfig, backend: Backend, tau=(1.0, 1.0, 1.0, 1.0), frame_id: str = "base_link"):
        self.cfg = cfg
        self.backend = backend
        self.model_source, self.backend_fallback = "", None
        self.weights_digest = ""  # of the model's weights and config (create() sets it): the policy contract's key
        self.tokenizer = Tokenizer(cfg)
        self.tau = validate_tau(tau)
        self.frame_id = frame_id

    @classmethod
    def create(cls, checkpoint: str | Path | None = None, backend: str = "onnxruntime", threads: int | None = None,
               device: str | None = None, tau=(1.0, 1.0, 1.0, 1.0), frame_id: str = "base_link",
               tensorrt: TensorRTOptions | None = None, fallback: str = "onnxruntime") -> FusionPipeline:
        """fallback: when `backend` cannot run here, "onnxruntime" (say why in one line, go on on the
        CPU) or "fail" (raise BackendUnavailable)."""
        if fallback not in FALLBACKS:
            raise ConfigError(f"backend fallback {fallback!r}: choose one of {list(FALLBACKS)}")
        model, source = load_model(checkpoint)
        try:
            engine, reason = create_backend(backend, model, threads, device, tensorrt=tensorrt), None
        except BackendUnavailable as exc:
            if fallback == "fail":
                raise
            reason = f"{backend} unavailable: {exc}"
            log.warning("%s; falling back to onnxruntime on the CPU (backend_fallback: fail stops instead)", reason)
            engine = create_backend("onnxruntime", model, threads)
        pipeline = cls(model.cfg, engine, tau, frame_id)
        pipeline.model_source, pipeline.backend_fallback = source, reason
        pipeline.weights_digest = weights_digest(model)
        return pipeline

    @classmethod
    def from_params(cls, params: dict) -> FusionPipeline:
        """From the node's parameters (config/fusion.yaml, flattened): what the node, replay and the
        CLI all build, so a parameter file means the same everywhere."""
        return cls.create(param(params, "checkpoint") or None, backend=param(params, "backend"),
                          threads=param(params, "threads"), device=param(params, "device") or None,
                          tau=[param(params, n) for n in TAU_NAMES], frame_id=param(params, "frame_id"),
                          tensorrt=TensorRTOptions.from_params(params), fallback=param(params, "backend_fallback"))

    def backend_info(self) -> dict[str, str]:
        """What runs the model, for diagnostics and summaries: backend, device, precision, fallback."""
        b = self.backend
        info = {"backend": b.name, "device": b.device, "precision": b.precision}
        if self.backend_fallback:
            info["backend_fallback"] = self.backend_fallback
        return info

    def fusion_terms(self, sync: SyncConfig, fusion_rate_hz: float, trigger: str = "timer") -> dict[str, str]:
        """This fusion's side of a policy contract (contract.fusion_terms): weights, τ now, sync settings, trigger."""
        return fusion_terms(self.weights_digest, self.tau, fusion_rate_hz, sync.max_age_s, sync.stale_after_periods,
                            trigger)

    def set_tau(self, tau) -> None:
        """Takes effect at the next fuse(); τ is a model input, nothing is re-exported."""
        self.tau = validate_tau(tau)

    def fuse(self, snap: SensorSnapshot) -> FusedState:
        return self.fuse_sweep(snap, self.tau[None])[0]

    def fuse_sweep(self, snap: SensorSnapshot, taus: np.ndarray) -> list[FusedState]:
        """One snapshot fused at each τ row of `taus` (K, 4): tokenized once, one batched model call (a
        whole-step backend tokenizes each row on the device: K copies of the snapshot)."""
        taus = np.stack([validate_tau(t) for t in taus])
        if getattr(self.backend, "whole_step", False):
            states = self._fuse_arrays(snap, taus)
            if states is not None:
                return states
            # None: the backend's one-graph engine cannot take this snapshot (it said why): tokens then
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
        return self._states(snap, taus, out, present, ages, {"tokenize": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3})

    def _fuse_arrays(self, snap: SensorSnapshot, taus: np.ndarray) -> list[FusedState] | None:
        """A GPU backend's whole step: the frames' arrays in, tokenized and fused on the device."""
        t0 = time.perf_counter()
        inputs = step_inputs([snap] * len(taus), taus, self.cfg)
        t1 = time.perf_counter()
        out = self.backend.run_step(inputs, camera_key(snap, self.cfg)[1])
        if out is None:
            return None
        t2 = time.perf_counter()
        present = out["present"][0]
        ages = np.where(present, inputs["frame_age"][0, [0, 2, 4]], np.nan).astype(np.float32)
        return self._states(snap, taus, out, present, ages, {"pack": (t1 - t0) * 1e3, "step": (t2 - t1) * 1e3})

    def _states(self, snap, taus, out, present, ages, timings) -> list[FusedState]:
        return [FusedState(stamp_ns=snap.stamp_ns, frame_id=self.frame_id, pooled=out["fused"][i],
                           latents=out["latents"][i], attention=out["attention"][i], present=present, ages_s=ages,
                           tau=taus[i].copy(), all_masked=bool(out["all_masked"][i]), timings_ms=timings,
                           trust=out["trust"][i])
                for i in range(len(taus))]
