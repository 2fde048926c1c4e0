"""A second IMU (Modality.IMU2): ImuSamples told apart by their topic, from the simulated rig through the
sync, tokens, model, ONNX Runtime, faults and a recorded bag's replay (the node's: test_node_dds)."""

import json

import numpy as np
import pytest
import torch

from fusion_attn.backends.export import example_inputs
from fusion_attn.bag import find_topics, open_reader
from fusion_attn.checkpoint import save_checkpoint
from fusion_attn.cli import main
from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.errors import ConfigError
from fusion_attn.frames import NS_PER_S, ImuSample, Modality
from fusion_attn.learn.augment import FAULTS, FaultPlan, corrupt, gather
from fusion_attn.learn.data import Dataset, mirror_sequence, sim_episode
from fusion_attn.model import FusionModel
from fusion_attn.pipeline import FusionPipeline, validate_tau
from fusion_attn.sim.sensors import SensorConfig
from fusion_attn.sync import SensorSync, SyncConfig
from fusion_attn.tokenize import Tokenizer, imu_samples, input_spec, output_spec, tokenize_imu

CFG = FusionConfig(model=ModelConfig(second_imu=True))  # camera, lidar, IMU, second IMU: not a prefix of Modality
RIG = SensorConfig().with_second_imu()
MS = NS_PER_S // 1000
GYRO_Z = 5  # tokenize.IMU_AXES


def _sample(stamp_ns: int, yaw_rate: float) -> ImuSample:
    return ImuSample(stamp_ns, "imu", np.array([0.0, 0.0, 9.81]), np.array([0.0, 0.0, yaw_rate]))


def test_the_sync_takes_a_second_imus_samples_by_the_sensor_named():
    sync = SensorSync(SyncConfig.for_model(CFG))
    for k in range(1, 61):  # 200 Hz for 0.3 s, the two IMUs reading different turns
        assert sync.add(_sample(k * 5 * MS, 0.1)) is None  # by type: the IMU
        assert sync.add(_sample(k * 5 * MS + MS, 0.3), modality=Modality.IMU2) is None
    snap = sync.snapshot(300 * MS)
    assert len(snap.imu) == len(snap.imu2) == 50  # imu.window_s 0.25 s each
    assert np.all(snap.imu.gyro[:, 2] == 0.1) and np.all(snap.imu2.gyro[:, 2] == 0.3)
    assert sync.summary(300 * MS)["imu2"]["received"] == 60
    assert sync.add(_sample(305 * MS, 100.0), modality=Modality.IMU2) == "out_of_limits"  # the IMU's limits
    assert sync.snapshot(400 * MS).imu2 is None  # silent past max_age_s.imu2: masked
    with pytest.raises(TypeError, match="a ImuSample is no lidar frame"):  # a front-end's mistake
        sync.add(_sample(310 * MS, 0.1), modality=Modality.LIDAR)
    # a model without one ignores it, counting nothing
    default = SensorSync(SyncConfig.for_model(FusionConfig()))
    assert default.add(_sample(5 * MS, 0.1), modality=Modality.IMU2) is None
    assert default.health[Modality.IMU2].received == 0 and "imu2" not in default.summary(5 * MS)


def test_its_tokens_come_after_tau_and_are_the_first_imus_tokenizer():
    names = list(input_spec(CFG))
    assert names[: names.index("tau") + 1] == list(input_spec(FusionConfig()))
    assert names[names.index("tau") + 1:] == ["imu2_chunks", "imu2_mask", "imu2_age"]
    both = FusionConfig(model=ModelConfig(odometry=True, second_imu=True))
    assert list(input_spec(both))[-6:] == ["odometry_chunks", "odometry_mask", "odometry_age", "imu2_chunks",
                                          "imu2_mask", "imu2_age"]
    assert input_spec(CFG)["tau"][0] == (5,) and output_spec(CFG)["trust"][0] == (4,)
    # the node's τ, one per sensor the package knows: this model's are global, camera, lidar, IMU, second IMU
    assert validate_tau([1, 2, 3, 4, 5, 6], CFG.sensors).tolist() == [1, 2, 3, 4, 6]
    sync = SensorSync(SyncConfig.for_model(CFG))
    for k in range(1, 61):
        sync.add(_sample(k * 5 * MS, 0.3), modality=Modality.IMU2)
    snap = sync.snapshot(302 * MS)
    x = Tokenizer(CFG)(snap, np.ones(5, np.float32))
    assert x["imu2_mask"].all() and not x["imu_mask"].any()
    chunks, _, before_newest = tokenize_imu(snap.imu2, CFG.imu)
    np.testing.assert_array_equal(x["imu2_chunks"], chunks)
    np.testing.assert_allclose(x["imu2_age"], 0.002 + before_newest, atol=1e-6)


