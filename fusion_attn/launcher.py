"""The node graphs, described once: `launch/fusion.launch.py` and `launch/robot.launch.py` turn them
into launch_ros Nodes on a robot, and `fusion-attn launch [robot]` starts the same processes here,
where the `launch` package is not installed.

    fusion   fusion_node
    robot    fusion_node + policy_node (rl/policy_node.py): the fused state drives cmd_vel

Launch arguments (both ways): namespace, log_level, autostart, params_file, checkpoint, backend, tau,
camera_topic, lidar_topic, imu_topic, odometry_topic, imu2_topic, use_sim_time, fused_state_topic; robot also policy,
policy_params_file. An empty node-parameter argument leaves the parameter file's value alone.

fusion_node is a lifecycle node. As ROS 2 launch files do, the launch system drives its lifecycle, not
the node: the node's own `autostart` parameter is set false, and with autostart:=true (the default)
the launch files emit configure, then activate once it is inactive (launch_ros ChangeState events);
`fusion-attn launch` calls the same transitions on the node's change_state service.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .params import PARAMETERS

PACKAGE = "fusion_attn"

# launch argument -> (node parameter it sets, default, description); "" = keep the file's value
ARGUMENTS = {
    "checkpoint": ("checkpoint", "", "safetensors checkpoint"),
    "backend": ("backend", "", "onnxruntime | torch"),
    "tau": ("tau.global", "", "global softmax temperature (> 0)"),
    "camera_topic": ("camera_topic", "", "camera topic"),
    "lidar_topic": ("lidar_topic", "", "lidar topic"),
    "imu_topic": ("imu_topic", "", "IMU topic"),
    "odometry_topic": ("odometry_topic", "", "wheel odometry topic (read by a model built with odometry)"),
    "imu2_topic": ("imu2_topic", "", "second IMU topic (read by a model built with one)"),
    "use_sim_time": ("use_sim_time", "", "true: follow /clock (fusion-attn play --clock)"),
}
FLOAT_PARAMETERS = {"tau.global"}
PARAMETER_RANGES = {p.name: p.range for p in PARAMETERS if p.name in FLOAT_PARAMETERS}
BOOL_PARAMETERS = {"use_sim_time"}
# launch argument -> (default, description): how the nodes are started, not node parameters
NODE_ARGUMENTS = {
    "namespace": ("", "ROS namespace of every node (and of their relative topics)"),
    "log_level": ("info", "debug | info | warn | error | fatal"),
    "autostart": ("true", "configure and activate fusion_node once it is up (false: a lifecycle manager does)"),
}
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


@dataclass(frozen=True)
class NodeSpec:
    package: str
    executable: str  # a console script that setup.py installs into lib/<package>
    module: str  # the module whose main() that script runs
    name: str
    params_file: str
    parameters: dict[str, object] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()
    namespace: str = ""  # "" or "/a/b"
    log_level: str = "info"
    lifecycle: bool = False  # a lifecycle node: launch_ros LifecycleNode
    autostart: bool = False  # lifecycle: the launch configures, then activates it

    @property
    def fqn(self) -> str:
        return f"{self.namespace}/{self.name}"

    def command(self) -> list[str]:
        """The process a launch system would start, as argv (ROS 2 `--ros-args` syntax)."""
        argv = [sys.executable, "-m", self.module, "--ros-args", "--log-level", self.log_level,
                "-r", f"__node:={self.name}"]
        if self.namespace:
            argv += ["-r", f"__ns:={self.namespace}"]
        argv += ["--params-file", self.params_file]
        for name, value in self.parameters.items():
            argv += ["-p", f"{name}:={value}"]
        for old, new in self.remappings:
            argv += ["-r", f"{old}:={new}"]
        return argv


def default_params_file(name: str = "fusion.yaml") -> str:
    """config/<name> from the installed share directory (colcon, pip) or from this checkout."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)) / "config" / name)
    except (ImportError, LookupError, OSError):  # no ament index here (a venv): look elsewhere
        pass
    candidates += [Path(sys.prefix) / "share" / PACKAGE / "config" / name,
                   Path(__file__).resolve().parents[1] / "config" / name]
    return str(next((c for c in candidates if c.is_file()), candidates[-1]))


