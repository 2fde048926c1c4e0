"""Node and replay speed of this checkout against an earlier commit, measured side by side in one run.

    python benchmarks/before_after.py --before 8e1f9ab [--rounds 2] [--out benchmarks/results/before_after.json]

The earlier commit is checked out into a temporary git worktree (with its own packaged model) and
both trees run the same two benchmarks, alternating round by round (and which goes first, so that
neither always follows the other's replay) so that a machine's drift hits both alike: `core_latency.py` (per-stage latency of what the node does per fusion: tokenizers and the
model on ONNX Runtime, 1 thread) and `replay_speed.py` (recorded seconds per wall second). Reports
each figure's median over the rounds, the ratio of the medians, and the median of the per-round
ratios (each round's after over the same round's before: robust to a VM that switches speed between
rounds). `--report-only` computes and prints them again for the report at --out, measuring nothing.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
NODE_STAGES = ("tokenize camera", "tokenize lidar", "tokenize imu", "model onnxruntime")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--before", required=True, help="the commit to compare with (e.g. the one before a change)")
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--repeats", type=int, default=300, help="core_latency repeats per stage")
parser.add_argument("--seconds", type=float, default=10.0, help="replay_speed recording length")
parser.add_argument("--out", type=Path, default=HERE / "benchmarks" / "results" / "before_after.json")
parser.add_argument("--report-only", action="store_true", help="print the report at --out, measure nothing")
args = parser.parse_args()


def measure(tree: Path, scratch: Path) -> dict:
    """One round of both benchmarks in `tree` (its own fusion_attn first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(tree), FUSION_ATTN_CACHE=str(scratch / "cache"))
    core, replay = scratch / "core.json", scratch / "replay.json"
    for script, extra, out in (("core_latency.py", ["--repeats", str(args.repeats), "--threads", "1"], core),
                               ("replay_speed.py", ["--seconds", str(args.seconds)], replay)):
        # core_latency exits 1 when one of its own targets is missed: the figures are still what we compare
        subprocess.run([sys.executable, str(tree / "benchmarks" / script), *extra, "--out", str(out)], cwd=tree,
                       env=env, check=False, stdout=subprocess.DEVNULL)
    stages = json.loads(core.read_text())["results"]["1"]
    figures = {f"{s} p50 ms": stages[s]["p50_ms"] for s in NODE_STAGES}
    figures["node path p50 ms (sum)"] = sum(stages[s]["p50_ms"] for s in NODE_STAGES)
    figures["replay x real time"] = json.loads(replay.read_text())["speed_x_real_time"]
    return figures


def summarise(rounds: dict, before: str, after: str) -> dict:
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rounds.items()}
    paired = {k: statistics.median(a[k] / b[k] for a, b in zip(rounds["after"], rounds["before"])) for k in median["after"]}
    return {"date": datetime.date.today().isoformat(), "before": before, "after": after, "rounds": rounds,
            "median": median, "ratio_after_over_before": {k: median["after"][k] / median["before"][k] for k in median["after"]},
            "median_of_round_ratios": paired}


if args.report_only:
    report = json.loads(args.out.read_text())
    report.update({k: v for k, v in summarise(report["rounds"], report["before"], report["after"]).items() if k != "date"})
else:
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=HERE, check=True,
                       capture_output=True)
        try:
            rounds = {"before": [], "after": []}
            for i in range(args.rounds):
                order = (("before", before_tree), ("after", HERE))
                for name, tree in order if i % 2 == 0 else order[::-1]:  # ABBA: neither always goes first
                    scratch = Path(tmp) / name
                    scratch.mkdir(exist_ok=True)
                    rounds[name].append(measure(tree, scratch))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=HERE, check=False)
    after_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                               check=True).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fusion_attn", "benchmarks"], cwd=HERE, check=False).returncode:
        after_sha += " + uncommitted changes"  # the checkout ran as it is, not HEAD
    report = summarise(rounds, args.before, after_sha)
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
median = report["median"]
print(f"| figure | before ({report['before']}) | after ({report['after']}) | after / before (medians) | "
      f"median of round ratios |\n| --- | --- | --- | --- | --- |")
for k, ratio in report["ratio_after_over_before"].items():
    print(f"| {k} | {median['before'][k]:.3f} | {median['after'][k]:.3f} | {ratio:.2f} | "
          f"{report['median_of_round_ratios'][k]:.2f} |")
