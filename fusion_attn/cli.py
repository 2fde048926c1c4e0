"""`fusion-attn`: the command-line front-end.

    fusion-attn fuse --bag BAG [--at SECONDS]      one fusion at one instant of a recording
    fusion-attn fuse --image IMG [--points PTS]    one fusion from files
    fusion-attn replay BAG... -o OUT               the node's output for a whole recording, reports, τ sweep
    fusion-attn play BAG... [--rate R] [--loop]    a recording onto live ROS 2 topics (for the node)
    fusion-attn sim-record ENV_ID -o BAG           simulated episodes as a rosbag2 MCAP
    fusion-attn export -o model.onnx               ONNX graph, checked against torch and TensorRT's op list
    fusion-attn build-engine [MODEL.onnx]          TensorRT engine, built and cached ahead of time
    fusion-attn launch [robot] [name:=value ...]   fusion_node (+ policy_node) with config/*.yaml (like ros2 launch)
    fusion-attn rl train|evaluate|export           attention-memory RL agents (docs/RL.md)
    fusion-attn bench                              per-stage latency, torch vs ONNX Runtime
    fusion-attn train -o OUT [--bag BAG...]        train on simulated episodes (and your bags); docs/TRAINING.md
    fusion-attn eval-robustness NAME=RUN... -o OUT sensor faults x τ for trained runs; docs/RESULTS.md

A tool error (missing file, bad bag, corrupt checkpoint, invalid τ) exits with status 2 and one line
naming the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .backends import BACKENDS
from .errors import BagError, FusionAttnError
from .frames import MODALITIES, NS_PER_S, FusedState

log = logging.getLogger("fusion_attn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusion-attn", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and skipped topics")
    verbs = parser.add_subparsers(dest="verb", required=True)

    fuse = verbs.add_parser("fuse", help="fuse one instant of a bag, or an image / point cloud file")
    _model_args(fuse)
    fuse.add_argument("--bag", nargs="+", type=Path, help="rosbag2 folder/file or ROS 1 bag (several: merged by time)")
    fuse.add_argument("--at", type=float, help="seconds after the bag's start (default: its middle)")
    fuse.add_argument("--image", type=Path, help="camera image file (png, jpg, ...)")
    fuse.add_argument("--points", type=Path, help="point cloud: .npy (N,3|4) or KITTI .bin float32 (N,4)")
    fuse.add_argument("--params", type=Path, help="ROS 2 parameter file (config/fusion.yaml); flags override it")
    fuse.add_argument("--json", action="store_true", help="print the fused state as JSON")

    replay = verbs.add_parser("replay", help="fuse whole recordings as the node would; write a bag, a summary and plots")
    _model_args(replay, tau=False)
    replay.add_argument("bags", nargs="+", type=Path, help="rosbag2 folders/files or ROS 1 bags (merged by time)")
    replay.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    replay.add_argument("--params", type=Path, help="ROS 2 parameter file (config/fusion.yaml); flags override it")
    replay.add_argument("--rate", type=float, help="fusion rate [Hz] (default: the parameter file's, else 20)")
    replay.add_argument("--clock", choices=["header", "receive"], default="header",
                        help="recorded time from header stamps (default) or the bag's receive times")
    replay.add_argument("--start", type=float, help="seconds after the start of the recording")
    replay.add_argument("--end", type=float, help="seconds after the start of the recording")
    for name in MODALITIES:
        replay.add_argument(f"--{name}-topic", help=f"{name} topic (default: found by message type)")
    replay.add_argument("--tau", help="τ: one value (global), or a sweep 0.1,0.5,1,2; an entry may be "
                                      "global:camera:lidar:imu")
    replay.add_argument("--no-progress", action="store_true")

    play = verbs.add_parser("play", help="publish a recording's sensor topics on ROS 2 at the recorded rate")
    play.add_argument("bags", nargs="+", type=Path)
    play.add_argument("--rate", type=float, default=1.0, help="speed factor (default 1.0)")
    play.add_argument("--loop", action="store_true", help="start over at the end")
    play.add_argument("--clock", action="store_true", help="publish /clock with the recorded time (use_sim_time) "
                                                           "instead of restamping messages to now")
    play.add_argument("--remap", nargs="*", default=[], metavar="FROM:=TO", help="publish a recorded topic under another name")

    sim = verbs.add_parser("sim-record", help="record simulated episodes (random actions) as a rosbag2 MCAP")
    sim.add_argument("env_id", help="a Gymnasium id, e.g. FusionAttn/Navigate-v0")
    sim.add_argument("-o", "--output", type=Path, required=True, help="the new bag folder")
    sim.add_argument("--episodes", type=int, default=1)
    sim.add_argument("--seconds", type=float, help="stop each episode after this much simulated time")
    sim.add_argument("--seed", type=int, default=0)

    export = verbs.add_parser("export", help="export the model to ONNX and check it")
    _model_args(export, backend=False)
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--opset", type=int, default=18, choices=[17, 18],
                        help="18 (default; TensorRT 10.x) or 17 (TensorRT 8.6, JetPack 5)")

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
    engine.add_argument("--cache-dir", type=Path, help="default: $FUSION_ATTN_CACHE/engines or ~/.cache/fusion_attn/engines")
    engine.add_argument("--device", default="cuda:0")
    engine.add_argument("--calibrate", nargs="+", type=Path, metavar="BAG",
                        help="int8: recordings whose fused instants calibrate the engine")
    engine.add_argument("--calibration-cache", type=Path, help="int8: where the calibration cache is read/written")
    engine.add_argument("--calibration-batches", type=int, default=64, help="int8: at most this many batches of 8")
    engine.add_argument("-o", "--output", type=Path, help="also copy the engine (and its .json sidecar) here")
    engine.add_argument("--trtexec", action="store_true", help="print the matching trtexec command and exit "
                                                               "(needs no TensorRT)")

    launch = verbs.add_parser("launch", help="start fusion_node with config/fusion.yaml, as fusion.launch.py does; "
                                             "`launch robot policy:=P.onnx` also starts policy_node (robot.launch.py)")
    launch.add_argument("arguments", nargs="*", metavar="name:=value",
                        help="[robot] then launch arguments: params_file, checkpoint, backend, tau, camera_topic, lidar_topic, "
                             "imu_topic, use_sim_time, fused_state_topic")

    bench = verbs.add_parser("bench", help="per-stage latency on the standard configuration")
    bench.add_argument("--checkpoint", type=Path)
    bench.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    bench.add_argument("--repeats", type=int, default=300)
    bench.add_argument("--json", type=Path, help="also write the raw report here")

    from rl.__main__ import add_verbs as rl_verbs

    rl_verbs(verbs.add_parser("rl", help="attention-memory RL agents: train, evaluate, export").add_subparsers(
        dest="rl_verb", required=True))

    _train_args(verbs)
    robust = verbs.add_parser("eval-robustness", help="compare trained runs under every single-sensor fault and a τ sweep")
    robust.add_argument("runs", nargs="+", metavar="NAME=RUN", help="name=folder of a `fusion-attn train` run")
    robust.add_argument("-o", "--output", type=Path, required=True, help="folder for robustness.json and the plots")
    robust.add_argument("--tau", default="0.1,0.25,0.5,1,2", help="global τ sweep for attention runs trained with random τ")
    robust.add_argument("--episodes", type=int, default=16, help="held-out simulated episodes")
    robust.add_argument("--bag", nargs="*", type=Path, default=[], help="real recordings: self-supervised loss and attention")
    robust.add_argument("--cache", type=Path, help="tokenized dataset cache (default $FUSION_ATTN_CACHE/train)")
    robust.add_argument("--threads", type=int, default=1)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        verb = {"fuse": _fuse, "replay": _replay, "play": _play, "sim-record": _sim_record, "export": _export,
                "build-engine": _build_engine, "launch": _launch, "bench": _bench, "rl": _rl, "train": _train,
                "eval-robustness": _eval_robustness}
        return verb[args.verb](args)
    except FusionAttnError as exc:
        print(f"fusion-attn {args.verb}: error: {exc}", file=sys.stderr)
        return 2


def _model_args(p: argparse.ArgumentParser, backend: bool = True, tau: bool = True) -> None:
    p.add_argument("--checkpoint", type=Path, help="safetensors checkpoint (default: the packaged model)")
    if backend:
        p.add_argument("--backend", choices=BACKENDS, help="default: onnxruntime (a GPU backend that cannot run "
                                                            "here falls back to it, see backend_fallback)")
        p.add_argument("--threads", type=int)
    if tau:
        p.add_argument("--tau", type=float, nargs=4, metavar=("GLOBAL", "CAMERA", "LIDAR", "IMU"))


def _setup(args, tau=None):
    """The pipeline, sync config and parameters from --params (the node's file) and the flags."""
    from .config import load_params
    from .pipeline import FusionPipeline
    from .sync import SyncConfig

    params = load_params(args.params) if getattr(args, "params", None) else {}
    flags = {"checkpoint": args.checkpoint, "backend": args.backend, "threads": args.threads}
    params.update({k: v for k, v in flags.items() if v})
    params.update({f"tau.{k}": v for k, v in zip(("global", *MODALITIES), tau or ())})
    pipeline = FusionPipeline.from_params(params)
    return pipeline, SyncConfig.from_params(params, pipeline.cfg.imu.window_s), params


def _replay_options(args, params, **overrides):
    """Replay options from the node's parameters (so replay does what the node would), then the flags."""
    from .frames import Modality
    from .replay import ReplayOptions

    topics = {Modality[m.upper()]: t for m in MODALITIES if (t := getattr(args, f"{m}_topic", None))}
    return ReplayOptions(
        fusion_rate_hz=args.rate if getattr(args, "rate", None) is not None else params.get("fusion_rate_hz", 20.0),
        trigger=params.get("trigger", "timer"), diagnostics_period_s=params.get("diagnostics_period_s", 1.0),
        sensors=tuple(m for m in MODALITIES if params.get(f"{m}_type", "") != "none"), topics=topics, **overrides)


def _fuse(args) -> int:
    from .sync import SensorSync

    pipeline, sync_cfg, params = _setup(args, args.tau)
    sync = SensorSync(sync_cfg)
    if args.bag:
        state, notes = _fuse_bag(args, pipeline, sync, params)
    elif args.image or args.points:
        _feed_files(args.image, args.points, sync)
        state, notes = pipeline.fuse(sync.snapshot(0)), []
    else:
        raise FusionAttnError("fuse needs --bag, or --image and/or --points")
    if args.json:
        print(json.dumps(_state_dict(state, pipeline), indent=2))
    else:
        print(_summary(state, pipeline, notes))
    return 0


def _fuse_bag(args, pipeline, sync, params):
    """The fused state at the instant --at: the bag is fed up to there exactly as replay feeds it (same
    sync, drops and resets), then fused once at the newest recorded stamp."""
    from .bag import open_reader
    from .replay import Recording, fuse_recording

    with open_reader(args.bag) as reader:
        duration = reader.end_time - reader.start_time
        at_ns = duration // 2 if args.at is None else int(args.at * NS_PER_S)
        if not 0 <= at_ns <= duration:
            raise BagError(f"--at {at_ns / NS_PER_S:.3f} s is outside the bag (0 .. {duration / NS_PER_S:.3f} s)")
        rec = Recording()
        opts = _replay_options(args, params, end_s=at_ns / NS_PER_S + 1e-9, progress=False)
        try:
            for _ in fuse_recording(reader, pipeline, sync, opts, pipeline.tau[None], rec, trailing=False):
                pass
        except BagError as exc:
            rec.events.append(f"read stopped: {exc}")
    if not rec.topics.sensors:
        raise BagError(f"no camera, lidar or IMU topic in {', '.join(map(str, args.bag))}; skipped: {rec.topics.skipped}")
    now_ns = sync.newest_stamp_ns()
    if now_ns is None:
        raise BagError(f"no sensor message in the first {at_ns / NS_PER_S:.3f} s of the bag (try a later --at)")
    state = pipeline.fuse(sync.snapshot(now_ns))
    notes = [f"{m}: {t}" for m, t in sorted((MODALITIES[m], t) for m, t in rec.topics.sensors.items())]
    notes += [f"skipped {t}: {why}" for t, why in rec.topics.skipped.items()] + rec.events[:5]
    return state, notes


def _sim_record(args) -> int:
    try:
        import gymnasium

        from fusion_attn.sim.record import record
    except ImportError as exc:
        raise FusionAttnError(f"the simulator is not installed ({exc}); pip install -e '.[sim]'") from exc
    try:
        counts = record(args.env_id, args.output, args.episodes, args.seconds, args.seed)
    except FileExistsError as exc:
        raise FusionAttnError(str(exc)) from exc
    except gymnasium.error.Error as exc:
        raise FusionAttnError(f"{args.env_id}: {exc}") from exc
    print(f"wrote {args.output}: " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))
    return 0