ROBOT_ARGUMENTS = ("policy", "policy_params_file")
STOP_TIMEOUT_S = 10.0  # after Ctrl-C / SIGTERM, a node that has not exited by then is killed


def fusion_graph(args: dict[str, str], extra: tuple[str, ...] = ()) -> list[NodeSpec]:
    """Launch arguments -> the nodes to start: the fusion node."""
    known = {*ARGUMENTS, *NODE_ARGUMENTS, "params_file", "fused_state_topic", *extra}
    unknown = set(args) - known
    if unknown:
        raise ConfigError(f"unknown launch argument(s) {sorted(unknown)}; known: {sorted(known)}")
    parameters: dict[str, object] = {}
    for arg, (param, _, _) in ARGUMENTS.items():
        value = args.get(arg, "")
        if value != "" and param in BOOL_PARAMETERS:
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"launch argument {arg}:={value!r} must be true or false")
            value = value.lower() == "true"
        if value != "" and param in FLOAT_PARAMETERS:
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"launch argument {arg}:={value!r} is not a number") from None
            lo, hi = PARAMETER_RANGES[param]  # the node declares this range: it would refuse the value at start
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ConfigError(f"launch argument {arg}:={value!r} must be a finite number in [{lo:g}, {hi:g}]")
        if value != "":
            parameters[param] = value
    parameters["autostart"] = False  # the launch drives the lifecycle (module docstring)
    remap = args.get("fused_state_topic", "")
    if (params_file := args.get("params_file")) and not Path(params_file).is_file():
        raise ConfigError(f"launch argument params_file:={params_file}: no such file")
    return [NodeSpec(PACKAGE, "fusion_node", "fusion_attn.node", "fusion_node",
                     args.get("params_file") or default_params_file(), parameters,
                     (("fused_state", remap),) if remap else (), **_start_options(args), lifecycle=True,
                     autostart=_bool(args, "autostart"))]


def _bool(args: dict[str, str], name: str) -> bool:
    value = args.get(name) or NODE_ARGUMENTS[name][0]
    if value.lower() not in ("true", "false"):
        raise ConfigError(f"launch argument {name}:={value!r} must be true or false")
    return value.lower() == "true"


def _start_options(args: dict[str, str]) -> dict[str, str]:
    """namespace and log_level, checked and normalised (a namespace is absolute: "robot1" -> "/robot1")."""
    namespace = args.get("namespace", "").strip("/")
    level = (args.get("log_level") or NODE_ARGUMENTS["log_level"][0]).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"launch argument log_level:={level!r}: choose one of {list(LOG_LEVELS)}")
    return {"namespace": f"/{namespace}" if namespace else "", "log_level": level}


def robot_graph(args: dict[str, str]) -> list[NodeSpec]:
    """fusion_node + policy_node: the policy reads fusion_node's fused_state, publishes cmd_vel."""
    if not args.get("policy"):
        raise ConfigError("robot graph: set policy:=path/to/policy.onnx (from `fusion-attn rl export`)")
    nodes = fusion_graph(args, ROBOT_ARGUMENTS)
    parameters: dict[str, object] = {"policy": args["policy"]}
    if "use_sim_time" in nodes[0].parameters:
        parameters["use_sim_time"] = nodes[0].parameters["use_sim_time"]
    remap = args.get("fused_state_topic", "")
    nodes.append(NodeSpec(PACKAGE, "policy_node", "rl.policy_node", "policy_node",
                          args.get("policy_params_file") or default_params_file("policy.yaml"), parameters,
                          (("fused_state", remap),) if remap else (), **_start_options(args)))
    return nodes


GRAPHS = {"fusion": fusion_graph, "robot": robot_graph}


def launch_nodes(node_class, specs: list[NodeSpec], lifecycle_class=None) -> list:
    """NodeSpecs -> launch_ros actions: node_class (launch_ros.actions.Node) for plain nodes, lifecycle_class
    (LifecycleNode; default node_class) for lifecycle ones. Only a robot has launch_ros."""
    return [((lifecycle_class or node_class) if spec.lifecycle else node_class)(
                package=spec.package, executable=spec.executable, name=spec.name, namespace=spec.namespace,
                output="screen", ros_arguments=["--log-level", spec.log_level],
                parameters=[spec.params_file, spec.parameters] if spec.parameters else [spec.params_file],
                remappings=list(spec.remappings))
            for spec in specs]


