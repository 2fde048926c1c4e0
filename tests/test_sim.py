"""The MuJoCo simulator (fusion_attn/sim): Gymnasium API, determinism, sensor frames, rates, faults, fusion."""

import dataclasses
import itertools
import json
import math
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import fusion_attn.sim  # noqa: F401  (registers the ids)
from fusion_attn.frames import NS_PER_S, CameraFrame, ImuSample, LidarFrame, Modality, OdometrySample
from fusion_attn.sim.faults import FaultConfig, FaultSpec
from fusion_attn.sim.robot import DRIVE_ACCEL, FrameList, RobotEnv
from fusion_attn.sim.scene import CAMERA_POS, RIG_HEIGHT, ROBOT_Z, TASK_COLOURS, Geom, Layout
from fusion_attn.sim.sensors import SensorConfig
from fusion_attn.sim.tasks import ControlTask, NavigateTask, Task

IDS = [f"FusionAttn/{task}-{kind}v0" for task in ("Memory", "Navigate", "Control")
       for kind in ("", "Discrete-")]
EXACT = SensorConfig(lidar_noise_m=0.0, accel_noise=0.0, gyro_noise=0.0, accel_bias=0.0, gyro_bias=0.0)
G = 9.81  # MuJoCo's default gravity


class Fixed(Task):
    """An empty arena, by default 6 x 6 m (walls at +-3 m), with given objects and start pose."""

    obs_dim = 1
    episode_s = 10.0

    def __init__(self, start=(0.0, 0.0, 0.0), geoms=(), half=3.0):
        self.start, self.geoms, self.half = start, tuple(geoms), half

    def new_episode(self, rng):
        return Layout(self.half, self.start, self.geoms)

    def observe(self, pose, t_s):
        return np.zeros(1, np.float32)

    def evaluate(self, pose, t_s):
        return 0.0, False, {"is_success": False}


def run(env, seconds, action, seed=0, options=None):
    """-> per step (including reset) the list of delivered frames, the info and the observation."""
    obs, info = env.reset(seed=seed, options=options)
    steps = [(list(info["frames"]), info, obs)]
    for _ in range(round(seconds * 50)):
        obs, _, _, _, info = env.step(np.asarray(action, np.float32))
        steps.append((list(info["frames"]), info, obs))
    return steps


def frames_of(steps, kind):
    return [f for frames, _, _ in steps for f in frames if isinstance(f, kind)]


@pytest.mark.filterwarnings("ignore:.*(symmetric and normalized|infinity):UserWarning")  # physical units
@pytest.mark.parametrize("env_id", IDS)
def test_check_env(env_id):
    env = gym.make(env_id, sensors=SensorConfig(camera_size=(32, 32)))
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    assert [type(f) for f in info["frames"]] == [CameraFrame, LidarFrame, ImuSample, OdometrySample]
    env.close()


def test_same_seed_same_episode():
    faults = FaultConfig(camera_noise=FaultSpec(0.5, (0.0, 0.5), (0.2, 0.5), 20.0),
                         lidar_sparse=FaultSpec(0.5, (0.0, 0.5), (0.2, 0.5), 0.5))
    runs = []
    for _ in range(2):
        env = gym.make("FusionAttn/Navigate-v0", faults=faults)
        env.action_space.seed(3)
        obs, info = env.reset(seed=7)
        trace = [(obs, info["frames"])]
        for _ in range(60):
            obs, reward, _, _, info = env.step(env.action_space.sample())
            trace.append((obs, info["frames"], reward, info["faults"]))
        runs.append(trace)
        env.close()
    for a, b in zip(*runs):
        assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
        assert a[1] == b[1] and a[2:] == b[2:]
    other = gym.make("FusionAttn/Navigate-v0")
    obs, _ = other.reset(seed=8)
    assert not np.array_equal(obs["image"], runs[0][0][0]["image"])


