"""Properties of the temperature-controlled cross-attention and of the whole fusion model."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sweeps import room_sweep, scan_inputs

from fusion_attn.backends.export import example_inputs
from fusion_attn.config import CameraTokens, FusionConfig, ModelConfig
from fusion_attn.errors import ConfigError
from fusion_attn.frames import LidarFrame, Modality
from fusion_attn.model import CrossAttention, FusionModel, PatchStem, masked_softmax, softmax_lipschitz


def _model(**model_kw) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(FusionConfig(model=ModelConfig(**model_kw))).eval()


def _inputs(model, batch=1, seed=0, **overrides):
    x = {k: torch.from_numpy(v) for k, v in example_inputs(model, batch, seed).items()}
    x.update(overrides)
    return x


def _cross_weights(tau_value: float, mask=None, seed=0):
    torch.manual_seed(seed)
    cross = CrossAttention(ModelConfig()).eval()
    queries, tokens = torch.randn(1, 8, 64), torch.randn(1, 40, 64)
    mask = torch.ones(1, 40, dtype=torch.bool) if mask is None else mask
    with torch.no_grad():
        return cross(queries, tokens, mask, torch.full((1, 40), tau_value))[1]  # (1, H, M, N)


def test_small_tau_is_pointer_like():
    w = _cross_weights(1e-3)
    assert torch.all(w.amax(dim=-1) > 0.999)  # every query/head puts all its mass on its best token
    assert torch.equal(w.argmax(-1), _cross_weights(1.0).argmax(-1))  # the same tokens, just sharper


def test_large_tau_tends_to_uniform_over_valid_tokens():
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, ::3] = True
    w = _cross_weights(1e4, mask)
    valid = mask[0]
    assert torch.allclose(w[..., valid], torch.full_like(w[..., valid], 1 / valid.sum()), atol=1e-4)
    assert torch.all(w[..., ~valid] == 0)


def test_entropy_grows_with_tau():
    entropies = []
    for tau in (0.05, 0.3, 1.0, 3.0, 30.0):
        w = _cross_weights(tau)
        entropies.append(float(-(w * torch.log(w.clamp_min(1e-12))).sum(-1).mean()))
    assert entropies == sorted(entropies)
    assert entropies[-1] <= math.log(40) + 1e-6


def test_masked_tokens_get_exactly_zero_weight_and_rows_sum_to_one():
    mask = torch.rand(1, 40, generator=torch.Generator().manual_seed(1)) > 0.5
    w = _cross_weights(0.7, mask)
    assert torch.all(w[..., ~mask[0]] == 0.0)
    assert torch.allclose(w.sum(-1), torch.ones(()))


def test_masked_softmax_all_masked_row_is_zero_not_nan():
    w = masked_softmax(torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(w, torch.zeros(2, 5))


FUSIONS = ["sensor", "token"]
MASKS = {Modality.CAMERA: "camera_mask", Modality.LIDAR: "lidar_mask", Modality.IMU: "imu_mask",
         Modality.ODOMETRY: "odometry_mask", Modality.IMU2: "imu2_mask"}


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("modality", list(Modality))
def test_masked_modality_gets_zero_attention_and_zero_trust(modality, fusion):
    # odometry, a second IMU: a model of four sensors (camera, lidar, IMU and it: the second IMU is the fourth)
    model = _model(fusion=fusion, odometry=modality is Modality.ODOMETRY, second_imu=modality is Modality.IMU2)
    S, i = len(model.cfg.sensors), model.cfg.sensors.index(modality)
    x = _inputs(model)
    x[MASKS[modality]] = torch.zeros_like(x[MASKS[modality]])
    with torch.no_grad():
        fused, latents, attention, all_masked, trust = model(**x)
    assert torch.all(attention[0, i] == 0.0)
    assert torch.allclose(attention[0].sum(0), torch.ones(4), atol=1e-6)  # per head, over modalities
    assert not all_masked[0]
    assert torch.isfinite(fused).all() and torch.isfinite(latents).all()
    assert attention.shape == (1, S, 4)
    assert trust.shape == (1, S) and trust[0, i] == 0.0  # exactly: an absent sensor is not judged
    others = [j for j in range(S) if j != i]
    assert torch.all((trust[0, others] > 0) & (trust[0, others] < 1))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_all_sensors_masked_gives_defined_output_and_flag(fusion):
    model = _model(fusion=fusion)
    x = _inputs(model)
    masks = [MASKS[m] for m in model.cfg.sensors]
    for key in masks:
        x[key] = torch.zeros_like(x[key])
    with torch.no_grad():
        fused, _, attention, all_masked, trust = model(**x)
        fused_other, *_ = model(**{**_inputs(model, seed=5), **{k: x[k] for k in masks}})
    assert all_masked[0]
    assert torch.isfinite(fused).all() and torch.all(attention == 0) and torch.all(trust == 0)
    # with nothing valid the output no longer depends on the (masked) data
    assert torch.allclose(fused, fused_other, atol=1e-6)


def test_permuting_tokens_within_a_modality_leaves_output_unchanged():
    torch.manual_seed(0)
    cross = CrossAttention(ModelConfig()).eval()
    queries, tokens = torch.randn(2, 8, 64), torch.randn(2, 30, 64)
    mask = torch.rand(2, 30) > 0.3
    tau = torch.rand(2, 30) + 0.2
    perm = torch.cat([torch.randperm(10), 10 + torch.randperm(12), 22 + torch.randperm(8)])
    with torch.no_grad():
        out, w = cross(queries, tokens, mask, tau)
        out_p, w_p = cross(queries, tokens[:, perm], mask[:, perm], tau[:, perm])
    assert torch.allclose(out, out_p, atol=1e-5)
    assert torch.allclose(w[..., perm], w_p, atol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_permuting_lidar_pillars_leaves_model_output_unchanged(fusion):
    # pillar positions live in the point features, not in the token index, so order is irrelevant, in
    # the current sweep and in the previous one alike (each permuted its own way)
    model = _model(fusion=fusion)
    x = _inputs(model)
    x["lidar_age"][:] = 0.05  # one sweep, one age: as the tokenizer fills it
    x["lidar_prev_age"][:] = 0.15
    n = x["lidar_points"].shape[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    prev_perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    y = dict(x, lidar_points=x["lidar_points"][:, perm], lidar_mask=x["lidar_mask"][:, perm],
             lidar_prev_points=x["lidar_prev_points"][:, prev_perm], lidar_prev_mask=x["lidar_prev_mask"][:, prev_perm])
    with torch.no_grad():
        a, b = model(**x), model(**y)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[2], b[2], atol=1e-6)
    assert torch.allclose(a[4], b[4], atol=1e-6)  # trust too


@pytest.mark.parametrize("fusion", FUSIONS)
def test_per_modality_tau_moves_attention(fusion):
    model = _model(fusion=fusion)
    x = _inputs(model)
    with torch.no_grad():
        base = model(**x)[2][0].mean(-1)
        x["tau"] = torch.tensor([[1.0, 1.0, 1.0, 1e4]])  # IMU logits flattened to ~0
        hot = model(**x)[2][0].mean(-1)
    assert not torch.allclose(base, hot, atol=1e-3)
    assert torch.allclose(hot.sum(), torch.tensor(1.0), atol=1e-5)


VARIANTS = [{}, {"qk_norm": True}, {"learned_head_temperature": True},
            {"qk_norm": True, "learned_head_temperature": True, "latent_blocks": 2}, {"camera_shifts": 6}, {"camera_stem": 8},
            {"camera_stem": 4, "camera_stem_cells": 16}, {"camera_column_blocks": 2},
            {"lidar_motion": True}, {"lidar_motion": True, "lidar_motion_token": True},
            {"lidar_motion": True, "lidar_motion_direct": True}, {"imu_direct": True},
            {"odometry": True}, {"odometry": True, "rate_readout": True}]


# every variant in both fusions, but the rate readout, which needs the sensor fusion (config.FusionConfig)
@pytest.mark.parametrize(("options", "fusion"), [(o, f) for o in VARIANTS for f in FUSIONS
                                                 if not (o.get("rate_readout") and f == "token")])
def test_gradients_are_finite_for_every_variant(options, fusion):
    model = _model(fusion=fusion, **options).train()
    x = _inputs(model, batch=3)
    x["camera_mask"][1] = False  # a batch row with a dead camera
    for m in model.cfg.sensors:
        x[MASKS[m]][2] = False  # and one with no sensor at all
    tau = torch.tensor([[0.05, 1, 1, 1], [1, 0.5, 2, 1], [3, 1, 1, 1]], dtype=torch.float32)
    x["tau"] = torch.cat([tau, torch.ones(3, len(model.cfg.sensors) - 3)], 1)
    fused, latents, attention, _, trust = model(**x)
    (fused.square().sum() + latents.sum() + attention.sum() + trust.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.trust.logit.fc2.weight.grad.abs().sum() > 0  # the trust output trains its head
    if options.get("learned_head_temperature"):
        assert model.cross.log_head_tau.grad.abs().sum() > 0


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_fusion_sends_no_gradient_into_the_trust_estimate(fusion):
    # the trust is a detector trained on known faults; what the fusion does with it must not train it
    model = _model(fusion=fusion).train()
    x = _inputs(model, batch=2)
    fused, latents, _, _, trust = model(**x)
    (fused.square().sum() + latents.sum()).backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in model.trust.parameters())
    assert model.embed.camera.weight.grad.abs().sum() > 0  # while the rest of the model does learn
    trust.sum().backward()
    assert model.trust.logit.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cells", [4, 16])  # 4 x 4 cells of 4 pixels; one cell per pixel (a 1 x 1 convolution first)
def test_the_patch_stem_is_two_strided_convolutions_over_the_image(cells):
    # what the tokenizer flattens (rows, columns, RGB per patch) the stem reads as the image it came from
    cam = CameraTokens(height=32, width=48, patch=16)
    torch.manual_seed(0)
    stem = PatchStem(cam.patch, 5, 7, cells)
    image = torch.randn(2, cam.height, cam.width, 3)
    p = cam.patch
    patches = image.reshape(2, cam.height // p, p, cam.width // p, p, 3).transpose(2, 3).reshape(2, cam.tokens, -1)
    cell = p // cells
    conv1 = stem.cells.weight.reshape(5, cell, cell, 3).permute(0, 3, 1, 2)  # (C, RGB, rows, cols)
    conv2 = stem.out.weight.reshape(7, cells, cells, 5).permute(0, 3, 1, 2)
    hidden = torch.nn.functional.gelu(torch.nn.functional.conv2d(image.permute(0, 3, 1, 2), conv1, stem.cells.bias, stride=cell))
    expected = torch.nn.functional.conv2d(hidden, conv2, stem.out.bias, stride=cells).flatten(2).transpose(1, 2)  # (B, N, D)
    torch.testing.assert_close(stem(patches), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="camera_stem"):
        FusionConfig(camera=CameraTokens(patch=6, height=96, width=126), model=ModelConfig(camera_stem=4))
    with pytest.raises(ConfigError, match="camera_stem_cells"):
        FusionConfig(model=ModelConfig(camera_stem=4, camera_stem_cells=0))


def test_column_blocks_mix_each_column_of_camera_patches_alone():
    torch.manual_seed(0)
    cfg = FusionConfig(model=ModelConfig(camera_stem=8, camera_column_blocks=1))
    embed = FusionModel(cfg).embed
    rows, cols = cfg.camera.height // cfg.camera.patch, cfg.camera.width // cfg.camera.patch
    patches = torch.randn(2, rows * cols, cfg.camera.features)
    moved = patches.clone()
    moved[1, 2 * cols + 3] += 1.0  # row 2, column 3 of the second image
    a, b = (embed.camera_appearance(p) for p in (patches, moved))
    changed = ((a - b).abs().amax(-1) > 1e-6).view(2, rows, cols)
    assert not changed[0].any()
    assert changed[1, :, 3].all() and not changed[1, :, [c for c in range(cols) if c != 3]].any()
    plain = FusionModel(FusionConfig(model=ModelConfig(camera_stem=8))).embed
    changed = ((plain.camera_appearance(patches) - plain.camera_appearance(moved)).abs().amax(-1) > 1e-6).view(2, rows, cols)
    assert changed.sum() == 1 and changed[1, 2, 3]  # no blocks: each patch alone
    with pytest.raises(ConfigError, match="camera_column_blocks"):
        FusionConfig(model=ModelConfig(camera_column_blocks=-1))


def test_lipschitz_matches_autograd_jacobian():
    logits = torch.randn(6, dtype=torch.float64)
    for tau in (0.1, 1.0, 5.0):
        jac = torch.autograd.functional.jacobian(lambda z, tau=tau: torch.softmax(z / tau, -1), logits)
        expected = torch.linalg.matrix_norm(jac, ord=2)
        assert torch.allclose(softmax_lipschitz(logits, tau), expected, rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=12), st.floats(0.01, 100))
def test_lipschitz_bounds(values, tau):
    logits = torch.tensor(values, dtype=torch.float64)
    lip = float(softmax_lipschitz(logits, tau))
    assert 0.0 <= lip <= 1 / (2 * tau) + 1e-9  # the softmax Jacobian's spectral norm never exceeds 1/(2τ)


def test_lipschitz_uniform_and_batched_and_masked():
    n = 8
    assert float(softmax_lipschitz(torch.zeros(n), 2.0)) == pytest.approx(1 / (n * 2.0))
    batch = softmax_lipschitz(torch.randn(3, 4, 5), torch.tensor([0.5, 1.0, 2.0]).view(3, 1))
    assert batch.shape == (3, 4)
    mask = torch.tensor([True, True, False, False])
    assert float(softmax_lipschitz(torch.zeros(4), 1.0, mask)) == pytest.approx(0.5)  # uniform over 2


def test_lipschitz_grows_as_tau_shrinks():
    logits = torch.tensor([1.0, 0.9, -0.5, 0.2])
    lips = [float(softmax_lipschitz(logits, t)) for t in (10.0, 1.0, 0.3)]
    assert lips == sorted(lips)
    assert np.isfinite(lips).all()


@pytest.mark.parametrize("moved", [-4, -1, 0, 3, 6])
def test_column_shift_match_dips_where_the_image_moved(moved):
    import cv2

    from fusion_attn.frames import CameraFrame
    from fusion_attn.model import column_shift_match
    from fusion_attn.tokenize import tokenize_camera

    cam = FusionConfig().camera
    rng = np.random.default_rng(1)
    scene = cv2.GaussianBlur((rng.random((480, 1400, 3)) * 255).astype(np.uint8), (31, 31), 0)
    step = 640 // cam.width  # image pixels per token column

    def patches(left):
        frame = CameraFrame(stamp_ns=0, frame_id="cam", image=np.ascontiguousarray(scene[:, left:left + 640]),
                            encoding="rgb8")
        return torch.from_numpy(tokenize_camera(frame, cam)[0])[None]

    before, now = patches(200), patches(200 - moved * step)  # the view turned: the scene moved `moved` columns
    curve = column_shift_match(now, before, cam, 6)  # (1, N_c, 13)
    assert curve.shape == (1, cam.tokens, 13)
    assert int(curve.mean(1).argmin()) - 6 == moved
    assert (curve.argmin(-1) - 6 == moved).float().mean() > 0.8  # most patches see it on their own


@pytest.mark.parametrize("yaw,forward", [(0.0, 0.0), (0.04, 0.0), (0.0, 0.1), (-0.06, 0.08), (0.1, 0.15)])
def test_lidar_scan_match_measures_how_the_sensor_moved(yaw, forward):
    from fusion_attn.model import lidar_scan_match

    x, cfg = scan_inputs(room_sweep(yaw, forward), room_sweep(0.0, 0.0))
    yaw_rate, speed, sideways, share, log_rms, valid = lidar_scan_match(x, cfg.lidar)[0].tolist()
    assert valid == 1.0 and share > 0.5
    # the sensor moved by (forward, 0) in the previous sweep's frame, which is R(-yaw) of that in its own
    assert abs(yaw_rate - yaw / 0.1) < 0.05 and abs(speed - forward * math.cos(yaw) / 0.1) < 0.05
    assert abs(sideways + forward * math.sin(yaw) / 0.1) < 0.05
    assert log_rms < math.log(0.03)


def test_lidar_scan_match_of_a_frozen_sweep_is_still_and_exact_and_of_none_is_zero():
    from fusion_attn.model import lidar_scan_match

    sweep = room_sweep(0.02, 0.05)
    x, cfg = scan_inputs(sweep, sweep)
    yaw_rate, speed, sideways, share, log_rms, valid = lidar_scan_match(x, cfg.lidar)[0].tolist()
    assert valid == 1.0 and max(abs(yaw_rate), abs(speed), abs(sideways)) < 1e-3 and share > 0.8  # corners: no line
    assert log_rms < math.log(0.03)  # what is left is the pillars' line fits, not motion
    x["lidar_prev_mask"][:] = False  # no previous sweep: no evidence, all zero
    assert not lidar_scan_match(x, cfg.lidar).any()
    x, _ = scan_inputs(sweep, sweep, interval=0.0)  # the same stamp twice: no interval to measure a rate over
    assert not lidar_scan_match(x, cfg.lidar).any()


def test_the_lidar_motion_token_is_a_lidar_token_present_only_where_the_sweeps_match():
    with pytest.raises(ConfigError, match="lidar_motion_token needs model.lidar_motion"):
        FusionConfig(model=ModelConfig(lidar_motion_token=True))
    model = _model(lidar_motion=True, lidar_motion_token=True)
    cfg = model.cfg
    motion = cfg.camera.tokens + cfg.lidar.tokens  # its index: right after the pillars, inside the lidar's span
    assert model.spans[1] == slice(cfg.camera.tokens, motion + 1) and int(model.embed.modality_id[motion]) == Modality.LIDAR
    scan, _ = scan_inputs(room_sweep(0.04, 0.1), room_sweep(0.0, 0.0))
    x = _inputs(model, **scan)
    with torch.no_grad():
        moved = model.run(x, x.pop("tau"))["token_weights"]  # (B, H, M, N)
        assert moved.shape[-1] == cfg.camera.tokens + cfg.lidar.tokens + 1 + cfg.imu.tokens
        assert (moved[..., motion] > 0).all()
        x["lidar_prev_mask"] = torch.zeros_like(x["lidar_prev_mask"])  # no previous sweep: nothing matched
        assert (model.run(x, torch.ones(1, 4))["token_weights"][..., motion] == 0).all()


def _fused_with_and_without(model, path, present: dict, absent: dict) -> tuple[list, list]:
    """The fused state of inputs where a direct path has something to add and where it has not, with the
    path as initialised, then with its weight zeroed."""
    tau = present.pop("tau")
    absent.pop("tau")
    with torch.no_grad():
        direct = [model.run(x, tau)["fused"] for x in (present, absent)]
        path.weight.zero_()
        return direct, [model.run(x, tau)["fused"] for x in (present, absent)]


def test_the_direct_scan_match_enters_the_fused_state_only_where_the_sweeps_match():
    with pytest.raises(ConfigError, match="lidar_motion_direct needs model.lidar_motion"):
        FusionConfig(model=ModelConfig(lidar_motion_direct=True))
    model = _model(lidar_motion=True, lidar_motion_direct=True)
    scan, _ = scan_inputs(room_sweep(0.04, 0.1), room_sweep(0.0, 0.0))
    matched = _inputs(model, **scan)
    unmatched = dict(matched, lidar_prev_mask=torch.zeros_like(matched["lidar_prev_mask"]))
    direct, without = _fused_with_and_without(model, model.motion_direct, matched, unmatched)
    assert not torch.allclose(direct[0], without[0], atol=1e-4)  # the match moved the fused state
    assert torch.equal(direct[1], without[1])  # nothing matched: nothing added


def test_the_direct_imu_window_enters_the_fused_state_only_with_the_imu():
    model = _model(imu_direct=True)
    x = _inputs(model, batch=2)
    assert x["imu_mask"].any(1).all() and x["imu_chunks"].abs().sum() > 0
    absent = dict(x, imu_mask=torch.zeros_like(x["imu_mask"]))  # its window left as it was: only the mask says
    with torch.no_grad():  # a masked chunk adds nothing, whatever it holds
        tau = x["tau"]
        masked = dict(x, imu_mask=x["imu_mask"].clone())
        masked["imu_mask"][:, -1] = False
        junk = dict(masked, imu_chunks=masked["imu_chunks"].clone())
        junk["imu_chunks"][:, -1] = 1e3
        torch.testing.assert_close(model.run(junk, tau)["fused"], model.run(masked, tau)["fused"], rtol=0, atol=0)
    direct, without = _fused_with_and_without(model, model.imu_direct, x, absent)
    assert not torch.allclose(direct[0], without[0], atol=1e-4)  # the window moved the fused state
    assert torch.equal(direct[1], without[1])  # no IMU: nothing added


def test_the_3x3_solve_by_adjugate_matches_a_solver():
    from fusion_attn.model import _solve3

    gen = torch.Generator().manual_seed(0)
    m = torch.randn(16, 3, 3, generator=gen, dtype=torch.float64)
    a = m @ m.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    g = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(_solve3(a, g), torch.linalg.solve(a, g), rtol=1e-9, atol=1e-9)


def test_lidar_scan_match_stays_finite_where_the_motion_is_not_observable():
    from fusion_attn.model import _solve3, lidar_scan_match

    wall = np.c_[np.full(800, 4.0), np.linspace(-6, 6, 800)]  # one straight wall: sliding along it is invisible
    pts = np.concatenate([np.c_[wall, np.full(800, z), np.full(800, 50.0)] for z in (0.0, 0.5)]).astype(np.float32)
    sweep = LidarFrame(stamp_ns=0, frame_id="lidar", points=pts)
    x, cfg = scan_inputs(sweep, LidarFrame(stamp_ns=0, frame_id="lidar", points=pts + [0.0, 0.3, 0.0, 0.0]))
    assert torch.isfinite(lidar_scan_match(x, cfg.lidar)).all()
    assert not _solve3(torch.zeros(1, 3, 3), torch.ones(1, 3)).any()  # a singular system takes no step