@pytest.fixture(scope="module")
def episode():
    """A simulated episode of a rig with two IMUs, tokenized for a model that reads both."""
    seq = sim_episode("control", 11, 4.0, 10.0, CFG, sensors=RIG)
    return seq, Dataset.join([(seq, 0)]).tensors()


def test_the_simulated_rig_carries_two_imus_with_their_own_errors(episode):
    seq, _ = episode
    assert seq["imu2_mask"].all(1).mean() > 0.9
    first, second = (imu_samples(seq[f"{n}_chunks"], CFG.imu)[..., GYRO_Z] * CFG.imu.gyro_scale for n in ("imu", "imu2"))
    truth = seq["velocity"][:, 1]
    for gyro in (first, second):  # each reads the turn, the newest chunk within its noise and 50 Hz step
        assert np.abs(gyro[:, -1].mean(-1) - truth).mean() < 0.05
    assert np.abs(first - second).mean() > 1e-3  # their own bias and noise: not one IMU twice
    mirrored = mirror_sequence(seq, CFG)
    np.testing.assert_allclose(imu_samples(mirrored["imu2_chunks"], CFG.imu)[..., GYRO_Z],
                               -imu_samples(seq["imu2_chunks"], CFG.imu)[..., GYRO_Z])


@pytest.mark.parametrize("fault", FAULTS)
def test_a_second_imus_faults_edit_only_its_tokens(episode, fault):
    _, t = episode
    idx = torch.arange(30, 35)
    clean = gather(t, idx)
    plan = FaultPlan.fixed(len(idx), CFG.sensors.index(Modality.IMU2), fault)
    x = corrupt(t, idx, plan, CFG, 10.0, torch.Generator().manual_seed(0))
    assert plan.content_faulted(4)[:, 3].all() == (fault in ("zero", "noise", "freeze", "partial"))
    for key in clean:
        if not key.startswith("imu2_"):
            assert torch.equal(x[key], clean[key]), key
    values, before = imu_samples(x["imu2_chunks"], CFG.imu), imu_samples(clean["imu2_chunks"], CFG.imu)
    if fault == "drop":
        assert not x["imu2_mask"].any()
    elif fault == "zero":
        assert (values == 0).all()
    elif fault == "partial":  # the gyro reads zero, the accelerometer works
        assert (values[..., 3:] == 0).all() and torch.equal(values[..., :3], before[..., :3])
    elif fault == "freeze":
        assert (values == values[:, :1, :1]).all()
    elif fault == "delay":
        assert (x["imu2_age"] > clean["imu2_age"]).all()
    else:
        assert not torch.equal(values, before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(FusionModel(CFG).eval(), tmp_path_factory.mktemp("imu2") / "imu2.safetensors")


def test_a_model_with_a_second_imu_exports_by_name_and_runs_in_onnxruntime(checkpoint):
    """Its inputs after τ are the second IMU's, where a model with odometry has the odometry's: the graph takes
    them by name, so ONNX Runtime fuses what torch does."""
    x = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in input_spec(CFG).items()}
    x["tau"][:] = 1.0
    x["imu_mask"][:] = x["imu2_mask"][:] = True
    x["imu2_chunks"][:] = 0.1
    ort = FusionPipeline.create(str(checkpoint), backend="onnxruntime", threads=1).backend.run(x)
    ref = FusionPipeline.create(str(checkpoint), backend="torch", threads=1).backend.run(x)
    assert ort["attention"].shape == (1, 4, CFG.model.heads) and ort["trust"].shape == (1, 4)
    for name in ("fused", "attention", "trust"):
        np.testing.assert_allclose(ort[name], ref[name], atol=1e-4)
    assert ort["attention"][0, 3].sum() > 0  # the second IMU is attended


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """Two seconds of the simulated rig with two IMUs, recorded as `sim-record` does."""
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.record import _record
    from fusion_attn.sim.robot import RobotEnv

    out = tmp_path_factory.mktemp("imu2_bag") / "two_imus"
    env = RobotEnv("control", sensors=RIG, faults=FaultConfig())
    try:
        counts = _record(env, out, episodes=1, seconds=2.0, seed=5)
    finally:
        env.close()
    assert counts["/imu2/data"] == counts["/imu/data"] > 350  # 200 Hz each
    return out