def test_single_camera_frame_is_rgb8_forward():
    red = Geom("red", "box", (1.5, 0.0, 0.5), (0.1, 1.0, 0.5), TASK_COLOURS["red"])
    env = RobotEnv(Fixed(geoms=[red]), sensors=SensorConfig(camera_size=(48, 64), camera_views=1))
    _, info = env.reset(seed=0)
    cam = info["frames"][0]
    assert isinstance(cam, CameraFrame)
    assert (cam.frame_id, cam.encoding, cam.stamp_ns) == ("camera", "rgb8", 0)
    assert cam.image.shape == (48, 64, 3) and cam.image.dtype == np.uint8
    r, g, b = cam.image[24, 32].astype(int)  # the red box straight ahead fills the centre: RGB order
    assert r > 100 and r > 2 * g and r > 2 * b
    env.close()


def _columns(image, rgb):
    """The image columns where pixels of the colour rgb (a TASK_COLOURS entry) show."""
    channel = int(np.argmax(rgb))
    others = np.delete(image.astype(int), channel, axis=2).max(axis=2)
    return np.flatnonzero(((image[..., channel] > 100) & (others < 70)).any(axis=0))


def test_camera_rig_is_a_panorama_with_forward_in_the_middle():
    # Facing +x: red straight ahead, green on the left (+y), blue behind, each a 0.7 m wide box 1.5 m away.
    boxes = [Geom(name, "box", (1.5 * x, 1.5 * y, 0.3), (0.3 * abs(y) + 0.05, 0.3 * abs(x) + 0.05, 0.3),
                  TASK_COLOURS[name]) for name, x, y in (("red", 1, 0), ("green", 0, 1), ("blue", -1, 0))]
    env = RobotEnv(Fixed(geoms=boxes))
    assert env.observation_space["image"].shape == (64, 256, 3) and env.sensors.camera_hfov_deg == 360.0
    _, info = env.reset(seed=0)
    image = info["frames"][0].image
    assert image.shape == (64, 256, 3) and image.dtype == np.uint8
    # columns run from azimuth +180 (left edge) to -180 (right edge): forward is the seam between the two
    # middle views, +90 degrees the one a quarter in (each view is a pinhole image: a box on a seam spans
    # more columns than its angle would on a cylinder, but symmetrically)
    red, green, blue = (_columns(image, TASK_COLOURS[c]) for c in ("red", "green", "blue"))
    assert len(red) >= 12 and (red.min() + red.max()) / 2 == pytest.approx(127.5, abs=1)
    assert len(green) >= 12 and (green.min() + green.max()) / 2 == pytest.approx(63.5, abs=1)
    assert blue.min() == 0 and blue.max() == 255 and len(blue) < 40  # behind: at both edges
    env.close()
    six = SensorConfig(camera_views=6)  # views evenly spaced, centred on straight ahead, left to right
    assert six.camera_yaws_deg == pytest.approx((150, 90, 30, -30, -90, -150))
    assert six.camera_image_shape == (64, 384, 3) and six.camera_view_fovy_deg == pytest.approx(60.0)
    assert SensorConfig(camera_views=1).camera_hfov_deg == pytest.approx(75.0)
    with pytest.raises(ValueError, match="camera_views"):
        SensorConfig(camera_views=2)  # two views cannot cover 360 degrees


