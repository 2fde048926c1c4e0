"""End-to-end latency of fusion_node over DDS (issue #3).

    python benchmarks/node_latency.py [--seconds 60] [--out benchmarks/results/node_latency.json]

The node runs in its own process (config/fusion.yaml: ONNX Runtime, 1 thread, 20 Hz timer). This process publishes a 640x480 bgr8 camera at 30 Hz, a 120,000-point lidar at 10 Hz
and an IMU at 400 Hz, stamped at send time; a third process only listens to the fused state (so the
publisher's load cannot delay its receipt). Latency of a fused state = its arrival at the listener minus the send time of the newest input sent before its fusion stamp, so
it counts both DDS hops, the wait for the 20 Hz fusion timer and the processing. The node's CPU and
memory are sampled with psutil; the node's own diagnostics give how many IMU messages it received.
Every sensor publishes throughout, so each is healthy: the share of the node's diagnostics reports
during the run that call it OK, and the fusions that masked it (the node's own masked_fusions_<sensor>
count), say whether its normal jitter is told apart from a fault.
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import rclpy
import rclpy.executors
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, Imu, PointCloud2, PointField

from fusion_attn.bench import machine, standard_messages
from fusion_attn.frames import stamp_to_ns
from fusion_attn.launcher import default_params_file

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seconds", type=float, default=60.0)
parser.add_argument("--reliability", choices=["best_effort", "reliable"], default="best_effort",
                    help="QoS reliability of the sensor publishers and the node's subscriptions")
parser.add_argument("--listen", type=Path, help=argparse.SUPPRESS)  # internal: run as the listener process
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "node_latency.json")
args = parser.parse_args()
os.environ.setdefault("ROS_DOMAIN_ID", str(150 + os.getpid() % 50))

if args.listen:  # the listener process: only receives fused states, so no publishing load delays it
    rclpy.init()
    listener = rclpy.create_node("latency_listener")
    arrivals = []
    listener.create_subscription(Image, "fused_state", lambda m: arrivals.append((stamp_to_ns(m.header.stamp), time.time_ns())), 100)
    try:
        rclpy.spin(listener)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    args.listen.write_text(json.dumps(arrivals))
    raise SystemExit(0)

rb_image, rb_cloud, _ = standard_messages()  # the same payloads as the core benchmark
rclpy.init()
node = rclpy.create_node("latency_bench")
image = Image(height=rb_image.height, width=rb_image.width, encoding="bgr8", step=rb_image.step, data=rb_image.data.tobytes())
image.header.frame_id = "camera"
cloud = PointCloud2(height=1, width=rb_cloud.width, point_step=16, row_step=rb_cloud.row_step, is_dense=True,
                    fields=[PointField(name=f.name, offset=f.offset, datatype=7, count=1) for f in rb_cloud.fields],
                    data=rb_cloud.data.tobytes())
cloud.header.frame_id = "lidar"
imu = Imu()
imu.header.frame_id = "imu"
imu.orientation_covariance[0] = -1.0
imu.linear_acceleration.z = 9.81

qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if args.reliability == "reliable"
                 else ReliabilityPolicy.BEST_EFFORT)
pubs = {"camera": node.create_publisher(Image, "camera/image_raw", qos),
        "lidar": node.create_publisher(PointCloud2, "lidar/points", qos),
        "imu": node.create_publisher(Imu, "imu/data", qos)}
messages = {"camera": image, "lidar": cloud, "imu": imu}
periods = {"camera": 1 / 30, "lidar": 1 / 10, "imu": 1 / 400}
sent_ns: list[int] = []  # send stamps of every input, in order
sent_at: dict[str, list[int]] = {k: [] for k in pubs}  # and per sensor
sent = {k: 0 for k in pubs}
diags: list[tuple[float, DiagnosticArray]] = []  # (monotonic receipt time, message)
arrivals_file = args.out.with_suffix(".arrivals.json")
args.out.parent.mkdir(parents=True, exist_ok=True)  # the listener writes beside the report
listener = subprocess.Popen([sys.executable, __file__, "--listen", str(arrivals_file)])
node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.append((time.monotonic(), m)), 10)
executor = SingleThreadedExecutor()
executor.add_node(node)
threading.Thread(target=executor.spin, daemon=True).start()

proc = subprocess.Popen([sys.executable, "-m", "fusion_attn.node", "--ros-args", "--params-file", default_params_file(),
                         "-p", f"qos_reliability:={args.reliability}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
while not any(s.name == "fusion_attn: fusion" for _, m in diags for s in m.status):  # active (idle, it says why)
    time.sleep(0.1)
ps = psutil.Process(proc.pid)
target = ps


def publish_all(duration_s: float) -> None:
    start = time.monotonic()
    next_due = {k: start for k in pubs}
    while (now := time.monotonic()) < start + duration_s:
        name = min(next_due, key=next_due.get)
        if next_due[name] > now:
            time.sleep(next_due[name] - now)
        msg = messages[name]
        stamp = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        pubs[name].publish(msg)
        sent_ns.append(stamp)
        sent_at[name].append(stamp)
        sent[name] += 1
        next_due[name] += periods[name]


publish_all(5.0)  # warm-up: caches, allocator, DDS discovery
rss_start = target.memory_info().rss
target.cpu_percent(None)
imu_sent_warmup = sent["imu"]
warm_sent = dict(sent)
sent_ns.clear()
for stamps in sent_at.values():
    stamps.clear()
sent = {k: 0 for k in pubs}
wall = time.monotonic()
publish_all(args.seconds)
run_end = time.monotonic()
cpu = target.cpu_percent(None) / 100.0  # cores, averaged over the run
rss_end = target.memory_info().rss
time.sleep(1.5)  # last fusions and a diagnostics message
run_s = time.monotonic() - wall - 1.5
status = {s.name: {kv.key: kv.value for kv in s.values} for s in diags[-1][1].status}
imu_received = int(status["fusion_attn: imu"]["received"]) - imu_sent_warmup  # counts since start
proc.terminate()
proc.wait(10)
listener.send_signal(signal.SIGINT)
listener.wait(10)
fused = json.loads(arrivals_file.read_text())  # (fusion stamp, arrival) of every fused state
arrivals_file.unlink()

sent_sorted = np.array(sent_ns)
latencies = []
for stamp, arrival in fused:
    i = np.searchsorted(sent_sorted, stamp, side="right") - 1
    if 0 <= i < len(sent_sorted) - 1:  # inside the timed run (sent_sorted holds only its inputs)  # inside the run: fusions after the last input measure nothing
        latencies.append((arrival - sent_sorted[i]) / 1e6)
lat = np.array(latencies)
report = {
    "date": datetime.date.today().isoformat(), "machine": machine(), "seconds": args.seconds, "sent": sent,
    "qos_reliability": args.reliability, "FASTDDS_BUILTIN_TRANSPORTS": os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", "(default)"),
    "fused_outputs": len(lat), "fused_rate_hz": len(lat) / run_s,
    "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "max": float(lat.max())},
    "latency_series_ms": lat.round(3).tolist(),
    "node_cpu_cores": cpu, "node_rss_mb": {"start": rss_start / 2**20, "end": rss_end / 2**20},
    "memory_growth_pct": 100.0 * (rss_end - rss_start) / rss_start,
    "imu": {"sent": sent["imu"], "received_by_node": imu_received, "lost": sent["imu"] - imu_received,
            "dropped_by_node": int(status["fusion_attn: imu"]["dropped"])},
    "node_diagnostics": status,
}
received = {k: int(status[f"fusion_attn: {k}"]["received"]) for k in pubs}
report["received_by_node_total"] = received
report["sent_total"] = {k: sent[k] + warm_sent[k] for k in pubs}
# Every sensor published throughout warm-up and run, healthy: how often did the node's diagnostics not call it OK
# (its reports during the run), and how many fusions masked it (the node's masked_fusions_<sensor>, from its last
# report before the run to its last one in it). Its longest publish gap in the run shows how regular it was.
before = [m for t, m in diags if t < wall][-1]
reports = [m for t, m in diags if wall <= t <= run_end]


def fusion_values(array: DiagnosticArray) -> dict[str, str]:
    return {kv.key: kv.value for s in array.status if s.name == "fusion_attn: fusion" for kv in s.values}


def sensor_health(name: str) -> dict:
    statuses = [s for m in reports for s in m.status if s.name == f"fusion_attn: {name}"]
    ok = sum(s.level == DiagnosticStatus.OK for s in statuses)
    masked = (int(fusion_values(reports[-1])[f"masked_fusions_{name}"])
              - int(fusion_values(before)[f"masked_fusions_{name}"]))
    return {"reports": len(statuses), "ok_share": ok / len(statuses),
            "not_ok": sorted({s.message.split(":")[0] for s in statuses if s.level != DiagnosticStatus.OK}),
            "fusions_masking_it": masked, "max_publish_gap_ms": float(np.diff(sent_at[name]).max() / 1e6)}


health = {name: sensor_health(name) for name in pubs}
window_s = (stamp_to_ns(reports[-1].header.stamp) - stamp_to_ns(before.header.stamp)) / 1e9
report["healthy_sensors"] = {"masked_counted_over_s": window_s, **health}
targets = [("every camera and lidar message reached the node",
            all(received[k] >= report["sent_total"][k] for k in ("camera", "lidar"))),
           ("p99 latency <= 10 ms", report["latency_ms"]["p99"] <= 10.0), ("no IMU message lost", report["imu"]["lost"] == 0),
           ("under one core", cpu < 1.0), ("memory growth < 5%", report["memory_growth_pct"] < 5.0),
           ("each sensor OK in >= 99% of diagnostics reports", all(h["ok_share"] >= 0.99 for h in health.values())),
           ("no fusion masked a healthy sensor", all(h["fusions_masking_it"] == 0 for h in health.values()))]
args.out.write_text(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if k not in ("node_diagnostics", "latency_series_ms")}, indent=2))
for name, ok in targets:
    print(f"{'met' if ok else 'MISSED'}: {name}")
executor.shutdown()
rclpy.shutdown()
raise SystemExit(0 if all(ok for _, ok in targets) else 1)
