"""fusion_node over real DDS: its own process (started by `fusion-attn launch`), real recordings played
at their recorded rate, outputs received by a subscriber. No mocks."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import Spinner, ros_domain, stop_node, wait_until

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import TwistStamped
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image, Imu, PointCloud2
from std_msgs.msg import String

from fusion_attn.attention_maps import picture_size
from fusion_attn.checkpoint import save_checkpoint
from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.frames import NS_PER_S, ImuSample, LidarFrame, stamp_to_ns
from fusion_attn.messages import imu_msg, pointcloud2_msg, to_rclpy
from fusion_attn.model import FusionModel
from fusion_attn.outputs import ERROR, WARN, parse_fused_state_rows
from fusion_attn.pipeline import load_model
from fusion_attn.play import play

CAMERA, IMU = "/cam0/image_raw", "/imu0"
HEADS = 4

pytestmark = pytest.mark.alone  # a node fusing at its rate and draining floods: not beside another test


class RosProbe:
    """A node in this process: records fused states, diagnostics and the camera stamps it played."""

    def __init__(self):
        self.node = rclpy.create_node("fusion_tester")
        self.fused, self.diags, self.camera_stamps = [], [], []
        self.node.create_subscription(Image, "/fused_state", self.fused.append, 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diags.append, 50)
        self.node.create_subscription(Image, CAMERA, lambda m: self.camera_stamps.append(stamp_to_ns(m.header.stamp)),
                                      qos_profile_sensor_data)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.spinner = Spinner(self.executor)

    def states(self, since: int = 0):
        """-> [(stamp_ns, attention (3, H))] of fused states received after index `since`."""
        out = []
        for m in self.fused[since:]:
            rows = np.frombuffer(bytes(m.data), np.float32).reshape(m.height, m.width)
            out.append((stamp_to_ns(m.header.stamp), parse_fused_state_rows(rows, HEADS)["attention"]))
        return out

    def status(self, name: str):
        for array in reversed(self.diags):
            for s in array.status:
                if s.name == f"fusion_attn: {name}":
                    return s.level[0], s.message, {kv.key: kv.value for kv in s.values}
        return None

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        if not (met := wait_until(predicate, timeout)):
            print(f"waited {timeout} s in vain;", self.spinner.report())  # shown with the test's failure
        return met


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    os.environ["ROS_DOMAIN_ID"] = ros_domain(0)
    rclpy.init()
    tester = RosProbe()
    yield tester
    tester.executor.shutdown()
    rclpy.shutdown()


@pytest.fixture(scope="module")
def fusion_node(ros, real_data, tmp_path_factory):
    """fusion_node configured for the EuRoC topics and a lidar that never publishes."""
    work = tmp_path_factory.mktemp("node")
    params = yaml.safe_load(Path("config/fusion.yaml").read_text())
    params["/**"]["ros__parameters"].update(camera_topic=CAMERA, imu_topic=IMU, lidar_topic="/lidar/points")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(work / "node.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fusion_attn.cli", "launch", f"params_file:={work / 'params.yaml'}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        ready = ros.wait_for(lambda: ros.status("fusion") is not None, timeout=60)
        assert ready, (work / "node.log").read_text()
        yield proc, work / "node.log"
        assert stop_node(proc, work / "node.log") == 0, (work / "node.log").read_text()


def _play(ros, real_data, **kw):
    # the node subscribes both topics: play starts once it is discovered, which a loaded machine can
    # take longer than play's default 2 s to do (the first messages were lost then)
    return play(ros.node, [real_data / "euroc_v1_01_cam_imu"], wait_s=30.0, **kw)


def test_fuses_a_real_recording_at_its_rate(ros, fusion_node, real_data):
    start = len(ros.fused)
    assert _play(ros, real_data) == 441
    time.sleep(0.3)
    states = ros.states(start)
    stamps = np.array([s for s, _ in states])
    assert np.all(np.diff(stamps) > 0)
    # the 20 Hz timer, on the data's time (the stamps'); a tick with no new data (a player stalled by the
    # load) publishes nothing, so the typical step, not the count
    rate = NS_PER_S / np.median(np.diff(stamps))
    assert 16 <= rate <= 24, rate
    during = [a for s, a in states if a[0].sum() > 0]  # the camera was present
    assert len(during) >= 20
    for attention in during:
        assert np.all(attention[1] == 0.0)  # lidar configured but absent: masked, exactly zero mass
        assert attention[0].min() > 0.0
        np.testing.assert_allclose(attention.sum(0), 1.0, atol=1e-5)
    # the 200 Hz IMU is fused nearly always; a late burst on a loaded 2-core machine may mask it briefly
    with_imu = sum(a[2].min() > 0 for a in during)
    print(f"IMU fused in {with_imu} of {len(during)} camera fusions")
    assert with_imu >= 0.9 * len(during)
    assert ros.wait_for(lambda: ros.status("lidar")[1] == "no data received", timeout=3)
    level, _, lidar = ros.status("lidar")
    assert level == 2 and lidar["received"] == "0" and lidar["masked"] == "true"
    _, _, fusion = ros.status("fusion")
    assert fusion["backend"] == "onnxruntime" and fusion["precision"] == "fp32"
    assert {"tau_global", "tau_camera", "attention_camera", "attention_lidar", "processing_time_ms",
            "pipeline_latency_ms"} <= set(fusion)
    camera_rates = [float(v["rate_hz"]) for d in ros.diags for s in d.status if s.name == "fusion_attn: camera"
                    for v in [{kv.key: kv.value for kv in s.values}] if v["masked"] == "false"]
    assert camera_rates and abs(np.median(camera_rates) - 20.0) < 2.0


def test_a_sensor_that_stops_is_masked_within_two_periods(ros, fusion_node, real_data):
    start, cam_start = len(ros.fused), len(ros.camera_stamps)
    _play(ros, real_data, keep=lambda topic, t: not (topic == CAMERA and t > 1.0))
    time.sleep(0.3)
    last_camera = ros.camera_stamps[-1]
    assert len(ros.camera_stamps) - cam_start in (20, 21)
    states = ros.states(start)
    after = [(s, a) for s, a in states if s > last_camera]
    first_masked = next(s for s, a in after if np.all(a[0] == 0))
    period = NS_PER_S // 20
    assert first_masked - last_camera <= 3 * period  # next frame due at +1 period, masked within 2 more
    imu_only = [a for s, a in after if s > first_masked and a[2].sum() > 0]
    assert len(imu_only) >= 10  # output continues on the IMU alone
    for a in imu_only:
        np.testing.assert_allclose(a[2], 1.0, atol=1e-6)
    level, message, _ = ros.status("camera")
    assert level == 2 and "stale" in message


def test_garbage_flood_is_counted_and_survived(ros, fusion_node, real_data):
    """Every bad message that reaches the node is counted and named, the node lives, and it fuses the recording
    as before once the flood ends. Real camera frames reach the sync during the flood; how many are fused
    then is not asserted: it depends on how fast a loaded machine drains the queues."""
    proc, log = fusion_node
    bad_camera = ros.node.create_publisher(Image, CAMERA, qos_profile_sensor_data)
    bad_imu = ros.node.create_publisher(Imu, IMU, qos_profile_sensor_data)
    assert ros.wait_for(lambda: bad_camera.get_subscription_count() > 0 and bad_imu.get_subscription_count() > 0,
                        timeout=10)  # what is sent before discovery is lost, and would count as sent
    sent = {"camera": 0, "imu": 0}
    stop = threading.Event()

    def flood():  # 10x nominal: camera 200 Hz, IMU 2000 Hz, for the whole recording
        t = time.monotonic()
        while not stop.is_set():
            now = ros.node.get_clock().now().to_msg()
            nan_imu = Imu()
            nan_imu.header.stamp = now
            nan_imu.linear_acceleration.x = float("nan")
            for _ in range(10):
                bad_imu.publish(nan_imu)
            sent["imu"] += 10
            bad = Image(height=480, width=752, encoding="mono8", step=752, data=b"\x00" * 100)  # too short
            bad.header.stamp = now
            bad_camera.publish(bad)
            sent["camera"] += 1
            t += 0.005
            time.sleep(max(0.0, t - time.monotonic()))

    def received(name):  # frames the sync accepted, since the node started
        status = ros.status(name)
        return int(status[2]["received"]) if status else 0

    flooder = threading.Thread(target=flood)
    start, camera_before = len(ros.fused), received("camera")
    flooder.start()
    _play(ros, real_data)
    stop.set()
    flooder.join()
    # Best effort on 2 shared cores: much of a 2 kHz flood is lost in the middleware before the node's
    # callback (it never sees those; with training jobs beside it, CI saw 11 %); every message that reaches
    # the node is counted, so a fair share of the flood must show up as dropped_malformed.
    def malformed(name):
        return int(ros.status(name)[2].get("dropped_malformed", 0))

    assert ros.wait_for(lambda: malformed("imu") >= 0.05 * sent["imu"], timeout=5), (sent, ros.status("imu"))
    assert proc.poll() is None, log.read_text()  # alive
    _, _, camera = ros.status("camera")
    assert malformed("camera") >= 0.05 * sent["camera"], camera
    # the newest drop's reason on /diagnostics, where a throttled log line may not have said it
    assert "data has 100 bytes" in camera["last_dropped"] and "non-finite" in ros.status("imu")[2]["last_dropped"]
    print("flood sent", sent, "imu diagnostics", ros.status("imu")[2], "camera diagnostics", camera)
    # the real frames share the camera's keep-last queue with ten times as many bad ones: how many reach the
    # fusion depends on how fast the node drains it (CI, 2 cores beside a training: 14 of about 40 ticks;
    # beside a busy loop and a benchmark: 1; a whole CI run on a slow VM, 2026-12-04: none, each arriving
    # later than a 20 Hz camera's 75 ms), so it is printed, not asserted. That real frames got through the
    # flood to the sync is asserted; and after the flood the node must fuse the same recording as the first
    # test does
    print("fused with the camera during the flood:", sum(a[0].sum() > 0 for _, a in ros.states(start)))
    assert ros.wait_for(lambda: received("camera") > camera_before, timeout=5), (camera_before, ros.status("camera"))
    start = len(ros.fused)
    assert _play(ros, real_data) == 441
    time.sleep(0.3)
    assert sum(a[0].sum() > 0 for _, a in ros.states(start)) >= 20
    assert "dropped imu message" in log.read_text()  # said what it dropped (throttled)


def _set(ros, node="fusion_node", named=None, **values):
    """Set parameters: `named` by their names, `values` with "." spelled "_" (tau_global=0.5)."""
    client = ros.node.create_client(SetParameters, f"/{node}/set_parameters")
    assert client.wait_for_service(timeout_sec=10)
    values = {**(named or {}), **{k.replace("_", "."): v for k, v in values.items()}}
    request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
    future = client.call_async(request)
    assert ros.wait_for(future.done, timeout=10)
    ros.node.destroy_client(client)
    return future.result().results


def test_tau_through_the_parameter_service_changes_the_next_outputs(ros, fusion_node, real_data):
    floor = load_model(None)[0].cfg.model.trust_floor  # the packaged model the node runs
    def weights_follow(tau, since, until=None):
        """Every live fusion's sensor weights are its published trust (at least the model's trust floor)
        ^(1 / (τ_global τ_sensor)), normalised: the τ set is the τ the model used."""
        live = [parse_fused_state_rows(np.frombuffer(bytes(m.data), np.float32).reshape(m.height, m.width), HEADS)
                for m in ros.fused[since:until]]
        live = [p for p in live if p["attention"][0].sum() > 0 and p["attention"][2].sum() > 0]
        assert len(live) >= 10
        for p in live:
            present = p["attention"].sum(-1) > 0
            trust = np.maximum(p["trust"], floor)
            expected = np.where(present, np.power(trust, 1.0 / (tau[0] * np.asarray(tau[1:]))), 0.0)
            np.testing.assert_allclose(p["attention"][:, 0], expected / expected.sum(), atol=2e-3)
        return np.mean([p["attention"][:, 0] for p in live], axis=0)

    [rejected] = _set(ros, tau_imu=-1.0)
    assert not rejected.successful and rejected.reason
    start = len(ros.fused)
    player = threading.Thread(target=_play, args=(ros, real_data))
    player.start()
    time.sleep(1.0)
    mid = len(ros.fused)
    [ok] = _set(ros, tau_imu=0.05)
    assert ok.successful, ok.reason
    player.join()
    weights_follow((1.0, 1.0, 1.0, 1.0), start, mid)
    weights_follow((1.0, 1.0, 1.0, 0.05), mid + 2)  # a small τ_imu sharpens the IMU's doubt
    assert ros.wait_for(lambda: ros.status("fusion")[2]["tau_imu"] == "0.05", timeout=3)
    [ok] = _set(ros, tau_imu=1.0)
    assert ok.successful


@pytest.fixture(scope="module")
def managed_node(ros, tmp_path_factory):
    """A second fusion_node: lifecycle driven from here, reliable QoS, fusing on each camera frame (an IMU
    configured too: the timer fuses it while the camera is silent)."""
    work = tmp_path_factory.mktemp("managed")
    params = yaml.safe_load(Path("config/fusion.yaml").read_text())
    params["/**"]["ros__parameters"].update(autostart=False, qos_reliability="reliable", trigger="camera",
                                            camera_topic="/trig/image", lidar_type="none", imu_topic="/trig/imu")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(work / "node.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fusion_attn.node", "--ros-args", "-r", "__node:=managed_fusion",
                                 "-r", "fused_state:=/managed/fused_state", "--params-file", str(work / "params.yaml")],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        yield proc, work / "node.log"
        stop_node(proc, work / "node.log")


def _change_state(ros, transition_id, node="managed_fusion"):
    from lifecycle_msgs.srv import ChangeState

    client = ros.node.create_client(ChangeState, f"/{node}/change_state")
    assert client.wait_for_service(timeout_sec=30)
    request = ChangeState.Request()
    request.transition.id = transition_id
    future = client.call_async(request)
    assert ros.wait_for(future.done, timeout=60)
    ros.node.destroy_client(client)
    return future.result().success


def _camera_frames(ros, count, qos):
    pub = ros.node.create_publisher(Image, "/trig/image", qos)
    ros.wait_for(lambda: pub.get_subscription_count() > 0, timeout=3.0)  # discovery (none while inactive)
    stamps = []
    for _ in range(count):
        msg = Image(height=48, width=64, encoding="mono8", step=64, data=bytes(64 * 48))
        msg.header.stamp = ros.node.get_clock().now().to_msg()
        stamps.append(stamp_to_ns(msg.header.stamp))
        pub.publish(msg)
        time.sleep(0.05)
    ros.node.destroy_publisher(pub)
    return stamps


def _imu_samples(ros, count, qos):
    pub = ros.node.create_publisher(Imu, "/trig/imu", qos)
    ros.wait_for(lambda: pub.get_subscription_count() > 0, timeout=3.0)
    stamps = []
    for _ in range(count):
        stamps.append(ros.node.get_clock().now().nanoseconds)
        pub.publish(to_rclpy(imu_msg(ImuSample(stamps[-1], "imu", np.array([0.0, 0.0, 9.81]), np.zeros(3)))))
        time.sleep(0.01)
    ros.node.destroy_publisher(pub)
    return stamps


WRONG_TYPE_PUBLISHER = """
import time, rclpy
from std_msgs.msg import String
rclpy.init()
node = rclpy.create_node("wrong_type_publisher")
pub = node.create_publisher(String, "/trig/image", 10)
for _ in range(200):
    pub.publish(String(data="not an image"))
    time.sleep(0.05)
