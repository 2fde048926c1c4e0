"""policy_node over real DDS: safety behaviour alone, then the closed loop simulator bridge -> fusion_node
-> policy_node -> cmd_vel -> simulator, until an episode completes."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import wait_until

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
from geometry_msgs.msg import Twist
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
def ros(tmp_path_factory):
    domain = str(200 + os.getpid() % 30)
    os.environ["ROS_DOMAIN_ID"] = domain
    rclpy.init()
    node = rclpy.create_node("policy_tester")
    seen = {"cmd": []}
    node.create_subscription(Twist, "cmd_vel", lambda m: seen["cmd"].append((m.linear.x, m.angular.z)), 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    env = dict(os.environ, ROS_DOMAIN_ID=domain, PYTHONUNBUFFERED="1",
               FUSION_ATTN_CACHE=str(tmp_path_factory.getbasetemp() / "onnx-cache"))
    yield node, seen, env
    executor.shutdown()
    rclpy.shutdown()


def test_stops_without_fused_state_and_resets_memory_on_request(ros, policy, tmp_path):
    node, seen, env = ros
    log = tmp_path / "policy.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rl.policy_node", "--ros-args", "-p", f"policy:={policy}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        start = len(seen["cmd"])
        assert wait_until(lambda: len(seen["cmd"]) - start >= 5, 30), log.read_text()
        assert all(c == (0.0, 0.0) for c in seen["cmd"][start:])  # nothing fused yet: it stands still
        bad = node.create_publisher(Image, "fused_state", 10)
        assert wait_until(lambda: bad.get_subscription_count() > 0, 10)  # a message before discovery is lost
        bad.publish(Image(height=12, width=64, encoding="mono8", step=64, data=bytes(768)))
        assert wait_until(lambda: "fused_state dropped: mono8" in log.read_text(), 10), log.read_text()
        client = node.create_client(Trigger, "/policy_node/reset_memory")
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Trigger.Request())
        assert wait_until(future.done, 10) and future.result().success
        assert "stopped: no fused state" in log.read_text() and proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, log.read_text()


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
        # the nodes start in parallel: wait until the policy drives (fused state and task flowing) ...
        driving = wait_until(lambda: any(c != (0.0, 0.0) for c in seen["cmd"][start:]), 120)
        assert driving, logs["robot"].read_text()[-3000:]
        start, before = len(seen["cmd"]), episodes_ended()
        # ... then through a whole episode it drove from start to end (the current one began before)
        ended = wait_until(lambda: episodes_ended() > before + 1, 300)
        assert ended, logs["bridge"].read_text()[-2000:] + logs["robot"].read_text()[-2000:]
        cmds = np.array(seen["cmd"][start:])
        moving = np.abs(cmds).sum(1) > 0
        assert moving.sum() >= 20, (len(cmds), logs["robot"].read_text()[-2000:])  # the policy drove it
        assert np.all(np.abs(cmds[:, 0]) <= 0.8 + 1e-6) and np.all(np.abs(cmds[:, 1]) <= 1.5 + 1e-6)  # limits
        assert all(p.poll() is None for p in procs), logs["robot"].read_text()[-2000:]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
