"""`fusion-attn bench`: per-stage latency on the standard configuration, torch vs ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(verbs):
    bench = verbs.add_parser("bench", help="per-stage latency on the standard configuration")
    bench.add_argument("--checkpoint", type=Path)
    bench.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    bench.add_argument("--repeats", type=int, default=300)
    bench.add_argument("--json", type=Path, help="also write the raw report here")
    return bench


def run(args) -> int:
    from .. import bench
    from ..errors import FusionAttnError

    if args.repeats < 1 or min(args.threads) < 1:
        raise FusionAttnError(f"--repeats {args.repeats} and --threads {args.threads}: at least 1 each")
    if args.json and (args.json.is_dir() or not args.json.parent.is_dir()):  # say so now, not after the benchmark
        raise FusionAttnError(f"--json {args.json}: not a file in an existing folder")
    report = bench.run(threads=tuple(args.threads), repeats=args.repeats, checkpoint=args.checkpoint)
    print(f"machine: {report['machine']}\nmodel: {report['model']}, {report['repeats']} repeats per stage\n")
    print(bench.to_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
