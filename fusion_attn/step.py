"""The whole fusion step as one PyTorch module: adapted sensor arrays in, fused state out.

`tokenize.py` makes the model's tokens on the host with numpy; this module makes the same tokens with
tensor operations, so that on a GPU the tokenizers run beside the model (exported as one ONNX graph
for one TensorRT engine, or captured in CUDA graphs: a graph per frame tokenizer and one for the
fusion, backends/cuda_graph_backend.py), and many snapshots tokenize in one batch.

    inputs = step_inputs([snap], taus, cfg)                      # host: pad and stack the frames' arrays
    step = FusionStep(model, *camera_key(snap, cfg)[:2])         # one per camera resolution and encoding
    outputs = step(**{k: torch.from_numpy(v) for k, v in inputs.items()})   # device: tokenize, fuse

Parity with tokenize.py (tests/test_step.py, on the real recordings): the same points, pixels and IMU
samples go to the same tokens. The values differ by float rounding only: at most one grey level per
resized pixel (cv2 resizes in fixed point, this module in float), about 1e-5 on lidar and IMU features
(float32 here, float64 in parts of numpy). Static shapes: a cloud is padded to a point bucket and an
IMU window to a sample bucket, with a count of the valid ones; an image keeps its size (a graph per
camera resolution).

Shapes: B batch, H x W x C image, N points (padded), T IMU samples (padded), K pillars, P points per
pillar, G grid cells per side, n IMU chunks of S samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import CameraTokens, FusionConfig, ImuTokens, LidarTokens
from .errors import ConfigError
from .frames import NS_PER_S, ImuWindow
from .model import FusionModel
from .tokenize import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LIDAR_INDEX,
    LOG_INTENSITY_SCALE,
    SensorSnapshot,
    output_names,
)

# Default padding sizes: a cloud or IMU window takes the smallest bucket that holds it (one graph each).
POINT_BUCKETS = tuple(2**k for k in range(10, 19))  # 1,024 .. 262,144 points
IMU_BUCKETS = (32, 64, 128, 256, 512, 1024)


# -- camera ------------------------------------------------------------------------------------------

def resize_matrix(size_in: int, size_out: int, area: bool) -> np.ndarray:
    """(size_out, size_in) weights of cv2.resize(INTER_AREA) along one axis. `area`: each output pixel
    the overlap-weighted mean of the input pixels it covers; cv2 does that only when no axis is
    enlarged, else it interpolates linearly between two source pixels (its "area mode" positions)."""
    m = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    for o in range(size_out):
        if area:
            lo, hi = o * scale, min((o + 1) * scale, size_in)
            for i in range(int(np.floor(lo)), int(np.ceil(hi))):
                m[o, i] = min(hi, i + 1) - max(lo, i)
            m[o] /= m[o].sum()
        else:  # cv2's INTER_AREA with an axis enlarged: linear, between source pixels placed by area
            i0 = int(np.floor(o * scale))
            frac = (o + 1) - (i0 + 1) / scale
            frac = 0.0 if frac <= 0 else frac - np.floor(frac)
            if i0 >= size_in - 1:
                i0, frac = size_in - 1, 0.0
            m[o, i0] += 1 - frac
            m[o, min(i0 + 1, size_in - 1)] += frac
    return m.astype(np.float32)


def nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """cv2's INTER_NEAREST source index of each output pixel along one axis."""
    return np.minimum(np.floor(np.arange(size_out) * (size_in / size_out)).astype(np.int64), size_in - 1)


