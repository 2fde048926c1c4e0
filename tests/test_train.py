"""Training: data through the node's path, fault augmentation, checkpoints, resume, the shipped default."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fusion_attn.sim  # noqa: F401 - headless GL before mujoco loads
from fusion_attn.checkpoint import load_checkpoint, read_checkpoint
from fusion_attn.cli import main
from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.errors import BagError, CheckpointError, ConfigError
from fusion_attn.frames import CameraFrame, Modality
from fusion_attn.learn import robustness
from fusion_attn.learn.augment import DELAY_LAG, FAULTS, FREEZE_LAG, FaultPlan, corrupt, gather
from fusion_attn.learn.data import (
    SECTORS,
    Dataset,
    bag_sequence,
    bag_set,
    bag_shard,
    build_datasets,
    decode_camera,
    encode_sample,
    episode_shards,
    goal_at_frames,
    interpolate_goal,
    mirror_sequence,
    random_drive,
    sim_episode,
)
from fusion_attn.learn.evaluation import (
    RunningMeans,
    evaluate,
    evaluate_taus,
    physical_errors,
    sectors_in_view,
    sim_camera_hfov_deg,
)
from fusion_attn.learn.loop import STATE_FILE, TrainConfig, train
from fusion_attn.learn.objectives import (
    OBJECTIVES,
    CameraGoalColumns,
    CameraGoalTokens,
    Heads,
    build_heads,
    camera_goal_loss,
    camera_goal_token_loss,
    fault_attention,
    fit_normalisation,
    fused_consistency,
    heads_path,
    lidar_goal_loss,
    load_heads,
    post_pillars,
    target_sizes,
    targets,
)
from fusion_attn.learn.robustness import load_run, run_evaluation, summarise
from fusion_attn.model import FusionModel
from fusion_attn.pipeline import DEFAULT_CHECKPOINT
from fusion_attn.sim.scene import TASK_COLOURS, Geom, Layout
from fusion_attn.sim.sensors import SensorConfig
from fusion_attn.sim.tasks import Task, post_top_in_image
from fusion_attn.tokenize import (
    IMU_AXES,
    IMU_COUNT,
    IMU_DT,
    LIDAR_FEATURES,
    LIDAR_INDEX,
    SensorSnapshot,
    Tokenizer,
    denormalise_pixels,
    imu_samples,
)

CFG = FusionConfig()
TINY = TrainConfig(steps=6, batch=8, sim_episodes=2, val_episodes=1, sim_seconds=3.0, log_every=2, eval_every=4,
                   save_every=3)
GIT_SHA = re.compile(r"[0-9a-f]{40}(\+uncommitted)?")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("train_cache")


@pytest.fixture(scope="module")
def data(cache):
    return build_datasets(TINY, CFG, cache, progress=False)[0]


def _state(out):
    model = load_checkpoint(out / "model.safetensors")
    heads = load_heads(heads_path(out / "model.safetensors"))
    return {**{f"m.{k}": v for k, v in model.state_dict().items()}, **{f"h.{k}": v for k, v in heads.state_dict().items()}}


def test_dataset_comes_from_the_simulator_with_ground_truth(data):
    a = data.arrays
    n = len(data)
    assert n == 2 * 30  # 2 episodes x 3 s at 10 Hz
    assert a["camera_mask"].all() and a["lidar_mask"].any(axis=(1, 2)).all() and a["imu_mask"].any(axis=1).all()
    assert a["labelled"].all() and (data.source == 0).all()
    # sequences: the second episode starts at 30; `next` links within an episode only
    assert a["seq_start"][29] == 0 and a["seq_start"][30] == 30
    assert a["next"][28] == 29 and a["next"][29] == -1 and a["next"][59] == -1
    assert np.all((a["obstacles"] > 0) & (a["obstacles"] <= 8.0))  # the lidar's max range
    assert np.all(np.abs(a["goal"][:, 1]) <= np.pi)


def test_triggered_data_fuses_at_each_sweep_and_keys_its_own_shards():
    lidar = sim_episode("control", 3, 3.0, 10.0, CFG, trigger="lidar")
    timer = sim_episode("control", 3, 3.0, 10.0, CFG)
    assert len(lidar["stamp_ns"]) == len(timer["stamp_ns"]) == 30  # the simulated lidar's 10 Hz, from its first sweep
    assert (lidar["lidar_age"] == 0).all() and (timer["lidar_age"][:, 0] > 0.05).all()  # fused as each sweep arrives
    np.testing.assert_array_equal(lidar["stamp_ns"] + 100_000_000, timer["stamp_ns"])
    tc = dataclasses.replace(TINY, trigger="lidar")
    assert episode_shards(tc, CFG, "train", 1)[0].key["trigger"] == "lidar"
    assert "trigger" not in episode_shards(TINY, CFG, "train", 1)[0].key  # the timer's keys are as before
    with pytest.raises(ConfigError, match="trigger must be timer"):
        sim_episode("control", 3, 1.0, 10.0, CFG, trigger="radar")


def test_a_timer_phase_or_walk_shows_other_ages_in_training_episodes_only_with_the_truth_at_each_tick():
    timer = sim_episode("control", 3, 3.0, 10.0, CFG)
    later = sim_episode("control", 3, 3.0, 10.0, CFG, phase=0.45)  # inside a 50 Hz control step
    np.testing.assert_allclose(timer["camera_age"][:, 0], 0.1, atol=1e-6)
    np.testing.assert_allclose(later["camera_age"][:, 0], 0.045, atol=1e-6)
    np.testing.assert_allclose(later["lidar_age"][:, 0], 0.045, atol=1e-6)
    n = len(later["imu_age"])
    assert not np.allclose(later["imu_age"], timer["imu_age"][:n])  # its samples too fall otherwise about the tick
    np.testing.assert_array_equal(later["stamp_ns"][:5] - timer["stamp_ns"][:5], 45_000_000)
    # the same drive (it does not depend on the timer): the truth at 0.145 s + k/10 is halfway between the
    # state at the ends of the control steps around it, which the phases 0.4 and 0.5 fuse at
    step_ends = [sim_episode("control", 3, 3.0, 10.0, CFG, phase=p) for p in (0.4, 0.5)]
    n = min(len(e["labelled"]) for e in (later, *step_ends))
    for k in ("velocity", "obstacles"):
        halfway = (step_ends[0][k][:n] + step_ends[1][k][:n]) / 2
        np.testing.assert_allclose(later[k][:n], halfway, atol=1e-5)
        assert np.abs(step_ends[1][k][:n] - halfway).max() > 1e-3  # the step's end would differ
    # walking: the timer one tick in the episode's 30 fast, so every sample's frames are of an age of their own
    walked = sim_episode("control", 3, 3.0, 10.0, CFG, walk=True)
    ages = walked["camera_age"][:, 0]
    assert len(ages) == 30 and (np.diff(ages) < 0).all() and ages.max() - ages.min() > 0.09
    tc = dataclasses.replace(TINY, random_phase=True)
    train_keys = [s.key for s in episode_shards(tc, CFG, "train", 48)]
    phases = [k.get("phase", 0.0) for k in train_keys]
    assert phases[0] == 0.0 and np.histogram(phases, bins=5, range=(0, 1))[0].min() >= 8  # spread over the period
    assert all(k["walk"] for k in train_keys)
    assert all("phase" not in s.key and "walk" not in s.key for s in episode_shards(tc, CFG, "val", 6))


def test_stops_and_extra_tasks_shape_training_episodes_only():
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.robot import RobotEnv

    def commands(stop_share, stand_s=0.0):
        env = RobotEnv("control", faults=FaultConfig())
        sent = []
        step = env.step
        env.step = lambda action: (sent.append(np.array(action)), step(action))[1]
        try:
            for _ in random_drive(env, np.random.default_rng(7), 7, 12.0, stop_share, stand_s):
                pass
        finally:
            env.close()
        return np.array(sent)

    plain, always, some = commands(0.0), commands(1.0), commands(0.5)
    assert len(plain) == 600 and not (plain == 0).all(axis=1).any()
    assert (always == 0).all()
    stood = commands(0.0, stand_s=2.0)  # stands 2 s (100 steps), then drives the same commands from the first
    assert (stood[:100] == 0).all() and (stood[100:] == plain[:500]).all()
    held = np.flatnonzero(np.diff((some == 0).all(axis=1).astype(int)))
    assert (some == 0).all(axis=1).any() and len(held) >= 2  # stops and drives alternate
    tc = dataclasses.replace(TINY, stop_share=0.25, sim_tasks=("memory",))
    assert episode_shards(tc, CFG, "train", 1)[0].key["stop_share"] == 0.25
    assert episode_shards(tc, CFG, "val", 1)[0].key["kind"] == "sim-memory"
    # held-out episodes are the default tasks' and never stop, whatever the training data added
    assert episode_shards(tc, CFG, "test", 2) and [s.key for s in episode_shards(tc, CFG, "test", 2)] == [
        s.key for s in episode_shards(TINY, CFG, "test", 2)]
    # ... and whatever the run's seed, which picks its training and validation episodes
    seed2 = dataclasses.replace(TINY, seed=2)
    assert [s.key for s in episode_shards(seed2, CFG, "test", 2)] == [s.key for s in episode_shards(TINY, CFG, "test", 2)]
    for split in ("train", "val"):
        assert episode_shards(seed2, CFG, split, 1)[0].key != episode_shards(TINY, CFG, split, 1)[0].key
    stops = dataclasses.replace(TINY, stop_share=0.25)
    assert episode_shards(TINY, CFG, "train", 1)[0].key == {  # without stops, the keys are as before
        k: v for k, v in episode_shards(stops, CFG, "train", 1)[0].key.items() if k != "stop_share"}


def test_a_finer_camera_rig_renders_every_split_of_its_own_episodes():
    """--sim-camera-view: the rig is the world's, so the held-out episodes are rendered with it too (their
    own shards); the default rig's keys are as before."""
    fine = dataclasses.replace(TINY, sim_camera_view=128)
    assert fine.rig().camera_image_shape == (128, 512, 3) and TINY.rig().camera_image_shape == (64, 256, 3)
    for split in ("train", "val", "test"):
        shard, plain = episode_shards(fine, CFG, split, 1)[0], episode_shards(TINY, CFG, split, 1)[0]
        assert shard.key == plain.key | {"camera_view": 128} and "camera_view" not in plain.key
        assert shard.make.args[-1] == fine.rig()
    coarse = sim_episode("control", 3, 1.0, 10.0, CFG, sensors=dataclasses.replace(TINY, sim_camera_view=16).rig())
    default = sim_episode("control", 3, 1.0, 10.0, CFG)
    assert coarse["camera_u8"].shape == default["camera_u8"].shape  # resized to the tokenizer's size
    assert not np.array_equal(coarse["camera_u8"], default["camera_u8"])
    for truth in ("velocity", "obstacles", "goal"):  # the same world and drive
        np.testing.assert_array_equal(coarse[truth], default[truth])


@pytest.mark.parametrize("flags, named", [(["--sim-tasks", "control", "radar"], "--sim-tasks radar"),
                                           (["--stop-share", "1.5"], "--stop-share 1.5"),
                                           (["--sim-camera-view", "4"], "--sim-camera-view 4"),
                                           (["--clip-grad-norm", "-1"], "--clip-grad-norm -1.0"),
                                           (["--fault-weights", "1", "-1", "2"], "--fault-weights 1.0 -1.0 2.0"),
                                           (["--fault-weights", "0", "0", "0"], "--fault-weights 0.0 0.0 0.0"),
                                           (["--objective-weights", "goal=-1"], "--objective-weights goal=-1"),
                                           (["--objective-weights", "speed=2"], "--objective-weights speed=2"),
                                           (["--objective-weights", "goal"], "--objective-weights goal:"),
                                           (["--fusion", "concat", "--lidar-motion", "--lidar-motion-direct",
                                             "--trust-floor", "0.01"], "--trust-floor, --lidar-motion-direct"),
                                           (["--fusion", "concat", "--camera-goal-weight", "1"], "--camera-goal-weight")])
