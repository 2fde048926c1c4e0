"""`fusion-attn build-engine`: the TensorRT engine built (or validated) and cached ahead of time, or
the matching trtexec command; int8 engines calibrated on recordings."""

from __future__ import annotations

from pathlib import Path

from ..params import param


def add_parser(verbs):
    engine = verbs.add_parser("build-engine", help="build (or validate) the cached TensorRT engine ahead of time")
    engine.add_argument("onnx", nargs="?", type=Path, help="ONNX graph (default: the model of --checkpoint, "
                                                            "exported at the opset the installed TensorRT parses)")
    engine.add_argument("--checkpoint", type=Path, help="safetensors checkpoint (default: the packaged model)")
    engine.add_argument("--params", type=Path, help="the node's parameter file: its tensorrt.* settings; flags override")
    engine.add_argument("--precision", choices=["fp32", "tf32", "fp16", "int8"])
    engine.add_argument("--workspace-mib", type=int)
    engine.add_argument("--max-batch", type=int)
    engine.add_argument("--opt-batch", type=int)
    engine.add_argument("--dla-core", type=int, help="Jetson DLA core (GPU fallback on); default -1: GPU only")
    engine.add_argument("--step-camera", metavar="HxWxC:ENCODING",
                        help="the one-graph engine (sensor arrays in) for this camera, e.g. 480x640x3:rgb8, as "
                             "the node builds it with tensorrt.step_camera; default: the token-level engine")
    engine.add_argument("--cache-dir", type=Path, help="default: $FUSION_ATTN_CACHE/engines or ~/.cache/fusion_attn/engines")
    engine.add_argument("--device", default="cuda:0")
    engine.add_argument("--calibrate", nargs="+", type=Path, metavar="BAG",
                        help="int8: recordings whose fused instants calibrate the engine")
    engine.add_argument("--calibration-cache", type=Path, help="int8: where the calibration cache is read/written")
    engine.add_argument("--calibration-batches", type=int, default=64, help="int8: at most this many batches of 8")
    engine.add_argument("-o", "--output", type=Path, help="also copy the engine (and its .json sidecar) here")
    engine.add_argument("--trtexec", action="store_true", help="print the matching trtexec command and exit "
                                                               "(needs no TensorRT)")
    return engine


def run(args) -> int:
    from ..backends import OPSET, TENSORRT8_OPSET
    from ..backends.engine_cache import TensorRTOptions, file_sha256, trtexec_command
    from ..config import load_params
    from ..errors import BackendUnavailable
    from ..pipeline import load_model, onnx_for

    try:
        from ..backends import tensorrt_backend as trt_backend
    except (ImportError, OSError) as exc:
        if not args.trtexec:
            raise BackendUnavailable(f"TensorRT is not installed here ({type(exc).__name__}: {exc}); build engines on "
                                     "the robot or GPU machine that runs them (docs/TENSORRT.md)") from exc
        trt_backend = None
    params = load_params(args.params) if args.params else {}
    for name in ("precision", "workspace_mib", "max_batch", "opt_batch", "dla_core", "cache_dir", "calibration_cache",
                 "step_camera"):
        if getattr(args, name) is not None:
            params[f"tensorrt.{name}"] = getattr(args, name)
    model, source = load_model(args.checkpoint or params.get("checkpoint") or None)
    if args.step_camera:
        return build_step(args, model, source, TensorRTOptions.from_params(params), trt_backend)
    opset = trt_backend.ONNX_OPSET if trt_backend else OPSET
    onnx = args.onnx or onnx_for(model, opset=opset)
    if not Path(onnx).is_file():
        raise BackendUnavailable(f"ONNX graph not found: {onnx}")
    if args.trtexec:
        if params.get("tensorrt.precision") == "int8" and not params.get("tensorrt.calibration_cache"):
            params["tensorrt.calibration_cache"] = "calibration.cache"
        print(f"# TensorRT 10.x; for 8.6 export opset {TENSORRT8_OPSET}: fusion-attn export --opset {TENSORRT8_OPSET}" if
              opset == OPSET else f"# TensorRT {trt_backend.TRT_VERSION}")
        print(trtexec_command(onnx, TensorRTOptions.from_params(params)))
        return 0
    calibration = None
    if params.get("tensorrt.precision") == "int8":
        if args.calibrate is None and not params.get("tensorrt.calibration_cache"):
            raise BackendUnavailable("--precision int8 needs --calibrate BAG... (or an existing --calibration-cache)")
        if not params.get("tensorrt.calibration_cache"):
            engine_dir = TensorRTOptions(cache_dir=params.get("tensorrt.cache_dir") or None).engine_dir
            params["tensorrt.calibration_cache"] = engine_dir / f"calibration-{file_sha256(onnx)[:16]}.cache"
        if args.calibrate:
            calibration = calibration_batches(args.calibrate, model.cfg, params, args.calibration_batches)
    opts = TensorRTOptions.from_params(params)
    backend = trt_backend.TensorRTBackend(onnx, opts, device=args.device, calibration=calibration)
    report(args, backend, onnx, source)
    return 0


def build_step(args, model, source, opts, trt_backend) -> int:
    """--step-camera: the one-graph engine of that camera, as the node builds it (or its trtexec command)."""
    from ..backends.engine_cache import step_camera, trtexec_command
    from ..errors import BackendUnavailable, ConfigError
    from ..pipeline import step_onnx_for
    from ..step import step_ranges

    if not opts.uses_step:
        raise ConfigError("--step-camera: the one-graph engine is not built with int8, a DLA core or "
                          "tensorrt.whole_step false (the node runs the token-level engine then)")
    if args.onnx or args.calibrate:
        raise ConfigError("--step-camera exports its own graph from --checkpoint and takes no calibration")
    onnx = step_onnx_for(model, *step_camera(opts.step_camera))
    if args.trtexec:
        print("# TensorRT 10.x (the step graph is opset 18)")
        print(trtexec_command(onnx, opts, ranges=step_ranges()))
        return 0
    backend = trt_backend.TensorRTStepBackend(model, opts, device=args.device)
    if not backend.whole_step:
        raise BackendUnavailable(f"no one-graph engine for {opts.step_camera} (the warning above says why)")
    report(args, backend, onnx, source)
    return 0


def report(args, backend, onnx, source) -> None:
    import shutil

    print(f"engine {backend.engine_path}\n  sidecar {backend.engine_path.with_suffix('.json')}\n"
          f"  from {onnx} ({source})\n  runs {backend.precision} on {backend.device}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(backend.engine_path, args.output)
        shutil.copyfile(backend.engine_path.with_suffix(".json"), args.output.with_suffix(".json"))
        print(f"  copied to {args.output}")


def calibration_batches(bags, cfg, params, max_batches: int, batch: int = 8):
    """Batches of 8 model inputs from the fused instants of recordings (the INT8 calibration set)."""
    import numpy as np

    from ..replay import ReplayOptions, recorded_inputs
    from ..sync import SyncConfig

    opts = ReplayOptions(fusion_rate_hz=param(params, "fusion_rate_hz"), progress=False)
    pending = []
    for _, x in recorded_inputs(bags, cfg, opts, SyncConfig.for_model(cfg, params)):
        pending.append(x)
        if len(pending) == batch:
            yield {k: np.stack([p[k] for p in pending]) for k in pending[0]}
            pending, max_batches = [], max_batches - 1
            if max_batches == 0:
                return
