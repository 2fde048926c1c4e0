"""ros2 launch fusion_attn fusion.launch.py [namespace:=robot1] [log_level:=debug] [autostart:=false] [tau:=0.5] ...

Starts fusion_node, a lifecycle node, with config/fusion.yaml (or params_file:=...); autostart:=true
(the default) configures it, then activates it. The graph and its arguments are described once in
fusion_attn/launcher.py, which `fusion-attn launch` also uses where `launch` is absent.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch_ros.actions import LifecycleNode, Node

from fusion_attn.launcher import ARGUMENTS, NODE_ARGUMENTS, default_params_file, fusion_graph, launch_actions
from launch import LaunchDescription


def _nodes(context):
    known = (*ARGUMENTS, *NODE_ARGUMENTS, "params_file", "fused_state_topic")
    args = {name: value for name, value in context.launch_configurations.items() if name in known}
    return launch_actions(fusion_graph(args), Node, LifecycleNode)


def generate_launch_description():
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in NODE_ARGUMENTS.items()]
    declared += [DeclareLaunchArgument("params_file", default_value=default_params_file(),
                                       description="ROS 2 parameter file of fusion_node"),
                 DeclareLaunchArgument("fused_state_topic", default_value="", description="remap fused_state")]
    declared += [DeclareLaunchArgument(name, default_value=default, description=f"{text} (empty: from params_file)")
                 for name, (_, default, text) in ARGUMENTS.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=_nodes)])