"""


def test_lifecycle_trigger_mode_and_qos_warnings(ros, managed_node):
    from lifecycle_msgs.msg import Transition
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    proc, log = managed_node
    outputs = []
    ros.node.create_subscription(Image, "/managed/fused_state", outputs.append, 50)
    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

    assert _change_state(ros, Transition.TRANSITION_CONFIGURE)
    _camera_frames(ros, 3, reliable)
    assert outputs == []  # configured but inactive: no subscription, nothing published
    assert _change_state(ros, Transition.TRANSITION_ACTIVATE)

    stamps = _camera_frames(ros, 10, reliable)
    assert ros.wait_for(lambda: len(outputs) >= 10, timeout=5)
    assert [stamp_to_ns(m.header.stamp) for m in outputs] == stamps  # one fusion per trigger frame, at its stamp

    # a best-effort camera publisher can never feed a reliable subscription: said loudly, not silently
    _camera_frames(ros, 2, qos_profile_sensor_data)
    # another message type on the topic (from its own process: one DDS participant holds one type per topic)
    wrong_type = subprocess.Popen([sys.executable, "-c", WRONG_TYPE_PUBLISHER])
    assert ros.wait_for(lambda: "incompatible with this subscription" in log.read_text()
                        and "another message type" in log.read_text(), timeout=15), log.read_text()
    wrong_type.terminate()
    wrong_type.wait(timeout=10)
    assert len(outputs) == 10

    # the trigger sensor falls silent: the timer (20 Hz) fuses the IMU, stamped with the IMU's data
    imu_stamps = _imu_samples(ros, 100, reliable)
    assert ros.wait_for(lambda: len(outputs) >= 20, timeout=5)
    time.sleep(0.5)  # the last of them in flight (the IMU stays fresh 50 ms)
    assert {stamp_to_ns(m.header.stamp) for m in outputs[10:]} <= set(imu_stamps)
    fused = len(outputs)

    assert _change_state(ros, Transition.TRANSITION_DEACTIVATE)
    _camera_frames(ros, 3, reliable)
    assert len(outputs) == fused  # inactive again
    assert _change_state(ros, Transition.TRANSITION_CLEANUP)
    assert proc.poll() is None


def _lifecycle(ros, node: str) -> list[tuple[int, int, str]]:
    """(stamp, level, message) of each lifecycle status `node` published, in order."""
    return [(stamp_to_ns(a.header.stamp), s.level[0], s.message) for a in list(ros.diags) for s in a.status
            if s.hardware_id == node and s.name == "fusion_attn: lifecycle"]


def test_an_idle_node_says_on_diagnostics_why_it_is_idle(ros, tmp_path, tmp_path_factory):
    """Unconfigured, after a failed configure, then configured but inactive: fusion_node publishes
    /diagnostics at its period all along, with its lifecycle state and why it is idle."""
    from lifecycle_msgs.msg import Transition

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "node.log", "w") as log:
        # tau.global:=1 is an integer, as a parameter file's `1` is: taken as 1.0, not refused
        proc = subprocess.Popen([sys.executable, "-m", "fusion_attn.node", "--ros-args", "-r", "__node:=idle_fusion",
                                 "-p", "autostart:=false", "-p", "backend:=torch", "-p", f"checkpoint:={bad}",
                                 "-p", "diagnostics_period_s:=0.2", "-p", "tau.global:=1"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        assert ros.wait_for(lambda: len(_lifecycle(ros, "idle_fusion")) >= 6, timeout=60), \
            (tmp_path / "node.log").read_text()
        stamps, levels, messages = zip(*_lifecycle(ros, "idle_fusion"))
        assert set(messages) == {"unconfigured: not configured yet"} and set(levels) == {WARN}
        assert 0.15 <= np.median(np.diff(stamps)) / NS_PER_S <= 0.3  # at diagnostics_period_s

        assert not _change_state(ros, Transition.TRANSITION_CONFIGURE, "idle_fusion")
        assert ros.wait_for(lambda: "configure failed" in _lifecycle(ros, "idle_fusion")[-1][2], timeout=10)
        _, level, message = _lifecycle(ros, "idle_fusion")[-1]
        assert level == ERROR and message.startswith("unconfigured: configure failed: ")
        assert "bad.safetensors is not a readable safetensors checkpoint" in message

        [ok] = _set(ros, "idle_fusion", checkpoint="")  # unconfigured after the failure: settable again
        assert ok.successful, ok.reason
        assert _change_state(ros, Transition.TRANSITION_CONFIGURE, "idle_fusion")
        assert ros.wait_for(lambda: _lifecycle(ros, "idle_fusion")[-1][1:] == (WARN, "inactive: not activated"),
                            timeout=10)
        others = {s.name for a in list(ros.diags) for s in a.status if s.hardware_id == "idle_fusion"}
        assert others == {"fusion_attn: lifecycle"}  # no sensor or fusion status before it is active

        # diagnostics outlive every transition: activate, deactivate, clean up; its period settable after
        assert _change_state(ros, Transition.TRANSITION_ACTIVATE, "idle_fusion")
        [ok] = _set(ros, "idle_fusion", tau_global=2)  # an integer, as `ros2 param set ... tau.global 2` sends
        assert ok.successful, ok.reason
        assert _change_state(ros, Transition.TRANSITION_DEACTIVATE, "idle_fusion")
        assert ros.wait_for(lambda: _lifecycle(ros, "idle_fusion")[-1][1:] == (WARN, "inactive: deactivated"),
                            timeout=10)
        assert _change_state(ros, Transition.TRANSITION_CLEANUP, "idle_fusion")
        [ok] = _set(ros, "idle_fusion", named={"diagnostics_period_s": 0.1})
        assert ok.successful, ok.reason
        n = len(_lifecycle(ros, "idle_fusion"))
        assert ros.wait_for(lambda: len(_lifecycle(ros, "idle_fusion")) >= n + 5, timeout=10)
        stamps, _, messages = zip(*_lifecycle(ros, "idle_fusion")[-4:])
        assert set(messages) == {"unconfigured: cleaned up"} and np.median(np.diff(stamps)) / NS_PER_S < 0.15
        assert proc.poll() is None, (tmp_path / "node.log").read_text()
    finally:
        stop_node(proc, tmp_path / "node.log")


def test_node_with_a_corrupt_checkpoint_says_so_and_exits(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    run = subprocess.run([sys.executable, "-m", "fusion_attn.node", "--ros-args", "-r", "__node:=broken_fusion",
                          "-p", f"checkpoint:={bad}"], capture_output=True, text=True, timeout=60, check=False,
                         env=dict(os.environ, ROS_DOMAIN_ID=ros_domain(1)))
    assert run.returncode == 1
    assert "configure failed" in run.stderr and "bad.safetensors is not a readable safetensors checkpoint" in run.stderr


def _describe(ros, names):
    from rcl_interfaces.srv import DescribeParameters

    client = ros.node.create_client(DescribeParameters, "/fusion_node/describe_parameters")
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(DescribeParameters.Request(names=names))
    assert ros.wait_for(future.done, timeout=10)
    ros.node.destroy_client(client)
    return {d.name: d for d in future.result().descriptors}


def test_parameter_descriptors_say_which_are_locked_while_configured(ros, fusion_node):
    d = _describe(ros, ["tau.imu", "backend", "limits.max_range_m"])
    assert not d["backend"].read_only  # settable before configure: rclpy's read_only would forbid that too
    assert d["backend"].additional_constraints.startswith("read-only while configured")
    assert d["tau.imu"].additional_constraints.startswith("may be set at run time")
    assert "read-only while configured" in d["limits.max_range_m"].additional_constraints
    [refused] = _set(ros, backend="torch")
    assert not refused.successful and "read-only while configured" in refused.reason


def test_stray_future_and_impossible_messages_are_dropped_and_counted(ros, fusion_node):
    """What an independent client sent: IMU samples stamped 10 s back among good ones, stamps 5.7 s ahead,
    a 1e30 acceleration, a cloud of 3e38 coordinates. Each is dropped and counted by its reason, nothing
    is reset, nothing reaches the tokenizer, and every age in the diagnostics stays a sane number."""
    proc, log = fusion_node
    imu_pub = ros.node.create_publisher(Imu, IMU, qos_profile_sensor_data)
    lidar_pub = ros.node.create_publisher(PointCloud2, "/lidar/points", qos_profile_sensor_data)
    assert ros.wait_for(lambda: imu_pub.get_subscription_count() > 0 and lidar_pub.get_subscription_count() > 0,
                        timeout=10)

    def imu(stamp_ns, accel_z=9.81):
        return to_rclpy(imu_msg(ImuSample(stamp_ns, "imu", np.array([0.0, 0.0, accel_z]), np.zeros(3))))

    absurd = np.array([[1.0, 2.0, 0.5, 1.0], [3e38, -3e38, 1.0, 1.0]], np.float32)
    strays = 0
    for k in range(200):  # 2 s of a 100 Hz IMU, a stray after every other sample
        t = ros.node.get_clock().now().nanoseconds
        imu_pub.publish(imu(t))
        if k % 2:
            imu_pub.publish(imu(t - 10 * NS_PER_S))
            strays += 1
        if k % 20 == 10:
            imu_pub.publish(imu(t + 5676 * NS_PER_S // 1000))
            imu_pub.publish(imu(t + 1, accel_z=1e30))
            lidar_pub.publish(to_rclpy(pointcloud2_msg(LidarFrame(t, "lidar", absurd))))
        time.sleep(0.01)

    def counted(name, reason):
        return int(ros.status(name)[2].get(f"dropped_{reason}", 0))

    def all_counted():  # best effort on a loaded machine may lose a few; what arrives is counted by reason
        return (counted("imu", "out_of_order") >= 0.5 * strays and counted("imu", "future") >= 1
                and counted("imu", "out_of_limits") >= 1 and counted("lidar", "out_of_limits") >= 1)

    assert ros.wait_for(all_counted, timeout=10), (strays, ros.status("imu"), ros.status("lidar"))
    _, _, imu_values = ros.status("imu")
    assert imu_values["resets"] == "0" and ros.status("lidar")[2]["received"] == "0"
    for array in ros.diags[-3:]:
        for s in array.status:
            values = {kv.key: kv.value for kv in s.values}
            for key in ("age_ms", "pipeline_latency_ms"):
                if key in values:
                    assert values[key] == "n/a" or float(values[key]) >= 0.0, (s.name, values)
            assert "nan" not in s.message and "for -" not in s.message, s.message
    text = log.read_text()
    assert "time jumped back" not in text and "invalid value encountered" not in text
    assert proc.poll() is None, text


PLAIN = "/plain"  # a namespace: the node's relative topics, the plotting ones included, move into it


@pytest.fixture(scope="module")
def plain_node(ros, tmp_path_factory):
    """A third fusion_node, in a namespace, timer-driven, camera and IMU from the test, no lidar; it publishes
    the attention image every 0.5 s."""
    work = tmp_path_factory.mktemp("plain")
    params = yaml.safe_load(Path("config/fusion.yaml").read_text())
    params["/**"]["ros__parameters"].update(lidar_type="none", diagnostics_period_s=0.2,
                                            attention_image={"enabled": True, "period_s": 0.5})
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(work / "node.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fusion_attn.node", "--ros-args", "-r", "__node:=plain_fusion",
                                 "-r", f"__ns:={PLAIN}", "--params-file", str(work / "params.yaml")],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        assert ros.wait_for(lambda: _plain_fusion(ros) is not None, timeout=90), (work / "node.log").read_text()
        yield proc, work / "node.log"
        assert stop_node(proc, work / "node.log") == 0, (work / "node.log").read_text()


def _plain_fusion(ros) -> dict | None:
    """The values of plain_fusion's latest fusion status (other fusion nodes report the same names)."""
    for array in reversed(ros.diags):
        for s in array.status:
            if s.name == "fusion_attn: fusion" and s.hardware_id == "plain_fusion":
                return {kv.key: kv.value for kv in s.values}
    return None


