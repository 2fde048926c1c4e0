"""Host-side tokenizers: sensor frames -> fixed-size float32 arrays and masks (numpy only).

Every modality has a fixed token budget, so the model sees static shapes (TensorRT needs them);
absent data is masked, never dropped from the tensor. Each token also carries its age: fusion time
minus the sensor time of the data in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .config import CameraTokens, ChunkTokens, FusionConfig, ImuTokens, LidarTokens, OdometryTokens
from .frames import NS_PER_S, CameraFrame, ImuWindow, LidarFrame, OdometryWindow

# ImageNet statistics: the usual normalisation for ViT-style patch embeddings.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# What each lidar point of a pillar carries, in order: its coordinates (x, y over range_m, z over
# z_max_m), log intensity, planar range (over range_m), its offset from the pillar (dx, dy in cells
# from the cell's centre, dz in metres from the points' mean height) and the pillar's log point count.
LIDAR_FEATURES = ("x", "y", "z", "log_intensity", "range", "dx", "dy", "dz", "log_count")
LIDAR_INDEX = {name: i for i, name in enumerate(LIDAR_FEATURES)}  # feature name -> index
LOG_INTENSITY_SCALE = np.log(256.0)  # log_intensity = log1p(intensity) / this: 0..255 and 0..1 intensities alike

# What each resampled IMU sample carries (accel in g, gyro in half turns per second); a chunk is
# samples_per_chunk such samples, then its mean sample spacing (IMU_DT) and sample count (IMU_COUNT).
IMU_AXES = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
IMU_DT, IMU_COUNT = -2, -1
# Odometry's chunks have the IMU's layout: its speed (m/s over speed_scale) where the accel is, its turn rate
# (rad/s over angular_scale) where the gyro is
ODOMETRY_AXES = ("linear_x", "linear_y", "linear_z", "angular_x", "angular_y", "angular_z")


def normalise_pixels(rgb):
    """RGB in [0, 1] (..., 3) -> ImageNet-normalised, as the camera tokens hold them (numpy or torch)."""
    mean, std = _imagenet_like(rgb)
    return (rgb - mean) / std


def denormalise_pixels(normalised):
    """ImageNet-normalised (..., 3) -> RGB in [0, 1]: the inverse of `normalise_pixels`."""
    mean, std = _imagenet_like(normalised)
    return normalised * std + mean


def _imagenet_like(x):
    if isinstance(x, np.ndarray):
        return IMAGENET_MEAN, IMAGENET_STD
    return x.new_tensor(IMAGENET_MEAN), x.new_tensor(IMAGENET_STD)  # a torch tensor: its dtype and device


def imu_samples(chunks, cfg: ChunkTokens):
    """IMU chunks (..., S*6+2) -> their resampled samples (..., S, 6), per `IMU_AXES` (numpy or torch)."""
    S, axes = cfg.samples_per_chunk, len(IMU_AXES)
    return chunks[..., : S * axes].reshape(*chunks.shape[:-1], S, axes)


def put_imu_samples(chunks, samples, cfg: ChunkTokens) -> None:
    """Write samples (..., S, 6) into IMU chunks (..., S*6+2), in place: the inverse of `imu_samples`."""
    chunks[..., : cfg.samples_per_chunk * len(IMU_AXES)] = samples.reshape(*samples.shape[:-2], -1)


def input_spec(cfg: FusionConfig) -> dict[str, tuple[tuple[int, ...], type]]:
    """Name -> (shape without the batch dimension, dtype) of every model input, in model order."""
    c, li, i, o = cfg.camera, cfg.lidar, cfg.imu, cfg.odometry
    odometry = {"odometry_chunks": ((o.tokens, o.features), np.float32), "odometry_mask": ((o.tokens,), np.bool_),
                "odometry_age": ((o.tokens,), np.float32)} if cfg.model.odometry else {}
    imu2 = {"imu2_chunks": ((i.tokens, i.features), np.float32), "imu2_mask": ((i.tokens,), np.bool_),
            "imu2_age": ((i.tokens,), np.float32)} if cfg.model.second_imu else {}
    return {
        "camera_patches": ((c.tokens, c.features), np.float32),
        "camera_mask": ((c.tokens,), np.bool_),
        "camera_age": ((c.tokens,), np.float32),
        # the sensor's previous frame, tokenized alike (masked when there is none): temporal evidence
        "camera_prev_patches": ((c.tokens, c.features), np.float32),
        "camera_prev_mask": ((c.tokens,), np.bool_),
        "camera_prev_age": ((c.tokens,), np.float32),
        "lidar_points": ((li.tokens, li.points_per_pillar, li.features), np.float32),
        "lidar_mask": ((li.tokens, li.points_per_pillar), np.bool_),  # per point; a pillar is valid if any is
        "lidar_age": ((li.tokens,), np.float32),
        "lidar_prev_points": ((li.tokens, li.points_per_pillar, li.features), np.float32),
        "lidar_prev_mask": ((li.tokens, li.points_per_pillar), np.bool_),
        "lidar_prev_age": ((li.tokens,), np.float32),
        "imu_chunks": ((i.tokens, i.features), np.float32),
        "imu_mask": ((i.tokens,), np.bool_),
        "imu_age": ((i.tokens,), np.float32),
        "tau": ((1 + len(cfg.sensors),), np.float32),  # global, then per sensor (camera, lidar, imu[, odometry][, imu2])
        **odometry,  # after τ: a model without odometry keeps the inputs, in order, it always had
        **imu2,  # a second IMU's, tokenized as the first's
    }


def output_spec(cfg: FusionConfig) -> dict[str, tuple[tuple[int, ...], type]]:
    """Name -> (shape without the batch dimension, dtype) of every model output (see model.FusionModel):
    ego_rate (speed [m/s], yaw rate [rad/s]) only from a model with model.rate_output."""
    m, n = cfg.model, len(cfg.sensors)
    spec = {"fused": ((m.dim,), np.float32), "latents": ((m.fusion_tokens, m.dim), np.float32),
            "attention": ((n, m.heads), np.float32), "all_masked": ((), np.bool_), "trust": ((n,), np.float32)}
    if m.rate_output:
        spec["ego_rate"] = ((2,), np.float32)
    return spec


def output_names(cfg: FusionConfig) -> tuple[str, ...]:
    return tuple(output_spec(cfg))


def tokenize_camera(frame: CameraFrame, cfg: CameraTokens) -> tuple[np.ndarray, np.ndarray]:
    """-> patches (tokens, patch*patch*3) float32, normalised; mask (tokens,) all True."""
    img = frame.image
    if frame.is_depth:
        depth = img[..., 0].astype(np.float32) * (1e-3 if frame.encoding == "16UC1" else 1.0)
        depth = np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
        small = cv2.resize(depth, (cfg.width, cfg.height), interpolation=cv2.INTER_NEAREST)
        rgb = normalise_pixels(np.repeat(np.clip(small / cfg.max_depth_m, 0.0, 1.0)[..., None], 3, axis=2))
    else:
        # INTER_AREA on the raw integers first: resizing 8 bits is far cheaper than float.
        small = cv2.resize(img, (cfg.width, cfg.height), interpolation=cv2.INTER_AREA)
        scale = np.float32(1.0 / (65535.0 if small.dtype == np.uint16 else 255.0))
        # normalise_pixels(small * scale) in two passes; a mono image broadcasts to three channels
        rgb = small.reshape(cfg.height, cfg.width, -1) * (scale / IMAGENET_STD) - IMAGENET_MEAN / IMAGENET_STD
    p = cfg.patch
    patches = rgb.reshape(cfg.height // p, p, cfg.width // p, p, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(patches.reshape(cfg.tokens, cfg.features)), np.ones(cfg.tokens, np.bool_)


def tokenize_lidar(frame: LidarFrame, cfg: LidarTokens) -> tuple[np.ndarray, np.ndarray]:
    """-> points (pillars, points_per_pillar, features) float32, per `LIDAR_FEATURES`, and point mask
    (pillars, points_per_pillar).

    Bird's-eye-view pillars: points within range are binned on a grid; the `pillars` most populated
    cells (ties: the lower cell) become tokens, each with up to `points_per_pillar` points spread
    evenly over the cell's points (deterministic, no RNG). The model runs a small PointNet over them.
    """
    K, P = cfg.pillars, cfg.points_per_pillar
    out = np.zeros((K, P, cfg.features), np.float32)
    mask = np.zeros((K, P), np.bool_)
    pts = frame.points
    if len(pts) == 0:
        return out, mask
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    per_m = cfg.grid / (2.0 * cfg.range_m)
    # In place, one pass each: this is the per-point part of the node's costliest stage. The range is
    # tested on the floats, where a NaN compares False (cast to an integer, a NaN is INT_MIN on x86 but
    # 0 on ARM); inside it the cast truncates, which is the floor there.
    fx = x + cfg.range_m
    fx *= per_m
    fy = y + cfg.range_m
    fy *= per_m
    keep = fx >= 0
    keep &= fx < cfg.grid
    keep &= fy >= 0
    keep &= fy < cfg.grid
    keep &= z >= cfg.z_min_m
    keep &= z <= cfg.z_max_m
    with np.errstate(invalid="ignore"):  # NaN, infinite or huge: any integer, the point is dumped
        ix, iy = fx.astype(np.int32), fy.astype(np.int32)
    # Out-of-range points go to one extra "dump" cell instead of being copied out: boolean
    # indexing of a 120k cloud costs more than the whole rest of this function.
    dump = cfg.grid * cfg.grid
    ix *= cfg.grid
    ix += iy
    cell = np.where(keep, ix, dump)
    counts = np.bincount(cell, minlength=dump + 1)
    counts[dump] = 0
    n_cells = min(K, int(np.count_nonzero(counts)))
    if n_cells == 0:
        return out, mask
    # the most populated cells, ties to the lower cell: a unique key per cell, so that no tie is left to
    # the partition's internals and step.lidar_tokens (top-k on the GPU) picks the same cells
    key = counts * (dump + 1) + np.arange(dump - 1, -2, -1)  # the dump cell (count 0) ranks last
    top = np.sort(np.argpartition(-key, n_cells - 1)[:n_cells])  # in cell order
    # Group only the chosen cells' points (a few % of a sweep), by cell and then by index: a stable
    # sort of those alone, not of the whole cloud.
    chosen = np.zeros(dump + 1, np.bool_)
    chosen[top] = True
    members = np.flatnonzero(chosen.take(cell))
    order = members[np.argsort(cell[members], kind="stable")]
    cnt = counts[top][:, None]
    starts = np.cumsum(cnt)[:, None] - cnt  # (n_cells, 1): each chosen cell's first entry in `order`
    k = np.arange(P)[None, :]
    pick = np.where(cnt >= P, (k * cnt) // P, np.minimum(k, cnt - 1))
    group = pts[order[starts + pick]]  # (n_cells, P, 4)
    valid = k < cnt

    centre_x = (top // cfg.grid + 0.5) / per_m - cfg.range_m
    centre_y = (top % cfg.grid + 0.5) / per_m - cfg.range_m
    gx, gy, gz, gi = group[..., 0], group[..., 1], group[..., 2], group[..., 3]
    mean_z = (gz * valid).sum(1, keepdims=True) / np.maximum(valid.sum(1, keepdims=True), 1)
    features = {
        "x": gx / cfg.range_m,
        "y": gy / cfg.range_m,
        "z": gz / cfg.z_max_m,
        "log_intensity": np.log1p(np.maximum(gi, 0.0)) / LOG_INTENSITY_SCALE,
        "range": np.hypot(gx, gy) / cfg.range_m,
        "dx": (gx - centre_x[:, None].astype(np.float32)) * per_m,
        "dy": (gy - centre_y[:, None].astype(np.float32)) * per_m,
        "dz": gz - mean_z,
        "log_count": np.log1p(cnt) / np.log1p(float(len(frame.points))),
    }
    f = out[:n_cells]
    for name, i in LIDAR_INDEX.items():
        f[..., i] = features[name]
    f *= valid[..., None]
    mask[:n_cells] = valid
    return out, mask


def tokenize_imu(window: ImuWindow, cfg: ImuTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> chunks (chunks, S*6+2), mask (chunks,), end offset of each chunk before the newest sample [s].

    The last window_s seconds are resampled uniformly (linear interpolation) so that the tokens do not
    depend on the IMU rate; each chunk also carries its real mean sample spacing and sample count.
    """
    scale = np.repeat([cfg.accel_scale, cfg.gyro_scale], 3)
    values = np.concatenate([window.accel, window.gyro], axis=1) / scale if len(window) else np.zeros((0, 6))
    return _chunked(window.stamps_ns, values, cfg)


