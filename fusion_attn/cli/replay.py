"""`fusion-attn replay`: whole recordings fused as the node would; a bag of the output, a summary, plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapters import SUPPORTED_TYPES, modality_of
from ..bag import topic_flag
from ..errors import FusionAttnError
from ..frames import MODALITIES, Modality, kind_of
from ..params import PARAM_DEFAULTS, param
from .common import fusion_setup, model_args, replay_options

NOTES_SHOWN = 10  # on the console; summary.json holds 100


def add_parser(verbs):
    replay = verbs.add_parser("replay", help="fuse whole recordings as the node would; write a bag, a summary and plots")
    model_args(replay, tau=False)
    replay.add_argument("bags", nargs="+", type=Path, help="rosbag2 folders/files or ROS 1 bags (merged by time)")
    replay.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    replay.add_argument("--params", type=Path, help="ROS 2 parameter file (config/fusion.yaml); flags override it")
    replay.add_argument("--rate", type=float, help="fusion rate [Hz] (default: the parameter file's, else "
                                                   f"{PARAM_DEFAULTS['fusion_rate_hz']:g})")
    replay.add_argument("--clock", choices=["header", "receive"], default="header",
                        help="recorded time from header stamps (default) or the bag's receive times")
    replay.add_argument("--start", type=float, help="seconds after the start of the recording")
    replay.add_argument("--end", type=float, help="seconds after the start of the recording")
    topic_args(replay)
    replay.add_argument("--tau", help="τ: one value (global), or a sweep 0.1,0.5,1,2; an entry may be "
                                      "global:camera:lidar:imu (and :odometry, :imu2 for a model that reads them)")
    replay.add_argument("--attention-at", metavar="T1,T2,...",
                        help="write attention_<t>.png, where the fusion looks, at these seconds after the start of "
                             "the recording (docs/ATTENTION_MAPS.md)")
    replay.add_argument("--attention-video", action="store_true",
                        help="write attention.mp4: that picture over the recording, a few per second of recorded time")
    replay.add_argument("--each", action="store_true",
                        help="each path is its own recording, not parts of one: folders of recordings, glob patterns "
                             "and list files (.txt: a path per line) expand; OUTPUT/<name>/ per recording and "
                             "OUTPUT/index.json")
    replay.add_argument("--jobs", type=int, default=1,
                        help="processes at once, one thread each unless --threads: with --each, recordings replayed at "
                             "once; without, one recording replayed in that many time windows, with the outputs of "
                             "one replay of the whole")
    replay.add_argument("--ray", metavar="ADDRESS", help="with --each: replay on Ray instead, a task per recording: "
                                                         "'auto' (the cluster on this machine, else a new local one) "
                                                         "or a cluster address (docs/SCALE_OUT.md)")
    replay.add_argument("--batch", type=int, default=1, metavar="N",
                        help="fusion instants per backend call (default 1): a GPU backend's throughput for offline "
                             "replay; the outputs are the same as one at a time")
    replay.add_argument("--no-progress", action="store_true")
    return replay


def run(args) -> int:
    if args.each:
        return _run_each(args)
    if args.ray:
        raise FusionAttnError("--ray replays several recordings: add --each (without it the bags are parts of one "
                              "recording, merged by time)")
    if args.jobs > 1 and args.threads is None:
        args.threads = 1  # a core per window
    from ..replay import replay, written_outputs

    at = _instants(args.attention_at) if args.attention_at else ()
    pipeline, sync_cfg, params, opts = _setup(args, attention_at_s=at, attention_video=args.attention_video)
    model = None
    if at or args.attention_video:  # the token weights come from the torch model, the same weights the pipeline runs
        from ..pipeline import load_model

        model, _ = load_model(param(params, "checkpoint") or None)
    summary = replay(args.bags, pipeline, args.output, opts, sync_cfg, attention_model=model, jobs=args.jobs,
                     params=params)
    t = summary["timing"]
    print(f"replayed {summary['messages']} messages -> {summary['fusions']} fused states in frame "
          f"{summary['frame_id']} at "
          f"{summary['fused_rate_hz']:.2f} Hz; {t['recorded_s']:.1f} s recorded in {t['wall_s']:.1f} s "
          f"({t['speed_x_real_time']:.1f}x real time)")
    if w := t.get("windows"):
        print(f"  replayed whole, not in windows: {w['replayed_whole']}" if "replayed_whole" in w else
              f"  in {w['windows']} windows on {w['jobs']} processes ({w['redone']} redone from the window before)")
    print("  topics: " + ", ".join(f"{m} {t}" for m, t in summary["topics"].items()))
    for topic, why in summary["skipped_topics"].items():
        print(f"  skipped {topic}: {why}")
    print("  attention mean: " + "  ".join(f"{m} {a:.3f}" for m, a in summary["attention_mean"].items()))
    print("  trust mean while present: " + "  ".join(f"{m} {_num(t, '.3f')}" for m, t in summary["trust_mean"].items()))
    print("  not trusted, share of fusions: " + "  ".join(f"{m} {_num(s, '.1%')}" for m, s in summary["untrusted_share"].items()))
    if len(summary["tau_sweep"]) > 1:
        print("  τ sweep (mean attention camera / lidar / imu):")
        for row in summary["tau_sweep"]:
            print(f"    τ {row['tau']}: " + " / ".join(f"{v:.3f}" for v in row["attention_mean"].values()))
    if maps := summary.get("attention_maps"):
        _print_maps(maps)
    for event in summary["events"][:NOTES_SHOWN]:  # the read fault and the drops per sensor come first
        print(f"  note: {event}")
    if summary["events_total"] > NOTES_SHOWN:
        print(f"  ({summary['events_total'] - NOTES_SHOWN} more notes in summary.json)")
    wrote = sorted(p.name for p in written_outputs(args.output))
    print(f"  wrote {', '.join(wrote)} in {args.output}")
    return 0


def _run_each(args) -> int:
    """--each: every recording replayed on its own into OUTPUT/<name>/, in parallel; OUTPUT/index.json."""
    import json
    import time

    from ..batch import expand_recordings, output_names, run_jobs

    if args.attention_at or args.attention_video:
        raise FusionAttnError("--attention-at and --attention-video take one recording: replay it without --each")
    recordings = expand_recordings(args.bags)
    names = output_names(recordings)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.threads is None and (args.jobs > 1 or args.ray):
        args.threads = 1  # a core per recording
    args.no_progress = True  # bars from parallel jobs would interleave
    print(f"replaying {len(recordings)} recordings, "
          + (f"on Ray ({args.ray})" if args.ray else f"{max(args.jobs, 1)} at a time"))
    start, rows = time.perf_counter(), []
    for result in run_jobs(replay_one, [(args, rec, args.output / name) for rec, name in zip(recordings, names)],
                           jobs=args.jobs, ray=args.ray):
        _, rec, out = result.args
        row = {"recording": str(rec), "output": out.name, "ok": result.ok, "error": result.error,
               "wall_s": round(result.wall_s, 3), **(result.value or {})}
        rows.append(row)
        print(f"  {out.name}: " + (f"{row['fusions']} fused states, {row['speed_x_real_time']:.1f}x real time"
                                   + (f", read stopped: {row['read_fault']}" if row["read_fault"] else "")
                                   if result.ok else f"FAILED: {result.error}"), flush=True)
    wall_s = time.perf_counter() - start
    failed = [r["recording"] for r in rows if not r["ok"]]
    index = {"recordings": rows, "jobs": args.jobs, "ray": args.ray, "wall_s": round(wall_s, 3), "failed": len(failed)}
    (args.output / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"  {len(rows) - len(failed)} of {len(rows)} replayed in {wall_s:.1f} s; index: {args.output / 'index.json'}")
    if failed:
        print(f"error: {len(failed)} recording(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def replay_one(args, recording: Path, out: Path) -> dict:
    """One recording of --each, in a job's process: the same pipeline and options as a plain replay."""
    from ..replay import replay

    pipeline, sync_cfg, _, opts = _setup(args)
    summary = replay([recording], pipeline, out, opts, sync_cfg)
    return {"messages": summary["messages"], "fusions": summary["fusions"], "read_fault": summary["read_fault"],
            "speed_x_real_time": summary["timing"]["speed_x_real_time"], "recorded_s": summary["timing"]["recorded_s"],
            "events_total": summary["events_total"]}


