"""What a fresh process pays before it fuses anything: a replay window's start (`replay --jobs N`).

    python benchmarks/process_start.py [--repeats 3] [--out benchmarks/results/process_start.json]

Each figure is the wall time of a new Python process (median of --repeats) that does one thing and
exits: import torch; import onnx; and what a window's process does before its first message
(`batch.single_threaded`, then the pipeline from the node's parameters, ONNX Runtime with one thread,
on a cached export). Python's own start (an empty `python -c pass`) is reported beside them.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fusion_attn.bench import machine

STEPS = {
    "python alone": "pass",
    "import torch": "import torch",
    "import onnx": "import onnx",
    "a window's process, up to its first message": (
        "from fusion_attn.batch import single_threaded; single_threaded(); "
        "from fusion_attn.replay_windows import _pipeline; _pipeline({'backend': 'onnxruntime', 'threads': 1})"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "process_start.json")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-c", STEPS["a window's process, up to its first message"]], check=True)  # cache
    seconds = {}
    for name, code in STEPS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - start)
        seconds[name] = round(statistics.median(times), 3)
        print(f"{name}: {seconds[name]:.2f} s (runs {', '.join(f'{t:.2f}' for t in times)})", flush=True)
    report = {"date": datetime.date.today().isoformat(), "machine": machine(),
              "command": f"python benchmarks/process_start.py --repeats {args.repeats}", "median_s": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