def _withheld(ros) -> int:
    return int(_plain_fusion(ros)["withheld_all_masked"])


def _feed_plain(ros, seconds: float) -> set[int]:
    """A 100 Hz IMU and a 20 Hz camera into the plain node, stamped now; -> every stamp sent."""
    imu_pub = ros.node.create_publisher(Imu, f"{PLAIN}/imu/data", qos_profile_sensor_data)
    cam_pub = ros.node.create_publisher(Image, f"{PLAIN}/camera/image_raw", qos_profile_sensor_data)
    assert ros.wait_for(lambda: imu_pub.get_subscription_count() > 0 and cam_pub.get_subscription_count() > 0, 10)
    rng = np.random.default_rng(0)
    sent = set()
    for k in range(int(seconds * 100)):
        t = ros.node.get_clock().now().nanoseconds
        imu_pub.publish(to_rclpy(imu_msg(ImuSample(t, "imu", np.array([0.1, 0.0, 9.81]), np.array([0.0, 0.0, 0.2])))))
        sent.add(t)
        if k % 5 == 0:
            image = Image(height=48, width=64, encoding="mono8", step=64,
                          data=rng.integers(0, 256, 48 * 64, dtype=np.uint8).tobytes())
            image.header.stamp.sec, image.header.stamp.nanosec = divmod(t + 1, NS_PER_S)
            cam_pub.publish(image)
            sent.add(t + 1)
        time.sleep(0.01)
    ros.node.destroy_publisher(imu_pub)
    ros.node.destroy_publisher(cam_pub)
    return sent


