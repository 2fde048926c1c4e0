"""Wheel odometry as a fourth sensor: adapter, sync, tokens, training faults, the model and its export,
and a real robot's recording (the Clearpath Husky's nav_msgs/Odometry) replayed through a model that reads it."""

import json

import numpy as np
import pytest
import torch

from fusion_attn.adapters import odometry_to_sample, to_frame
from fusion_attn.bag import find_topics, open_reader
from fusion_attn.checkpoint import save_checkpoint
from fusion_attn.cli import main
from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.errors import MalformedMessageError
from fusion_attn.frames import NS_PER_S, ImuSample, Modality, OdometrySample
from fusion_attn.learn.augment import FAULTS, FaultPlan, corrupt, gather, random_tau
from fusion_attn.learn.data import Dataset, mirror_sequence, sim_episode
from fusion_attn.messages import TYPES
from fusion_attn.model import FusionModel
from fusion_attn.pipeline import FusionPipeline, validate_tau
from fusion_attn.sim.record import odometry_msg
from fusion_attn.sync import SensorSync, SyncConfig
from fusion_attn.tokenize import Tokenizer, imu_samples, input_spec, output_spec

CFG = FusionConfig(model=ModelConfig(odometry=True))
MS = NS_PER_S // 1000


def _twist(stamp_ns: int, v: float = 0.5, w: float = 0.2) -> OdometrySample:
    return OdometrySample(stamp_ns, "base_link", np.array([v, 0.0, 0.0]), np.array([0.0, 0.0, w]))


def test_nav_msgs_odometry_becomes_its_twist_in_the_child_frame():
    msg = odometry_msg(_twist(1_500_000_000, 0.7, -0.3))
    sample = to_frame(msg)
    assert isinstance(sample, OdometrySample) and sample.stamp_ns == 1_500_000_000
    assert sample.frame_id == "base_link"
    np.testing.assert_allclose(sample.linear, [0.7, 0, 0])
    np.testing.assert_allclose(sample.angular, [0, 0, -0.3])
    unnamed = TYPES.types["nav_msgs/msg/Odometry"](msg.header, "", msg.pose, msg.twist)
    assert odometry_to_sample(unnamed).frame_id == "odom"  # no child frame: the header's
    msg.twist.twist.linear.x = float("nan")
    with pytest.raises(MalformedMessageError, match="nav_msgs/msg/Odometry: non-finite twist"):
        to_frame(msg)


def test_the_sync_takes_odometry_only_for_a_model_that_reads_it():
    default = SensorSync(SyncConfig.for_model(FusionConfig()))
    assert default.add(_twist(10 * MS)) is None  # ignored, not dropped
    assert default.health[Modality.ODOMETRY].received == 0 and default.health[Modality.ODOMETRY].dropped == 0
    assert "odometry" not in default.summary(20 * MS) and default.snapshot(20 * MS).odometry is None

    sync = SensorSync(SyncConfig.for_model(CFG))
    for k in range(1, 41):  # 50 Hz for 0.8 s
        assert sync.add(_twist(k * 20 * MS, 0.01 * k)) is None
    window = sync.snapshot(800 * MS).odometry
    assert len(window) == 25 and window.stamps_ns[-1] == 800 * MS  # odometry.window_s 0.5 s
    np.testing.assert_allclose(window.linear[-1], [0.4, 0, 0])
    assert sync.add(_twist(820 * MS, v=150.0)) == "out_of_limits"  # limits.max_speed_mps 100
    assert sync.summary(820 * MS)["odometry"]["received"] == 40
    assert sync.snapshot(2000 * MS).odometry is None  # silent past max_age_s.odometry: masked


