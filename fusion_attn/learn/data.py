"""Training and evaluation data: simulated episodes and recordings through the node's own data path.

Simulated episodes (`fusion_attn.sim.RobotEnv`, no faults) and recordings go through exactly the
node's path -- frames -> `SensorSync` -> `Tokenizer` -- at `fusion_hz`, or on each message of a
trigger sensor as the node's `trigger` parameter does (bags through `replay.recorded_inputs`, the
replay tool's loop). Each episode or bag becomes one cached .npz shard
of tokenized inputs, keyed by what it depends on (`shard_key`), so epochs never touch the simulator
again. Simulated samples also carry ground truth from the simulator's true state
(`RobotEnv.ground_truth`): ego velocity, obstacle distance per sector, goal distance and bearing.

Episode seeds keep the splits apart: training, validation and the held-out test set of
`eval-robustness` never share an episode (`SPLIT_SEEDS`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..bag import find_topics, open_reader
from ..config import STREAMS, FusionConfig
from ..errors import BagError, ConfigError, FusionAttnError
from ..files import written_aside
from ..frames import MODALITIES, NS_PER_S
from ..tokenize import (
    IMU_AXES,
    LIDAR_INDEX,
    Tokenizer,
    denormalise_pixels,
    imu_samples,
    normalise_pixels,
    put_imu_samples,
)

if TYPE_CHECKING:
    from .loop import TrainConfig

DATA_VERSION = "3"  # bump when what a shard holds changes: old cache entries are then ignored
SECTORS = 16  # obstacle sectors (0 centred straight ahead): the ground truth's and the lidar target's
# each split's first episode seed: training's and validation's + the run's seed * SEED_STRIDE, the test set's
# the same for every run (reports before 2026-12-03 took it + the first run's seed * SEED_STRIDE too)
SPLIT_SEEDS = {"train": 0, "val": 100_000, "test": 200_000}
SEED_STRIDE = 1_000_000

INPUT_KEYS = ("camera_patches", "camera_mask", "camera_age", "lidar_points", "lidar_mask", "lidar_age",
              "imu_chunks", "imu_mask", "imu_age", "odometry_chunks", "odometry_mask", "odometry_age",
              "imu2_chunks", "imu2_mask", "imu2_age")  # odometry, a second IMU: where the model reads them
TRUTH_KEYS = ("velocity", "obstacles", "goal")
GOLDEN = (5**0.5 - 1) / 2  # seed k's timer phase is k * GOLDEN mod 1: any run of seeds spreads over the period


# --- the sample codec ----------------------------------------------------------------------------


def encode_sample(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokenizer output -> compact storage. Camera patches go back to the 8-bit pixels they came from
    (exact for 8-bit cameras, 1/255 steps for 16-bit and depth): a quarter of the float32 size, which
    keeps a dataset of thousands of samples in memory. Lidar point features fit float16."""
    out = {k: x[k] for k in INPUT_KEYS if k in x and k not in ("camera_patches", "lidar_points")}
    pixels = denormalise_pixels(x["camera_patches"].reshape(*x["camera_patches"].shape[:-1], -1, 3))
    out["camera_u8"] = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    out["lidar_points"] = x["lidar_points"].astype(np.float16)
    return out


