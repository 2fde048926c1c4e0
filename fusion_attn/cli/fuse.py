"""`fusion-attn fuse`: one fusion, at one instant of a recording or from an image and/or point cloud file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import BagError, FusionAttnError
from ..frames import MODALITIES, NS_PER_S, FusedState
from ..outputs import TRUST_THRESHOLD, untrusted
from .common import fusion_setup, model_args, replay_options
from .replay import topic_args


def add_parser(verbs):
    fuse = verbs.add_parser("fuse", help="fuse one instant of a bag, or an image / point cloud file")
    model_args(fuse)
    fuse.add_argument("--bag", nargs="+", type=Path, help="rosbag2 folder/file or ROS 1 bag (several: merged by time)")
    fuse.add_argument("--at", type=float, help="seconds after the bag's start (default: its middle)")
    topic_args(fuse)
    fuse.add_argument("--image", type=Path, help="camera image file (png, jpg, ...)")
    fuse.add_argument("--points", type=Path, help="point cloud: .npy (N,3|4) or KITTI .bin float32 (N,4)")
    fuse.add_argument("--params", type=Path, help="ROS 2 parameter file (config/fusion.yaml); flags override it")
    fuse.add_argument("--json", action="store_true", help="print the fused state as JSON (with a bag: and the "
                                                          "topics, the notes, the instant asked and fused)")
    return fuse


def run(args) -> int:
    from ..sync import SensorSync

    pipeline, sync_cfg, params = fusion_setup(args, args.tau)
    sync = SensorSync(sync_cfg)
    if args.bag:
        state, about = _fuse_bag(args, pipeline, sync, params)
    elif args.image or args.points:
        _feed_files(args.image, args.points, sync)
        state, about = pipeline.fuse(sync.snapshot(0)), {}
    else:
        raise FusionAttnError("fuse needs --bag, or --image and/or --points")
    if args.json:
        print(json.dumps({**_state_dict(state, pipeline), **about}, indent=2))
    else:
        notes = [*(f"{m}: {t}" for m, t in about.get("topics", {}).items()),
                 *(f"skipped {t}: {why}" for t, why in about.get("skipped_topics", {}).items()), *about.get("notes", ())]
        print(_summary(state, pipeline, notes, about.get("fused_at_s")))
    return 0


def _fuse_bag(args, pipeline, sync, params) -> tuple[FusedState, dict]:
    """The fused state at the instant --at: the bag is fed up to there exactly as replay feeds it (same
    topics, sync, drops and resets), then fused once at the newest recorded stamp. -> (state, what a
    user needs to judge it: topics, notes, the instant asked and the one fused, in seconds after the
    bag's start as --at takes them)."""
    from ..bag import open_reader
    from ..replay import Recording, fuse_recording

    with open_reader(args.bag) as reader:
        start, duration = reader.start_time, reader.end_time - reader.start_time
        if args.at is not None and not math.isfinite(args.at):
            raise BagError(f"--at must be finite seconds, got {args.at}")
        at_ns = duration // 2 if args.at is None else int(args.at * NS_PER_S)
        if not 0 <= at_ns <= duration:
            raise BagError(f"--at {at_ns / NS_PER_S:.3f} s is outside the bag (0 .. {duration / NS_PER_S:.3f} s)")
        rec = Recording()
        opts = replay_options(args, params, end_s=at_ns / NS_PER_S + 1e-9, progress=False)
        for _ in fuse_recording(reader, pipeline, sync, opts, pipeline.tau[None], rec, trailing=False):
            pass
    if not rec.topics.sensors:
        raise BagError(f"no camera, lidar or IMU topic in {', '.join(map(str, args.bag))}; skipped: {rec.topics.skipped}")
    asked = f"--at {at_ns / NS_PER_S:.3f} s" if args.at is not None else f"the bag's middle ({at_ns / NS_PER_S:.3f} s)"
    now_ns = sync.newest_stamp_ns()
    if now_ns is None:
        if rec.fault:
            raise BagError(f"no sensor message could be read before {asked}: read stopped: {rec.fault}")
        raise BagError(f"no sensor message in the first {at_ns / NS_PER_S:.3f} s of the bag (try a later --at)")
    state = pipeline.fuse(sync.snapshot(now_ns))
    notes = rec.notes(sync)  # the read fault first
    fused_ns = now_ns - start
    if at_ns - fused_ns > NS_PER_S / opts.fusion_rate_hz:  # further back than the node's timer would have fused
        why = "the read stopped before it" if rec.fault else "no sensor message in between"
        notes.append(f"fused at {fused_ns / NS_PER_S:.3f} s, not at {asked}: {why}")
    return state, {"topics": {MODALITIES[m]: t for m, t in sorted(rec.topics.sensors.items())},
                   "skipped_topics": rec.topics.skipped, "read_fault": rec.fault, "notes": notes,
                   "at_s": at_ns / NS_PER_S, "fused_at_s": fused_ns / NS_PER_S}


def _feed_files(image: Path | None, points: Path | None, sync) -> None:
    """An image file goes through the CompressedImage adapter (the node's converter); points are (N, 3|4)."""
    from ..adapters import compressed_image_to_frame
    from ..frames import LidarFrame
    from ..messages import TYPES

    if image is not None:
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise FusionAttnError(f"cannot read image {image}: {exc}") from exc
        T = TYPES.types
        header = T["std_msgs/msg/Header"](T["builtin_interfaces/msg/Time"](0, 0), "camera")
        msg = T["sensor_msgs/msg/CompressedImage"](header, image.suffix.lstrip(".").lower(), np.frombuffer(data, np.uint8))
        sync.add(compressed_image_to_frame(msg))
    if points is not None:
        sync.add(LidarFrame(0, "lidar", _load_points(points)))


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
                              "attention_per_head": _rounded(state.attention[i]),
                              "trust": None if state.trust is None else round(float(state.trust[i]), 6)}
                       for i, name in enumerate(state.sensors)},
        "fused": _rounded(state.pooled), "timings_ms": state.timings_ms,
        "ego_rate": None if state.ego_rate is None else dict(zip(("speed_mps", "yaw_rate_radps"), _rounded(state.ego_rate))),
    }