def test_odometry_tokens_come_after_tau_and_carry_the_twist():
    names = list(input_spec(CFG))
    assert names[: names.index("tau") + 1] == list(input_spec(FusionConfig()))  # a 3-sensor model's inputs, in order
    assert names[names.index("tau") + 1:] == ["odometry_chunks", "odometry_mask", "odometry_age"]
    assert input_spec(CFG)["tau"][0] == (5,) and output_spec(CFG)["trust"][0] == (4,)
    sync = SensorSync(SyncConfig.for_model(CFG))
    for k in range(1, 41):
        sync.add(_twist(k * 20 * MS, 0.5, 0.2))
    x = Tokenizer(CFG)(sync.snapshot(810 * MS), np.ones(5, np.float32))
    assert x["odometry_mask"].all()
    samples = imu_samples(x["odometry_chunks"], CFG.odometry)  # (chunks, S, 6) as IMU_AXES lays them out
    np.testing.assert_allclose(samples[..., 0], 0.5 / CFG.odometry.speed_scale, rtol=1e-6)
    np.testing.assert_allclose(samples[..., 5], 0.2 / CFG.odometry.angular_scale, rtol=1e-6)
    chunk_s = CFG.odometry.window_s / CFG.odometry.chunks  # each chunk's age is its end's: the newest twist's, 10 ms, and earlier
    np.testing.assert_allclose(x["odometry_age"], 0.01 + chunk_s * np.arange(CFG.odometry.chunks)[::-1], atol=1e-6)


def test_tau_takes_one_value_per_sensor_of_the_model():
    assert validate_tau([1, 2, 3, 4, 5], sensors=CFG.sensors).tolist() == [1, 2, 3, 4, 5]
    assert validate_tau([1, 2, 3, 4], sensors=FusionConfig().sensors).tolist() == [1, 2, 3, 4]
    # the node's τ, one per sensor the package knows: a model reads its own (not the odometry's, nor a second IMU's)
    assert validate_tau([1, 2, 3, 4, 5, 6], sensors=FusionConfig().sensors).tolist() == [1, 2, 3, 4]
    assert random_tau(8, 1.0, torch.Generator().manual_seed(0), sensors=4).shape == (8, 5)


@pytest.fixture(scope="module")
def episode():
    """A simulated episode tokenized for a model with odometry: every sample has it."""
    seq = sim_episode("control", 11, 4.0, 10.0, CFG)
    return seq, Dataset.join([(seq, 0)]).tensors()


def test_simulated_episodes_carry_the_wheel_odometry(episode):
    seq, _ = episode
    assert seq["odometry_mask"].all(1).mean() > 0.9
    newest = imu_samples(seq["odometry_chunks"], CFG.odometry)[:, -1, -1]  # the newest twist of each sample
    speed = newest[:, 0] * CFG.odometry.speed_scale
    yaw_rate = newest[:, 5] * CFG.odometry.angular_scale
    assert np.abs(speed - seq["velocity"][:, 0]).mean() < 0.05  # within a 50 Hz step and its noise of the truth
    assert np.abs(yaw_rate - seq["velocity"][:, 1]).mean() < 0.15
    mirrored = mirror_sequence(seq, CFG)
    np.testing.assert_allclose(imu_samples(mirrored["odometry_chunks"], CFG.odometry)[..., 5],
                               -imu_samples(seq["odometry_chunks"], CFG.odometry)[..., 5])


@pytest.mark.parametrize("fault", FAULTS)
def test_odometry_faults_edit_only_the_odometry(episode, fault):
    _, t = episode
    idx = torch.arange(35, 40)
    clean = gather(t, idx)
    plan = FaultPlan.fixed(len(idx), int(Modality.ODOMETRY), fault)
    x = corrupt(t, idx, plan, CFG, 10.0, torch.Generator().manual_seed(0))
    assert plan.content_faulted(4)[:, 3].all() == (fault in ("zero", "noise", "freeze", "partial"))
    for key in clean:
        if not key.startswith("odometry_"):
            assert torch.equal(x[key], clean[key]), key
    values, before = imu_samples(x["odometry_chunks"], CFG.odometry), imu_samples(clean["odometry_chunks"], CFG.odometry)
    if fault == "drop":
        assert not x["odometry_mask"].any()
    elif fault == "zero":
        assert (values == 0).all()
    elif fault == "partial":  # the turn rate reads zero, the speed is kept
        assert (values[..., 3:] == 0).all() and torch.equal(values[..., :3], before[..., :3])
    elif fault == "freeze":
        assert (values == values[:, :1, :1]).all()
    elif fault == "delay":
        assert (x["odometry_age"] > clean["odometry_age"]).all()
    else:
        assert not torch.equal(values, before)


