"""The node graphs, described once: `launch/fusion.launch.py` and `launch/robot.launch.py` turn them
into launch_ros Nodes on a robot, and `fusion-attn launch [robot]` starts the same processes here,
where the `launch` package is not installed.

    fusion   fusion_node
    robot    fusion_node + policy_node (rl/policy_node.py): the fused state drives cmd_vel

Launch arguments (both ways): params_file, checkpoint, backend, tau, camera_topic, lidar_topic,
imu_topic, use_sim_time, fused_state_topic; robot also policy, policy_params_file. An empty argument
leaves the parameter file's value alone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

PACKAGE = "fusion_attn"

# launch argument -> (node parameter it sets, default, description); "" = keep the file's value
ARGUMENTS = {
    "checkpoint": ("checkpoint", "", "safetensors checkpoint"),
    "backend": ("backend", "", "onnxruntime | torch"),
    "tau": ("tau.global", "", "global softmax temperature (> 0)"),
    "camera_topic": ("camera_topic", "", "camera topic"),
    "lidar_topic": ("lidar_topic", "", "lidar topic"),
    "imu_topic": ("imu_topic", "", "IMU topic"),
    "use_sim_time": ("use_sim_time", "", "true: follow /clock (fusion-attn play --clock)"),
}
FLOAT_PARAMETERS = {"tau.global"}
BOOL_PARAMETERS = {"use_sim_time"}


@dataclass(frozen=True)
class NodeSpec:
    package: str
    executable: str  # a console script that setup.py installs into lib/<package>
    module: str  # the module whose main() that script runs
    name: str
    params_file: str
    parameters: dict[str, object] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()

    def command(self) -> list[str]:
        """The process a launch system would start, as argv (ROS 2 `--ros-args` syntax)."""
        argv = [sys.executable, "-m", self.module, "--ros-args", "-r", f"__node:={self.name}",
                "--params-file", self.params_file]
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
    known = {*ARGUMENTS, "params_file", "fused_state_topic", *extra}
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
        if value != "":
            parameters[param] = value
    remap = args.get("fused_state_topic", "")
    return [NodeSpec(PACKAGE, "fusion_node", "fusion_attn.node", "fusion_node",
                     args.get("params_file") or default_params_file(), parameters,
                     (("fused_state", remap),) if remap else ())]


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
                          (("fused_state", remap),) if remap else ()))
    return nodes


GRAPHS = {"fusion": fusion_graph, "robot": robot_graph}


def launch_nodes(node_class, specs: list[NodeSpec]) -> list:
    """NodeSpecs -> launch_ros `Node` actions (node_class is launch_ros.actions.Node, which only a robot has)."""
    return [node_class(package=spec.package, executable=spec.executable, name=spec.name, output="screen",
                       parameters=[spec.params_file, spec.parameters] if spec.parameters else [spec.params_file],
                       remappings=list(spec.remappings))
            for spec in specs]


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
    procs = [subprocess.Popen(spec.command()) for spec in graph(args)]
    stopping = []

    def forward(signum, _frame):
        stopping.append(time.monotonic())
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
    return max(p.wait() for p in procs)
