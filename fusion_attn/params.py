"""The fusion node's runtime parameters: one table of names, defaults, descriptions and ranges.

fusion_node declares them from here; replay, the sensor sync, the pipeline and the CLI take their
defaults from here, so a setting left out of a parameter file means the same everywhere.
config/fusion.yaml spells out the same defaults (tests/test_packaging.py checks that they agree).
No rclpy: the core and the CLI import this without ROS 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Param:
    """One node parameter: its dotted name (as flattened from the YAML), default and description."""

    name: str
    default: object
    description: str
    range: tuple[float, float] | None = None
    runtime: bool = False  # may change while active (else read-only after start)


PARAMETERS = (
    Param("checkpoint", "", "safetensors checkpoint; empty: the packaged default model"),
    Param("backend", "onnxruntime", "inference backend: onnxruntime | torch | torch-cudagraph | tensorrt"),
    Param("backend_fallback", "onnxruntime", "if the backend cannot run here: onnxruntime (log why) | fail"),
    Param("device", "", "torch/GPU device, e.g. cuda:0; empty: cpu for onnxruntime/torch, cuda:0 for GPU backends"),
    Param("threads", 1, "CPU threads of the backend", (1, 64)),
    Param("tensorrt.precision", "fp16", "engine precision: fp32 | tf32 | fp16 | int8"),
    Param("tensorrt.workspace_mib", 1024, "builder workspace limit [MiB]", (1, 1 << 20)),
    Param("tensorrt.max_batch", 8, "engine profile: batch 1..max_batch", (1, 64)),
    Param("tensorrt.opt_batch", 1, "engine profile: the batch size tuned for", (1, 64)),
    Param("tensorrt.dla_core", -1, "DLA core (-1: GPU only); layers DLA cannot run fall back to the GPU", (-1, 7)),
    Param("tensorrt.cache_dir", "", "engine cache; empty: $FUSION_ATTN_CACHE/engines or ~/.cache/fusion_attn/engines"),
    Param("tensorrt.calibration_cache", "", "int8: calibration cache made by `fusion-attn build-engine --calibrate`"),
    Param("tensorrt.whole_step", True, "one engine from sensor arrays to fused state (tokenizers on the GPU); "
          "false, int8 or DLA: host tokenizers and the token-level engine"),
    Param("tensorrt.step_camera", "", "HxWxC:encoding, e.g. 480x640x3:rgb8: its step engine built at configure; "
          "empty: at the first frame of each camera resolution"),
    Param("cudagraph.compile", False, "torch-cudagraph: torch.compile (inductor) before capture, fewer kernels; "
          "tens of seconds per graph (camera size, point bucket, IMU bucket and rows) at its first use; needs Triton"),
    Param("build_only", False, "configure (build or load the engine), then exit: engines built ahead of time"),
    Param("frame_id", "base_link", "frame_id of the fused state"),
    Param("fusion_rate_hz", 20.0, "fusion timer rate (with a trigger: while that sensor is silent)", (0.1, 1000.0)),
    Param("trigger", "timer", "fuse on: timer | camera | lidar | imu (each message of that sensor; the timer while it is not fresh)"),
    Param("camera_type", "image", "camera message: image | compressed | none"),
    Param("camera_topic", "camera/image_raw", "camera topic (or remap it)"),
    Param("lidar_type", "pointcloud2", "lidar message: pointcloud2 | laserscan | none"),
    Param("lidar_topic", "lidar/points", "lidar topic (or remap it)"),
    Param("imu_type", "imu", "IMU: imu | none"),
    Param("imu_topic", "imu/data", "IMU topic (or remap it)"),
    Param("odometry_type", "odometry", "wheel odometry: odometry (nav_msgs/Odometry) | none; read only by a model "
          "built with it"),
    Param("odometry_topic", "odom", "wheel odometry topic (or remap it)"),
    Param("imu2_type", "imu", "a second IMU: imu | none; read only by a model built with it"),
    Param("imu2_topic", "imu2/data", "second IMU topic (or remap it)"),
    Param("qos_reliability", "best_effort", "subscription reliability: best_effort (sensor data) | reliable"),
    Param("qos_depth", 50, "subscription queue depth (per topic)", (1, 1000)),
    Param("tau.global", 1.0, "softmax temperature, all tokens (> 0; lower = sharper)", (1e-3, 1e3), runtime=True),
    Param("tau.camera", 1.0, "temperature of camera tokens, times tau.global", (1e-3, 1e3), runtime=True),
    Param("tau.lidar", 1.0, "temperature of lidar tokens, times tau.global", (1e-3, 1e3), runtime=True),
    Param("tau.imu", 1.0, "temperature of IMU tokens, times tau.global", (1e-3, 1e3), runtime=True),
    Param("tau.odometry", 1.0, "temperature of wheel odometry tokens, times tau.global", (1e-3, 1e3), runtime=True),
    Param("tau.imu2", 1.0, "temperature of the second IMU's tokens, times tau.global", (1e-3, 1e3), runtime=True),
    Param("max_age_s.camera", 0.2, "camera older than this at fusion time is masked", (1e-3, 60.0)),
    Param("max_age_s.lidar", 0.3, "lidar older than this at fusion time is masked", (1e-3, 60.0)),
    Param("max_age_s.imu", 0.05, "IMU older than this at fusion time is masked", (1e-3, 60.0)),
    Param("max_age_s.odometry", 0.2, "wheel odometry older than this at fusion time is masked", (1e-3, 60.0)),
    Param("max_age_s.imu2", 0.05, "the second IMU older than this at fusion time is masked", (1e-3, 60.0)),
    Param("stale_after_periods", 1.5, "also late (WARN) and masked after this many of the sensor's periods of "
          "silence, or jitter_margin_s after its next message was due if longer (0: never)", (0.0, 100.0)),
    Param("jitter_margin_s", 0.025, "how far a sensor's next message may be overdue before it is late and masked, "
          "where stale_after_periods allows less: a fast sensor's delivery jitter (DDS, load)", (0.0, 1.0)),
    Param("future_tolerance_s", 0.5, "data stamped further ahead of the node's clock is dropped (dropped_future): "
          "how far a sensor's clock may lead ours", (0.0, 60.0)),
    # Physical limits: a message beyond them is corrupt, not data, and is dropped whole (dropped_out_of_limits).
    # Generous, so that no real sensor reaches them: long-range lidars see 300-600 m, MEMS IMUs saturate at
    # +-40 g (390 m/s^2) and +-4000 deg/s (69.8 rad/s) at most.
    Param("limits.max_range_m", 1000.0, "a lidar point farther than this [m] drops its cloud", (1.0, 1e6)),
    Param("limits.max_acceleration_mps2", 500.0, "an IMU acceleration axis beyond this [m/s^2] drops the sample",
          (1.0, 1e6)),
    Param("limits.max_angular_rate_rad_s", 70.0, "an IMU angular rate axis beyond this [rad/s] drops the sample",
          (0.1, 1e6)),
    Param("limits.max_speed_mps", 100.0, "an odometry velocity axis beyond this [m/s] drops the twist (its turn rate: "
          "limits.max_angular_rate_rad_s)", (0.1, 1e6)),
    Param("diagnostics_period_s", 1.0, "diagnostics publishing period (also while inactive)", (0.05, 60.0)),
    Param("attention_image.enabled", False, "publish fused_state/attention_image: where the fusion looks (rgb8)"),
    Param("attention_image.period_s", 1.0, "attention image period: at most one picture per period", (0.05, 60.0)),
    Param("autostart", True, "configure and activate on start (no lifecycle manager needed)"),
)
PARAM_DEFAULTS: Mapping[str, Any] = MappingProxyType({p.name: p.default for p in PARAMETERS})
TAU_NAMES = tuple(p.name for p in PARAMETERS if p.runtime)  # global, camera, lidar, imu, odometry, imu2


def param(params: Mapping[str, Any], name: str) -> Any:
    """`name` from a flat parameter dict (as load_params reads it), else the table's default.

    A name the table lacks is a KeyError, whether or not `params` has it: a misspelt name fails loudly."""
    return params.get(name, PARAM_DEFAULTS[name])
