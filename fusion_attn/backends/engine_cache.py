"""TensorRT engine options, cache key and cache: everything about engines that needs no TensorRT.

An engine is only valid for the exact ONNX graph, TensorRT version, GPU (name and compute
capability), precision, workspace, batch profile, DLA core and token budgets it was built for. All of
these make up its `EngineKey`; the cache file is named by the key's digest and a JSON sidecar beside
it repeats the key in clear, with the engine's I/O and how it was built:

    <cache>/engines/fusion-<digest>.engine
    <cache>/engines/fusion-<digest>.json
    <cache>/engines/timing-<version>-sm<cc>.cache   TensorRT timing cache, per TensorRT version and GPU

A cache entry whose sidecar is missing, unreadable or names another key is not used (and is rebuilt);
so is an engine that TensorRT cannot deserialize or whose I/O differs (see tensorrt_backend).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import cache_dir as config_cache_dir
from ..errors import ConfigError
from ..files import written_aside
from ..params import PARAM_DEFAULTS

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16", "int8")  # fp32: TF32 off, so FP32 means FP32
SIDECAR_FORMAT = "fusion_attn.engine/1"


@dataclass(frozen=True)
class TensorRTOptions:
    precision: str = PARAM_DEFAULTS["tensorrt.precision"]
    workspace_mib: int = PARAM_DEFAULTS["tensorrt.workspace_mib"]  # builder scratch, shared with a Jetson's CPU
    max_batch: int = PARAM_DEFAULTS["tensorrt.max_batch"]  # optimization profile: batch 1 (min) .. max_batch
    opt_batch: int = PARAM_DEFAULTS["tensorrt.opt_batch"]  # the batch size the profile is tuned for
    dla_core: int = PARAM_DEFAULTS["tensorrt.dla_core"]  # >= 0: that DLA core; what it cannot run: the GPU
    cache_dir: Path | None = None  # default: $FUSION_ATTN_CACHE/engines or ~/.cache/fusion_attn/engines
    calibration_cache: Path | None = None  # int8: TensorRT calibration cache (made from recordings)
    whole_step: bool = PARAM_DEFAULTS["tensorrt.whole_step"]  # one engine from sensor arrays (step.FusionStep)
    step_camera: str = PARAM_DEFAULTS["tensorrt.step_camera"]  # "HxWxC:encoding": its step engine built at start

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"tensorrt precision {self.precision!r}: choose one of {list(PRECISIONS)}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"tensorrt batch profile needs 1 <= opt_batch ({self.opt_batch}) <= max_batch "
                              f"({self.max_batch})")
        if self.workspace_mib < 1:
            raise ConfigError(f"tensorrt workspace_mib must be >= 1, got {self.workspace_mib}")
        if self.dla_core >= 0 and self.precision not in ("fp16", "int8"):
            raise ConfigError(f"DLA runs FP16 or INT8 only, not {self.precision}")
        if self.step_camera:
            step_camera(self.step_camera)  # raises ConfigError naming the problem
        if self.precision == "int8" and self.calibration_cache is None:
            raise ConfigError("int8 needs a calibration cache: make one with `fusion-attn build-engine "
                              "--precision int8 --calibrate BAG ...` (docs/TENSORRT.md)")

    @property
    def uses_step(self) -> bool:
        """Whether the one-graph (step) engine runs: asked for, and neither INT8 (calibrated on tokens) nor
        DLA (no dynamic point counts there)."""
        return self.whole_step and self.precision != "int8" and self.dla_core < 0

    @property
    def batch_profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch. DLA has no dynamic shapes: there all three are opt_batch."""
        if self.dla_core >= 0:
            return (self.opt_batch,) * 3
        return (1, self.opt_batch, self.max_batch)

    @property
    def engine_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else config_cache_dir("engines")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TensorRTOptions:
        """From the node's parameters (`tensorrt.*` in config/fusion.yaml); empty strings mean default."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name in fields:
            value = params.get(f"tensorrt.{name}")
            if value is None or value == "":
                continue
            kwargs[name] = Path(value) if name in ("cache_dir", "calibration_cache") else value
        return cls(**kwargs)


def step_camera(spec: str) -> tuple[tuple[int, int, int], str]:
    """"480x640x3:rgb8" -> ((480, 640, 3), "rgb8"): a camera's image shape and encoding (tensorrt.step_camera)."""
    from ..frames import CAMERA_ENCODINGS

    try:
        dims, encoding = spec.split(":")
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape, encoding = (), ""
    if len(shape) != 3 or min(shape) < 1 or encoding not in CAMERA_ENCODINGS:
        raise ConfigError(f"tensorrt.step_camera {spec!r}: expected HEIGHTxWIDTHxCHANNELS:ENCODING, e.g. "
                          f"480x640x3:rgb8, with an encoding of {sorted(CAMERA_ENCODINGS)}")
    return shape, encoding


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Orin), "8.9", ...
    precision: str
    workspace_mib: int
    token_budgets: tuple[tuple[str, int], ...]  # (name, tokens) per modality, and lidar points per pillar
    batch_profile: tuple[int, int, int]  # min, opt, max
    dla_core: int
    calibration_sha256: str = ""  # int8 only
    shape_ranges: tuple = ()  # (input, axis, (min, opt, max)) per dynamic axis besides the batch (the step graph)

    @classmethod
    def create(cls, onnx_path: str | Path, opts: TensorRTOptions, tensorrt_version: str, gpu_name: str,
               compute_capability: str, ranges: ShapeRanges | None = None) -> EngineKey:
        io = onnx_io(onnx_path)
        budgets = tuple((name, io[tensor].shape[dim]) for name, tensor, dim in (
            ("camera", "camera_patches", 1), ("lidar", "lidar_points", 1),
            ("lidar_points_per_pillar", "lidar_points", 2), ("imu", "imu_chunks", 1)) if tensor in io)
        # int8: the calibration it was built with; "" until the first build has written the cache
        calibration = (file_sha256(opts.calibration_cache) if opts.precision == "int8"
                       and Path(opts.calibration_cache).is_file() else "")
        ranges = tuple((name, axis, tuple(r)) for name, axes in sorted((ranges or {}).items())
                       for axis, r in sorted(axes.items()))
        return cls(file_sha256(onnx_path), tensorrt_version, gpu_name, compute_capability, opts.precision,
                   opts.workspace_mib, budgets, opts.batch_profile, opts.dla_core, calibration, ranges)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["token_budgets"] = dict(self.token_budgets)
        d["batch_profile"] = list(self.batch_profile)
        if self.shape_ranges:  # as JSON reads it back from the sidecar
            d["shape_ranges"] = [[name, axis, list(r)] for name, axis, r in self.shape_ranges]
        else:  # so that the keys of token-level engines built before it stay the same
            del d["shape_ranges"]
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class TensorIO:
    mode: str  # "input" | "output"
    shape: tuple[int, ...]  # -1 for a dynamic dimension (the batch; the step graph's point and IMU counts)
    dtype: str  # TensorRT's DataType name, lower case: "float", "half", "bool", "int32", ...