def test_bad_data_options_are_named(tmp_path, capsys, flags, named):
    assert main(["train", "-o", str(tmp_path / "run"), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and not (tmp_path / "run").exists()


def test_ground_truth_is_the_true_state():
    from fusion_attn.sim.faults import FaultConfig, FaultSpec
    from fusion_attn.sim.robot import RobotEnv

    # a lidar dropout and a camera blackout for the whole episode change no label
    faults = FaultConfig(lidar_dropout=FaultSpec.window(), camera_blackout=FaultSpec.window())
    env = RobotEnv("control", faults=faults)
    try:
        env.reset(seed=3)
        for _ in range(40):
            obs, *_ = env.step(np.array([0.8, 0.5], np.float32))
        truth = env.ground_truth()
        ahead, left, distance, _ = obs["task"]
        assert truth["goal"][0] == pytest.approx(distance, abs=1e-5)
        assert truth["goal"][1] == pytest.approx(np.arctan2(left, ahead), abs=1e-5)
        assert truth["velocity"] == pytest.approx([0.8, 0.5], abs=0.02)  # the drive has ramped up by now
        clean = RobotEnv("control", faults=FaultConfig())
        clean.reset(seed=3)
        for _ in range(40):
            obs_clean, *_ = clean.step(np.array([0.8, 0.5], np.float32))
        # sector 0 (straight ahead) is at most the clean lidar's range straight ahead
        assert truth["obstacles"][0] <= obs_clean["lidar"][0, 0] + 0.05
        np.testing.assert_allclose(clean.ground_truth()["obstacles"], truth["obstacles"])
        clean.close()
    finally:
        env.close()


class _Asymmetric(Task):
    """A world without a mirror symmetry (a box, a cylinder, the goal's post; side -1: its mirror image)."""

    obs_dim, episode_s = 1, 10.0

    def __init__(self, side: int):
        self.side = side

    def new_episode(self, rng):
        s = self.side
        return Layout(3.0, (0.0, 0.0, 0.0), (
            Geom("box", "box", (1.5, 1.0 * s, 0.3), (0.3, 0.2, 0.3), (0.95, 0.85, 0.1), yaw=0.4 * s),
            Geom("cylinder", "cylinder", (-1.0, -1.5 * s, 0.4), (0.25, 0.4), (0.85, 0.2, 0.85)),
            Geom("post", "cylinder", (2.2, -0.8 * s, 1.0), (0.15, 1.0), TASK_COLOURS["green"], collide=False,
                 retroreflective=True)))

    def observe(self, pose, t_s):
        return np.zeros(1, np.float32)

    def evaluate(self, pose, t_s):
        return 0.0, False, {}

    def goal(self):
        return 2.2, -0.8 * self.side


def _turning_episode(side: int) -> dict[str, np.ndarray]:
    """Two seconds of a robot driving a left (side 1) or right (-1) curve in _Asymmetric(side), through
    sim_episode's own path."""
    def curve(env, rng, seed, seconds, stop_share):
        _, info = env.reset(seed=seed)
        for _ in range(round(seconds * 50)):
            yield info
            *_, info = env.step(np.array([0.4, 0.7 * side], np.float32))

    return sim_episode(_Asymmetric(side), 0, 2.0, 10.0, CFG, drive=curve)


def test_a_mirrored_episode_is_what_the_mirrored_world_gives():
    scene, mirrored_world = _turning_episode(1), _turning_episode(-1)
    mirrored = mirror_sequence(scene, CFG)
    assert len(scene["labelled"]) == 19
    for key in scene:  # mirroring twice gives the episode back, bit for bit
        np.testing.assert_array_equal(mirror_sequence(mirrored, CFG)[key], scene[key])
    for key in ("velocity", "obstacles", "goal"):  # MuJoCo's physics is exactly mirror-symmetric
        np.testing.assert_allclose(mirrored[key], mirrored_world[key], atol=1e-4)
        assert np.abs(scene[key] - mirrored_world[key]).max() > 0.5  # the labels differ unmirrored

    def upper_half(seq):  # (n, H / 2, W, 3) pixels above the horizon: the objects and walls, not the floor's
        p, cols = CFG.camera.patch, CFG.camera.width // CFG.camera.patch  # texture, which has no mirror symmetry
        image = seq["camera_u8"].reshape(-1, CFG.camera.height // p, cols, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return image.reshape(len(image), CFG.camera.height, CFG.camera.width, 3)[:, : CFG.camera.height // 2].astype(float)

    off = np.abs(upper_half(mirrored) - upper_half(mirrored_world)).mean()
    assert off < 3.0 and off < 0.3 * np.abs(upper_half(scene) - upper_half(mirrored_world)).mean()  # pixel noise aside

    def imu_means(seq):
        return imu_samples(seq["imu_chunks"], CFG.imu).mean(axis=(1, 2))  # (n, 6) per IMU_AXES

    np.testing.assert_allclose(imu_means(mirrored), imu_means(mirrored_world), atol=0.03)  # sensor noise aside
    assert np.abs(imu_means(scene) - imu_means(mirrored_world))[:, IMU_AXES.index("gyro_z")].max() > 0.3

    def lidar_sectors(seq):  # the nearest return per sector, as the lidar's self-supervised target
        data, idx = Dataset.join([(seq, 0)]).tensors(), torch.arange(len(seq["labelled"]))
        return targets(data, idx, gather(data, idx, previous=False), CFG)["lidar"][0].numpy()

    off = np.abs(lidar_sectors(mirrored) - lidar_sectors(mirrored_world)).mean()
    assert off < 0.2 * np.abs(lidar_sectors(scene) - lidar_sectors(mirrored_world)).mean()
    # each point's pillar centre, from its y and its offset in the pillar, lies on the tokenizer's grid
    li, points, valid = CFG.lidar, mirrored["lidar_points"].astype(float), mirrored["lidar_mask"]
    per_m = li.grid / (2.0 * li.range_m)
    centre_y = points[..., LIDAR_INDEX["y"]] * li.range_m - points[..., LIDAR_INDEX["dy"]] / per_m
    cell = (centre_y + li.range_m) * per_m - 0.5
    assert valid.sum() > 1000 and np.abs(cell - np.round(cell))[valid].max() < 0.05


def test_mirror_adds_each_simulated_training_episode_mirrored(cache, data):
    train, val = build_datasets(dataclasses.replace(TINY, mirror=True), CFG, cache, progress=False)
    n = len(data)
    assert len(train) == 2 * n and len(val) == len(build_datasets(TINY, CFG, cache, progress=False)[1])
    np.testing.assert_array_equal(train.arrays["velocity"][n:], data.arrays["velocity"] * [1, -1])
    np.testing.assert_array_equal(train.arrays["camera_u8"][:n], data.arrays["camera_u8"])
    # each mirrored episode is a sequence of its own: its first sample, successors and previous frames lie in it
    np.testing.assert_array_equal(train.arrays["seq_start"][n:], data.arrays["seq_start"] + n)
    for link in ("next", "camera_prev", "lidar_prev"):
        own = data.arrays[link]
        np.testing.assert_array_equal(train.arrays[link][n:], np.where(own >= 0, own + n, -1))


def test_target_normalisation_made_in_chunks_is_the_one_made_at_once(data):
    at_once, in_chunks = build_heads(CFG), build_heads(CFG)
    fit_normalisation(at_once, data.tensors(), CFG, len(data), chunk=len(data))
    fit_normalisation(in_chunks, data.tensors(), CFG, len(data), chunk=7)
    buffers = dict(in_chunks.named_buffers())
    assert len(buffers) == 2 * len(OBJECTIVES) and float(buffers["mean_obstacles"].min()) > 0.5  # fitted: metres away
    for name, value in at_once.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_camera_codec_is_the_tokenizer_output():
    rng = np.random.default_rng(0)
    frame = CameraFrame(0, "camera", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "rgb8")
    tok = Tokenizer(CFG)
    x = tok(SensorSnapshot(0, camera=frame), np.ones(4, np.float32))
    enc = encode_sample(x)
    dec = decode_camera(torch.from_numpy(enc["camera_u8"])[None], torch.from_numpy(enc["camera_mask"])[None])[0]
    np.testing.assert_allclose(dec.numpy(), x["camera_patches"], atol=1e-5)


def _faulted(data, sensor, fault, idx=(5, 25, 45)):
    t = data.tensors()
    idx = torch.tensor(idx)
    plan = FaultPlan.fixed(len(idx), int(sensor), fault)
    return t, idx, gather(t, idx), corrupt(t, idx, plan, CFG, TINY.fusion_hz, torch.Generator().manual_seed(0))


def _unchanged(clean, x, but):
    """Every input but those named starting with `but` (a prefix or a tuple of them) is as clean."""
    assert clean.keys() == x.keys()
    for k in clean:
        if not k.startswith(but):
            assert torch.equal(clean[k], x[k]), k


def test_drop_masks_the_sensor_only(data):
    for m in CFG.sensors:
        _, _, clean, x = _faulted(data, m, "drop")
        name = m.name.lower()
        assert not x[f"{name}_mask"].any() and clean[f"{name}_mask"].any()
        masks = (f"{name}_mask",)
        if m is not Modality.IMU:  # its previous frame is gone too
            assert not x[f"{name}_prev_mask"].any() and clean[f"{name}_prev_mask"].any()
            masks += (f"{name}_prev_mask",)
        _unchanged(clean, x, masks)


def test_zeroed_sensors_look_as_the_node_would_tokenize_them(data):
    _, _, clean, x = _faulted(data, Modality.CAMERA, "zero")
    black = Tokenizer(CFG)(SensorSnapshot(0, camera=CameraFrame(0, "c", np.zeros((64, 64, 3), np.uint8), "rgb8")),
                           np.ones(4, np.float32))["camera_patches"]
    assert torch.allclose(x["camera_patches"], torch.from_numpy(black).expand(3, -1, -1))
    assert torch.equal(x["camera_prev_patches"], x["camera_patches"])  # the fault lasts: black before too
    assert x["camera_mask"].all() and x["camera_prev_mask"].all()  # a black image is still an image
    _unchanged(clean, x, ("camera_patches", "camera_prev_patches"))
    _, _, clean, x = _faulted(data, Modality.IMU, "zero")
    assert (imu_samples(x["imu_chunks"], CFG.imu) == 0).all() and clean["imu_chunks"].abs().sum() > 0
    assert torch.equal(x["imu_chunks"][..., [IMU_DT, IMU_COUNT]], clean["imu_chunks"][..., [IMU_DT, IMU_COUNT]])
    _, _, clean, x = _faulted(data, Modality.LIDAR, "zero")
    assert not x["lidar_mask"].any() and not x["lidar_prev_mask"].any()  # no points: the sync drops the sweep


def test_noise_perturbs_only_valid_tokens_of_one_sensor(data):
    _, _, clean, x = _faulted(data, Modality.CAMERA, "noise")
    diff = (x["camera_patches"] - clean["camera_patches"]).std()
    assert 0.5 < float(diff) < 1.5  # 60 pixel levels / 255 / ImageNet std ~ 1
    # the previous frame is noisy too, with noise of its own (not the same pattern twice)
    prev_noise = x["camera_prev_patches"] - clean["camera_prev_patches"]
    assert 0.5 < float(prev_noise.std()) < 1.5
    assert not torch.allclose(prev_noise, x["camera_patches"] - clean["camera_patches"], atol=0.1)
    _unchanged(clean, x, ("camera_patches", "camera_prev_patches"))
    _, _, clean, x = _faulted(data, Modality.LIDAR, "noise")
    invalid = ~x["lidar_mask"]
    assert (x["lidar_points"][invalid] == 0).all() and not torch.equal(x["lidar_points"], clean["lidar_points"])
    assert not torch.equal(x["lidar_prev_points"], clean["lidar_prev_points"])
    assert (x["lidar_prev_points"][~x["lidar_prev_mask"]] == 0).all()
    _unchanged(clean, x, ("lidar_points", "lidar_prev_points"))
    # the points move: their coordinates, range and offsets in the pillar; not intensity or point count
    valid = x["lidar_mask"]
    moved = (x["lidar_points"] != clean["lidar_points"])[valid].any(0)
    assert [f for f, m in zip(LIDAR_FEATURES, moved) if m] == ["x", "y", "z", "range", "dx", "dy", "dz"]
    p = x["lidar_points"][valid]
    torch.testing.assert_close(p[:, LIDAR_INDEX["range"]], torch.hypot(p[:, LIDAR_INDEX["x"]], p[:, LIDAR_INDEX["y"]]))
    _, _, clean, x = _faulted(data, Modality.IMU, "noise")
    assert not torch.equal(imu_samples(x["imu_chunks"], CFG.imu), imu_samples(clean["imu_chunks"], CFG.imu))
    assert torch.equal(x["imu_chunks"][..., [IMU_DT, IMU_COUNT]], clean["imu_chunks"][..., [IMU_DT, IMU_COUNT]])


def test_frozen_and_delayed_sensors_show_old_content(data):
    t, idx, clean, x = _faulted(data, Modality.CAMERA, "freeze")
    older = torch.maximum(idx - FREEZE_LAG[1], t["seq_start"][idx])
    assert torch.equal(x["camera_patches"], gather(t, older)["camera_patches"])
    assert not torch.equal(x["camera_patches"], clean["camera_patches"])
    assert torch.equal(x["camera_age"], clean["camera_age"])  # re-sent with fresh stamps
    t, idx, clean, x = _faulted(data, Modality.LIDAR, "delay")
    late = gather(t, idx - DELAY_LAG)
    assert torch.equal(x["lidar_points"], late["lidar_points"])
    assert torch.equal(x["lidar_prev_points"], late["lidar_prev_points"])  # the late sweep's own previous one
    assert torch.allclose(x["lidar_age"], clean["lidar_age"] + DELAY_LAG / TINY.fusion_hz)
    assert torch.allclose(x["lidar_prev_age"], clean["lidar_prev_age"] + DELAY_LAG / TINY.fusion_hz)
    _unchanged(clean, x, "lidar")
    # at an episode's first sample there is nothing older: its own content, still aged
    t, idx, clean, x = _faulted(data, Modality.LIDAR, "delay", idx=(30,))
    assert torch.equal(x["lidar_points"], clean["lidar_points"])


def test_a_frozen_sensor_repeats_one_frame_as_current_and_previous(data):
    for m, name, content in ((Modality.CAMERA, "camera", "patches"), (Modality.LIDAR, "lidar", "points")):
        t, idx, clean, x = _faulted(data, m, "freeze")
        assert x[f"{name}_prev_mask"].any()
        assert torch.equal(x[f"{name}_{content}"], x[f"{name}_prev_{content}"])  # nothing changed: exactly
        assert torch.equal(x[f"{name}_mask"], x[f"{name}_prev_mask"])
        assert not torch.equal(clean[f"{name}_{content}"], clean[f"{name}_prev_{content}"])  # a live one moves
        # stamps go on as before: the previous frame as long before as the clean sample's
        assert torch.equal(x[f"{name}_age"], clean[f"{name}_age"])
        prev = x[f"{name}_prev_mask"] if name == "camera" else x[f"{name}_prev_mask"].any(-1)
        torch.testing.assert_close(x[f"{name}_prev_age"][prev], clean[f"{name}_prev_age"][prev])
        _unchanged(clean, x, name)
    # the IMU holds one reading: every valid sample of the window alike, the older sample's newest one
    t, idx, clean, x = _faulted(data, Modality.IMU, "freeze")
    for row in range(len(idx)):
        samples = imu_samples(x["imu_chunks"][row], CFG.imu)[x["imu_mask"][row]]  # (valid chunks, S, 6)
        assert len(samples) and torch.equal(samples, samples[:1, :1].expand_as(samples))
    older = torch.maximum(idx - FREEZE_LAG[1], t["seq_start"][idx])
    held = imu_samples(gather(t, older)["imu_chunks"], CFG.imu)[:, -1, -1]
    torch.testing.assert_close(imu_samples(x["imu_chunks"], CFG.imu)[:, -1, -1], held)
    assert held.abs().sum() > 0 and not torch.equal(x["imu_chunks"], clean["imu_chunks"])
    assert torch.equal(x["imu_age"], clean["imu_age"])  # fresh stamps
    _unchanged(clean, x, "imu")


def test_a_first_frame_comes_without_its_previous_one_unless_frozen(data):
    t, idx = data.tensors(), torch.tensor((5, 25, 45))
    clean = gather(t, idx)
    for fault, sensor in (("noise", Modality.IMU), ("freeze", Modality.CAMERA)):
        plan = FaultPlan.fixed(len(idx), int(sensor), fault)
        plan.first_frame = torch.tensor([[True, False], [False, True], [True, True]])
        x = corrupt(t, idx, plan, CFG, TINY.fusion_hz, torch.Generator().manual_seed(0))
        for k, name in enumerate(("camera", "lidar")):
            first = plan.first_frame[:, k] & (not (sensor == k and fault == "freeze"))
            mask = x[f"{name}_prev_mask"].flatten(1)
            assert not mask[first].any() and (x[f"{name}_prev_age"][first] == 0).all()
            torch.testing.assert_close(mask[~first], clean[f"{name}_prev_mask"].flatten(1)[~first])
            assert torch.equal(x[f"{name}_mask"], clean[f"{name}_mask"])  # the frame itself is there
    # a frozen camera keeps the previous frame it repeats: without one it could not be told from a clean first frame
    assert x["camera_prev_mask"].any(1).all()


def test_a_lone_sensor_keeps_its_frame_and_every_other_one_is_gone(data):
    t, idx = data.tensors(), torch.tensor((5, 25, 45, 55))
    clean = gather(t, idx)
    plan = FaultPlan.fixed(len(idx), int(Modality.LIDAR), "drop")
    plan.alone = torch.tensor([int(Modality.CAMERA), int(Modality.LIDAR), int(Modality.IMU), -1])
    x = corrupt(t, idx, plan, CFG, TINY.fusion_hz, torch.Generator().manual_seed(0))
    present = {name: x[f"{name}_mask"].flatten(1).any(1) for name in ("camera", "lidar", "imu")}
    assert present["camera"].tolist() == [True, True, False, True]
    assert present["imu"].tolist() == [False, True, True, True]
    assert not present["lidar"].any()  # dropped by the fault in every row
    # the lone camera's frame and previous frame as they were; a gone camera's previous frame gone with it
    assert torch.equal(x["camera_patches"][0], clean["camera_patches"][0])
    assert torch.equal(x["camera_prev_mask"][0], clean["camera_prev_mask"][0])
    assert not x["camera_prev_mask"][2].any()
    # row 1 would keep the lidar its fault dropped, so nothing at all: the row keeps the others (above)
    # drawn: each sample alone with the share asked for, and not at all without it (the earlier streams)
    gen = torch.Generator().manual_seed(1)
    assert FaultPlan.draw(4000, 0.6, gen).alone is None
    alone = FaultPlan.draw(4000, 0.6, gen, lone_share=0.25).alone
    assert 0.22 < (alone >= 0).float().mean() < 0.28 and set(alone[alone >= 0].tolist()) == {0, 1, 2}


def test_a_frozen_imu_keeps_its_live_window_timing(data):
    # a driver re-sending its last reading with fresh stamps, at its rate: the window's chunks, their sample
    # spacing and count are the live sample's; only the reading is stuck (at an episode's start, the older
    # sample's shorter history would otherwise give the fault away by its mask)
    _, _, clean, x = _faulted(data, Modality.IMU, "freeze")
    assert torch.equal(x["imu_mask"], clean["imu_mask"])
    assert torch.equal(x["imu_chunks"][..., [IMU_DT, IMU_COUNT]], clean["imu_chunks"][..., [IMU_DT, IMU_COUNT]])


@pytest.mark.parametrize("where,left", [(0.25, True), (0.75, False)])
def test_a_partly_occluded_camera_is_black_on_one_half(data, where, left):
    t = data.tensors()
    idx = torch.tensor((5, 25, 45))
    clean = gather(t, idx)
    x = corrupt(t, idx, FaultPlan.fixed(3, int(Modality.CAMERA), "partial", where=where), CFG, TINY.fusion_hz,
                torch.Generator().manual_seed(0))
    black = Tokenizer(CFG)(SensorSnapshot(0, camera=CameraFrame(0, "c", np.zeros((64, 64, 3), np.uint8), "rgb8")),
                           np.ones(4, np.float32))["camera_patches"]
    cols = CFG.camera.width // CFG.camera.patch
    on_left = torch.arange(CFG.camera.tokens) % cols < cols // 2
    hidden = on_left if left else ~on_left
    for key in ("camera_patches", "camera_prev_patches"):
        is_black = (x[key] == torch.from_numpy(black)).all(-1)  # (B, N_c)
        assert (is_black.sum(1) == CFG.camera.tokens // 2).all()  # exactly half the patches
        assert is_black[:, hidden].all() and torch.equal(x[key][:, ~hidden], clean[key][:, ~hidden])
    assert x["camera_mask"].all() and x["camera_prev_mask"].all()  # still an image, all of it
    _unchanged(clean, x, ("camera_patches", "camera_prev_patches"))


@pytest.mark.parametrize("where", [0.0, 0.4, 0.9])
def test_a_partly_blocked_lidar_loses_one_sector(data, where):
    t = data.tensors()
    idx = torch.tensor((5, 25, 45))
    clean = gather(t, idx)
    x = corrupt(t, idx, FaultPlan.fixed(3, int(Modality.LIDAR), "partial", where=where), CFG, TINY.fusion_hz,
                torch.Generator().manual_seed(0))
    start = 2 * math.pi * where
    for key in ("lidar_points", "lidar_prev_points"):
        mask = key.replace("points", "mask")

        def in_sector(points):
            angle = torch.atan2(points[..., LIDAR_INDEX["y"]], points[..., LIDAR_INDEX["x"]])
            return torch.remainder(angle - start, 2 * math.pi) < 2 * math.pi / 3

        blocked = in_sector(clean[key]) & clean[mask]
        assert blocked.sum() > 10  # the sector held points
        assert not (in_sector(x[key]) & x[mask]).any()  # none left in it
        assert torch.equal(x[mask], clean[mask] & ~blocked)  # all the others kept, unmoved
        assert torch.equal(x[key][x[mask]], clean[key][x[mask]]) and (x[key][~x[mask]] == 0).all()
        # the rest of the sweep: about two thirds of the points around the sensor
        assert 0.4 < float(x[mask].sum() / clean[mask].sum()) < 0.9
    _unchanged(clean, x, "lidar")


def test_a_partly_failed_imu_reads_no_rotation(data):
    _, _, clean, x = _faulted(data, Modality.IMU, "partial")
    gyro = torch.tensor([a.startswith("gyro") for a in IMU_AXES])
    samples, before = imu_samples(x["imu_chunks"], CFG.imu), imu_samples(clean["imu_chunks"], CFG.imu)
    assert (samples[..., gyro] == 0).all() and before[..., gyro].abs().sum() > 0
    torch.testing.assert_close(samples[..., ~gyro], before[..., ~gyro])
    _unchanged(clean, x, "imu_chunks")


def test_faults_reach_the_previous_frames_and_the_trust_labels(data):
    # every fault on every sensor: finite inputs, the labels the trust learns, nothing else touched
    t = data.tensors()
    idx = torch.tensor((1, 5, 25, 31, 45))
    clean = gather(t, idx)
    for m in CFG.sensors:
        for fault in FAULTS:
            plan = FaultPlan.fixed(len(idx), int(m), fault)
            x = corrupt(t, idx, plan, CFG, TINY.fusion_hz, torch.Generator().manual_seed(1))
            assert all(torch.isfinite(v).all() for v in x.values() if v.is_floating_point()), (m, fault)
            others = [n for k, n in enumerate(("camera", "lidar", "imu")) if k != m]
            _unchanged({k: v for k, v in clean.items() if k.startswith(tuple(others))},
                       {k: v for k, v in x.items() if k.startswith(tuple(others))}, "none")
            assert plan.content_faulted()[:, m].all() == (fault in ("zero", "noise", "freeze", "partial"))


def test_goal_at_frames_interpolates_between_the_samples_around_each_stamp():
    # a robot turning left at 1 rad/s about a goal 2 m away: its bearing falls by 0.1 rad per 0.1 s sample
    n = 6
    stamp_ns = np.arange(n, dtype=np.int64) * 100_000_000
    part = {"stamp_ns": stamp_ns, "labelled": np.ones(n, bool),
            "goal": np.stack([np.full(n, 2.0), 0.5 - 0.1 * np.arange(n)], -1).astype(np.float32),
            "camera_mask": np.ones((n, 4), bool), "camera_age": np.full((n, 4), 0.05, np.float32)}
    part["camera_mask"][3] = False  # no frame
    part["labelled"][5] = False  # nothing after sample 4 to bracket sample 5's frame
    at = goal_at_frames(part, "camera")
    assert np.isnan(at[[0, 3, 5]]).all()  # the first frame precedes every label
    np.testing.assert_allclose(at[[1, 2, 4], 0], 2.0 * np.cos(0.05), rtol=1e-6)  # halfway along the chord
    np.testing.assert_allclose(at[[1, 2, 4], 1], [0.45, 0.35, 0.15], atol=1e-5)
    np.testing.assert_allclose(interpolate_goal(np.array([1.0, 3.0]), np.array([1.0, -3.0]), 0.5),
                               [math.cos(math.pi - 3.0), math.pi], rtol=1e-6)  # the short way through +-pi
    part["goal"][2] = np.nan  # a goal missing: the frame it would bracket (sample 2's, at 0.15 s) gets none
    at = goal_at_frames(part, "camera")
    assert np.isnan(at[2]).all() and np.isfinite(at[[1, 4]]).all()


def test_the_camera_sees_the_goal_where_goal_at_camera_says(data):
    """In the simulated camera's own frames, the green post stands at the bearing of the goal at the
    frame's stamp, not at the fusion instant's (the frame is a period older and the robot turns)."""
    a = data.arrays
    assert (a["camera_age"][a["camera_mask"]] > 0.05).all()  # the frames are older than the instant
    keep = np.flatnonzero(np.isfinite(a["goal_at_camera"]).all(-1) & np.isfinite(a["goal"]).all(-1)
                          & (np.abs(a["velocity"][:, 1]) > 0.3))  # turning
    assert len(keep) > 5
    patches = decode_camera(torch.from_numpy(a["camera_u8"][keep]), torch.from_numpy(a["camera_mask"][keep])).numpy()
    c = CFG.camera
    image = patches.reshape(len(keep), c.height // c.patch, c.width // c.patch, c.patch, c.patch, 3).transpose(0, 1, 3, 2, 4, 5)
    image = denormalise_pixels(image.reshape(len(keep), c.height, c.width, 3))
    green = np.clip(image[..., 1] - np.maximum(image[..., 0], image[..., 2]), 0, None)[:, : c.height // 2].sum(1)
    seen = (green.argmax(1) + 0.5) / c.width  # the post's column, as a share of the panorama's width

    def off(goal):
        d = np.abs(seen - SensorConfig().image_x(goal[keep, 1]))
        return np.minimum(d, 1 - d)

    assert off(a["goal_at_camera"]).mean() < 0.5 * off(a["goal"]).mean()
    assert off(a["goal_at_camera"]).mean() < 1.5 / c.width  # about a pixel


def test_previous_frames_follow_the_dataset_links(data):
    t = data.tensors()
    a = data.arrays
    assert a["camera_prev"][0] == -1 and a["camera_prev"][30] == -1  # an episode's first sample has none
    assert (a["camera_prev"][1:30] == np.arange(29)).all() and (a["lidar_prev"][31:60] == np.arange(30, 59)).all()
    idx = torch.tensor((0, 7, 30, 44))
    x = gather(t, idx)
    assert not x["camera_prev_mask"][[0, 2]].any() and not x["lidar_prev_mask"][[0, 2]].any()
    assert not x["camera_prev_age"][[0, 2]].any()
    before = gather(t, torch.tensor((6, 43)))
    torch.testing.assert_close(x["camera_prev_patches"][[1, 3]], before["camera_patches"])
    torch.testing.assert_close(x["lidar_prev_points"][[1, 3]], before["lidar_points"])
    # the previous frame is one sensor period older: 0.1 s at 10 Hz
    torch.testing.assert_close(x["camera_prev_age"][[1, 3]] - x["camera_age"][[1, 3]], torch.full((2, 48), 0.1))
    assert gather(t, idx, previous=False).keys() == {k for k in x if "_prev_" not in k}


def test_attention_avoidance_trains_the_token_fusion_only(data):
    t = data.tensors()
    idx = torch.tensor((5, 25, 45))
    x = corrupt(t, idx, FaultPlan.fixed(3, int(Modality.CAMERA), "zero"), CFG, TINY.fusion_hz,
                torch.Generator().manual_seed(0))
    plan = FaultPlan.fixed(3, int(Modality.CAMERA), "zero")
    for fusion in ("token", "sensor"):
        torch.manual_seed(0)
        model = FusionModel(FusionConfig(model=ModelConfig(fusion=fusion))).train()
        out = model.run(x, torch.ones(3, 4))
        avoid = fault_attention(out["attention"], plan)
        assert avoid.item() == pytest.approx(float(out["attention"][:, 0].mean().detach()), abs=1e-6)
        if fusion == "token":  # the token softmax learns to look away from the black image
            avoid.backward()
            assert model.cross.q.weight.grad.abs().sum() > 0
        else:  # the sensor fusion's weights are a function of the (detached) trust and τ: the trust loss steers them
            assert not avoid.requires_grad


def test_faults_hit_the_sensors_in_proportion_to_their_weights():
    def draw(weights):
        return FaultPlan.draw(20_000, 0.6, torch.Generator().manual_seed(0), weights)

    plain, equal = draw((1.0, 1.0, 1.0)), draw((2.0, 2.0, 2.0))
    gen = torch.Generator().manual_seed(0)  # the draw before sensor weights existed: earlier recipes' streams
    faulted = torch.rand(20_000, generator=gen) < 0.6
    before = torch.where(faulted, torch.randint(0, 3, (20_000,), generator=gen), -1)
    before_fault = torch.randint(0, len(FAULTS), (20_000,), generator=gen)
    for p in (plain, equal):
        assert torch.equal(p.sensor, before) and torch.equal(p.fault, before_fault)
    imu_only, more_imu = draw((0.0, 0.0, 1.0)), draw((1.0, 1.0, 2.0))
    assert set(imu_only.sensor.unique().tolist()) == {-1, 2}
    faulted = more_imu.sensor[more_imu.sensor >= 0]
    assert (more_imu.sensor >= 0).float().mean().item() == pytest.approx(0.6, abs=0.02)  # how many: unchanged
    assert [(faulted == m).float().mean().item() for m in range(3)] == pytest.approx([0.25, 0.25, 0.5], abs=0.02)


def test_attention_avoidance_weighs_sensors_whose_content_is_gone():
    attention = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    attention = attention[:, :, None].expand(-1, -1, 4)  # (B, 3, H): the same on every head
    plan = FaultPlan(sensor=torch.tensor([0, 1, 2, -1]),
                     fault=torch.tensor([FAULTS.index(f) for f in ("zero", "noise", "zero", "zero")]),
                     lag=torch.zeros(4, dtype=torch.long), strength=torch.tensor([1.0, 0.5, 1.0, 1.0]),
                     where=torch.zeros(4))
    # the black camera (mass 0.5) and the zero IMU (0.8); not the noisy lidar (it still informs) or the
    # sample without a fault
    assert fault_attention(attention, plan).item() == pytest.approx((0.5 + 0.8) / 2)
    no_points = FaultPlan(sensor=torch.tensor([1, 1, 1, 1]), fault=torch.full((4,), FAULTS.index("zero")),
                          lag=torch.zeros(4, dtype=torch.long), strength=torch.ones(4), where=torch.zeros(4))
    assert fault_attention(attention, no_points).item() == 0.0  # masked: nothing to avoid
    assert fault_attention(attention, FaultPlan.fixed(4, 2, "freeze")).item() == 0.0


def test_consistency_pulls_faulted_samples_towards_their_healthy_fusion(data):
    t = data.tensors()
    idx = torch.tensor((25, 45))
    plan = FaultPlan(sensor=torch.tensor([0, 2]), fault=torch.full((2,), FAULTS.index("drop")),
                     lag=torch.zeros(2, dtype=torch.long), strength=torch.ones(2), where=torch.zeros(2))
    torch.manual_seed(0)
    model = FusionModel(FusionConfig()).eval()
    clean, tau = gather(t, idx), torch.ones(2, 4)
    fused = model.run(corrupt(t, idx, plan, CFG, TINY.fusion_hz, torch.Generator().manual_seed(0)), tau)["fused"]
    loss = fused_consistency(model, clean, fused, tau)
    with torch.no_grad():
        healthy = model.run(clean, tau)["fused"]
    assert loss.item() == pytest.approx(((fused - healthy) ** 2).mean().item(), rel=1e-5) and loss > 0
    loss.backward()  # into the faulted pass only: the healthy target is a constant
    assert model.cross.q.weight.grad.abs().sum() > 0
    # a healthy sample is its own target; a batch without a faulted sample gives 0
    assert fused_consistency(model, clean, healthy, tau).item() == pytest.approx(0.0, abs=1e-10)
    assert fused_consistency(model, gather(t, idx[:0]), fused[:0], tau[:0]).item() == 0.0


def _moved_by_one_token(head, cfg: FusionConfig) -> torch.Tensor:
    """How much a camera goal head's outputs move when one camera token (row 2, column 5) changes."""
    tokens = torch.randn(2, cfg.camera.tokens, cfg.model.dim)
    moved = tokens.clone()
    moved[:, 2 * 8 + 5] += 1.0
    return (head(moved) - head(tokens)).abs()


def test_the_lidar_goal_objective_asks_for_the_posts_pillars_and_the_goal():
    from fusion_attn.learn.objectives import LidarGoalPillars
    from fusion_attn.sim.sensors import RETROREFLECTIVE_INTENSITY

    heads = Heads(8, {"goal": 3})
    heads.mean_goal.copy_(torch.tensor([3.0, 0.0, 0.0]))
    heads.std_goal.copy_(torch.tensor([2.0, 0.5, 0.5]))
    # three pillars of two points; sample 0's post returns in pillars 0 and 2, sample 1 has none
    points = torch.zeros(2, 3, 2, len(LIDAR_FEATURES))
    code = math.log1p(RETROREFLECTIVE_INTENSITY) / math.log(256.0)
    points[0, 0, 1, LIDAR_INDEX["log_intensity"]] = code
    points[0, 2, 0, LIDAR_INDEX["log_intensity"]] = code
    points[1, :, :, LIDAR_INDEX["log_intensity"]] = math.log1p(200.0) / math.log(256.0)  # the brightest else
    mask = torch.ones(2, 3, 2, dtype=torch.bool)
    post = post_pillars(points, mask)
    assert post.tolist() == [[True, False, True], [False, False, False]]
    present = torch.tensor([[True, True, True], [True, True, False]])
    goal, valid = torch.tensor([[5.0, math.pi / 2], [1.0, 0.0]]), torch.tensor([True, True])
    right = torch.zeros(2, 3, 4)
    right[0, [0, 2], 0] = 20.0  # sure it is in one of the two
    right[0, :, 1:] = torch.tensor([(5.0 - 3.0) / 2.0, 0.0, 1.0 / 0.5])  # distance 5 m, bearing 90°
    even = math.log(2.0)  # the least cross-entropy against a target split over two pillars
    assert lidar_goal_loss(right, post, present, goal, valid, heads).item() == pytest.approx(even, abs=1e-5)
    # without the bearing (two outputs), only the distance is asked
    assert lidar_goal_loss(right[..., :2], post, present, goal, valid, heads).item() == pytest.approx(even, abs=1e-5)
    far = right.clone()
    far[0, 0, 1] += 0.5  # half the spread too far at one of the two pillars: half of 0.25
    assert lidar_goal_loss(far, post, present, goal, valid, heads).item() == pytest.approx(even + 0.125, abs=1e-5)
    turned = right.clone()
    turned[0, 2, 3] = 0.0  # at one of the two pillars a sine of 0 where it is 1: (1 / 0.5)² at half the share
    assert lidar_goal_loss(turned, post, present, goal, valid, heads).item() == pytest.approx(even + 2.0, abs=1e-5)
    assert lidar_goal_loss(turned[..., :2], post, present, goal, valid, heads).item() == pytest.approx(even, abs=1e-5)
    assert lidar_goal_loss(right, post, present, goal, torch.tensor([False, True]), heads).item() == 0.0
    # the reader asks the pillars only, not a scan-match token after them
    cfg = FusionConfig()
    assert LidarGoalPillars(cfg)(torch.zeros(2, cfg.lidar.tokens + 1, 64)).shape == (2, cfg.lidar.tokens, 2)
    assert LidarGoalPillars(cfg, bearing=True)(torch.zeros(2, cfg.lidar.tokens + 1, 64)).shape == (2, cfg.lidar.tokens, 4)


def test_the_camera_goal_objective_asks_for_the_goals_column_its_distance_and_place():
    cfg = FusionConfig()  # 8 columns of patches over the 360° rig: each 45°
    heads = Heads(8, {"goal": 3})
    heads.mean_goal.copy_(torch.tensor([3.0, 0.0, 0.0]))
    heads.std_goal.copy_(torch.tensor([2.0, 1.0, 1.0]))
    image_x = SensorConfig().image_x
    # straight ahead sits on the seam of columns 3 and 4; a goal left of it is in column 3, near its right edge
    goal = torch.tensor([[5.0, math.radians(1.0)], [1.0, math.radians(-100.0)], [2.0, 0.3]])
    x = torch.as_tensor(image_x(goal[:, 1].numpy()), dtype=torch.float32) * 8
    col = x.floor().long()
    assert col.tolist() == [3, 6, 3]
    right = torch.full((3, 8, 3), 0.0)
    right[torch.arange(3), col, 0] = 20.0  # sure of the column
    right[torch.arange(3), col, 1] = (goal[:, 0] - 3.0) / 2.0
    right[torch.arange(3), col, 2] = 2 * (x - col - 0.5)
    valid = torch.tensor([True, True, False])
    assert camera_goal_loss(right, goal, valid, image_x, heads).item() == pytest.approx(0.0, abs=1e-6)
    assert camera_goal_loss(right, goal, torch.zeros(3, dtype=torch.bool), image_x, heads).item() == 0.0
    far, elsewhere, off = right.clone(), right.clone(), right.clone()
    far[0, 3, 1] += 0.5  # a metre too far: half its spread (2 m), squared
    assert camera_goal_loss(far, goal, valid, image_x, heads).item() == pytest.approx(0.25 / 2, abs=1e-5)
    elsewhere[0, 4, 0] = 40.0  # sure of the wrong column
    assert camera_goal_loss(elsewhere, goal, valid, image_x, heads).item() == pytest.approx(20.0 / 2, abs=1e-3)
    off[1, 6, 2] += 1.0  # half a column off
    assert camera_goal_loss(off, goal, valid, image_x, heads).item() == pytest.approx(1.0 / 2, abs=1e-5)
    # the head reads the mean of each column's rows: a token in column 5 moves column 5 only
    changed = _moved_by_one_token(CameraGoalColumns(cfg), cfg).sum((0, 2))
    assert changed[5] > 0 and changed[torch.arange(8) != 5].sum() == 0


def test_the_token_goal_objective_asks_for_the_patch_of_the_posts_top_edge():
    cfg = FusionConfig()  # 6 x 8 patches of 16 pixels; the rig's views 90° high: the horizon at row 3's top
    heads = Heads(8, {"goal": 3})
    heads.mean_goal.copy_(torch.tensor([3.0, 0.0, 0.0]))
    heads.std_goal.copy_(torch.tensor([2.0, 1.0, 1.0]))
    post_top = partial(post_top_in_image, SensorConfig())
    # far: the top edge just above the horizon (row 2); near: above the view, so the post's top pixel is row 0's
    goal = torch.tensor([[6.0, math.radians(10.0)], [0.5, math.radians(-100.0)]])
    x, y = post_top(goal[:, 1].numpy(), goal[:, 0].numpy())
    assert y[1] < 0 < y[0] < 0.5
    col, row = np.floor(x * 8).astype(int), np.floor(np.clip(y, 0, None) * 6).astype(int)
    assert col.tolist() == [3, 6] and row.tolist() == [2, 0]
    right = torch.zeros(2, 6, 8, 4)
    b = torch.arange(2)
    right[b, row, col, 0] = 20.0  # sure of the patch
    right[b, row, col, 1] = (goal[:, 0] - 3.0) / 2.0
    right[b, row, col, 2] = torch.as_tensor(2 * (x * 8 - col - 0.5), dtype=torch.float32)
    right[b, row, col, 3] = torch.as_tensor(2 * (np.clip(y, 0, None) * 6 - row - 0.5), dtype=torch.float32)
    valid = torch.ones(2, dtype=torch.bool)
    assert camera_goal_token_loss(right, goal, valid, post_top, heads).item() == pytest.approx(0.0, abs=1e-5)
    low, elsewhere = right.clone(), right.clone()
    low[0, 2, 3, 3] += 1.0  # half a patch below the edge
    assert camera_goal_token_loss(low, goal, valid, post_top, heads).item() == pytest.approx(1.0 / 2, abs=1e-5)
    elsewhere[0, 3, 3, 0] = 40.0  # sure of the patch below: the column is right, the range is not
    assert camera_goal_token_loss(elsewhere, goal, valid, post_top, heads).item() == pytest.approx(20.0 / 2, abs=1e-3)
    # each patch answers for itself: a token moves its own patch's outputs only
    changed = _moved_by_one_token(CameraGoalTokens(cfg), cfg).sum((0, 3))
    assert changed[2, 5] > 0 and changed.sum() == changed[2, 5]


def test_training_writes_checkpoint_heads_and_tensorboard(tmp_path, cache):
    out = tmp_path / "run"
    m = train(TINY, out, cache=cache, progress=False, command="test")
    model = load_checkpoint(out / "model.safetensors")  # the node's loader: strict about keys
    _, _, info = read_checkpoint(out / "model.safetensors")
    assert info["seed"] == 0 and info["command"] == "test" and info["data"]["train_samples"] == 60
    heads = load_heads(heads_path(out / "model.safetensors"))
    assert heads.sizes == target_sizes(model.cfg)
    assert m["steps"] == 6 and all(np.isfinite(v) for v in m["final_train_losses_ema"].values())
    assert set(m["val"]) == {"clean"} | {f"{s}_{f}" for s in ("camera", "lidar", "imu") for f in FAULTS}
    assert m["val"]["camera_drop"]["attention_faulted"] == 0.0  # a masked sensor gets no attention
    assert m["val"]["camera_drop"]["trust_faulted"] == 0.0  # nor any trust
    assert "trust" in m["final_train_losses_ema"] and "avoid" not in m["final_train_losses_ema"]  # avoid: off by default
    assert "stale" not in m["final_train_losses_ema"]  # the stale-content path: off by default
    assert "consistency" not in m["final_train_losses_ema"]  # nor the consistency objective
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/total", "train/camera", "train/velocity", "train/trust", "val_clean/loss_goal",
            "val_clean/trust_camera", "val_imu_freeze/trust_auroc"} <= set(tags)
    assert "train/avoid" not in tags
    assert [e.step for e in acc.Scalars("train/total")] == [2, 4, 6]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert info["git_commit"] == m["git_commit"] == _expected_commit()


def _train_cli(out, cache, *flags):
    return main(["train", "-o", str(out), "--batch", "8", "--sim-episodes", "2", "--val-episodes", "1",
                 "--sim-seconds", "3", "--eval-every", "100", "--cache", str(cache), "--no-progress", *flags])


def test_training_learns_the_trust_and_validation_reports_it(tmp_path, cache):
    out = tmp_path / "run"
    assert _train_cli(out, cache, "--steps", "20") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 20
    assert (m["train_config"]["sensor_fusion"], m["train_config"]["trust_weight"], m["train_config"]["avoid_weight"]) \
        == ("sensor", 1.0, 0.0)
    for losses in (m["first_step_losses"], m["final_train_losses_ema"]):
        assert "trust" in losses and "avoid" not in losses and 0 < losses["trust"] < 5
    assert load_checkpoint(out / "model.safetensors").cfg.model.fusion == "sensor"
    val = m["val"]
    clean = val["clean"]
    assert "trust_auroc" not in clean and "trust_faulted" not in clean
    for name in ("camera", "lidar", "imu"):
        assert 0 < clean[f"trust_{name}"] < 1
    assert clean["attention_camera"] + clean["attention_lidar"] + clean["attention_imu"] == pytest.approx(1, abs=1e-3)
    for sensor in ("camera", "lidar", "imu"):
        for fault in FAULTS:
            row = val[f"{sensor}_{fault}"]
            assert 0 <= row["trust_faulted"] <= 1 and 0 <= row["trust_auroc"] <= 1, (sensor, fault)
    # an absent sensor is trusted not at all: below every clean sample's trust
    for cond in ("camera_drop", "lidar_drop", "lidar_zero", "imu_drop"):
        assert val[cond]["trust_faulted"] == 0.0 and val[cond]["trust_auroc"] == 1.0, cond
        assert f"trust_{cond.split('_')[0]}" not in val[cond]  # no sample has it present


def test_a_part_fitted_onto_a_trained_model_changes_nothing_else(tmp_path, cache, capsys):
    """--init-from with --train-only: the camera's stale path (--stale-evidence) fitted onto a trained model
    that lacks it; every other weight and the heads stay those of the checkpoint, bit for bit."""
    train(TINY, tmp_path / "base", cache=cache, progress=False)
    base = tmp_path / "base" / "model.safetensors"
    fitted_tc = dataclasses.replace(TINY, stale_evidence=True, init_from=str(base), train_only=("trust.stale",), lr=0.05)
    train(fitted_tc, tmp_path / "fitted", cache=cache, progress=False)
    before, after = _state(tmp_path / "base"), _state(tmp_path / "fitted")
    assert after.keys() - before.keys() == {"m.trust.stale"}
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(after["m.trust.stale"], torch.tensor([0.0, -6.0]))  # it trained
    info = read_checkpoint(tmp_path / "fitted" / "model.safetensors")[2]
    assert info["init_from"]["checkpoint"] == str(base) and info["init_from"]["steps"] == TINY.steps  # what it was fitted onto
    # the checkpoint's weights must fit: another camera size is refused by name, and so is a part left untrained
    assert _train_cli(tmp_path / "bad1", cache, "--steps", "2", "--init-from", str(base), "--camera-size", "64", "128") == 2
    assert "its tokenizers are configured otherwise" in capsys.readouterr().err
    assert _train_cli(tmp_path / "bad2", cache, "--steps", "2", "--init-from", str(base), "--stale-evidence",
                      "--train-only", "queries") == 2
    assert "would leave ['trust.stale'] untrained" in capsys.readouterr().err
    assert _train_cli(tmp_path / "bad3", cache, "--steps", "2", "--train-only", "trust.stale") == 2  # from what?
    assert "--train-only needs --init-from" in capsys.readouterr().err


def test_floor_at_run_time_trains_the_weights_of_a_run_without_one(tmp_path, cache):
    """--floor-at-run-time: the training steps run without the trust floor (the weights are those of the
    same run without it), validation and the saved model use it."""
    plain = train(TINY, tmp_path / "plain", cache=cache, progress=False)
    floored_tc = dataclasses.replace(TINY, trust_floor=0.999, floor_in_training=False)
    floored = train(floored_tc, tmp_path / "floored", cache=cache, progress=False)
    a, b = (load_checkpoint(tmp_path / run / "model.safetensors") for run in ("plain", "floored"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert (a.cfg.model.trust_floor, b.cfg.model.trust_floor) == (0.0, 0.999)
    # a floor above every trust: validation weighs the three present sensors alike, the plain run does not
    clean = floored["val"]["clean"]
    assert clean["attention_camera"] == clean["attention_lidar"] == clean["attention_imu"] == pytest.approx(1 / 3, abs=1e-4)
    assert plain["val"]["clean"]["attention_camera"] != pytest.approx(1 / 3, abs=1e-4)
    assert _train_cli(tmp_path / "bad", cache, "--steps", "2", "--floor-at-run-time") == 2  # no floor to apply
    assert _train_cli(tmp_path / "cli", cache, "--steps", "2", "--trust-floor", "0.5", "--floor-at-run-time") == 0
    _, _, info = read_checkpoint(tmp_path / "cli" / "model.safetensors")
    command = info["command"]  # as it can be run again
    assert "--trust-floor 0.5" in command and "--floor-at-run-time" in command and "floor-in-training" not in command


def test_camera_options_reach_the_model_and_the_recorded_command(tmp_path, cache):
    out = tmp_path / "run"
    assert _train_cli(out, cache, "--steps", "2", "--camera-size", "32", "64", "--camera-shifts", "3", "--lidar-motion",
                      "--lidar-motion-token", "--consistency-weight", "0.5", "--camera-goal-weight", "0.5", "--camera-goal-head",
                      "tokens", "--lidar-goal-weight", "0.5", "--mirror", "--clip-grad-norm", "0.5") == 0
    model = load_checkpoint(out / "model.safetensors")
    assert (model.cfg.camera.height, model.cfg.camera.width, model.cfg.model.camera_shifts) == (32, 64, 3)
    assert model.embed.camera_motion.in_features == 7 and model.cfg.model.lidar_motion and model.cfg.model.lidar_motion_token
    _, _, info = read_checkpoint(out / "model.safetensors")
    assert ("--camera-shifts 3 --lidar-motion --lidar-motion-token --camera-size 32 64 --consistency-weight 0.5 "
            "--camera-goal-weight 0.5 --camera-goal-head tokens --lidar-goal-weight 0.5") in info["command"] \
        and " --mirror " in info["command"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_config"]["mirror"] and metrics["data"]["train_samples"] == 2 * 60  # two 3 s episodes, mirrored
    assert metrics["train_config"]["clip_grad_norm"] == 0.5 and " --clip-grad-norm 0.5 " in info["command"]
    logged = EventAccumulator(str(out / "tb"))
    logged.Reload()
    assert [e.step for e in logged.Scalars("train/grad_norm")] == [2] and logged.Scalars("train/grad_norm")[0].value > 0
    losses = metrics["final_train_losses_ema"]
    assert losses["consistency"] > 0 and losses["camera_goal"] > 0
    state = torch.load(out / STATE_FILE, weights_only=True)
    head = state["camera_goal"]  # CameraGoalTokens: 4 outputs per patch
    assert head["mlp.fc1.weight"].shape == (64, 64) and head["mlp.fc2.weight"].shape == (4, 64)
    assert state["lidar_goal"]["mlp.fc2.weight"].shape == (2, 64) and "lidar_goal" in losses  # LidarGoalPillars
    assert _train_cli(tmp_path / "bad", cache, "--steps", "2", "--camera-size", "30", "64") == 2  # not patches of 16
    assert _train_cli(tmp_path / "stem", cache, "--steps", "2", "--camera-size", "32", "64", "--camera-patch", "8",
                      "--camera-stem", "4", "--camera-stem-cells", "8", "--camera-column-blocks", "1",
                      "--lidar-goal-weight", "1", "--lidar-goal-bearing", "--sim-camera-view", "32") == 0
    model = load_checkpoint(tmp_path / "stem" / "model.safetensors")
    assert (model.cfg.camera.patch, model.cfg.camera.tokens, model.cfg.model.camera_stem) == (8, 32, 4)
    assert model.cfg.model.camera_stem_cells == 8 and model.embed.camera.cells.in_features == 3  # a layer per pixel
    assert model.cfg.model.camera_column_blocks == 1 and len(model.embed.camera_columns) == 1
    _, _, info = read_checkpoint(tmp_path / "stem" / "model.safetensors")
    assert "--camera-size 32 64 --camera-patch 8 --camera-stem 4 --camera-stem-cells 8" in info["command"]
    assert "--lidar-goal-weight 1.0 --lidar-goal-bearing" in info["command"] and "--sim-camera-view 32" in info["command"]
    assert json.loads((tmp_path / "stem" / "metrics.json").read_text())["train_config"]["sim_camera_view"] == 32
    state = torch.load(tmp_path / "stem" / STATE_FILE, weights_only=True)
    assert state["lidar_goal"]["mlp.fc2.weight"].shape == (4, 64)  # logit, distance, cosine, sine
    assert _train_cli(tmp_path / "bad", cache, "--steps", "2", "--camera-patch", "2", "--camera-stem", "4") == 2  # cells of half a pixel
    assert _train_cli(tmp_path / "bad", cache, "--steps", "2", "--lidar-goal-bearing") == 2  # no lidar goal objective to extend


def test_objective_weights_scale_their_losses_and_reach_the_recorded_command(tmp_path, cache):
    assert _train_cli(tmp_path / "plain", cache, "--steps", "1") == 0
    assert _train_cli(tmp_path / "weighed", cache, "--steps", "1", "--objective-weights", "goal=0", "camera=2.5") == 0
    plain, weighed = (json.loads((tmp_path / run / "metrics.json").read_text())["first_step_losses"]
                      for run in ("plain", "weighed"))
    assert plain["goal"] > 0 and weighed["goal"] == 0.0  # the same first step, weighed
    assert weighed["camera"] == pytest.approx(2.5 * plain["camera"], abs=2e-4)
    assert weighed["velocity"] == plain["velocity"]  # not given: weight 1
    _, _, info = read_checkpoint(tmp_path / "weighed" / "model.safetensors")
    assert "--objective-weights goal=0 camera=2.5" in info["command"]


def test_token_fusion_baseline_trains_with_attention_avoidance(tmp_path, cache):
    out = tmp_path / "token"
    assert _train_cli(out, cache, "--steps", "4", "--sensor-fusion", "token", "--trust-weight", "0",
                      "--avoid-weight", "1") == 0
    m = json.loads((out / "metrics.json").read_text())
    losses = m["final_train_losses_ema"]
    assert "avoid" in losses and "trust" not in losses
    assert load_checkpoint(out / "model.safetensors").cfg.model.fusion == "token"
    assert 0 <= m["val"]["imu_zero"]["trust_auroc"] <= 1  # its (untrained) trust is still reported
    row = m["val"]["clean"]
    assert row["attention_camera"] + row["attention_lidar"] + row["attention_imu"] == pytest.approx(1, abs=1e-3)


def _expected_commit() -> str:
    """What provenance must record here: HEAD's sha (a run from a checkout), "unknown" only outside git."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True) if shutil.which("git") else None
    if head is None or head.returncode:
        return "unknown"
    commit = head.stdout.strip()
    assert GIT_SHA.fullmatch(commit)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.strip()
    return commit + ("+uncommitted" if dirty else "")


# the second: the token fusion with both optional training states, its avoidance objective and the camera goal head
@pytest.mark.parametrize("fusion", [{}, {"sensor_fusion": "token", "avoid_weight": 1.0, "camera_goal_weight": 1.0}],
                         ids=["sensor", "token_camera_goal"])
def test_resume_gives_the_uninterrupted_result(tmp_path, cache, fusion):
    tc = dataclasses.replace(TINY, **fusion)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tc, straight, cache=cache, progress=False)
    m = train(tc, resumed, cache=cache, progress=False, stop_after=3)
    assert m["steps"] == 3
    state = torch.load(resumed / STATE_FILE, weights_only=True)
    assert state["step"] == 3
    first = _state(resumed)
    m = train(tc, resumed, cache=cache, progress=False, resume=True)
    assert m["steps"] == 6 and m["resumed_from"] == 3
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(first[k], b[k]) for k in a)  # the resumed run did train on
    # other settings than the saved ones are refused
    with pytest.raises(CheckpointError, match="other settings"):
        train(dataclasses.replace(tc, lr=1e-4), resumed, cache=cache, progress=False, resume=True)
    other = {"sensor_fusion": "sensor" if tc.sensor_fusion == "token" else "token"}
    with pytest.raises(CheckpointError, match="other settings"):  # nor the other fusion
        train(dataclasses.replace(tc, **other), resumed, cache=cache, progress=False, resume=True)
    # a new run into a folder that holds one is refused, before anything is touched; --overwrite replaces it
    (resumed / "notes.txt").write_text("the user's own")
    with pytest.raises(ConfigError, match="already holds a run .*--resume continues it, --overwrite replaces it"):
        train(tc, resumed, cache=cache, progress=False)
    assert all(torch.equal(v, _state(resumed)[k]) for k, v in b.items())
    m = train(tc, resumed, cache=cache, progress=False, stop_after=1, overwrite=True)
    assert m["steps"] == 1 and len(list((resumed / "tb").iterdir())) == 1  # the old run's events gone with it
    assert (resumed / "notes.txt").read_text() == "the user's own"


def test_corrupt_resume_state_is_a_clear_error(tmp_path, cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / STATE_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable training state"):
        train(TINY, out, cache=cache, progress=False, resume=True)
    code = main(["train", "-o", str(out), "--steps", "2", "--sim-episodes", "2", "--val-episodes", "1",
                 "--sim-seconds", "3", "--cache", str(cache), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a readable training state" in err[0]


def test_bag_data_goes_through_the_replay_path(real_data):
    from fusion_attn.bag import open_reader
    from fusion_attn.replay import Recording, ReplayOptions, recorded_snapshots
    from fusion_attn.sync import SensorSync, SyncConfig

    bag = real_data / "euroc_v1_01_cam_imu"
    seq = bag_sequence([bag], 10.0, CFG)
    n = len(seq["labelled"])
    assert 18 <= n <= 25 and not seq["labelled"].any()  # 2 s at 10 Hz, no labels
    assert seq["camera_mask"].any(1).mean() > 0.9 and seq["imu_mask"].any(1).mean() > 0.9
    assert not seq["lidar_mask"].any()  # no lidar in this recording: masked, not an error
    # the same snapshots as replay's loop, tokenized by the node's tokenizer
    tok = Tokenizer(CFG)
    with open_reader([bag]) as reader:
        snaps = list(recorded_snapshots(reader, SensorSync(SyncConfig()), ReplayOptions(fusion_rate_hz=10.0),
                                        Recording()))
    assert [s.stamp_ns for s in snaps] == seq["stamp_ns"].tolist()
    x = tok(snaps[n // 2], np.ones(4, np.float32))
    np.testing.assert_array_equal(seq["imu_chunks"][n // 2], x["imu_chunks"])
    cam = decode_camera(torch.from_numpy(seq["camera_u8"][n // 2])[None], torch.from_numpy(seq["camera_mask"][n // 2])[None])
    np.testing.assert_allclose(cam[0].numpy(), x["camera_patches"], atol=1e-5)  # mono8: exact in the 8-bit codec


def test_bag_only_training_runs_without_labels(tmp_path, real_data, cache):
    tc = dataclasses.replace(TINY, sim_episodes=0, val_episodes=0, steps=2, bags=(str(real_data / "euroc_v1_01_cam_imu"),))
    m = train(tc, tmp_path / "run", cache=cache, progress=False)
    assert m["data"]["train_bag_samples"] == m["data"]["train_samples"] > 0 and m["val"] == {}
    load_checkpoint(tmp_path / "run" / "model.safetensors")
    losses = m["final_train_losses_ema"]
    assert losses["velocity"] == 0.0 and losses["camera"] > 0  # no labels: supervised heads get nothing


def test_the_shipped_default_is_trained_and_documented():
    assert DEFAULT_CHECKPOINT.is_file() and DEFAULT_CHECKPOINT.stat().st_size < 2e6
    model = load_checkpoint(DEFAULT_CHECKPOINT)
    _, _, info = read_checkpoint(DEFAULT_CHECKPOINT)
    assert info["command"].startswith("fusion-attn train") and info["seed"] == 0
    assert GIT_SHA.fullmatch(info["git_commit"])  # trained from a checkout, its commit on record
    base = info.get("init_from", {})  # fitted or fine-tuned from a trained model (make default-model): that one's training
    assert info["data"]["train_samples"] > 1000 and info["steps"] + base.get("steps", 0) >= 1000
    assert base.get("command", info["command"]).startswith("fusion-attn train")
    # its trust floor acts at run time only (make default-model): a high τ can average a failed sensor in
    assert model.cfg.model.trust_floor == 0.01 and "--trust-floor 0.01" in info["command"]
    heads = load_heads(heads_path(DEFAULT_CHECKPOINT))
    assert heads.sizes == target_sizes(model.cfg)
    # trained, not seed-0 weights: the held-out obstacle error beats predicting the mean distance
    val = info["val_clean"]
    std_obstacles = float(heads.std_obstacles.mean())
    assert val["obstacle_mae_m"] < 0.6 * std_obstacles


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Two short runs: attention with every model option set (so its model is not `FusionConfig()`'s),
    and the concat baseline at fixed τ."""
    root = tmp_path_factory.mktemp("runs")
    short = dataclasses.replace(TINY, steps=2, eval_every=100)
    # the model options through the command line: every FusionConfig option is reachable from it
    assert main(["train", "-o", str(root / "att"), "--steps", "2", "--batch", "8", "--sim-episodes", "2",
                 "--val-episodes", "1", "--sim-seconds", "3", "--eval-every", "100", "--cache", str(cache),
                 "--latent-blocks", "2", "--qk-norm", "--learned-head-temperature", "--stale-evidence",
                 "--no-progress"]) == 0
    train(dataclasses.replace(short, fusion="concat", tau_random_prob=0.0), root / "cat", cache=cache, progress=False)
    return {"attention": root / "att", "concat": root / "cat"}


def test_eval_robustness_compares_runs(tmp_path, cache, runs):
    assert not (runs["concat"] / "model.safetensors").exists()  # a baseline is no FusionModel checkpoint
    # the attention run twice, as two "seeds" of one design: its figures are averaged, its spread 0
    named = {"attention": runs["attention"], "attention#1": runs["attention"], "concat": runs["concat"]}
    report = run_evaluation(named, tmp_path / "out", [0.25, 1.0], 1, cache, [])
    sim = report["sim"]
    assert report["test_samples"] == 30 and set(sim["attention"]) == {"0.25", "1.0"} and set(sim["concat"]) == {"1.0"}
    for tau, rows in sim["attention"].items():
        assert rows["camera_drop"]["attention_faulted"] == 0.0  # masked: no weight at all
        assert rows["camera_drop"]["trust_faulted"] == 0.0 and rows["camera_drop"]["untrusted_faulted"] == 1.0
        assert 0 < rows["clean"]["lipschitz"] <= 1 / (2 * float(tau)) + 1e-6
        assert rows["clean"]["attention_camera"] + rows["clean"]["attention_lidar"] + rows["clean"]["attention_imu"] \
            == pytest.approx(1.0, abs=1e-4)
    assert "attention_faulted" not in sim["concat"]["1.0"]["camera_drop"]
    assert all(Path(p).is_file() for p in report["plots"])
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert saved["summary"].keys() == set(named) and saved["groups"].keys() == {"attention", "concat"}
    mean, std, n = report["groups"]["attention"]["lidar_noise"]["rise"]
    assert n == 2 and std == pytest.approx(0.0, abs=1e-12) and mean == pytest.approx(report["summary"]["attention"]["lidar_noise"]["rise"])
    assert report["targets"] and all(r["check"] in ("rise", "weight", "auroc") for r in report["targets"])
    tables = (tmp_path / "out" / "robustness.md").read_text()  # the tables docs/RESULTS.md quotes
    clean = report["summary"]["attention"]["clean"]["head_error"]
    assert f"| clean | {clean:.3f} ± 0.000 (+0 ± 0%) |" in tables
    concat = report["sim"]["concat"]["1.0"]  # a dropped lidar: each quantity's rise over clean
    rise = concat["lidar_drop"]["obstacle_mae_m"] / concat["clean"]["obstacle_mae_m"] - 1
    rises = tables.split("### Each quantity's rise over clean")[1].split("| lidar drop |")[1].splitlines()[1]
    assert rises.startswith("|  | concat |") and f"{100 * rise:+.0f}%" in rises
    assert "### Targets (`attention` against `concat`)" in tables and "### Trust (`attention`)" in tables


def test_a_tau_sweep_fuses_each_faulted_batch_at_every_tau_as_one_tau_at_a_time_would(runs, data):
    run = load_run("attention", runs["attention"])
    options = {"batch": 16, "lipschitz": True, "count_changed": True}
    swept = evaluate_taus(run.model, run.heads, data, run.cfg, TINY.fusion_hz, [0.25, 1.0], **options)
    for tau in (0.25, 1.0):
        assert swept[tau] == evaluate(run.model, run.heads, data, run.cfg, TINY.fusion_hz, tau, **options)
    assert swept[0.25]["lidar_noise"]["lipschitz"] != swept[1.0]["lidar_noise"]["lipschitz"]


def test_eval_robustness_reuses_the_sweep_of_an_unchanged_run(tmp_path, cache, runs, monkeypatch):
    """--reuse: a run whose training state the previous report measured (same episodes and τ), or a
    stopped evaluation finished, keeps its sweep, under any name; another τ sweep, or a retrained run, is
    measured again."""
    out = tmp_path / "out"
    first = run_evaluation({"attention": runs["attention"]}, out, [1.0], 1, cache, [])
    assert first["runs"]["attention"]["reused"] is False

    def no_sweep(*args, **kwargs):
        raise AssertionError("a reusable sweep was run again")

    monkeypatch.setattr(robustness, "sweep", no_sweep)
    again = run_evaluation({"renamed": runs["attention"]}, out, [1.0], 1, cache, [], reuse=True)
    assert again["runs"]["renamed"]["reused"] is True and again["sim"]["renamed"] == first["sim"]["attention"]
    with pytest.raises(AssertionError, match="run again"):
        run_evaluation({"attention": runs["attention"]}, out, [0.5], 1, cache, [], reuse=True)
    monkeypatch.undo()
    # an evaluation stopped part way (Ctrl-C in the second run's sweep) keeps the sweep it finished, and
    # run again with --reuse it measures only the other run
    stopped, measure = tmp_path / "stopped", robustness.sweep

    def stopped_at(name):
        def sweep(run, *args):
            if run.name == name:
                raise KeyboardInterrupt
            return measure(run, *args)
        return sweep

    both = {"attention": runs["attention"], "concat": runs["concat"]}
    monkeypatch.setattr(robustness, "sweep", stopped_at("concat"))
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(both, stopped, [1.0], 1, cache, [])
    assert [p.stem for p in (stopped / "sweeps").iterdir()] == [robustness.state_digest(runs["attention"])]
    monkeypatch.setattr(robustness, "sweep", stopped_at("attention"))
    resumed = run_evaluation(both, stopped, [1.0], 1, cache, [], reuse=True)
    monkeypatch.undo()
    assert {n: r["reused"] for n, r in resumed["runs"].items()} == {"attention": True, "concat": False}
    assert resumed["sim"]["attention"] == first["sim"]["attention"] and not (stopped / "sweeps").exists()
    # a test set sampled on another trigger is other samples: nothing is reused from it
    assert first["trigger"] == "timer" and robustness.reusable_sweeps(first, 1, [1.0], "lidar") == {}
    # ... and one rendered by another camera rig (--sim-camera-view) is other images
    assert first["camera_view"] == 64 and robustness.reusable_sweeps(first, 1, [1.0], camera_view=128) == {}
    retrained = tmp_path / "retrained"
    shutil.copytree(runs["attention"], retrained)
    with (retrained / STATE_FILE).open("ab") as f:
        f.write(b"\0")  # another state digest (torch.load ignores trailing bytes of a zip)
    assert robustness.state_digest(retrained) != robustness.state_digest(runs["attention"])


def test_eval_robustness_judges_a_new_run_beside_an_earlier_report(tmp_path, cache, runs):
    """--beside: the runs of an earlier report join as measured there (their folders need not exist), so
    a new design is judged against a baseline evaluated before; another τ sweep or a name in both is
    refused before any sweep runs, and so is a file that is no report."""
    earlier = run_evaluation({"concat": runs["concat"]}, tmp_path / "earlier", [0.25, 1.0], 1, cache, [])
    report_file = tmp_path / "earlier" / "robustness.json"
    joined = run_evaluation({"attention": runs["attention"]}, tmp_path / "out", [0.25, 1.0], 1, cache, [],
                            beside=report_file)
    assert list(joined["sim"]) == ["attention", "concat"] and joined["sim"]["concat"] == earlier["sim"]["concat"]
    assert joined["runs"]["concat"]["reused"] is True and joined["runs"]["concat"]["report"] == str(report_file)
    assert joined["runs"]["attention"]["reused"] is False
    rises = [r for r in joined["targets"] if r["check"] == "rise"]  # judged against the joined concat
    assert rises and all(r["baseline_rise"] == pytest.approx(
        joined["summary"]["concat"][r["condition"]]["quantity_rise"][r["key"]]) for r in rises)
    # the goal is judged on the samples camera and lidar both observe, where both reports measured them
    goal = [r for r in rises if r["key"].startswith("goal_")]
    assert goal and {r["key"] for r in goal} == {robustness.class_key(q, "two_observers") for q in robustness.CLASSED}
    assert "### Targets (`attention` against `concat`)" in (tmp_path / "out" / "robustness.md").read_text()
    with pytest.raises(ConfigError, match="other held-out samples or τ"):
        run_evaluation({"attention": runs["attention"]}, tmp_path / "other", [1.0], 1, cache, [], beside=report_file)
    with pytest.raises(ConfigError, match=r"already has runs named \['concat'\]"):
        run_evaluation({"concat": runs["attention"]}, tmp_path / "other", [0.25, 1.0], 1, cache, [], beside=report_file)
    # a report from before the test set was every run's measured the episodes of its first run's seed
    finer = json.loads(report_file.read_text()) | {"camera_view": 128}  # another rig's images
    (tmp_path / "finer.json").write_text(json.dumps(finer))
    with pytest.raises(ConfigError, match="other held-out samples"):
        run_evaluation({"attention": runs["attention"]}, tmp_path / "other", [0.25, 1.0], 1, cache, [],
                       beside=tmp_path / "finer.json")
    older = json.loads(report_file.read_text())
    del older["test_seed"], older["camera_view"]  # written before either: the default rig's
    older["runs"] = {"concat#1": older["runs"]["concat"] | {"seed": 1}}
    (tmp_path / "older.json").write_text(json.dumps(older))
    with pytest.raises(ConfigError, match="other held-out samples"):
        run_evaluation({"attention": runs["attention"]}, tmp_path / "other", [0.25, 1.0], 1, cache, [],
                       beside=tmp_path / "older.json")
    older["runs"] = {"concat": older["runs"]["concat#1"] | {"seed": 0}}  # seed 0's episodes are today's
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert robustness.reusable_sweeps(older, 1, [0.25, 1.0]) and robustness.held_out_seed(older) == earlier["test_seed"]
    (tmp_path / "bad.json").write_text("{}")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(ConfigError, match="robustness.json"):
            run_evaluation({"attention": runs["attention"]}, tmp_path / "other", [1.0], 1, cache, [], beside=bad)
    assert not (tmp_path / "other").exists()


def test_summary_takes_each_condition_at_its_best_tau():
    report = {
        "attention": {
            "2.0": {"clean": {"head_error": 1.0, "speed_mae_mps": 0.2}, "lidar_drop": {"head_error": 1.5, "attention_faulted": 0.0},
                    "imu_zero": {"head_error": 3.0, "attention_faulted": 0.3, "trust_auroc": 0.9}},
            "10.0": {"clean": {"head_error": 0.8, "speed_mae_mps": 0.1}, "lidar_drop": {"head_error": 2.0, "attention_faulted": 0.0},
                     "imu_zero": {"head_error": 1.2, "attention_faulted": 0.1, "trust_auroc": 0.7, "speed_mae_mps": 0.3}},
        },
        "concat": {"1.0": {"clean": {"head_error": 0.5}, "lidar_drop": {"head_error": 0.4},
                           "imu_zero": {"head_error": 1.0}}},
    }
    summary = summarise(report)
    att = summary["attention"]
    assert att["clean"] == {"best_tau": 10.0, "head_error": 0.8, "rise": 0.0, "attention_faulted_low_tau": None,
                            "quantity_rise": {"speed_mae_mps": 0.0}}
    # each fault at its own best τ, its rise over the best clean error (0.8, at τ = 10)
    assert att["lidar_drop"]["best_tau"] == 2.0 and att["lidar_drop"]["rise"] == pytest.approx(1.5 / 0.8 - 1)
    assert att["imu_zero"]["best_tau"] == 10.0 and att["imu_zero"]["rise"] == pytest.approx(1.2 / 0.8 - 1)
    assert att["imu_zero"]["quantity_rise"] == {"speed_mae_mps": pytest.approx(0.3 / 0.1 - 1)}  # at its best τ
    assert att["imu_zero"]["attention_faulted_low_tau"] == 0.3  # τ = 2, the lowest, though "10.0" sorts first as text
    assert att["imu_zero"]["trust_auroc"] == 0.9  # likewise at the lowest τ
    assert summary["concat"]["lidar_drop"]["rise"] == pytest.approx(-0.2)  # a fault may also lower the error
    assert summary["concat"]["imu_zero"] == {"best_tau": 1.0, "head_error": 1.0, "rise": 1.0, "quantity_rise": {},
                                              "attention_faulted_low_tau": None}


def test_eval_robustness_builds_models_from_the_training_state(tmp_path, runs):
    run = load_run("attention", runs["attention"])
    m = run.cfg.model
    assert (m.latent_blocks, m.qk_norm, m.learned_head_temperature, m.stale_evidence) == (2, True, True, True)
    assert "stale" in json.loads((runs["attention"] / "metrics.json").read_text())["final_train_losses_ema"]
    assert run.cfg == run.tc.fusion_config() == load_checkpoint(runs["attention"] / "model.safetensors").cfg
    # a state from before the config was stored (nor the model options): FusionConfig()'s defaults
    state = torch.load(runs["concat"] / STATE_FILE, weights_only=True)
    del state["fusion_config"]
    saved = json.loads(state["train_config"])
    state["train_config"] = json.dumps({k: v for k, v in saved.items()
                                        if k not in ("latent_blocks", "qk_norm", "learned_head_temperature",
                                                     "stale_evidence")})
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / STATE_FILE)
    old = load_run("old", tmp_path / "old")
    assert old.cfg == FusionConfig() and old.tc.fusion == "concat" and not old.has_attention


def test_eval_robustness_reuses_the_training_shard_of_a_recording(tmp_path, real_data, cache, runs):
    bag = tmp_path / "euroc"
    shutil.copytree(real_data / "euroc_v1_01_cam_imu", bag)
    before = set(cache.glob("bag-*.npz"))
    build_datasets(dataclasses.replace(TINY, sim_episodes=0, val_episodes=0, bags=(str(bag),)), CFG, cache,
                   progress=False)
    trained = set(cache.glob("bag-*.npz")) - before
    assert len(trained) == 1
    attention_only = {"attention": runs["attention"]}
    report = run_evaluation(attention_only, tmp_path / "out", [1.0], 1, cache, [bag])
    assert set(cache.glob("bag-*.npz")) - before == trained  # the training shard, not a second tokenization
    assert report["real"]["euroc"]["attention"]["1.0"]["clean"]["attention_lidar"] == 0.0  # no lidar in it
    # the recording changes at the same path: its old shard is stale, a new one is made
    mcap = next(bag.glob("*.mcap"))
    os.utime(mcap, ns=(mcap.stat().st_atime_ns, mcap.stat().st_mtime_ns + 10**9))
    run_evaluation(attention_only, tmp_path / "out", [1.0], 1, cache, [bag])
    assert len(set(cache.glob("bag-*.npz")) - before - trained) == 1


def test_a_recordings_shard_is_keyed_by_the_topics_it_reads(real_data, tmp_path):
    """A change in which topic feeds a sensor (the lidar chosen by points since 2026-12-05, not the busy
    radar) makes a new shard; a bag that does not open keeps its error for when the shard is made."""
    assert bag_shard(real_data / "sick_lms1xx_scan_cloud_radar.bag", 10.0, CFG).key["topics"] == {"lidar": "/cloud"}
    broken = tmp_path / "broken.bag"
    broken.write_bytes(b"#ROSBAG V2.0\n" + bytes(100))
    shard = bag_shard(broken, 10.0, CFG)
    assert shard.key["topics"] is None
    with pytest.raises(BagError, match="broken.bag"):
        shard.make()


def test_real_recordings_count_only_the_fusions_a_corruption_changed(tmp_path, real_data, cache, runs):
    """A frozen camera repeats the frame it froze on: the recording's first fusion (no previous frame)
    is the clean one, which no trust can tell from clean, so it is not counted as missed; every seed of
    the judged design is measured on the recordings, the table gives the range."""
    seeds = {"attention": runs["attention"], "attention#1": runs["attention"]}
    report = run_evaluation(seeds, tmp_path / "out", [1.0], 1, cache,
                            [real_data / "euroc_v1_01_cam_imu", real_data / "lidar_camera_frame"])
    euroc = report["real"]["euroc_v1_01_cam_imu"]
    assert set(euroc) == {"attention", "attention#1"}
    freeze = euroc["attention"]["1.0"]["camera_freeze"]
    run = load_run("attention", runs["attention"])
    n = len(bag_set(real_data / "euroc_v1_01_cam_imu", run.tc.fusion_hz, run.cfg, cache))
    assert freeze["affected"] == pytest.approx((n - 1) / n)  # all but the first fusion
    assert euroc["attention"]["1.0"]["camera_zero"]["affected"] == 1.0
    # one frame: frozen, it is resent where the clean recording has no camera any more (changed), and
    # is the clean frame where it still has it (not changed)
    one_frame = report["real"]["lidar_camera_frame"]["attention"]["1.0"]
    assert 0.0 < one_frame["camera_freeze"]["affected"] < 1.0
    assert one_frame["lidar_noise"]["affected"] == 1.0
    table = (tmp_path / "out" / "robustness.md").read_text().split("### Real recordings")[1]
    row = next(line for line in table.splitlines() if "camera freeze" in line)  # EuRoC's, first
    changed = f"{100 * freeze['affected']:.0f}% ({100 * freeze['affected']:.0f}-{100 * freeze['affected']:.0f}%)"
    assert f"| {changed} |" in row  # two seeds: their mean and range


def test_obstacle_sectors_in_a_camera_view():
    assert sectors_in_view(360) == list(range(SECTORS))
    assert sectors_in_view(90) == [0, 1, 15]  # sectors are 22.5° wide, sector 0 centred straight ahead
    assert sectors_in_view(22.5) == [0] and sectors_in_view(20) == []



def test_the_simulated_cameras_view_in_sectors(monkeypatch):
    import functools

    from fusion_attn.sim import sensors

    rig = sensors.SensorConfig()
    expected = list(range(SECTORS)) if getattr(rig, "camera_views", 1) > 1 else [0, 1, 15]
    assert sectors_in_view(sim_camera_hfov_deg()) == expected  # a surround rig sees every sector
    if hasattr(rig, "camera_views"):  # the single forward 75° square camera sees three
        monkeypatch.setattr(sensors, "SensorConfig", functools.partial(sensors.SensorConfig, camera_views=1))
        single = sim_camera_hfov_deg.__wrapped__()  # past the cache: the config as patched
        assert single == pytest.approx(75.0) and sectors_in_view(single) == [0, 1, 15]


def test_goal_error_split_by_the_camera_view(monkeypatch):
    from fusion_attn.learn import evaluation

    monkeypatch.setattr(evaluation, "sim_camera_hfov_deg", lambda: 75.0)  # a forward camera, whatever the sim's rig
    heads = Heads(8, {"velocity": 2, "obstacles": SECTORS, "goal": 3})  # identity (de)normalisation
    bearings = torch.tensor([0.0, math.radians(30), math.radians(90), math.pi])  # two inside the 75° view
    true_goal = torch.stack([torch.full((4,), 3.0), bearings.cos(), bearings.sin()], -1)
    pred_goal = true_goal + torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [4.0, 0, 0]])
    ok = torch.ones(4, dtype=torch.bool)
    tgt = {"velocity": (torch.zeros(4, 2), ok), "obstacles": (torch.zeros(4, SECTORS), ok),
           "goal": (true_goal, ok)}
    pred = {"velocity": torch.zeros(4, 2), "obstacles": torch.zeros(4, SECTORS), "goal": pred_goal}
    errors = physical_errors(heads, pred, tgt)
    assert errors["goal_in_view_share"].tolist() == [1, 1, 0, 0]
    assert errors["goal_distance_in_view_mae_m"].tolist() == [1, 1]
    assert errors["goal_distance_out_of_view_mae_m"].tolist() == [2, 4]
    assert float(errors["goal_bearing_mae_deg"].max()) < 1e-4


def test_goal_error_split_by_observability_class():
    """The lidar observes the goal where its tokens hold a return from the retroreflective post (as the
    tokenizer encodes the simulator's intensity 255; no other surface returns above 200), and the goal's
    errors split by that class."""
    from fusion_attn.config import LidarTokens
    from fusion_attn.frames import LidarFrame
    from fusion_attn.learn.evaluation import lidar_reaches_post
    from fusion_attn.sim.sensors import RETROREFLECTIVE_INTENSITY
    from fusion_attn.tokenize import tokenize_lidar

    def tokens(intensities):
        points = np.array([[2.0 + k, 1.0, 0.3, i] for k, i in enumerate(intensities)], np.float32)
        pts, mask = tokenize_lidar(LidarFrame(0, "lidar", points), LidarTokens())
        return torch.from_numpy(pts).half().float(), torch.from_numpy(mask)  # as the dataset stores them

    samples = [tokens([200.0, 50.0]), tokens([10.0, RETROREFLECTIVE_INTENSITY]), tokens([RETROREFLECTIVE_INTENSITY])]
    points, mask = (torch.stack(x) for x in zip(*samples))
    hidden = mask.clone()
    hidden[2] = False  # a masked-out (padding) token says nothing
    assert lidar_reaches_post(points, mask).tolist() == [False, True, True]
    assert lidar_reaches_post(points, hidden).tolist() == [False, True, False]

    heads = Heads(8, {"velocity": 2, "obstacles": SECTORS, "goal": 3})  # identity (de)normalisation
    true_goal = torch.tensor([[3.0, 1.0, 0.0]]).repeat(4, 1)
    pred_goal = true_goal + torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [4.0, 0, 0], [8.0, 0, 0]])
    has_goal = torch.tensor([True, True, True, False])
    ok = torch.ones(4, dtype=torch.bool)
    tgt = {"velocity": (torch.zeros(4, 2), ok), "obstacles": (torch.zeros(4, SECTORS), ok), "goal": (true_goal, has_goal)}
    pred = {"velocity": torch.zeros(4, 2), "obstacles": torch.zeros(4, SECTORS), "goal": pred_goal}
    errors = physical_errors(heads, pred, tgt, torch.tensor([True, False, True, True]))
    assert errors["goal_two_observers_share"].tolist() == [1, 0, 1]  # over the samples with a goal
    assert errors["goal_distance_two_observers_mae_m"].tolist() == [1, 4]
    assert errors["goal_distance_camera_only_mae_m"].tolist() == [2]
    assert errors["goal_bearing_two_observers_mae_deg"].shape == (2,)
    assert "goal_two_observers_share" not in physical_errors(heads, pred, tgt)


def test_running_means_weigh_each_sample_once_and_skip_what_no_sample_covers():
    running = RunningMeans()
    running.add({"loss": torch.tensor(1.0), "in_view": torch.tensor([1.0]), "none": torch.zeros(0)}, batch_size=4)
    running.add({"loss": torch.tensor(3.0), "in_view": torch.tensor([3.0, 3.0, 3.0])}, batch_size=2)
    means = running.means()
    assert means["loss"] == pytest.approx(5 / 3)  # (4 * 1 + 2 * 3) / 6 samples
    assert means["in_view"] == 2.5  # (1 + 9) / 4 samples, not the mean of the two batch means (2.0)
    assert "none" not in means