@pytest.mark.parametrize("views", [4, 1])
def test_image_x_is_where_a_post_at_that_bearing_renders(views):
    # green posts (the goal's colour) 3 m away at bearings off every seam and view centre; the rig's
    # pinhole views and the single forward camera alike
    bearings = (20.0, 70.0, -110.0, 160.0) if views > 1 else (12.0, -25.0)
    posts = [Geom(f"post{i}", "cylinder", (3 * math.cos(math.radians(b)), 3 * math.sin(math.radians(b)), 1.0),
                  (0.05, 1.0), TASK_COLOURS["green"]) for i, b in enumerate(bearings)]
    sensors = SensorConfig(camera_views=views)
    env = RobotEnv(Fixed(geoms=posts), sensors=sensors)
    _, info = env.reset(seed=0)
    image = info["frames"][0].image
    env.close()
    columns = _columns(image[: image.shape[0] // 2], TASK_COLOURS["green"])  # above the horizon: posts only
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    seen = sorted((r.min() + r.max() + 1) / 2 / image.shape[1] for r in runs)
    # seen from the camera: the rig stands at the robot's centre, the single camera at its front edge
    origin = 0.0 if views > 1 else CAMERA_POS[0]
    expected = sorted(sensors.image_x([math.atan2(y, x - origin) for (x, y, _) in (p.pos for p in posts)]))
    assert seen == pytest.approx(expected, abs=1.5 / image.shape[1])  # within a pixel and a half
    assert np.isnan(SensorConfig(camera_views=1).image_x(math.radians(60.0)))  # beyond the 75° view
    # image_y: each post's top edge (2 m up, its nearest rim 2.95 m away) is its first green row
    green = (image[..., 1] > 100) & (np.delete(image.astype(int), 1, axis=2).max(axis=2) < 70)
    height = 2.0 - ROBOT_Z - (RIG_HEIGHT if views > 1 else CAMERA_POS[2])
    for x, y, _ in (p.pos for p in posts):
        bearing, distance = math.atan2(y, x - origin), math.hypot(y, x - origin) - 0.05
        column = int(sensors.image_x(bearing) * image.shape[1])
        top = np.flatnonzero(green[:, column])[0]
        assert top == pytest.approx(sensors.image_y(bearing, distance, height) * image.shape[0], abs=1.0)
    assert np.isnan(SensorConfig(camera_views=1).image_y(math.radians(60.0), 3.0, 1.0))


def test_pixel_noise_makes_consecutive_static_frames_differ():
    images = {}
    for noise in (2.0, 0.0):
        env = RobotEnv(Fixed(), sensors=SensorConfig(camera_noise_levels=noise, camera_size=(32, 32)))
        images[noise] = [f.image.astype(int) for f in frames_of(run(env, 0.35, [0.0, 0.0]), CameraFrame)]
        env.close()
    noisy, clean = images[2.0], images[0.0]
    assert len(noisy) == len(clean) == 4
    assert all(np.array_equal(a, clean[0]) for a in clean)  # the scene is static: only the noise changes
    unclipped = (clean[0] > 10) & (clean[0] < 245)  # the black sky clips half the noise away
    assert unclipped.mean() > 0.3
    for a, b in itertools.pairwise(noisy):
        diff = (a - b)[unclipped]  # two draws of std 2: the difference has std 2.8
        assert (diff != 0).mean() > 0.5 and diff.std() == pytest.approx(2.0 * math.sqrt(2), rel=0.1)
    assert (noisy[0] - clean[0])[unclipped].std() == pytest.approx(2.0, rel=0.1)  # noise, not another picture


def _goal_post():
    return next(g for g in ControlTask().new_episode(np.random.default_rng(0)).geoms if g.retroreflective)


@pytest.mark.parametrize("task", [ControlTask, NavigateTask])
def test_goal_tasks_mark_the_goal_with_a_retroreflective_post(task):
    t = task()
    for seed in range(3):
        layout = t.new_episode(np.random.default_rng(seed))
        (post,) = [g for g in layout.geoms if g.retroreflective]
        assert post.pos[:2] == t.goal() and not post.collide and post.kind == "cylinder"
        # wide enough for the lidar's 2° beams to meet it within 8 m, taller than any obstacle (1 m)
        assert 8.0 * math.sin(math.radians(1.0)) <= post.size[0] <= 0.2 and 2 * post.size[1] > 1.0


def test_lidar_sees_the_goal_post_at_full_intensity_the_robot_drives_through_it():
    # A 10 x 10 m arena; the post's centre 7.8 m away, near the lidar's 8 m range where the 3° ring is
    # highest, at 1° to the left: midway between two beams, where it is hardest to hit.
    post = _goal_post()
    centre = (-4.0 + 7.8 * math.cos(math.radians(1.0)), 7.8 * math.sin(math.radians(1.0)))
    far = dataclasses.replace(post, pos=(*centre, post.pos[2]))
    env = RobotEnv(Fixed(start=(-4.0, 0.0, 0.0), geoms=[far], half=5.0), sensors=EXACT)
    _, info = env.reset(seed=0)
    lidar = info["frames"][1]
    bright = lidar.points[:, 3] == 255
    assert set(lidar.ring[bright]) == {0, 1}  # both rings hit it
    on_post = np.hypot(lidar.points[bright, 0] - 4.0 - centre[0], lidar.points[bright, 1] - centre[1])
    np.testing.assert_allclose(on_post, post.size[0], atol=1e-3)  # every bright point lies on its surface
    assert lidar.points[~bright, 3].max() <= 200  # diffuse surfaces stay below a retroreflector
    assert env.ground_truth()["obstacles"][0] == pytest.approx(8.0)  # the wall 9 m ahead is out of range
    env.close()

    # Driving at 1 m/s through a post 2 m ahead: no contact, no deflection, and free distance ignores it.
    post = dataclasses.replace(post, pos=(1.0, 0.0, post.pos[2]))
    env = RobotEnv(Fixed(start=(-1.0, 0.0, 0.0), geoms=[post]), sensors=EXACT)
    env.reset(seed=0)
    assert env.ground_truth()["obstacles"][0] == pytest.approx(4.0, abs=0.01)  # the wall, not the post
    for _ in range(150):
        *_, info = env.step(np.array([1.0, 0.0], np.float32))
        assert env.data.ncon == 0
    assert info["pose"][0] > 1.5 and abs(info["pose"][1]) < 1e-6 and abs(info["pose"][2]) < 1e-6
    env.close()


def test_lidar_points_in_lidar_frame():
    # Facing +y from (1, 0.5): the wall ahead (y = 3) is 2.5 m away, the one on the left (x = -3) 4 m.
    env = RobotEnv(Fixed(start=(1.0, 0.5, math.pi / 2)), sensors=EXACT)
    _, info = env.reset(seed=0)
    lidar = info["frames"][1]
    assert isinstance(lidar, LidarFrame) and lidar.frame_id == "lidar"
    pts = lidar.points
    assert pts.dtype == np.float32 and pts.shape[1] == 4 and np.isfinite(pts).all()
    assert np.linalg.norm(pts[:, :3], axis=1).max() <= EXACT.lidar_max_range_m
    flat = lidar.ring == 0
    ahead = pts[flat][np.argmin(np.abs(np.arctan2(pts[flat, 1], pts[flat, 0])))]
    np.testing.assert_allclose(ahead[:3], [2.5, 0.0, 0.0], atol=1e-3)
    left = pts[flat][np.argmin(np.abs(np.arctan2(pts[flat, 1], pts[flat, 0]) - math.pi / 2))]
    np.testing.assert_allclose(left[:3], [0.0, 4.0, 0.0], atol=1e-3)
    assert 0 < ahead[3] <= 200  # intensity: the wall's luminance, scaled below a retroreflector's
    # The observation's range image agrees, and rays beyond the max range are dropped.
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs["lidar"][0, [0, 45]], [2.5, 4.0], atol=1e-3)  # beams 0 and 90 degrees
    short = RobotEnv(Fixed(start=(1.0, 0.5, math.pi / 2)), sensors=SensorConfig(lidar_max_range_m=3.0))
    _, info = short.reset(seed=0)
    assert np.linalg.norm(info["frames"][1].points[:, :3], axis=1).max() <= 3.0
    assert len(info["frames"][1]) < len(lidar)
    env.close()
    short.close()


def test_imu_units_and_frame():
    env = RobotEnv(Fixed(start=(0.0, 0.0, math.pi / 2)), sensors=EXACT)
    rest = frames_of(run(env, 0.2, [0.0, 0.0]), ImuSample)
    assert rest[0].frame_id == "imu"
    np.testing.assert_allclose(np.stack([s.accel for s in rest]) - [0, 0, G], 0.0, atol=1e-6)  # m/s^2
    np.testing.assert_allclose(np.stack([s.gyro for s in rest]), 0.0, atol=1e-9)
    q = rest[0].orientation  # x, y, z, w of a yaw of +90 degrees
    np.testing.assert_allclose(q, [0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)], atol=1e-9)

    # Driving forward while facing +y accelerates along the body's x (at the drive's limit), not the world's.
    drive = frames_of(run(env, 0.2, [1.0, 0.0]), ImuSample)
    np.testing.assert_allclose(drive[-1].accel, [DRIVE_ACCEL[0], 0, G], atol=0.1)

    turn = run(env, 1.0, [0.0, 1.0])
    gyro = np.stack([s.gyro for s in frames_of(turn[-10:], ImuSample)])
    np.testing.assert_allclose(gyro, np.tile([0, 0, 1.0], (len(gyro), 1)), atol=0.02)  # rad/s
    yaw = turn[-1][1]["pose"][2]
    last = frames_of(turn, ImuSample)[-1].orientation
    assert 2 * math.atan2(last[2], last[3]) == pytest.approx(yaw, abs=0.02)  # one step of turning behind
    env.close()