def _rounded(values: np.ndarray) -> list[float]:
    """To 6 decimals, in float64: float32 values rounded stay float32, 0.1234560012817383 in JSON."""
    return values.astype(np.float64).round(6).tolist()


def _summary(state: FusedState, pipeline, notes: list[str], fused_at_s: float | None = None) -> str:
    """The text table; fused_at_s: the instant in seconds after the bag's start (fused from a bag)."""
    b = pipeline.backend
    when = f"{state.stamp_ns / NS_PER_S:.6f} s" if fused_at_s is None else f"{fused_at_s:.3f} s into the bag"
    lines = [(f"fused state @ {when}  frame {state.frame_id}  "
              f"backend {b.name} ({b.device}, {b.precision})  model: {pipeline.model_source}")]
    if pipeline.backend_fallback:
        lines.append(f"  fallback: {pipeline.backend_fallback}")
    lines += [f"  input  {n}" for n in notes]
    lines.append("  tau    " + "  ".join(f"{name} {t:.3g}" for name, t in zip(("global", *state.sensors), state.tau)))
    lines.append(f"  {'modality':8} {'present':>7} {'age ms':>8} {'attention':>9} {'trust':>6}   attention per head")
    for i, name in enumerate(state.sensors):
        age = "-" if np.isnan(state.ages_s[i]) else f"{state.ages_s[i] * 1e3:.1f}"
        trust = "-" if state.trust is None else f"{state.trust[i]:.3f}"
        heads = " ".join(f"{a:.3f}" for a in state.attention[i])
        lines.append(f"  {name:8} {'yes' if state.present[i] else 'no':>7} {age:>8} {state.modality_attention[i]:9.3f} "
                     f"{trust:>6}   {heads}")
    if state.all_masked:
        lines.append("  ALL SENSORS MASKED: the fused state is the model's empty-input output")
    if low := untrusted(state):
        lines.append(f"  NOT TRUSTED (trust < {TRUST_THRESHOLD:g}): " + ", ".join(f"{m} {t:.3f}" for m, t in low))
    if state.ego_rate is not None:
        lines.append(f"  ego    speed {state.ego_rate[0]:.3f} m/s  yaw rate {state.ego_rate[1]:.3f} rad/s")
    v = state.pooled
    lines.append(f"  fused  dim {v.size}  norm {np.linalg.norm(v):.3f}  first 6 {np.array2string(v[:6], precision=3)}")
    lines.append("  time   " + "  ".join(f"{k} {t:.2f} ms" for k, t in state.timings_ms.items()))
    return "\n".join(lines)
