"""ros2 launch fusion_attn robot.launch.py policy:=/path/policy.onnx [namespace:=robot1] [use_sim_time:=true] ...

Starts fusion_node (config/fusion.yaml; a lifecycle node, configured and activated unless
autostart:=false) and policy_node (config/policy.yaml) in one namespace: the fused state drives
cmd_vel. The graph and its arguments are described once in fusion_attn/launcher.py, which
`fusion-attn launch robot ...` also uses where `launch` is absent.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch_ros.actions import LifecycleNode, Node

from fusion_attn.launcher import (
    ARGUMENTS,
    NODE_ARGUMENTS,
    ROBOT_ARGUMENTS,
    default_params_file,
    launch_actions,
    robot_graph,
)
from launch import LaunchDescription


def _nodes(context):
    known = (*ARGUMENTS, *NODE_ARGUMENTS, *ROBOT_ARGUMENTS, "params_file", "fused_state_topic")
    args = {name: value for name, value in context.launch_configurations.items() if name in known}
    return launch_actions(robot_graph(args), Node, LifecycleNode)


def generate_launch_description():
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in NODE_ARGUMENTS.items()]
    declared += [DeclareLaunchArgument("params_file", default_value=default_params_file(),
                                       description="ROS 2 parameter file of fusion_node"),
                 DeclareLaunchArgument("policy_params_file", default_value=default_params_file("policy.yaml"),
                                       description="ROS 2 parameter file of policy_node"),
                 DeclareLaunchArgument("policy", description="exported policy (.onnx, fusion-attn rl export)"),
                 DeclareLaunchArgument("fused_state_topic", default_value="", description="remap fused_state")]
    declared += [DeclareLaunchArgument(name, default_value=default, description=f"{text} (empty: from params_file)")
                 for name, (_, default, text) in ARGUMENTS.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=_nodes)])
