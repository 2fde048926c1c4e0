"""Per-stage latency of the core on the standard configuration, torch and ONNX Runtime in one run.

Standard configuration: a 640x480 bgr8 camera Image, a 120,000-point PointCloud2 (x, y, z, intensity
float32), a 400 Hz IMU with a 0.25 s window (100 Imu messages). Messages are built with the rosbags
type store, the same classes the bag reader hands to the adapters.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from functools import partial

import cv2
import numpy as np
import torch

from .adapters import image_to_frame, imu_to_sample, pointcloud2_to_frame
from .backends.export import example_inputs
from .config import FusionConfig
from .frames import NS_PER_S, ImuWindow
from .messages import TYPES
from .pipeline import create_backend, load_model
from .tokenize import tokenize_camera, tokenize_imu, tokenize_lidar

CAMERA_HW = (480, 640)
LIDAR_POINTS = 120_000
IMU_HZ = 400
IMU_WINDOW_S = 0.25


def standard_messages(seed: int = 0):
    """-> (Image, PointCloud2, [Imu] * 100) for the standard configuration."""
    T = TYPES.types
    rng = np.random.default_rng(seed)

    def header(stamp_ns: int, frame: str):
        return T["std_msgs/msg/Header"](T["builtin_interfaces/msg/Time"](stamp_ns // NS_PER_S, stamp_ns % NS_PER_S), frame)

    h, w = CAMERA_HW
    image = T["sensor_msgs/msg/Image"](header(0, "camera"), h, w, "bgr8", 0, w * 3,
                                       rng.integers(0, 256, h * w * 3, dtype=np.uint8))
    # a 31-ring sweep (-15..15 deg elevation), ranges 2..100 m
    n = LIDAR_POINTS
    az = rng.uniform(-np.pi, np.pi, n)
    el = np.deg2rad(rng.integers(-15, 16, n).astype(np.float64))
    r = rng.uniform(2, 100, n)
    xyzi = np.stack([r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az), r * np.sin(el),
                     rng.uniform(0, 255, n)], 1).astype(np.float32)
    fields = [T["sensor_msgs/msg/PointField"](name, 4 * i, 7, 1) for i, name in enumerate(("x", "y", "z", "intensity"))]
    cloud = T["sensor_msgs/msg/PointCloud2"](header(0, "lidar"), 1, n, fields, False, 16, 16 * n, xyzi.view(np.uint8).ravel(), True)
    vec = T["geometry_msgs/msg/Vector3"]
    quat = T["geometry_msgs/msg/Quaternion"](0.0, 0.0, 0.0, 1.0)
    cov = np.zeros(9)
    imus = [T["sensor_msgs/msg/Imu"](header(int(i * NS_PER_S / IMU_HZ), "imu"), quat, cov,
                                     vec(*rng.normal(0, 0.1, 3)), cov, vec(*rng.normal([0, 0, 9.8], 0.2)), cov)
            for i in range(int(IMU_HZ * IMU_WINDOW_S))]
    return image, cloud, imus


def write_standard_bag(path, seconds: float) -> int:
    """A rosbag2 MCAP of `seconds` of the standard sensor set (Image 30 Hz, PointCloud2 10 Hz, Imu 400 Hz;
    the payloads above) at `path`; -> messages written."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    image, cloud, imus = standard_messages()
    streams = [("/camera/image_raw", "sensor_msgs/msg/Image", image, 30),
               ("/lidar/points", "sensor_msgs/msg/PointCloud2", cloud, 10), ("/imu/data", "sensor_msgs/msg/Imu", imus[0], 400)]
    t0 = 1_700_000_000 * NS_PER_S
    events = sorted((t0 + round(i * NS_PER_S / hz), k) for k, (_, _, _, hz) in enumerate(streams)
                    for i in range(int(seconds * hz)))
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = [writer.add_connection(topic, msgtype, typestore=store) for topic, msgtype, _, _ in streams]
        for stamp, k in events:
            _, msgtype, msg, _ = streams[k]
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, NS_PER_S)
            writer.write(conns[k], stamp, store.serialize_cdr(msg, msgtype))
    return len(events)


