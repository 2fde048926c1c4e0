"""Simulated camera, lidar, IMU and wheel odometry: MuJoCo state -> the core's typed frames (fusion_attn.frames).

`capture(data, stamp_ns)` reads an MjData whose derived quantities (poses, sensordata) describe the
instant stamp_ns. Frames follow REP-103 in the sensor's own frame (x forward, y left, z up; metres,
m/s^2, rad/s). Frame ids: "camera", "lidar", "imu" (a second IMU's "imu2"), and "base_link" for the
odometry's twist.

Geom groups: 0 is everything the robot can hit; non-colliding markers are VISUAL_GROUP (the camera
sees them, lidar rays pass through: floor patches) or LIDAR_MARKER_GROUP (camera and lidar see them:
the goal post). A geom whose user[0] is 1 (scene.Geom.retroreflective) returns full lidar intensity.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from dataclasses import dataclass, replace

import mujoco
import numpy as np

from fusion_attn.frames import CameraFrame, ImuSample, LidarFrame, OdometrySample

VISUAL_GROUP = 1  # geom group of visual markers: the camera sees them, lidar rays pass through
LIDAR_MARKER_GROUP = 2  # non-colliding markers that lidar rays hit too (the camera renders groups 0-2)
MARKER_GROUPS = (VISUAL_GROUP, LIDAR_MARKER_GROUP)  # non-colliding geoms: what the robot cannot hit
RETROREFLECTIVE_INTENSITY = 255.0  # a retroreflector sends the beam back: the strongest return
DIFFUSE_INTENSITY = 200.0  # a diffuse surface of luminance 1 returns this much, so retroreflectors stand out
_GL_PID: int | None = None  # the process that made the first GL context


@dataclass(frozen=True)
class SensorConfig:
    camera_hz: float = 10.0  # 0 disables a sensor
    camera_size: tuple[int, int] = (64, 64)  # height, width of each view
    # views around the robot, stitched side by side into one 360° panorama (each covers 360/views
    # degrees; square views at 4 have fovy 90°); 1: a single forward camera of camera_fovy_deg
    camera_views: int = 4
    camera_fovy_deg: float = 75.0  # the single forward camera's (camera_views=1)
    camera_noise_levels: float = 2.0  # gaussian pixel noise std [8-bit levels]: no two frames are identical
    lidar_hz: float = 10.0
    lidar_beams: int = 180  # per ring, evenly over 360 degrees, beam 0 straight ahead, counter-clockwise
    lidar_elevations_deg: tuple[float, ...] = (0.0, 3.0)  # one ring per elevation
    lidar_max_range_m: float = 8.0  # no return beyond: the ray is dropped
    lidar_noise_m: float = 0.01  # gaussian range noise (std)
    imu_hz: float = 200.0
    accel_noise: float = 0.05  # white noise std per sample [m/s^2]
    gyro_noise: float = 0.005  # [rad/s]
    accel_bias: float = 0.05  # std of the constant per-episode bias [m/s^2]
    gyro_bias: float = 0.002  # [rad/s]
    # wheel odometry: the robot's speed and turn rate as wheels that roll without slipping report them.
    # Per episode its scale is off by a gaussian share (a wheel radius, a track width calibrated to within
    # a few per cent); white noise on each reading. The Clearpath Husky's (benchmarks/odom_rates.py) is
    # within 0.016 rad/s of its gyro on average and 1.00-1.03x the GPS's speed
    odometry_hz: float = 50.0
    odometry_speed_noise: float = 0.01  # [m/s]
    odometry_turn_noise: float = 0.015  # [rad/s]
    odometry_speed_scale: float = 0.01  # std of the per-episode scale error
    odometry_turn_scale: float = 0.03
    # a second IMU at the first one's site, of the same make (rate, noise, bias spread) with its own bias
    # and noise draws, as two IMU boards on one robot (0: none; benchmarks/imu_redundancy.py)
    imu2_hz: float = 0.0

    def with_second_imu(self) -> SensorConfig:
        """This rig with a second IMU of its IMU's make, at its rate (what a model reading one is trained and
        run with)."""
        return replace(self, imu2_hz=self.imu_hz)

    def __post_init__(self) -> None:
        if self.camera_views < 1 or self.camera_views == 2:
            raise ValueError(f"camera_views must be 1 or at least 3 (a view covers 360/views degrees, less "
                             f"than 180), got {self.camera_views}")

    @property
    def camera_image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of a camera frame: the views side by side."""
        h, w = self.camera_size
        return h, self.camera_views * w, 3

    @property
    def camera_yaws_deg(self) -> tuple[float, ...]:
        """Each view's yaw from straight ahead (left positive), left to right in the panorama: its
        columns run from azimuth +180° to -180°, straight ahead in the middle."""
        n = self.camera_views
        return tuple(180.0 - (i + 0.5) * 360.0 / n for i in range(n)) if n > 1 else (0.0,)

    @property
    def camera_view_fovy_deg(self) -> float:
        """Each view's vertical field of view: a rig's views meet edge to edge."""
        if self.camera_views == 1:
            return self.camera_fovy_deg
        h, w = self.camera_size
        return 2.0 * math.degrees(math.atan(math.tan(math.pi / self.camera_views) * h / w))

    @property
    def camera_hfov_deg(self) -> float:
        """The horizontal field of view of the whole image (360 for a rig)."""
        if self.camera_views > 1:
            return 360.0
        h, w = self.camera_size
        return 2.0 * math.degrees(math.atan(math.tan(math.radians(self.camera_fovy_deg) / 2) * w / h))

    def image_x(self, bearing_rad: np.ndarray) -> np.ndarray:
        """Where a direction from the camera (bearing from straight ahead, left positive) lies across its image, as a
        share of its width in [0, 1) (0: the left edge); nan outside a single view's field. Each view is
        a pinhole image: its columns go with the tangent of the angle off its axis, not the angle."""
        view, off_axis = self._view_of(bearing_rad)
        if self.camera_views == 1:
            half = math.radians(self.camera_hfov_deg) / 2
            return np.where(np.abs(off_axis) <= half, 0.5 - np.tan(np.clip(off_axis, -half, half)) / (2 * math.tan(half)), np.nan)
        span = 2 * math.pi / self.camera_views
        return (view + 0.5 - np.tan(off_axis) / (2 * math.tan(span / 2))) / self.camera_views

    def image_y(self, bearing_rad: np.ndarray, distance_m: np.ndarray, height_m: np.ndarray) -> np.ndarray:
        """Where a point at a horizontal distance and bearing from the camera and height_m above it lies
        down its image, as a share of the image's height (0: the top edge; outside [0, 1): cut off by
        the view); nan where image_x is. Each view is a level pinhole image: a row goes with the height
        over the depth along the view's axis."""
        _, off_axis = self._view_of(bearing_rad)
        depth = np.asarray(distance_m, np.float64) * np.cos(off_axis)
        y = 0.5 - np.asarray(height_m, np.float64) / depth / (2 * math.tan(math.radians(self.camera_view_fovy_deg) / 2))
        return np.where(np.isfinite(self.image_x(bearing_rad)), y, np.nan)

    def _view_of(self, bearing_rad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The view a bearing falls in (0 for a single camera) and its angle off that view's axis (left positive)."""
        b = np.asarray(bearing_rad, np.float64)
        if self.camera_views == 1:
            return np.zeros_like(b), b
        n, span = self.camera_views, 2 * math.pi / self.camera_views
        left = np.remainder(math.pi - b, 2 * math.pi)  # angle from the image's left edge (+180°) rightwards
        view = np.minimum(np.floor(left / span), n - 1)
        return view, span / 2 - (left - view * span)  # off axis within +-span / 2


def camera_name(view: int) -> str:
    """The MJCF camera of a view (scene.build_mjcf makes one per view)."""
    return f"camera{view}"


@functools.cache
def _noise_levels(std: float) -> np.ndarray:
    """Gaussian noise of `std` rounded to whole levels, at 65536 evenly spaced quantiles: indexed by a
    uniform 16-bit draw per pixel it costs a third of drawing normals (and since pixels are whole
    levels, rounding the noise before adding it changes nothing)."""
    dist = statistics.NormalDist(0.0, std)
    return np.rint([dist.inv_cdf((k + 0.5) / 65536) for k in range(65536)]).astype(np.int16)


def geom_groups(*excluded: int) -> np.ndarray:
    """mj_ray's geomgroup filter: every geom group but `excluded`."""
    return np.array([g not in excluded for g in range(mujoco.mjNGROUP)], np.uint8)


class Camera:
    """RGB images from the robot's camera rig: (H, views * W, 3) uint8 rgb8, the views side by side
    (SensorConfig.camera_yaws_deg), each a pinhole image, plus gaussian pixel noise.

    One OpenGL context serves every episode's model (`bind`): the first render context made in a
    fresh GL context compiles its shaders, about 0.1 s on Mesa's llvmpipe, which mujoco.Renderer
    (a GL context per model) would add to every reset. It draws with mujoco.Renderer's calls, each
    view into its own viewport of one offscreen buffer, read back at once.
    """

    frame_id = "camera"

    def __init__(self, cfg: SensorConfig):
        global _GL_PID
        self._gl, self._context = None, None
        if _GL_PID not in (None, os.getpid()):
            raise RuntimeError("this process was forked from one that had rendered, and OpenGL (EGL) does "
                               "not survive a fork: start env workers with context='spawn' (AsyncVectorEnv)")
        _GL_PID = os.getpid()
        self._cfg = cfg
        self._h, self._w = cfg.camera_size
        self._noise = _noise_levels(cfg.camera_noise_levels) if cfg.camera_noise_levels > 0 else None
        self._gl = mujoco.GLContext(cfg.camera_views * self._w, self._h)

    def bind(self, model: mujoco.MjModel, rng: np.random.Generator | None = None) -> None:
        """Render `model` from now on (a new episode's arena), with pixel noise from `rng` (the
        episode's sensor stream; None: a fresh unseeded one)."""
        self._gl.make_current()
        if self._context is not None:
            self._context.free()
        self._model = model
        self._rng = rng if rng is not None else np.random.default_rng()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_50.value)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN.value, self._context)
        self._scene = mujoco.MjvScene(model, maxgeom=model.ngeom + 32)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            self._scene.flags[flag] = False
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        views = self._cfg.camera_views
        self._camids = [model.camera(camera_name(i)).id for i in range(views)]
        self._viewports = [mujoco.MjrRect(i * self._w, 0, self._w, self._h) for i in range(views)]
        self._rect = mujoco.MjrRect(0, 0, views * self._w, self._h)

    def capture(self, data: mujoco.MjData, stamp_ns: int) -> CameraFrame:
        self._gl.make_current()
        for camid, viewport in zip(self._camids, self._viewports):
            self._camera.fixedcamid = camid
            mujoco.mjv_updateScene(self._model, data, self._option, None, self._camera,
                                   mujoco.mjtCatBit.mjCAT_ALL.value, self._scene)
            mujoco.mjr_render(viewport, self._scene, self._context)
        image = np.empty((self._h, self._rect.width, 3), np.uint8)
        mujoco.mjr_readPixels(image, None, self._rect, self._context)
        image = image[::-1]  # OpenGL's rows run bottom-up
        if self._noise is not None:
            noisy = self._noise[self._rng.integers(0, 65536, image.shape, np.uint16)]
            noisy += image
            image = np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)
        return CameraFrame(stamp_ns, self.frame_id, np.ascontiguousarray(image), "rgb8")

    def close(self) -> None:
        if self._gl is None:
            return
        if self._context is not None:
            with self._gl.as_current():
                self._context.free()
            self._context = None
        self._gl.free()
        self._gl = None

    __del__ = close  # the render context must go before its GL context, whoever drops the camera


