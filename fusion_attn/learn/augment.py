"""Sensor faults as augmentation, applied to the tokenized batch.

The node sees a fault only through the tokens, so faulting the tokens is faithful, and it costs
microseconds instead of re-tokenizing or re-simulating every sample of every batch (see `corrupt`).
Each fault edits the tokens by their named layout (`tokenize.LIDAR_FEATURES`, `IMU_AXES`, the camera
normalisation), so a reordered feature cannot silently corrupt the wrong channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import FusionConfig
from ..frames import MODALITIES, CameraFrame
from ..tokenize import (IMU_AXES, LIDAR_INDEX, denormalise_pixels, imu_samples, normalise_pixels, put_imu_samples,
                        tokenize_camera)
from .data import decode_camera

FAULTS = ("drop", "zero", "noise", "freeze", "delay")
FREEZE_LAG = (5, 30)  # samples back (0.5-3 s at 10 Hz): where a frozen sensor got stuck
DELAY_LAG = 1  # samples back (0.1 s at 10 Hz): beyond this the node's max ages mask the sensor anyway


@dataclass
class FaultPlan:
    """Per sample: the faulted sensor (-1: none, else Modality), the fault (index into FAULTS), how many
    samples back a frozen or delayed sensor's content is, and the noise strength in [0, 1]."""

    sensor: torch.Tensor  # (B,) long
    fault: torch.Tensor  # (B,) long
    lag: torch.Tensor  # (B,) long
    strength: torch.Tensor  # (B,) float

    @classmethod
    def draw(cls, batch: int, prob: float, gen: torch.Generator) -> FaultPlan:
        faulted = torch.rand(batch, generator=gen) < prob
        sensor = torch.where(faulted, torch.randint(0, 3, (batch,), generator=gen), -1)
        fault = torch.randint(0, len(FAULTS), (batch,), generator=gen)
        lag = torch.randint(FREEZE_LAG[0], FREEZE_LAG[1] + 1, (batch,), generator=gen)
        lag = torch.where(fault == FAULTS.index("delay"), DELAY_LAG, lag)
        return cls(sensor, fault, lag, torch.rand(batch, generator=gen))

    @classmethod
    def fixed(cls, batch: int, sensor: int, fault: str, lag: int | None = None, strength: float = 1.0) -> FaultPlan:
        """The same fault on every sample (evaluation, tests)."""
        lag = lag if lag is not None else DELAY_LAG if fault == "delay" else FREEZE_LAG[1]
        return cls(torch.full((batch,), sensor), torch.full((batch,), FAULTS.index(fault)),
                   torch.full((batch,), lag), torch.full((batch,), strength))


