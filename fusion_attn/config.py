"""Model and tokenizer configuration: plain dataclasses, stored beside every checkpoint as JSON.

What belongs here is what the weights depend on (token budgets, sizes). What may change at run time
without touching the weights (τ, max sensor ages, backend, rates) is a runtime parameter instead
(config/fusion.yaml, read by `load_params`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .frames import MODALITIES, Modality


@dataclass(frozen=True)
class CameraTokens:
    height: int = 96  # the image is resized (not cropped) to height x width before patching
    width: int = 128
    patch: int = 16  # ViT-style square patches -> (height/patch) * (width/patch) tokens
    max_depth_m: float = 10.0  # depth images are scaled by this into [0, 1]

    @property
    def tokens(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def features(self) -> int:
        return self.patch * self.patch * 3


@dataclass(frozen=True)
class LidarTokens:
    range_m: float = 51.2  # square bird's-eye-view grid of half-size range_m around the sensor
    grid: int = 64  # cells per side (<= 255: the tokenizer counts points in all grid² cells per sweep)
    z_min_m: float = -3.0
    z_max_m: float = 5.0
    pillars: int = 64  # token budget: the most populated pillars
    points_per_pillar: int = 16  # points sampled per pillar for the PointNet

    @property
    def tokens(self) -> int:
        return self.pillars

    @property
    def features(self) -> int:
        return 9  # per point: x, y, z, intensity, range; dx, dy, dz to the pillar; pillar log count


@dataclass(frozen=True)
class ChunkTokens:
    """A stream of six-value samples (three axes of each of two kinds), resampled uniformly over its last
    window_s seconds into chunks: one token each (tokenize.tokenize_imu)."""

    window_s: float  # the last window_s seconds before the newest sample
    chunks: int  # tokens
    samples_per_chunk: int = 8  # uniform resampling inside each chunk

    @property
    def tokens(self) -> int:
        return self.chunks

    @property
    def features(self) -> int:
        return self.samples_per_chunk * 6 + 2  # six values per sample; mean dt and sample count


@dataclass(frozen=True)
class ImuTokens(ChunkTokens):
    window_s: float = 0.25
    chunks: int = 8
    accel_scale: float = 9.80665  # m/s^2 -> g
    gyro_scale: float = 3.14159  # rad/s -> half turns per second
    nominal_dt_s: float = 0.005  # scales the dt feature (200 Hz -> 1.0)


@dataclass(frozen=True)
class OdometryTokens(ChunkTokens):
    """Wheel odometry's twists, tokenized as the IMU's samples are: velocity where the accel is, turn rate
    where the gyro is."""

    window_s: float = 0.5
    chunks: int = 4
    speed_scale: float = 1.0  # m/s
    angular_scale: float = 3.14159  # rad/s -> half turns per second
    nominal_dt_s: float = 0.02  # scales the dt feature (50 Hz -> 1.0)


# the six-axis streams (three axes of each of two kinds: the IMUs' accel and gyro, the odometry's velocity and
# turn rate), in the order a model reads them after the lidar (FusionConfig.sensors); each is chunked as ChunkTokens
STREAMS = ("imu", "odometry", "imu2")

# field metadata of a setting added after models were shipped (see FusionConfig.to_dict)
ADDED_LATER = {"added_later": True}


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    heads: int = 4
    fusion_tokens: int = 8  # M learned queries
    latent_blocks: int = 1  # self-attention blocks over the fusion tokens
    mlp_ratio: int = 2
    age_frequencies: int = 8  # Fourier features of a token's age
    learned_head_temperature: bool = False  # a learned τ per head, multiplied with the input τ
    qk_norm: bool = False  # L2-normalised q, k with a learned scale: an implicit temperature
    # "sensor": a softmax per sensor's tokens, sensors weighted by a softmax of log(trust) at τ;
    # "token": one softmax over all tokens at τ per token (the earlier design, kept as a baseline)
    fusion: str = "sensor"
    # "sensor": log trust is floored at log(trust_floor) in the sensor softmax, so a high τ tends to the
    # plain average of the present sensors, however low their trust (0: no floor; a sensor trusted at
    # 1e-30 then gets no weight at any τ)
    trust_floor: float = field(default=0.0, metadata=ADDED_LATER)
    # camera motion evidence: each camera token also gets how well its columns match the previous
    # frame's shifted by -camera_shifts..camera_shifts columns (yaw and sideways flow; 0: none)
    camera_shifts: int = field(default=0, metadata=ADDED_LATER)
    # lidar motion evidence: the lidar tokens also get the scan match of the sweep and the previous one
    # (model.lidar_scan_match: yaw rate, velocity, inlier share and residual)
    lidar_motion: bool = field(default=False, metadata=ADDED_LATER)
    # with lidar_motion: the scan match is a lidar token of its own (masked when there is nothing to
    # match), so the fusion tokens can read the lidar's ego-motion apart from what its pillars show
    lidar_motion_token: bool = field(default=False, metadata=ADDED_LATER)
    # with lidar_motion: the scan match, projected, is also added to the fusion tokens after the
    # cross-attention, at the lidar's sensor weight: past the tokens' normalisation and the attention
    # (docs/RESULTS.md: the fused state carried less of the match than the match has)
    lidar_motion_direct: bool = field(default=False, metadata=ADDED_LATER)
    # the IMU's window as tokenized (every chunk's resampled samples), projected and added to the fusion
    # tokens after the cross-attention at the IMU's sensor weight: a linear read of the raw window, meant to
    # keep the gyro's precision, which the chunk MLP and the attention each halved (docs/RESULTS.md:
    # measured, it carries some of the rate into the fused state, not that precision)
    imu_direct: bool = field(default=False, metadata=ADDED_LATER)
    # a second trust path for the camera that sees one statistic only, how much its image changed since
    # the previous frame, trained to tell frozen or black content, so that a frozen camera is caught on
    # recordings whose other statistics training never saw. The camera only: pixel noise makes no two
    # frames of a working camera alike, while a healthy radar's cloud repeats (docs/RESULTS.md)
    stale_evidence: bool = field(default=False, metadata=ADDED_LATER)
    # camera patch embedding: 0 is one linear layer over the patch's pixels; C > 0 a two-layer strided
    # convolution instead (C features per cell of a camera_stem_cells x camera_stem_cells grid in the
    # patch, then one layer over the cells in place), so where in its patch a thin object stands, and how
    # large, are features of their own. Cells as many as the patch's pixels: each pixel is read on its
    # own first (a per-pixel layer, a 1 x 1 convolution), so a post a pixel wide is not averaged into
    # its patch's background before anything non-linear sees it (measured: no better than 4 x 4 cells
    # at finding the goal post, docs/RESULTS.md)
    camera_stem: int = field(default=0, metadata=ADDED_LATER)
    camera_stem_cells: int = field(default=4, metadata=ADDED_LATER)
    # self-attention blocks along each column of camera patches (its rows, top to bottom) after the patch
    # embedding: a patch learns what stands above and below it (where an upright object's top is against
    # the horizon: its range on flat ground), which no patch shows alone and the fusion tokens' weighted
    # sums read poorly (docs/RESULTS.md); 0: none
    camera_column_blocks: int = field(default=0, metadata=ADDED_LATER)
    # a fourth sensor, wheel odometry (FusionConfig.odometry's tokens): its twist reads speed and yaw
    # rate where the IMU fails (docs/RESULTS.md: no other sensor reads the rates at the fusion instant)
    odometry: bool = field(default=False, metadata=ADDED_LATER)
    # a second IMU (Modality.IMU2, its own topic), tokenized as the first by the same layers with its own
    # sensor embedding, trust and τ: a reader of the rates as precise as the first, so that the fusion keeps
    # them when one IMU fails (docs/RESULTS.md: benchmarks/imu_redundancy.py)
    second_imu: bool = field(default=False, metadata=ADDED_LATER)
    # each six-axis stream's (IMU, odometry, second IMU) own linear read of speed and yaw rate from its window,
    # trained against the truth where that stream is sound and by nothing else; the reads are averaged at the
    # streams' trust at τ (their own softmax, without the trust floor: a failed IMU's share goes to the other)
    # and added, projected, to the fused tokens after their normalisation, past the chunk MLP, the attention and
    # the latent blocks (docs/RESULTS.md: the reads err 0.009 rad/s, the fused yaw rate 0.046)
    rate_readout: bool = field(default=False, metadata=ADDED_LATER)
    # with rate_readout: the fused speed and yaw rate are the model's own output ego_rate (B, 2; model.EgoRate:
    # the averaged reads about the training mean times a learned gain, plus a correction from the fused
    # tokens), which the velocity objective trains, instead of the reads being added onto the fused tokens,
    # where the heads' normalisation and the tokens' other content blur them (docs/RESULTS.md: read back from
    # the tokens they err 5x the reads)
    rate_output: bool = field(default=False, metadata=ADDED_LATER)


@dataclass(frozen=True)
class FusionConfig:
    camera: CameraTokens = field(default_factory=CameraTokens)
    lidar: LidarTokens = field(default_factory=LidarTokens)
    imu: ImuTokens = field(default_factory=ImuTokens)
    model: ModelConfig = field(default_factory=ModelConfig)
    odometry: OdometryTokens = field(default_factory=OdometryTokens)  # read with model.odometry only

    @property
    def sensors(self) -> tuple[Modality, ...]:
        """The sensors the model reads, in token order: every per-sensor input and output follows it."""
        m = self.model
        return ((Modality.CAMERA, Modality.LIDAR, Modality.IMU) + ((Modality.ODOMETRY,) if m.odometry else ())
                + ((Modality.IMU2,) if m.second_imu else ()))

    @property
    def sensor_names(self) -> tuple[str, ...]:
        return tuple(MODALITIES[m] for m in self.sensors)

    @property
    def streams(self) -> tuple[str, ...]:
        """The six-axis streams the model reads (STREAMS), in its sensors' order."""
        return tuple(n for n in self.sensor_names if n in STREAMS)

    def chunk_tokens(self, stream: str) -> ChunkTokens:
        """The tokens of a six-axis stream by name: the odometry's, or the IMU's (a second IMU is of its make)."""
        return self.odometry if stream == "odometry" else self.imu

    def __post_init__(self):
        c, m, li = self.camera, self.model, self.lidar
        sizes = {"camera.height": c.height, "camera.width": c.width, "camera.patch": c.patch,
                 "lidar.pillars": li.pillars, "lidar.points_per_pillar": li.points_per_pillar,
                 "imu.chunks": self.imu.chunks, "imu.samples_per_chunk": self.imu.samples_per_chunk,
                 "model.dim": m.dim, "model.heads": m.heads, "model.fusion_tokens": m.fusion_tokens,
                 "model.mlp_ratio": m.mlp_ratio, "model.age_frequencies": m.age_frequencies}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("latent_blocks", "camera_column_blocks"):
            value = getattr(m, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"model.{name} must be an integer >= 0, got {value!r}")
        if m.fusion not in ("sensor", "token"):
            raise ConfigError(f"model.fusion must be 'sensor' or 'token', got {m.fusion!r}")
        if c.height % c.patch or c.width % c.patch:
            raise ConfigError(f"camera {c.height}x{c.width} is not a multiple of patch {c.patch}")
        if isinstance(m.camera_stem, bool) or not isinstance(m.camera_stem, int) or m.camera_stem < 0:
            raise ConfigError(f"model.camera_stem must be an integer >= 0, got {m.camera_stem!r}")
        cells = m.camera_stem_cells
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
            raise ConfigError(f"model.camera_stem_cells must be an integer >= 1, got {cells!r}")
        if m.camera_stem and c.patch % cells:
            raise ConfigError(f"model.camera_stem needs camera.patch divisible by camera_stem_cells {cells}, got {c.patch}")
        if m.dim % m.heads:
            raise ConfigError(f"model.dim {m.dim} is not divisible by model.heads {m.heads}")
        if m.dim == m.heads:  # the fused-state message carries the trust in the column after the heads
            raise ConfigError(f"model.dim {m.dim} must exceed model.heads {m.heads}")
        if isinstance(m.camera_shifts, bool) or not isinstance(m.camera_shifts, int) or not 0 <= m.camera_shifts < c.width:
            raise ConfigError(f"model.camera_shifts must be an integer in [0, camera.width), got {m.camera_shifts!r}")
        for name in ("lidar_motion_token", "lidar_motion_direct"):
            if getattr(m, name) and not m.lidar_motion:
                raise ConfigError(f"model.{name} needs model.lidar_motion (the scan match it carries)")
        if m.rate_readout and m.fusion != "sensor":  # the reads are averaged at the trust the token fusion ignores
            raise ConfigError("model.rate_readout needs model.fusion 'sensor'")
        if m.rate_output and not m.rate_readout:
            raise ConfigError("model.rate_output needs model.rate_readout (the reads it outputs)")
        if not 1 <= li.grid <= 255:  # a count per cell per sweep: grid² stays small
            raise ConfigError(f"lidar.grid {li.grid} must be in [1, 255]")
        o = self.odometry
        for name in ("chunks", "samples_per_chunk"):
            value = getattr(o, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"odometry.{name} must be an integer >= 1, got {value!r}")
        if not o.window_s > 0:
            raise ConfigError(f"odometry.window_s must be > 0, got {o.window_s!r}")
        if not (li.range_m > 0 and self.imu.window_s > 0 and li.z_max_m > li.z_min_m):
            raise ConfigError("lidar.range_m and imu.window_s must be > 0, and lidar.z_max_m > lidar.z_min_m")

    def to_dict(self) -> dict[str, Any]:
        """Every setting, except one ADDED_LATER at its default and the odometry's tokens of a model
        without odometry: the dict (and the weights digest of a model, which hashes it) stays what it
        was for every model that predates the setting."""
        return {f.name: {g.name: getattr(section, g.name) for g in dataclasses.fields(section)
                         if not (g.metadata.get("added_later") and getattr(section, g.name) == g.default)}
                for f in dataclasses.fields(self) for section in [getattr(self, f.name)]
                if f.name != "odometry" or self.model.odometry}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {sorted(unknown)}; expected {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory
            values = data.get(f.name, {})
            names = {g.name for g in dataclasses.fields(section_cls)}
            bad = set(values) - names
            if bad:
                raise ConfigError(f"unknown key(s) in '{f.name}': {sorted(bad)}; expected {sorted(names)}")
            kwargs[f.name] = section_cls(**values)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> FusionConfig:
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"config JSON is invalid: {exc}") from exc


