"""`fusion-attn replay` and `play` on the real recordings, bad bags, determinism; play over real DDS."""

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import Spinner, ros_domain, wait_until
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from fusion_attn.bag import _mcap_chunk_start, find_topics, open_reader, read_messages
from fusion_attn.cli import main
from fusion_attn.errors import BagError, ConfigError
from fusion_attn.frames import NS_PER_S
from fusion_attn.outputs import parse_fused_state_rows
from fusion_attn.pipeline import FusionPipeline
from fusion_attn.replay import ReplayOptions, fused_difference, replay


@pytest.fixture(scope="module")
def pipeline():
    return FusionPipeline.create(None, backend="onnxruntime", threads=1)


def _run(bags, out, *flags):
    return main(["replay", *map(str, bags), "-o", str(out), "--no-progress", *flags])


def _read_output(out: Path):
    """-> ([attention (3, 4)] of /fused_state, number of /diagnostics messages) from the written MCAP."""
    attention, diags = [], 0
    with AnyReader([out / "fused"]) as reader:
        for conn, _, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic == "/fused_state":
                assert msg.encoding == "32FC1" and msg.width == 64 and msg.height == 12
                rows = msg.data.view("<f4").reshape(msg.height, msg.width)
                attention.append(parse_fused_state_rows(rows, heads=4)["attention"])
            else:
                assert conn.msgtype == "diagnostic_msgs/msg/DiagnosticArray"
                diags += 1
    return attention, diags


