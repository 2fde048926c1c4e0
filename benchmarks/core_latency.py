"""Per-stage latency of the fusion core (issue #2): adapters, tokenizers, model on torch and ONNX Runtime.

    python benchmarks/core_latency.py [--repeats 500] [--out benchmarks/results/core_latency.json]

Prints a markdown table (pasted into docs/BENCHMARKS.md with the date) and writes the raw report.
Exit status 1 when a target of the issue is missed, so a regression is visible.
"""

import argparse
import datetime
import json
from pathlib import Path

from fusion_attn import bench

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--repeats", type=int, default=500)
parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "core_latency.json")
args = parser.parse_args()

report = bench.run(threads=tuple(args.threads), repeats=args.repeats)
report["date"] = datetime.date.today().isoformat()
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2))
print(f"date: {report['date']}\nmachine: {report['machine']}\nmodel: {report['model']}, {args.repeats} repeats per stage\n")
print(bench.to_markdown(report))
raise SystemExit(0 if all(ok for *_, ok in bench.targets(report)) else 1)