class CameraTokenizer(nn.Module):
    """(B, H, W, C) images of one encoding and size -> (B, tokens, patch*patch*3) patches, as
    tokenize.tokenize_camera makes them."""

    def __init__(self, cfg: CameraTokens, height: int, width: int, encoding: str):
        super().__init__()
        self.cfg, self.encoding = cfg, encoding
        self.depth = encoding in ("16UC1", "32FC1")
        if self.depth:
            self.register_buffer("rows", torch.from_numpy(nearest_index(height, cfg.height)), persistent=False)
            self.register_buffer("cols", torch.from_numpy(nearest_index(width, cfg.width)), persistent=False)
        else:
            area = height >= cfg.height and width >= cfg.width
            self.register_buffer("rows", torch.from_numpy(resize_matrix(height, cfg.height, area)), persistent=False)
            self.register_buffer("cols", torch.from_numpy(resize_matrix(width, cfg.width, area).T.copy()), persistent=False)
        # tokenize.normalise_pixels' statistics as buffers: it builds them per call from the host, a copy
        # that a CUDA graph capture refuses
        self.register_buffer("mean", torch.from_numpy(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", torch.from_numpy(IMAGENET_STD), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        cfg, B = self.cfg, image.shape[0]
        if self.depth:
            small = image.index_select(1, self.rows).index_select(2, self.cols)[..., 0].float()  # (B, h, w)
            if self.encoding == "16UC1":
                small = small * 1e-3  # millimetres
            small = torch.where(small.isfinite(), small, 0.0)
            rgb = (small / cfg.max_depth_m).clamp(0.0, 1.0).unsqueeze(-1).expand(B, cfg.height, cfg.width, 3)
        else:
            x = image.float().permute(0, 3, 1, 2)  # (B, C, H, W)
            small = torch.round(self.rows @ x @ self.cols)  # (B, C, h, w): integers, as cv2 returns them
            rgb = small.permute(0, 2, 3, 1) * (1.0 / (65535.0 if self.encoding == "mono16" else 255.0))
            rgb = rgb.expand(B, cfg.height, cfg.width, 3)  # a mono image broadcasts to three channels
        rgb = (rgb - self.mean) / self.std
        p = cfg.patch
        patches = rgb.reshape(B, cfg.height // p, p, cfg.width // p, p, 3).permute(0, 1, 3, 2, 4, 5)
        return patches.reshape(B, cfg.tokens, cfg.features)


# -- lidar -------------------------------------------------------------------------------------------

def lidar_tokens(points: torch.Tensor, count: torch.Tensor, cfg: LidarTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """points (B, N, 4) padded, count (B,) valid points -> (B, K, P, F) features, (B, K, P) mask, as
    tokenize.tokenize_lidar: the K most populated cells (ties: the lower cell), in cell order, each with
    P points spread evenly over its points in cloud order."""
    B, N, _ = points.shape
    G, K, P = cfg.grid, cfg.pillars, cfg.points_per_pillar
    cells = G * G  # index `cells` is the dump for points out of range or padding
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    per_m = G / (2.0 * cfg.range_m)
    fx, fy = (x + cfg.range_m) * per_m, (y + cfg.range_m) * per_m
    keep = (torch.arange(N, device=points.device) < count.unsqueeze(1)) & (fx >= 0) & (fx < G) & (fy >= 0) & (fy < G)
    keep = keep & (z >= cfg.z_min_m) & (z <= cfg.z_max_m)  # comparisons are False for NaN
    cell = fx.clamp(0, G - 1).floor().long() * G + fy.clamp(0, G - 1).floor().long()
    cell = torch.where(keep, cell, cells)  # (B, N)
    counts = torch.zeros(B, cells + 1, dtype=torch.long, device=points.device).scatter_add(1, cell, torch.ones_like(cell))
    counts = counts[:, :cells]  # (B, G²)
    ids = torch.arange(cells, device=points.device)
    top = (counts * (cells + 1) + (cells - 1 - ids)).topk(K, dim=1).indices  # unique keys: no tie is left open
    top_count = counts.gather(1, top)
    # token order: occupied cells by index, then the empty ones (a cloud with fewer than K cells)
    top = top.gather(1, torch.where(top_count > 0, top, top + cells).argsort(dim=1))
    top_count = counts.gather(1, top)  # (B, K)
    slot_of_cell = torch.full((B, cells + 1), K, dtype=torch.long, device=points.device)
    slot_ids = torch.arange(K, device=points.device).expand(B, K)
    slot_of_cell = slot_of_cell.scatter(1, top, torch.where(top_count > 0, slot_ids, K))
    slot = slot_of_cell.gather(1, cell)  # (B, N): the point's pillar, or K
    # each point's rank among its pillar's points in cloud order: an exclusive running count per slot
    rank = _rank_in_slot(slot, K + 1)
    cnt = top_count.gather(1, slot.clamp(max=K - 1))  # (B, N)
    # tokenize_lidar keeps point floor(k * cnt / P) for k < P (cnt >= P), else the first cnt points
    k = torch.where(cnt >= P, (rank * P + cnt - 1) // cnt.clamp_min(1), rank)
    chosen = (slot < K) & (k < P) & ((cnt < P) | ((k * cnt) // P == rank))
    target = torch.where(chosen, slot * P + k, K * P)  # (B, N); K*P: not kept
    src = torch.arange(N, device=points.device).expand(B, N)
    index = torch.zeros(B, K * P + 1, dtype=torch.long, device=points.device).scatter(1, target, src)[:, : K * P]
    valid = torch.arange(P, device=points.device) < top_count.unsqueeze(-1)  # (B, K, P)
    group = points.gather(1, index.unsqueeze(-1).expand(B, K * P, 4)).view(B, K, P, 4)
    group = torch.where(valid.unsqueeze(-1), group, 0.0)  # an unset entry points at any point, NaN too

    centre_x = ((top // G).float() + 0.5) / per_m - cfg.range_m  # (B, K)
    centre_y = ((top % G).float() + 0.5) / per_m - cfg.range_m
    gx, gy, gz, gi = group.unbind(-1)
    v = valid.float()
    mean_z = (gz * v).sum(2, keepdim=True) / v.sum(2, keepdim=True).clamp_min(1)
    total = count.float().view(B, 1, 1)
    features = {
        "x": gx / cfg.range_m,
        "y": gy / cfg.range_m,
        "z": gz / cfg.z_max_m,
        "log_intensity": torch.log1p(gi.clamp_min(0.0)) / float(LOG_INTENSITY_SCALE),
        "range": torch.sqrt(gx * gx + gy * gy) / cfg.range_m,
        "dx": (gx - centre_x.unsqueeze(-1)) * per_m,
        "dy": (gy - centre_y.unsqueeze(-1)) * per_m,
        "dz": gz - mean_z,
        "log_count": (torch.log1p(top_count.float()) / torch.log1p(total.squeeze(-1)).clamp_min(1e-6)  # 0 / 0: no cloud
                      ).unsqueeze(-1).expand(B, K, P),
    }
    out = torch.stack([features[name] for name in LIDAR_INDEX], dim=-1) * v.unsqueeze(-1)
    return out, valid


SCAN_BLOCK = 1024  # points per block of the rank scan; every point bucket is a multiple of it


def _rank_in_slot(slot: torch.Tensor, slots: int) -> torch.Tensor:
    """slot (B, N) in [0, slots) -> (B, N) how many earlier points share each point's slot. A running
    count per slot, (B, slots, N), scanned along its last axis in two levels: within blocks of
    SCAN_BLOCK points (many short rows: a GPU scans them in parallel, where one scan of 65 rows of
    N points ran 0.25 ms on an H200), then over the blocks' totals. float32 as TensorRT's CumSum
    takes it: the counts are exact below 2^24 points."""
    B, N = slot.shape
    pad = (SCAN_BLOCK - N % SCAN_BLOCK) % SCAN_BLOCK  # >= 0 whichever sign convention an exported Mod takes
    slot = torch.nn.functional.pad(slot, (0, pad), value=slots)  # padding in no slot
    onehot = (slot.unsqueeze(1) == torch.arange(slots, device=slot.device).view(1, -1, 1)).float()
    blocks = onehot.view(B, slots, -1, SCAN_BLOCK)  # (B, slots, N/block, block)
    within = blocks.cumsum(3) - blocks  # exclusive, inside each block
    before = blocks.sum(3)  # (B, slots, N/block)
    before = before.cumsum(2) - before  # the earlier blocks' counts
    counts = (within + before.unsqueeze(-1)).view(B, slots, -1)
    return counts.gather(1, slot.clamp(max=slots - 1).unsqueeze(1)).squeeze(1)[:, :N].long()


# -- IMU ---------------------------------------------------------------------------------------------

class ImuTokenizer(nn.Module):
    """t (B, T) sample times relative to the newest [s], values (B, T, 6) accel [m/s²] and gyro
    [rad/s], count (B,) valid samples (the first `count`) -> (B, n, S*6+2) chunks, (B, n) mask and
    (B, n) end offset of each chunk before the newest sample, as tokenize.tokenize_imu."""

    def __init__(self, cfg: ImuTokens):
        super().__init__()
        self.cfg = cfg
        n, S = cfg.chunks, cfg.samples_per_chunk
        chunk_s = cfg.window_s / n
        chunk_end = -cfg.window_s + chunk_s * np.arange(1, n + 1)
        grid = (chunk_end[:, None] - chunk_s + chunk_s * (np.arange(S) + 0.5) / S).ravel()
        self.register_buffer("chunk_end", torch.tensor(chunk_end, dtype=torch.float32), persistent=False)
        self.register_buffer("grid", torch.tensor(grid, dtype=torch.float32), persistent=False)
        scale = [cfg.accel_scale] * 3 + [cfg.gyro_scale] * 3
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32), persistent=False)

    def forward(self, t, values, count):
        cfg, B, T = self.cfg, t.shape[0], t.shape[1]
        n, S = cfg.chunks, cfg.samples_per_chunk
        chunk_s = cfg.window_s / n
        valid = torch.arange(T, device=t.device) < count.unsqueeze(1)  # (B, T)
        last = (count - 1).clamp_min(0).unsqueeze(1)
        # linear interpolation at the grid, held constant beyond the ends (np.interp)
        after = ((t.unsqueeze(1) <= self.grid.view(1, -1, 1)) & valid.unsqueeze(1)).sum(-1)  # (B, n*S)
        lo = (after - 1).clamp_min(0).minimum(last)
        hi = after.minimum(last)
        t_lo, t_hi = t.gather(1, lo), t.gather(1, hi)
        v_lo = values.gather(1, lo.unsqueeze(-1).expand(-1, -1, 6))
        v_hi = values.gather(1, hi.unsqueeze(-1).expand(-1, -1, 6))
        span = t_hi - t_lo
        w = torch.where(span > 0, (self.grid - t_lo) / torch.where(span > 0, span, 1.0), 0.0).unsqueeze(-1)
        samples = (v_lo + w * (v_hi - v_lo)) / self.scale  # (B, n*S, 6)
        # each real sample's chunk, for the chunks' sample count and mean spacing
        chunk_of = torch.floor((t + cfg.window_s) / chunk_s).clamp(-1, n - 1).long()
        inside = (valid & (chunk_of >= 0)).float()
        member = (chunk_of.unsqueeze(-1) == torch.arange(n, device=t.device)).float() * inside.unsqueeze(-1)  # (B, T, n)
        gaps = torch.cat([torch.zeros_like(t[:, :1]), t[:, 1:] - t[:, :-1]], dim=1)  # (B, T)
        per_chunk = member.sum(1)  # (B, n)
        dt = (gaps.unsqueeze(-1) * member).sum(1) / per_chunk.clamp_min(1) / cfg.nominal_dt_s
        chunks = torch.cat([samples.reshape(B, n, S * 6), dt.unsqueeze(-1), (per_chunk / S).unsqueeze(-1)], dim=-1)
        mask = (self.chunk_end >= t[:, :1]) & (count > 0).unsqueeze(1)  # (B, n)
        return chunks * mask.unsqueeze(-1), mask, -self.chunk_end.expand(B, n)


# -- the step ----------------------------------------------------------------------------------------

class FusionStep(nn.Module):
    """Adapted sensor arrays -> the fusion model's outputs and which sensors had data (step_output_names),
    for one camera resolution and encoding. A frame that is absent is marked so in `frame_present` (its arrays are then
    ignored, as tokenize.Tokenizer leaves them out); the IMU is absent when its count is 0."""

    def __init__(self, model: FusionModel, image_shape: tuple[int, int, int], encoding: str):
        super().__init__()
        if model.cfg.model.odometry or model.cfg.model.second_imu:
            raise ConfigError("the whole-step graph has no odometry or second-IMU tokenizer: a model that reads "
                              "either runs on the host tokenizers' tokens (FusionPipeline does so on every backend)")
        self.cfg, self.model = model.cfg, model
        self.camera = CameraTokenizer(model.cfg.camera, image_shape[0], image_shape[1], encoding)
        self.imu = ImuTokenizer(model.cfg.imu)

    def forward(self, image, image_prev, points, point_count, points_prev, point_count_prev,
                imu_t, imu_values, imu_count, frame_present, frame_age, tau):
        # image, image_prev (B, H, W, C); points (B, N, 4), point_count (B,) (and _prev); imu_t (B, T),
        # imu_values (B, T, 6), imu_count (B,); frame_present (B, 4) bool and frame_age (B, 5) [s] per
        # frame (camera, camera_prev, lidar, lidar_prev) and the IMU's newest sample; tau (B, 4)
        frames = self.frame_tokens(image, image_prev, points, point_count, points_prev, point_count_prev)
        return self.fuse(*frames, imu_t, imu_values, imu_count, frame_present, frame_age, tau)

    def frame_tokens(self, image, image_prev, points, point_count, points_prev, point_count_prev) -> tuple:
        """-> camera, camera_prev patches, lidar tokens, mask, lidar_prev tokens, mask: fuse's first inputs."""
        li = self.cfg.lidar
        return (self.camera(image), self.camera(image_prev), *lidar_tokens(points, point_count, li),
                *lidar_tokens(points_prev, point_count_prev, li))

    def fuse(self, camera, camera_prev, lidar, lidar_mask, lidar_prev, lidar_prev_mask,
             imu_t, imu_values, imu_count, frame_present, frame_age, tau):
        """Each frame's tokens (CameraTokenizer, lidar_tokens: a frame tokenized once serves as the
        next step's previous frame), the IMU window and the rest of forward's inputs -> step_output_names."""
        x = self.tokens(camera, camera_prev, lidar, lidar_mask, lidar_prev, lidar_prev_mask,
                        imu_t, imu_values, imu_count, frame_present, frame_age)
        out = self.model.run(x, tau)
        present = torch.stack([x["camera_mask"].any(1), x["lidar_mask"].flatten(1).any(1), x["imu_mask"].any(1)], 1)
        return *(out[name] for name in output_names(self.cfg)), present

    def tokens(self, camera, camera_prev, lidar, lidar_mask, lidar_prev, lidar_prev_mask,
               imu_t, imu_values, imu_count, frame_present, frame_age) -> dict[str, torch.Tensor]:
        """The model's named inputs but τ (tokenize.input_spec), batched, from fuse's inputs."""
        c, li = self.cfg.camera, self.cfg.lidar
        B, age = frame_present.shape[0], frame_age
        # a previous frame counts only beside its newest (Tokenizer: "a previous frame alone is no evidence")
        newest_camera, newest_lidar = frame_present[:, 0], frame_present[:, 2]
        present = frame_present & torch.stack([newest_camera, newest_camera, newest_lidar, newest_lidar], 1)
        x = {}
        for i, (name, patches) in enumerate((("camera", camera), ("camera_prev", camera_prev))):
            there = present[:, i]
            x[f"{name}_patches"] = torch.where(there.view(B, 1, 1), patches, 0.0)
            x[f"{name}_mask"] = there.unsqueeze(1).expand(B, c.tokens)
            x[f"{name}_age"] = (age[:, i] * there).unsqueeze(1).expand(B, c.tokens)
        for i, (name, points, mask) in enumerate((("lidar", lidar, lidar_mask), ("lidar_prev", lidar_prev, lidar_prev_mask))):
            there = present[:, 2 + i]
            x[f"{name}_points"] = torch.where(there.view(B, 1, 1, 1), points, 0.0)
            x[f"{name}_mask"] = mask & there.view(B, 1, 1)
            x[f"{name}_age"] = (age[:, 2 + i] * there).unsqueeze(1).expand(B, li.tokens)
        x["imu_chunks"], x["imu_mask"], before_newest = self.imu(imu_t, imu_values, imu_count)
        x["imu_age"] = (age[:, 4:5] + before_newest) * (imu_count > 0).unsqueeze(1)
        return x


def step_output_names(cfg: FusionConfig) -> tuple[str, ...]:
    """FusionStep's outputs: the model's (tokenize.output_names), then present (B, 3): a sensor had at least
    one valid token."""
    return (*output_names(cfg), "present")


STEP_INPUTS = ("image", "image_prev", "points", "point_count", "points_prev", "point_count_prev",
               "imu_t", "imu_values", "imu_count", "frame_present", "frame_age", "tau")


@dataclass(frozen=True)
class Buckets:
    """Padding sizes for the variable-length arrays (see POINT_BUCKETS)."""

    points: tuple[int, ...] = POINT_BUCKETS
    imu: tuple[int, ...] = IMU_BUCKETS

    @staticmethod
    def fit(n: int, sizes: tuple[int, ...]) -> int:
        """The smallest size that holds n; beyond the largest, n rounded up to a multiple of it."""
        for size in sizes:
            if n <= size:
                return size
        return -(-n // sizes[-1]) * sizes[-1]


def step_ranges(buckets: Buckets = Buckets()) -> dict[str, dict[int, tuple[int, int, int]]]:
    """The step graph's dynamic axes but the batch, as (min, opt, max) of a TensorRT optimisation profile:
    every point and IMU bucket, tuned for the standard configuration's (a 120,000-point sweep, 100 IMU
    samples). A larger cloud or window than the largest bucket does not fit the engine."""
    points = (buckets.points[0], Buckets.fit(120_000, buckets.points), buckets.points[-1])
    imu = (buckets.imu[0], Buckets.fit(100, buckets.imu), buckets.imu[-1])
    return {"points": {1: points}, "points_prev": {1: points}, "imu_t": {1: imu}, "imu_values": {1: imu}}


def camera_key(snap: SensorSnapshot, cfg: FusionConfig) -> tuple[tuple[int, ...], str, np.dtype]:
    """(image shape, encoding, dtype) of a snapshot's camera: which FusionStep it needs. Without a
    camera, a token-sized rgb8 one (its image is then all masked)."""
    if snap.camera is None:
        return (cfg.camera.height, cfg.camera.width, 3), "rgb8", np.dtype(np.uint8)
    image = snap.camera.image
    return image.shape, snap.camera.encoding, image.dtype


def step_key(snap: SensorSnapshot, cfg: FusionConfig, buckets: Buckets = Buckets()) -> tuple:
    """What fixes a snapshot's step_inputs shapes: its camera_key and the point and IMU buckets its
    clouds and window take. Snapshots with one key batch into exactly the arrays each gets alone."""
    clouds = [buckets.fit(len(c) if c is not None else 1, buckets.points) for c in (snap.lidar, snap.lidar_prev)]
    imu = buckets.fit(len(snap.imu) if snap.imu is not None and len(snap.imu) else 1, buckets.imu)
    return camera_key(snap, cfg), *clouds, imu


def step_frames(snap: SensorSnapshot, cfg: FusionConfig) -> tuple[tuple, np.ndarray, np.ndarray]:
    """-> the snapshot's (camera, camera_prev, lidar, lidar_prev) frames, None where absent, and
    FusionStep's frame_present (4,) and frame_age (5,) rows (the IMU's newest sample last). A previous
    camera frame of another resolution or encoding than the newest (the camera was reconfigured)
    counts as absent."""
    shape, encoding, _ = camera_key(snap, cfg)
    same = [f if f is not None and f.image.shape == shape and f.encoding == encoding else None
            for f in (snap.camera, snap.camera_prev)]
    frames = (*same, snap.lidar, snap.lidar_prev)
    present, age = np.zeros(4, np.bool_), np.zeros(5, np.float32)
    for i, frame in enumerate(frames):
        if frame is not None:
            present[i], age[i] = True, (snap.stamp_ns - frame.stamp_ns) / NS_PER_S
    if snap.imu is not None and len(snap.imu):
        age[4] = (snap.stamp_ns - int(snap.imu.stamps_ns[-1])) / NS_PER_S
    return frames, present, age


def pack_imu(window: ImuWindow, t: np.ndarray, values: np.ndarray) -> int:
    """An IMU window into FusionStep's padded imu_t (T,) [s before its newest sample] and imu_values
    (T, 6) rows -> its count."""
    n = len(window)
    t[:n] = (window.stamps_ns - window.stamps_ns[-1]) / NS_PER_S
    values[:n, :3], values[:n, 3:] = window.accel, window.gyro
    return n


def step_inputs(snaps: list[SensorSnapshot], taus: np.ndarray, cfg: FusionConfig,
                buckets: Buckets = Buckets()) -> dict[str, np.ndarray]:
    """Snapshots with the same `camera_key` and their τ rows (B, 4) -> FusionStep's inputs as a
    batch, padded to the buckets that hold the largest cloud and IMU window of the batch (step_frames:
    which frames count)."""
    B = len(snaps)
    shape, encoding, dtype = camera_key(snaps[0], cfg)

    def pad_points(clouds):
        n = buckets.fit(max([len(c) for c in clouds if c is not None] + [1]), buckets.points)
        out, count = np.zeros((B, n, 4), np.float32), np.zeros(B, np.int64)
        for b, c in enumerate(clouds):
            if c is not None:
                out[b, : len(c)], count[b] = c.points, len(c)
        return out, count

    points, point_count = pad_points([s.lidar for s in snaps])
    points_prev, point_count_prev = pad_points([s.lidar_prev for s in snaps])
    windows = [s.imu if s.imu is not None and len(s.imu) else None for s in snaps]
    T = buckets.fit(max([len(w) for w in windows if w is not None] + [1]), buckets.imu)
    imu_t, imu_values, imu_count = np.zeros((B, T), np.float32), np.zeros((B, T, 6), np.float32), np.zeros(B, np.int64)
    image, image_prev = np.zeros((B, *shape), dtype), np.zeros((B, *shape), dtype)
    present, age = np.zeros((B, 4), np.bool_), np.zeros((B, 5), np.float32)
    for b, (snap, w) in enumerate(zip(snaps, windows)):
        if snap.camera is not None and camera_key(snap, cfg) != (shape, encoding, dtype):
            raise ValueError("step_inputs: every snapshot of a batch needs the same camera_key")
        frames, present[b], age[b] = step_frames(snap, cfg)
        for out, frame in ((image, frames[0]), (image_prev, frames[1])):
            if frame is not None:
                out[b] = frame.image
        if w is not None:
            imu_count[b] = pack_imu(w, imu_t[b], imu_values[b])
    return {"image": image, "image_prev": image_prev, "points": points, "point_count": point_count,
            "points_prev": points_prev, "point_count_prev": point_count_prev, "imu_t": imu_t,
            "imu_values": imu_values, "imu_count": imu_count, "frame_present": present, "frame_age": age,
            "tau": np.asarray(taus, np.float32)}
