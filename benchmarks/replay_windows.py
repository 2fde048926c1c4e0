"""One long recording replayed whole and in time windows on several processes (`replay --jobs N`), side by side.

    python benchmarks/replay_windows.py [--seconds 60] [--jobs 2 4] [--rounds 2] [--backend onnxruntime]
                                        [--out benchmarks/results/replay_windows.json]

Writes a rosbag2 MCAP of `--seconds` of the standard sensor set (fusion_attn.bench.write_standard_bag:
640x480 camera at 30 Hz, 120,000-point cloud at 10 Hz, IMU at 400 Hz) and replays it, in rounds, whole
(one process, one thread) and with each --jobs N (N processes of one thread). Speed = recorded seconds
per wall second of `replay()` from call to return: for the windows that includes starting the processes,
building their pipelines and the warm-ups; for the whole replay the pipeline is built before the call.
Each windowed output is compared with the whole replay's, byte for byte (the fused bag, summary.json).
"""

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from fusion_attn.bench import machine, write_standard_bag
from fusion_attn.pipeline import FusionPipeline
from fusion_attn.replay import ReplayOptions, fused_difference, replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--jobs", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="onnxruntime", help="the pipeline's backend (torch-cudagraph on a GPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "replay_windows.json")
    args = parser.parse_args()

    params = {"backend": args.backend, "threads": 1}
    opts = ReplayOptions(progress=False)
    runs: dict[str, list[dict]] = {"whole": [], **{f"jobs {n}": [] for n in args.jobs}}
    with tempfile.TemporaryDirectory() as tmp:
        bag = Path(tmp) / "standard"
        n_messages = write_standard_bag(bag, args.seconds)
        size_gb = sum(f.stat().st_size for f in bag.iterdir()) / 1e9
        print(f"wrote {n_messages} messages, {size_gb:.2f} GB")
        pipeline = FusionPipeline.from_params(params)
        for r in range(args.rounds):
            for name, name_runs in runs.items():
                out = Path(tmp) / name.replace(" ", "_")
                jobs = 1 if name == "whole" else int(name.split()[1])
                start = time.perf_counter()
                summary = replay([bag], pipeline, out, opts, jobs=jobs, params=params)
                wall_s = time.perf_counter() - start
                run = {"wall_s": round(wall_s, 3), "x_real_time": round(summary["timing"]["recorded_s"] / wall_s, 3),
                       "windows": summary["timing"].get("windows")}
                if name != "whole":
                    diff = fused_difference(Path(tmp) / "whole", out)
                    same_summary = (Path(tmp) / "whole" / "summary.json").read_bytes() == (out / "summary.json").read_bytes()
                    run |= {"byte_identical": f"{diff['byte_identical']}/{diff['messages'][0]}", "same_summary": same_summary}
                name_runs.append(run)
                print(f"round {r + 1} {name}: {run}", flush=True)

    whole = statistics.median(r["wall_s"] for r in runs["whole"])
    report = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "cores": os.cpu_count(),
        "command": "python benchmarks/replay_windows.py " + " ".join(
            [f"--seconds {args.seconds:g}", "--jobs " + " ".join(map(str, args.jobs)), f"--rounds {args.rounds}",
             f"--backend {args.backend}"]),
        "recording": {"seconds": args.seconds, "messages": n_messages, "gb": round(size_gb, 2)},
        "runs": runs,
        "median": {name: {"wall_s": (w := statistics.median(r["wall_s"] for r in rs)),
                          "x_real_time": statistics.median(r["x_real_time"] for r in rs), "speedup": round(whole / w, 2)}
                   for name, rs in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"], indent=2))


if __name__ == "__main__":  # the windows' processes import this module: they must not run it
    main()
