"""Sensor trust and the τ that steers between sensors: the sensor-level softmax of log trust, the trust
output, its training objective and its evaluation (AUROC), and the dataset's previous-frame links."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_attn.backends.export import example_inputs
from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.learn.augment import CONTENT_FAULTS, FAULTS, FaultPlan
from fusion_attn.learn.data import previous_frames
from fusion_attn.learn.evaluation import auroc
from fusion_attn.learn.objectives import stale_loss, trust_loss
from fusion_attn.model import FusionModel

MASKS = ("camera_mask", "lidar_mask", "imu_mask")


def _model(fusion="sensor", **kw) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(FusionConfig(model=ModelConfig(fusion=fusion, **kw))).eval()


def _inputs(model, batch=1, seed=0):
    return {k: torch.from_numpy(v) for k, v in example_inputs(model, batch, seed).items()}


def _force_trust(model, monkeypatch, logits):
    """Replace the learned trust logits of present sensors by `logits` (3,) or (B, 3); absent stay -inf
    (the real SensorTrust still decides which sensors are present)."""
    real = model.trust.forward

    def forward(tokens, mask, membership, evidence):
        out, present, *stale = real(tokens, mask, membership, evidence)
        forced = torch.as_tensor(logits, dtype=out.dtype).expand_as(out)
        return forced.masked_fill(~present, float("-inf")), present, *stale

    monkeypatch.setattr(model.trust, "forward", forward)


def _run(model, x, tau):
    with torch.no_grad():
        return model.run(x, torch.as_tensor(tau, dtype=torch.float32).reshape(-1, 4).expand(len(x["tau"]), -1))


def _expected_weights(trust, tau, present):
    """trust^(1 / (τ_global τ_sensor)) normalised over the present sensors, in float64."""
    trust, tau = np.asarray(trust, np.float64), np.asarray(tau, np.float64).reshape(-1, 4)
    log_w = np.where(present, np.log(np.where(present, trust, 1.0)) / (tau[:, :1] * tau[:, 1:]), -np.inf)
    w = np.exp(log_w - log_w.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


# --- the sensor-level softmax --------------------------------------------------------------------


LOGITS = [2.0, 0.5, -1.0]  # trust 0.88, 0.62, 0.27: the camera most trusted


def test_low_tau_puts_all_weight_on_the_most_trusted_sensor(monkeypatch):
    model = _model()
    _force_trust(model, monkeypatch, LOGITS)
    x = _inputs(model)
    w = _run(model, x, [0.01, 1, 1, 1])["sensor_weights"][0]
    assert w[0] > 0.999 and w.sum() == pytest.approx(1.0, abs=1e-6)
    # the camera gone, the lidar (next most trusted) takes it all
    x["camera_mask"][:] = False
    w = _run(model, x, [0.01, 1, 1, 1])["sensor_weights"][0]
    assert w[0] == 0.0 and w[1] > 0.999


def test_high_tau_averages_the_present_sensors_whatever_their_trust(monkeypatch):
    model = _model()
    _force_trust(model, monkeypatch, LOGITS)
    x = _inputs(model)
    w = _run(model, x, [1e4, 1, 1, 1])["sensor_weights"][0]
    torch.testing.assert_close(w, torch.full((3,), 1 / 3), atol=1e-4, rtol=0)
    x["lidar_mask"][:] = False
    out = _run(model, x, [1e4, 1, 1, 1])
    w = out["sensor_weights"][0]
    assert w[1] == 0.0 and out["trust"][0, 1] == 0.0  # exactly: no weight for an absent sensor, at any τ
    torch.testing.assert_close(w[[0, 2]], torch.full((2,), 0.5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tau", [[0.3, 1, 1, 1], [1, 1, 1, 1], [0.7, 2.0, 0.5, 1.5], [5, 1, 3, 1]])
def test_sensor_weights_are_trust_to_the_power_one_over_tau(monkeypatch, tau):
    model = _model()
    _force_trust(model, monkeypatch, LOGITS)
    x = _inputs(model, batch=2)
    x["imu_mask"][1] = False
    out = _run(model, x, tau)
    trust = torch.sigmoid(torch.tensor(LOGITS)).expand(2, 3).clone()
    trust[1, 2] = 0.0
    torch.testing.assert_close(out["trust"], trust, atol=1e-6, rtol=0)
    present = np.array([[True, True, True], [True, True, False]])
    expected = _expected_weights(out["trust"].numpy(), tau, present)
    np.testing.assert_allclose(out["sensor_weights"].numpy(), expected, atol=1e-6)
    # the attention output is those weights, the same on every head
    att = out["attention"]
    assert att.shape == (2, 3, model.cfg.model.heads)
    assert torch.equal(att, out["sensor_weights"].unsqueeze(-1).expand_as(att))


def test_per_sensor_tau_scales_that_sensors_logit_only():
    model = _model()
    log_trust = torch.log(torch.tensor([[0.9, 0.6, 0.3]]))
    base = model.sensor_logits(log_trust, torch.tensor([[2.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(base, log_trust / 2.0)
    lidar_hot = model.sensor_logits(log_trust, torch.tensor([[2.0, 1.0, 4.0, 1.0]]))
    torch.testing.assert_close(lidar_hot[:, [0, 2]], base[:, [0, 2]])
    torch.testing.assert_close(lidar_hot[:, 1], log_trust[:, 1] / 8.0)
    # a larger τ for the least trusted sensor raises its share, and only the ratio to the others moves
    w = lambda tau: torch.softmax(model.sensor_logits(log_trust, torch.tensor([tau])), -1)[0]
    assert w([1, 1, 1, 10])[2] > w([1, 1, 1, 1])[2]
    ratio = w([1, 1, 1, 10])[0] / w([1, 1, 1, 10])[1]
    assert float(ratio) == pytest.approx(0.9 / 0.6, rel=1e-5)  # camera : lidar untouched by the IMU's τ


def test_trust_floor_lets_a_high_tau_average_a_sensor_trusted_at_nothing(monkeypatch):
    """Without a floor a sensor trusted at 1e-40 gets no weight at any τ; with trust_floor 0.01 a high τ
    averages it in (0.01^(1/τ)), a low τ still ignores it, and trust above the floor is untouched."""
    dead = [2.0, 0.5, -92.0]  # IMU trust sigmoid(-92) ~ 1e-40
    plain, floored = _model(), _model(trust_floor=0.01)
    for model in (plain, floored):
        _force_trust(model, monkeypatch, dead)
    x = _inputs(plain)
    assert _run(plain, x, [10, 1, 1, 1])["sensor_weights"][0, 2] < 1e-3
    trust = torch.sigmoid(torch.tensor(dead[:2])).double()
    for tau in (0.1, 1.0, 3.0, 10.0):
        w = _run(floored, x, [tau, 1, 1, 1])["sensor_weights"][0].double()
        expected = torch.cat([trust, torch.tensor([0.01], dtype=torch.float64)]) ** (1 / tau)
        torch.testing.assert_close(w, expected / expected.sum(), atol=1e-6, rtol=0)
    assert _run(floored, x, [0.1, 1, 1, 1])["sensor_weights"][0, 2] < 1e-10
    assert _run(floored, x, [10, 1, 1, 1])["sensor_weights"][0, 2] > 0.2
    x["imu_mask"][:] = False  # absent stays exactly zero, floor or not
    assert _run(floored, x, [10, 1, 1, 1])["sensor_weights"][0, 2] == 0.0


def test_a_setting_added_later_keeps_the_identity_of_older_models():
    """trust_floor at its default is not in the config JSON, so the weights digest of every model saved
    before the setting existed (the policy contract's key) stays; set, it is saved and read back."""
    from fusion_attn.pipeline import weights_digest

    assert "trust_floor" not in FusionConfig().to_json()
    floored = FusionConfig(model=ModelConfig(trust_floor=0.01))
    assert FusionConfig.from_json(floored.to_json()) == floored
    assert weights_digest(_model()) != weights_digest(_model(trust_floor=0.01))


def test_token_weights_split_each_sensors_share_over_its_tokens(monkeypatch):
    model = _model()
    _force_trust(model, monkeypatch, LOGITS)
    x = _inputs(model, batch=2, seed=3)
    x["camera_mask"][1] = False
    out = _run(model, x, [0.5, 1, 2, 1])
    tw = out["token_weights"]  # (B, H, M, N)
    for m, span in enumerate(model.spans):
        share = tw[..., span].sum(-1)  # every head and fusion token gives sensor m its weight, no more
        torch.testing.assert_close(share, out["sensor_weights"][:, m, None, None].expand_as(share), atol=1e-6, rtol=0)
    mask = torch.cat([x["camera_mask"], x["lidar_mask"].any(-1), x["imu_mask"]], 1)
    assert torch.all(tw.permute(0, 3, 1, 2)[~mask] == 0)  # masked tokens get exactly nothing


def test_tau_steers_the_fused_state_and_not_the_trust():
    model = _model()
    x = _inputs(model, seed=2)
    a, b = _run(model, x, [0.05, 1, 1, 1]), _run(model, x, [20, 1, 1, 1])
    assert torch.equal(a["trust"], b["trust"])
    assert (a["sensor_weights"] - b["sensor_weights"]).abs().max() > 1e-2
    assert (a["fused"] - b["fused"]).abs().max() > 1e-3
    # the sharper τ is the less even one: its weights' entropy is lower
    entropy = [float(-(o["sensor_weights"] * o["sensor_weights"].clamp_min(1e-12).log()).sum()) for o in (a, b)]
    assert entropy[0] < entropy[1] <= math.log(3) + 1e-6


def test_token_fusion_reports_trust_but_does_not_use_it(monkeypatch):
    model = _model("token")
    x = _inputs(model)
    before = _run(model, x, [0.5, 1, 1, 1])
    _force_trust(model, monkeypatch, [-8.0, 8.0, 0.0])
    after = _run(model, x, [0.5, 1, 1, 1])
    torch.testing.assert_close(after["trust"][0], torch.sigmoid(torch.tensor([-8.0, 8.0, 0.0])))
    assert torch.equal(before["fused"], after["fused"]) and torch.equal(before["attention"], after["attention"])
    # its attention is the token softmax's mass per sensor: per head, not one weight repeated
    att = after["attention"][0]
    assert not torch.allclose(att, att[:, :1].expand_as(att))
    torch.testing.assert_close(after["sensor_weights"], after["attention"].mean(-1))


def test_sensor_fusion_follows_the_forced_trust(monkeypatch):
    # the same inputs, the trust ranking reversed: the fusion's weights follow it (the token fusion's do not)
    model = _model()
    x = _inputs(model)
    _force_trust(model, monkeypatch, [3.0, 0.0, -3.0])
    a = _run(model, x, [0.2, 1, 1, 1])
    _force_trust(model, monkeypatch, [-3.0, 0.0, 3.0])
    b = _run(model, x, [0.2, 1, 1, 1])
    assert a["sensor_weights"][0].argmax() == 0 and b["sensor_weights"][0].argmax() == 2
    assert (a["fused"] - b["fused"]).abs().max() > 1e-3


# --- the trust output ----------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["sensor", "token"])
def test_trust_is_zero_for_an_absent_sensor_and_strictly_inside_0_1_otherwise(fusion):
    model = _model(fusion)
    x = _inputs(model, batch=8, seed=5)
    for m, key in enumerate(MASKS):  # sample m lacks sensor m; sample 3 lacks all; sample 4 lacks camera and imu
        x[key][m] = False
        x[key][3] = False
    x["camera_mask"][4] = False
    x["imu_mask"][4] = False
    x["lidar_mask"][5, :, 1:] = False  # one point per pillar is plenty to be present
    out = _run(model, x, [1, 1, 1, 1])
    present = torch.ones(8, 3, dtype=torch.bool)
    for m in range(3):
        present[m, m] = False
    present[3] = False
    present[4, [0, 2]] = False
    assert torch.all(out["trust"][~present] == 0.0)
    assert torch.all(out["trust_logits"][~present] == float("-inf"))
    assert torch.all((out["trust"][present] > 0) & (out["trust"][present] < 1))
    torch.testing.assert_close(out["trust"][present], torch.sigmoid(out["trust_logits"][present]))
    # sample 4 has one sensor: all its weight, whatever its trust
    assert out["sensor_weights"][4].tolist() == [0.0, 1.0, 0.0]


def test_trust_sees_other_sensors_but_not_masked_content():
    # an absent sensor's (masked) data must not move the others' trust: it is not there
    model = _model()
    x, y = _inputs(model, seed=1), _inputs(model, seed=1)
    x["camera_mask"][:] = False
    y["camera_mask"][:] = False
    y["camera_patches"] = torch.randn_like(y["camera_patches"])
    y["camera_prev_patches"] = torch.randn_like(y["camera_prev_patches"])
    a, b = _run(model, x, [1, 1, 1, 1]), _run(model, y, [1, 1, 1, 1])
    torch.testing.assert_close(a["trust"], b["trust"], atol=1e-6, rtol=0)
    # while a present sensor's content does move the trust (the estimate looks at the data)
    z = _inputs(model, seed=1)
    z["imu_chunks"] = z["imu_chunks"] * 0
    c = _run(model, _inputs(model, seed=1), [1, 1, 1, 1])
    d = _run(model, z, [1, 1, 1, 1])
    assert (c["trust"][0, 2] - d["trust"][0, 2]).abs() > 1e-4


# --- the trust objective ------------------------------------------------------------------------


def _plan(sensor, fault):
    n = len(sensor)
    return FaultPlan(sensor=torch.tensor(sensor), fault=torch.tensor([FAULTS.index(f) for f in fault]),
                     lag=torch.zeros(n, dtype=torch.long), strength=torch.ones(n), where=torch.zeros(n))


def test_content_faulted_marks_only_the_sensor_whose_content_is_wrong():
    plan = _plan([0, 1, 2, 0, 1, 2, -1, 2], ["zero", "noise", "freeze", "partial", "drop", "delay", "noise", "partial"])
    expected = torch.zeros(8, 3, dtype=torch.bool)
    for row, sensor in ((0, 0), (1, 1), (2, 2), (3, 0), (7, 2)):
        expected[row, sensor] = True
    assert torch.equal(plan.content_faulted(), expected)  # drop: absent, delay: late, -1: no fault
    assert set(CONTENT_FAULTS) == {"zero", "noise", "freeze", "partial"} and set(CONTENT_FAULTS) < set(FAULTS)
    for fault in FAULTS:
        marked = FaultPlan.fixed(4, 1, fault).content_faulted()
        assert marked[:, 1].all() == (fault in CONTENT_FAULTS) and not marked[:, [0, 2]].any()
    drawn = FaultPlan.draw(512, 0.6, torch.Generator().manual_seed(0))
    assert not drawn.content_faulted()[drawn.sensor < 0].any()
    assert drawn.content_faulted().sum(1).max() == 1
    assert ((drawn.strength >= 0.25) & (drawn.strength <= 1.0)).all()  # noise never negligibly weak
    assert ((drawn.where >= 0) & (drawn.where < 1)).all()
    assert set(drawn.fault.unique().tolist()) == set(range(len(FAULTS)))  # partial is drawn too


def test_trust_loss_is_near_zero_for_perfect_logits_and_large_for_reversed_ones():
    plan = _plan([0, 1, 2, -1], ["noise", "freeze", "partial", "zero"])
    healthy = ~plan.content_faulted()
    perfect = torch.where(healthy, 20.0, -20.0)
    assert float(trust_loss(perfect, plan)) < 1e-6
    assert float(trust_loss(-perfect, plan)) > 15.0
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    reference = F.binary_cross_entropy_with_logits(logits, healthy.float())
    torch.testing.assert_close(trust_loss(logits, plan), reference)


def test_trust_loss_ignores_absent_sensors_without_nan():
    plan = _plan([0, 1, -1], ["noise", "drop", "zero"])
    logits = torch.tensor([[-3.0, 1.0, 2.0], [0.5, float("-inf"), 1.5], [float("-inf")] * 3], requires_grad=True)
    loss = trust_loss(logits, plan)
    present = logits.isfinite()
    target = (~plan.content_faulted()).float()
    expected = F.binary_cross_entropy_with_logits(logits.detach()[present], target[present])
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[~present] == 0)
    none = torch.full((2, 3), float("-inf"), requires_grad=True)
    nothing = trust_loss(none, _plan([-1, -1], ["drop", "drop"]))
    assert float(nothing.detach()) == 0.0
    nothing.backward()
    assert torch.isfinite(none.grad).all()