def test_a_recording_with_two_imus_gives_each_its_topic(recording):
    with open_reader([recording]) as reader:
        topics = find_topics(reader)
        assert topics.sensors[Modality.IMU] == "/imu/data" and topics.sensors[Modality.IMU2] == "/imu2/data"
        for named in ({Modality.IMU: "/imu2/data"}, {Modality.IMU2: "/imu/data"}):  # either named, the other takes the rest
            swapped = find_topics(reader, named)
            assert (swapped.sensors[Modality.IMU], swapped.sensors[Modality.IMU2]) == ("/imu2/data", "/imu/data")
        with pytest.raises(ConfigError, match="--imu2-topic /imu/data: that is the imu topic"):
            find_topics(reader, {Modality.IMU: "/imu/data", Modality.IMU2: "/imu/data"})
        one = find_topics(reader, leave_out={Modality.IMU2: "the model does not read imu2"})
        assert Modality.IMU2 not in one.sensors and "choose this one with --imu-topic" in one.skipped["/imu2/data"]


def test_a_model_with_a_second_imu_replays_a_recording_of_two(recording, checkpoint, tmp_path):
    assert main(["replay", str(recording), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
                 "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["topics"]["imu2"] == "/imu2/data" and summary["topics"]["imu"] == "/imu/data"
    assert summary["present_fraction"]["imu2"] > 0.9 and summary["attention_mean"]["imu2"] > 0
    assert set(summary["trust_mean"]) == {"camera", "lidar", "imu", "imu2"}



def test_fuse_takes_the_models_tau_in_its_order(recording, checkpoint, capsys):
    """fuse's --tau values are the model's: the fifth is the second IMU's (the node's fifth, tau.odometry, is not)."""
    assert main(["fuse", "--bag", str(recording), "--checkpoint", str(checkpoint), "--json",
                 "--tau", "1", "1", "1", "1", "0.5"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["tau"] == [1.0, 1.0, 1.0, 1.0, 0.5] and state["modalities"]["imu2"]["present"]
    assert main(["fuse", "--bag", str(recording), "--checkpoint", str(checkpoint), "--tau", "1", "1", "1", "1", "1", "1"]) != 0
    assert "--tau takes at most 5 values (tau.global, tau.camera, tau.lidar, tau.imu, tau.imu2), got 6" in capsys.readouterr().err


def test_training_with_a_second_imu_gives_its_rig_one_and_validates_its_faults(tmp_path):
    """`train --second-imu`: the simulated rig gets the second IMU, the model reads it, and validation faults
    it as every other sensor (a run of a few steps: the wiring, not what it learns)."""
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--second-imu", "--steps", "4", "--batch", "8", "--sim-episodes", "1",
                 "--val-episodes", "1", "--sim-seconds", "2", "--eval-every", "100", "--cache", str(tmp_path / "cache"),
                 "--no-progress"]) == 0
    model = FusionPipeline.create(str(out / "model.safetensors"), backend="torch", threads=1)
    assert model.cfg.sensor_names == ("camera", "lidar", "imu", "imu2")
    val = json.loads((out / "metrics.json").read_text())["val"]
    assert {f"imu2_{f}" for f in FAULTS} <= set(val) and val["imu2_drop"]["trust_faulted"] == 0.0
    assert val["clean"]["trust_imu2"] > 0  # present in the clean samples: the rig had it
    # held-out episodes follow the model evaluated, not the data settings they were given (eval-robustness
    # takes its first run's, which may have no second IMU)
    from fusion_attn.learn.data import episode_shards
    from fusion_attn.learn.loop import TrainConfig

    for cfg, imu2_hz in ((CFG, SensorConfig.imu_hz), (FusionConfig(), 0.0)):
        assert {s.make.args[-1].imu2_hz for s in episode_shards(TrainConfig(), cfg, "test", 2)} == {imu2_hz}


def test_the_simulators_fused_observation_needs_a_rig_with_the_second_imu_which_the_rl_env_gives(checkpoint):
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.robot import RobotEnv
    from fusion_attn.sim.wrappers import FusedObservation

    pipeline = FusionPipeline.create(str(checkpoint), backend="onnxruntime", threads=1)
    with pytest.raises(ConfigError, match="reads a second IMU and the simulated rig has none"):
        FusedObservation(RobotEnv("control", faults=FaultConfig()), pipeline)
    env = FusedObservation(RobotEnv("control", sensors=RIG, faults=FaultConfig()), pipeline)
    try:
        env.reset(seed=1)
        for _ in range(10):  # 0.2 s: the fusion clock's 20 Hz ticks
            info = env.step(np.zeros(2, np.float32))[4]
        assert info["fused"].sensors == ("camera", "lidar", "imu", "imu2") and info["fused"].present.all()
    finally:
        env.close()
    # the RL agents' env on such a fusion: its robot carries the second IMU
    from rl.config import PPOConfig
    from rl.ppo import make_env

    env = make_env(PPOConfig(env_id="FusionAttn/Control-v0", fusion_checkpoint=str(checkpoint)))
    try:
        assert env.unwrapped.sensors.imu2_hz == SensorConfig.imu_hz
    finally:
        env.close()


# --- the rate readout (ModelConfig.rate_readout) ------------------------------------------------


def _read_into_fused(model, x):
    """The (speed, yaw rate) the rate readout added to the fused state: its projection solved back."""
    tau = x.pop("tau")
    with torch.no_grad():
        out = model.run(x, tau)
        weight = model.rate_embed.weight.clone()
        model.rate_embed.weight.zero_()
        without = model.run(x, tau)["fused"]
        model.rate_embed.weight.copy_(weight)
    return torch.linalg.lstsq(weight, (out["fused"] - without).T).solution.T, out


def test_the_rate_readout_averages_the_imus_reads_at_their_trust_and_tau_and_drops_an_absent_one():
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(model=ModelConfig(second_imu=True, rate_readout=True))).eval()
    assert list(model.rate_readout) == ["imu", "imu2"] and model.rate_sensors == [2, 3]
    with torch.no_grad():  # each IMU reads a constant: the first (0.5 m/s, 1 rad/s), the second (0.5, 3)
        for name, yaw in (("imu", 1.0), ("imu2", 3.0)):
            model.rate_readout[name].weight.zero_()
            model.rate_readout[name].bias.copy_(torch.tensor([0.5, yaw]))
    x = {k: torch.from_numpy(v) for k, v in example_inputs(model, 3, 0).items()}
    x["imu2_mask"][1] = False  # no second IMU
    x["imu_mask"][2] = False  # no first IMU
    x["tau"][0, 4] = 0.5  # the second IMU's τ (after global, camera, lidar, IMU): its share ∝ trust^(1 / 0.5)
    read, out = _read_into_fused(model, x)
    w = out["trust"][0, 2:] ** torch.tensor([1.0, 2.0])  # no trust floor (the token fusion keeps its own)
    expected = torch.tensor([[0.5, float((w[0] + 3 * w[1]) / w.sum())], [0.5, 1.0], [0.5, 3.0]])
    torch.testing.assert_close(read, expected, atol=1e-4, rtol=0)
    assert out["rate_reads"].shape == (3, 2, 2)
    # no IMU at all: nothing added
    x = {k: torch.from_numpy(v) for k, v in example_inputs(model, 1, 0).items()}
    x["imu_mask"][:] = x["imu2_mask"][:] = False
    torch.testing.assert_close(_read_into_fused(model, x)[0], torch.zeros(1, 2), atol=1e-5, rtol=0)


def test_each_read_is_trained_where_its_imu_is_present_and_unfaulted():
    from fusion_attn.learn.objectives import build_heads, rate_readout_loss, rate_sound

    heads = build_heads(CFG)
    heads.std_velocity.fill_(0.5)
    B = 4
    plan = FaultPlan(sensor=torch.tensor([-1, 2, 3, -1]), fault=torch.zeros(B, dtype=torch.long),
                     lag=torch.zeros(B, dtype=torch.long), strength=torch.ones(B), where=torch.zeros(B))
    x = {"imu_mask": torch.ones(B, 8, dtype=torch.bool), "imu2_mask": torch.ones(B, 8, dtype=torch.bool)}
    x["imu2_mask"][3] = False
    sound = rate_sound(x, plan, CFG)
    assert sound.tolist() == [[True, True], [False, True], [True, False], [True, False]]
    truth = torch.tensor([[1.0, 0.2]] * B)
    reads = truth.unsqueeze(1).repeat(1, 2, 1)
    labelled = torch.tensor([True, True, True, False])
    assert rate_readout_loss(reads, (truth, labelled), sound, heads) == 0
    reads[1, 0] = reads[2, 1] = 100.0  # wrong where the stream is faulted: not its fault
    reads[3] = 100.0  # and on a sample without a label
    assert rate_readout_loss(reads, (truth, labelled), sound, heads) == 0
    reads[0, 1, 1] = 1.2  # a sound read off by 1 rad/s: (1 / 0.5)² over two values, over 4 sound reads
    assert float(rate_readout_loss(reads, (truth, labelled), sound, heads)) == pytest.approx(4 / 2 / 4)


def test_each_read_starts_as_its_streams_newest_turn_rate_and_the_odometrys_speed():
    """What a trained read refines: the newest sample's gyro (odometry: turn rate and speed), unscaled."""
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(model=ModelConfig(odometry=True, second_imu=True, rate_readout=True))).eval()
    sync = SensorSync(SyncConfig.for_model(model.cfg))
    for k in range(1, 61):  # the IMUs turning at 0.4 and 0.6 rad/s, 0.5 rad/s faster for the last 10 ms
        sync.add(_sample(k * 5 * MS, 0.4 + 0.5 * (k >= 58)))
        sync.add(_sample(k * 5 * MS, 0.6 + 0.5 * (k >= 58)), modality=Modality.IMU2)
    x = Tokenizer(model.cfg)(sync.snapshot(301 * MS), np.ones(1 + len(model.cfg.sensors), np.float32))
    chunks = {n: torch.from_numpy(x[f"{n}_chunks"])[None] for n in ("imu", "imu2")}
    with torch.no_grad():
        torch.testing.assert_close(model.rate_readout["imu"](chunks["imu"].flatten(1)), torch.tensor([[0.0, 0.9]]))
        torch.testing.assert_close(model.rate_readout["imu2"](chunks["imu2"].flatten(1)), torch.tensor([[0.0, 1.1]]))
        odometry = torch.zeros(1, model.cfg.odometry.tokens, model.cfg.odometry.features)
        newest = imu_samples(odometry, model.cfg.odometry)[0, -1, -1]
        newest[0], newest[5] = 1.2 / model.cfg.odometry.speed_scale, -0.3 / model.cfg.odometry.angular_scale
        torch.testing.assert_close(model.rate_readout["odometry"](odometry.flatten(1)), torch.tensor([[1.2, -0.3]]))


