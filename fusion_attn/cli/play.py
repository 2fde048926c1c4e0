"""`fusion-attn play`: a recording's sensor topics published on ROS 2 at the recorded rate (for the node)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FusionAttnError


def add_parser(verbs):
    play = verbs.add_parser("play", help="publish a recording's sensor topics on ROS 2 at the recorded rate")
    play.add_argument("bags", nargs="+", type=Path)
    play.add_argument("--rate", type=float, default=1.0, help="speed factor (default 1.0)")
    play.add_argument("--loop", action="store_true", help="start over at the end")
    play.add_argument("--clock", action="store_true", help="publish /clock with the recorded time (use_sim_time) "
                                                           "instead of restamping messages to now")
    play.add_argument("--wait", type=float, default=2.0, metavar="SECONDS",
                      help="wait up to this long for a subscriber on every played topic before playing (default 2; "
                           "messages published before DDS discovery has matched a subscriber are lost to it)")
    play.add_argument("--remap", nargs="*", default=[], metavar="FROM:=TO", help="publish a recorded topic under another name")
    return play


def run(args) -> int:
    import math
    import signal

    import rclpy
    from rclpy.exceptions import InvalidTopicNameException
    from rclpy.signals import SignalHandlerOptions
    from rclpy.validate_topic_name import validate_topic_name

    from ..play import StopRequest, play

    if not (math.isfinite(args.wait) and args.wait >= 0):
        raise FusionAttnError(f"--wait takes seconds >= 0, got {args.wait}")
    bad = [item for item in args.remap if ":=" not in item or not all(item.split(":=", 1))]
    if bad:
        raise FusionAttnError(f"--remap takes FROM:=TO, got {bad}")
    remap = dict(item.split(":=", 1) for item in args.remap)
    for topic in remap.values():
        try:
            validate_topic_name(topic)
        except InvalidTopicNameException as exc:
            raise FusionAttnError(f"--remap to {topic!r}: {str(exc).splitlines()[0]}") from None
    # our own handler, not rclpy's: that one invalidates the context before the publishers are flushed
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    stop, handled = StopRequest(), (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    node = rclpy.create_node("fusion_attn_play")
    try:
        for sig in handled:
            signal.signal(sig, stop)
        count = play(node, args.bags, remap=remap, rate=args.rate, clock=args.clock, loop=args.loop,
                     wait_s=args.wait, stop=stop)
        print(f"{'stopped after' if stop.requested else 'published'} {count} messages")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
