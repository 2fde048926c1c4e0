"""`fusion-attn launch`: fusion_node (and for `robot`, policy_node) with config/*.yaml, as the launch files do."""

from __future__ import annotations


def add_parser(verbs):
    launch = verbs.add_parser("launch", help="start fusion_node with config/fusion.yaml, as fusion.launch.py does; "
                                             "`launch robot policy:=P.onnx` also starts policy_node (robot.launch.py)")
    launch.add_argument("arguments", nargs="*", metavar="name:=value",
                        help="[robot] then launch arguments: params_file, checkpoint, backend, tau, camera_topic, lidar_topic, "
                             "imu_topic, use_sim_time, fused_state_topic, namespace, log_level, autostart")
    return launch


def run(args) -> int:
    from ..launcher import run as launch

    return launch(args.arguments)