def test_the_fused_state_carries_the_datas_time_and_none_comes_from_nothing(ros, plain_node):
    """Timer mode: each state's header is a stamp of the sensor data (not the node's clock at fusion),
    strictly increasing; while every sensor is masked nothing is published and the diagnostics count it."""
    proc, log = plain_node
    fused = []
    ros.node.create_subscription(Image, f"{PLAIN}/fused_state", fused.append, 50)
    withheld = _withheld(ros)
    assert ros.wait_for(lambda: _withheld(ros) >= withheld + 20, timeout=20)  # no data: every fusion all-masked
    assert fused == []
    values = _plain_fusion(ros)  # each of those fusions masked each configured sensor, and counted it
    assert int(values["masked_fusions_camera"]) >= int(values["withheld_all_masked"]) >= withheld + 20
    assert int(values["masked_fusions_imu"]) >= int(values["withheld_all_masked"])
    assert "masked_fusions_lidar" not in values  # not configured
    sent = _feed_plain(ros, 2.0)
    time.sleep(1.0)  # the last states arrive; then both sensors are masked
    stamps = [stamp_to_ns(m.header.stamp) for m in fused]
    assert len(stamps) >= 20
    assert set(stamps) <= sent  # the data's time
    assert np.all(np.diff(stamps) > 0)
    count, withheld = len(fused), _withheld(ros)
    assert ros.wait_for(lambda: _withheld(ros) >= withheld + 10, timeout=10)
    assert len(fused) == count, "a state was published with every sensor masked"
    assert proc.poll() is None, log.read_text()