def _feed_files(image: Path | None, points: Path | None, sync) -> None:
    """An image file goes through the CompressedImage adapter (the node's converter); points are (N, 3|4)."""
    from rosbags.typesys import Stores, get_typestore

    from .adapters import compressed_image_to_frame
    from .frames import LidarFrame

    if image is not None:
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise FusionAttnError(f"cannot read image {image}: {exc}") from exc
        T = get_typestore(Stores.ROS2_KILTED).types
        header = T["std_msgs/msg/Header"](T["builtin_interfaces/msg/Time"](0, 0), "camera")
        msg = T["sensor_msgs/msg/CompressedImage"](header, image.suffix.lstrip(".").lower(), np.frombuffer(data, np.uint8))
        sync.add(compressed_image_to_frame(msg))
    if points is not None:
        sync.add(LidarFrame(0, "lidar", _load_points(points)))


def _replay(args) -> int:
    from .replay import replay

    pipeline, sync_cfg, params = _setup(args)
    base = pipeline.tau
    taus = tuple(_tau_entry(entry, base) for entry in args.tau.split(",")) if args.tau else (tuple(base.tolist()),)
    opts = _replay_options(args, params, clock=args.clock, start_s=args.start, end_s=args.end, taus=taus,
                           progress=not args.no_progress)
    summary = replay(args.bags, pipeline, args.output, opts, sync_cfg)
    t = summary["timing"]
    print(f"replayed {summary['messages']} messages -> {summary['fusions']} fused states at "
          f"{summary['fused_rate_hz']:.2f} Hz; {t['recorded_s']:.1f} s recorded in {t['wall_s']:.1f} s "
          f"({t['speed_x_real_time']:.1f}x real time)")
    print("  topics: " + ", ".join(f"{m} {t}" for m, t in summary["topics"].items()))
    for topic, why in summary["skipped_topics"].items():
        print(f"  skipped {topic}: {why}")
    print("  attention mean: " + "  ".join(f"{m} {a:.3f}" for m, a in summary["attention_mean"].items()))
    if len(summary["tau_sweep"]) > 1:
        print("  τ sweep (mean attention camera / lidar / imu):")
        for row in summary["tau_sweep"]:
            print(f"    τ {row['tau']}: " + " / ".join(f"{v:.3f}" for v in row["attention_mean"].values()))
    for event in summary["events"][:10]:
        print(f"  note: {event}")
    print(f"  wrote {args.output}/fused (MCAP), summary.json, timing.json, *.png")
    return 0


