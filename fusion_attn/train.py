"""Training (`fusion-attn train`): simulated episodes and users' own bags, the node's data path, one file.

Reads top to bottom:

1. **Data.** Simulated episodes (`fusion_attn.sim.RobotEnv`, no faults) and recordings go through exactly the
   node's path -- frames -> `SensorSync` -> `Tokenizer` -- at `fusion_hz` (bags through
   `replay.recorded_snapshots`, the replay tool's loop). Each episode or bag becomes one cached .npz
   shard of tokenized inputs (keyed by the model config and the data settings), so epochs never touch
   the simulator again. Simulated samples also carry ground truth from the simulator's true state
   (`RobotEnv.ground_truth`): ego velocity, obstacle distance per sector, goal distance and bearing.
2. **Faults as augmentation**, applied to the tokenized batch: the node sees a fault only through the
   tokens, and doing it there costs microseconds instead of re-simulating (see `corrupt`).
3. **Objectives.** Small heads on the fusion latents (`Heads`, kept out of `FusionModel` so the
   exported model's contract never changes). Self-supervised targets that any bag has -- each
   modality's summary (per-patch colour, per-sector nearest lidar range, IMU chunk means) and the next
   IMU window -- always computed from the *clean* sample, so a faulted or hidden sensor has to be
   filled in from the others; plus supervised targets where the simulator gives them.
4. **Loop.** AdamW, warm-up + cosine, fixed seeds, TensorBoard, tqdm; a resumable training state
   (`torch.load(weights_only=True)`: never unpickles code) and safetensors outputs:
   OUT/model.safetensors (loads with `checkpoint.load_checkpoint`) and OUT/model.heads.safetensors.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_safetensors, save_checkpoint
from .config import FusionConfig
from .errors import CheckpointError, ConfigError
from .frames import MODALITIES, NS_PER_S, CameraFrame, Modality
from .model import MLP, FusionModel, SensorEmbedding
from .tokenize import IMAGENET_MEAN, IMAGENET_STD, Tokenizer, tokenize_camera

DATA_VERSION = "1"  # bump when what a shard holds changes: old cache entries are then ignored
SECTORS = 16  # obstacle sectors, for the ground truth and the lidar's self-supervised target
ONES = np.ones(4, np.float32)


def sectors_in_view(hfov_deg: float) -> list[int]:
    """The obstacle sectors (sector 0 centred straight ahead) that lie wholly inside a forward-looking
    horizontal field of view: what a camera can tell about obstacles besides the lidar."""
    width = 360.0 / SECTORS
    if hfov_deg >= 360.0:
        return list(range(SECTORS))
    return [s for s in range(SECTORS) if abs((s * width + 180.0) % 360.0 - 180.0) + width / 2 <= hfov_deg / 2]


@functools.cache
def sim_camera_hfov_deg() -> float:
    """The simulated camera's horizontal field of view (75° for the default 64x64, fovy 75°)."""
    from fusion_attn.sim.sensors import SensorConfig

    sensors = SensorConfig()
    h, w = sensors.camera_size
    return 2 * math.degrees(math.atan(math.tan(math.radians(sensors.camera_fovy_deg) / 2) * w / h))


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    # simulated data: episodes alternate over the tasks; validation episodes use other seeds
    sim_tasks: tuple[str, ...] = ("control", "navigate")
    sim_episodes: int = 48
    val_episodes: int = 8
    sim_seconds: float = 15.0
    fusion_hz: float = 10.0  # samples per second of episode or recording (the node fuses at 20 Hz)
    bags: tuple[str, ...] = ()  # unlabelled recordings: self-supervised objectives only
    bag_fraction: float = 0.2  # share of each batch drawn from the bags (when there are any)
    corrupt_prob: float = 0.6  # chance that a sample gets one faulted sensor
    tau_random_prob: float = 0.5  # chance that a sample gets a random τ instead of all ones (0: fixed τ = 1)
    fusion: str = "attention"  # or the baselines without attention: concat, mean (see PooledFusion)
    avoid_weight: float = 1.0  # weight of the attention-avoidance objective (fault_attention; 0: off)
    log_every: int = 25
    eval_every: int = 500
    save_every: int = 500


# --- 1. data ------------------------------------------------------------------------------------