class Lidar:
    """A spinning multi-ring lidar as one instantaneous sweep of rays (mj_multiRay) from the lidar site.

    Points (N, 4) float32 x, y, z, intensity in the lidar frame; rays without a return within the
    max range are dropped, and visual markers (VISUAL_GROUP) are transparent. Intensity (0..255) is
    RETROREFLECTIVE_INTENSITY from a retroreflective geom, else the luminance of the surface hit times
    DIFFUSE_INTENSITY, a stand-in for reflectivity; `ring` holds each point's ring (its index into
    lidar_elevations_deg).
    """

    frame_id = "lidar"

    def __init__(self, model: mujoco.MjModel, cfg: SensorConfig, rng: np.random.Generator):
        self._model, self._cfg, self._rng = model, cfg, rng
        az = 2.0 * np.pi * np.arange(cfg.lidar_beams) / cfg.lidar_beams
        el = np.radians(np.asarray(cfg.lidar_elevations_deg, np.float64))[:, None]
        xyz = np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el))
        self.directions = np.stack(xyz, axis=-1).reshape(-1, 3)  # unit vectors in the lidar frame, ring-major
        self._ring = np.repeat(np.arange(len(el), dtype=np.uint16), cfg.lidar_beams)
        self._site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "lidar")
        self._exclude = int(model.site_bodyid[self._site])  # never hit the robot itself
        rgb = model.geom_rgba[:, :3].copy()
        textured = model.geom_matid >= 0  # a material's colour replaces the geom's
        rgb[textured] = model.mat_rgba[model.geom_matid[textured], :3]
        retro = model.geom_user[:, 0] == 1 if model.nuser_geom else np.zeros(model.ngeom, bool)
        diffuse = DIFFUSE_INTENSITY * rgb @ np.array([0.299, 0.587, 0.114])
        self._intensity = np.where(retro, RETROREFLECTIVE_INTENSITY, diffuse).astype(np.float32)
        self._groups = geom_groups(VISUAL_GROUP)
        self._geomid = np.zeros(len(self.directions), np.int32)
        self._dist = np.zeros(len(self.directions))

    def capture(self, data: mujoco.MjData, stamp_ns: int) -> LidarFrame:
        cfg = self._cfg
        rot = data.site_xmat[self._site].reshape(3, 3)
        vec = (self.directions @ rot.T).ravel()
        mujoco.mj_multiRay(self._model, data, data.site_xpos[self._site], vec, self._groups, 1, self._exclude,
                           self._geomid, self._dist, None, len(self.directions), cfg.lidar_max_range_m)
        hit = (self._dist >= 0.0) & (self._dist <= cfg.lidar_max_range_m)
        r = self._dist[hit] + self._rng.normal(0.0, cfg.lidar_noise_m, int(hit.sum()))
        r = np.clip(r, 0.0, cfg.lidar_max_range_m)
        points = np.empty((len(r), 4), np.float32)
        points[:, :3] = self.directions[hit] * r[:, None]
        points[:, 3] = self._intensity[self._geomid[hit]]
        return LidarFrame(stamp_ns, self.frame_id, points, ring=self._ring[hit])


