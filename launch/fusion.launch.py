"""ros2 launch fusion_attn fusion.launch.py [backend:=torch] [tau:=0.5] [camera_topic:=/cam0/image_raw] ...

Starts fusion_node with config/fusion.yaml (or params_file:=...). The graph and its arguments are
described once in fusion_attn/launcher.py, which `fusion-attn launch` also uses where `launch` is absent.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch_ros.actions import Node

from fusion_attn.launcher import ARGUMENTS, default_params_file, fusion_graph, launch_nodes
from launch import LaunchDescription


def _nodes(context):
    args = {name: value for name, value in context.launch_configurations.items()
            if name in ARGUMENTS or name in ("params_file", "fused_state_topic")}
    return launch_nodes(Node, fusion_graph(args))


def generate_launch_description():
    declared = [DeclareLaunchArgument("params_file", default_value=default_params_file(),
                                      description="ROS 2 parameter file of fusion_node"),
                DeclareLaunchArgument("fused_state_topic", default_value="", description="remap fused_state")]
    declared += [DeclareLaunchArgument(name, default_value=default, description=f"{text} (empty: from params_file)")
                 for name, (_, default, text) in ARGUMENTS.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=_nodes)])
