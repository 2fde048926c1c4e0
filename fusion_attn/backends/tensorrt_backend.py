"""TensorRT backend: engine build (ONNX parser), cache, and execution on one CUDA stream.

Written against the official TensorRT Python API, for TensorRT 8.6 (JetPack 5) and 10.x (JetPack 6,
x86). Where the two differ it says so:

    network creation   8.6: EXPLICIT_BATCH flag          10: explicit batch is the only mode (flags 0)
    build progress     8.6: a heartbeat line every 15 s  10: IProgressMonitor, a line per build phase
    I/O and execution  8.6: bindings, execute_async_v2   10: tensor names, set_tensor_address + execute_async_v3
    ONNX opset         8.6: 17 (TorchScript export)      10: 18 (torch.export)

Device buffers are torch CUDA tensors (torch is on every Jetson image), so no pycuda is needed. This
module imports tensorrt at the top: importing it is the test whether TensorRT is there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorrt as trt
import torch

from ..errors import BackendUnavailable
from ..step import camera_key, step_inputs, step_ranges
from . import OPSET, TENSORRT8_OPSET
from .engine_cache import (
    EngineCache,
    EngineKey,
    ShapeRanges,
    TensorIO,
    TensorRTOptions,
    describe_precision,
    io_mismatches,
    layer_precisions,
    onnx_io,
    profile_shapes,
    step_camera,
)
from .export import TOKENIZER_NODE_PREFIX

log = logging.getLogger(__name__)

TRT_VERSION = trt.__version__
V10 = int(TRT_VERSION.split(".")[0]) >= 10
ONNX_OPSET = OPSET if V10 else TENSORRT8_OPSET
_LOGGER = trt.Logger(trt.Logger.WARNING)  # one logger per process, as TensorRT asks
# The parser builds ScatterElements with a reduction (the step graph's scatter-add) from the plugin
# registry, and deserializing such an engine needs it too; `import tensorrt` does not fill it.
trt.init_libnvinfer_plugins(_LOGGER, "")
_TORCH_DTYPES = {"float": torch.float32, "half": torch.float16, "bf16": torch.bfloat16, "bool": torch.bool,
                 "uint8": torch.uint8,
                 "int8": torch.int8, "int32": torch.int32, "int64": torch.int64}


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def engine_key(onnx_path: Path, opts: TensorRTOptions, device: torch.device, ranges: ShapeRanges | None = None) -> EngineKey:
    return EngineKey.create(onnx_path, opts, TRT_VERSION, *gpu_identity(device), ranges=ranges)


def _dtype_name(dtype) -> str:
    return dtype.name.lower()  # FLOAT -> "float", HALF -> "half", BOOL -> "bool", BF16 -> "bf16", ...


def engine_io(engine) -> dict[str, TensorIO]:
    if V10:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return {n: TensorIO("input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output",
                            tuple(engine.get_tensor_shape(n)), _dtype_name(engine.get_tensor_dtype(n))) for n in names}
    return {engine.get_binding_name(i): TensorIO("input" if engine.binding_is_input(i) else "output",
                                                 tuple(engine.get_binding_shape(i)), _dtype_name(engine.get_binding_dtype(i)))
            for i in range(engine.num_bindings)}


# --- build ---------------------------------------------------------------------------------------

if V10:
    class _Progress(trt.IProgressMonitor):
        """One line per build phase (with its step count) and when it ends: builds take minutes on a Jetson."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.start = time.monotonic()
            self.depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.depth[phase_name] = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            if self.depth[phase_name] <= 1:
                log.warning("[%6.1f s] %s%s (%d steps)", time.monotonic() - self.start,
                            "  " * self.depth[phase_name], phase_name, num_steps)

        def step_complete(self, phase_name, step):
            return True  # True: go on building

        def phase_finish(self, phase_name):
            if self.depth.pop(phase_name, 0) == 0:
                log.warning("[%6.1f s] %s done", time.monotonic() - self.start, phase_name)


