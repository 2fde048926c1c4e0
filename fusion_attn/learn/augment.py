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

from ..config import STREAMS, FusionConfig
from ..frames import CameraFrame
from ..tokenize import (
    IMU_AXES,
    LIDAR_INDEX,
    denormalise_pixels,
    imu_samples,
    normalise_pixels,
    put_imu_samples,
    tokenize_camera,
)
from .data import decode_camera

FAULTS = ("drop", "zero", "noise", "freeze", "delay", "partial")
CONTENT_FAULTS = ("zero", "noise", "freeze", "partial")  # what the trust must catch: the content is wrong
FREEZE_LAG = (5, 30)  # samples back (0.5-3 s at 10 Hz): where a frozen sensor got stuck
DELAY_LAG = 1  # samples back (0.1 s at 10 Hz): beyond this the node's max ages mask the sensor anyway
NOISE_MIN = 0.25  # the weakest noise drawn in training, as a share of the full strength
BLOCKED_SECTOR = 2 * math.pi / 3  # a partially blocked lidar loses a 120° sector
FRAMED = ("camera", "lidar")  # the sensors whose previous frame the model sees too
# IMU (and odometry) sample axes of the second kind: the gyro's (odometry's turn rates), which a partial fault zeroes
SECOND_KIND = torch.tensor([axis.startswith("gyro") for axis in IMU_AXES])


@dataclass
class FaultPlan:
    """Per sample: the faulted sensor (-1: none, else Modality), the fault (index into FAULTS), how many
    samples back a frozen or delayed sensor's content is, the noise strength in [0, 1] and where a
    partial fault sits in [0, 1) (which image half; where the blocked lidar sector starts); and, when
    drawn, whose camera and lidar frames come without their previous one (a recording's first frame, or
    the first after a gap longer than the sync bridges) and which samples keep one sensor alone (every
    other one sends nothing: a two-sensor rig with one failed, or two failures at once)."""

    sensor: torch.Tensor  # (B,) long
    fault: torch.Tensor  # (B,) long
    lag: torch.Tensor  # (B,) long
    strength: torch.Tensor  # (B,) float
    where: torch.Tensor  # (B,) float
    first_frame: torch.Tensor | None = None  # (B, 2) bool: camera, lidar
    alone: torch.Tensor | None = None  # (B,) long: the one sensor left (Modality), -1 where all stay

    @classmethod
    def draw(cls, batch: int, prob: float, gen: torch.Generator,
             sensor_weights: tuple[float, ...] = (1.0, 1.0, 1.0), first_frame_share: float = 0.0,
             lone_share: float = 0.0) -> FaultPlan:
        """A faulted sensor with chance `prob` per sample, each of the model's sensors (FusionConfig.sensors:
        camera, lidar, IMU[, odometry]) in proportion to its entry of sensor_weights; camera and lidar
        each as a first frame with chance first_frame_share; with chance lone_share one sensor left
        alone, each alike (the last two drawn last, and only when asked: the streams of runs without
        them stay theirs)."""
        faulted = torch.rand(batch, generator=gen) < prob
        if not sum(sensor_weights) > 0:
            raise ValueError(f"fault sensor weights {sensor_weights}: at least one above 0")
        if len(set(sensor_weights)) == 1:  # equal: the draw every earlier run made, so their streams stay theirs
            which = torch.randint(0, len(sensor_weights), (batch,), generator=gen)
        else:
            which = torch.multinomial(torch.tensor(sensor_weights, dtype=torch.float), batch, replacement=True,
                                      generator=gen)
        sensor = torch.where(faulted, which, -1)
        fault = torch.randint(0, len(FAULTS), (batch,), generator=gen)
        lag = torch.randint(FREEZE_LAG[0], FREEZE_LAG[1] + 1, (batch,), generator=gen)
        lag = torch.where(fault == FAULTS.index("delay"), DELAY_LAG, lag)
        strength = NOISE_MIN + (1.0 - NOISE_MIN) * torch.rand(batch, generator=gen)
        where = torch.rand(batch, generator=gen)
        first = torch.rand(batch, 2, generator=gen) < first_frame_share if first_frame_share > 0 else None
        alone = None
        if lone_share > 0:
            lone = torch.rand(batch, generator=gen) < lone_share
            alone = torch.where(lone, torch.randint(0, len(sensor_weights), (batch,), generator=gen), -1)
        return cls(sensor, fault, lag, strength, where, first, alone)

    @classmethod
    def fixed(cls, batch: int, sensor: int, fault: str, lag: int | None = None, strength: float = 1.0,
              where: float = 0.25) -> FaultPlan:
        """The same fault on every sample (evaluation, tests)."""
        lag = lag if lag is not None else DELAY_LAG if fault == "delay" else FREEZE_LAG[1]
        return cls(torch.full((batch,), sensor), torch.full((batch,), FAULTS.index(fault)),
                   torch.full((batch,), lag), torch.full((batch,), strength), torch.full((batch,), where))

    def content_faulted(self, sensors: int = 3) -> torch.Tensor:
        """(B, sensors) bool: the sensor whose content the fault corrupts (the trust's target is its negation);
        a dropped sensor is absent rather than wrong, and a late one is right but late (its age says so)."""
        content = torch.zeros_like(self.fault, dtype=torch.bool)
        for name in CONTENT_FAULTS:
            content |= self.fault == FAULTS.index(name)
        return (self.sensor[:, None] == torch.arange(sensors)) & content[:, None]