def cache_dir(kind: str = "") -> Path:
    """Where fusion_attn caches what it can rebuild (ONNX exports, engines, training shards):
    $FUSION_ATTN_CACHE, default ~/.cache/fusion_attn; `kind` names a subfolder."""
    root = Path(os.environ.get("FUSION_ATTN_CACHE", Path.home() / ".cache" / "fusion_attn"))
    return root / kind if kind else root


def load_params(path: str | Path, node: str = "fusion_node") -> dict[str, Any]:
    """Read a ROS 2 parameter file (`node: ros__parameters: ...`, or `/**:`) into a flat dict.

    The node and the CLI read the same files, so a robot and a laptop run with the same settings.
    Nested mappings become dotted names, as rclpy does.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read parameter file {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"parameter file {path}: expected node names mapping to ros__parameters, got a "
                          f"{type(doc).__name__}")
    params: dict[str, Any] = {}
    for key in ("/**", node, f"/{node}"):
        section = doc.get(key, {})
        if isinstance(section, dict):
            tree = section.get("ros__parameters", {}) or {}
            if not isinstance(tree, dict):
                raise ConfigError(f"parameter file {path}: {key}'s ros__parameters must be a mapping, got a "
                                  f"{type(tree).__name__}")
            params.update(_flatten(tree))
    return params


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
