"""What a fresh process pays before it fuses anything: a node's start, a replay window's (`replay --jobs N`).

    python benchmarks/process_start.py [--repeats 3] [--out benchmarks/results/process_start.json]

Each figure is the wall time (median of --repeats) and the peak resident memory of a new Python process
that does one thing and exits: import torch; import onnx; what the fusion node does before it spins
(its module, then the pipeline of the packaged model on ONNX Runtime, the node's default, on a cached
export); and what a window's process does before its first message (`batch.single_threaded`, then the
pipeline from the node's parameters, ONNX Runtime with one thread). Python's own start (an empty
`python -c pass`) is reported beside them. To measure another tree's code (before and after a change),
run it from outside both trees with that tree first on PYTHONPATH: a tree in the working directory
comes first on a child's sys.path.
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
    "the fusion node, up to its spin": (
        "import fusion_attn.node; from fusion_attn.pipeline import FusionPipeline; "
        "FusionPipeline.create(backend='onnxruntime')"),
    "a window's process, up to its first message": (
        "from fusion_attn.batch import single_threaded; single_threaded(); "
        "from fusion_attn.replay_windows import _pipeline; _pipeline({'backend': 'onnxruntime', 'threads': 1})"),
}

# each step's peak memory: VmHWM (ru_maxrss would count the parent's, carried over from before exec)
RSS = "\nprint([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "process_start.json")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-c", STEPS["a window's process, up to its first message"]], check=True)  # cache
    seconds, peak_mb = {}, {}
    for name, code in STEPS.items():
        times, peaks = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", code + RSS], check=True, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            peaks.append(int(run.stdout.split()[-1]) / 1024)  # kB
        seconds[name], peak_mb[name] = round(statistics.median(times), 3), round(max(peaks), 1)
        print(f"{name}: {seconds[name]:.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}), peak {peak_mb[name]:.0f} MB",
              flush=True)
    report = {"date": datetime.date.today().isoformat(), "machine": machine(),
              "command": f"python benchmarks/process_start.py --repeats {args.repeats}", "median_s": seconds,
              "peak_rss_mb": peak_mb}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