def decode_camera(u8: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, P, 3) uint8 -> (B, N, P*3) normalised patches, zero where masked (as the tokenizer gives)."""
    return normalise_pixels(u8.float() / 255.0).flatten(-2) * mask[..., None]


# --- sequences: a simulated episode, a recording -------------------------------------------------


def sim_episode(task: str, seed: int, seconds: float, fusion_hz: float, cfg: FusionConfig,
                trigger: str = "timer", stop_share: float = 0.0, sensors=None, drive=None,
                phase: float = 0.0, walk: bool = False) -> dict[str, np.ndarray]:
    """One clean simulated episode, tokenized as the node would see it, with ground truth per sample:
    the true state at the sample's instant (a timer tick, a trigger frame's stamp), interpolated
    between the ends of the 50 Hz control steps around it (`truth_at`).

    The robot drives a smooth random policy (each command held 0.4-1.6 s), so the data covers
    turning, driving and stopping near obstacles rather than 50 Hz jitter; `stop_share` of its commands
    are a stop (`random_drive`). `sensors`: the simulated sensors' `SensorConfig` (None: the default).
    `task`: a task's name or a `Task`; `drive`: another policy, called as random_drive is (None: it).
    `phase`: the timer's first tick that share of a period later, so that its samples fall between the
    sensors' frames and samples rather than with them (0: each camera and lidar frame is 0.1 s old at
    10 Hz and the IMU's newest sample is at the tick; a node at 20 Hz, or other sensor rates, see the
    ages between). `walk`: the timer runs one tick in the episode's count fast, so that its phase walks
    once through the period and every sample is fused at an age of its own (measured: trained on 48
    episodes' fixed phases, a model distrusted a clean lidar at ages between them,
    benchmarks/phase_error.py).
    """
    import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.robot import RobotEnv

    from ..clock import FusionClock, trigger_modality
    from ..sync import SensorSync, SyncConfig

    env = RobotEnv(task, sensors=sensors, faults=FaultConfig())
    # the node's fusion timer on simulated time, first tick one period (and the phase) in
    period_ns, ticks = round(NS_PER_S / fusion_hz), seconds * fusion_hz
    rate_hz = fusion_hz * ticks / (ticks - 1) if walk and ticks > 1 else fusion_hz
    clock = FusionClock(SensorSync(SyncConfig.for_model(cfg)), rate_hz, trigger_modality(trigger),
                        start_ns=period_ns + round(phase * period_ns))
    rng = np.random.default_rng(seed)
    tokenizer, ones = Tokenizer(cfg), np.ones(1 + len(cfg.sensors), np.float32)  # τ: not stored
    samples, truth, stamps = [], [], []
    before = None  # (time_ns, truth) at the end of the previous control step
    try:
        for info in (drive or random_drive)(env, rng, seed, seconds, stop_share):
            now = (info["time_ns"], env.ground_truth(SECTORS))
            for snap in clock.step(info["frames"], info["time_ns"]):
                samples.append(encode_sample(tokenizer(snap, ones)))
                truth.append(truth_at(snap.stamp_ns, before, now))
                stamps.append(snap.stamp_ns)
            before = now
    finally:
        env.close()
    out = _stack(samples)
    out.update({k: np.stack([g[k] for g in truth]).astype(np.float32) for k in TRUTH_KEYS})
    out["labelled"] = np.ones(len(samples), np.bool_)
    out["stamp_ns"] = np.array(stamps, np.int64)
    return out


def truth_at(t_ns: int, before: tuple[int, dict] | None, after: tuple[int, dict]) -> dict[str, np.ndarray]:
    """The ground truth at t_ns from the (time_ns, truth) of the control-step ends around it: linear in
    time, the goal in the robot's plane (`interpolate_goal`). A sample inside a step otherwise gets its
    end's state, up to 20 ms after the data it fuses, while the drive turns at up to 10 rad/s^2."""
    t1, late = after
    if before is None or t_ns >= t1:
        return late
    t0, early = before
    w = min(max((t_ns - t0) / (t1 - t0), 0.0), 1.0)
    return {"velocity": early["velocity"] + w * (late["velocity"] - early["velocity"]),
            "obstacles": early["obstacles"] + w * (late["obstacles"] - early["obstacles"]),
            "goal": interpolate_goal(early["goal"], late["goal"], w)}


def interpolate_goal(a: np.ndarray, b: np.ndarray, w: np.ndarray | float) -> np.ndarray:
    """(..., 2) goals (distance, bearing) -> the goal w of the way from a to b, interpolated as a point in
    the robot's plane, so that a bearing passing +-pi goes the short way (nan where either is nan)."""
    def xy(g):
        return g[..., :1] * np.stack([np.cos(g[..., 1]), np.sin(g[..., 1])], -1)

    at = xy(a) + np.asarray(w)[..., None] * (xy(b) - xy(a))
    return np.stack([np.hypot(at[..., 0], at[..., 1]), np.arctan2(at[..., 1], at[..., 0])], -1)