INPUT_KEYS = ("camera_patches", "camera_mask", "camera_age", "lidar_points", "lidar_mask", "lidar_age",
              "imu_chunks", "imu_mask", "imu_age")
TRUTH_KEYS = ("velocity", "obstacles", "goal")


def encode_sample(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokenizer output -> compact storage. Camera patches go back to the 8-bit pixels they came from
    (exact for 8-bit cameras, 1/255 steps for 16-bit and depth): a quarter of the float32 size, which
    keeps a dataset of thousands of samples in memory. Lidar point features fit float16."""
    out = {k: x[k] for k in INPUT_KEYS if k not in ("camera_patches", "lidar_points")}
    pixels = x["camera_patches"].reshape(*x["camera_patches"].shape[:-1], -1, 3) * IMAGENET_STD + IMAGENET_MEAN
    out["camera_u8"] = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    out["lidar_points"] = x["lidar_points"].astype(np.float16)
    return out


def decode_camera(u8: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, P, 3) uint8 -> (B, N, P*3) normalised patches, zero where masked (as the tokenizer gives)."""
    mean, std = torch.as_tensor(IMAGENET_MEAN, device=u8.device), torch.as_tensor(IMAGENET_STD, device=u8.device)
    patches = (u8.float() / 255.0 - mean) / std
    return patches.flatten(-2) * mask[..., None]


def sim_episode(task: str, seed: int, seconds: float, fusion_hz: float, cfg: FusionConfig) -> dict[str, np.ndarray]:
    """One clean simulated episode, tokenized as the node would see it, with ground truth per sample.

    The robot drives a smooth random policy (each command held 0.4-1.6 s), so the data covers
    turning, driving and stopping near obstacles rather than 50 Hz jitter.
    """
    import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.robot import RobotEnv

    from .sync import SensorSync, SyncConfig

    env = RobotEnv(task, faults=FaultConfig())
    rng = np.random.default_rng(seed)
    tokenizer, sync = Tokenizer(cfg), SensorSync(SyncConfig(imu_window_s=cfg.imu.window_s))
    period_ns = round(NS_PER_S / fusion_hz)
    next_ns = period_ns
    samples, truth, stamps = [], [], []
    try:
        _, info = env.reset(seed=seed)
        action, hold = None, 0
        while True:
            for frame in info["frames"]:
                sync.add(frame)
            t = info["time_ns"]
            if t >= next_ns:  # the node's fusion timer, on simulated time
                next_ns += period_ns
                samples.append(encode_sample(tokenizer(sync.snapshot(t), ONES)))
                truth.append(env.ground_truth(SECTORS))
                stamps.append(t)
            if t >= seconds * NS_PER_S:
                break
            if hold <= 0:
                action = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
                hold = int(rng.integers(20, 80))  # control steps at 50 Hz
            hold -= 1
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
    finally:
        env.close()
    out = _stack(samples)
    out.update({k: np.stack([g[k] for g in truth]).astype(np.float32) for k in TRUTH_KEYS})
    out["labelled"] = np.ones(len(samples), np.bool_)
    out["stamp_ns"] = np.array(stamps, np.int64)
    return out


def bag_sequence(paths: Sequence[str | Path], fusion_hz: float, cfg: FusionConfig) -> dict[str, np.ndarray]:
    """A recording, fused-instant by fused-instant as `fusion-attn replay` would see it; no labels.
    A recording cut short gives what was read before the fault, as replay does."""
    from .replay import ReplayOptions, recorded_inputs

    samples, stamps = [], []
    for stamp, x in recorded_inputs(paths, cfg, ReplayOptions(fusion_rate_hz=fusion_hz, progress=False)):
        samples.append(encode_sample(x))
        stamps.append(stamp)
    if not samples:
        raise ConfigError(f"no sensor data in {', '.join(map(str, paths))}")
    out = _stack(samples)
    n = len(samples)
    out.update({"velocity": np.zeros((n, 2), np.float32), "obstacles": np.zeros((n, SECTORS), np.float32),
                "goal": np.zeros((n, 2), np.float32), "labelled": np.zeros(n, np.bool_),
                "stamp_ns": np.array(stamps, np.int64)})
    return out


def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(cache: Path, key: dict, make) -> dict[str, np.ndarray]:
    """A shard from the cache, or made, written (atomically) and returned."""
    path = cache / f"{key['kind']}-{_digest(key)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = make()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return arrays


@dataclass
class Dataset:
    """Samples of many sequences (episodes, bags) in flat arrays; `seq_start`/`next` link each sample to
    its sequence's first and its successor (-1 at the end), for frozen/delayed faults and the next IMU."""

    arrays: dict[str, np.ndarray]
    source: np.ndarray  # (N,) 0 simulated, 1 bag

    def __len__(self) -> int:
        return len(self.source)

    @classmethod
    def join(cls, parts: list[tuple[dict[str, np.ndarray], int]]) -> Dataset:
        arrays = {k: np.concatenate([p[k] for p, _ in parts]) for k in parts[0][0]}
        starts, nxt, source, offset = [], [], [], 0
        for p, src in parts:
            n = len(p["labelled"])
            starts.append(np.full(n, offset))
            nxt.append(np.r_[np.arange(offset + 1, offset + n), -1])
            source.append(np.full(n, src, np.int8))
            offset += n
        arrays["seq_start"], arrays["next"] = np.concatenate(starts), np.concatenate(nxt)
        return cls(arrays, np.concatenate(source))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.arrays.items()}