def test_euroc_replays_at_the_fusion_rate_with_lidar_masked(real_data, tmp_path, capsys):
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path, "--rate", "20") == 0
    assert "x real time" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["messages"] == 441 and summary["topics"] == {"camera": "/cam0/image_raw", "imu": "/imu0"}
    assert summary["fused_rate_hz"] == pytest.approx(20.0, abs=0.01)
    assert summary["fusions"] >= 39 and summary["present_fraction"]["lidar"] == 0.0
    assert summary["trust_mean"]["lidar"] is None and summary["untrusted_share"]["lidar"] == 0.0  # never present
    assert 0.0 <= summary["trust_mean"]["camera"] <= 1.0 and 0.0 <= summary["untrusted_share"]["camera"] <= 1.0
    assert summary["sensors"]["camera"]["received"] == 40 and summary["sensors"]["imu"]["received"] == 401
    attention, diags = _read_output(tmp_path)
    assert len(attention) == summary["fusions"] - summary["withheld_all_masked"] and diags == summary["fusions"] // 20
    assert all(np.all(a[1] == 0.0) for a in attention)
    assert sum(bool(np.all(a[0] > 0)) for a in attention) >= 39  # the camera, until it goes stale after the end
    for png in ("attention.png", "trust.png", "health.png", "latency.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert json.loads((tmp_path / "timing.json").read_text())["speed_x_real_time"] > 1


@pytest.mark.parametrize("topic", ["/sick_lms_1xx/scan", "/cloud"])
def test_sick_lidar_tokens_from_laserscan_and_pointcloud(real_data, tmp_path, topic):
    assert _run([real_data / "sick_lms1xx_scan_cloud_radar.bag"], tmp_path, "--lidar-topic", topic) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["topics"] == {"lidar": topic}
    assert summary["sensors"]["lidar"]["received"] == 89
    assert summary["present_fraction"]["lidar"] > 0.9
    assert summary["attention_mean"]["lidar"] > 0.9  # the only sensor


def test_every_real_recording_replays_and_raw_packets_are_skipped(real_data, tmp_path, capsys):
    assert _run([real_data / "lidar_camera_frame"], tmp_path / "frame") == 0
    frame = json.loads((tmp_path / "frame" / "summary.json").read_text())
    assert frame["fusions"] >= 1 and frame["present_fraction"]["lidar"] == 1.0  # lidar fresh for 0.3 s
    assert frame["present_fraction"]["camera"] >= 0.5  # the camera's max age is 0.2 s
    assert _run([real_data / "husky_imu_odom_gps.bag"], tmp_path / "husky", "--end", "20") == 0
    husky = json.loads((tmp_path / "husky" / "summary.json").read_text())
    assert husky["topics"] == {"imu": "/imu/data"} and "/fix" in husky["skipped_topics"]
    assert husky["fusions"] == pytest.approx(20 * 20, abs=2)
    capsys.readouterr()
    assert _run([real_data / "vlp16_raw_packets"], tmp_path / "vlp") == 2  # nothing readable: non-zero
    err = capsys.readouterr().err
    assert "/velodyne_packets" in err and "no message definition for velodyne_msgs/msg/VelodyneScan" in err


def test_same_inputs_give_byte_identical_outputs(real_data, pipeline, tmp_path):
    opts = ReplayOptions(progress=False, taus=((1.0, 1.0, 1.0, 1.0), (0.2, 1.0, 1.0, 1.0)))
    for run in ("a", "b"):
        replay([real_data / "euroc_v1_01_cam_imu"], pipeline, tmp_path / run, opts)
    for name in ("fused/fused.mcap", "fused/metadata.yaml", "summary.json", "sweep.csv", "attention.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_batched_replay_writes_what_one_at_a_time_writes(real_data, pipeline, tmp_path):
    """--batch fuses many instants per backend call: the same messages, stamps, diagnostics and summary;
    the fused values agree to float rounding (ONNX Runtime's kernels sum in another order for another
    batch shape, so not always to the bit: docs/BENCHMARKS.md)."""
    bag = real_data / "euroc_v1_01_cam_imu"
    taus = ((1.0, 1.0, 1.0, 1.0), (0.3, 1.0, 1.0, 1.0))
    one = replay([bag], pipeline, tmp_path / "one", ReplayOptions(progress=False, taus=taus))
    many = replay([bag], pipeline, tmp_path / "many", ReplayOptions(progress=False, taus=taus, batch=7))
    diff = fused_difference(tmp_path / "one", tmp_path / "many")
    assert diff["same_topics_and_stamps"] and diff["messages"][0] == diff["messages"][1] > 40
    assert diff["max_abs_diff"] <= 1e-5, diff
    with AnyReader([tmp_path / "one" / "fused"]) as a, AnyReader([tmp_path / "many" / "fused"]) as b:
        diagnostics = [[raw for conn, _, raw in r.messages() if conn.topic == "/diagnostics"] for r in (a, b)]
    assert diagnostics[0] and len(diagnostics[0]) == len(diagnostics[1])
    assert many["timing"]["batch"] == 7
    for name in set(one) - {"timing"}:  # what was read, fused, dropped; attention, trust, τ sweep
        assert _close(one[name], many[name]), name


def _close(a, b, tol=1e-4) -> bool:
    """Nested summary values equal, numbers to `tol` (a rounded figure may flip in its last digit)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def test_tau_sweep_table_and_plot(real_data, tmp_path, capsys):
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path, "--tau", "0.1,0.5,1,1:1:1:0.05") == 0
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("tau_global") and len(rows) == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    imu = [row["attention_mean"]["imu"] for row in summary["tau_sweep"]]
    assert len(set(imu)) == 4  # every τ gives its own distribution
    assert summary["tau_sweep"][3]["tau"] == [1.0, 1.0, 1.0, 0.05]
    assert (tmp_path / "sweep.png").is_file() and "τ sweep" in capsys.readouterr().out
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path / "bad", "--tau", "1:2") == 2


def test_replaying_into_the_same_folder_replaces_the_earlier_output(real_data, tmp_path, capsys):
    bag = real_data / "euroc_v1_01_cam_imu"
    assert _run([bag], tmp_path, "--end", "0.5") == 0
    assert _run([bag], tmp_path) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["messages"] == 441
    (tmp_path / "other" / "fused").mkdir(parents=True)
    assert _run([bag], tmp_path / "other") == 2
    assert "not the output of an earlier replay" in capsys.readouterr().err


def test_start_end_filters(real_data, tmp_path):
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path, "--start", "0.5", "--end", "1.5") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sensors"]["camera"]["received"] == 20
    assert 195 <= summary["sensors"]["imu"]["received"] <= 201


@pytest.mark.parametrize("bag,cut,flags", [
    ("sick_lms1xx_scan_cloud_radar.bag", 0.6, ["--lidar-topic", "/cloud"]),  # ROS 1: index at the end, lost
    ("euroc_v1_01_cam_imu/euroc_v1_01_cam_imu.mcap", 0.5, []),  # MCAP: summary and footer lost
    ("euroc_v1_01_cam_imu/euroc_v1_01_cam_imu.mcap", 0.5, ["--batch", "16"]),  # the instants read before it: fused
])
def test_truncated_bag_is_processed_up_to_the_fault(real_data, tmp_path, bag, cut, flags):
    src = real_data / bag
    truncated = tmp_path / src.name
    truncated.write_bytes(src.read_bytes()[: int(src.stat().st_size * cut)])
    assert _run([truncated], tmp_path / "out", *flags) == 0  # something was read: not an error exit
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("the file ends part-way" in e for e in summary["events"]), summary["events"]
    assert summary["messages"] > 10 and summary["fusions"] > 5
    full = {"sick_lms1xx_scan_cloud_radar.bag": 89, "euroc_v1_01_cam_imu.mcap": 441}[src.name]
    assert summary["messages"] < full
    attention, _ = _read_output(tmp_path / "out")  # the written bag is closed and valid up to the fault
    assert len(attention) == summary["fusions"]


def _mcap_record(opcode: int, content: bytes) -> bytes:
    return bytes([opcode]) + struct.pack("<Q", len(content)) + content


def test_an_mcap_chunk_cut_short_gives_its_own_whole_messages_and_nothing_after_it():
    """bag._mcap_chunk_start, what a streamed MCAP read keeps of the chunk it failed in: the chunk's whole
    messages only, never the records after the chunk (read as if they were its own before 4d02226)."""
    def message(stamp: int) -> bytes:  # channel, sequence, log and publish time, data
        return _mcap_record(0x05, struct.pack("<HIQQ", 1, stamp, stamp, stamp) + b"cdr")

    records = message(1) + message(2)
    chunk = _mcap_record(0x06, struct.pack("<QQQI", 1, 2, len(records), 0) + struct.pack("<I", 0)  # no compression
                         + struct.pack("<Q", len(records)) + records)
    assert [m.log_time for m in _mcap_chunk_start(chunk + message(3))] == [1, 2]
    assert [m.log_time for m in _mcap_chunk_start(chunk[:-2])] == [1]  # the file ends in its second message
    assert _mcap_chunk_start(chunk[:30]) == [] and _mcap_chunk_start(message(3)) == []


@pytest.mark.parametrize("flags,problem", [
    (["--rate", "-20"], "fusion rate must be > 0"), (["--rate", "0"], "fusion rate must be > 0"),
    (["--rate", "nan"], "fusion rate must be > 0"), (["--start", "1.5", "--end", "0.5"], "must be after --start"),
    (["--batch", "0"], "batch must be an integer >= 1"), (["--start", "nan"], "must be finite seconds"),
    (["--end", "inf"], "must be finite seconds"), (["--start", "100"], "select nothing: the recording spans 0 .. 2."),
    (["--end=-1"], "select nothing"), (["--tau="], "--tau entry '' is not a number"),
])
def test_bad_options_exit_2_naming_the_problem(real_data, tmp_path, capsys, flags, problem):
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path, *flags) == 2
    assert problem in capsys.readouterr().err


def test_output_path_that_is_a_file_and_an_interrupted_earlier_replay(real_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path / "file") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    interrupted = tmp_path / "interrupted"
    (interrupted / "fused").mkdir(parents=True)  # a replay stopped with Ctrl-C: no summary yet
    (interrupted / ".fusion_attn_replay").touch()
    (interrupted / "sweep.csv").write_text("stale")
    assert _run([real_data / "euroc_v1_01_cam_imu"], interrupted) == 0
    assert not (interrupted / "sweep.csv").exists()  # an earlier run's extra outputs do not linger


def test_trigger_mode_and_sensors_configured_none_follow_the_node_parameters(real_data, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    trigger: camera\n    imu_type: none\n")
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path / "out", "--params", str(params)) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["fusions"] == 40  # one per camera frame
    assert summary["topics"] == {"camera": "/cam0/image_raw"} and "none" in summary["skipped_topics"]["/imu0"]


def _write_bag(path: Path, messages):
    """A rosbag2 MCAP of (topic, msgtype, log_time, raw cdr) rows, with connections made as needed."""
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {}
        for topic, msgtype, log_time, raw in messages:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(conns[topic], log_time, raw)


def test_empty_bag_exits_non_zero(tmp_path, capsys):
    _write_bag(tmp_path / "empty", [])
    assert _run([tmp_path / "empty"], tmp_path / "out") == 2
    assert "nothing could be read" in capsys.readouterr().err


def test_time_going_backwards_resets_and_goes_on(real_data, tmp_path):
    with AnyReader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        rows = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]
    looped = rows + [(topic, msgtype, t + 3_000_000_000, raw) for topic, msgtype, t, raw in rows]  # same stamps again
    _write_bag(tmp_path / "looped", looped)
    assert _run([tmp_path / "looped"], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resets"] == 1 and any("time jumped back" in e for e in summary["events"])
    assert summary["sensors"]["imu"]["received"] == 802 and summary["fusions"] >= 78
    assert summary["fused_rate_hz"] == pytest.approx(20.0, abs=0.5)  # the jump back does not count as time


def test_a_gap_with_every_sensor_masked_writes_no_state(real_data, tmp_path):
    """As the node: a fusion tick with every sensor masked is withheld (counted), never written as a state."""
    with AnyReader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        rows = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]
    stamps = _header_stamps(rows)
    middle = (min(stamps) + max(stamps)) // 2
    gapped = [(topic, msgtype, t, _restamped(raw, msgtype, s + 2 * NS_PER_S) if s > middle else raw)
              for (topic, msgtype, t, raw), s in zip(rows, stamps)]
    _write_bag(tmp_path / "gap", gapped)
    assert _run([tmp_path / "gap"], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["withheld_all_masked"] >= 20  # about 2 s at 20 Hz with nothing fresh
    attention, _ = _read_output(tmp_path / "out")
    assert len(attention) == summary["fusions"] - summary["withheld_all_masked"]
    assert all(a.sum() > 0 for a in attention)  # every state written had a sensor to attend to


def _header_stamps(rows) -> list[int]:
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    out = []
    for _, msgtype, _, raw in rows:
        stamp = store.deserialize_cdr(raw, msgtype).header.stamp
        out.append(stamp.sec * NS_PER_S + stamp.nanosec)
    return out


def _restamped(raw: bytes, msgtype: str, stamp_ns: int) -> bytes:
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    msg = store.deserialize_cdr(raw, msgtype)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, NS_PER_S)
    return bytes(store.serialize_cdr(msg, msgtype))


def test_play_delivers_the_recorded_count_over_dds(real_data):
    pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    env = dict(os.environ, ROS_DOMAIN_ID=ros_domain(3))
    listener = subprocess.Popen([sys.executable, "-c", LISTENER], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(3.0)  # the listener is up and discovered
    # a loaded machine can take longer than play's default 2 s to discover the listener: wait for it
    player = subprocess.run([sys.executable, "-m", "fusion_attn.cli", "play", str(real_data / "euroc_v1_01_cam_imu"),
                             "--clock", "--wait", "30"], env=env, capture_output=True, text=True, timeout=90, check=False)
    assert player.returncode == 0, player.stderr
    assert "no subscriber" not in player.stderr
    assert "published 441 messages" in player.stdout
    counts = json.loads(listener.communicate(timeout=30)[0].strip().splitlines()[-1])
    assert counts["/cam0/image_raw"] == 40 and counts["/imu0"] == 401, counts
    assert counts["/clock"] == 441 and counts["clock_max"] > 1_400_000_000 * 10**9  # the recorded time (2014)


def test_play_starts_its_schedule_when_the_first_message_is_ready(real_data):
    """A slow start (here `keep` holding the first message 0.5 s, as opening a bag or a type's first decode
    does for a moment) does not send the first messages late, stamped in the past, where a live node
    masks them as stale: the recording's start maps onto the moment its first message goes out."""
    rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, Imu

    from fusion_attn.frames import stamp_to_ns
    from fusion_attn.play import play

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(ros_domain(3)))
    try:
        node = rclpy.create_node("play_schedule", context=context)
        stamps = {"/cam0/image_raw": [], "/imu0": []}
        qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
        for topic, msg_type in (("/cam0/image_raw", Image), ("/imu0", Imu)):
            node.create_subscription(msg_type, topic, lambda m, t=topic: stamps[t].append(stamp_to_ns(m.header.stamp)), qos)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        Spinner(executor)
        ready = []

        def keep(_topic, _offset_s):
            if not ready:  # the first message, decoded: a slow moment before it can go out
                time.sleep(0.5)
                ready.append(node.get_clock().now().nanoseconds)
            return True

        assert play(node, [real_data / "euroc_v1_01_cam_imu"], keep=keep, wait_s=30.0) == 441
        assert wait_until(lambda: sum(map(len, stamps.values())) == 441, timeout=10)
        # the recording's stamps equal its log times: its first message, at its start, is stamped as it goes out
        assert min(min(stamps["/cam0/image_raw"]), min(stamps["/imu0"])) >= ready[0]
        executor.shutdown()
    finally:
        rclpy.shutdown(context=context)


LISTENER = """
import json, time, rclpy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, Imu
rclpy.init()
node = rclpy.create_node("play_listener")
counts = {"/cam0/image_raw": 0, "/imu0": 0, "/clock": 0, "clock_max": 0}
def seen(topic):
    def count(msg):
        counts[topic] += 1
        if topic == "/clock":
            counts["clock_max"] = max(counts["clock_max"], msg.clock.sec * 10**9 + msg.clock.nanosec)
    return count
node.create_subscription(Image, "/cam0/image_raw", seen("/cam0/image_raw"), 100)  # reliable
node.create_subscription(Imu, "/imu0", seen("/imu0"), 100)
node.create_subscription(Clock, "/clock", seen("/clock"), 100)
last, end = 0, time.monotonic() + 40
while time.monotonic() < end:
    rclpy.spin_once(node, timeout_sec=0.1)
    total = counts["/cam0/image_raw"] + counts["/imu0"]
    if total and total == last and time.monotonic() > quiet_until:
        break
    if total != last:
        last, quiet_until = total, time.monotonic() + 2.0
print(json.dumps(counts))
"""


def test_play_refuses_a_bag_without_sensor_topics_and_a_bad_rate(real_data, capsys):
    assert main(["play", str(real_data / "vlp16_raw_packets")]) == 2
    assert "no camera, lidar, IMU or odometry topic to play" in capsys.readouterr().err
    assert main(["play", str(real_data / "euroc_v1_01_cam_imu"), "--rate", "0"]) == 2
    assert "play rate must be > 0" in capsys.readouterr().err
    assert main(["play", str(real_data / "euroc_v1_01_cam_imu"), "--wait", "-1"]) == 2
    assert "--wait takes seconds >= 0" in capsys.readouterr().err


def test_replay_api_raises_when_nothing_is_readable(real_data, pipeline, tmp_path):
    with pytest.raises(BagError, match="nothing could be read"):
        replay([real_data / "vlp16_raw_packets"], pipeline, tmp_path, ReplayOptions(progress=False))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])  # Ctrl-C, and a launcher or service manager