def _tau_entry(entry: str, base) -> tuple[float, float, float, float]:
    try:
        values = [float(v) for v in entry.split(":")]
    except ValueError:
        raise FusionAttnError(f"--tau entry {entry!r} is not a number or global:camera:lidar:imu") from None
    if len(values) == 1:
        return (values[0], *(float(b) for b in base[1:]))
    if len(values) == 4:
        return tuple(values)
    raise FusionAttnError(f"--tau entry {entry!r} needs 1 or 4 values, got {len(values)}")


def _play(args) -> int:
    import signal

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from .play import StopRequest, play

    bad = [item for item in args.remap if ":=" not in item]
    if bad:
        raise FusionAttnError(f"--remap takes FROM:=TO, got {bad}")
    remap = dict(item.split(":=", 1) for item in args.remap)
    # our own handler, not rclpy's: that one invalidates the context before the publishers are flushed
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    stop, handled = StopRequest(), (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    node = rclpy.create_node("fusion_attn_play")
    try:
        for sig in handled:
            signal.signal(sig, stop)
        count = play(node, args.bags, remap=remap, rate=args.rate, clock=args.clock, loop=args.loop, stop=stop)
        print(f"{'stopped after' if stop.requested else 'published'} {count} messages")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _load_points(path: Path) -> np.ndarray:
    try:
        pts = np.load(path) if path.suffix == ".npy" else np.fromfile(path, np.float32).reshape(-1, 4)
    except (OSError, ValueError) as exc:
        raise FusionAttnError(f"cannot read points {path}: {exc}") from exc
    if pts.ndim != 2 or pts.shape[1] not in (3, 4):
        raise FusionAttnError(f"points {path}: expected (N, 3) or (N, 4), got {pts.shape}")
    pts = np.pad(pts.astype(np.float32), ((0, 0), (0, 4 - pts.shape[1])))
    return pts[np.isfinite(pts).all(axis=1)]


def _state_dict(state: FusedState, pipeline) -> dict:
    return {
        "stamp_ns": state.stamp_ns, "frame_id": state.frame_id, "all_masked": state.all_masked,
        "backend": pipeline.backend_info(), "model": pipeline.model_source, "tau": state.tau.tolist(),
        "modalities": {name: {"present": bool(state.present[i]),
                              "age_s": None if np.isnan(state.ages_s[i]) else float(state.ages_s[i]),
                              "attention_per_head": state.attention[i].round(6).tolist()}
                       for i, name in enumerate(MODALITIES)},
        "fused": state.pooled.round(6).tolist(), "timings_ms": state.timings_ms,
    }


def _summary(state: FusedState, pipeline, notes: list[str]) -> str:
    b = pipeline.backend
    lines = [(f"fused state @ {state.stamp_ns / NS_PER_S:.6f} s  frame {state.frame_id}  "
              f"backend {b.name} ({b.device}, {b.precision})  model: {pipeline.model_source}")]
    if pipeline.backend_fallback:
        lines.append(f"  fallback: {pipeline.backend_fallback}")
    lines += [f"  input  {n}" for n in notes]
    lines.append("  tau    global {:.3g}  camera {:.3g}  lidar {:.3g}  imu {:.3g}".format(*state.tau))
    lines.append(f"  {'modality':8} {'present':>7} {'age ms':>8} {'attention':>9}   per head")
    for i, name in enumerate(MODALITIES):
        age = "-" if np.isnan(state.ages_s[i]) else f"{state.ages_s[i] * 1e3:.1f}"
        heads = " ".join(f"{a:.3f}" for a in state.attention[i])
        lines.append(f"  {name:8} {'yes' if state.present[i] else 'no':>7} {age:>8} {state.modality_attention[i]:9.3f}   {heads}")
    if state.all_masked:
        lines.append("  ALL SENSORS MASKED: the fused state is the model's empty-input output")
    v = state.pooled
    lines.append(f"  fused  dim {v.size}  norm {np.linalg.norm(v):.3f}  first 6 {np.array2string(v[:6], precision=3)}")
    lines.append("  time   " + "  ".join(f"{k} {t:.2f} ms" for k, t in state.timings_ms.items()))
    return "\n".join(lines)


def _export(args) -> int:
    from .backends.export import example_inputs, export_onnx, unsupported_ops
    from .pipeline import create_backend, load_model

    model, source = load_model(args.checkpoint)
    path = export_onnx(model, args.output, opset=args.opset)
    x = example_inputs(model, batch=3)
    ort_out = create_backend("onnxruntime", model, onnx_path=path).run(x)
    torch_out = create_backend("torch", model).run(x)
    diff = max(float(np.abs(ort_out[k].astype(np.float64) - torch_out[k]).max()) for k in ort_out)
    bad = unsupported_ops(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) from {source}")
    print(f"  parity torch vs onnxruntime, batch 3: max abs diff {diff:.2e}")
    print(f"  TensorRT ONNX parser allow-list: {'all ops supported' if not bad else 'UNSUPPORTED: ' + ', '.join(bad)}")
    return 0 if not bad and diff < 1e-4 else 1


def _build_engine(args) -> int:
    import shutil

    from .backends.engine_cache import TensorRTOptions, file_sha256, trtexec_command
    from .backends.export import OPSET, TENSORRT8_OPSET
    from .config import load_params
    from .errors import BackendUnavailable
    from .pipeline import load_model, onnx_for

    try:
        from .backends import tensorrt_backend as trt_backend
    except (ImportError, OSError) as exc:
        if not args.trtexec:
            raise BackendUnavailable(f"TensorRT is not installed here ({type(exc).__name__}: {exc}); build engines on "
                                     "the robot or GPU machine that runs them (docs/TENSORRT.md)") from exc
        trt_backend = None
    params = load_params(args.params) if args.params else {}
    for name in ("precision", "workspace_mib", "max_batch", "opt_batch", "dla_core", "cache_dir", "calibration_cache"):
        if getattr(args, name) is not None:
            params[f"tensorrt.{name}"] = getattr(args, name)
    model, source = load_model(args.checkpoint or params.get("checkpoint") or None)
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
            calibration = _calibration_batches(args.calibrate, model.cfg, params, args.calibration_batches)
    opts = TensorRTOptions.from_params(params)
    backend = trt_backend.TensorRTBackend(onnx, opts, device=args.device, calibration=calibration)
    print(f"engine {backend.engine_path}\n  sidecar {backend.engine_path.with_suffix('.json')}\n"
          f"  from {onnx} ({source})\n  runs {backend.precision} on {backend.device}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(backend.engine_path, args.output)
        shutil.copyfile(backend.engine_path.with_suffix(".json"), args.output.with_suffix(".json"))
        print(f"  copied to {args.output}")
    return 0


def _calibration_batches(bags, cfg, params, max_batches: int, batch: int = 8):
    """Batches of 8 model inputs from the fused instants of recordings (the INT8 calibration set)."""
    from .replay import ReplayOptions, recorded_inputs
    from .sync import SyncConfig

    opts = ReplayOptions(fusion_rate_hz=params.get("fusion_rate_hz", 20.0), progress=False)
    pending = []
    for _, x in recorded_inputs(bags, cfg, opts, SyncConfig.from_params(params, cfg.imu.window_s)):
        pending.append(x)
        if len(pending) == batch:
            yield {k: np.stack([p[k] for p in pending]) for k in pending[0]}
            pending, max_batches = [], max_batches - 1
            if max_batches == 0:
                return


def _rl(args) -> int:
    from rl.__main__ import run

    return run(argparse.Namespace(**{**vars(args), "verb": args.rl_verb}))


def _launch(args) -> int:
    from .launcher import run

    return run(args.arguments)


def _bench(args) -> int:
    from . import bench

    report = bench.run(threads=tuple(args.threads), repeats=args.repeats, checkpoint=args.checkpoint)
    print(f"machine: {report['machine']}\nmodel: {report['model']}, {report['repeats']} repeats per stage\n")
    print(bench.to_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _train_args(verbs) -> None:
    # defaults live in train.TrainConfig (docs/TRAINING.md lists them); unset flags keep them, and
    # building the parser does not import torch
    train = verbs.add_parser("train", help="train the model and its heads on simulated episodes and recordings",
                             argument_default=argparse.SUPPRESS)
    train.add_argument("-o", "--output", type=Path, required=True,
                       help="run folder: model.safetensors, model.heads.safetensors, tb/, metrics.json, train_state.pt")
    train.add_argument("--bag", dest="bags", nargs="+", type=Path, help="recordings to add (unlabelled: "
                                                                         "self-supervised objectives only)")
    train.add_argument("--steps", type=int, help="optimizer steps (default 3000)")
    train.add_argument("--batch", type=int, help="samples per step (default 64)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    train.add_argument("--seed", type=int, help="seeds the episodes, the initial weights and the data stream (default 0)")
    train.add_argument("--sim-episodes", type=int, help="simulated training episodes (default 48; 0: bags only)")
    train.add_argument("--val-episodes", type=int, help="held-out simulated episodes (default 8; 0: no validation)")
    train.add_argument("--sim-seconds", type=float, help="simulated time per episode (default 15)")
    train.add_argument("--fusion", choices=["attention", "concat", "mean"],
                       help="attention (default: FusionModel) or a baseline without attention (eval-robustness)")
    train.add_argument("--fixed-tau", dest="tau_random_prob", action="store_const", const=0.0,
                       help="train at τ = 1 only (a baseline; default: random τ for half the samples)")
    train.add_argument("--avoid-weight", type=float, help="weight of the attention-avoidance objective: attention mass "
                                                          "on a sensor whose content is gone (default 1; 0: off)")
    train.add_argument("--eval-every", type=int, help="validation every this many steps (default 500; also at the end)")
    train.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    train.add_argument("--cache", type=Path, default=None, help="tokenized dataset cache "
                                                                 "(default $FUSION_ATTN_CACHE/train)")
    train.add_argument("--resume", action="store_true", default=False, help="continue from OUT/train_state.pt")
    train.add_argument("--stop-after", type=int, default=None, help="save and stop after this step (a time-boxed job); "
                                                                     "--resume continues exactly")
    train.add_argument("--no-progress", action="store_true", default=False)


def _train(args) -> int:
    import dataclasses

    from .errors import ConfigError
    from .train import TrainConfig, train

    fields = ("seed", "steps", "batch", "lr", "sim_episodes", "val_episodes", "sim_seconds", "bags", "fusion",
              "tau_random_prob", "avoid_weight", "eval_every")
    given = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if "bags" in given:
        given["bags"] = tuple(str(b) for b in given["bags"])
    tc = dataclasses.replace(TrainConfig(), **given)
    if min(tc.sim_episodes, tc.val_episodes) < 0 or min(tc.steps, tc.batch, args.threads) < 1:
        raise ConfigError("--steps, --batch and --threads must be >= 1, --sim-episodes and --val-episodes >= 0")
    if tc.sim_episodes == 0 and not tc.bags:
        raise ConfigError("no training data: give --sim-episodes > 0 or --bag")
    try:
        import torch.utils.tensorboard  # noqa: F401

        if tc.sim_episodes or tc.val_episodes:
            import fusion_attn.sim  # noqa: F401
    except ImportError as exc:
        raise FusionAttnError(f"training needs the train and sim extras ({exc}); pip install -e '.[sim,train]'") from exc
    # the command as run (recorded in the checkpoint), with every setting spelled out
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in given.items() if k not in ("bags", "tau_random_prob")]
    flags += ["--fixed-tau"] if "tau_random_prob" in given else []
    command = " ".join(["fusion-attn train -o", str(args.output), *flags, *(["--bag", *tc.bags] if tc.bags else []),
                        f"--threads {args.threads}", *(["--resume"] if args.resume else [])])
    m = train(tc, args.output, resume=args.resume, device=args.device, threads=args.threads, cache=args.cache,
              progress=not args.no_progress, command=command, stop_after=args.stop_after)
    clean = m["val"].get("clean", {})
    print(f"trained {m['steps']} steps in {m['train_s']:.0f} s on {m['device']} ({m['data']['train_samples']} training "
          f"samples, {m['data']['train_bag_samples']} from bags; dataset {m['data']['dataset_s']:.0f} s)")
    if clean:
        print("  validation, clean: " + "  ".join(f"{k} {v:.3g}" for k, v in clean.items()))
    model = "model.safetensors, " if tc.fusion == "attention" else ""  # a baseline's weights: train_state.pt only
    print(f"  wrote {args.output}/{model}model.heads.safetensors, metrics.json, tb/, train_state.pt")
    return 0

def _eval_robustness(args) -> int:
    from .robustness import run_evaluation
    from .train import default_cache

    runs = dict(r.split("=", 1) for r in args.runs if "=" in r)
    if len(runs) != len(args.runs):
        raise FusionAttnError(f"runs are NAME=FOLDER, got {args.runs}")
    try:
        taus = [float(t) for t in args.tau.split(",")]
    except ValueError:
        raise FusionAttnError(f"--tau takes comma-separated numbers, got {args.tau!r}") from None
    report = run_evaluation({n: Path(f) for n, f in runs.items()}, args.output, taus, args.episodes,
                            args.cache or default_cache(), args.bag, args.threads)
    print(f"{report['test_samples']} held-out samples from {args.episodes} episodes; wrote {args.output}/robustness.json")
    for name, rows in report["summary"].items():
        worst = max((r for c, r in rows.items() if c != "clean"), key=lambda r: r["rise"])
        print(f"  {name}: clean head error {rows['clean']['head_error']:.3f}, worst rise {100 * worst['rise']:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
