"""`fusion-attn sim-record`: simulated episodes (random actions) recorded as a rosbag2 MCAP."""

from __future__ import annotations

from pathlib import Path

from ..errors import FusionAttnError


def add_parser(verbs):
    sim = verbs.add_parser("sim-record", help="record simulated episodes (random actions) as a rosbag2 MCAP")
    sim.add_argument("env_id", help="a Gymnasium id, e.g. FusionAttn/Navigate-v0")
    sim.add_argument("-o", "--output", type=Path, required=True, help="the new bag folder")
    sim.add_argument("--episodes", type=int, default=1)
    sim.add_argument("--seconds", type=float, help="stop each episode after this much simulated time")
    sim.add_argument("--seed", type=int, default=0)
    return sim


def run(args) -> int:
    try:
        import gymnasium

        from ..sim.record import record
    except ImportError as exc:
        raise FusionAttnError(f"the simulator is not installed ({exc}); pip install -e '.[sim]'") from exc
    try:
        counts = record(args.env_id, args.output, args.episodes, args.seconds, args.seed)
    except FileExistsError as exc:
        raise FusionAttnError(str(exc)) from exc
    except gymnasium.error.Error as exc:
        raise FusionAttnError(f"{args.env_id}: {exc}") from exc
    print(f"wrote {args.output}: " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))
    return 0