def lidar_ranges(frame: LidarFrame | None, cfg: SensorConfig) -> np.ndarray:
    """A lidar frame as a fixed (rings, beams) float32 range image [m]; max range where no point fell.

    Points are binned by direction (nearest beam azimuth and ring elevation), so it also holds
    points the sensor did not produce at its beam angles (spurious ones)."""
    rings, beams = len(cfg.lidar_elevations_deg), cfg.lidar_beams
    out = np.full(rings * beams, cfg.lidar_max_range_m, np.float32)
    if frame is None or len(frame) == 0:
        return out.reshape(rings, beams)
    x, y, z = frame.points[:, 0], frame.points[:, 1], frame.points[:, 2]
    flat = np.hypot(x, y)
    beam = np.rint(np.arctan2(y, x) * (beams / (2.0 * np.pi))).astype(np.int64) % beams
    el = np.degrees(np.arctan2(z, flat))
    ring = np.abs(el[:, None] - np.asarray(cfg.lidar_elevations_deg)[None]).argmin(axis=1)
    np.minimum.at(out, ring * beams + beam, np.minimum(np.hypot(flat, z), cfg.lidar_max_range_m))
    return out.reshape(rings, beams)


class Imu:
    """Accelerometer and gyro at the IMU site (MuJoCo sensors) plus per-episode bias and white noise.

    The accelerometer measures specific force, so a level robot at rest reads (0, 0, +9.81).
    Orientation is the body's exact world orientation (an ideal AHRS), x, y, z, w.
    """

    def __init__(self, model: mujoco.MjModel, cfg: SensorConfig, rng: np.random.Generator, frame_id: str = "imu"):
        self._rng, self.frame_id = rng, frame_id
        accel, gyro = (int(model.sensor(name).adr[0]) for name in ("accel", "gyro"))
        self._index = np.r_[accel:accel + 3, gyro:gyro + 3]  # where they are in sensordata
        self._body = int(model.site_bodyid[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "imu")])
        self._std = np.repeat([cfg.accel_noise, cfg.gyro_noise], 3)
        self.bias = rng.normal(0.0, 1.0, 6) * np.repeat([cfg.accel_bias, cfg.gyro_bias], 3)  # this episode's

    def capture(self, data: mujoco.MjData, stamp_ns: int) -> ImuSample:
        m = data.sensordata[self._index] + self.bias + self._std * self._rng.standard_normal(6)
        xyzw = data.xquat[self._body][[1, 2, 3, 0]]  # MuJoCo stores w first
        return ImuSample(stamp_ns, self.frame_id, m[:3], m[3:], xyzw)


class Odometry:
    """Wheel odometry: the body's forward speed and yaw rate (MuJoCo's state, in the robot's frame),
    scaled by this episode's calibration error, plus white noise."""

    frame_id = "base_link"

    def __init__(self, cfg: SensorConfig, rng: np.random.Generator):
        self._rng = rng
        self._std = np.array([cfg.odometry_speed_noise, cfg.odometry_turn_noise])
        self.scale = 1.0 + rng.normal(0.0, 1.0, 2) * np.array([cfg.odometry_speed_scale, cfg.odometry_turn_scale])

    def capture(self, data: mujoco.MjData, stamp_ns: int) -> OdometrySample:
        yaw = float(data.qpos[2])
        vx, vy, omega = data.qvel[:3]  # world frame, as the drive's joints move
        speed = vx * math.cos(yaw) + vy * math.sin(yaw)
        v, w = np.array([speed, omega]) * self.scale + self._std * self._rng.standard_normal(2)
        return OdometrySample(stamp_ns, self.frame_id, np.array([v, 0.0, 0.0]), np.array([0.0, 0.0, w]))