def random_drive(env, rng: np.random.Generator, seed: int, seconds: float, stop_share: float = 0.0,
                 stand_s: float = 0.0):
    """Drive a simulated episode by the data's smooth random policy (each command held 0.4-1.6 s of
    50 Hz control steps): yields reset's info, then each step's, until `seconds` of simulated time
    have passed or the episode ends (its last step's info is not yielded). `stop_share` of the
    commands are a stop (zero speed and turn): a robot standing still, whose sensors then change by
    their noise alone, as a frozen sensor's do not (0: the same commands, draw for draw, as before
    the option existed). For the first `stand_s` seconds the robot stands still and nothing is drawn."""
    _, info = env.reset(seed=seed)
    action, hold = np.zeros(env.action_space.shape, np.float32), 0
    while True:
        yield info
        if info["time_ns"] >= seconds * NS_PER_S:
            return
        if info["time_ns"] >= stand_s * NS_PER_S:
            if hold <= 0:
                action = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
                if stop_share > 0 and rng.random() < stop_share:
                    action = np.zeros_like(action)
                hold = int(rng.integers(20, 80))  # control steps at 50 Hz
            hold -= 1
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return


def bag_sequence(paths: Sequence[str | Path], fusion_hz: float, cfg: FusionConfig,
                 trigger: str = "timer") -> dict[str, np.ndarray]:
    """A recording, fused-instant by fused-instant as `fusion-attn replay` would see it; no labels.
    A recording cut short gives what was read before the fault, as replay does."""
    from ..replay import ReplayOptions, recorded_inputs

    samples, stamps = [], []
    opts = ReplayOptions(fusion_rate_hz=fusion_hz, trigger=trigger, progress=False)
    for stamp, x in recorded_inputs(paths, cfg, opts):
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


MIRRORED_IMU_AXES = ("accel_y", "gyro_x", "gyro_z")  # what changes sign when left and right swap


def mirror_sequence(seq: dict[str, np.ndarray], cfg: FusionConfig) -> dict[str, np.ndarray]:
    """A simulated sequence as its mirror image across the robot's forward axis: the same drive in the
    world's mirror image, a new scene for the cost of a copy. It holds for a rig symmetric about that
    axis, as the simulated one is (the panorama centred straight ahead, its edges straight behind, or
    one forward camera; lidar and IMU on the axis; sim.sensors.SensorConfig.image_x(-b) = 1 - image_x(b)):

        camera  the columns of patches in reverse order, each patch's pixel columns too
        lidar   y and the in-pillar dy negated (pillars are a set: their order does not matter)
        IMU     accel_y, gyro_x and gyro_z negated (a rotation's axis is a pseudovector); odometry's
                linear_y, angular_x and angular_z alike
        labels  yaw rate and goal bearing negated; obstacle sector k becomes sector -k
    """
    out = dict(seq)
    n, p = len(seq["labelled"]), cfg.camera.patch
    rows, cols = cfg.camera.height // p, cfg.camera.width // p

    def reverse_columns(a: np.ndarray) -> np.ndarray:  # (n, rows * cols, ...) in (row, col) token order
        return np.ascontiguousarray(a.reshape(n, rows, cols, *a.shape[2:])[:, :, ::-1]).reshape(a.shape)

    for key in ("camera_mask", "camera_age"):
        out[key] = reverse_columns(seq[key])
    pixels = reverse_columns(seq["camera_u8"]).reshape(n, rows * cols, p, p, 3)[:, :, :, ::-1]  # (py, px) per patch
    out["camera_u8"] = np.ascontiguousarray(pixels).reshape(seq["camera_u8"].shape)
    points = seq["lidar_points"].copy()
    for feature in ("y", "dy"):
        points[..., LIDAR_INDEX[feature]] *= -1
    out["lidar_points"] = points
    sign = np.array([-1.0 if axis in MIRRORED_IMU_AXES else 1.0 for axis in IMU_AXES], np.float32)
    for name in (n for n in STREAMS if f"{n}_chunks" in seq):
        tokens = cfg.chunk_tokens(name)
        out[f"{name}_chunks"] = seq[f"{name}_chunks"].copy()
        put_imu_samples(out[f"{name}_chunks"], imu_samples(seq[f"{name}_chunks"], tokens) * sign, tokens)
    out["velocity"] = seq["velocity"] * np.array([1.0, -1.0], np.float32)
    out["obstacles"] = seq["obstacles"][:, -np.arange(SECTORS) % SECTORS]
    out["goal"] = seq["goal"] * np.array([1.0, -1.0], np.float32)
    return out


