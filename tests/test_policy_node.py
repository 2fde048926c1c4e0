"""policy_node over real DDS: safety behaviour alone, then the closed loop simulator bridge -> fusion_node
-> policy_node -> cmd_vel -> simulator, until an episode completes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import Spinner, ros_domain, stop_node, stop_nodes, wait_until

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Twist
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger

from rl.agent import AgentConfig
from rl.export import export_policy
from rl.ppo import PPOConfig, train


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A briefly trained agent of the Control task, exported as the node loads it."""
    run = tmp_path_factory.mktemp("policy")
    train(PPOConfig(env_id="FusionAttn/Control-Discrete-v0", steps=256, envs=1, rollout=128,
                    agent=AgentConfig(memory=8)), run, progress=False)
    path, diff = export_policy(run / "agent.safetensors", run / "policy.onnx")
    assert diff < 1e-4
    return path


@pytest.fixture(scope="module")
def ros():
    domain = ros_domain(2)
    os.environ["ROS_DOMAIN_ID"] = domain
    rclpy.init()
    node = rclpy.create_node("policy_tester")
    seen = {"cmd": [], "policy_status": []}
    node.create_subscription(Twist, "cmd_vel", lambda m: seen["cmd"].append((m.linear.x, m.angular.z)), 10)
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: seen["policy_status"].extend(
        (s.level, s.message) for s in m.status if s.name == "fusion_attn: policy"), 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    Spinner(executor)
    env = dict(os.environ, ROS_DOMAIN_ID=domain, PYTHONUNBUFFERED="1")
    yield node, seen, env
    executor.shutdown()
    rclpy.shutdown()


def test_stops_without_fused_state_and_resets_memory_on_request(ros, policy, tmp_path):
    node, seen, env = ros
    log = tmp_path / "policy.log"
    with open(log, "w") as out:  # max_linear:=1 an integer, as a parameter file's `1`: taken as 1.0
        proc = subprocess.Popen([sys.executable, "-m", "rl.policy_node", "--ros-args", "-p", f"policy:={policy}",
                                 "-p", "max_linear:=1"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        start = len(seen["cmd"])
        assert wait_until(lambda: len(seen["cmd"]) - start >= 5, 30), log.read_text()
        assert all(c == (0.0, 0.0) for c in seen["cmd"][start:])  # nothing fused yet: it stands still
        bad = node.create_publisher(Image, "fused_state", 10)
        garbage = Image(height=12, width=64, encoding="mono8", step=64, data=bytes(768))

        def dropped() -> bool:  # best effort, and the node may not yet match a writer it was matched by: resend
            bad.publish(garbage)
            return "fused_state dropped: mono8" in log.read_text()
        assert wait_until(dropped, 10), log.read_text()
        client = node.create_client(Trigger, "/policy_node/reset_memory")
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Trigger.Request())
        assert wait_until(future.done, 10) and future.result().success
        # no fusion_node reports its fusion: the contract is unchecked, so it refuses first
        assert "stopped: fusion contract: no /diagnostics from fusion_node yet" in log.read_text() and proc.poll() is None
    finally:
        assert stop_node(proc, log) == 0, log.read_text()


def test_a_policy_is_refused_by_a_retrained_fusion_and_a_live_tau_change(ros, policy, tmp_path):
    """The real fusion_node and an exported policy over DDS: a fusion model retrained after the policy was
    exported, and then τ changed at run time on the matching model: each time the policy stands still and
    says why, in its log and as an ERROR on /diagnostics."""
    from fusion_attn.checkpoint import save_checkpoint
    from fusion_attn.pipeline import load_model

    node, seen, env = ros
    model, _ = load_model(None)
    with torch.no_grad():
        model.queries.add_(0.01)  # what a retrain does to the weights the policy was trained on
    save_checkpoint(model, tmp_path / "retrained.safetensors")
    logs = {name: tmp_path / f"{name}.log" for name in ("policy", "fusion_retrained", "fusion_default")}
    policy_proc = subprocess.Popen([sys.executable, "-m", "rl.policy_node", "--ros-args", "-p", f"policy:={policy}"],
                                   env=env, stdout=open(logs["policy"], "w"), stderr=subprocess.STDOUT)  # noqa: SIM115

    def fusion_node(log: str, *params: str):
        args = [a for p in (*params, "diagnostics_period_s:=0.2") for a in ("-p", p)]
        return subprocess.Popen([sys.executable, "-m", "fusion_attn.node", "--ros-args", *args], env=env,
                                stdout=open(logs[log], "w"), stderr=subprocess.STDOUT)

    # torch: the contract is the weights' digest whatever the backend, and new weights on ONNX Runtime would
    # first be exported (15-40 s here); the packaged model's graph is in the run's cache already
    fusion = fusion_node("fusion_retrained", f"checkpoint:={tmp_path / 'retrained.safetensors'}", "backend:=torch")
    fusion_log = logs["fusion_retrained"]
    try:
        assert wait_until(lambda: "refusing to drive" in logs["policy"].read_text(), 60), logs["policy"].read_text()
        assert "(the fusion model changed)" in logs["policy"].read_text()
        assert wait_until(lambda: any(lvl == DiagnosticStatus.ERROR and "weights digest" in msg
                                      for lvl, msg in seen["policy_status"]), 20), seen["policy_status"][-3:]
        start = len(seen["cmd"])
        assert wait_until(lambda: len(seen["cmd"]) - start >= 5, 10)
        assert all(c == (0.0, 0.0) for c in seen["cmd"][start:])
        stop_node(fusion, logs["fusion_retrained"])
        # the packaged model it was trained on: the refusal lifts
        fusion, fusion_log = fusion_node("fusion_default"), logs["fusion_default"]
        assert wait_until(lambda: "fusion matches the policy's contract" in logs["policy"].read_text(), 60), \
            logs["policy"].read_text()[-2000:]
        client = node.create_client(SetParameters, "/fusion_node/set_parameters")
        assert client.wait_for_service(timeout_sec=10)
        value = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=0.5)
        future = client.call_async(SetParameters.Request(parameters=[Parameter(name="tau.global", value=value)]))
        assert wait_until(future.done, 10) and future.result().results[0].successful
        assert wait_until(lambda: "tau.global 0.5, the policy was trained with 1.0" in logs["policy"].read_text(), 20), \
            logs["policy"].read_text()[-2000:]
        assert policy_proc.poll() is None and fusion.poll() is None
    finally:
        stop_nodes((fusion, fusion_log), (policy_proc, logs["policy"]))