@pytest.mark.parametrize("ego_rate", [False, True], ids=["into_fused", "ego_rate_output"])
def test_a_rate_readout_model_exports_and_onnxruntime_fuses_its_rate_as_torch_does(tmp_path, ego_rate):
    """The reads, their share at each stream's τ and the rate's embedding, or the ego_rate output, are in the graph."""
    cfg = FusionConfig(model=ModelConfig(second_imu=True, rate_readout=True, rate_output=ego_rate))
    torch.manual_seed(0)
    model = FusionModel(cfg).eval()
    path = save_checkpoint(model, tmp_path / "rate.safetensors")
    x = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in input_spec(cfg).items()}
    x["tau"][:] = 1.0
    x["tau"][0, 4] = 0.5  # the second IMU's
    x["imu_mask"][:] = x["imu2_mask"][:] = True
    x["imu_chunks"][:], x["imu2_chunks"][:] = 0.1, 0.3
    ort = FusionPipeline.create(str(path), backend="onnxruntime", threads=1).backend.run(x)
    ref = FusionPipeline.create(str(path), backend="torch", threads=1).backend.run(x)
    assert set(ort) == set(ref) == set(output_spec(cfg)) and ("ego_rate" in ort) == ego_rate
    for name in ("fused", "ego_rate") if ego_rate else ("fused",):
        np.testing.assert_allclose(ort[name], ref[name], atol=1e-4, err_msg=name)


