"""Packaging checks: package.xml, setup.py and the installed distribution agree, and ship what they should.

Fast and offline: setup.py is executed with setuptools.setup replaced by a recorder, nothing is built.
(`make colcon-check` does the real colcon build and checks the install tree.)
"""

import fnmatch
import importlib.metadata
import re
import runpy
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
PKG = "fusion_attn"
ROS_DEPS = {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "nav_msgs", "diagnostic_msgs"}


def _files(folder: Path) -> list[str]:
    """Files under a folder of the checkout, relative to ROOT, without Python caches."""
    if not folder.is_dir():
        return []
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


@pytest.fixture(scope="module")
def manifest() -> ET.Element:
    return ET.parse(ROOT / "package.xml").getroot()


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup, recorded without building anything."""
    recorded: dict = {}
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
        mp.chdir(ROOT)  # setup.py's globs are relative, as colcon and pip run it from the package root
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        mp.undo()
    assert recorded, "setup.py did not call setuptools.setup()"
    return recorded


def test_package_xml_is_format_3_ament_python(manifest):
    assert manifest.tag == "package"
    assert manifest.get("format") == "3"
    assert manifest.findtext("name") == PKG
    for tag in ("version", "description", "maintainer", "license"):
        assert (manifest.findtext(tag) or "").strip(), f"package.xml has no <{tag}>"
    assert manifest.findtext("export/build_type") == "ament_python"


def test_package_xml_lists_the_ros_dependencies(manifest):
    deps = {e.text.strip() for tag in ("depend", "exec_depend") for e in manifest.iter(tag)}
    missing = ROS_DEPS - deps
    assert not missing, f"package.xml lacks <exec_depend> on {sorted(missing)}"


def test_versions_agree(manifest, setup_kwargs):
    import fusion_attn

    xml_version = manifest.findtext("version")
    assert re.fullmatch(r"\d+\.\d+\.\d+", xml_version or ""), f"package.xml version {xml_version!r}"
    assert setup_kwargs["version"] == xml_version, "setup.py and package.xml versions differ"
    assert fusion_attn.__version__ == xml_version, "fusion_attn.__version__ and package.xml differ"
    installed = importlib.metadata.version(PKG)
    assert installed == xml_version, (
        f"installed metadata says {installed}, package.xml {xml_version}: reinstall (make test does)"
    )


def test_dependencies_keep_robots_on_their_own_ros_and_torch(setup_kwargs):
    requires = setup_kwargs["install_requires"]
    assert not [r for r in requires if r.startswith("ros-")], "ROS wheels belong in the ros-wheels extra only"
    torch = [r for r in requires if re.match(r"torch\b", r)]
    assert torch and "==" not in torch[0], (
        "setup.py must require a torch range, the pin is in requirements-cpu.txt"
    )
    assert "ros-rclpy" in setup_kwargs["extras_require"]["ros-wheels"]
    assert re.search(r"^torch==", (ROOT / "requirements-cpu.txt").read_text(), re.MULTILINE)


def test_every_console_script_resolves_to_a_callable(setup_kwargs):
    declared = {line.split("=", 1)[0].strip() for line in setup_kwargs["entry_points"]["console_scripts"]}
    assert "fusion-attn" in declared
    dist = importlib.metadata.distribution(PKG)
    installed = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    assert set(installed) == declared, (
        f"installed console scripts {sorted(installed)} differ from setup.py's {sorted(declared)}: reinstall"
    )
    for name, ep in sorted(installed.items()):
        try:
            target = ep.load()
        except ImportError as exc:
            pytest.fail(f"console script {name} = {ep.value} cannot be imported: {exc}")
        assert callable(target), f"console script {name} = {ep.value} is not callable"


def test_data_files_install_every_launch_and_config_file(setup_kwargs):
    installed = {
        f"{dest}/{Path(src).name}": src for dest, sources in setup_kwargs["data_files"] for src in sources
    }
    for src in installed.values():
        assert not Path(src).is_absolute() and (ROOT / src).is_file(), (
            f"data_files source {src} is not a file"
        )
    assert installed.get(f"share/ament_index/resource_index/packages/{PKG}") == f"resource/{PKG}"
    assert installed.get(f"share/{PKG}/package.xml") == "package.xml"
    shipped = set(installed.values())
    for folder in ("launch", "config"):
        not_installed = [f for f in _files(ROOT / folder) if f not in shipped]
        assert not not_installed, f"{not_installed} would not be installed: widen setup.py's data_files globs"
        for f in _files(ROOT / folder):
            assert f"share/{PKG}/{f}" in installed, f"{f} is installed to the wrong place"


def test_package_data_covers_every_non_python_file(setup_kwargs):
    patterns = setup_kwargs["package_data"][PKG]
    assert "backends/*.txt" in patterns
    pkg_dir = ROOT / PKG
    uncovered = [
        f
        for f in _files(pkg_dir)
        if not f.endswith(".py")
        and not any(fnmatch.fnmatch(Path(f).relative_to(PKG).as_posix(), p) for p in patterns)
    ]
    assert not uncovered, f"{uncovered} would not ship in the wheel: add them to setup.py's package_data"


def test_packages_include_fusion_attn_and_rl_but_not_tests(setup_kwargs):
    packages = set(setup_kwargs["packages"])
    assert {PKG, "rl"} <= packages
    assert not [p for p in packages if p == "tests" or p.startswith("tests.")]


def test_launch_graph_names_only_installed_executables_and_files(setup_kwargs):
    """The launch file and `fusion-attn launch` start fusion_launcher's graph: every executable it names
    is a console script (colcon installs it into lib/fusion_attn) and its parameter file is installed."""
    import ast

    from fusion_attn.launcher import ARGUMENTS, fusion_graph, robot_graph

    scripts = dict(s.replace(" ", "").split("=") for s in setup_kwargs["entry_points"]["console_scripts"])
    installed = {f"share/{PKG}/{Path(f).parent.name}/{Path(f).name}" for _, files in setup_kwargs["data_files"] for f in files}
    everything = {a: "x" for a in ARGUMENTS} | {"tau": "0.5", "use_sim_time": "true", "fused_state_topic": "/fused"}
    specs = [s for args in ({}, everything) for s in fusion_graph(args)]
    specs += robot_graph({"policy": "p.onnx"}) + robot_graph(everything | {"policy": "p.onnx"})
    assert {s.executable for s in specs} == {"fusion_node", "policy_node"}
    for spec in specs:
        assert spec.executable in scripts, spec.executable
        assert scripts[spec.executable] == f"{spec.module}:main"  # what `fusion-attn launch` runs
        assert spec.command()[2] == spec.module
        params = Path(spec.params_file)
        assert params.is_file() and f"share/{PKG}/config/{params.name}" in installed
    for launch_file in (ROOT / "launch").glob("*.launch.py"):
        tree = ast.parse(launch_file.read_text())
        imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "fusion_attn.launcher" in imports, f"{launch_file.name} must build its nodes from fusion_attn.launcher"
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            for kw in call.keywords:
                if kw.arg == "executable" and isinstance(kw.value, ast.Constant):
                    assert kw.value.value in scripts, f"{launch_file.name}: executable {kw.value.value} is not installed"
        literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        for name in literals:
            if name.endswith((".yaml", ".launch.py")):
                assert any(f.endswith(name) for f in installed), f"{launch_file.name}: {name} is not installed"


def test_unknown_launch_argument_is_refused():
    from fusion_attn.errors import ConfigError
    from fusion_attn.launcher import fusion_graph

    with pytest.raises(ConfigError, match="unknown launch argument"):
        fusion_graph({"bakcend": "torch"})
    for tau in ("nan", "0", "-1", "inf", "1e-4", "5000"):  # the node would refuse each at start, and exit
        with pytest.raises(ConfigError, match=r"must be a finite number in \[0.001, 1000\]"):
            fusion_graph({"tau": tau})
    with pytest.raises(ConfigError, match="params_file:=/nonexistent.yaml: no such file"):
        fusion_graph({"params_file": "/nonexistent.yaml"})


def test_launch_files_get_every_field_of_the_graph():
    """launch_nodes turns the graph into launch_ros Node arguments (dict stands in for the class: it
    records the keyword arguments launch_ros.actions.Node would receive)."""
    from fusion_attn.launcher import launch_nodes, robot_graph

    specs = robot_graph({"policy": "p.onnx", "use_sim_time": "true", "fused_state_topic": "/fused"})
    nodes = launch_nodes(dict, specs)
    assert [n["executable"] for n in nodes] == ["fusion_node", "policy_node"]
    for node, spec in zip(nodes, specs):
        assert node["parameters"] == [spec.params_file, spec.parameters] and node["remappings"] == [("fused_state", "/fused")]
    assert nodes[1]["parameters"][1] == {"policy": "p.onnx", "use_sim_time": True}


def test_fusion_yaml_spells_out_the_parameter_table():
    """config/fusion.yaml and fusion_attn.params.PARAMETERS (what the node declares, and the defaults
    of replay, sync and the CLI) name the same parameters with the same defaults."""
    from fusion_attn.config import load_params
    from fusion_attn.params import PARAM_DEFAULTS

    yaml_values = load_params(ROOT / "config" / "fusion.yaml")
    unknown = sorted(set(yaml_values) - set(PARAM_DEFAULTS))
    assert not unknown, f"config/fusion.yaml sets {unknown}, which fusion_attn/params.py does not declare"
    for name, default in PARAM_DEFAULTS.items():
        assert name in yaml_values, f"config/fusion.yaml leaves out {name} (default {default!r})"
        value = yaml_values[name]
        # the type too: rclpy refuses a file's 20 for a parameter declared as 20.0
        assert type(value) is type(default) and value == default, (
            f"{name}: config/fusion.yaml says {value!r}, fusion_attn/params.py {default!r}"
        )


def test_fusion_attn_rl_comes_from_the_entry_point_group(setup_kwargs):
    """fusion_attn never imports rl (tests/test_layers.py); `fusion-attn rl` is an extra verb that rl
    registers in the fusion_attn.cli entry-point group, installed with the package."""
    assert "rl = rl.__main__:cli_verb" in setup_kwargs["entry_points"]["fusion_attn.cli"]
    from fusion_attn.cli import build_parser

    args = build_parser().parse_args(["rl", "export", "agent.safetensors", "-o", "policy.onnx"])
    assert (args.verb, args.rl_verb) == ("rl", "export") and callable(args.run)


def test_launch_files_start_lifecycle_nodes_with_namespace_log_level_and_autostart():
    """The launch files (which need `launch`, absent here: parsed, not run) turn the graph into launch_ros
    LifecycleNode / Node actions and declare namespace, log_level and autostart from launcher.NODE_ARGUMENTS."""
    import ast

    from fusion_attn.launcher import NODE_ARGUMENTS

    assert {"namespace", "log_level", "autostart"} <= set(NODE_ARGUMENTS)
    for name in ("fusion.launch.py", "robot.launch.py"):
        tree = ast.parse((ROOT / "launch" / name).read_text())
        imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert {("launch_ros.actions", "LifecycleNode"), ("launch_ros.actions", "Node")} <= imported, name
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        assert any(c.func.id == "launch_actions" and [ast.unparse(a) for a in c.args[1:]] == ["Node", "LifecycleNode"]
                   for c in calls), f"{name}: the graph's nodes must become LifecycleNode / Node actions"
        declared = {ast.unparse(g.iter) for c in ast.walk(tree) if isinstance(c, ast.ListComp)
                    and isinstance(c.elt, ast.Call) and ast.unparse(c.elt.func) == "DeclareLaunchArgument"
                    for g in c.generators}
        assert "NODE_ARGUMENTS.items()" in declared, f"{name} does not declare namespace, log_level, autostart"


def test_fusion_attn_launch_starts_what_the_launch_files_start():
    """namespace, log_level and autostart reach the launch_ros actions (launch_nodes; dict stands in for
    Node, a tagging lambda for LifecycleNode) and `fusion-attn launch`'s own processes (NodeSpec.command)
    alike: the same names, namespaces, parameter files and parameters."""
    from fusion_attn.errors import ConfigError
    from fusion_attn.launcher import fusion_graph, launch_nodes, robot_graph

    specs = robot_graph({"policy": "p.onnx", "namespace": "robot1/", "log_level": "DEBUG", "autostart": "false",
                         "use_sim_time": "true"})
    assert [(s.fqn, s.lifecycle, s.autostart, s.log_level) for s in specs] == [
        ("/robot1/fusion_node", True, False, "debug"), ("/robot1/policy_node", False, False, "debug")]
    assert specs[0].parameters["autostart"] is False  # the launch drives the lifecycle, not the node itself
    nodes = launch_nodes(dict, specs, lambda **kw: {"lifecycle": True, **kw})
    for node, spec in zip(nodes, specs):
        assert node.get("lifecycle", False) == spec.lifecycle
        assert (node["namespace"], node["name"], node["parameters"], node["ros_arguments"]) == (
            "/robot1", spec.name, [spec.params_file, spec.parameters], ["--log-level", "debug"])
        ros_args = spec.command()[spec.command().index("--ros-args") + 1:]
        options = list(zip(ros_args[::2], ros_args[1::2]))
        assert {("--log-level", "debug"), ("-r", f"__node:={spec.name}"), ("-r", "__ns:=/robot1"),
                ("--params-file", spec.params_file)} <= set(options)
        assert [v for k, v in options if k == "-p"] == [f"{k}:={v}" for k, v in spec.parameters.items()]

    [default] = fusion_graph({})
    assert (default.namespace, default.log_level, default.autostart) == ("", "info", True)
    assert not any(a.startswith("__ns:=") for a in default.command())
    for bad in ({"autostart": "yes"}, {"log_level": "loud"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            fusion_graph(bad)


def test_fusion_node_takes_qos_from_the_standard_qos_overrides(tmp_path):
    """qos_overrides./<topic>.<subscription|publisher>.<policy> in the parameter file set that topic's QoS
    (namespace included in the topic); topics without one keep qos_reliability / qos_depth."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    import os

    import rclpy
    from rclpy.qos import ReliabilityPolicy

    from fusion_attn.node import FusionNode

    params = yaml.safe_load((ROOT / "config" / "fusion.yaml").read_text())
    params["/**"]["ros__parameters"].update(
        autostart=False, backend="torch", lidar_type="none",  # torch: no ONNX export to wait for
        qos_overrides={"/robot1/camera/image_raw": {"subscription": {"reliability": "reliable", "depth": 7}},
                       "/robot1/fused_state": {"publisher": {"depth": 3}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    context = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(tmp_path / "params.yaml")], context=context,
               domain_id=150 + os.getpid() % 50)
    node = FusionNode(namespace="robot1", context=context)
    try:
        assert node.trigger_configure().name == "SUCCESS" and node.trigger_activate().name == "SUCCESS"
        qos = {s.topic_name: s.qos_profile for s in node._io_subs}
        assert (qos["/robot1/camera/image_raw"].reliability, qos["/robot1/camera/image_raw"].depth) == (
            ReliabilityPolicy.RELIABLE, 7)
        assert (qos["/robot1/imu/data"].reliability, qos["/robot1/imu/data"].depth) == (ReliabilityPolicy.BEST_EFFORT, 50)
        assert node.get_parameter("qos_overrides./robot1/fused_state.publisher.depth").value == 3
        assert node.trigger_deactivate().name == "SUCCESS" and node.trigger_cleanup().name == "SUCCESS"
        # the overrides declared at activation keep this default: a new one is refused, not silently ignored
        refused = node.set_parameters([rclpy.parameter.Parameter("qos_depth", value=10)])[0]
        assert not refused.successful and "first activation" in refused.reason
    finally:
        node.destroy_node()
        context.try_shutdown()
