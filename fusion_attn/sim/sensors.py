"""Simulated camera, lidar and IMU: MuJoCo state -> the core's typed frames (fusion_attn.frames).

`capture(data, stamp_ns)` reads an MjData whose derived quantities (poses, sensordata) describe the
instant stamp_ns. Frames follow REP-103 in the sensor's own frame (x forward, y left, z up; metres,
m/s^2, rad/s). Frame ids: "camera", "lidar", "imu".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mujoco
import numpy as np

from fusion_attn.frames import CameraFrame, ImuSample, LidarFrame

VISUAL_GROUP = 1  # geom group of visual markers: the camera sees them, lidar rays pass through
_GL_PID: int | None = None  # the process that made the first GL context


@dataclass(frozen=True)
class SensorConfig:
    camera_hz: float = 10.0  # 0 disables a sensor
    camera_size: tuple[int, int] = (64, 64)  # height, width
    camera_fovy_deg: float = 75.0
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


class Camera:
    """RGB images from the robot's forward camera: (H, W, 3) uint8 rgb8.

    One OpenGL context serves every episode's model (`bind`): the first render context made in a
    fresh GL context compiles its shaders, about 0.1 s on Mesa's llvmpipe, which mujoco.Renderer
    (a GL context per model) would add to every reset. It draws with mujoco.Renderer's calls.
    """

    frame_id = "camera"

    def __init__(self, cfg: SensorConfig):
        global _GL_PID
        self._gl, self._context = None, None
        if _GL_PID not in (None, os.getpid()):
            raise RuntimeError("this process was forked from one that had rendered, and OpenGL (EGL) does "
                               "not survive a fork: start env workers with context='spawn' (AsyncVectorEnv)")
        _GL_PID = os.getpid()
        self._h, self._w = cfg.camera_size
        self._gl = mujoco.GLContext(self._w, self._h)

    def bind(self, model: mujoco.MjModel) -> None:
        """Render `model` from now on (a new episode's arena)."""
        self._gl.make_current()
        if self._context is not None:
            self._context.free()
        self._model = model
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_50.value)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN.value, self._context)
        self._scene = mujoco.MjvScene(model, maxgeom=model.ngeom + 32)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            self._scene.flags[flag] = False
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "camera")
        self._rect = mujoco.MjrRect(0, 0, self._w, self._h)

    def capture(self, data: mujoco.MjData, stamp_ns: int) -> CameraFrame:
        self._gl.make_current()
        mujoco.mjv_updateScene(self._model, data, self._option, None, self._camera,
                               mujoco.mjtCatBit.mjCAT_ALL.value, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._context)
        image = np.empty((self._h, self._w, 3), np.uint8)
        mujoco.mjr_readPixels(image, None, self._rect, self._context)
        image = np.ascontiguousarray(image[::-1])  # OpenGL's rows run bottom-up
        return CameraFrame(stamp_ns, self.frame_id, image, "rgb8")

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
    the luminance of the surface hit, a stand-in for reflectivity; `ring` holds each point's ring
    (its index into lidar_elevations_deg).
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
        self._intensity = (255.0 * rgb @ np.array([0.299, 0.587, 0.114])).astype(np.float32)
        self._groups = np.array([g != VISUAL_GROUP for g in range(mujoco.mjNGROUP)], np.uint8)
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

    frame_id = "imu"

    def __init__(self, model: mujoco.MjModel, cfg: SensorConfig, rng: np.random.Generator):
        self._rng = rng
        accel, gyro = (int(model.sensor(name).adr[0]) for name in ("accel", "gyro"))
        self._index = np.r_[accel:accel + 3, gyro:gyro + 3]  # where they are in sensordata
        self._body = int(model.site_bodyid[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "imu")])
        self._std = np.repeat([cfg.accel_noise, cfg.gyro_noise], 3)
        self.bias = rng.normal(0.0, 1.0, 6) * np.repeat([cfg.accel_bias, cfg.gyro_bias], 3)  # this episode's

    def capture(self, data: mujoco.MjData, stamp_ns: int) -> ImuSample:
        m = data.sensordata[self._index] + self.bias + self._std * self._rng.standard_normal(6)
        xyzw = data.xquat[self._body][[1, 2, 3, 0]]  # MuJoCo stores w first
        return ImuSample(stamp_ns, self.frame_id, m[:3], m[3:], xyzw)