def launch_actions(specs: list[NodeSpec], node_class, lifecycle_class) -> list:
    """NodeSpecs -> the launch files' actions (imports launch and launch_ros: a robot only). An autostart
    lifecycle node gets launch_ros's pattern: a ChangeState configure event once it runs, and activate
    once that configure has brought it to inactive (once only: a later deactivate is not undone)."""
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.events import matches_action
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    actions = []
    for spec, node in zip(specs, launch_nodes(node_class, specs, lifecycle_class)):
        if not (spec.lifecycle and spec.autostart):
            actions.append(node)
            continue

        def change(transition: int, node=node) -> EmitEvent:
            return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition))

        # the handler before the node, the configure event after it: an event no handler waits for is lost
        actions += [RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state="configuring",
                                                           goal_state="inactive", handle_once=True,
                                                           entities=[change(Transition.TRANSITION_ACTIVATE)])),
                    node, change(Transition.TRANSITION_CONFIGURE)]
    return actions


def bring_up(specs: list[NodeSpec], stop: threading.Event) -> None:
    """Configure, then activate, each autostart lifecycle node over its change_state service: what the
    launch files' ChangeState events do, for `fusion-attn launch`. A failed transition is reported and
    the node left running, as ros2 launch does. Returns early once `stop` is set."""
    import rclpy
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    context = rclpy.Context()
    # args=[]: this process's argv are launch arguments, not ROS ones; run() handles the signals
    rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("fusion_attn_launch", context=context, start_parameter_services=False)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        for spec in (s for s in specs if s.lifecycle and s.autostart):
            client = node.create_client(ChangeState, f"{spec.fqn}/change_state")
            while not client.wait_for_service(timeout_sec=0.5):
                if stop.is_set():
                    return
            for transition, label in ((Transition.TRANSITION_CONFIGURE, "configure"),
                                      (Transition.TRANSITION_ACTIVATE, "activate")):
                future = client.call_async(ChangeState.Request(transition=Transition(id=transition)))
                while not future.done():  # configure loads the model: seconds to minutes
                    if stop.is_set():
                        return
                    executor.spin_until_future_complete(future, timeout_sec=0.5)
                if not future.result().success:
                    print(f"launch: {spec.fqn}: {label} failed (see its log)", file=sys.stderr)
                    break
    finally:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()


def run(argv: list[str]) -> int:
    """`fusion-attn launch [robot] name:=value ...`: start the graph, forward Ctrl-C, return the worst
    exit code."""
    graph = fusion_graph
    if argv and ":=" not in argv[0]:
        name = argv[0].removesuffix(".launch.py")
        if name not in GRAPHS:
            raise ConfigError(f"unknown graph {argv[0]!r}; known: {sorted(GRAPHS)}")
        graph, argv = GRAPHS[name], argv[1:]
    args = {}
    for item in argv:
        name, sep, value = item.partition(":=")
        if not sep:
            raise ConfigError(f"launch arguments are name:=value, got {item!r}")
        args[name] = value
    specs = graph(args)
    procs = [subprocess.Popen(spec.command()) for spec in specs]
    stopping, stop = [], threading.Event()
    lifecycle = threading.Thread(target=bring_up, args=(specs, stop), daemon=True)
    lifecycle.start()

    def forward(signum, _frame):
        stopping.append(time.monotonic())
        stop.set()
        for p in procs:
            p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while any(p.poll() is None for p in procs):
        if stopping and time.monotonic() - stopping[0] > STOP_TIMEOUT_S:  # as ros2 launch: then SIGKILL
            for p in procs:
                if p.poll() is None:
                    print(f"launch: {p.args[2]} still running {STOP_TIMEOUT_S:.0f} s after the signal: killed",
                          file=sys.stderr)
                    p.kill()
        time.sleep(0.1)
    stop.set()
    lifecycle.join()
    return max(p.wait() for p in procs)