def build_datasets(tc: TrainConfig, cfg: FusionConfig, cache: Path, progress: bool = True) -> tuple[Dataset, Dataset | None]:
    """-> (train, validation). Validation: held-out simulated episodes (other seeds), clean; None without."""
    from tqdm import tqdm

    base = {"version": DATA_VERSION, "model": cfg.to_dict(), "hz": tc.fusion_hz}
    jobs = []
    for split, count, first in (("train", tc.sim_episodes, 0), ("val", tc.val_episodes, 100_000)):
        for k in range(count):
            task, seed = tc.sim_tasks[k % len(tc.sim_tasks)], tc.seed * 1_000_000 + first + k
            key = {**base, "kind": f"sim-{task}", "seed": seed, "seconds": tc.sim_seconds}
            jobs.append((split, key, lambda t=task, s=seed: sim_episode(t, s, tc.sim_seconds, tc.fusion_hz, cfg)))
    for bag in tc.bags:
        p = Path(bag)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        stat = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        key = {**base, "kind": "bag", "path": str(p.resolve()), "files": stat}
        jobs.append(("train", key, lambda b=p: bag_sequence([b], tc.fusion_hz, cfg)))
    parts: dict[str, list] = {"train": [], "val": []}
    for split, key, make in tqdm(jobs, desc="dataset", unit="seq", disable=not progress, dynamic_ncols=True):
        parts[split].append((_cached(cache, key, make), int(key["kind"] == "bag")))
    return Dataset.join(parts["train"]), Dataset.join(parts["val"]) if parts["val"] else None


# --- 2. faults as augmentation -----------------------------------------------------------------

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


def _black_camera(cfg: FusionConfig) -> torch.Tensor:
    """The tokens of an all-black image, as the node tokenizes a blacked-out camera."""
    frame = CameraFrame(0, "camera", np.zeros((cfg.camera.height, cfg.camera.width, 3), np.uint8), "rgb8")
    return torch.from_numpy(tokenize_camera(frame, cfg.camera)[0])


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
    # camera
    r = rows_of("zero", 0)
    x["camera_patches"] = torch.where(r[:, None, None], _black_camera(cfg), x["camera_patches"])
    r = rows_of("noise", 0)
    if r.any():
        std = torch.as_tensor(IMAGENET_STD).repeat(cfg.camera.patch ** 2)
        noise = torch.randn(x["camera_patches"].shape, generator=gen) * (60.0 / 255.0) / std
        x["camera_patches"] = x["camera_patches"] + noise * (s * r)[:, None, None] * x["camera_mask"][..., None]
    # lidar: coordinates x/R, y/R, z/z_max, range/R and the in-pillar offsets move with the noise
    r = rows_of("noise", 1)
    if r.any():
        li = cfg.lidar
        d = torch.randn((B, li.tokens, li.points_per_pillar, 3), generator=gen) * (s * r)[:, None, None, None]
        p = x["lidar_points"].clone()
        per_m = li.grid / (2.0 * li.range_m)
        p[..., 0] += d[..., 0] / li.range_m
        p[..., 1] += d[..., 1] / li.range_m
        p[..., 2] += d[..., 2] / li.z_max_m
        p[..., 4] = torch.hypot(p[..., 0], p[..., 1])
        p[..., 5] += d[..., 0] * per_m
        p[..., 6] += d[..., 1] * per_m
        p[..., 7] += d[..., 2]
        x["lidar_points"] = torch.where(r[:, None, None, None], p * x["lidar_mask"][..., None], x["lidar_points"])
    # IMU: per sample accel (3) then gyro (3), S samples per chunk, then dt and count
    S, imu = cfg.imu.samples_per_chunk, cfg.imu
    chunks = x["imu_chunks"]
    values = chunks[..., : S * 6].reshape(B, imu.chunks, S, 6)
    r = rows_of("zero", 2)
    values = torch.where(r[:, None, None, None], 0.0, values)
    r = rows_of("noise", 2)
    if r.any():
        scale = torch.tensor([3.0 / imu.accel_scale] * 3 + [0.3 / imu.gyro_scale] * 3)
        values = values + torch.randn(values.shape, generator=gen) * scale * (s * r)[:, None, None, None]
    values = values * x["imu_mask"][..., None, None]
    x["imu_chunks"] = torch.cat([values.reshape(B, imu.chunks, S * 6), chunks[..., S * 6:]], dim=-1)
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