def test_the_reads_learn_from_their_own_objective_only():
    """The fused state carries the reads, but its losses do not train them: they stay the sensors' own estimates."""
    from fusion_attn.learn.objectives import build_heads, rate_readout_loss

    torch.manual_seed(0)
    model = FusionModel(FusionConfig(model=ModelConfig(second_imu=True, rate_readout=True))).train()
    x = {k: torch.from_numpy(v) for k, v in example_inputs(model, 2, 0).items()}
    out = model.run(x, x.pop("tau"))
    out["fused"].square().sum().backward(retain_graph=True)
    assert model.rate_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.rate_readout.parameters())
    sound = torch.ones(2, 2, dtype=torch.bool)
    rate_readout_loss(out["rate_reads"], (torch.ones(2, 2), torch.ones(2, dtype=torch.bool)), sound,
                      build_heads(model.cfg)).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.rate_readout.parameters())


def test_the_ego_rate_output_is_the_velocity_objectives_prediction_and_stays_out_of_the_fused_state(tmp_path):
    from fusion_attn.learn.objectives import build_heads, load_heads, losses, save_heads

    with pytest.raises(ConfigError, match="rate_output needs model.rate_readout"):
        FusionConfig(model=ModelConfig(second_imu=True, rate_output=True))
    with pytest.raises(ConfigError, match="rate_readout needs model.fusion 'sensor'"):
        FusionConfig(model=ModelConfig(second_imu=True, rate_readout=True, fusion="token"))
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(model=ModelConfig(second_imu=True, rate_readout=True, rate_output=True))).eval()
    assert model.rate_embed is None
    x = {k: torch.from_numpy(v) for k, v in example_inputs(model, 2, 0).items()}
    x["imu2_mask"][1] = False  # no second IMU: the first's read alone
    tau = x.pop("tau")
    with torch.no_grad():
        for name, yaw in (("imu", 1.0), ("imu2", 3.0)):
            model.rate_readout[name].weight.zero_()
            model.rate_readout[name].bias.copy_(torch.tensor([0.5, yaw]))
        correction = model.ego_rate.correction[-1].bias.clone()
        model.ego_rate.correction[-1].weight.zero_()  # a constant correction, in units of the target's std
        model.ego_rate.standardise(torch.tensor([0.2, 0.0]), torch.tensor([0.5, 2.0]))
        out = model.run(x, tau)
        w = out["trust"][0, 2:]
        average = torch.tensor([[0.5, float((w[0] + 3 * w[1]) / w.sum())], [0.5, 1.0]])
        offset = correction * torch.tensor([0.5, 2.0])
        torch.testing.assert_close(out["ego_rate"], average + offset, atol=1e-5, rtol=0)  # gain 1: the average whole
        model.ego_rate.gain.copy_(torch.tensor([0.5, 1.0]))  # half the speed read's departure from the mean
        torch.testing.assert_close(model.run(x, tau)["ego_rate"], average + offset - torch.tensor([0.15, 0.0]),
                                   atol=1e-5, rtol=0)
        model.rate_readout["imu"].bias.fill_(9.0)  # other reads: the same fused state
        torch.testing.assert_close(model.run(x, tau)["fused"], out["fused"])
        torch.nn.init.normal_(model.ego_rate.correction[-1].weight, std=0.05)  # the correction reads the tokens again
    model.train()
    out = model.run(x, tau)
    heads = build_heads(model.cfg)
    assert "velocity" not in heads.out  # no head of its own: the model's output is the prediction
    heads.mean_velocity.fill_(0.2)
    heads.std_velocity.fill_(0.5)
    feature = out["latents"].flatten(1)
    pred = heads(feature, out["ego_rate"])
    torch.testing.assert_close(pred["velocity"], (out["ego_rate"] - 0.2) / 0.5)
    with pytest.raises(ConfigError, match="ego_rate output; none was given"):
        heads(feature)
    truth = (torch.tensor([[0.3, 0.1], [0.2, -0.4]]), torch.ones(2, dtype=torch.bool))
    losses(heads, pred, {"velocity": truth})["velocity"].backward()  # trains the gain and the correction, not the reads
    assert all(p.grad is None for p in model.rate_readout.parameters())
    assert model.ego_rate.gain.grad.abs().sum() > 0 and model.ego_rate.correction[-1].weight.grad.abs().sum() > 0
    assert model.queries.grad.abs().sum() > 0  # through the correction, the fusion learns to carry what it reads
    path = save_heads(heads, tmp_path / "model.heads.safetensors")
    assert load_heads(path).ego_rate and "velocity" not in load_heads(path).out


