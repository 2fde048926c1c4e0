"""Where the fusion looks (fusion_attn/attention_maps.py): the picture, and the occlusion test that checks
it: masking the most-attended tokens of a sensor moves the fused state more than masking as many random
tokens of the same sensor. Run with -s to see the numbers (docs/ATTENTION_MAPS.md quotes them)."""

import numpy as np
import pytest
import torch

from fusion_attn.attention_maps import (
    Attention,
    BevView,
    attend,
    occlusion,
    picture,
    picture_size,
    pillar_centres,
    token_shares,
    valid_tokens,
)
from fusion_attn.checkpoint import load_checkpoint
from fusion_attn.config import FusionConfig
from fusion_attn.frames import NS_PER_S, LidarFrame
from fusion_attn.pipeline import DEFAULT_CHECKPOINT
from fusion_attn.replay import ReplayOptions, recorded_inputs
from fusion_attn.tokenize import Tokenizer, normalise_pixels, tokenize_lidar

CFG = FusionConfig()
H, M = CFG.model.heads, CFG.model.fusion_tokens
N_C, N_L = CFG.camera.tokens, CFG.lidar.tokens
N = N_C + N_L + CFG.imu.tokens
DRAWS = 32  # random token sets per instant


@pytest.fixture(scope="module")
def model():
    assert DEFAULT_CHECKPOINT.is_file(), "the packaged trained model is missing"
    torch.set_num_threads(1)
    return load_checkpoint(DEFAULT_CHECKPOINT)


def _lidar_cells() -> tuple[LidarFrame, list[tuple[float, float]]]:
    """Points in five grid cells around the sensor, a few per cell."""
    cell = 2 * CFG.lidar.range_m / CFG.lidar.grid
    centres = [(4 * cell, 0.0), (-3 * cell, 2 * cell), (0.0, -5 * cell), (6 * cell, 6 * cell), (-2 * cell, -2 * cell)]
    centres = [((i + 0.5) * cell, (j + 0.5) * cell) for i, j in (np.array(centres) / cell).round().astype(int)]
    offsets = np.array([[-0.3, -0.2], [0.1, 0.3], [0.3, -0.1]]) * cell
    pts = [(x + dx, y + dy, 0.5, 100.0) for x, y in centres for dx, dy in offsets]
    return LidarFrame(0, "lidar", np.array(pts, np.float32)), centres