def test_noise_and_bias_are_per_episode():
    env = RobotEnv(Fixed(), sensors=SensorConfig(accel_noise=0.05, accel_bias=0.1))
    accel = np.stack([s.accel for s in frames_of(run(env, 1.0, [0, 0]), ImuSample)])
    bias = accel.mean(axis=0) - [0, 0, G]
    assert accel.std(axis=0) == pytest.approx([0.05] * 3, rel=0.2)
    assert np.abs(bias).max() < 0.5 and np.abs(bias).max() > 0.005
    other = np.stack([s.accel for s in frames_of(run(env, 1.0, [0, 0], seed=1), ImuSample)])
    assert not np.allclose(bias, other.mean(axis=0) - [0, 0, G], atol=0.005)
    env.close()


@pytest.mark.parametrize("rates", [(10.0, 10.0, 200.0), (20.0, 5.0, 100.0)])
def test_sensor_rates(rates):
    camera_hz, lidar_hz, imu_hz = rates
    env = RobotEnv(Fixed(), sensors=SensorConfig(camera_hz=camera_hz, lidar_hz=lidar_hz, imu_hz=imu_hz,
                                                 camera_size=(16, 16)))
    steps = run(env, 2.0, [0.3, 0.5])
    for kind, hz in ((CameraFrame, camera_hz), (LidarFrame, lidar_hz), (ImuSample, imu_hz)):
        stamps = np.array([f.stamp_ns for f in frames_of(steps, kind) if f.stamp_ns < 2 * NS_PER_S])
        assert len(stamps) == round(2 * hz)
        np.testing.assert_array_equal(np.diff(stamps), round(NS_PER_S / hz))
    for frames, info, _ in steps:  # delivered in stamp order, none from the future
        stamps = [f.stamp_ns for f in frames]
        assert stamps == sorted(stamps) and all(s <= info["time_ns"] for s in stamps)
    env.close()