@pytest.fixture(scope="module")
def ego_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(model=ModelConfig(second_imu=True, rate_readout=True, rate_output=True))).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ego") / "ego.safetensors")


def test_the_ego_rate_reaches_fuse_and_replays_fused_bag(recording, ego_checkpoint, tmp_path, capsys):
    assert main(["fuse", "--bag", str(recording), "--checkpoint", str(ego_checkpoint), "--json"]) == 0
    ego = json.loads(capsys.readouterr().out)["ego_rate"]
    assert set(ego) == {"speed_mps", "yaw_rate_radps"} and all(np.isfinite(v) for v in ego.values())
    assert main(["fuse", "--bag", str(recording), "--checkpoint", str(ego_checkpoint)]) == 0
    assert f"speed {ego['speed_mps']:.3f} m/s  yaw rate {ego['yaw_rate_radps']:.3f} rad/s" in capsys.readouterr().out
    assert main(["replay", str(recording), "-o", str(tmp_path / "out"), "--checkpoint", str(ego_checkpoint),
                 "--no-progress"]) == 0
    from fusion_attn.messages import TYPES
    from fusion_attn.outputs import parse_fused_state_rows

    with open_reader([tmp_path / "out" / "fused"]) as reader:
        msgs = [TYPES.deserialize_cdr(raw, "sensor_msgs/msg/Image") for conn, _, raw in reader.messages()
                if conn.topic == "/fused_state"]
    assert msgs and all(m.height == 1 + CFG.model.fusion_tokens + 4 + 1 for m in msgs)
    rates = np.array([parse_fused_state_rows(m.data.view("<f4").reshape(m.height, m.width), CFG.model.heads, 4,
                                             ego_rate=True)["ego_rate"] for m in msgs])
    assert np.isfinite(rates).all() and len(np.unique(rates[:, 1])) > 1  # it follows the recording