def gather(data: dict[str, torch.Tensor], idx: torch.Tensor, src: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Model inputs of samples `idx`; with src (B, 3), each modality's content (tokens, mask) comes from
    sample src[:, m] while ages stay those of idx (what a frozen sensor looks like to the node)."""
    src = idx[:, None].expand(-1, 3) if src is None else src
    c, li, i = src[:, 0], src[:, 1], src[:, 2]
    return {
        "camera_patches": decode_camera(data["camera_u8"][c], data["camera_mask"][c]),
        "camera_mask": data["camera_mask"][c], "camera_age": data["camera_age"][idx],
        "lidar_points": data["lidar_points"][li].float(), "lidar_mask": data["lidar_mask"][li],
        "lidar_age": data["lidar_age"][idx],
        "imu_chunks": data["imu_chunks"][i], "imu_mask": data["imu_mask"][i], "imu_age": data["imu_age"][idx],
    }


def _black_camera(cfg: FusionConfig) -> torch.Tensor:
    """The tokens of an all-black image, as the node tokenizes a blacked-out camera."""
    frame = CameraFrame(0, "camera", np.zeros((cfg.camera.height, cfg.camera.width, 3), np.uint8), "rgb8")
    return torch.from_numpy(tokenize_camera(frame, cfg.camera)[0])


def corrupt(data: dict[str, torch.Tensor], idx: torch.Tensor, plan: FaultPlan, cfg: FusionConfig, fusion_hz: float,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Model inputs of samples `idx` with the planned sensor faults, as the node would tokenize them:

        drop    the sensor sends nothing: its tokens are masked
        zero    camera: a black image; IMU: all-zero accel and gyro (rate and sample count as before);
                lidar: no points, which the sync drops like a missing sweep, so the same as drop
        noise   gaussian noise: camera up to 60 pixel levels; lidar up to 1 m on the points' coordinates
                (their pillars are kept: a cheap stand-in for re-binning); IMU up to 3 m/s^2 (and 0.3
                rad/s, the simulator's GYRO_PER_ACCEL) per sample
        freeze  the content of a sample FREEZE_LAG back, with current ages: a driver that keeps
                re-sending its last buffer with fresh stamps (the simulator's camera_freeze)
        delay   the content of the sample DELAY_LAG back, its ages older by as much
    """
    B = len(idx)
    sensor, fault = plan.sensor, plan.fault
    hit = [(sensor == m) for m in range(3)]
    lagged = (fault == FAULTS.index("freeze")) | (fault == FAULTS.index("delay"))
    older = torch.maximum(idx - plan.lag, data["seq_start"][idx])
    src = torch.stack([torch.where(hit[m] & lagged, older, idx) for m in range(3)], dim=1)
    x = gather(data, idx, src)
    delay_s = (idx - older).float() / fusion_hz
    is_delay = fault == FAULTS.index("delay")
    for m, name in enumerate(MODALITIES):
        rows = hit[m] & is_delay
        x[f"{name}_age"] = x[f"{name}_age"] + torch.where(rows, delay_s, 0.0)[:, None]

    def rows_of(kind: str, m: int) -> torch.Tensor:
        return hit[m] & (fault == FAULTS.index(kind))

    s = plan.strength
    # camera: noise in pixel levels, added to the pixels the tokens stand for
    r = rows_of("zero", 0)
    x["camera_patches"] = torch.where(r[:, None, None], _black_camera(cfg), x["camera_patches"])
    r = rows_of("noise", 0)
    if r.any():
        patches = x["camera_patches"]
        pixels = denormalise_pixels(patches.reshape(*patches.shape[:-1], -1, 3))
        noise = torch.randn(pixels.shape, generator=gen) * (60.0 / 255.0) * (s * r)[:, None, None, None]
        noisy = normalise_pixels(pixels + noise).flatten(-2)
        x["camera_patches"] = torch.where((r[:, None] & x["camera_mask"])[..., None], noisy, patches)
    # lidar: the coordinates, the range and the in-pillar offsets move with the noise [m]
    r = rows_of("noise", 1)
    if r.any():
        li, L = cfg.lidar, LIDAR_INDEX
        d = torch.randn((B, li.tokens, li.points_per_pillar, 3), generator=gen) * (s * r)[:, None, None, None]
        p = x["lidar_points"].clone()
        per_m = li.grid / (2.0 * li.range_m)
        p[..., L["x"]] += d[..., 0] / li.range_m
        p[..., L["y"]] += d[..., 1] / li.range_m
        p[..., L["z"]] += d[..., 2] / li.z_max_m
        p[..., L["range"]] = torch.hypot(p[..., L["x"]], p[..., L["y"]])
        p[..., L["dx"]] += d[..., 0] * per_m
        p[..., L["dy"]] += d[..., 1] * per_m
        p[..., L["dz"]] += d[..., 2]
        x["lidar_points"] = torch.where(r[:, None, None, None], p * x["lidar_mask"][..., None], x["lidar_points"])
    # IMU: the resampled samples change; each chunk's sample spacing and count stay
    imu = cfg.imu
    values = imu_samples(x["imu_chunks"], imu)  # (B, chunks, S, 6)
    r = rows_of("zero", 2)
    values = torch.where(r[:, None, None, None], 0.0, values)
    r = rows_of("noise", 2)
    if r.any():
        scale = torch.tensor([3.0 / imu.accel_scale if axis.startswith("accel") else 0.3 / imu.gyro_scale
                              for axis in IMU_AXES])
        values = values + torch.randn(values.shape, generator=gen) * scale * (s * r)[:, None, None, None]
    put_imu_samples(x["imu_chunks"], values * x["imu_mask"][..., None, None], imu)  # in gather's copy
    # drop (and a zeroed lidar): masked
    for m, name in enumerate(MODALITIES):
        r = rows_of("drop", m) | (rows_of("zero", m) & (name == "lidar"))
        key = f"{name}_mask"
        x[key] = x[key] & ~(r.view(-1, *[1] * (x[key].dim() - 1)))
    return x


def random_tau(batch: int, prob: float, gen: torch.Generator) -> torch.Tensor:
    """(B, 4) τ: all ones, or with `prob` a random global τ in [0.2, 5] and per-modality τ in [0.5, 2]
    (log-uniform), so the model works across the τ the node may be set to."""
    u = torch.rand(batch, 4, generator=gen)
    span = torch.tensor([math.log(5.0), math.log(2.0), math.log(2.0), math.log(2.0)])
    tau = torch.exp((2.0 * u - 1.0) * span)
    return torch.where((torch.rand(batch, 1, generator=gen) < prob), tau, torch.ones(batch, 4))