# ONNX TensorProto element type -> TensorRT DataType name (lower case)
_ONNX_TYPES = {1: "float", 10: "half", 9: "bool", 6: "int32", 7: "int64", 3: "int8", 2: "uint8", 16: "bf16"}


def onnx_io(onnx_path: str | Path) -> dict[str, TensorIO]:
    """The I/O of an ONNX graph, as an engine built from it must have it (symbolic dims -> -1)."""
    import onnx  # here, not at the top: 1.8 s of every start that builds no engine (benchmarks/process_start.py)

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    io = {}
    for mode, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            io[v.name] = TensorIO(mode, shape, _ONNX_TYPES.get(t.elem_type, f"onnx:{t.elem_type}"))
    return io


# input name -> {axis: (min, opt, max)}: an optimisation profile's range of each dynamic axis but the batch
ShapeRanges = dict[str, dict[int, tuple[int, int, int]]]


def profile_shapes(name: str, shape: tuple[int, ...], batch: tuple[int, int, int],
                   ranges: ShapeRanges | None = None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """An input's (min, opt, max) shapes for an optimisation profile: axis 0 over `batch`, every other
    dynamic axis (-1) over its range in `ranges`, fixed axes as they are."""
    axes = (ranges or {}).get(name, {})
    profile = []
    for axis, size in enumerate(shape):
        if axis == 0:
            profile.append(batch)
        elif size >= 0:
            profile.append((size,) * 3)
        elif axis in axes:
            profile.append(tuple(axes[axis]))
        else:
            raise ConfigError(f"input {name} has a dynamic axis {axis} with no range for the engine's profile")
    return tuple(tuple(p[i] for p in profile) for i in range(3))


def io_mismatches(actual: dict[str, TensorIO], expected: dict[str, TensorIO]) -> list[str]:
    """What differs between an engine's I/O and the expected I/O; empty when they agree."""
    problems = [f"missing {expected[n].mode} {n}" for n in expected if n not in actual]
    problems += [f"unexpected {actual[n].mode} {n}" for n in actual if n not in expected]
    for name in sorted(set(actual) & set(expected)):
        a, e = actual[name], expected[name]
        if a != e:
            problems.append(f"{name}: engine has {a.mode} {a.shape} {a.dtype}, expected {e.mode} {e.shape} {e.dtype}")
    return problems


class EngineCache:
    """Engine files and their sidecars in one folder, looked up by EngineKey."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        stem = self.dir / f"fusion-{key.digest()}"
        return stem.with_suffix(".engine"), stem.with_suffix(".json")

    def load(self, key: EngineKey) -> bytes | None:
        """The cached engine for `key`, or None (with the reason logged) if there is none usable."""
        engine, sidecar = self.paths(key)
        if not engine.is_file():
            log.info("no cached TensorRT engine for this model and machine (%s)", engine.name)
            return None
        reason = self._sidecar_problem(sidecar, key)
        if reason is None:
            data = engine.read_bytes()
            if data:
                return data
            reason = "the engine file is empty"
        log.warning("cached TensorRT engine %s not used: %s; it will be rebuilt", engine, reason)
        return None

    def read_sidecar(self, key: EngineKey) -> dict[str, Any]:
        return json.loads(self.paths(key)[1].read_text())

    def _sidecar_problem(self, sidecar: Path, key: EngineKey) -> str | None:
        try:
            meta = json.loads(sidecar.read_text())
        except FileNotFoundError:
            return f"its sidecar {sidecar.name} is missing"
        except (OSError, json.JSONDecodeError) as exc:
            return f"its sidecar {sidecar.name} is unreadable ({exc})"
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            return f"its sidecar {sidecar.name} is not a {SIDECAR_FORMAT} file"
        if meta.get("key") != key.to_dict():
            differ = sorted(k for k, v in key.to_dict().items() if (meta.get("key") or {}).get(k) != v)
            return f"it was built for another {', '.join(differ) or 'key'}"
        return None

    def store(self, key: EngineKey, engine: bytes, io: dict[str, TensorIO], details: dict[str, Any]) -> Path:
        """Write engine and sidecar atomically (a reader never sees half a file); -> the engine path."""
        engine_path, sidecar = self.paths(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"format": SIDECAR_FORMAT, "key": key.to_dict(), "engine": engine_path.name,
                "engine_sha256": hashlib.sha256(engine).hexdigest(),
                "io": {n: dataclasses.asdict(t) for n, t in io.items()}, **details}
        with written_aside(engine_path) as tmp:
            tmp.write_bytes(engine)
        with written_aside(sidecar) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return engine_path

    def discard(self, key: EngineKey, reason: str) -> None:
        log.warning("discarding cached TensorRT engine %s: %s", self.paths(key)[0], reason)
        for path in self.paths(key):
            path.unlink(missing_ok=True)


def layer_precisions(engine_information: str) -> dict[str, int]:
    """Count the engine's layers by the data types of their tensors, from the engine inspector's
    JSON (ProfilingVerbosity.DETAILED): e.g. {"fp16": 40, "fp32": 6}; a layer with FP16 inputs and
    FP32 outputs counts for both. Formats that name no type (shape layers, "N/A due to dynamic
    shapes") are left out; fused Myelin subgraphs ({ForeignNode[...]}) count as "fused"."""
    counts: dict[str, int] = {}
    for layer in json.loads(engine_information).get("Layers", []):
        if not isinstance(layer, dict):  # a build without DETAILED verbosity lists layer names only
            continue
        if "ForeignNode" in str(layer.get("Name", "")):  # a fused (Myelin) subgraph: its tensors do not
            counts["fused"] = counts.get("fused", 0) + 1  # tell the precision inside
            continue
        tensors = [*layer.get("Inputs", []), *layer.get("Outputs", [])]
        kinds = {_precision_of(str(t.get("Format/Datatype", ""))) for t in tensors if isinstance(t, dict)} - {None}
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _precision_of(fmt: str) -> str | None:
    f = fmt.lower()
    for words, name in ((("int8",), "int8"), (("fp16", "half"), "fp16"), (("bf16", "bfloat"), "bf16"),
                        (("fp32", "float"), "fp32"), (("int32",), "int32"), (("bool",), "bool")):
        if any(w in f for w in words):
            return name
    return None


def describe_precision(requested: str, counts: dict[str, int]) -> tuple[str, str | None]:
    """-> (what the engine runs, e.g. "fp16 (40 layers) + fp32 (6)", a warning or None).

    The warning catches the silent cases: FP16/INT8 asked for but no layer runs in it (a GPU without
    fast FP16, or TensorRT found FP32 kernels faster).
    """
    compute = {k: v for k, v in counts.items() if k in ("fp32", "fp16", "bf16", "int8", "fused")}
    if not compute:
        return f"{requested} (requested; the engine does not report layer precisions)", None
    ordered = sorted(compute.items(), key=lambda kv: -kv[1])
    text = " + ".join(f"{k} ({v} layers)" if i == 0 else f"{k} ({v})" for i, (k, v) in enumerate(ordered))
    wanted = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "int8": "int8"}[requested]
    warning = None
    if wanted not in compute and "fused" not in compute:  # inside a fused subgraph it may well run
        warning = (f"TensorRT precision {requested} was requested but no layer runs in it: the engine runs "
                   f"{text}")
    if requested == "tf32":
        text += "; TF32 tensor cores allowed"
    return text, warning


def trtexec_command(onnx_path: str | Path, opts: TensorRTOptions, engine: str | Path = "fusion.engine",
                    timing_cache: str | Path = "timing.cache", calibration_batch: int = 8,
                    ranges: ShapeRanges | None = None) -> str:
    """The trtexec command line that builds the engine `build-engine` builds with these options
    (to profile it or cross-check a build with NVIDIA's own tool)."""
    io = onnx_io(onnx_path)
    profiles = {n: profile_shapes(n, t.shape, opts.batch_profile, ranges) for n, t in io.items() if t.mode == "input"}

    def shapes(i: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, p[i]))}" for n, p in profiles.items())

    q = shlex.quote
    args = ["trtexec", f"--onnx={q(str(onnx_path))}", f"--saveEngine={q(str(engine))}",
            f"--memPoolSize=workspace:{opts.workspace_mib}M", f"--minShapes={shapes(0)}",
            f"--optShapes={shapes(1)}", f"--maxShapes={shapes(2)}", f"--timingCacheFile={q(str(timing_cache))}",
            "--profilingVerbosity=detailed"]
    calib = ",".join(f"{n}:{'x'.join(map(str, (calibration_batch, *t.shape[1:])))}"
                     for n, t in io.items() if t.mode == "input")
    args += {"fp32": ["--noTF32"], "tf32": [], "fp16": ["--fp16"],
             "int8": ["--fp16", "--int8", f"--calib={q(str(opts.calibration_cache))}",
                      f"--optShapesCalib={calib}"]}[opts.precision]
    if opts.dla_core >= 0:
        args += [f"--useDLACore={opts.dla_core}", "--allowGPUFallback"]
    return " \\\n    ".join(args)