# --- 3. objectives and heads -------------------------------------------------------------------

NEXT_CHUNKS = 3  # the newest chunks of the next sample's IMU window lie after the current one


def target_sizes(cfg: FusionConfig) -> dict[str, int]:
    """Self-supervised (any sample): camera, lidar, imu, imu_next; supervised (simulated samples only):
    velocity, obstacles, goal (distance, cos and sin of the bearing)."""
    return {"camera": cfg.camera.tokens * 3, "lidar": SECTORS, "imu": cfg.imu.chunks * 6, "imu_next": NEXT_CHUNKS * 6,
            "velocity": 2, "obstacles": SECTORS, "goal": 3}


def _imu_means(chunks: torch.Tensor, cfg: FusionConfig) -> torch.Tensor:
    S = cfg.imu.samples_per_chunk
    return chunks[..., : S * 6].reshape(*chunks.shape[:-1], S, 6).mean(-2)  # (B, chunks, 6)


def targets(data: dict[str, torch.Tensor], idx: torch.Tensor, clean: dict[str, torch.Tensor],
            cfg: FusionConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (value (B, size), valid (B,)), from the clean sample and the simulator's truth."""
    B = len(idx)
    out = {}
    cam = clean["camera_patches"].reshape(B, cfg.camera.tokens, -1, 3).mean(2)  # mean colour per patch
    out["camera"] = (cam.reshape(B, -1), clean["camera_mask"].any(1))
    # nearest lidar return per sector (range / range_m; 1 where the sector has none)
    pts, mask = clean["lidar_points"].flatten(1, 2), clean["lidar_mask"].flatten(1, 2)
    angle = torch.atan2(pts[..., 1], pts[..., 0])
    sector = torch.remainder(torch.round(angle / (2 * math.pi / SECTORS)), SECTORS).long()
    rng = torch.where(mask, pts[..., 4], 1.0)
    lidar = torch.ones(B, SECTORS).scatter_reduce(1, sector, rng, "amin")
    out["lidar"] = (lidar, mask.any(1))
    out["imu"] = (_imu_means(clean["imu_chunks"], cfg).reshape(B, -1), clean["imu_mask"].any(1))
    nxt = data["next"][idx]
    has_next = nxt >= 0
    n = torch.where(has_next, nxt, idx)
    next_means = _imu_means(data["imu_chunks"][n][:, -NEXT_CHUNKS:], cfg).reshape(B, -1)
    out["imu_next"] = (next_means, has_next & data["imu_mask"][n][:, -NEXT_CHUNKS:].all(1))
    labelled = data["labelled"][idx]
    out["velocity"] = (data["velocity"][idx], labelled)
    out["obstacles"] = (data["obstacles"][idx], labelled)
    dist, bearing = data["goal"][idx].unbind(-1)
    goal = torch.stack([dist, bearing.cos(), bearing.sin()], -1)
    has_goal = labelled & goal.isfinite().all(-1)  # a task without a goal gives nan
    out["goal"] = (torch.nan_to_num(goal), has_goal)
    return out


class Heads(nn.Module):
    """Decoders of every target from a fused feature vector (FusionModel: the flattened latents).

    Targets are standardised with the training set's mean and std (kept as buffers), so each
    objective's loss is a mean squared error in units of its own spread and they weigh alike."""

    def __init__(self, in_dim: int, sizes: dict[str, int], hidden: int = 256):
        super().__init__()
        self.sizes = dict(sizes)
        self.trunk = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        self.out = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in sizes.items()})
        for k, n in sizes.items():
            self.register_buffer(f"mean_{k}", torch.zeros(n))
            self.register_buffer(f"std_{k}", torch.ones(n))

    def forward(self, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(feature)
        return {k: layer(h) for k, layer in self.out.items()}

    def normalise(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return (value - getattr(self, f"mean_{name}")) / getattr(self, f"std_{name}")

    def denormalise(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value * getattr(self, f"std_{name}") + getattr(self, f"mean_{name}")


class PooledFusion(nn.Module):
    """Baselines for the robustness evaluation, on the same token embeddings as FusionModel but without
    attention: `concat` -- each modality's masked mean token, concatenated (zeros for a missing one);
    `mean` -- the masked mean of all tokens. An MLP turns that into a feature as wide as the flattened
    latents, so the same heads sit on top."""

    def __init__(self, cfg: FusionConfig, kind: str):
        super().__init__()
        if kind not in ("concat", "mean"):
            raise ConfigError(f"unknown fusion {kind!r}: attention, concat or mean")
        self.kind, d = kind, cfg.model.dim
        self.embed = SensorEmbedding(cfg)
        self.mlp = MLP(3 * d if kind == "concat" else d, 4 * d, cfg.model.fusion_tokens * d)
        self.register_buffer("membership", F.one_hot(self.embed.modality_id, 3).float(), persistent=False)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens, mask = self.embed(x)  # (B, N, D), (B, N)
        if self.kind == "mean":
            w = mask.float().unsqueeze(-1)
            return self.mlp((tokens * w).sum(1) / w.sum(1).clamp_min(1.0))
        w = self.membership * mask.float().unsqueeze(-1)  # (B, N, 3)
        pooled = torch.einsum("bnm,bnd->bmd", w, tokens) / w.sum(1).clamp_min(1.0).unsqueeze(-1)
        return self.mlp(pooled.flatten(1))


def build_model(cfg: FusionConfig, fusion: str) -> nn.Module:
    return FusionModel(cfg) if fusion == "attention" else PooledFusion(cfg, fusion)


def fused_feature(model: nn.Module, x: dict[str, torch.Tensor], tau: torch.Tensor):
    """-> (feature (B, M*D) for the heads, attention (B, 3, H), or None for a baseline without it)."""
    if isinstance(model, PooledFusion):
        return model(x), None
    _, latents, attention, _ = model(**x, tau=tau)
    return latents.flatten(1), attention


def fault_attention(attention: torch.Tensor, plan: FaultPlan) -> torch.Tensor:
    """Attention-avoidance objective: the mean attention mass (B, 3, H) the fusion tokens give a sensor
    whose content is gone (a black image, a zero IMU). The fault is known while training, so this asks
    directly for what the augmentation should teach: look away. A noisy sensor still carries
    information, and a frozen or late one looks valid in one sample: they are left out; so is a lidar
    without points, which is masked and gets no attention anyway."""
    zero = (plan.fault == FAULTS.index("zero")) & (plan.sensor >= 0) & (plan.sensor != Modality.LIDAR)
    weight = zero.float().to(attention.device)
    mass = attention.mean(-1).gather(1, plan.sensor.clamp_min(0).to(attention.device)[:, None])[:, 0]
    return (weight * mass).sum() / weight.sum().clamp_min(1.0)


def losses(heads: Heads, pred: dict[str, torch.Tensor], tgt: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Masked mean squared error per objective on standardised targets (0 where no sample has it)."""
    out = {}
    for k, (value, valid) in tgt.items():
        err = (pred[k] - heads.normalise(k, value)).pow(2).mean(-1)
        out[k] = (err * valid).sum() / valid.sum().clamp_min(1)
    return out


def fit_normalisation(heads: Heads, data: dict[str, torch.Tensor], cfg: FusionConfig, n: int) -> None:
    """Mean and std of every target over the training samples that have it."""
    idx = torch.arange(n)
    tgt = targets(data, idx, gather(data, idx), cfg)
    for k, (value, valid) in tgt.items():
        if valid.sum() < 2:
            continue  # no such target in the data (e.g. only bags: no labels): stays 0 and 1
        v = value[valid]
        std = v.std(0, unbiased=False)
        # a floor at a tenth of the target's typical spread: a (nearly) constant dimension, such as a
        # camera patch that never changes, must not blow its errors up
        getattr(heads, f"mean_{k}").copy_(v.mean(0))
        getattr(heads, f"std_{k}").copy_(std.clamp_min(max(0.1 * float(std.mean()), 1e-6)))


# --- outputs: heads file, training state --------------------------------------------------------

HEADS_FORMAT = "fusion_attn/heads/1"


def heads_path(model_path: str | Path) -> Path:
    """The heads file beside a model checkpoint: model.safetensors -> model.heads.safetensors."""
    p = Path(model_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".heads.safetensors")


def save_heads(heads: Heads, path: str | Path, info: dict | None = None) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    in_dim = heads.trunk[1].in_features
    meta = {"format": HEADS_FORMAT, "sizes": json.dumps(heads.sizes), "in_dim": str(in_dim),
            "hidden": str(heads.trunk[1].out_features), "info": json.dumps(info or {}, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_heads(path: str | Path) -> Heads:
    """The heads saved beside a model (`heads_path`); CheckpointError on anything wrong."""
    meta, tensors = read_safetensors(path, HEADS_FORMAT)
    try:
        heads = Heads(int(meta["in_dim"]), json.loads(meta["sizes"]), int(meta["hidden"]))
        heads.load_state_dict(tensors)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable heads file: {exc}") from exc
    return heads.eval()


STATE_FILE = "train_state.pt"


def _save_state(path: Path, step: int, tc: TrainConfig, model, heads, opt, gen: torch.Generator) -> None:
    state = {"step": step, "train_config": json.dumps(dataclasses.asdict(tc), sort_keys=True),
             "model": model.state_dict(), "heads": heads.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash while saving never leaves half a state behind


def _load_state(path: Path, tc: TrainConfig) -> dict:
    if not path.is_file():
        raise CheckpointError(f"--resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
        step = int(state["step"])
        saved = json.loads(state["train_config"])
    except Exception as exc:  # a damaged file surfaces as any of several errors
        raise CheckpointError(f"--resume: {path} is not a readable training state (corrupt or truncated?): "
                              f"{type(exc).__name__}: {exc}") from exc
    now = dataclasses.asdict(tc)
    diff = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(now)).items()
            if k != "steps" and saved.get(k) != v}
    if diff:
        raise CheckpointError(f"--resume: {path} was trained with other settings (saved, now): {diff}")
    if step > tc.steps:
        raise CheckpointError(f"--resume: {path} is at step {step}, beyond --steps {tc.steps}")
    return state


# --- 4. the loop ---------------------------------------------------------------------------------


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(x: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in x.items()}


def _sampler_weights(train: Dataset, tc: TrainConfig) -> torch.Tensor:
    bag = torch.from_numpy(train.source == 1)
    n_bag = int(bag.sum())
    if n_bag == 0 or n_bag == len(train):
        return torch.ones(len(train))
    return torch.where(bag, tc.bag_fraction / n_bag, (1.0 - tc.bag_fraction) / (len(train) - n_bag))


@torch.no_grad()
def evaluate(model: nn.Module, heads: Heads, val: Dataset, cfg: FusionConfig, tc: TrainConfig,
             device: torch.device, batch: int = 256) -> dict[str, dict[str, float]]:
    """Validation: per condition (clean, then each fault on each sensor), the mean loss per objective,
    the heads' errors in physical units and the attention mass on the faulted sensor."""
    model.eval()
    heads.eval()
    data = val.tensors()
    conditions = [("clean", -1, "drop")] + [(f"{MODALITIES[m]}_{f}", m, f) for m in range(3) for f in FAULTS]
    gen = torch.Generator().manual_seed(tc.seed + 7)  # the same noise in every evaluation
    report = {}
    for name, sensor, fault in conditions:
        running = RunningMeans()
        for start in range(0, len(val), batch):
            idx = torch.arange(start, min(start + batch, len(val)))
            plan = FaultPlan.fixed(len(idx), sensor, fault)
            x = corrupt(data, idx, plan, cfg, tc.fusion_hz, gen)
            tgt = targets(data, idx, gather(data, idx), cfg)
            feature, attention = fused_feature(model, _to(x, device), torch.ones(len(idx), 4, device=device))
            pred = heads(feature)
            metrics = {f"loss_{k}": v for k, v in losses(heads, pred, _to_tgt(tgt, device)).items()}
            metrics.update(physical_errors(heads, pred, _to_tgt(tgt, device)))
            if sensor >= 0 and attention is not None:
                metrics["attention_faulted"] = attention[:, sensor].mean()
            running.add(metrics, len(idx))
        report[name] = running.means()
    model.train()
    heads.train()
    return report


def _to_tgt(tgt, device):
    return {k: (v.to(device), m.to(device)) for k, (v, m) in tgt.items()}


def physical_errors(heads: Heads, pred: dict[str, torch.Tensor], tgt) -> dict[str, torch.Tensor]:
    """Absolute errors of the supervised heads in their units, one per sample each covers (labelled
    samples; the goal's only where a goal exists); obstacle and goal distances also split by whether
    the simulated camera's view holds them. Per sample, so that `RunningMeans` weighs subsets right."""
    valid = tgt["velocity"][1]
    v_pred, v_true = heads.denormalise("velocity", pred["velocity"])[valid], tgt["velocity"][0][valid]
    o_pred, o_true = heads.denormalise("obstacles", pred["obstacles"])[valid], tgt["obstacles"][0][valid]
    has_goal = tgt["goal"][1]
    g_pred, g_true = heads.denormalise("goal", pred["goal"])[has_goal], tgt["goal"][0][has_goal]
    g_bearing = torch.atan2(g_true[:, 2], g_true[:, 1])
    bearing_err = torch.atan2(g_pred[:, 2], g_pred[:, 1]) - g_bearing
    hfov = sim_camera_hfov_deg()
    in_view = sectors_in_view(hfov)  # obstacles the simulated camera sees too, and those only the lidar sees
    out_of_view = [k for k in range(SECTORS) if k not in in_view]
    goal_in_view = torch.rad2deg(g_bearing).abs() <= hfov / 2  # the goal's centre, not its whole patch
    obstacle_err, goal_dist_err = (o_pred - o_true).abs(), (g_pred[:, 0] - g_true[:, 0]).abs()
    return {"speed_mae_mps": (v_pred[:, 0] - v_true[:, 0]).abs(),
            "yaw_rate_mae_radps": (v_pred[:, 1] - v_true[:, 1]).abs(),
            "obstacle_mae_m": obstacle_err.mean(1),
            "obstacle_in_view_mae_m": obstacle_err[:, in_view].mean(1),
            "obstacle_out_of_view_mae_m": obstacle_err[:, out_of_view].mean(1),
            "goal_distance_mae_m": goal_dist_err,
            "goal_distance_in_view_mae_m": goal_dist_err[goal_in_view],
            "goal_distance_out_of_view_mae_m": goal_dist_err[~goal_in_view],
            "goal_in_view_share": goal_in_view.float(),
            "goal_bearing_mae_deg": torch.rad2deg(torch.atan2(bearing_err.sin(), bearing_err.cos()).abs())}


class RunningMeans:
    """Means over a whole evaluation set, fed batch by batch: a scalar is its batch's mean (weighed by
    the batch's size), a vector holds one value per sample it covers (how many varies by batch). A
    metric no sample covered has no mean, rather than a NaN."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in metrics.items():
            n = v.numel() if v.dim() else batch_size
            if n:
                self.sums[k] = self.sums.get(k, 0.0) + (float(v.sum()) if v.dim() else float(v) * batch_size)
                self.counts[k] = self.counts.get(k, 0) + n

    def means(self) -> dict[str, float]:
        return {k: total / self.counts[k] for k, total in self.sums.items()}


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_cache() -> Path:
    return Path(os.environ.get("FUSION_ATTN_CACHE", Path.home() / ".cache" / "fusion_attn")) / "train"


def train(tc: TrainConfig, out: str | Path, resume: bool = False, device: str = "auto", threads: int = 1,
          cache: str | Path | None = None, progress: bool = True, command: str = "",
          stop_after: int | None = None) -> dict:
    """Train, write OUT/{model,model.heads}.safetensors, OUT/tb, OUT/metrics.json; -> the metrics.

    stop_after: save the training state after this step and return (a time-boxed job; `resume` goes on
    exactly as if it had not stopped)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    dev = pick_device(device)
    cfg = FusionConfig()
    state = _load_state(out / STATE_FILE, tc) if resume else None

    t0 = time.perf_counter()
    train_set, val_set = build_datasets(tc, cfg, Path(cache) if cache else default_cache(), progress)
    data_s = time.perf_counter() - t0

    torch.manual_seed(tc.seed)  # initial weights
    model = build_model(cfg, tc.fusion).to(dev).train()
    heads = Heads(cfg.model.fusion_tokens * cfg.model.dim, target_sizes(cfg)).to(dev).train()
    data = train_set.tensors()
    fit_normalisation(heads, data, cfg, len(train_set))
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)  # batches, faults, τ: the whole data stream
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
    weights = _sampler_weights(train_set, tc)

    writer = SummaryWriter(str(out / "tb"), purge_step=step if step else None)
    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    first_losses, recent = None, {}
    t_train = time.perf_counter()
    stop = min(tc.steps, stop_after) if stop_after is not None else tc.steps
    while step < stop:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        idx = torch.multinomial(weights, tc.batch, replacement=True, generator=gen)
        plan = FaultPlan.draw(tc.batch, tc.corrupt_prob, gen)
        x = corrupt(data, idx, plan, cfg, tc.fusion_hz, gen)
        tau = random_tau(tc.batch, tc.tau_random_prob, gen)
        tgt = _to_tgt(targets(data, idx, gather(data, idx), cfg), dev)
        feature, attention = fused_feature(model, _to(x, dev), tau.to(dev))
        parts = losses(heads, heads(feature), tgt)
        if attention is not None and tc.avoid_weight > 0:
            parts["avoid"] = tc.avoid_weight * fault_attention(attention, plan)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        values = {k: v.item() for k, v in parts.items()} | {"total": loss.item()}
        first_losses = first_losses or values
        recent = {k: 0.9 * recent.get(k, v) + 0.1 * v for k, v in values.items()}
        if step % tc.log_every == 0 or step == tc.steps:
            for k, v in values.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/lr", lr_at(step - 1, tc), step)
            bar.set_postfix(loss=f"{recent['total']:.3f}")
        if val_set is not None and step % tc.eval_every == 0 and step < tc.steps:
            _log_eval(writer, evaluate(model, heads, val_set, cfg, tc, dev), step)
        if step % tc.save_every == 0 or step == stop:
            _save_state(out / STATE_FILE, step, tc, model, heads, opt, gen)
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t_train

    report = evaluate(model, heads, val_set, cfg, tc, dev) if val_set is not None else {}
    _log_eval(writer, report, step)
    writer.close()
    metrics = {
        "command": command, "seed": tc.seed, "git_commit": git_commit(), "torch": torch.__version__,
        "device": str(dev), "threads": threads, "steps": step, "resumed_from": int(state["step"]) if state else 0,
        "train_config": dataclasses.asdict(tc),
        "data": {"train_samples": len(train_set), "train_bag_samples": int((train_set.source == 1).sum()),
                 "val_samples": len(val_set) if val_set is not None else 0, "dataset_s": round(data_s, 1)},
        "train_s": round(train_s, 1),
        "first_step_losses": {k: round(v, 4) for k, v in first_losses.items()} if first_losses else {},
        "final_train_losses_ema": {k: round(v, 4) for k, v in recent.items()},
        "val": {cond: {k: round(v, 4) for k, v in m.items()} for cond, m in report.items()},
    }
    info = {k: metrics[k] for k in ("command", "seed", "git_commit", "steps", "data", "train_s")}
    info["val_clean"] = metrics["val"].get("clean", {})
    if isinstance(model, FusionModel):  # a baseline's weights stay in the training state only
        save_checkpoint(model.cpu(), out / "model.safetensors", info=info)
    save_heads(heads.cpu(), heads_path(out / "model.safetensors"), info={"command": command, "seed": tc.seed})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _log_eval(writer, report: dict[str, dict[str, float]], step: int) -> None:
    for cond, m in report.items():
        for k, v in m.items():
            writer.add_scalar(f"val_{cond}/{k}", v, step)