def test_trust_loss_through_the_model_has_finite_gradients():
    model = _model().train()
    x = _inputs(model, batch=3)
    x["lidar_mask"][0] = False
    for key in MASKS:
        x[key][2] = False  # nothing present at all
    out = model.run(x, torch.ones(3, 4))
    loss = trust_loss(out["trust_logits"], _plan([1, 0, 2], ["drop", "noise", "freeze"]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


def test_the_stale_path_takes_a_frozen_camera_out_of_the_trust_whatever_else_it_sees():
    """stale_evidence: a second trust path for the camera sees only its change statistic. It starts
    silent; with the weights training gives it (no change -> stale), a camera that repeats its frame
    loses its trust however the other path rates it, changing content keeps that path's trust bit for
    bit (a veto, not a cap), and a
    lidar that repeats its sweep (a healthy radar may) keeps it too. Its loss asks "frozen or black"
    only, where there is a previous frame to compare with."""
    model = _model(stale_evidence=True)
    x = _inputs(model, batch=2)
    x["camera_prev_mask"] = x["camera_mask"].clone()
    x["camera_prev_patches"][1] = x["camera_patches"][1]  # the second sample's camera repeats its frame
    x["lidar_prev_mask"] = x["lidar_mask"].clone()
    x["lidar_prev_points"] = x["lidar_points"].clone()  # both samples' lidar repeats its sweep
    silent = _run(model, x, [1, 1, 1, 1])
    assert silent["stale_logits"].shape == (2,) and silent["stale_valid"].all()
    other_path = silent["trust_logits"]
    assert (-silent["stale_logits"] > other_path[:, 0]).all()  # it starts silent: the other path decides
    with torch.no_grad():
        model.trust.stale.copy_(torch.tensor([-2.0, -18.0]))  # stale below a change of e^-9
    learned = _run(model, x, [1, 1, 1, 1])
    stale = learned["stale_logits"]
    assert stale[1] > 0 > stale[0]  # the repeated frame judged stale, the changing one not
    assert learned["trust_logits"][1, 0] == torch.minimum(other_path[1, 0], -stale[1])
    assert learned["trust"][1, 0] < 1e-3 and torch.equal(learned["trust"][0], silent["trust"][0])  # the changing one: the other path's
    torch.testing.assert_close(learned["trust"][:, 1:], silent["trust"][:, 1:])  # the repeating lidar, the IMU
    with torch.no_grad():
        model.trust.stale.copy_(torch.tensor([0.0, -0.05]))  # unsure of every frame (p = 0.49): no veto
    unsure = _run(model, x, [1, 1, 1, 1])
    assert (other_path[:, 0] > 0.05).all() and torch.equal(unsure["trust"], silent["trust"])  # a cap would bind here
    plan = _plan([0, 0], ["noise", "freeze"])
    perfect, valid = torch.tensor([-20.0, 20.0]), torch.tensor([True, True])
    assert float(stale_loss(perfect, valid, plan)) < 1e-6
    assert float(stale_loss(-perfect, valid, plan)) > 15.0
    assert float(stale_loss(perfect, valid, _plan([0, 0], ["noise", "zero"]))) < 1e-6  # a black camera is stale too
    assert float(stale_loss(-perfect.abs(), valid, _plan([1, 2], ["freeze", "zero"]))) < 1e-6  # not the camera's
    assert float(stale_loss(perfect, torch.tensor([True, False]), _plan([0, 0], ["noise", "noise"]))) < 1e-6  # no previous frame


# --- AUROC ---------------------------------------------------------------------------------------


def _brute_force_auroc(healthy, faulted):
    healthy = [h for h in healthy if np.isfinite(h)]
    wins = sum(1.0 if h > f else 0.5 if h == f else 0.0 for h in healthy for f in faulted)
    return wins / (len(healthy) * len(faulted))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_is_the_pairwise_probability_with_ties_counting_half(seed):
    rng = np.random.default_rng(seed)
    n_h, n_f = rng.integers(1, 40, 2)
    levels = rng.integers(2, 8)  # few distinct values: many ties, within and across the groups
    healthy = rng.integers(0, levels, n_h).astype(np.float32) / levels
    shift = (0.0, 0.0, 0.1, 0.25)[seed % 4]  # the faulted lower, or not at all
    faulted = rng.integers(0, levels, n_f).astype(np.float32) / levels - np.float32(shift)
    healthy[rng.random(n_h) < 0.2] = np.nan  # absent in some clean samples
    if np.isnan(healthy).all():
        healthy[0] = 0.5
    got = auroc(torch.from_numpy(healthy), torch.from_numpy(faulted))
    assert got == pytest.approx(_brute_force_auroc(healthy, faulted), abs=1e-12)


def test_auroc_extremes_and_empty_groups():
    assert auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.0, 0.2])) == 1.0
    assert auroc(torch.tensor([0.1]), torch.tensor([0.9, 0.8])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.5])) == 0.5
    assert math.isnan(auroc(torch.tensor([float("nan")]), torch.tensor([0.1])))
    assert math.isnan(auroc(torch.tensor([0.3]), torch.tensor([])))


