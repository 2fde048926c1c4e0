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

Each verb is a module here with `add_parser(verbs)` (adds its subparser, returns it) and `run(args)`
(-> exit status); building the parser imports no torch, `run` imports what the verb needs. Other
packages add verbs through the entry-point group `fusion_attn.cli` (`rl` does, see setup.py).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from importlib.metadata import entry_points

from ..errors import FusionAttnError

# the modules of the built-in verbs, in the order `fusion-attn --help` lists them
VERBS = ("fuse", "replay", "play", "sim_record", "export", "build_engine", "launch", "bench", "train",
         "eval_robustness")
# entry point NAME = module:function; function(verbs) adds the subparser NAME and returns its run(args) -> int
PLUGIN_GROUP = "fusion_attn.cli"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except FusionAttnError as exc:
        print(f"fusion-attn {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be written or read (inside a file, a folder for a file, ...)
        if args.verbose:  # where it came from, for a maintainer: an OSError may also be a bug
            traceback.print_exc()
        print(f"fusion-attn {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fusion-attn {args.verb}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every verb, built-in and from installed plugins; `args.run` runs the verb."""
    parser = argparse.ArgumentParser(prog="fusion-attn", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and skipped topics")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name in VERBS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(verbs).set_defaults(run=module.run)
    for ep in entry_points(group=PLUGIN_GROUP):
        run = ep.load()(verbs)
        verbs.choices[ep.name].set_defaults(run=run)
    return parser