def _setup(args, **overrides):
    """-> pipeline, sync config, parameters and replay options from the flags (and --params)."""
    pipeline, sync_cfg, params = fusion_setup(args)
    base = pipeline.tau
    taus = (tuple(_tau_entry(entry, base) for entry in args.tau.split(",")) if args.tau is not None
            else (tuple(base.tolist()),))
    opts = replay_options(args, params, clock=args.clock, start_s=args.start, end_s=args.end, taus=taus,
                          progress=not args.no_progress, batch=args.batch, **overrides)
    return pipeline, sync_cfg, params, opts


def topic_args(p: argparse.ArgumentParser) -> None:
    """--camera-topic, --lidar-topic, --imu-topic, --odometry-topic, --imu2-topic: replay's and fuse's choice of
    topics (see bag.find_topics)."""
    for m in Modality:
        types = " or ".join(t for t in SUPPORTED_TYPES if modality_of(t) is kind_of(m))
        default = (f"the {types} topic with the most points" if kind_of(m) is Modality.LIDAR
                   else f"the busiest {types}" + (" the IMU does not read" if m is Modality.IMU2 else ""))
        p.add_argument(topic_flag(m), metavar="TOPIC", help=f"the {MODALITIES[m]} topic (default: {default})")


def _tau_entry(entry: str, base) -> tuple[float, ...]:
    """One --tau entry: a global τ (the others from `base`), or one per τ of the model, global:camera:lidar:imu
    (:odometry)(:imu2)."""
    try:
        values = [float(v) for v in entry.split(":")]
    except ValueError:
        raise FusionAttnError(f"--tau entry {entry!r} is not a number or global:camera:lidar:imu") from None
    if len(values) == 1:
        return (values[0], *(float(b) for b in base[1:]))
    if len(values) == len(base):
        return tuple(values)
    raise FusionAttnError(f"--tau entry {entry!r} needs 1 or {len(base)} values (the model's τ), got {len(values)}")


def _instants(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise FusionAttnError(f"--attention-at {text!r}: expected seconds separated by commas, e.g. 3.5,10") from None


def _print_maps(maps: dict) -> None:
    """Where each picture went, and its occlusion check (the summary's attention_maps)."""
    for t, m in maps["instants"].items():
        if m["file"] is None:
            print(f"  attention at {t} s: {m['note']}")
            continue
        k = m["occlusion"]["k"]
        checks = "; ".join(f"{s} top {k} {o['top']:.3f} vs {k} random {o['random']:.3f}"
                           for s, o in m["occlusion"].items() if s != "k" and o is not None)
        print(f"  attention at {t} s -> {m['file']} (fused at {m['fused_at_s']:.3f} s); fused-state change when "
              f"masking {checks or 'none: too few tokens'}")
    if video := maps["video"]:
        print(f"  attention video -> {video['file']} ({video['frames']} frames at {video['hz']:g} Hz)")


def _num(value: float | None, spec: str) -> str:
    """A summary figure; None (never present, or a model without trust output) as "-"."""
    return "-" if value is None else format(value, spec)