WINDOW = (0.2, 0.2)  # start, duration [s]
FAULTS = {
    "camera_blackout": 1.0, "camera_freeze": 1.0, "camera_noise": 30.0, "camera_dropout": 1.0,
    "lidar_dropout": 1.0, "lidar_sparse": 0.5, "lidar_spurious": 25.0, "imu_dropout": 1.0,
    "imu_bias_jump": 1.0, "imu_noise_burst": 0.5, "camera_delay": 0.25, "lidar_freeze": 1.0, "imu_freeze": 1.0,
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_shows_in_info_and_frames(name):
    box = Geom("box", "box", (1.5, 0.0, 0.3), (0.2, 0.2, 0.3), TASK_COLOURS["blue"])
    env = RobotEnv(Fixed(geoms=[box]), sensors=SensorConfig(camera_size=(32, 32)))
    clean = run(env, 0.6, [0.2, 1.5])
    faulty = run(env, 0.6, [0.2, 1.5], options={"faults": {name: FaultSpec.window(*WINDOW, FAULTS[name])}})
    lo, hi = (round(s * NS_PER_S) for s in (WINDOW[0], WINDOW[0] + WINDOW[1]))
    for (_, info, _), (_, clean_info, _) in zip(faulty, clean):
        t1 = info["time_ns"]
        assert info["faults"] == ({name: FAULTS[name]} if lo < t1 and t1 - 20_000_000 < hi else {})
        assert clean_info["faults"] == {}
    kind = {"camera": CameraFrame, "lidar": LidarFrame, "imu": ImuSample}[name.split("_")[0]]
    inside = [f for f in frames_of(faulty, kind) if lo <= f.stamp_ns < hi]
    ref = {f.stamp_ns: f for f in frames_of(clean, kind)}
    before = [f for f in frames_of(faulty, kind) if f.stamp_ns < lo]
    assert before and all(_same(f, ref[f.stamp_ns]) for f in before)
    if name.endswith("dropout"):
        assert not inside
        return
    assert len(inside) == len([s for s in ref if lo <= s < hi]) > 0
    for f in inside:
        r = ref[f.stamp_ns]
        if name == "camera_blackout":
            assert not f.image.any() and r.image.any()
        elif name == "camera_freeze":
            assert np.array_equal(f.image, before[-1].image) and not np.array_equal(r.image, before[-1].image)
        elif name == "lidar_freeze":  # the last sweep before the fault, re-sent with fresh stamps
            assert np.array_equal(f.points, before[-1].points) and not np.array_equal(r.points, before[-1].points)
        elif name == "imu_freeze":  # the last reading before the fault, held
            assert np.array_equal(f.accel, before[-1].accel) and np.array_equal(f.gyro, before[-1].gyro)
            assert not np.array_equal(r.gyro, before[-1].gyro)
        elif name == "camera_noise":
            assert 10 < np.abs(f.image.astype(int) - r.image).mean() < 40
        elif name == "lidar_sparse":
            assert 0.3 * len(r) < len(f) < 0.7 * len(r)
        elif name == "lidar_spurious":
            assert len(f) == len(r) + 25 and np.array_equal(f.points[: len(r)], r.points)
        elif name == "imu_bias_jump":
            jump = f.accel - r.accel
            assert np.abs(jump).max() > 0.01
            np.testing.assert_allclose(jump, inside[0].accel - ref[inside[0].stamp_ns].accel, atol=1e-9)
        elif name == "imu_noise_burst":
            assert not np.allclose(f.accel, r.accel, atol=1e-3)
        else:  # camera_delay: the same image, stamped at capture, delivered 0.25 s late
            assert _same(f, r)
    if name == "camera_delay":
        for frames, info, _ in faulty:
            for f in frames:
                if isinstance(f, CameraFrame) and lo <= f.stamp_ns < hi:
                    assert 0 <= info["time_ns"] - (f.stamp_ns + 250_000_000) < 20_000_000
    env.close()


def _same(a, b):
    return FrameList([a]) == FrameList([b])


def test_random_faults_vary_by_episode_and_reproduce():
    env = RobotEnv(Fixed(), faults=FaultConfig(lidar_dropout=FaultSpec(0.5, (0.0, 1.0), (0.5, 2.0))),
                   sensors=SensorConfig(camera_size=(16, 16)))
    drawn = []
    for seed in range(12):
        env.reset(seed=seed)
        drawn.append(env.injector.schedule.get("lidar_dropout"))
    assert 0 < sum(w is not None for w in drawn) < len(drawn)
    assert all(0 <= w.start_ns <= NS_PER_S and 0.5 * NS_PER_S <= w.end_ns - w.start_ns <= 2 * NS_PER_S
               for w in drawn if w is not None)
    env.reset(seed=3)
    assert env.injector.schedule.get("lidar_dropout") == drawn[3]
    env.close()


def test_navigate_blacks_out_by_default():
    env = gym.make("FusionAttn/Navigate-v0", sensors=SensorConfig(camera_size=(16, 16)))
    for seed in range(3):
        env.reset(seed=seed)
        window = env.unwrapped.injector.schedule["camera_blackout"]
        assert 2 * NS_PER_S <= window.start_ns <= 6 * NS_PER_S
        assert 5 * NS_PER_S <= window.end_ns - window.start_ns <= 10 * NS_PER_S
    env.close()


def test_memory_cue_shows_while_the_robot_is_held_then_vanishes():
    memory = gym.make("FusionAttn/Memory-v0")
    obs, info = memory.reset(seed=0)
    channel = int(np.argmax(TASK_COLOURS[memory.unwrapped.task.cue]))

    def cue_pixels(image):  # saturated pixels of the cue's colour above the horizon (the zones lie below)
        upper = image[: image.shape[0] // 2]
        others = np.delete(upper, channel, axis=2)
        return int(((upper[..., channel] > 100) & (others.max(axis=2) < 70)).sum())

    assert cue_pixels(obs["image"]) > 40  # in view at the start
    assert (obs["lidar"] < 2.3).sum() >= 4  # and in the lidar's (nothing else stands within 2.3 m)
    start = info["pose"]
    for _ in range(100):  # 2 s of "full ahead": held while the cue shows and for the delay after
        obs, reward, terminated, _, info = memory.step(np.array([1.0, 0.0], np.float32))
    np.testing.assert_allclose(info["pose"], start, atol=1e-6)
    assert reward < 0 and not terminated and not info["is_success"] and info["cue"] in TASK_COLOURS
    np.testing.assert_array_equal(info["goal"], np.float32(memory.unwrapped.task.goal()))  # the cued zone, in training only
    for _ in range(5):  # then it drives, and the cue is gone
        obs, *_, info = memory.step(np.array([1.0, 0.0], np.float32))
    assert cue_pixels(obs["image"]) == 0 and (obs["lidar"] < 2.3).sum() == 0
    assert np.hypot(*(info["pose"][:2] - start[:2])) > 0.005
    memory.close()


def test_memory_rewards_only_the_cued_zone():
    from fusion_attn.sim.tasks import MemoryTask

    task = MemoryTask()
    cued = set()
    for seed in range(12):
        layout = task.new_episode(np.random.default_rng(seed))
        cue = next(g for g in layout.geoms if g.name == "cue")
        assert cue.collide and cue.hide_at_s == task.cue_s  # the lidar sees it too, until it sinks
        assert cue.pos[:2] == task.goal()  # it stands in the cued zone
        cued.add(task.cue)
    assert cued == {"red", "green", "blue"} and task.goal_colours == ["red", "green", "blue"]
    assert [np.hypot(*g) for g in task.goals] == pytest.approx([task.goal_distance] * 3)
    gaps = [np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(task.goals, task.goals[1:])]
    assert min(gaps) > 2 * task.goal_radius  # the zones do not touch
    for (x, y), colour in zip(task.goals, task.goal_colours):
        layout = task.new_episode(np.random.default_rng(0))
        start_dist = min(np.hypot(layout.start[0] - gx, layout.start[1] - gy) for gx, gy in task.goals)
        reward, done, info = task.evaluate(np.array([x, y, 0.0]), 3.0)
        assert done and info["reached"] == colour and info["is_success"] == (colour == task.cue)
        expected = task.progress_reward * start_dist - 0.5 * 3.0 / task.episode_s + (colour == task.cue)
        assert reward == pytest.approx(expected)
    two = gym.make("FusionAttn/Memory-Discrete-v0", task_options={"n_goals": 2}).unwrapped.task  # as --env-kwargs gives it
    two.new_episode(np.random.default_rng(0))
    assert two.goal_colours == ["red", "green"] and two.goals[0][1] < 0 < two.goals[1][1]  # its left is -y


def test_fused_observation_masks_faulted_sensors():
    from fusion_attn.sim.wrappers import FusedObservation

    env = FusedObservation(gym.make("FusionAttn/Control-v0"), with_attention=True)
    assert env.observation_space.shape == (67,)
    obs, _ = env.reset(seed=0)
    for _ in range(10):
        obs, *_, info = env.step(np.array([0.3, 0.2], np.float32))
        assert obs.shape == (67,) and obs.dtype == np.float32 and np.isfinite(obs).all()
        assert info["fused"].present.all() and obs[64:].sum() == pytest.approx(1.0, abs=1e-5)
        if info["fused"].stamp_ns >= 150_000_000:  # before, the IMU window holds too few samples to trust
            assert (obs[64:] > 0.2).all()
    for name, modality in (("lidar_dropout", Modality.LIDAR), ("camera_dropout", Modality.CAMERA)):
        obs, _ = env.reset(seed=0, options={"faults": {name: FaultSpec.window()}})
        for _ in range(5):
            obs, *_, info = env.step(np.array([0.3, 0.2], np.float32))
            assert np.isfinite(obs).all() and obs[64 + modality] == 0.0
            assert not info["fused"].present[modality]
            assert obs[64:].sum() == pytest.approx(1.0, abs=1e-5)
    env.close()


@pytest.mark.filterwarnings("ignore:.*ERROR.*:UserWarning")  # the forked worker's error, from Gymnasium
def test_async_vector_env_spawned_and_forked_after_rendering():
    make = partial(gym.make, "fusion_attn.sim:FusionAttn/Control-v0", sensors=SensorConfig(camera_size=(16, 16)))
    envs = gym.vector.AsyncVectorEnv([make] * 2, context="spawn")
    obs, info = envs.reset(seed=0)
    obs, *_, info = envs.step(envs.action_space.sample())
    assert obs["image"].shape == (2, 16, 64, 3) and len(info["frames"]) == 2  # 4 views side by side
    envs.close()
    rendered = make()
    rendered.reset(seed=0)  # this process now holds a GL context, which a forked worker cannot use
    envs = gym.vector.AsyncVectorEnv([make], context="fork")
    with pytest.raises(RuntimeError, match="spawn"):
        envs.reset(seed=0)
    envs.close()
    rendered.close()


def test_a_recorded_episode_replays_through_the_replay_tool(tmp_path, capsys):
    from rosbags.highlevel import AnyReader

    from fusion_attn.cli import main

    assert main(["sim-record", "FusionAttn/Navigate-v0", "-o", str(tmp_path / "sim"), "--episodes", "2",
                 "--seconds", "2", "--seed", "3"]) == 0
    with AnyReader([tmp_path / "sim"]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        odom = next(c for c in reader.connections if c.topic == "/odom")
        stamps = [t for _, t, _ in reader.messages([odom])]
        _, _, raw = next(reader.messages([odom]))
        first = reader.deserialize(raw, odom.msgtype)
    assert types == {"/camera/image_raw": "sensor_msgs/msg/Image", "/lidar/points": "sensor_msgs/msg/PointCloud2",
                     "/imu/data": "sensor_msgs/msg/Imu", "/odom": "nav_msgs/msg/Odometry",
                     "/ground_truth/pose": "geometry_msgs/msg/PoseStamped", "/tf": "tf2_msgs/msg/TFMessage"}
    assert first.header.frame_id == "odom" and first.child_frame_id == "base_link"
    assert np.all(np.diff(stamps) > 0)  # the second episode follows the first on one clock
    assert main(["replay", str(tmp_path / "sim"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["topics"] == {"camera": "/camera/image_raw", "imu": "/imu/data", "lidar": "/lidar/points"}
    assert summary["skipped_topics"]["/odom"] == "the model does not read odometry"  # the default has no odometry
    assert summary["resets"] == 0 and summary["fusions"] >= 2 * 2 * 20
    assert all(summary["present_fraction"][m] > 0.8 for m in ("camera", "lidar", "imu"))
    # a run that cannot record leaves no bag, nor anything that blocks the next run
    for args, problem in ((["CartPole-v1"], "not a FusionAttn env"), (["FusionAttn/Navigate-v0", "--seconds", "nan"],
                                                                       "finite and > 0")):
        assert main(["sim-record", *args, "-o", str(tmp_path / "bad")]) == 2
        assert problem in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sim"]
    assert main(["sim-record", "FusionAttn/Navigate-v0", "-o", str(tmp_path / "sim")]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