# --- the shard cache -----------------------------------------------------------------------------


def shard_key(cfg: FusionConfig, fusion_hz: float, kind: str, trigger: str = "timer", **source) -> dict:
    """Everything a shard's content depends on: the tokenizers' config (not the model's: runs that
    differ only in the model share their data), the fusion rate and trigger, and what the sequence is."""
    tokens = {k: v for k, v in cfg.to_dict().items() if k != "model"}
    on = {} if trigger == "timer" else {"trigger": trigger}  # the timer's keys predate the trigger
    imu2 = {"imu2": True} if cfg.model.second_imu else {}  # its tokens, and a rig with a second IMU
    return {"version": DATA_VERSION, "tokens": tokens, "hz": fusion_hz, **on, **imu2, "kind": kind, **source}


@dataclass(frozen=True)
class Shard:
    """One sequence's tokenized samples: its cache key and how to make it when the cache lacks it."""

    key: dict
    make: Callable[[], dict[str, np.ndarray]]

    def path(self, cache: Path) -> Path:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cache / f"{self.key['kind']}-{digest}.npz"

    def load(self, cache: Path) -> dict[str, np.ndarray]:
        """The shard from the cache, or made, written (atomically) and returned."""
        path = self.path(cache)
        if path.is_file():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        arrays = self.make()
        cache.mkdir(parents=True, exist_ok=True)
        with written_aside(path, ".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        return arrays


def episode_shards(tc: TrainConfig, cfg: FusionConfig, split: str, count: int,
                   spread: bool | None = None) -> list[Shard]:
    """The simulated episodes of a split ("train", "val", "test"): tasks alternating, seeds from
    `SPLIT_SEEDS`. Training and validation episodes follow `tc.sim_tasks`, `tc.stop_share` and the
    run's seed; the held-out test episodes are always the default tasks' without stops, whatever the
    run's seed, so that every run's evaluation sees the same samples whatever its training data added.
    spread: the timer at phases spread over a period (None: the training episodes of a run trained so)."""
    shards = []
    tasks, stop_share = (tc.sim_tasks, tc.stop_share) if split != "test" else (type(tc)().sim_tasks, 0.0)
    first = SPLIT_SEEDS[split] + (tc.seed * SEED_STRIDE if split != "test" else 0)
    # the rig is the world's, not the data's: the test episodes are rendered with the run's too
    view = {"camera_view": tc.sim_camera_view} if tc.sim_camera_view != type(tc)().sim_camera_view else {}
    # ... with a second IMU where the model reads one (an evaluation's first run may have none)
    rig = dataclasses.replace(tc, second_imu=cfg.model.second_imu).rig()
    # training episodes' timer at phases spread over a period (--random-phase): starting at the golden ratio's
    # multiples, each walking once through the period
    spread = (tc.random_phase and split == "train" if spread is None else spread) and tc.trigger == "timer"
    walk = {"walk": True} if spread and split == "train" else {}
    for k in range(count):
        task, seed = tasks[k % len(tasks)], first + k
        stops = {"stop_share": stop_share} if stop_share else {}  # the keys of episodes without stops predate it
        phase = {"phase": p} if spread and (p := round(seed * GOLDEN % 1.0, 6)) else {}  # phase 0's keys predate it
        key = shard_key(cfg, tc.fusion_hz, f"sim-{task}", tc.trigger, seed=seed, seconds=tc.sim_seconds, **stops, **view,
                        **phase, **walk)
        make = functools.partial(sim_episode, task, seed, tc.sim_seconds, tc.fusion_hz, cfg, tc.trigger, stop_share, rig,
                                 **phase, **walk)
        shards.append(Shard(key, make))
    return shards


def bag_shard(bag: str | Path, fusion_hz: float, cfg: FusionConfig, trigger: str = "timer") -> Shard:
    """A recording (file or folder); its key holds each file's size and modification time, so a
    recording changed at the same path is tokenized anew, and the topic each sensor is read from."""
    p = Path(bag)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    stat = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    key = shard_key(cfg, fusion_hz, "bag", trigger, path=str(p.resolve()), files=stat, topics=_sensor_topics(p))
    return Shard(key, functools.partial(bag_sequence, [p], fusion_hz, cfg, trigger))


def _sensor_topics(bag: Path) -> dict[str, str] | None:
    """The topic each sensor of a recording is read from; None where it does not open (making its shard
    then raises the BagError, beside the shards that could be made)."""
    try:
        with open_reader([bag]) as reader:
            return {MODALITIES[m]: t for m, t in find_topics(reader).sensors.items()}
    except BagError:
        return None


# --- datasets ------------------------------------------------------------------------------------


def previous_frames(frame_s: np.ndarray, present: np.ndarray, max_gap_s: float) -> np.ndarray:
    """(N,) per sample of one sequence: the sample holding its sensor's previous frame (the newest earlier
    frame, told apart by its stamp frame_s), or -1 (none, or more than max_gap_s before: not consecutive,
    as the sync decides). Several samples share a frame when the sensor is slower than the sampling."""
    prev = np.full(len(frame_s), -1, np.int64)
    newest = before = -1  # samples holding the newest frame and the frame before it
    for i in np.flatnonzero(present):
        if newest < 0 or frame_s[i] - frame_s[newest] > 1e-6:
            before, newest = newest, i
        if before >= 0 and frame_s[i] - frame_s[before] <= max_gap_s:
            prev[i] = before
    return prev


def _frame_stamps(part: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(frame stamp [s], present) per sample of one sequence: fusion time minus the sensor's age."""
    mask = part[f"{name}_mask"].reshape(len(part["labelled"]), -1).any(1)
    return part["stamp_ns"] / NS_PER_S - part[f"{name}_age"][:, 0].astype(np.float64), mask


def goal_at_frames(part: dict[str, np.ndarray], name: str) -> np.ndarray:
    """(N, 2) per sample of one sequence: the goal (distance, bearing) as the sensor's frame saw it, at
    that frame's stamp rather than at the fusion instant (a camera frame is up to a period older, and
    the robot turns meanwhile): interpolated in the robot's plane between the two consecutive labelled
    samples around the stamp; nan where none bracket it or there is no frame or goal."""
    out = np.full((len(part["labelled"]), 2), np.nan, np.float32)
    frame_s, present = _frame_stamps(part, name)
    goal = part["goal"].astype(np.float64)
    known = np.flatnonzero(part["labelled"] & np.isfinite(goal).all(-1))
    if len(known) < 2:
        return out
    t = part["stamp_ns"][known] / NS_PER_S
    j = np.clip(np.searchsorted(t, frame_s, side="right") - 1, 0, len(t) - 2)
    w = (frame_s - t[j]) / (t[j + 1] - t[j])
    ok = present & (w >= 0.0) & (w <= 1.0) & (known[j + 1] == known[j] + 1)
    out[ok] = interpolate_goal(goal[known[j]], goal[known[j + 1]], w)[ok]
    return out


@dataclass
class Dataset:
    """Samples of many sequences (episodes, bags) in flat arrays; `seq_start`/`next` link each sample to
    its sequence's first and its successor (-1 at the end), for frozen/delayed faults and the next IMU;
    `camera_prev`/`lidar_prev` to the sample holding that sensor's previous frame (-1: none) and
    `camera_frame_s`/`lidar_frame_s` give each sample's frame stamp, for the model's temporal inputs;
    `goal_at_camera`/`goal_at_lidar` the goal at that stamp, for the objectives that ask one sensor alone."""

    arrays: dict[str, np.ndarray]
    source: np.ndarray  # (N,) 0 simulated, 1 bag

    def __len__(self) -> int:
        return len(self.source)

    @classmethod
    def join(cls, parts: list[tuple[dict[str, np.ndarray], int]]) -> Dataset:
        from ..sync import SyncConfig

        arrays = {k: np.concatenate([p[k] for p, _ in parts]) for k in parts[0][0]}
        max_gap = dict(zip(("camera", "lidar"), SyncConfig().max_age_s))
        starts, nxt, source, offset = [], [], [], 0
        linked: dict[str, list[np.ndarray]] = {k: [] for n in ("camera", "lidar") for k in (f"{n}_prev", f"{n}_frame_s", f"goal_at_{n}")}
        for p, src in parts:
            n = len(p["labelled"])
            starts.append(np.full(n, offset))
            nxt.append(np.r_[np.arange(offset + 1, offset + n), -1])
            source.append(np.full(n, src, np.int8))
            for name in ("camera", "lidar"):
                frame_s, present = _frame_stamps(p, name)
                prev = previous_frames(frame_s, present, max_gap[name])
                linked[f"{name}_prev"].append(np.where(prev >= 0, prev + offset, -1))
                linked[f"{name}_frame_s"].append(frame_s - (p["stamp_ns"][0] / NS_PER_S if n else 0.0))
                linked[f"goal_at_{name}"].append(goal_at_frames(p, name))
            offset += n
        arrays["seq_start"], arrays["next"] = np.concatenate(starts), np.concatenate(nxt)
        arrays.update({k: np.concatenate(v) for k, v in linked.items()})
        return cls(arrays, np.concatenate(source))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.arrays.items()}


def build_datasets(tc: TrainConfig, cfg: FusionConfig, cache: Path, progress: bool = True, jobs: int = 1,
                   ray: str | None = None) -> tuple[Dataset, Dataset | None]:
    """-> (train, validation). Validation: held-out simulated episodes (other seeds), clean; None without.
    jobs > 1 or ray: the shards the cache lacks are made in parallel first (fusion_attn.batch; with
    Ray, `cache` must be a folder every node reaches); a shard that fails is named after the others
    are done (they stay cached), and nothing is trained."""
    from tqdm import tqdm

    shards = [("train", s, 0) for s in episode_shards(tc, cfg, "train", tc.sim_episodes)]
    shards += [("val", s, 0) for s in episode_shards(tc, cfg, "val", tc.val_episodes)]
    shards += [("train", bag_shard(bag, tc.fusion_hz, cfg, tc.trigger), 1) for bag in tc.bags]
    missing = [shard for _, shard, _ in shards if not shard.path(cache).is_file()]
    if missing and (jobs > 1 or ray):
        from ..batch import run_jobs

        bar = tqdm(total=len(missing), desc="dataset (parallel)", unit="seq", disable=not progress, dynamic_ncols=True)
        failed = []
        for result in run_jobs(_make_shard, [(shard, cache) for shard in missing], jobs=jobs, ray=ray):
            bar.update()
            if not result.ok:
                failed.append(f"{_source(result.args[0])}: {result.error}")
        bar.close()
        if failed:
            raise FusionAttnError(f"{len(failed)} of {len(missing)} training sequences failed: " + "; ".join(failed))
    parts: dict[str, list] = {"train": [], "val": []}
    for split, shard, source in tqdm(shards, desc="dataset", unit="seq", disable=not progress, dynamic_ncols=True):
        parts[split].append((shard.load(cache), source))
    if tc.mirror:  # the training episodes' mirror images; validation stays as simulated, a recording's rig may be lopsided
        parts["train"] += [(mirror_sequence(part, cfg), 0) for part, source in parts["train"] if source == 0]
    return Dataset.join(parts["train"]), Dataset.join(parts["val"]) if parts["val"] else None


def _make_shard(shard: Shard, cache: Path) -> None:
    """A parallel job: make the shard into the cache (the learner loads it from there)."""
    shard.load(cache)


def _source(shard: Shard) -> str:
    return shard.key.get("path") or f"{shard.key['kind']} seed {shard.key.get('seed')}"


def held_out_set(tc: TrainConfig, cfg: FusionConfig, cache: Path, episodes: int) -> Dataset:
    """The test set of `eval-robustness`: simulated episodes no training or validation uses."""
    return Dataset.join([(shard.load(cache), 0) for shard in episode_shards(tc, cfg, "test", episodes)])


def bag_set(bag: str | Path, fusion_hz: float, cfg: FusionConfig, cache: Path, trigger: str = "timer") -> Dataset:
    """One recording as a dataset, from the same shard training made of it."""
    return Dataset.join([(bag_shard(bag, fusion_hz, cfg, trigger).load(cache), 1)])
