"""Replay speed on the standard configuration (issue #4), as a multiple of real time.

    python benchmarks/replay_speed.py [--seconds 10] [--batch 16] [--out benchmarks/results/replay_speed.json]

Writes a rosbag2 MCAP of `--seconds` of the standard sensor set (640x480 bgr8 Image at 30 Hz,
120,000-point PointCloud2 at 10 Hz, Imu at 400 Hz; the core benchmark's payloads) into a temporary
folder, replays it with the default options (20 Hz fusion, ONNX Runtime, 1 thread) and reports
recorded seconds per wall second (from replay's own timing: reading, fusing and writing; start-up
and plots excluded), then replays it again with --batch (its speed, and its fused bag compared with the
first's, message by message), then profiles a further run to show where the time goes.

Floors, each measured alone on the same recording: reading every message's bytes from the bag
(no decoding), and tokenizing its clouds and the camera frames a 20 Hz fusion uses. Each one's
speed is the most a replay that did that part and nothing else could reach.
"""

import argparse
import cProfile
import datetime
import json
import pstats
import tempfile
import time
from pathlib import Path

from fusion_attn.adapters import to_frame
from fusion_attn.bag import open_reader
from fusion_attn.bench import machine, standard_messages, write_standard_bag
from fusion_attn.pipeline import FusionPipeline
from fusion_attn.replay import ReplayOptions, fused_difference, replay
from fusion_attn.tokenize import tokenize_camera, tokenize_lidar

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seconds", type=float, default=10.0)
parser.add_argument("--batch", type=int, default=16, help="also replay with --batch N (instants per model call), "
                                                           "compared with the unbatched output; 1: not")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "replay_speed.json")
args = parser.parse_args()

image, cloud, _ = standard_messages()

with tempfile.TemporaryDirectory() as tmp:
    bag = Path(tmp) / "standard"
    start = time.perf_counter()
    n_messages = write_standard_bag(bag, args.seconds)
    size_mb = sum(f.stat().st_size for f in bag.iterdir()) / 1e6
    print(f"wrote {n_messages} messages, {size_mb:.0f} MB, in {time.perf_counter() - start:.1f} s")

    pipeline = FusionPipeline.create(None, backend="onnxruntime", threads=1)
    start = time.perf_counter()
    with open_reader([bag]) as reader:
        raw_bytes = sum(len(raw) for _, _, raw in reader.messages())
    floors = {"read message bytes only": time.perf_counter() - start}
    cloud_frame, image_frame = to_frame(cloud), to_frame(image)
    start = time.perf_counter()
    for _ in range(int(args.seconds * 10)):
        tokenize_lidar(cloud_frame, pipeline.cfg.lidar)
    floors["tokenize the clouds only (10 Hz)"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(int(args.seconds * 20)):
        tokenize_camera(image_frame, pipeline.cfg.camera)
    floors["tokenize the fused camera frames only (20 Hz)"] = time.perf_counter() - start
    summary = replay([bag], pipeline, Path(tmp) / "out", ReplayOptions(progress=False))  # the measured run
    batched = None
    if args.batch > 1:  # the same replay, many instants per call, against one at a time
        timing = replay([bag], pipeline, Path(tmp) / "batched", ReplayOptions(progress=False, batch=args.batch))["timing"]
        batched = {"batch": args.batch, "speed_x_real_time": timing["speed_x_real_time"],
                   "vs_batch_1": fused_difference(Path(tmp) / "out", Path(tmp) / "batched")}
    profile = cProfile.Profile()  # a second run, profiled, for the breakdown only
    profile.enable()
    replay([bag], pipeline, Path(tmp) / "profiled", ReplayOptions(progress=False))
    profile.disable()

stats = pstats.Stats(profile)
stages = {"read + deserialize (rosbags)": ("anyreader.py", "deserialize"), "adapters": ("adapters.py", "guarded"),
          "sync.add": ("sync.py", "add"), "tokenize": ("tokenize.py", "__call__"), "model (onnxruntime)": ("onnxruntime_backend.py", "run"),
          "write output bag": ("replay.py", "write_state"), "plots": ("plots.py", "replay_plots")}
cumulative = {name: 0.0 for name in stages}
for (file, _, func), (_, _, _, cum, _) in stats.stats.items():
    for name, (f, fn) in stages.items():
        if file.endswith(f) and func == fn:
            cumulative[name] += cum
t = summary["timing"]
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "recorded_s": t["recorded_s"],
          "bag_mb": size_mb, "message_mb": raw_bytes / 1e6, "messages": summary["messages"], "fusions": summary["fusions"], "wall_s": t["wall_s"],
          "speed_x_real_time": t["speed_x_real_time"],
          "floors_s": {k: round(v, 3) for k, v in floors.items()},
          "floors_x_real_time": {k: round(args.seconds / v, 1) for k, v in floors.items()},
          "batched": batched,
          "profile_s": {k: round(v, 3) for k, v in cumulative.items()},
          "profile_note": "cumulative seconds per stage in a second, cProfile-instrumented run (slower than the measured one)"}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
print(f"{'met' if t['speed_x_real_time'] >= 50 else 'MISSED'}: at least 50x real time")