def test_the_simulators_observation_and_contract_carry_the_ego_rate(ego_checkpoint):
    from fusion_attn.contract import PolicyContract
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.robot import RobotEnv
    from fusion_attn.sim.wrappers import FusedObservation

    pipeline = FusionPipeline.create(str(ego_checkpoint), backend="onnxruntime", threads=1)
    env = FusedObservation(RobotEnv("control", sensors=RIG, faults=FaultConfig()), pipeline, with_attention=True)
    try:
        env.reset(seed=1)
        for _ in range(10):
            obs, *_, info = env.step(np.zeros(2, np.float32))
        assert env.layout.ego_rate and obs.shape == (CFG.model.dim + 4 + 2,)
        np.testing.assert_array_equal(obs[-2:], info["fused"].ego_rate)
        contract = PolicyContract.from_dict(json.loads(json.dumps(env.contract(None, 0.1).to_dict())))
        assert contract.observation == env.layout
    finally:
        env.close()
    old = env.contract(None, 0.1).to_dict()
    del old["observation"]["ego_rate"]  # a contract written before the output existed
    assert not PolicyContract.from_dict(old).observation.ego_rate


def test_training_puts_the_ego_rate_in_the_velocity_targets_units(tmp_path):
    """The output's mean and spread are the training set's velocity's, as the heads' are (a run of a few steps)."""
    from fusion_attn.checkpoint import load_checkpoint
    from fusion_attn.learn.objectives import heads_path, load_heads

    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--second-imu", "--rate-readout", "--rate-output", "--steps", "2", "--batch", "8",
                 "--sim-episodes", "1", "--val-episodes", "1", "--sim-seconds", "2", "--eval-every", "100",
                 "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    model, heads = load_checkpoint(out / "model.safetensors"), load_heads(heads_path(out / "model.safetensors"))
    torch.testing.assert_close(model.ego_rate.mean, heads.mean_velocity)
    torch.testing.assert_close(model.ego_rate.std, heads.std_velocity)
    assert heads.std_velocity.min() > 0 and heads.mean_velocity.abs().sum() > 0  # fitted, not the 0 and 1 they start at