def _synthetic(peak_patch: int, peak_pillar: int) -> tuple[dict[str, np.ndarray], Attention]:
    """A uniformly grey camera and five pillars; attention uniform but for one patch and one pillar."""
    x = Tokenizer(CFG).empty()
    x["camera_patches"][:] = np.tile(normalise_pixels(np.full(3, 0.5, np.float32)), CFG.camera.features // 3)
    x["camera_mask"][:] = True
    x["lidar_points"], x["lidar_mask"] = tokenize_lidar(_lidar_cells()[0], CFG.lidar)
    w = np.zeros((H, M, N), np.float32)
    w[..., :N_C] = 0.5 / N_C
    w[..., peak_patch] += 0.2
    pillars = valid_tokens(x, "lidar")
    w[..., N_C + pillars] = 0.3 / len(pillars)
    w[..., N_C + peak_pillar] += 0.2
    return x, Attention(w, np.array([0.5, 0.5, 0.0], np.float32), np.array([0.9, 0.8, 0.0], np.float32),
                        np.zeros(CFG.model.dim, np.float32))


def _luminance(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def test_token_shares_are_each_sensors_attention_averaged_over_heads_and_fusion_tokens():
    _, att = _synthetic(peak_patch=9, peak_pillar=2)
    camera, lidar = token_shares(att.token_weights, CFG, "camera"), token_shares(att.token_weights, CFG, "lidar")
    assert camera.shape == (N_C,) and lidar.shape == (N_L,)
    assert camera.sum() == pytest.approx(1.0) and lidar.sum() == pytest.approx(1.0)
    assert camera.argmax() == 9 and lidar.argmax() == 2
    assert camera[9] == pytest.approx((0.5 / N_C + 0.2) / 0.7)
    assert not token_shares(np.zeros((H, M, N)), CFG, "lidar").any()  # an absent sensor: no share at all


def test_pillar_centres_are_the_tokenizers_grid_cells():
    frame, cells = _lidar_cells()
    points, mask = tokenize_lidar(frame, CFG.lidar)
    centres = pillar_centres(points, mask, CFG.lidar)
    found = centres[valid_tokens({"lidar_mask": mask}, "lidar")]
    np.testing.assert_allclose(sorted(map(tuple, found)), sorted(cells), atol=1e-4)
    assert np.isnan(centres[len(cells):]).all()  # the pillars left empty


@pytest.mark.parametrize("peak_patch,peak_pillar", [(9, 2), (44, 0), (0, 4)])
def test_the_picture_is_brightest_at_the_most_attended_patch_and_pillar(peak_patch, peak_pillar):
    x, att = _synthetic(peak_patch, peak_pillar)
    img = picture(x, att, CFG, caption="synthetic")
    width, height = picture_size(CFG)
    assert img.shape == (height, width, 3) == (464, 896, 3) and img.dtype == np.uint8
    # camera: the median brightness of each patch (a label covers part of the top row)
    s = 4 * CFG.camera.patch
    rows, cols = CFG.camera.height // CFG.camera.patch, CFG.camera.width // CFG.camera.patch
    cam = _luminance(img[: rows * s, : cols * s]).reshape(rows, s, cols, s)
    assert np.median(cam, axis=(1, 3)).ravel().argmax() == peak_patch
    # lidar: the median brightness of each pillar's cell in the bird's-eye view
    bev = _luminance(img[: 384, cols * s:])
    centres = pillar_centres(x["lidar_points"], x["lidar_mask"], CFG.lidar)
    pillars = valid_tokens(x, "lidar")
    view = BevView.around(centres, CFG.lidar)
    brightness = []
    for i in pillars:
        c, r = np.rint(view.pixel(centres[i])).astype(int)
        brightness.append(np.median(bev[r - 3:r + 4, c - 3:c + 4]))
    assert pillars[int(np.argmax(brightness))] == peak_pillar


def test_a_missing_sensor_gets_an_empty_panel_and_a_raw_image_of_any_size_is_shown():
    x, att = _synthetic(5, 1)
    x["lidar_mask"][:] = False
    raw = np.zeros((480, 752, 3), np.uint8)
    raw[:, 376:] = 255  # right half white: the raw image, not the grey patches, is under the overlay
    img = picture(x, att, CFG, image=raw)
    assert img.shape == (464, 896, 3)
    cam = _luminance(img[100:384, :512])
    assert cam[:, 300:].mean() > cam[:, :200].mean() + 60
    assert _luminance(img[100:384, 512:]).std() < 1.0  # nothing drawn where the lidar would be


# --- the occlusion test on the packaged trained model ----------------------------------------------------------


@pytest.fixture(scope="module")
def sim_instants() -> list[dict[str, np.ndarray]]:
    """Model inputs at 1 Hz over two held-out simulated episodes (camera, lidar and IMU all present)."""
    from fusion_attn.clock import FusionClock
    from fusion_attn.learn.data import SPLIT_SEEDS, random_drive
    from fusion_attn.sim.faults import FaultConfig
    from fusion_attn.sim.robot import RobotEnv
    from fusion_attn.sync import SensorSync, SyncConfig

    instants = []
    for task, seed in (("navigate", SPLIT_SEEDS["test"]), ("control", SPLIT_SEEDS["test"] + 1)):
        env = RobotEnv(task, faults=FaultConfig())
        tokenizer = Tokenizer(CFG)
        clock = FusionClock(SensorSync(SyncConfig.for_model(CFG)), 1.0, start_ns=NS_PER_S)
        try:
            for info in random_drive(env, np.random.default_rng(seed), seed, 8.0):
                for snap in clock.step(info["frames"], info["time_ns"]):
                    instants.append(tokenizer(snap, np.ones(4, np.float32)))
        finally:
            env.close()
    return instants


def _occlusion_table(model, instants, sensor: str, k: int, label: str) -> np.ndarray:
    """-> (instants, 2): the fused state's change with the top-k tokens masked, and the mean over DRAWS random
    sets of k; printed with the summary the docs quote."""
    rng = np.random.default_rng(0)
    rows = np.array([occlusion(model, x, sensor, k, DRAWS, rng) for x in instants])
    rows = rows[~np.isnan(rows[:, 0])]
    top, rand = rows.mean(axis=0)
    print(f"\n{label} {sensor} k={k}: {len(rows)} instants, fused-state change (L2) top-{k} {top:.3f}, "
          f"random {rand:.3f}, ratio {top / rand:.2f}; top > random at {np.mean(rows[:, 0] > rows[:, 1]):.0%} "
          f"of the instants")
    return rows


@pytest.mark.parametrize("k", [1, 3, 5, 8])
@pytest.mark.parametrize("sensor", ["camera", "lidar"])
def test_masking_the_most_attended_tokens_changes_the_fused_state_more_than_random_ones(model, sim_instants,
                                                                                         sensor, k):
    rows = _occlusion_table(model, sim_instants, sensor, k, "simulated")
    assert len(rows) >= 12  # every instant has the sensor, with 2k tokens or more
    assert rows[:, 0].mean() > rows[:, 1].mean()


@pytest.mark.parametrize("k", [1, 3, 5, 8])
@pytest.mark.parametrize("sensor", ["camera", "lidar"])
def test_the_occlusion_test_holds_on_real_recordings(model, real_data, sensor, k):
    """The real camera + lidar frame, and (camera) the EuRoC camera at 0.4 s steps while it is fresh."""
    opts = ReplayOptions(progress=False)
    instants = [next(recorded_inputs([real_data / "lidar_camera_frame"], CFG, opts))[1]]
    if sensor == "camera":
        euroc = [x for _, x in recorded_inputs([real_data / "euroc_v1_01_cam_imu"], CFG, opts)]
        instants += [x for x in euroc[::8] if x["camera_mask"].any()]
    rows = _occlusion_table(model, instants, sensor, k, "real")
    assert len(rows) == len(instants)
    assert rows[:, 0].mean() > rows[:, 1].mean()


def test_attend_gives_the_token_weights_of_the_fusion_the_backends_run(model, sim_instants):
    """The picture's weights are the fusion's: sensor weights as the model's `attention` output, and each
    sensor's token weights sum to its weight in every head and fusion token."""
    x = sim_instants[0]
    att = attend(model, x)
    assert att.token_weights.shape == (H, M, N)
    with torch.no_grad():
        out = model.run({k: torch.from_numpy(v[None]) for k, v in x.items() if k != "tau"},
                        torch.from_numpy(x["tau"][None]))
    np.testing.assert_allclose(att.sensor_weights, out["attention"][0, :, 0].numpy(), rtol=1e-6)
    per_sensor = np.stack([att.token_weights[..., :N_C].sum(-1), att.token_weights[..., N_C:N_C + N_L].sum(-1),
                           att.token_weights[..., N_C + N_L:].sum(-1)], axis=-1)  # (H, M, 3)
    np.testing.assert_allclose(per_sensor, np.broadcast_to(att.sensor_weights, per_sensor.shape), atol=1e-5)