class _Heartbeat:
    """TensorRT 8.6 has no progress monitor: say every 15 s that the build is still going."""

    def __init__(self, period_s: float = 15.0):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def _run(self, period_s):
        start = time.monotonic()
        while not self.stop.wait(period_s):
            log.warning("still building the TensorRT engine (%.0f s) ...", time.monotonic() - start)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


class _Calibrator(getattr(trt, "IInt8EntropyCalibrator2", object)):  # deprecated since 10.1: may go
    """INT8 calibration from recorded model inputs; with a calibration cache present, TensorRT reads
    that instead and asks for no batch."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]] | None, batch_size: int, cache: Path,
                 device: torch.device):
        trt.IInt8EntropyCalibrator2.__init__(self)
        self.batches, self.batch_size, self.cache, self.device = batches, batch_size, Path(cache), device
        self.held: dict[str, torch.Tensor] = {}  # TensorRT reads the pointers after get_batch returns
        self.count = 0

    def get_batch_size(self):
        return self.batch_size

    def get_batch(self, names, *_):
        batch = next(self.batches, None) if self.batches is not None else None
        if batch is None:
            return None
        if any(len(batch[n]) != self.batch_size for n in names):
            raise ValueError(f"calibration batches must hold {self.batch_size} samples (the calibration profile)")
        self.held = {n: torch.from_numpy(np.ascontiguousarray(batch[n])).to(self.device) for n in names}
        self.count += 1
        if self.count % 10 == 0:
            log.warning("calibration: %d batches", self.count)
        return [int(self.held[n].data_ptr()) for n in names]

    def read_calibration_cache(self):
        return self.cache.read_bytes() if self.cache.is_file() else None

    def write_calibration_cache(self, cache):
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        self.cache.write_bytes(bytes(cache))
        log.warning("INT8 calibration cache written: %s", self.cache)


def build_engine(onnx_path: Path, opts: TensorRTOptions, timing_cache: Path,
                 calibration: Iterator[dict[str, np.ndarray]] | None = None, calibration_batch: int = 8,
                 device: torch.device | None = None, ranges: ShapeRanges | None = None) -> tuple[bytes, dict]:
    """ONNX -> serialized engine, and what the build did (for the sidecar). `ranges`: the profile of each
    dynamic axis but the batch (the step graph's point and IMU counts)."""
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(0 if V10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT {TRT_VERSION} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions become inspectable

    if opts.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: FP32 would silently run as TF32
    elif opts.precision in ("fp16", "int8"):
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("this GPU has no fast FP16: TensorRT may keep layers in FP32")
        config.set_flag(trt.BuilderFlag.FP16)
        _keep_tokenizers_fp32(network, config)
    if opts.dla_core >= 0:
        if builder.num_DLA_cores <= opts.dla_core:
            raise BackendUnavailable(f"DLA core {opts.dla_core} requested, this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opts.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        profile.set_shape(tensor.name, *profile_shapes(tensor.name, tuple(tensor.shape), opts.batch_profile, ranges))
    config.add_optimization_profile(profile)
    if opts.precision == "int8":
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise BackendUnavailable(f"TensorRT {TRT_VERSION} has no implicit INT8 calibration: use fp16")
        calib_profile = builder.create_optimization_profile()
        for tensor in inputs:  # calibration runs at one fixed shape
            shape = (calibration_batch, *tuple(tensor.shape)[1:])
            calib_profile.set_shape(tensor.name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _Calibrator(calibration, calibration_batch, opts.calibration_cache,
                                             device or torch.device("cuda"))

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, False):  # False: refuse a cache made by another version or GPU
        log.warning("timing cache %s not usable: starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    if V10:
        config.progress_monitor = _Progress()
    log.warning("building a TensorRT %s engine from %s (%s, workspace %d MiB, batch %s, DLA %s) ...",
                TRT_VERSION, onnx_path.name, opts.precision, opts.workspace_mib, opts.batch_profile,
                opts.dla_core if opts.dla_core >= 0 else "off")
    start = time.monotonic()
    if V10:
        serialized = builder.build_serialized_network(network, config)
    else:
        with _Heartbeat():
            serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(f"TensorRT {TRT_VERSION} failed to build an engine from {onnx_path} (its log above says why)")
    seconds = time.monotonic() - start
    if (used := config.get_timing_cache()) is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(used.serialize()))
    log.warning("engine built in %.1f s", seconds)
    return bytes(serialized), {"build_seconds": round(seconds, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "onnx": str(onnx_path), "tensorrt_api": "10" if V10 else "8"}


def _keep_tokenizers_fp32(network, config) -> None:
    """The step graph's tokenizer layers (export.TOKENIZER_NODE_PREFIX) that compute in floats stay FP32
    in an FP16 engine: in FP16 a point 50 m out is placed to 3 cm, and points near a cell's edge would
    change pillar. TensorRT prefers the constraint (and warns where it cannot keep it)."""
    kept = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name.startswith(TOKENIZER_NODE_PREFIX) and all(
                layer.get_output(k).dtype == trt.float32 for k in range(layer.num_outputs)):
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            kept += 1
    if kept:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.warning("FP16 engine: %d tokenizer layers kept in FP32", kept)


# --- runtime -------------------------------------------------------------------------------------

def _deserialize(runtime, data: bytes, expected: dict[str, TensorIO]):
    """-> (engine, None) or (None, why it cannot be used)."""
    try:
        engine = runtime.deserialize_cuda_engine(data)
    except Exception as exc:  # noqa: BLE001 - some versions raise instead of returning None
        engine, error = None, f": {exc}"
    else:
        error = ""
    if engine is None:
        return None, (f"TensorRT {TRT_VERSION} cannot deserialize it{error} (built by another TensorRT version, "
                      "e.g. before a JetPack upgrade, or for another GPU)")
    problems = io_mismatches(engine_io(engine), expected)
    return (None, "its I/O differs from the model's: " + "; ".join(problems)) if problems else (engine, None)


def load_or_build(onnx_path: Path, opts: TensorRTOptions, device: torch.device, ranges: ShapeRanges | None = None,
                  **build_kwargs):
    """The engine for this ONNX graph on this machine: from the cache when valid, else built and
    cached. -> (engine, its cache path, its sidecar dict)."""
    runtime = trt.Runtime(_LOGGER)
    if opts.dla_core >= 0:
        runtime.DLA_core = opts.dla_core
    key, cache = engine_key(onnx_path, opts, device, ranges), EngineCache(opts.engine_dir)
    expected = onnx_io(onnx_path)
    data = cache.load(key)
    if data is not None:
        engine, problem = _deserialize(runtime, data, expected)
        if engine is not None:
            return engine, cache.paths(key)[0], cache.read_sidecar(key)
        cache.discard(key, problem)
    timing_cache = opts.engine_dir / f"timing-{key.tensorrt_version}-sm{key.compute_capability}.cache"  # per version, GPU
    data, details = build_engine(onnx_path, opts, timing_cache, device=device, ranges=ranges, **build_kwargs)
    engine, problem = _deserialize(runtime, data, expected)
    if engine is None:
        raise BackendUnavailable(f"the engine just built is unusable: {problem}")
    key = engine_key(onnx_path, opts, device, ranges)  # again: an int8 build has just written its calibration cache
    path = cache.store(key, data, engine_io(engine), details)
    return engine, path, cache.read_sidecar(key)


class TensorRTBackend:
    """Named numpy inputs -> the engine on one CUDA stream -> named numpy outputs (see Backend)."""

    name = "tensorrt"

    def __init__(self, onnx_path: str | Path, opts: TensorRTOptions, device: str = "cuda:0",
                 ranges: ShapeRanges | None = None, **build_kwargs):
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA GPU is visible to torch")
        self.torch_device = torch.device(device)
        torch.cuda.set_device(self.torch_device)  # TensorRT works in torch's (primary) CUDA context
        self.device = f"{self.torch_device} ({torch.cuda.get_device_name(self.torch_device)})"
        self.engine, self.engine_path, self.sidecar = load_or_build(Path(onnx_path), opts, self.torch_device, ranges,
                                                                    **build_kwargs)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")
        self.io = engine_io(self.engine)
        self.inputs = [n for n, t in self.io.items() if t.mode == "input"]
        self.outputs = [n for n, t in self.io.items() if t.mode == "output"]
        self.batches = opts.batch_profile[0], opts.batch_profile[2]
        self.stream = torch.cuda.Stream(self.torch_device)
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}  # input shapes -> device tensor per I/O name
        self._bind({n: profile_shapes(n, self.io[n].shape, opts.batch_profile, ranges)[0] for n in self.inputs})
        self.precision, warning = describe_precision(opts.precision, self._layer_precisions())
        if warning:
            log.warning(warning)
        log.warning("TensorRT engine %s on %s runs %s", self.engine_path.name, self.device, self.precision)

    @property
    def max_batch(self) -> int:
        """The most rows one call takes (the profile's batch): FusionPipeline.fuse_many splits to it."""
        return self.batches[1]

    def _layer_precisions(self) -> dict[str, int]:
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context  # with shapes set, formats are known (else "N/A")
        return layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Set the input shapes on the context -> the device buffers for them (outputs as the engine shapes them)."""
        for name in self.inputs:
            if V10:
                ok = self.context.set_input_shape(name, shapes[name])
            else:
                ok = self.context.set_binding_shape(self.engine.get_binding_index(name), shapes[name])
            if not ok:
                raise BackendUnavailable(f"input {name} of shape {tuple(shapes[name])} is outside the engine's "
                                         "optimisation profile")
        key = tuple(tuple(shapes[n]) for n in self.inputs)
        if key not in self.buffers:
            def shape(name):
                if name in shapes:
                    return tuple(shapes[name])
                if V10:
                    return tuple(self.context.get_tensor_shape(name))
                return tuple(self.context.get_binding_shape(self.engine.get_binding_index(name)))

            self.buffers[key] = {n: torch.empty(shape(n), dtype=_TORCH_DTYPES[t.dtype], device=self.torch_device)
                                 for n, t in self.io.items()}
        return self.buffers[key]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(inputs.values())))
        if not self.batches[0] <= batch <= self.batches[1]:
            raise BackendUnavailable(f"batch {batch} is outside the engine's profile {self.batches[0]}.."
                                     f"{self.batches[1]} (build it with another max_batch / opt_batch)")
        buffers = self._bind({name: inputs[name].shape for name in self.inputs})
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                buffers[name].copy_(torch.from_numpy(np.ascontiguousarray(inputs[name])), non_blocking=True)
            if V10:
                for name, tensor in buffers.items():
                    self.context.set_tensor_address(name, tensor.data_ptr())
                ok = self.context.execute_async_v3(self.stream.cuda_stream)
            else:
                bindings = [0] * self.engine.num_bindings
                for name, tensor in buffers.items():
                    bindings[self.engine.get_binding_index(name)] = tensor.data_ptr()
                ok = self.context.execute_async_v2(bindings, self.stream.cuda_stream)
            if not ok:
                raise RuntimeError("TensorRT execution failed (its log above says why)")
            out = {name: buffers[name].cpu().numpy() for name in self.outputs}
        return out


class TensorRTStepBackend:
    """The whole fusion step as one engine per camera resolution and encoding: adapted sensor arrays in
    (step.step_inputs), tokenized and fused by TensorRT, with an optimisation profile over the point and
    IMU buckets (step.step_ranges). An engine is built, or loaded from the cache, for `step_camera` at
    start and for any other camera at its first frame. A frame the step engine cannot take goes through
    the host tokenizers and the token-level engine instead (run_step returns None; the pipeline then
    hands tokens), said once per cause: a camera whose step graph TensorRT cannot parse or build, a
    16-bit camera (TensorRT has no UINT16 input), a cloud or IMU window beyond the profile. Under
    TensorRT 8.6 (no opset 18) every frame does (`whole_step` is False)."""

    name = "tensorrt"

    def __init__(self, model, opts: TensorRTOptions, device: str = "cuda:0"):
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA GPU is visible to torch")
        self.model, self.opts, self.torch_device, self.ranges = model, opts, device, step_ranges()
        self.device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        self.precision = f"{opts.precision} (requested; engines are built per camera resolution)"
        self.whole_step = V10
        self.engines: dict[tuple, TensorRTBackend | None] = {}  # (image shape, encoding) -> its step engine
        self.tokens: TensorRTBackend | None = None  # the token-level engine, built when a frame needs it
        self._said: set[str] = set()
        if not V10:
            self._say(f"TensorRT {TRT_VERSION} parses opset {ONNX_OPSET}; the step graph needs 18 (TensorRT 10)")
            self.precision = self._token_engine().precision
        elif opts.step_camera:
            self._engine(*step_camera(opts.step_camera))

    def _say(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.warning("%s: the host tokenizers and the token-level engine fuse it instead", reason)

    def _engine(self, image_shape: tuple[int, ...], encoding: str) -> TensorRTBackend | None:
        from ..frames import CAMERA_ENCODINGS
        from ..pipeline import step_onnx_for

        key = (tuple(image_shape), encoding)
        if key in self.engines:
            return self.engines[key]
        camera = f"a {'x'.join(map(str, image_shape))} {encoding} camera"
        self.engines[key] = None
        if np.dtype(CAMERA_ENCODINGS[encoding]).itemsize == 2:
            self._say(f"{camera}: TensorRT takes no 16-bit input")
            return None
        try:
            onnx = step_onnx_for(self.model, image_shape, encoding)
            self.engines[key] = TensorRTBackend(onnx, self.opts, self.torch_device, ranges=self.ranges)
        except Exception as exc:  # noqa: BLE001 - an export, parser, profile or builder failure alike: tokens then
            self._say(f"no one-graph engine for {camera} ({type(exc).__name__}: {exc})")
            return None
        self.precision = self.engines[key].precision
        return self.engines[key]

    def _token_engine(self) -> TensorRTBackend:
        from ..pipeline import onnx_for

        if self.tokens is None:
            self.tokens = TensorRTBackend(onnx_for(self.model, opset=ONNX_OPSET), self.opts, self.torch_device)
        return self.tokens

    @property
    def max_batch(self) -> int:
        return self.opts.batch_profile[2]

    @property
    def engine_path(self) -> Path | None:
        """The engine that runs (the first camera's), None before any is built."""
        engines = [e for e in [*self.engines.values(), self.tokens] if e is not None]
        return engines[0].engine_path if engines else None

    def run_step(self, snaps, taus: np.ndarray, cfg) -> dict[str, np.ndarray] | None:
        """Snapshots of one step.step_key and their τ rows -> step.step_output_names; None: fuse them from tokens
        (run) instead."""
        if not self.whole_step:
            return None
        inputs, encoding = step_inputs(snaps, taus, cfg), camera_key(snaps[0], cfg)[1]
        for name, axes in self.ranges.items():
            if inputs[name].shape[1] > axes[1][2]:
                self._say(f"{name}: {inputs[name].shape[1]} entries, beyond the step engine's {axes[1][2]}")
                return None
        engine = self._engine(inputs["image"].shape[1:], encoding)
        return None if engine is None else engine.run(inputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tokens in (tokenize.input_spec), as TensorRTBackend.run: the token-level engine."""
        return self._token_engine().run(inputs)