# --- previous frames in the dataset --------------------------------------------------------------


def test_previous_frames_of_a_sensor_as_fast_as_the_sampling():
    frame_s = np.array([0.0, 0.1, 0.2, 0.3])
    assert previous_frames(frame_s, np.ones(4, bool), 0.15).tolist() == [-1, 0, 1, 2]


def test_previous_frames_of_a_slower_sensor_are_shared():
    # a 5 Hz sensor sampled at 10 Hz: two samples hold each frame, both point at the frame before it
    frame_s = np.array([0.0, 0.0, 0.2, 0.2, 0.4, 0.4])
    assert previous_frames(frame_s, np.ones(6, bool), 0.3).tolist() == [-1, -1, 0, 0, 2, 2]


def test_previous_frames_across_a_gap_and_absent_samples():
    frame_s = np.array([0.0, 0.1, 0.0, 0.3, 0.4, 0.0, 0.6, 0.7])
    present = np.array([True, True, False, True, True, False, True, True])
    # 0.1 -> 0.3 and 0.4 -> 0.6 are 0.2 s: too far apart at 0.15 s (the sync would not pair them either),
    # consecutive at 0.25 s; an absent sample has none, and the frame before it still counts after it
    assert previous_frames(frame_s, present, 0.15).tolist() == [-1, 0, -1, -1, 3, -1, -1, 6]
    assert previous_frames(frame_s, present, 0.25).tolist() == [-1, 0, -1, 1, 3, -1, 4, 6]
    assert previous_frames(frame_s, np.zeros(8, bool), 1.0).tolist() == [-1] * 8
    # float noise in stamps recovered from ages does not split one frame into two
    noisy = np.array([1.0, 1.0 + 3e-7, 1.1, 1.1 - 2e-7])
    assert previous_frames(noisy, np.ones(4, bool), 0.2).tolist() == [-1, -1, 0, 0]