PLAIN_SUBSCRIBER = """
import json, struct, sys, time
import rclpy
from geometry_msgs.msg import Vector3Stamped
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import Image
from std_msgs.msg import String

ns, wanted = sys.argv[1], int(sys.argv[2])
rclpy.init()
node = rclpy.create_node("plain_subscriber")
got = {"layout": None, "rows": {}, "attention": {}, "trust": {}}

def stamp(msg):
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec

def on_fused(msg):
    values = struct.unpack(f"<{msg.height * msg.width}f", bytes(msg.data))
    got["rows"][stamp(msg)] = [values[r * msg.width:(r + 1) * msg.width] for r in range(msg.height)]

def on_values(name):
    return lambda msg: got[name].__setitem__(stamp(msg), [msg.vector.x, msg.vector.y, msg.vector.z])

latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
node.create_subscription(String, ns + "/fused_state/layout", lambda msg: got.update(layout=json.loads(msg.data)),
                         latched)
node.create_subscription(Image, ns + "/fused_state", on_fused, 50)
node.create_subscription(Vector3Stamped, ns + "/fused_state/attention", on_values("attention"), 50)
node.create_subscription(Vector3Stamped, ns + "/fused_state/trust", on_values("trust"), 50)
print("ready", flush=True)
def matched():
    return len(set(got["rows"]) & set(got["attention"]) & set(got["trust"]))

end = time.monotonic() + 60
while time.monotonic() < end and not (got["layout"] and matched() >= wanted):
    rclpy.spin_once(node, timeout_sec=0.05)
layout = got.pop("layout")
first, stop = layout["rows"]["sensors"]
heads, trust = (slice(*layout["sensor_columns"][k]) for k in ("attention", "trust"))
got["per_head"] = {t: [row[heads] for row in rows[first:stop]] for t, rows in got["rows"].items()}
got["trust_column"] = {t: [row[trust][0] for row in rows[first:stop]] for t, rows in got["rows"].items()}
got["heads"] = layout["heads"]
del got["rows"]
print(json.dumps(got))
"""


