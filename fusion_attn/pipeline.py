"""The one object every front-end calls: a snapshot of sensor data in, a FusedState out.

    pipeline = FusionPipeline.create(checkpoint=None, backend="onnxruntime")
    state = pipeline.fuse(sync.snapshot(now_ns))

On the embedded default (ONNX Runtime) with the weights' graph in the export cache, nothing here
imports torch: the checkpoint is read as numpy arrays, its digest names the cached graph, and ONNX
Runtime runs it (a node starts 3.6 s sooner in 200 MB less: docs/BENCHMARKS.md). Every other
backend, and a graph not yet exported, builds the torch model.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .backends import BACKENDS, FALLBACKS, GRAPH_REVISION, OPSET, Backend
from .backends.engine_cache import TensorRTOptions
from .checkpoint import load_checkpoint, read_checkpoint
from .config import FusionConfig
from .config import cache_dir as config_cache_dir
from .contract import fusion_terms
from .errors import BackendUnavailable, CheckpointError, ConfigError
from .files import written_aside
from .frames import MODALITIES, CameraFrame, FusedState, LidarFrame, Modality
from .params import TAU_NAMES, param
from .sync import SyncConfig
from .tokenize import SensorSnapshot, Tokenizer

if TYPE_CHECKING:
    from .model import FusionModel

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).parent / "data" / "fusion_default.safetensors"


ALL_ONES_TAU = (1.0,) * (1 + len(MODALITIES))  # every sensor's τ as the node holds them; a model reads its own


def validate_tau(tau, sensors: tuple[Modality, ...] = FusionConfig().sensors) -> np.ndarray:
    """(global, then one per sensor) -> float32 (1 + S,) for a model's S sensors (FusionConfig.sensors);
    every value finite and > 0, or ConfigError. The node's parameters hold a τ for every sensor the
    package knows (global, then MODALITIES' order): from those the model's are picked, the rest ignored."""
    tau = np.asarray(tau, np.float32).reshape(-1)
    if tau.shape[0] == 1 + len(MODALITIES) != 1 + len(sensors):
        tau = tau[[0, *(1 + int(m) for m in sensors)]]
    if tau.shape[0] != 1 + len(sensors):
        names = ", ".join(("global", *(MODALITIES[m] for m in sensors)))
        raise ConfigError(f"tau needs {1 + len(sensors)} values ({names}), got {tau.shape[0]}")
    if not np.all(np.isfinite(tau)) or np.any(tau <= 0):
        raise ConfigError(f"tau must be finite and > 0, got {tau.tolist()}")
    return tau


def _checkpoint_path(checkpoint: str | Path | None) -> str | Path | None:
    """The checkpoint to load: the one given, else the packaged default, else None (untrained weights)."""
    if checkpoint is None and DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    return checkpoint


def load_model(checkpoint: str | Path | None = None) -> tuple[FusionModel, str]:
    """-> (model, description). None: the packaged default model, else seed-0 initial weights."""
    import torch

    from .model import FusionModel

    if (checkpoint := _checkpoint_path(checkpoint)) is not None:
        return load_checkpoint(checkpoint), str(checkpoint)
    log.warning("no checkpoint given and no packaged default: using UNTRAINED seed-0 weights")
    torch.manual_seed(0)
    return FusionModel(FusionConfig()).eval(), "untrained (seed 0)"


def arrays_digest(cfg: FusionConfig, arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of a model's config and weights (its state dict as numpy arrays): the ONNX cache's and
    the policy contract's key."""
    h = hashlib.sha256(cfg.to_json().encode())
    for name, array in sorted(arrays.items()):
        h.update(name.encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def weights_digest(model: FusionModel) -> str:
    return arrays_digest(model.cfg, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def _graph_path(digest: str, opset: int, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or config_cache_dir()) / f"fusion-{digest}-g{GRAPH_REVISION}-opset{opset}.onnx"


def onnx_for(model: FusionModel, cache_dir: str | Path | None = None, opset: int | None = None) -> Path:
    """The model's ONNX graph, exported once and cached under a digest of its weights and config, the
    graph's revision and the opset."""
    from .backends.export import export_onnx

    opset = opset or OPSET
    return _cached_export(_graph_path(weights_digest(model), opset, cache_dir), lambda path: export_onnx(model, path, opset))


def _cached_graph(checkpoint: str | Path | None) -> tuple[FusionConfig, str, str, Path] | None:
    """(config, weights digest, description, cached ONNX graph) of a checkpoint, read without torch; None
    where the cache has no graph of it yet, or the checkpoint is not one numpy reads (then loading it
    the torch way exports the graph, or names what is wrong with the file)."""
    if (checkpoint := _checkpoint_path(checkpoint)) is None:
        return None
    try:
        cfg, arrays, _ = read_checkpoint(checkpoint, framework="np")
    except CheckpointError:
        return None
    digest = arrays_digest(cfg, arrays)
    graph = _graph_path(digest, OPSET)
    return (cfg, digest, str(checkpoint), graph) if graph.is_file() else None


def step_onnx_for(model: FusionModel, image_shape: tuple[int, ...], encoding: str,
                  cache_dir: str | Path | None = None) -> Path:
    """The whole step's ONNX graph (sensor arrays in: export.export_step_onnx) for one camera resolution
    and encoding, cached as onnx_for caches the model's."""
    from .backends.export import export_step_onnx

    camera = "x".join(map(str, image_shape)) + f"-{encoding}"
    name = f"step-{weights_digest(model)}-g{GRAPH_REVISION}-{camera}-opset{OPSET}.onnx"
    return _cached_export(Path(cache_dir or config_cache_dir()) / name,
                          lambda path: export_step_onnx(model, tuple(image_shape), encoding, path))


def _cached_export(path: Path, export) -> Path:
    """The graph at `path`, exported first if the cache lacks it. A graph another process is exporting
    (two nodes started together on a cold cache) is waited for, not exported twice: an exclusive lock
    on PATH.lock, which the system releases however that process ends."""
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                log.info("exporting ONNX graph to %s", path)
                with written_aside(path) as tmp:  # a reader without the lock never sees half a file
                    export(tmp)
    except OSError as exc:
        raise CheckpointError(f"cannot write the ONNX cache {path} ({exc}); set FUSION_ATTN_CACHE to a "
                              "writable folder") from exc
    return path


def create_backend(name: str, model: FusionModel, threads: int | None = None, device: str | None = None,
                   onnx_path: str | Path | None = None, tensorrt: TensorRTOptions | None = None,
                   compile_graphs: bool = False) -> Backend:
    """The named backend for `model`; BackendUnavailable where a GPU backend cannot run here. `model` is
    left as it was (device, dtype, training flag): backends run copies or its exported graph, so one
    model can feed several. compile_graphs: torch-cudagraph compiles its modules before capture."""
    if name == "torch":
        from .backends.torch_backend import TorchBackend

        return TorchBackend(model, device=device or "cpu", threads=threads)
    if name == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx_path or onnx_for(model), threads=threads)
    if name == "torch-cudagraph":
        from .backends.cuda_graph_backend import CudaGraphBackend

        return CudaGraphBackend(model, device=device or "cuda:0", compile=compile_graphs)
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
    def __init__(self, cfg: FusionConfig, backend: Backend, tau=ALL_ONES_TAU, frame_id: str = "base_link"):
        self.cfg = cfg
        self.backend = backend
        self.model_source, self.backend_fallback = "", None
        self.weights_digest = ""  # of the model's weights and config (create() sets it): the policy contract's key
        self.tokenizer = Tokenizer(cfg)
        self.tau = validate_tau(tau, cfg.sensors)
        self.frame_id = frame_id

    @classmethod
    def create(cls, checkpoint: str | Path | None = None, backend: str = "onnxruntime", threads: int | None = None,
               device: str | None = None, tau=ALL_ONES_TAU, frame_id: str = "base_link",
               tensorrt: TensorRTOptions | None = None, fallback: str = "onnxruntime",
               compile_graphs: bool = False) -> FusionPipeline:
        """fallback: when `backend` cannot run here, "onnxruntime" (say why in one line, go on on the
        CPU) or "fail" (raise BackendUnavailable)."""
        if fallback not in FALLBACKS:
            raise ConfigError(f"backend fallback {fallback!r}: choose one of {list(FALLBACKS)}")
        if backend == "onnxruntime" and (cached := _cached_graph(checkpoint)) is not None:
            from .backends.onnxruntime_backend import OnnxRuntimeBackend

            cfg, digest, source, graph = cached
            pipeline = cls(cfg, OnnxRuntimeBackend(graph, threads=threads), tau, frame_id)
            pipeline.model_source, pipeline.weights_digest = source, digest
            return pipeline
        model, source = load_model(checkpoint)
        try:
            engine = create_backend(backend, model, threads, device, tensorrt=tensorrt, compile_graphs=compile_graphs)
            reason = None
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
                          tensorrt=TensorRTOptions.from_params(params), fallback=param(params, "backend_fallback"),
                          compile_graphs=param(params, "cudagraph.compile"))

    def backend_info(self) -> dict[str, str]:
        """What runs the model, for diagnostics and summaries: backend, device, precision, fallback."""
        b = self.backend
        info = {"backend": b.name, "device": b.device, "precision": b.precision}
        if self.backend_fallback:
            info["backend_fallback"] = self.backend_fallback
        return info

    def fusion_terms(self, sync: SyncConfig, fusion_rate_hz: float, trigger: str = "timer") -> dict[str, str]:
        """This fusion's side of a policy contract (contract.fusion_terms): weights, τ now, sync settings, trigger."""
        max_age_s = [sync.max_age_s[m] for m in self.cfg.sensors]  # the model's sensors: a policy's contract names these
        return fusion_terms(self.weights_digest, self.cfg.sensor_names, self.tau, fusion_rate_hz, max_age_s,
                            sync.stale_after_periods, trigger)

    def set_tau(self, tau) -> None:
        """Takes effect at the next fuse(); τ is a model input, nothing is re-exported."""
        self.tau = validate_tau(tau, self.cfg.sensors)

    def prepare(self, frame: CameraFrame | LidarFrame) -> None:
        """Tokenize a camera or lidar frame as it arrives, off the next fusion's critical path, where
        that fusion will use these tokens: the host tokenizers', or a whole-step backend's own on its
        device (the CUDA-graph backend keeps them; a one-graph engine tokenizes in the step itself)."""
        if not self._takes_arrays:
            self.tokenizer.prepare(frame)
        elif hasattr(self.backend, "frames"):
            self.backend.frames.prepare(frame)

    @property
    def _takes_arrays(self) -> bool:
        # the whole-step graph has no odometry or second-IMU tokenizer yet: a model that reads them takes host tokens
        m = self.cfg.model
        return getattr(self.backend, "whole_step", False) and not (m.odometry or m.second_imu)

    def fuse(self, snap: SensorSnapshot) -> FusedState:
        return self.fuse_many([snap], self.tau[None])[0][0]

    def fuse_many(self, snaps: list[SensorSnapshot], taus: np.ndarray) -> list[list[FusedState]]:
        """Snapshots (in the order they happened) each fused at every τ row of `taus` (K, 4) -> per
        snapshot its K states, in as few backend calls as their shapes allow (replay --batch; a τ sweep
        is one snapshot's K rows). A batch stacks what single calls would run: the same tokens, and on a
        whole-step backend the same padding (snapshots are grouped by `step_key`). The states equal
        one-at-a-time's to the bit on torch-cudagraph (each row runs the one-row kernels), elsewhere to
        float rounding: kernels may sum in another order for another batch shape (docs/BENCHMARKS.md).
        Timings are each snapshot's share of its call."""
        taus = np.stack([validate_tau(t, self.cfg.sensors) for t in taus])
        # snapshots per backend call: all, or as many as a TensorRT engine's batch profile takes
        per_call = max(1, getattr(self.backend, "max_batch", len(snaps) * len(taus)) // len(taus))
        states: list[list[FusedState] | None] = [None] * len(snaps)
        by_tokens = list(range(len(snaps)))
        if self._takes_arrays:
            from .step import step_key  # step.py imports torch, which a whole-step backend has loaded already

            groups: dict[tuple, list[int]] = {}
            for i, snap in enumerate(snaps):
                groups.setdefault(step_key(snap, self.cfg), []).append(i)
            by_tokens = []
            for group in groups.values():
                for call in _chunks(group, per_call):
                    fused = self._fuse_arrays([snaps[i] for i in call], taus)
                    if fused is None:  # the backend's one-graph engine cannot take these (it said why): tokens then
                        by_tokens += call
                    for i, row in zip(call, fused or ()):
                        states[i] = row
        for call in _chunks(sorted(by_tokens), per_call):
            for i, row in zip(call, self._fuse_tokens([snaps[i] for i in call], taus)):
                states[i] = row
        return states

    def _fuse_tokens(self, snaps: list[SensorSnapshot], taus: np.ndarray) -> list[list[FusedState]]:
        """The host tokenizers (in snapshot order: they reuse a frame's tokens), one model call."""
        t0 = time.perf_counter()
        inputs = [self.tokenizer(snap, taus[0]) for snap in snaps]
        t1 = time.perf_counter()
        batch = {k: np.concatenate([np.broadcast_to(x[k], (len(taus), *x[k].shape)) for x in inputs])
                 for k in inputs[0]}
        batch["tau"] = np.tile(taus, (len(snaps), 1))
        out = self.backend.run(batch)
        t2 = time.perf_counter()
        timings = {"tokenize": (t1 - t0) * 1e3 / len(snaps), "model": (t2 - t1) * 1e3 / len(snaps)}
        fused = []
        for j, (snap, x) in enumerate(zip(snaps, inputs)):
            present = np.array([x[f"{name}_mask"].any() for name in self.cfg.sensor_names])
            ages = np.array([x[f"{name}_age"].min() if seen else np.nan
                             for name, seen in zip(self.cfg.sensor_names, present)], np.float32)
            fused.append(self._states(snap, taus, out, j * len(taus), present, ages, timings))
        return fused

    def _fuse_arrays(self, snaps: list[SensorSnapshot], taus: np.ndarray) -> list[list[FusedState]] | None:
        """A GPU backend's whole step: the frames' arrays in (snapshots of one step_key), tokenized and
        fused on the device. None where the backend refuses them."""
        from .step import step_frames

        t0 = time.perf_counter()
        out = self.backend.run_step([snap for snap in snaps for _ in taus], np.tile(taus, (len(snaps), 1)), self.cfg)
        if out is None:
            return None
        timings = {"step": (time.perf_counter() - t0) * 1e3 / len(snaps)}
        fused = []
        for j, snap in enumerate(snaps):
            row = j * len(taus)
            present = out["present"][row]
            ages = np.where(present, step_frames(snap, self.cfg)[2][[0, 2, 4]], np.nan).astype(np.float32)
            fused.append(self._states(snap, taus, out, row, present, ages, timings))
        return fused

    def _states(self, snap, taus, out, row, present, ages, timings) -> list[FusedState]:
        """The states of one snapshot: its τ rows of the batch outputs, from `row` on."""
        return [FusedState(stamp_ns=snap.stamp_ns, frame_id=self.frame_id, pooled=out["fused"][row + k],
                           latents=out["latents"][row + k], attention=out["attention"][row + k], present=present,
                           ages_s=ages, tau=tau.copy(), all_masked=bool(out["all_masked"][row + k]),
                           timings_ms=dict(timings), trust=out["trust"][row + k], sensors=self.cfg.sensor_names,
                           ego_rate=out["ego_rate"][row + k] if "ego_rate" in out else None)
                for k, tau in enumerate(taus)]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