@pytest.mark.parametrize("second_imu", [False, True], ids=["odometry", "odometry_and_imu2"])
def test_a_model_with_odometry_exports_to_onnx_and_runs_in_onnxruntime(tmp_path, second_imu):
    """Alone, and with a second IMU after the odometry (the model test_node_dds runs, seed 0)."""
    cfg = FusionConfig(model=ModelConfig(odometry=True, second_imu=second_imu))
    torch.manual_seed(0)
    path = save_checkpoint(FusionModel(cfg).eval(), tmp_path / "odometry.safetensors")
    x = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in input_spec(cfg).items()}
    x["tau"][:] = 1.0
    for name in cfg.streams:
        x[f"{name}_mask"][:] = True
    x["odometry_chunks"][:] = 0.1
    ort = FusionPipeline.create(str(path), backend="onnxruntime", threads=1).backend.run(x)
    ref = FusionPipeline.create(str(path), backend="torch", threads=1).backend.run(x)
    S = len(cfg.sensors)
    assert ort["attention"].shape == (1, S, cfg.model.heads) and ort["trust"].shape == (1, S)
    np.testing.assert_allclose(ort["fused"], ref["fused"], atol=1e-4)
    assert (ort["attention"][0, 3:].sum(-1) > 0).all()  # the odometry (and the second IMU) attended


def test_a_real_robots_odometry_replays_through_a_model_that_reads_it(real_data, tmp_path):
    """The model of the ONNX test above (odometry and a second IMU): the Husky has one IMU, so the second is
    absent in every fusion, as a failed one would be."""
    bag = real_data / "husky_imu_odom_gps.bag"
    with open_reader([bag]) as reader:
        assert find_topics(reader).sensors[Modality.ODOMETRY] == "/husky_velocity_controller/odom"
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(model=ModelConfig(odometry=True, second_imu=True))).eval()
    checkpoint = save_checkpoint(model, tmp_path / "odometry.safetensors")
    assert main(["replay", str(bag), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--end", "30",
                 "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["topics"] == {"imu": "/imu/data", "odometry": "/husky_velocity_controller/odom"}
    assert summary["present_fraction"]["odometry"] > 0.9 and summary["attention_mean"]["odometry"] > 0
    assert summary["present_fraction"]["imu2"] == 0.0 and summary["attention_mean"]["imu2"] == 0.0
    assert set(summary["trust_mean"]) == {"camera", "lidar", "imu", "odometry", "imu2"}
    # the packaged model reads no odometry: the topic is skipped, saying why
    assert main(["replay", str(bag), "-o", str(tmp_path / "default"), "--end", "5", "--no-progress"]) == 0
    skipped = json.loads((tmp_path / "default" / "summary.json").read_text())["skipped_topics"]
    assert skipped["/husky_velocity_controller/odom"] == "the model does not read odometry"


def test_the_imu_and_odometry_frames_of_a_simulated_step_arrive_in_stamp_order():
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.robot import RobotEnv

    env = RobotEnv("control", faults=FaultConfig())
    try:
        env.reset(seed=3)
        frames = [f for _ in range(10) for f in env.step(np.array([0.5, 0.3], np.float32))[4]["frames"]]
    finally:
        env.close()
    odometry = [f.stamp_ns for f in frames if isinstance(f, OdometrySample)]
    assert len(odometry) >= 9 and np.all(np.diff(odometry) == 20 * MS)  # 50 Hz
    assert any(isinstance(f, ImuSample) for f in frames)
    assert np.all(np.diff([f.stamp_ns for f in frames]) >= 0)  # the sync and the fusion clock rely on it