def test_attention_and_trust_reach_a_plain_ros_subscriber_as_plottable_messages(ros, plain_node):
    """A subscriber importing only rclpy and message packages (its own process) gets, beside each fused
    state, its attention and trust as Vector3Stamped (x, y, z = camera, lidar, imu) at the same stamp, and
    decodes the fused state itself from the latched layout: the values agree, the attention sums to 1."""
    subscriber = subprocess.Popen([sys.executable, "-c", PLAIN_SUBSCRIBER, PLAIN, "15"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    try:
        assert subscriber.stdout.readline().strip() == "ready", subscriber.stderr.read()
        time.sleep(2.0)  # discovery
        _feed_plain(ros, 2.0)
        out, err = subscriber.communicate(timeout=90)
    finally:
        subscriber.kill()
    got = json.loads(out)
    assert got["heads"] == HEADS, err
    stamps = set(got["per_head"]) & set(got["attention"]) & set(got["trust"])
    assert len(stamps) >= 15, (len(got["per_head"]), len(got["attention"]), err)
    for t in stamps:
        per_head = np.array(got["per_head"][t])
        assert per_head.shape == (3, HEADS)
        np.testing.assert_allclose(got["attention"][t], per_head.mean(axis=1), atol=1e-6)
        # a fusion with nothing fresh (a feed that fell behind on a loaded machine) is all masked: zeros
        assert abs(sum(got["attention"][t]) - 1.0) < 1e-5 or got["attention"][t] == [0.0, 0.0, 0.0]
        assert got["trust"][t] == got["trust_column"][t]
        assert got["attention"][t][1] == 0.0 and got["trust"][t][1] == 0.0  # no lidar: masked, exactly 0
    assert sum(abs(sum(got["attention"][t]) - 1.0) < 1e-5 for t in stamps) >= 12, "too few fusions with a sensor"


def test_the_attention_image_arrives_at_its_period_when_enabled(ros, plain_node):
    """attention_image.enabled: an rgb8 sensor_msgs/Image of attention_maps' picture on
    fused_state/attention_image (in the node's namespace), at most one per period_s, stamped as a fused state."""
    topic = f"{PLAIN}/fused_state/attention_image"
    images = []
    ros.node.create_subscription(Image, topic, images.append, 10)
    assert ros.wait_for(lambda: ros.node.get_publishers_info_by_topic(topic), timeout=10)
    time.sleep(1.0)  # discovery
    sent = _feed_plain(ros, 3.0)
    time.sleep(1.0)
    width, height = picture_size(load_model()[0].cfg)
    # the node pictures the newest state not yet pictured: one may be left from an earlier test's feed
    images = [m for m in images if stamp_to_ns(m.header.stamp) >= min(sent)]
    assert len(images) >= 3, len(images)
    for m in images:
        assert (m.encoding, m.width, m.height, m.step) == ("rgb8", width, height, 3 * width)
        assert np.frombuffer(bytes(m.data), np.uint8).std() > 0
    stamps = [stamp_to_ns(m.header.stamp) for m in images]
    assert set(stamps) <= sent  # the data's time, as the fused state it pictures
    # throttled by the node's timer; the stamps are the pictured states' data times, which lag each tick
    # by up to a fusion period, so bound the count and the typical gap rather than every gap
    gaps = np.diff(stamps) / NS_PER_S
    fed_s = (max(sent) - min(sent)) / NS_PER_S  # 3 s, or more where publishing is slow (a loaded machine)
    assert len(images) <= fed_s / 0.5 + 2 and 0.4 <= np.median(gaps) <= 0.8, (fed_s, gaps)


def test_the_attention_image_is_off_by_default(ros, fusion_node):
    assert ros.wait_for(lambda: ros.node.get_publishers_info_by_topic("/fused_state"), timeout=10)
    assert ros.node.get_publishers_info_by_topic("/fused_state/attention_image") == []


def test_a_model_that_reads_odometry_and_a_second_imu_subscribes_to_them_and_fuses_a_real_robots(ros, real_data, tmp_path):
    """A checkpoint built with wheel odometry, a second IMU and the ego_rate output (seed-0 weights: the wiring,
    not what they learned): the node subscribes to its nav_msgs/Odometry topic and both IMU topics, and the
    fused state, its layout and the diagnostics carry a fourth and a fifth sensor, the fused state and its
    layout the fusion's speed and yaw rate. The Clearpath Husky's recording (IMU
    30 Hz, odometry 10 Hz) is played over DDS; this test relays its IMU to the second IMU's topic, a
    publisher of its own, as a second IMU's driver would be."""
    torch.manual_seed(0)
    cfg = FusionConfig(model=ModelConfig(odometry=True, second_imu=True, rate_readout=True, rate_output=True))
    checkpoint = save_checkpoint(FusionModel(cfg).eval(), tmp_path / "odometry.safetensors")
    params = yaml.safe_load(Path("config/fusion.yaml").read_text())
    params["/**"]["ros__parameters"].update(checkpoint=str(checkpoint), camera_type="none", lidar_type="none",
                                            imu_topic="/imu/data", odometry_topic="/husky_velocity_controller/odom",
                                            imu2_topic="/imu2/data", max_age_s={"imu": 0.1, "imu2": 0.2},
                                            diagnostics_period_s=0.2,
                                            # the relay below shares a process (and its GIL) with the player: it
                                            # delivers in bursts, which the default margin would mask as late
                                            jitter_margin_s=0.15)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    fused, layouts, twists = [], [], []
    relay = ros.node.create_publisher(Imu, "/imu2/data", qos_profile_sensor_data)
    ros.node.create_subscription(Imu, "/imu/data", relay.publish, qos_profile_sensor_data)
    ros.node.create_subscription(Image, "/odo/fused_state", fused.append, 50)
    ros.node.create_subscription(TwistStamped, "/odo/fused_state/twist", twists.append, 50)
    ros.node.create_subscription(String, "/odo/fused_state/layout", layouts.append,
                                 QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))

    def status(name):
        for array in reversed(ros.diags):
            for s in array.status:
                if s.name == f"fusion_attn: {name}" and s.hardware_id == "odometry_fusion":
                    return s.level[0], {kv.key: kv.value for kv in s.values}
        return None

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "node.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fusion_attn.node", "--ros-args", "-r", "__node:=odometry_fusion",
                                 "-r", "__ns:=/odo", "--params-file", str(tmp_path / "params.yaml")],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert ros.wait_for(lambda: layouts, timeout=90), (tmp_path / "node.log").read_text()
            # play waits for the node to hear its topics; the relay's, it does not know of
            assert ros.wait_for(lambda: relay.get_subscription_count() > 0, timeout=30)
            played = play(ros.node, [real_data / "husky_imu_odom_gps.bag"], keep=lambda _topic, s: s < 6.0,
                          wait_s=30.0)
            time.sleep(0.5)
        finally:
            assert stop_node(proc, tmp_path / "node.log") == 0, (tmp_path / "node.log").read_text()
    layout = json.loads(layouts[-1].data)
    assert layout["sensor_order"] == ["camera", "lidar", "imu", "odometry", "imu2"] and layout["height"] == 1 + 8 + 5 + 1
    assert layout["rows"]["ego_rate"] == [14, 15]
    assert played > 150 and len(fused) >= 40, (played, len(fused))
    parts = [parse_fused_state_rows(np.frombuffer(bytes(m.data), np.float32).reshape(m.height, m.width),
                                    HEADS, sensors=5, ego_rate=True) for m in fused]
    attention = [p["attention"] for p in parts]
    ego = np.array([p["ego_rate"] for p in parts])
    assert np.isfinite(ego).all() and len(np.unique(ego[:, 1])) > 1  # it follows the recording
    # and as a TwistStamped beside it, at the same stamps: speed as linear.x, yaw rate as angular.z
    by_stamp = {stamp_to_ns(m.header.stamp): e for m, e in zip(fused, ego)}
    twist = {stamp_to_ns(t.header.stamp): (t.twist.linear.x, t.twist.angular.z) for t in twists}
    assert len(set(twist) & set(by_stamp)) >= 0.9 * len(by_stamp)
    for stamp in set(twist) & set(by_stamp):
        np.testing.assert_allclose(twist[stamp], by_stamp[stamp], rtol=1e-6)
    with_odometry = [a for a in attention if a[3].sum() > 0]
    assert len(with_odometry) >= 0.8 * len(attention)  # 10 Hz odometry, fresh within its 0.2 s max age
    relayed = [a[4].sum() > 0 for a in attention]
    assert sum(relayed) >= 0.8 * len(attention), relayed  # the second IMU, 30 Hz as relayed
    assert all(np.all(a[:2] == 0.0) for a in attention)  # no camera or lidar configured
    _, odometry = status("odometry")
    assert int(odometry["received"]) >= 50 and float(odometry["rate_hz"]) == pytest.approx(10.0, abs=1.0)
    imu, imu2 = status("imu")[1], status("imu2")[1]
    assert int(imu2["received"]) >= 100 and float(imu2["rate_hz"]) == pytest.approx(float(imu["rate_hz"]), rel=0.2)
    assert {"trust_odometry", "trust_imu2", "masked_fusions_imu2"} <= set(status("fusion")[1])
