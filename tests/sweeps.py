"""Lidar sweeps of a known motion for the scan match's tests (test_model) and its exported graph's (test_export)."""

import math

import numpy as np
import torch

from fusion_attn.config import FusionConfig
from fusion_attn.frames import LidarFrame
from fusion_attn.tokenize import tokenize_lidar


def room_sweep(yaw: float, forward: float) -> LidarFrame:
    """A sensor at (forward, 0) turned by yaw in a walled room with a box in it: wall points every 2 cm
    at four heights, in the sensor's frame."""
    def segment(a, b):
        n = int(np.hypot(*np.subtract(b, a)) / 0.02)
        return np.linspace(a, b, n, endpoint=False)

    corners = [(-5.0, -3.5), (7.0, -3.5), (7.0, 4.5), (-5.0, 4.5)]
    box = [(2.0, 1.0), (3.2, 1.0), (3.2, 1.8), (2.0, 1.8)]
    world = np.concatenate([segment(c[i], c[(i + 1) % 4]) for c in (corners, box) for i in range(4)])
    cos, sin = math.cos(yaw), math.sin(yaw)
    local = (world - [forward, 0.0]) @ np.array([[cos, -sin], [sin, cos]])  # R(-yaw) (w - position), as rows
    pts = np.concatenate([np.c_[local, np.full(len(local), z), np.full(len(local), 50.0)] for z in (-0.5, 0.0, 0.5, 1.0)])
    return LidarFrame(stamp_ns=0, frame_id="lidar", points=pts.astype(np.float32))


def scan_inputs(now, before, interval=0.1):
    """Two sweeps as the model's lidar inputs (batch 1), `interval` s apart; -> (inputs, the config)."""
    cfg = FusionConfig()
    (p, pm), (q, qm) = tokenize_lidar(now, cfg.lidar), tokenize_lidar(before, cfg.lidar)
    x = {"lidar_points": p, "lidar_mask": pm, "lidar_prev_points": q, "lidar_prev_mask": qm,
         "lidar_age": np.zeros(cfg.lidar.tokens, np.float32), "lidar_prev_age": np.full(cfg.lidar.tokens, interval, np.float32)}
    return {k: torch.from_numpy(v)[None] for k, v in x.items()}, cfg