def tokenize_odometry(window: OdometryWindow, cfg: OdometryTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Odometry twists as `tokenize_imu` makes IMU chunks, per `ODOMETRY_AXES`."""
    scale = np.repeat([cfg.speed_scale, cfg.angular_scale], 3)
    values = np.concatenate([window.linear, window.angular], axis=1) / scale if len(window) else np.zeros((0, 6))
    return _chunked(window.stamps_ns, values, cfg)


def _chunked(stamps_ns: np.ndarray, values: np.ndarray, cfg: ChunkTokens):
    """(T,) stamps, (T, 6) scaled values -> chunks, mask, end offsets, as `tokenize_imu` describes."""
    n, S = cfg.chunks, cfg.samples_per_chunk
    chunk_s = cfg.window_s / n
    chunk_end = -cfg.window_s + chunk_s * np.arange(1, n + 1)  # relative to the newest sample, <= 0
    out = np.zeros((n, cfg.features), np.float32)
    if len(stamps_ns) == 0:
        return out, np.zeros(n, np.bool_), -chunk_end
    t = (stamps_ns - stamps_ns[-1]) / NS_PER_S
    grid = (chunk_end[:, None] - chunk_s + chunk_s * (np.arange(S) + 0.5) / S).ravel()
    samples = np.stack([np.interp(grid, t, values[:, a]) for a in range(values.shape[1])], axis=1)
    put_imu_samples(out, samples.reshape(n, S, len(IMU_AXES)), cfg)
    chunk_of = np.clip(np.floor((t + cfg.window_s) / chunk_s), -1, n - 1).astype(np.int64)
    inside = chunk_of >= 0
    count = np.bincount(chunk_of[inside], minlength=n)
    gaps = np.diff(t, prepend=t[0])
    dt_sum = np.bincount(chunk_of[inside], weights=gaps[inside], minlength=n)
    out[:, IMU_DT] = dt_sum / np.maximum(count, 1) / cfg.nominal_dt_s
    out[:, IMU_COUNT] = count / S
    mask = chunk_end >= t[0]  # a chunk entirely before the first sample would be pure extrapolation
    out *= mask[:, None]
    return out, mask, -chunk_end


@dataclass(frozen=True)
class SensorSnapshot:
    """What the sync hands to the tokenizers: the data to fuse at one instant (None = absent/stale)."""

    stamp_ns: int
    camera: CameraFrame | None = None
    lidar: LidarFrame | None = None
    imu: ImuWindow | None = None
    camera_prev: CameraFrame | None = None  # the frame fused before `camera` (None: none, or not consecutive)
    lidar_prev: LidarFrame | None = None
    odometry: OdometryWindow | None = None
    imu2: ImuWindow | None = None  # a second IMU's window (Modality.IMU2)


class FrameTokens:
    """Tokens of camera and lidar frames by `tokenize(frame)`, computed once per frame object: a frame is
    fused several times while it stays the newest (only its age input changes), then once more as the
    previous frame of the next one it is fused with. Per frame type, the last fusion's two frames and
    the newest frame tokenized are kept, so a node can tokenize each frame as it arrives (`prepare`),
    off the fusion's critical path, however many arrive between two fusions. The host Tokenizer keeps
    numpy tokens here, the CUDA-graph backend GPU tensors."""

    def __init__(self, tokenize: Callable[[CameraFrame | LidarFrame], Any]):
        self.tokenize = tokenize
        # per frame type: (frame, tokens) of the last fusion's newest ("fused") and previous ("previous")
        # frame, and of the last one prepared ("arrived")
        self._kept: dict[type, dict[str, tuple[object, Any] | None]] = {}

    def prepare(self, frame: CameraFrame | LidarFrame) -> Any:
        """A frame's tokens, kept as the newest arrived."""
        self._kept.setdefault(type(frame), {})["arrived"] = entry = self._entry(frame)
        return entry[1]

    def pair(self, frame: CameraFrame | LidarFrame, prev: CameraFrame | LidarFrame | None) -> tuple[Any, Any]:
        """The tokens of a fusion's newest frame and of its previous one (None without one), kept as
        the last fusion's."""
        kept = self._kept.setdefault(type(frame), {})
        kept["previous"] = previous = self._entry(prev) if prev is not None else None
        kept["fused"] = newest = self._entry(frame)
        return newest[1], None if previous is None else previous[1]

    def _entry(self, frame: CameraFrame | LidarFrame) -> tuple[object, Any]:
        cached = next((e for e in self._kept.get(type(frame), {}).values() if e is not None and e[0] is frame), None)
        return cached if cached is not None else (frame, self.tokenize(frame))


class Tokenizer:
    """Snapshot -> the model's named input arrays (unbatched), per `input_spec`; camera and lidar tokens
    once per frame (FrameTokens)."""

    def __init__(self, cfg: FusionConfig):
        self.cfg = cfg
        self.spec = input_spec(cfg)
        self.frames = FrameTokens(lambda f: tokenize_camera(f, cfg.camera) if isinstance(f, CameraFrame)
                                  else tokenize_lidar(f, cfg.lidar))

    def prepare(self, frame: CameraFrame | LidarFrame) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of a camera or lidar frame, computed once per frame object (FrameTokens)."""
        return self.frames.prepare(frame)

    def empty(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.spec.items()}

    def __call__(self, snap: SensorSnapshot, tau: np.ndarray) -> dict[str, np.ndarray]:
        x = self.empty()
        x["tau"][:] = tau
        for name, frame, prev in (("camera", snap.camera, snap.camera_prev), ("lidar", snap.lidar, snap.lidar_prev)):
            if frame is None:  # a previous frame alone is no evidence
                continue
            content = "patches" if name == "camera" else "points"
            for prefix, f, tokens in zip((name, f"{name}_prev"), (frame, prev), self.frames.pair(frame, prev)):
                if tokens is not None:
                    x[f"{prefix}_{content}"], x[f"{prefix}_mask"] = tokens
                    x[f"{prefix}_age"][:] = (snap.stamp_ns - f.stamp_ns) / NS_PER_S
        streams = (("imu", snap.imu, tokenize_imu, self.cfg.imu), ("odometry", snap.odometry, tokenize_odometry, self.cfg.odometry),
                   ("imu2", snap.imu2, tokenize_imu, self.cfg.imu))
        for name, window, tokenize, cfg in streams:
            if f"{name}_chunks" in x and window is not None and len(window):
                x[f"{name}_chunks"], x[f"{name}_mask"], before_newest = tokenize(window, cfg)
                x[f"{name}_age"][:] = (snap.stamp_ns - int(window.stamps_ns[-1])) / NS_PER_S + before_newest
        return x