def gather(data: dict[str, torch.Tensor], idx: torch.Tensor, src: torch.Tensor | None = None,
           prev_src: torch.Tensor | None = None, interval: torch.Tensor | None = None,
           previous: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs of samples `idx`. With src (B, S), each sensor's content (tokens, mask) comes from
    sample src[:, m] while ages stay those of idx (what a frozen sensor looks like to the node); camera
    and lidar's previous frames come from prev_src (B, 2) (-1: none; default: each source's own previous
    frame), `interval` (B, 2) seconds before the current frame (default: as recorded). previous=False:
    the current frames only (what the training targets need)."""
    streams = [n for n in STREAMS if f"{n}_chunks" in data]  # those the dataset was tokenized for (the model's)
    src = idx[:, None].expand(-1, 2 + len(streams)) if src is None else src
    c, li = src[:, 0], src[:, 1]
    current = {
        "camera_patches": decode_camera(data["camera_u8"][c], data["camera_mask"][c]),
        "camera_mask": data["camera_mask"][c], "camera_age": data["camera_age"][idx],
        "lidar_points": data["lidar_points"][li].float(), "lidar_mask": data["lidar_mask"][li],
        "lidar_age": data["lidar_age"][idx],
    }
    for k, name in enumerate(streams, start=2):
        s = src[:, k]
        current |= {f"{name}_chunks": data[f"{name}_chunks"][s], f"{name}_mask": data[f"{name}_mask"][s],
                    f"{name}_age": data[f"{name}_age"][idx]}
    if not previous:
        return current
    if prev_src is None:
        prev_src = torch.stack([data["camera_prev"][c], data["lidar_prev"][li]], dim=1)
    if interval is None:
        interval = torch.stack([(data[f"{n}_frame_s"][s] - data[f"{n}_frame_s"][p.clamp_min(0)]).float()
                                for n, s, p in (("camera", c, prev_src[:, 0]), ("lidar", li, prev_src[:, 1]))], dim=1)
    has_prev, pc, pl = prev_src >= 0, prev_src[:, 0].clamp_min(0), prev_src[:, 1].clamp_min(0)
    camera_prev_mask = data["camera_mask"][pc] & has_prev[:, :1]
    lidar_prev_mask = data["lidar_mask"][pl] & has_prev[:, 1, None, None]
    return current | {
        "camera_prev_patches": decode_camera(data["camera_u8"][pc], camera_prev_mask),
        "camera_prev_mask": camera_prev_mask,
        "camera_prev_age": (data["camera_age"][idx] + interval[:, :1]) * has_prev[:, :1],
        "lidar_prev_points": data["lidar_points"][pl].float() * lidar_prev_mask[..., None],
        "lidar_prev_mask": lidar_prev_mask,
        "lidar_prev_age": (data["lidar_age"][idx] + interval[:, 1:]) * has_prev[:, 1:],
    }


def _black_camera(cfg: FusionConfig) -> torch.Tensor:
    """The tokens of an all-black image, as the node tokenizes a blacked-out camera."""
    frame = CameraFrame(0, "camera", np.zeros((cfg.camera.height, cfg.camera.width, 3), np.uint8), "rgb8")
    return torch.from_numpy(tokenize_camera(frame, cfg.camera)[0])


def corrupt(data: dict[str, torch.Tensor], idx: torch.Tensor, plan: FaultPlan, cfg: FusionConfig, fusion_hz: float,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Model inputs of samples `idx` with the planned sensor faults, as the node would tokenize them. A
    fault lasts, so the camera's and lidar's previous frames have it too (independent noise, the same
    black, occlusion or blocked sector):

        drop     the sensor sends nothing: its tokens are masked
        zero     camera: a black image; IMU: all-zero accel and gyro (rate and sample count as before);
                 lidar: no points, which the sync drops like a missing sweep, so the same as drop
        noise    gaussian noise: camera up to 60 pixel levels; lidar up to 1 m on the points' coordinates
                 (their pillars are kept: a cheap stand-in for re-binning); IMU up to 3 m/s^2 (and 0.3
                 rad/s, the simulator's GYRO_PER_ACCEL) per sample
        freeze   a driver that keeps re-sending its last data with fresh stamps: camera and lidar the
                 frame of FREEZE_LAG samples back, its previous frame the same; IMU that sample's newest
                 reading, held (every sample of the window alike)
        delay    the content of the sample DELAY_LAG back, its ages older by as much
        partial  camera: one half of the image (left or right) black; lidar: the points of a 120°
                 sector gone; IMU: the gyro reads zero (the accelerometer works)

    Wheel odometry (a model that reads it) fails as the IMU does, its speed and turn rate for accel and
    gyro: zero (a robot that seems to stand), noise up to 0.3 m/s and 0.3 rad/s, its twist frozen, late,
    or (partial) the turn rate reading zero. A second IMU fails as the first.
    """
    B = len(idx)
    sensor, fault = plan.sensor, plan.fault
    hit = [(sensor == m) for m in range(len(cfg.sensors))]
    is_freeze, is_delay = fault == FAULTS.index("freeze"), fault == FAULTS.index("delay")
    older = torch.maximum(idx - plan.lag, data["seq_start"][idx])
    # a frozen six-axis stream (IMU, odometry) keeps its live window's timing: only its values are held
    lagged = [is_freeze | is_delay if name in FRAMED else is_delay for name in cfg.sensor_names]
    src = torch.stack([torch.where(hit[m] & lagged[m], older, idx) for m in range(len(hit))], dim=1)
    # previous frames: a delayed sensor's is its source's own; a frozen one's is its content again,
    # as far before as the clean sample's previous frame was
    clean_prev = torch.stack([data["camera_prev"][idx], data["lidar_prev"][idx]], dim=1)
    own_prev = torch.stack([data["camera_prev"][src[:, 0]], data["lidar_prev"][src[:, 1]]], dim=1)
    frozen = torch.stack([hit[0] & is_freeze, hit[1] & is_freeze], dim=1)
    prev_src = torch.where(frozen & (clean_prev >= 0), src[:, :2], torch.where(frozen, -1, own_prev))
    if plan.first_frame is not None:  # nothing to compare with; not a frozen one, which would then look clean
        prev_src = torch.where(plan.first_frame & ~frozen, -1, prev_src)
    clean_interval = torch.stack([(data[f"{n}_frame_s"][idx] - data[f"{n}_frame_s"][clean_prev[:, k].clamp_min(0)]).float()
                                  for k, n in enumerate(("camera", "lidar"))], dim=1)
    x = gather(data, idx, src, prev_src)
    x["camera_prev_age"] = torch.where(frozen[:, :1], (x["camera_age"] + clean_interval[:, :1]) * x["camera_prev_mask"],
                                       x["camera_prev_age"])
    x["lidar_prev_age"] = torch.where(frozen[:, 1:], (x["lidar_age"] + clean_interval[:, 1:]) * x["lidar_prev_mask"].any(-1),
                                      x["lidar_prev_age"])
    delay_s = (idx - older).float() / fusion_hz
    for m, name in enumerate(cfg.sensor_names):
        shift = torch.where(hit[m] & is_delay, delay_s, 0.0)[:, None]
        x[f"{name}_age"] = x[f"{name}_age"] + shift
        if name in FRAMED:
            x[f"{name}_prev_age"] = x[f"{name}_prev_age"] + shift * (x[f"{name}_prev_age"] > 0)

    def rows_of(kind: str, m: int) -> torch.Tensor:
        return hit[m] & (fault == FAULTS.index(kind))

    s = plan.strength
    # camera: black, half black, noise in pixel levels added to the pixels the tokens stand for
    black = _black_camera(cfg)
    cols = cfg.camera.width // cfg.camera.patch
    left = (torch.arange(cfg.camera.tokens) % cols) < cols // 2  # (N_c,) the image's left half
    occluded = rows_of("zero", 0)[:, None] | (rows_of("partial", 0)[:, None] & (left[None] ^ (plan.where >= 0.5)[:, None]))
    for key in ("camera_patches", "camera_prev_patches"):
        mask = x[key.replace("patches", "mask")]
        x[key] = torch.where((occluded & mask)[..., None], black, x[key])
        r = rows_of("noise", 0)
        if r.any():
            patches = x[key]
            pixels = denormalise_pixels(patches.reshape(*patches.shape[:-1], -1, 3))
            noise = torch.randn(pixels.shape, generator=gen) * (60.0 / 255.0) * (s * r)[:, None, None, None]
            noisy = normalise_pixels(pixels + noise).flatten(-2)
            x[key] = torch.where((r[:, None] & mask)[..., None], noisy, patches)
    # lidar: noise moves the coordinates, the range and the in-pillar offsets [m]; a blocked sector's points go
    li, L = cfg.lidar, LIDAR_INDEX
    for key in ("lidar_points", "lidar_prev_points"):
        mask_key = key.replace("points", "mask")
        r = rows_of("noise", 1)
        if r.any():
            d = torch.randn((B, li.tokens, li.points_per_pillar, 3), generator=gen) * (s * r)[:, None, None, None]
            p = x[key].clone()
            per_m = li.grid / (2.0 * li.range_m)
            p[..., L["x"]] += d[..., 0] / li.range_m
            p[..., L["y"]] += d[..., 1] / li.range_m
            p[..., L["z"]] += d[..., 2] / li.z_max_m
            p[..., L["range"]] = torch.hypot(p[..., L["x"]], p[..., L["y"]])
            p[..., L["dx"]] += d[..., 0] * per_m
            p[..., L["dy"]] += d[..., 1] * per_m
            p[..., L["dz"]] += d[..., 2]
            x[key] = torch.where(r[:, None, None, None], p * x[mask_key][..., None], x[key])
        r = rows_of("partial", 1)
        if r.any():
            angle = torch.remainder(torch.atan2(x[key][..., L["y"]], x[key][..., L["x"]]) - 2 * math.pi * plan.where[:, None, None],
                                    2 * math.pi)
            blocked = r[:, None, None] & (angle < BLOCKED_SECTOR)
            x[mask_key] = x[mask_key] & ~blocked
            x[key] = x[key] * x[mask_key][..., None]
    # IMUs and odometry: the resampled samples change; each chunk's sample spacing and count stay
    imu, odometry = cfg.imu, cfg.odometry
    imu_noise = (imu, (3.0 / imu.accel_scale, 0.3 / imu.gyro_scale))
    noise_of = {"imu": imu_noise, "imu2": imu_noise,
                "odometry": (odometry, (0.3 / odometry.speed_scale, 0.3 / odometry.angular_scale))}
    for name in cfg.streams:
        m, (tokens, (first_noise, second_noise)) = cfg.sensor_names.index(name), noise_of[name]
        values = imu_samples(x[f"{name}_chunks"], tokens)  # (B, chunks, S, 6): three axes of each of two kinds
        values = torch.where(rows_of("zero", m)[:, None, None, None], 0.0, values)
        held = imu_samples(data[f"{name}_chunks"][older], tokens)[:, -1:, -1:]  # the reading it got stuck at, held
        values = torch.where(rows_of("freeze", m)[:, None, None, None], held, values)
        values = torch.where(rows_of("partial", m)[:, None, None, None] & SECOND_KIND, 0.0, values)
        r = rows_of("noise", m)
        if r.any():
            scale = torch.where(SECOND_KIND, second_noise, first_noise)
            values = values + torch.randn(values.shape, generator=gen) * scale * (s * r)[:, None, None, None]
        put_imu_samples(x[f"{name}_chunks"], values * x[f"{name}_mask"][..., None, None], tokens)  # in gather's copy
    # drop (and a zeroed lidar): masked, its previous frame too
    gone = [rows_of("drop", m) | (rows_of("zero", m) & (name == "lidar")) for m, name in enumerate(cfg.sensor_names)]
    if plan.alone is not None:  # every other sensor gone too, where the one left has any tokens after its fault
        gone_all = torch.stack(gone, dim=1)  # (B, S)
        left = torch.stack([x[f"{name}_mask"].flatten(1).any(1) for name in cfg.sensor_names], dim=1) & ~gone_all
        lone = (plan.alone >= 0) & left.gather(1, plan.alone.clamp_min(0)[:, None])[:, 0]
        gone = [g | (lone & (plan.alone != m)) for m, g in enumerate(gone)]
    for name, r in zip(cfg.sensor_names, gone):
        for key in (f"{name}_mask", f"{name}_prev_mask") if name in FRAMED else (f"{name}_mask",):
            x[key] = x[key] & ~(r.view(-1, *[1] * (x[key].dim() - 1)))
    return x


def random_tau(batch: int, prob: float, gen: torch.Generator, sensors: int = 3) -> torch.Tensor:
    """(B, 1 + sensors) τ: all ones, or with `prob` a random global τ in [0.1, 10] and per-sensor τ in
    [0.5, 2] (log-uniform), so the model works across the τ the node may be set to."""
    u = torch.rand(batch, 1 + sensors, generator=gen)
    span = torch.tensor([math.log(10.0)] + [math.log(2.0)] * sensors)
    tau = torch.exp((2.0 * u - 1.0) * span)
    return torch.where((torch.rand(batch, 1, generator=gen) < prob), tau, torch.ones(batch, 1 + sensors))