def test_missing_policy_is_a_clear_error(ros, tmp_path):
    _, _, env = ros
    run = subprocess.run([sys.executable, "-m", "rl.policy_node", "--ros-args", "-p", f"policy:={tmp_path / 'none.onnx'}"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and "cannot load policy" in run.stderr


def test_closed_loop_episode_completes(ros, policy, tmp_path):
    """bridge (simulated sensors, /clock) -> fusion_node -> policy_node -> cmd_vel -> bridge."""
    _, seen, env = ros
    logs = {name: tmp_path / f"{name}.log" for name in ("bridge", "robot")}
    commands = [[sys.executable, "-m", "fusion_attn.sim.bridge", "--ros-args", "-p", "env_id:=FusionAttn/Control-v0"],
                [sys.executable, "-m", "fusion_attn.cli", "launch", "robot", f"policy:={policy}", "use_sim_time:=true"]]
    procs = [subprocess.Popen(cmd, env=env, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
             for name, cmd in zip(logs, commands)]
    def episodes_ended():
        return logs["bridge"].read_text().count(" ended after ")

    try:
        start = len(seen["cmd"])
        # the nodes start in parallel: wait until the policy drives (fused state and task flowing, the
        # contract checked) and its decisions arrive ...
        driving = wait_until(lambda: "contract: driving" in logs["robot"].read_text() and len(seen["cmd"]) > start + 5, 120)
        assert driving, logs["robot"].read_text()[-3000:]
        start, before = len(seen["cmd"]), episodes_ended()
        # ... then through a whole episode it drove from start to end (the current one began before)
        ended = wait_until(lambda: episodes_ended() > before + 1, 300)
        assert ended, logs["bridge"].read_text()[-2000:] + logs["robot"].read_text()[-2000:]
        cmds = np.array(seen["cmd"][start:])
        # a decision every 0.1 s through a 15 s episode, within the limits (a briefly trained policy may
        # well choose to stand still: what it chooses is not the point, that its choices arrive is)
        assert len(cmds) >= 100, (len(cmds), logs["robot"].read_text()[-2000:])
        assert np.all(np.abs(cmds[:, 0]) <= 0.8 + 1e-6) and np.all(np.abs(cmds[:, 1]) <= 1.5 + 1e-6)  # limits
        assert all(p.poll() is None for p in procs), logs["robot"].read_text()[-2000:]
    finally:
        stop_nodes(*((p, logs[name]) for p, name in zip(procs, logs)))


def test_a_policy_reads_the_fusions_ego_rate_from_its_row_when_its_layout_says_so():
    """A policy trained on a fusion with the ego_rate output reads speed and yaw rate from the message's last
    row, after the attention; one trained without it reads the same message's sensor rows as before."""
    from fusion_attn.contract import ObservationLayout, PolicyContract
    from fusion_attn.frames import FusedState
    from fusion_attn.messages import fused_state_msg, to_rclpy
    from rl.policy_node import fused_parts, observation

    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.ones(4), 4).T.astype(np.float32)  # (S, H)
    state = FusedState(stamp_ns=1, frame_id="base_link", pooled=rng.standard_normal(64).astype(np.float32),
                       latents=rng.standard_normal((8, 64)).astype(np.float32), attention=attention,
                       present=np.ones(4, bool), ages_s=np.zeros(4, np.float32), tau=np.ones(5, np.float32),
                       trust=np.ones(4, np.float32), sensors=("camera", "lidar", "imu", "imu2"),
                       ego_rate=np.array([0.4, -0.2], np.float32))
    msg = to_rclpy(fused_state_msg(state))
    assert isinstance(msg, Image)
    for ego in (True, False):
        contract = PolicyContract({}, 4, ObservationLayout(64, True, 0, 4, ego), None, 0.1)
        obs = observation(fused_parts(msg, contract) if ego else _without_ego_row(msg, contract), None, contract)
        want = [state.pooled, state.modality_attention, *([state.ego_rate] if ego else [])]
        np.testing.assert_array_equal(obs, np.concatenate(want))


def _without_ego_row(msg, contract):
    """The same state from a fusion without the ego_rate output: its message has no last row."""
    from rl.policy_node import fused_parts

    msg.height -= 1
    msg.data = bytes(msg.data)[: msg.height * msg.step]
    return fused_parts(msg, contract)