def _adapt_all(convert, msgs):
    return [convert(m) for m in msgs]


def _time(fn: Callable[[], object], repeats: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3)}


def run(threads: tuple[int, ...] = (1, 2), repeats: int = 300, checkpoint=None) -> dict:
    """-> {"machine": ..., "results": {threads: {stage: {p50_ms, p99_ms}}}, "ratios": ...}."""
    image, cloud, imus = standard_messages()
    cfg = FusionConfig()
    model, source = load_model(checkpoint)
    inputs = example_inputs(model, batch=1)
    results = {}
    for n in threads:
        torch.set_num_threads(n)
        cv2.setNumThreads(n)
        cam, pts = image_to_frame(image), pointcloud2_to_frame(cloud)
        window = ImuWindow.from_samples([imu_to_sample(m) for m in imus])
        ort, tch = create_backend("onnxruntime", model, threads=n), create_backend("torch", model, threads=n)
        stages = {
            "adapt camera (Image 640x480 bgr8)": partial(image_to_frame, image),
            "adapt lidar (PointCloud2 120k)": partial(pointcloud2_to_frame, cloud),
            "adapt imu (100 Imu msgs)": partial(_adapt_all, imu_to_sample, imus),
            "tokenize camera": partial(tokenize_camera, cam, cfg.camera),
            "tokenize lidar": partial(tokenize_lidar, pts, cfg.lidar),
            "tokenize imu": partial(tokenize_imu, window, cfg.imu),
            "model torch eager": partial(tch.run, inputs),
            "model onnxruntime": partial(ort.run, inputs),
        }
        results[n] = {name: _time(fn, repeats) for name, fn in stages.items()}
    ratios = {n: r["model torch eager"]["p50_ms"] / r["model onnxruntime"]["p50_ms"] for n, r in results.items()}
    return {"machine": machine(), "model": source, "repeats": repeats, "results": results,
            "torch_over_onnxruntime_p50": ratios}


def machine() -> str:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, opencv {cv2.__version__}")


def to_markdown(report: dict) -> str:
    threads = list(report["results"])
    lines = ["| stage | " + " | ".join(f"{n} thread{'s' if n > 1 else ''} p50 / p99 ms" for n in threads) + " |",
             "|---|" + "---|" * len(threads)]
    for stage in report["results"][threads[0]]:
        cells = [f"{report['results'][n][stage]['p50_ms']:.3f} / {report['results'][n][stage]['p99_ms']:.3f}" for n in threads]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "| target (issue #2) | measured at 1 thread | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in targets(report)]
    ratio = ", ".join(f"{r:.2f}x at {n} thread{'s' if n > 1 else ''}" for n, r in report["torch_over_onnxruntime_p50"].items())
    lines.append("")
    lines.append(f"Model p50, torch eager / ONNX Runtime: {ratio}.")
    return "\n".join(lines)


def targets(report: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets, judged on the 1-thread results: (target, measured, met)."""
    r = report["results"][min(report["results"])]
    model = r["model onnxruntime"]["p50_ms"]
    ratio = report["torch_over_onnxruntime_p50"][min(report["results"])]
    lidar = r["tokenize lidar"]["p50_ms"]
    camera = r["adapt camera (Image 640x480 bgr8)"]["p50_ms"] + r["tokenize camera"]["p50_ms"]
    return [("model on ONNX Runtime, batch 1: p50 <= 1 ms", f"{model:.3f} ms", model <= 1.0),
            ("ONNX Runtime >= 1.5x faster than torch eager (p50)", f"{ratio:.2f}x", ratio >= 1.5),
            ("lidar tokenization of 120k points <= 5 ms (p50)", f"{lidar:.3f} ms", lidar <= 5.0),
            ("640x480 camera preprocessing (adapt + tokenize) <= 3 ms (p50)", f"{camera:.3f} ms", camera <= 3.0)]