def test_play_loops_until_stopped_and_stops_cleanly(real_data, sig):
    import signal

    pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    env = dict(os.environ, ROS_DOMAIN_ID=ros_domain(4))
    player = subprocess.Popen([sys.executable, "-m", "fusion_attn.cli", "play", str(real_data / "euroc_v1_01_cam_imu"),
                               "--loop", "--rate", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(10.0)  # start-up (~2 s), the 2 s wait for subscribers, then passes of 0.5 s at 4x
    assert player.poll() is None  # still looping
    player.send_signal(getattr(signal, sig))
    try:
        out, err = player.communicate(timeout=20)
    finally:
        player.kill()  # no-op once it has exited; a hung player must not outlive the test
    assert player.returncode == 0, err
    assert "Traceback" not in err
    stopped = re.search(r"stopped after (\d+) messages", out)
    assert stopped and int(stopped.group(1)) > 441, out  # more than one pass of the 441-message bag


def test_a_stop_request_is_a_lock_free_flag_and_a_second_signal_forces_out():
    from fusion_attn.play import StopRequest

    stop = StopRequest()
    t0 = time.monotonic()
    assert stop.sleep(0.1) is False and time.monotonic() - t0 >= 0.1
    stop()  # as the signal handler is called
    t0 = time.monotonic()
    assert stop.sleep(10.0) is True and time.monotonic() - t0 < 0.05  # answers at once
    with pytest.raises(KeyboardInterrupt):
        stop()


def _euroc_rows(real_data):
    with AnyReader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        return [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]


def test_sqlite3_with_zstd_compression_gives_the_same_fusion(real_data, pipeline, tmp_path):
    from rosbags.rosbag2.writer import CompressionFormat, CompressionMode
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    writer = Writer(tmp_path / "sqlite", version=9, storage_plugin=StoragePlugin.SQLITE3)
    writer.set_compression(CompressionMode.MESSAGE, CompressionFormat.ZSTD)
    with writer:
        conns = {}
        for topic, msgtype, t, raw in _euroc_rows(real_data):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(conns[topic], t, raw)
    opts = ReplayOptions(progress=False)
    a = replay([real_data / "euroc_v1_01_cam_imu"], pipeline, tmp_path / "mcap_out", opts)
    b = replay([tmp_path / "sqlite"], pipeline, tmp_path / "sqlite_out", opts)
    assert a["fusions"] == b["fusions"] and a["attention_mean"] == b["attention_mean"]
    assert ((tmp_path / "mcap_out" / "fused" / "fused.mcap").read_bytes()
            == (tmp_path / "sqlite_out" / "fused" / "fused.mcap").read_bytes())


def test_several_bags_are_merged_by_time_and_receive_clock(real_data, pipeline, tmp_path):
    rows = _euroc_rows(real_data)
    _write_bag(tmp_path / "camera_only", [r for r in rows if r[0] == "/cam0/image_raw"])
    _write_bag(tmp_path / "imu_only", [r for r in rows if r[0] == "/imu0"])
    opts = ReplayOptions(progress=False)
    whole = replay([real_data / "euroc_v1_01_cam_imu"], pipeline, tmp_path / "whole", opts)
    merged = replay([tmp_path / "camera_only", tmp_path / "imu_only"], pipeline, tmp_path / "merged", opts)
    assert merged["sensors"] == whole["sensors"] and merged["attention_mean"] == whole["attention_mean"]
    received = replay([real_data / "euroc_v1_01_cam_imu"], pipeline, tmp_path / "receive",
                      ReplayOptions(progress=False, clock="receive"))
    assert received["options"]["clock"] == "receive" and received["fusions"] >= 40
    assert received["sensors"]["imu"]["received"] == 401


def test_every_sensor_topic_left_out_is_listed_with_the_option_that_chooses_it(real_data, tmp_path, capsys):
    images = [r for r in _euroc_rows(real_data) if r[0] == "/cam0/image_raw"]
    # six cameras of one type: /cam0 the busiest (6 frames), down to /cam5 (1)
    rows = [(f"/cam{i}", msgtype, t, raw) for i in range(6) for _, msgtype, t, raw in images[:6 - i]]
    _write_bag(tmp_path / "six", sorted(rows, key=lambda r: r[2]))
    assert _run([tmp_path / "six"], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["topics"] == {"camera": "/cam0"}
    assert summary["skipped_topics"] == {f"/cam{i}": f"another camera topic ({6 - i} messages): /cam0 is busier (6 "
                                                     f"messages); choose this one with --camera-topic /cam{i}"
                                         for i in range(1, 6)}
    out = capsys.readouterr().out
    assert all(f"skipped /cam{i}: another camera topic" in out for i in range(1, 6))
    assert _run([tmp_path / "six"], tmp_path / "out", "--camera-topic", "/cam4") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["topics"] == {"camera": "/cam4"} and summary["sensors"]["camera"]["received"] == 2
    assert summary["skipped_topics"]["/cam0"] == ("another camera topic (6 messages): --camera-topic chose /cam4; "
                                                  "choose this one with --camera-topic /cam0")
    assert len(summary["skipped_topics"]) == 5


def test_a_topic_option_of_the_wrong_type_or_a_mistyped_name_is_a_clear_error(real_data, tmp_path, capsys):
    bag = real_data / "euroc_v1_01_cam_imu"
    assert _run([bag], tmp_path / "a", "--imu-topic", "/cam0/image_raw") == 2  # not mixed into the camera stream
    assert ("--imu-topic /cam0/image_raw: its messages are sensor_msgs/msg/Image; the imu input takes "
            "sensor_msgs/msg/Imu") in capsys.readouterr().err
    assert _run([bag], tmp_path / "b", "--imu-topic", "/imu") == 2
    err = capsys.readouterr().err
    assert "--imu-topic: topic /imu is not in the bag (topics: ['/cam0/image_raw', '/imu0'])" in err
    assert "nothing could be read" not in err and "read stopped" not in err


def test_a_read_fault_is_never_hidden_by_many_dropped_messages(real_data, tmp_path, capsys):
    rows = _euroc_rows(real_data)
    junk = b"\x00\x01\x00\x00\x01"  # a CDR header and one byte: not a PointCloud2
    lidar = [("/points", "sensor_msgs/msg/PointCloud2", rows[0][2] + i * 10_000_000, junk) for i in range(200)]
    _write_bag(tmp_path / "bag", sorted(rows + lidar, key=lambda r: r[2]))
    src = tmp_path / "bag" / "bag.mcap"
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size * 3 // 4])  # read up to ~1.5 s: > 100 lidar drops first
    assert _run([cut], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    lidar = summary["sensors"]["lidar"]
    assert lidar["dropped"] > 100 and lidar["received"] == 0
    assert "the file ends part-way" in summary["read_fault"]
    assert summary["events"][0] == f"read stopped: {summary['read_fault']}"
    assert summary["events"][1].startswith(f"lidar: {lidar['dropped']} of {lidar['dropped']} dropped: malformed; the "
                                           "first: /points: undecodable sensor_msgs/msg/PointCloud2")
    assert summary["events_total"] == len(summary["events"]) < 10  # the drops summed, not listed one by one
    out = capsys.readouterr().out
    assert "note: read stopped: " in out and f"note: lidar: {lidar['dropped']} of" in out


HUSKY_MESSAGES = 11865  # /imu/data, the husky bag's one sensor topic


def _ros1_records(data: bytes) -> list[tuple[dict[bytes, bytes], int, int, int]]:
    """(header fields, record start, data start, data end) of each top-level record of a ROS 1 bag (2.0)."""
    records, pos = [], len(b"#ROSBAG V2.0\n")
    while pos < len(data):
        start = pos + 8 + int.from_bytes(data[pos:pos + 4], "little")
        fields, i = {}, pos + 4
        while i < start - 4:
            n = int.from_bytes(data[i:i + 4], "little")
            name, _, value = data[i + 4:i + 4 + n].partition(b"=")
            fields[name], i = value, i + 4 + n
        end = start + int.from_bytes(data[start - 4:start], "little")
        records.append((fields, pos, start, end))
        pos = end
    return records


def _damaged_husky(real_data, path: Path, index: bool = False, entries: bool = False,
                   chunk: str | None = None) -> Path:
    """The husky bag (10 bz2 chunks, then its index) with bytes flipped: 200 across the index section
    (connection and chunk info records, after index_pos), 200 among one chunk's index entries (the
    records after the chunk), and/or 200 in the data of the middle chunk or 3 of its header length (which
    frames the record: the next one is found by searching)."""
    data = bytearray((real_data / "husky_imu_odom_gps.bag").read_bytes())
    records = _ros1_records(bytes(data))
    index_pos = int.from_bytes(records[0][0][b"index_pos"], "little")
    chunks = [(k, pos, start, end) for k, (fields, pos, start, end) in enumerate(records) if fields[b"op"] == b"\x05"]
    k, pos, start, end = chunks[len(chunks) // 2]
    flip = []
    if index:
        flip += np.random.default_rng(0).choice(np.arange(index_pos, len(data)), 200, replace=False).tolist()
    if entries:
        _, _, entries_start, entries_end = records[k + 1]  # the chunk's first index data record
        flip += range((entries_start + entries_end) // 2, (entries_start + entries_end) // 2 + 200)
    if chunk == "data":
        flip += range((start + end) // 2, (start + end) // 2 + 200)
    elif chunk == "header":
        flip += range(pos, pos + 3)
    for i in flip:
        data[i] ^= 0xFF
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("where", ["index", "entries"])
def test_a_ros1_bag_with_a_damaged_index_is_read_chunk_by_chunk(real_data, tmp_path, where):
    bag = _damaged_husky(real_data, tmp_path / "damaged.bag", **{where: True})
    assert _run([bag], tmp_path / "out", "--rate", "1") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["messages"] == HUSKY_MESSAGES and summary["read_fault"] is None  # every chunk is intact
    assert any(e.startswith("no usable index (") and "read record by record" in e for e in summary["events"])


def test_a_damaged_chunk_is_skipped_and_the_chunks_after_it_are_read(real_data, tmp_path, capsys):
    bag = _damaged_husky(real_data, tmp_path / "damaged.bag", chunk="data")  # the index is intact
    assert _run([bag], tmp_path / "out", "--rate", "1") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 0.85 * HUSKY_MESSAGES < summary["messages"] < HUSKY_MESSAGES  # one chunk of ten lost, not the second half
    assert summary["read_fault"] is None
    assert any("reading through the index failed part-way" in e for e in summary["events"])
    assert any("1 damaged part(s) of the bag skipped" in e for e in summary["events"])
    assert "damaged part(s) of the bag skipped" in capsys.readouterr().out


@pytest.mark.parametrize("damage", [{"chunk": "data", "index": True}, {"chunk": "header"},
                                    {"chunk": "header", "entries": True}])
def test_reading_in_sequence_goes_on_after_a_damaged_chunk(real_data, tmp_path, damage):
    def read(path):
        with open_reader([path]) as reader:
            return [m.log_time_ns for m in read_messages(reader, find_topics(reader))], reader.notes

    full, _ = read(real_data / "husky_imu_odom_gps.bag")
    got, notes = read(_damaged_husky(real_data, tmp_path / "damaged.bag", **damage))
    assert 0.85 * len(full) < len(got) < len(full) and got[-1] == full[-1]  # read on to the end
    kept = set(got)
    lost = [i for i, t in enumerate(full) if t not in kept]
    assert lost == list(range(lost[0], lost[0] + len(lost)))  # one run: the damaged chunk's messages
    assert any("1 damaged part(s) of the bag skipped" in n for n in notes), notes


@pytest.mark.parametrize("case", ["window", "span"])
def test_the_progress_bar_ends_at_100_percent_exactly(real_data, pipeline, tmp_path, capsys, case):
    from tqdm import TqdmWarning

    if case == "window":  # --start/--end: the bar covers that second, not the whole bag
        bag, opts, total = real_data / "euroc_v1_01_cam_imu", ReplayOptions(start_s=0.5, end_s=1.5), "1.0/1.0"
    else:  # a span of 2.0004 s: seconds rounded for the total, and summed message by message, pass it
        rows = _euroc_rows(real_data)
        _write_bag(tmp_path / "bag", rows[:-1] + [(*rows[-1][:2], rows[0][2] + 2_000_400_000, rows[-1][3])])
        bag, opts, total = tmp_path / "bag", ReplayOptions(), "2.0/2.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TqdmWarning)  # "clamping frac to range [0, 1]"
        replay([bag], pipeline, tmp_path / "out", opts)
    bars = re.findall(r"(\d+)%\|[^|]*\| ([\d.]+/[\d.]+) s recorded", capsys.readouterr().err)
    assert bars and bars[-1] == ("100", total) and all(int(p) <= 100 for p, _ in bars)


def test_summary_rate_is_the_recordings_not_the_last_moving_value(real_data, pipeline, tmp_path):
    rows = _euroc_rows(real_data)
    imu = [r for r in rows if r[0] == "/imu0"]
    imu = imu[:200] + imu[200::4]  # 200 Hz for a second, then 50 Hz: the moving rate ends near 50
    _write_bag(tmp_path / "bag", sorted([r for r in rows if r[0] != "/imu0"] + imu, key=lambda r: r[2]))
    summary = replay([tmp_path / "bag"], pipeline, tmp_path / "out", ReplayOptions(progress=False, clock="receive"))
    expected = (len(imu) - 1) / ((imu[-1][2] - imu[0][2]) / 1e9)
    assert summary["sensors"]["imu"]["rate_hz"] == pytest.approx(expected, abs=1e-3)
    assert summary["sensors"]["camera"]["rate_hz"] == pytest.approx(20.0, abs=1e-3)


def test_a_short_mask_is_in_the_health_plot(real_data, pipeline, tmp_path, monkeypatch):
    import fusion_attn.plots

    rows = _euroc_rows(real_data)
    t0 = rows[0][2]
    # no camera frame from 1.0 to 1.3 s: masked about 0.2 s, between two once-a-second diagnostics
    _write_bag(tmp_path / "bag", [r for r in rows if not (r[0] == "/cam0/image_raw" and 1.0e9 < r[2] - t0 < 1.3e9)])
    traces, plots = [], fusion_attn.plots.replay_plots

    def keep_trace(out, trace, *args):
        traces.append(trace)
        plots(out, trace, *args)

    monkeypatch.setattr(fusion_attn.plots, "replay_plots", keep_trace)
    replay([tmp_path / "bag"], pipeline, tmp_path / "out", ReplayOptions(progress=False, clock="receive"))
    trace = traces[0]
    assert len(trace.masked) == len(trace.stamps)  # a mask per fusion
    masked_at = [(s - t0) / 1e9 for s, m in zip(trace.stamps, trace.masked) if m[0]]
    assert any(1.05 < t < 1.3 for t in masked_at), masked_at


def test_replay_and_fuse_print_the_frame_used_and_fuse_json_is_rounded(real_data, tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    frame_id: odom\n")
    bag = real_data / "euroc_v1_01_cam_imu"
    assert _run([bag], tmp_path / "out", "--params", str(params), "--end", "0.5") == 0
    assert "fused states in frame odom at" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["frame_id"] == "odom"
    assert main(["fuse", "--bag", str(bag), "--params", str(params)]) == 0
    assert "  frame odom  " in capsys.readouterr().out
    assert main(["fuse", "--bag", str(bag), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    values = state["fused"] + [a for m in state["modalities"].values() for a in m["attention_per_head"]]
    assert all(v == round(v, 6) for v in values)  # "rounded to 6 decimals" holds in the JSON


def test_attention_maps_at_chosen_instants_and_as_a_video(real_data, tmp_path, capsys):
    bag = real_data / "euroc_v1_01_cam_imu"
    assert _run([bag], tmp_path, "--attention-at", "0.5,1.25,9", "--attention-video") == 0
    out = capsys.readouterr().out
    maps = json.loads((tmp_path / "summary.json").read_text())["attention_maps"]
    assert set(maps["instants"]) == {"0.5", "1.25", "9"}
    for t in ("0.5", "1.25"):
        m = maps["instants"][t]
        assert m["file"] == f"attention_{t}.png" and f"attention at {t} s -> attention_{t}.png" in out
        assert cv2.imread(str(tmp_path / m["file"])).shape == (464, 896, 3)
        assert float(t) <= m["fused_at_s"] < float(t) + 0.05  # the first fusion at or after it (20 Hz)
        assert m["occlusion"]["lidar"] is None  # no lidar in this recording
        assert m["occlusion"]["camera"]["top"] > m["occlusion"]["camera"]["random"]
    assert maps["instants"]["9"]["file"] is None and "no fusion at or after it" in maps["instants"]["9"]["note"]
    video = cv2.VideoCapture(str(tmp_path / "attention.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == maps["video"]["frames"] == 5  # 2 s at 2 Hz: 0, 0.5, .., 2 s
    assert (video.get(cv2.CAP_PROP_FRAME_WIDTH), video.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (896, 464)
    video.release()
    assert _run([bag], tmp_path, "--end", "0.5") == 0  # a replay into the same folder removes them
    assert not list(tmp_path.glob("attention_*.png")) and not (tmp_path / "attention.mp4").exists()
    assert "attention_maps" not in json.loads((tmp_path / "summary.json").read_text())


def test_attention_map_of_a_camera_and_lidar_frame_has_both_panels(real_data, tmp_path):
    assert _run([real_data / "lidar_camera_frame"], tmp_path, "--attention-at", "0") == 0
    m = json.loads((tmp_path / "summary.json").read_text())["attention_maps"]["instants"]["0"]
    assert m["occlusion"]["camera"] is not None and m["occlusion"]["lidar"] is not None
    img = cv2.imread(str(tmp_path / "attention_0.png"))
    assert img[:384, :512].std() > 20 and img[:384, 512:].std() > 10  # the image, and pillars in the lidar's view


def test_attention_options_are_checked(real_data, pipeline, tmp_path, capsys):
    bag = real_data / "euroc_v1_01_cam_imu"
    assert _run([bag], tmp_path, "--attention-at", "1,x") == 2
    assert "--attention-at '1,x'" in capsys.readouterr().err
    assert _run([bag], tmp_path, "--attention-at=-1") == 2
    assert "attention instants must be seconds >= 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="torch model"):  # the API needs the model for the token weights
        replay([bag], pipeline, tmp_path, ReplayOptions(progress=False, attention_video=True))


def test_a_failed_run_leaves_the_earlier_outputs_as_they_were(real_data, tmp_path, capsys):
    """Options, τ, the bag and the window are checked before the folder is touched, and a run that fails
    later (nothing fused) leaves the earlier outputs too: they are written aside and moved in at the end."""
    bag = real_data / "euroc_v1_01_cam_imu"
    assert _run([bag], tmp_path, "--end", "1") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _write_bag(tmp_path.parent / "only_other_topics", [("/chatter", "std_msgs/msg/String", 1, b"\x00\x01\x00\x00\x01\x00\x00\x00\x00")])
    for flags in (["--tau", "0"], ["--start", "100"]):
        assert _run([bag], tmp_path, *flags) == 2
    assert _run([tmp_path.parent / "missing"], tmp_path) == 2
    assert _run([tmp_path.parent / "only_other_topics"], tmp_path) == 2
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert (tmp_path / "fused").is_dir() and not (tmp_path / ".partial").exists()


def test_a_folder_holding_files_of_the_same_names_is_refused(real_data, tmp_path, capsys):
    (tmp_path / "sweep.csv").write_text("the user's own")
    assert _run([real_data / "euroc_v1_01_cam_imu"], tmp_path) == 2
    assert "holds sweep.csv, not the output of an earlier replay" in capsys.readouterr().err
    assert (tmp_path / "sweep.csv").read_text() == "the user's own"


def test_a_rosbag2_folder_without_metadata_reads_its_storage_file(real_data, tmp_path, capsys):
    """What a recorder killed before it wrote metadata.yaml leaves."""
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / "part_0.mcap").write_bytes((real_data / "euroc_v1_01_cam_imu" / "euroc_v1_01_cam_imu.mcap").read_bytes())
    assert _run([folder], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["messages"] == 441 and any("has no metadata.yaml" in e for e in summary["events"])
    (tmp_path / "empty").mkdir()
    assert _run([tmp_path / "empty"], tmp_path / "out") == 2
    assert "no rosbag2 folder: no metadata.yaml and no .mcap or .db3 file" in capsys.readouterr().err


def test_inputs_that_cannot_be_opened_exit_2_naming_them(real_data, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a bag")
    assert _run([tmp_path / "notes.txt"], tmp_path / "out") == 2
    assert f"cannot open {tmp_path / 'notes.txt'}" in capsys.readouterr().err
    ros1, ros2 = real_data / "sick_lms1xx_scan_cloud_radar.bag", real_data / "euroc_v1_01_cam_imu"
    assert _run([ros2, ros1], tmp_path / "out") == 2
    assert "ROS 1 and ROS 2 bags are not merged" in capsys.readouterr().err
    cut = tmp_path / "cut.mcap"
    mcap = ros2 / "euroc_v1_01_cam_imu.mcap"
    cut.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    assert _run([ros2, cut], tmp_path / "out") == 2  # the cut one is named, and how to read it
    assert f"cannot open {cut}" in (err := capsys.readouterr().err) and "replay it alone" in err
    (tmp_path / "file").write_text("x")
    assert _run([ros2], tmp_path / "file" / "sub") == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def _imu_rows(real_data, count: int):
    with AnyReader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        conns = [c for c in reader.connections if c.topic == "/imu0"]
        return [(c.topic, c.msgtype, t, bytes(raw)) for (c, t, raw), _ in zip(reader.messages(conns), range(count))]


def test_a_bag_cut_inside_its_only_chunk_keeps_the_messages_before_the_cut(real_data, tmp_path, capsys):
    """A short recording is one chunk: cut anywhere, its whole messages before the cut are read (MCAP,
    and ROS 1 uncompressed and lz4), not lost with the chunk. A bz2 chunk decodes only whole (its
    900 kB blocks): cut, it is a clear error."""
    from rosbags.rosbag1 import Writer as Writer1
    from rosbags.typesys import Stores, get_typestore

    rows = _imu_rows(real_data, 300)  # 300 IMU messages: about 100 kB, one chunk
    _write_bag(tmp_path / "short", rows)
    bags = [next((tmp_path / "short").glob("*.mcap"))]
    ros2, ros1 = get_typestore(Stores.ROS2_KILTED), get_typestore(Stores.ROS1_NOETIC)
    for compression in (None, "bz2", "lz4"):
        path = tmp_path / f"short_{compression}.bag"
        writer = Writer1(path)
        if compression:
            writer.set_compression(getattr(Writer1.CompressionFormat, compression.upper()))
        with writer:
            conn = writer.add_connection("/imu0", "sensor_msgs/msg/Imu", typestore=ros1)
            for _, msgtype, t, raw in rows:
                msg = ros2.deserialize_cdr(raw, msgtype)  # ROS 1's header has a seq
                header = ros1.types["std_msgs/msg/Header"](seq=0, stamp=msg.header.stamp, frame_id=msg.header.frame_id)
                writer.write(conn, t, ros1.serialize_ros1(dataclasses.replace(msg, header=header), msgtype))
        bags.append(path)
    for bag in bags:
        cut = tmp_path / f"cut_{bag.name}"
        cut.write_bytes(bag.read_bytes()[: int(bag.stat().st_size * 0.6)])
        if "bz2" in bag.name:
            assert _run([cut], tmp_path / f"out_{bag.name}") == 2
            assert "no complete message" in capsys.readouterr().err
            continue
        assert _run([cut], tmp_path / f"out_{bag.name}") == 0, bag
        summary = json.loads((tmp_path / f"out_{bag.name}" / "summary.json").read_text())
        assert any("the file ends part-way" in e for e in summary["events"])
        assert 100 <= summary["messages"] < 300, (bag.name, summary["messages"])


def test_every_message_dropped_is_an_error_naming_why(real_data, tmp_path, capsys):
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)

    def broken(raw, msgtype):
        msg = store.deserialize_cdr(raw, msgtype)
        msg.linear_acceleration.x = float("nan")
        return bytes(store.serialize_cdr(msg, msgtype))

    _write_bag(tmp_path / "nan", [(topic, msgtype, t, broken(raw, msgtype)) for topic, msgtype, t, raw in _imu_rows(real_data, 50)])
    assert _run([tmp_path / "nan"], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no fused state" in err and "imu: 50 of 50 dropped: malformed" in err and "non-finite" in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_sensors_on_disagreeing_header_clocks_are_noted(real_data, tmp_path):
    """A camera whose header clock runs 100 s ahead of the IMU's leaves the IMU stale at every fusion;
    the summary says so and names --clock receive, which fuses both."""
    with AnyReader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        rows = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]
    skewed = [(topic, msgtype, t, _restamped(raw, msgtype, s + 100 * NS_PER_S) if "cam" in topic else raw)
              for (topic, msgtype, t, raw), s in zip(rows, _header_stamps(rows))]
    _write_bag(tmp_path / "skewed", skewed)
    assert _run([tmp_path / "skewed"], tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["present_fraction"]["imu"] < 0.1
    assert any("header clocks disagree" in e and "camera +100." in e for e in summary["events"]), summary["events"]
    assert _run([tmp_path / "skewed"], tmp_path / "out", "--clock", "receive") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["present_fraction"]["imu"] > 0.9
    assert not any("header clocks disagree" in e for e in summary["events"])


def test_attention_instants_count_from_the_start_on_the_fusions_clock(real_data, tmp_path):
    """Header stamps a day behind the bag's receive times: --attention-at 1 is still 1 s into the recording."""
    with AnyReader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        rows = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]
    day = 86_400 * NS_PER_S
    _write_bag(tmp_path / "behind", [(topic, msgtype, t, _restamped(raw, msgtype, s - day))
                                     for (topic, msgtype, t, raw), s in zip(rows, _header_stamps(rows))])
    assert _run([tmp_path / "behind"], tmp_path / "out", "--attention-at", "1") == 0
    m = json.loads((tmp_path / "out" / "summary.json").read_text())["attention_maps"]["instants"]["1"]
    assert m["file"] == "attention_1.png" and 1.0 <= m["fused_at_s"] < 1.1
