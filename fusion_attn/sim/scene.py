"""The simulated world as MJCF text: a walled square arena, its objects and the robot.

A task describes one episode's world as a `Layout` (plain data, drawn from a seeded Generator);
`build_mjcf` turns it into a MuJoCo model string. World frame: z up, the arena centred on the origin.

The robot is a planar rigid body on two world-axis slide joints and a yaw hinge (exact, cheap and
robust, no wheel contacts): velocity actuators track the world velocity that a differential drive
would have for the command (v, omega), so it cannot move sideways except when pushed by a contact.
Its low-friction shell (its friction wins: priority 1) slides along walls and turns against them.
Its sensors sit on it in REP-103 axes (x forward, y left, z up): the IMU at the body origin, the
lidar on top, and the camera: a single one at the front edge looking forward, or a rig of views
sharing one viewpoint on a mast above the lidar (RIG_HEIGHT), each looking out along its yaw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .sensors import LIDAR_MARKER_GROUP, VISUAL_GROUP, SensorConfig, camera_name

ROBOT_RADIUS = 0.18  # m, a cylinder of 2 * ROBOT_HALF_HEIGHT
ROBOT_HALF_HEIGHT = 0.1
ROBOT_Z = 0.12  # body origin height: the cylinder clears the floor, so the floor never touches it
LIDAR_HEIGHT = 0.2  # above the body origin
CAMERA_POS = (ROBOT_RADIUS + 0.01, 0.0, 0.13)  # the single forward camera's (camera_views=1)
# A rig's views share one viewpoint, so neighbours meet without a blind strip at their seam (straight
# ahead is one). From 0.2 m above the chassis top, its edge lies 48° down: below 4 square views (45°).
RIG_HEIGHT = 0.3  # above the body origin
WALL_HEIGHT = 0.6
WALL_THICKNESS = 0.1
HIDDEN_POS = (0.0, 0.0, -10.0)  # where a hidden object goes: under the floor, out of every view and ray

# Colours the tasks give meaning to (goals, cues, targets); obstacles never use them.
TASK_COLOURS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.1, 0.25, 0.9)}
OBSTACLE_COLOURS = ((0.95, 0.85, 0.1), (0.85, 0.2, 0.85), (0.1, 0.8, 0.85), (0.95, 0.5, 0.05),
                    (0.92, 0.92, 0.92), (0.45, 0.25, 0.6))
SHAPES = ("box", "cylinder", "sphere")


@dataclass(frozen=True)
class Geom:
    """One object of the arena, in MJCF terms (size as MJCF's `size` for its type)."""

    name: str
    kind: str  # box | cylinder | sphere
    pos: tuple[float, float, float]
    size: tuple[float, ...]
    rgb: tuple[float, float, float]
    yaw: float = 0.0
    collide: bool = True  # False: a marker the robot drives through, for the camera only (VISUAL_GROUP)...
    retroreflective: bool = False  # ...or the lidar too (LIDAR_MARKER_GROUP); the lidar's brightest return
    hide_at_s: float | None = None  # moved under the floor at this episode time (a mocap body)

    @property
    def footprint(self) -> float:
        """Radius of the circle it covers on the floor."""
        return float(np.hypot(*self.size[:2])) if self.kind == "box" else float(self.size[0])


@dataclass(frozen=True)
class Layout:
    half: float  # the arena spans [-half, half] in x and y, inside the walls
    start: tuple[float, float, float]  # robot x, y [m], yaw [rad]
    geoms: tuple[Geom, ...]


def random_obstacle(rng: np.random.Generator, name: str) -> Geom:
    """A box, cylinder or sphere of random size and colour, standing on the floor at x = y = 0."""
    kind = SHAPES[rng.integers(len(SHAPES))]
    rgb = OBSTACLE_COLOURS[rng.integers(len(OBSTACLE_COLOURS))]
    if kind == "box":
        sx, sy, sz = rng.uniform(0.15, 0.4), rng.uniform(0.15, 0.4), rng.uniform(0.2, 0.5)
        return Geom(name, kind, (0.0, 0.0, sz), (sx, sy, sz), rgb, yaw=float(rng.uniform(0.0, np.pi)))
    if kind == "cylinder":
        r, hh = rng.uniform(0.12, 0.3), rng.uniform(0.2, 0.5)
        return Geom(name, kind, (0.0, 0.0, hh), (r, hh), rgb)
    r = rng.uniform(0.2, 0.35)
    return Geom(name, kind, (0.0, 0.0, r), (r,), rgb)


def scatter_obstacles(rng: np.random.Generator, n: int, region: tuple[float, float, float, float],
                      keep_clear: list[tuple[float, float, float]], gap: float = 0.5) -> list[Geom]:
    """Up to n random obstacles inside region (x0, x1, y0, y1), each at least `gap` (room for the
    robot to pass) from the others and from the keep_clear circles (x, y, radius)."""
    x0, x1, y0, y1 = region
    placed: list[Geom] = []
    for i in range(n):
        for _ in range(50):  # rejection sampling; a crowded region gets fewer obstacles
            g = random_obstacle(rng, f"obstacle{i}")
            r = g.footprint
            x, y = float(rng.uniform(x0 + r, x1 - r)), float(rng.uniform(y0 + r, y1 - r))
            taken = keep_clear + [(o.pos[0], o.pos[1], o.footprint) for o in placed]
            if all(np.hypot(x - cx, y - cy) >= r + cr + gap for cx, cy, cr in taken):
                placed.append(dataclasses.replace(g, pos=(x, y, g.pos[2])))
                break
    return placed


def _num(*values: float) -> str:
    return " ".join(f"{float(v):.6g}" for v in values)


def _geom_xml(g: Geom, at_origin: bool = False) -> str:
    pos = (0.0, 0.0, 0.0) if at_origin else g.pos
    attrs = (f'name="{g.name}" type="{g.kind}" pos="{_num(*pos)}" size="{_num(*g.size)}" '
             f'euler="0 0 {_num(g.yaw)}" rgba="{_num(*g.rgb, 1.0)}"')
    if not g.collide:
        group = LIDAR_MARKER_GROUP if g.retroreflective else VISUAL_GROUP
        attrs += f' contype="0" conaffinity="0" group="{group}"'
    if g.retroreflective:
        attrs += ' user="1"'  # sensors.Lidar reads geom user[0]
    return f"<geom {attrs}/>"


def _walls(half: float) -> list[str]:
    t, h = WALL_THICKNESS / 2, WALL_HEIGHT / 2
    out = []
    for i, (x, y, sx, sy) in enumerate(((half + t, 0, t, half + 2 * t), (-half - t, 0, t, half + 2 * t),
                                        (0, half + t, half, t), (0, -half - t, half, t))):
        out.append(f'<geom name="wall{i}" type="box" pos="{_num(x, y, h)}" size="{_num(sx, sy, h)}" '
                   'rgba="0.7 0.7 0.72 1"/>')
    return out


def _cameras(sensors: SensorConfig) -> list[str]:
    pos = CAMERA_POS if sensors.camera_views == 1 else (0.0, 0.0, RIG_HEIGHT)
    out = []
    for i, yaw in enumerate(np.radians(sensors.camera_yaws_deg)):
        c, s = np.cos(yaw), np.sin(yaw)
        # an MJCF camera looks along its -z, with x to the image's right and y up
        out.append(f'<camera name="{camera_name(i)}" pos="{_num(*pos)}" xyaxes="{_num(s, -c, 0, 0, 0, 1)}" '
                   f'fovy="{_num(sensors.camera_view_fovy_deg)}"/>')
    return out


def build_mjcf(layout: Layout, sensors: SensorConfig, physics_dt_s: float) -> str:
    h, w, _ = sensors.camera_image_shape
    world = [_geom_xml(g) for g in layout.geoms if g.hide_at_s is None]
    world += [f'<body name="{g.name}" mocap="true" pos="{_num(*g.pos)}">{_geom_xml(g, at_origin=True)}</body>'
              for g in layout.geoms if g.hide_at_s is not None]
    return f"""<mujoco model="fusion_attn_arena">
  <option timestep="{_num(physics_dt_s)}"/>
  <size nuser_geom="1"/>
  <visual>
    <global offwidth="{max(w, 1)}" offheight="{max(h, 1)}"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
  </visual>
  <asset>
    <texture name="floor" type="2d" builtin="checker" rgb1="0.32 0.32 0.34" rgb2="0.42 0.42 0.44"
             width="64" height="64"/>
    <material name="floor" texture="floor" texrepeat="1 1" texuniform="true"/>
  </asset>
  <worldbody>
    <light directional="true" pos="0 0 5" dir="0.3 0.2 -1" castshadow="false" diffuse="0.5 0.5 0.5"/>
    <geom name="floor" type="plane" size="{_num(layout.half + 1, layout.half + 1, 0.1)}" material="floor"/>
    {chr(10).join("    " + s for s in _walls(layout.half) + world).strip()}
    <body name="robot" pos="0 0 {_num(ROBOT_Z)}">
      <joint name="x" type="slide" axis="1 0 0"/>
      <joint name="y" type="slide" axis="0 1 0"/>
      <joint name="yaw" type="hinge" axis="0 0 1"/>
      <geom name="chassis" type="cylinder" size="{_num(ROBOT_RADIUS, ROBOT_HALF_HEIGHT)}" mass="4"
            rgba="0.2 0.2 0.22 1" priority="1" friction="0.1 0.005 0.0001"/>
      <site name="imu"/>
      <site name="lidar" pos="0 0 {_num(LIDAR_HEIGHT)}"/>
      {chr(10).join("      " + c for c in _cameras(sensors)).strip()}
    </body>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="x" kv="80" forcerange="-30 30"/>
    <velocity name="vy" joint="y" kv="80" forcerange="-30 30"/>
    <velocity name="wz" joint="yaw" kv="1.5" forcerange="-3 3"/>
  </actuator>
  <sensor>
    <accelerometer name="accel" site="imu"/>
    <gyro name="gyro" site="imu"/>
  </sensor>
</mujoco>"""
