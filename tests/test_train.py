"""Training: data through the node's path, fault augmentation, checkpoints, resume, the shipped default."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fusion_attn.sim  # noqa: F401 - headless GL before mujoco loads
from fusion_attn import train as T
from fusion_attn.checkpoint import load_checkpoint, read_checkpoint
from fusion_attn.cli import main
from fusion_attn.config import FusionConfig
from fusion_attn.errors import CheckpointError
from fusion_attn.frames import CameraFrame, Modality
from fusion_attn.pipeline import DEFAULT_CHECKPOINT
from fusion_attn.tokenize import SensorSnapshot, Tokenizer

CFG = FusionConfig()
TINY = T.TrainConfig(steps=6, batch=8, sim_episodes=2, val_episodes=1, sim_seconds=3.0, log_every=2, eval_every=4,
                     save_every=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("train_cache")


@pytest.fixture(scope="module")
def data(cache):
    return T.build_datasets(TINY, CFG, cache, progress=False)[0]


def _state(out):
    model = load_checkpoint(out / "model.safetensors")
    heads = T.load_heads(T.heads_path(out / "model.safetensors"))
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


def test_camera_codec_is_the_tokenizer_output():
    rng = np.random.default_rng(0)
    frame = CameraFrame(0, "camera", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "rgb8")
    tok = Tokenizer(CFG)
    x = tok(SensorSnapshot(0, camera=frame), np.ones(4, np.float32))
    enc = T.encode_sample(x)
    dec = T.decode_camera(torch.from_numpy(enc["camera_u8"])[None], torch.from_numpy(enc["camera_mask"])[None])[0]
    np.testing.assert_allclose(dec.numpy(), x["camera_patches"], atol=1e-5)


def _faulted(data, sensor, fault, idx=(5, 25, 45)):
    t = data.tensors()
    idx = torch.tensor(idx)
    plan = T.FaultPlan.fixed(len(idx), int(sensor), fault)
    return t, idx, T.gather(t, idx), T.corrupt(t, idx, plan, CFG, TINY.fusion_hz, torch.Generator().manual_seed(0))


def _unchanged(clean, x, but):
    for k in clean:
        if not k.startswith(but):
            assert torch.equal(clean[k], x[k]), k


def test_drop_masks_the_sensor_only(data):
    for m in Modality:
        _, _, clean, x = _faulted(data, m, "drop")
        name = m.name.lower()
        assert not x[f"{name}_mask"].any() and clean[f"{name}_mask"].any()
        _unchanged(clean, x, name + "_mask")


def test_zeroed_sensors_look_as_the_node_would_tokenize_them(data):
    _, _, clean, x = _faulted(data, Modality.CAMERA, "zero")
    black = Tokenizer(CFG)(SensorSnapshot(0, camera=CameraFrame(0, "c", np.zeros((64, 64, 3), np.uint8), "rgb8")),
                           np.ones(4, np.float32))["camera_patches"]
    assert torch.allclose(x["camera_patches"], torch.from_numpy(black).expand(3, -1, -1))
    assert x["camera_mask"].all()  # a black image is still an image
    _unchanged(clean, x, "camera_patches")
    _, _, clean, x = _faulted(data, Modality.IMU, "zero")
    S6 = CFG.imu.samples_per_chunk * 6
    assert (x["imu_chunks"][..., :S6] == 0).all() and clean["imu_chunks"][..., :S6].abs().sum() > 0
    assert torch.equal(x["imu_chunks"][..., S6:], clean["imu_chunks"][..., S6:])  # rate and count as before
    _, _, clean, x = _faulted(data, Modality.LIDAR, "zero")
    assert not x["lidar_mask"].any()  # no points: the sync drops the sweep


def test_noise_perturbs_only_valid_tokens_of_one_sensor(data):
    _, _, clean, x = _faulted(data, Modality.CAMERA, "noise")
    diff = (x["camera_patches"] - clean["camera_patches"]).std()
    assert 0.5 < float(diff) < 1.5  # 60 pixel levels / 255 / ImageNet std ~ 1
    _unchanged(clean, x, "camera_patches")
    _, _, clean, x = _faulted(data, Modality.LIDAR, "noise")
    invalid = ~x["lidar_mask"]
    assert (x["lidar_points"][invalid] == 0).all() and not torch.equal(x["lidar_points"], clean["lidar_points"])
    _unchanged(clean, x, "lidar_points")


def test_frozen_and_delayed_sensors_show_old_content(data):
    t, idx, clean, x = _faulted(data, Modality.CAMERA, "freeze")
    older = torch.maximum(idx - T.FREEZE_LAG[1], t["seq_start"][idx])
    assert torch.equal(x["camera_patches"], T.gather(t, older)["camera_patches"])
    assert not torch.equal(x["camera_patches"], clean["camera_patches"])
    assert torch.equal(x["camera_age"], clean["camera_age"])  # re-sent with fresh stamps
    t, idx, clean, x = _faulted(data, Modality.LIDAR, "delay")
    assert torch.equal(x["lidar_points"], T.gather(t, idx - T.DELAY_LAG)["lidar_points"])
    assert torch.allclose(x["lidar_age"], clean["lidar_age"] + T.DELAY_LAG / TINY.fusion_hz)
    _unchanged(clean, x, "lidar")
    # at an episode's first sample there is nothing older: its own content, still aged
    t, idx, clean, x = _faulted(data, Modality.LIDAR, "delay", idx=(30,))
    assert torch.equal(x["lidar_points"], clean["lidar_points"])


def test_attention_avoidance_weighs_sensors_whose_content_is_gone():
    attention = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    attention = attention[:, :, None].expand(-1, -1, 4)  # (B, 3, H): the same on every head
    plan = T.FaultPlan(sensor=torch.tensor([0, 1, 2, -1]),
                       fault=torch.tensor([T.FAULTS.index(f) for f in ("zero", "noise", "zero", "zero")]),
                       lag=torch.zeros(4, dtype=torch.long), strength=torch.tensor([1.0, 0.5, 1.0, 1.0]))
    # the black camera (mass 0.5) and the zero IMU (0.8); not the noisy lidar (it still informs) or the
    # sample without a fault
    assert T.fault_attention(attention, plan).item() == pytest.approx((0.5 + 0.8) / 2)
    no_points = T.FaultPlan(sensor=torch.tensor([1, 1, 1, 1]), fault=torch.full((4,), T.FAULTS.index("zero")),
                            lag=torch.zeros(4, dtype=torch.long), strength=torch.ones(4))
    assert T.fault_attention(attention, no_points).item() == 0.0  # masked: nothing to avoid
    assert T.fault_attention(attention, T.FaultPlan.fixed(4, 2, "freeze")).item() == 0.0


def test_training_writes_checkpoint_heads_and_tensorboard(tmp_path, cache):
    out = tmp_path / "run"
    m = T.train(TINY, out, cache=cache, progress=False, command="test")
    model = load_checkpoint(out / "model.safetensors")  # the node's loader: strict about keys
    _, _, info = read_checkpoint(out / "model.safetensors")
    assert info["seed"] == 0 and info["command"] == "test" and info["data"]["train_samples"] == 60
    heads = T.load_heads(T.heads_path(out / "model.safetensors"))
    assert heads.sizes == T.target_sizes(model.cfg)
    assert m["steps"] == 6 and all(np.isfinite(v) for v in m["final_train_losses_ema"].values())
    assert set(m["val"]) == {"clean"} | {f"{s}_{f}" for s in ("camera", "lidar", "imu") for f in T.FAULTS}
    assert m["val"]["camera_drop"]["attention_faulted"] == 0.0  # a masked sensor gets no attention
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/total", "train/camera", "train/velocity", "train/avoid", "val_clean/loss_goal"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/total")] == [2, 4, 6]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_resume_gives_the_uninterrupted_result(tmp_path, cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    T.train(TINY, straight, cache=cache, progress=False)
    m = T.train(TINY, resumed, cache=cache, progress=False, stop_after=3)
    assert m["steps"] == 3
    state = torch.load(resumed / T.STATE_FILE, weights_only=True)
    assert state["step"] == 3
    first = _state(resumed)
    m = T.train(TINY, resumed, cache=cache, progress=False, resume=True)
    assert m["steps"] == 6 and m["resumed_from"] == 3
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(first[k], b[k]) for k in a)  # the resumed run did train on
    # other settings than the saved ones are refused
    with pytest.raises(CheckpointError, match="other settings"):
        T.train(dataclasses.replace(TINY, lr=1e-4), resumed, cache=cache, progress=False, resume=True)


def test_corrupt_resume_state_is_a_clear_error(tmp_path, cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / T.STATE_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable training state"):
        T.train(TINY, out, cache=cache, progress=False, resume=True)
    code = main(["train", "-o", str(out), "--steps", "2", "--sim-episodes", "2", "--val-episodes", "1",
                 "--sim-seconds", "3", "--cache", str(cache), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a readable training state" in err[0]


def test_bag_data_goes_through_the_replay_path(real_data):
    from fusion_attn.bag import open_reader
    from fusion_attn.replay import Recording, ReplayOptions, recorded_snapshots
    from fusion_attn.sync import SensorSync, SyncConfig

    bag = real_data / "euroc_v1_01_cam_imu"
    seq = T.bag_sequence([bag], 10.0, CFG)
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
    cam = T.decode_camera(torch.from_numpy(seq["camera_u8"][n // 2])[None], torch.from_numpy(seq["camera_mask"][n // 2])[None])
    np.testing.assert_allclose(cam[0].numpy(), x["camera_patches"], atol=1e-5)  # mono8: exact in the 8-bit codec


def test_bag_only_training_runs_without_labels(tmp_path, real_data, cache):
    tc = dataclasses.replace(TINY, sim_episodes=0, val_episodes=0, steps=2, bags=(str(real_data / "euroc_v1_01_cam_imu"),))
    m = T.train(tc, tmp_path / "run", cache=cache, progress=False)
    assert m["data"]["train_bag_samples"] == m["data"]["train_samples"] > 0 and m["val"] == {}
    load_checkpoint(tmp_path / "run" / "model.safetensors")
    losses = m["final_train_losses_ema"]
    assert losses["velocity"] == 0.0 and losses["camera"] > 0  # no labels: supervised heads get nothing


def test_the_shipped_default_is_trained_and_documented():
    assert DEFAULT_CHECKPOINT.is_file() and DEFAULT_CHECKPOINT.stat().st_size < 2e6
    model = load_checkpoint(DEFAULT_CHECKPOINT)
    _, _, info = read_checkpoint(DEFAULT_CHECKPOINT)
    assert info["command"].startswith("fusion-attn train") and info["seed"] == 0 and info["git_commit"]
    assert info["data"]["train_samples"] > 1000 and info["steps"] >= 1000
    heads = T.load_heads(T.heads_path(DEFAULT_CHECKPOINT))
    assert heads.sizes == T.target_sizes(model.cfg)
    # trained, not seed-0 weights: the held-out obstacle error beats predicting the mean distance
    val = info["val_clean"]
    std_obstacles = float(heads.std_obstacles.mean())
    assert val["obstacle_mae_m"] < 0.6 * std_obstacles


def test_eval_robustness_compares_runs(tmp_path, cache):
    from fusion_attn.robustness import run_evaluation

    short = dataclasses.replace(TINY, steps=2, eval_every=100)
    T.train(short, tmp_path / "att", cache=cache, progress=False)
    T.train(dataclasses.replace(short, fusion="concat", tau_random_prob=0.0), tmp_path / "cat", cache=cache,
            progress=False)
    assert not (tmp_path / "cat" / "model.safetensors").exists()  # a baseline is no FusionModel checkpoint
    report = run_evaluation({"attention": tmp_path / "att", "concat": tmp_path / "cat"}, tmp_path / "out",
                            [0.25, 1.0], 1, cache, [])
    sim = report["sim"]
    assert report["test_samples"] == 30 and set(sim["attention"]) == {"0.25", "1.0"} and set(sim["concat"]) == {"1.0"}
    for tau, rows in sim["attention"].items():
        assert rows["camera_drop"]["attention_faulted"] == 0.0  # masked: no attention at all
        assert 0 < rows["clean"]["lipschitz"] <= 1 / (2 * float(tau)) + 1e-6
        assert rows["clean"]["attention_camera"] + rows["clean"]["attention_lidar"] + rows["clean"]["attention_imu"] \
            == pytest.approx(1.0, abs=1e-4)
    assert "attention_faulted" not in sim["concat"]["1.0"]["camera_drop"]
    assert min(r["rise"] for r in report["summary"]["attention"].values()) <= 0.0 <= \
        max(r["rise"] for r in report["summary"]["attention"].values())
    assert report["summary"]["concat"]["clean"]["rise"] == 0.0
    assert all(Path(p).is_file() for p in report["plots"])
    assert json.loads((tmp_path / "out" / "robustness.json").read_text())["summary"].keys() == {"attention", "concat"}
    tables = (tmp_path / "out" / "robustness.md").read_text()  # the tables docs/RESULTS.md quotes
    clean = report["summary"]["attention"]["clean"]["head_error"]
    assert f"| clean | {clean:.3f} (+0%) |" in tables and tables.count("| lidar noise |") == 2
    concat = report["sim"]["concat"]["1.0"]  # a dropped lidar: the error ahead, where the camera sees too
    rise = concat["lidar_drop"]["obstacle_in_view_mae_m"] / concat["clean"]["obstacle_in_view_mae_m"] - 1
    survives = tables.split("### What survives a dropped sensor")[1]
    assert f"{100 * rise:+.0f}%" in survives.split("| concat, lidar drop |")[1].splitlines()[0]


def test_obstacle_sectors_in_a_camera_view():
    assert T.sectors_in_view(360) == list(range(T.SECTORS))
    assert T.sectors_in_view(90) == [0, 1, 15]  # sectors are 22.5° wide, sector 0 centred straight ahead
    assert T.sectors_in_view(22.5) == [0] and T.sectors_in_view(20) == []
    assert T.sectors_in_view(T.sim_camera_hfov_deg()) == [0, 1, 15]  # the simulated 75° square camera


def test_goal_error_split_by_the_camera_view():
    heads = T.Heads(8, {"velocity": 2, "obstacles": T.SECTORS, "goal": 3})  # identity (de)normalisation
    bearings = torch.tensor([0.0, math.radians(30), math.radians(90), math.pi])  # two inside the 75° view
    true_goal = torch.stack([torch.full((4,), 3.0), bearings.cos(), bearings.sin()], -1)
    pred_goal = true_goal + torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [4.0, 0, 0]])
    ok = torch.ones(4, dtype=torch.bool)
    tgt = {"velocity": (torch.zeros(4, 2), ok), "obstacles": (torch.zeros(4, T.SECTORS), ok),
           "goal": (true_goal, ok)}
    pred = {"velocity": torch.zeros(4, 2), "obstacles": torch.zeros(4, T.SECTORS), "goal": pred_goal}
    errors = T.physical_errors(heads, pred, tgt)
    assert errors["goal_in_view_share"].tolist() == [1, 1, 0, 0]
    assert errors["goal_distance_in_view_mae_m"].tolist() == [1, 1]
    assert errors["goal_distance_out_of_view_mae_m"].tolist() == [2, 4]
    assert float(errors["goal_bearing_mae_deg"].max()) < 1e-4


def test_running_means_weigh_each_sample_once_and_skip_what_no_sample_covers():
    running = T.RunningMeans()
    running.add({"loss": torch.tensor(1.0), "in_view": torch.tensor([1.0]), "none": torch.zeros(0)}, batch_size=4)
    running.add({"loss": torch.tensor(3.0), "in_view": torch.tensor([3.0, 3.0, 3.0])}, batch_size=2)
    means = running.means()
    assert means["loss"] == pytest.approx(5 / 3)  # (4 * 1 + 2 * 3) / 6 samples
    assert means["in_view"] == 2.5  # (1 + 9) / 4 samples, not the mean of the two batch means (2.0)
    assert "none" not in means
