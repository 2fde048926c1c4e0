"""The tasks: an episode's arena, the task part of the observation, the reward and success.

Every episode ends with `truncated` once `episode_s` of simulated time has passed. Poses are
(x, y, yaw) in the arena (world) frame; T is episode_s, t the episode time.

FusionAttn/Memory-v0 (`MemoryTask`, 6 x 6 m, T = 10 s): a delayed choice of where to go
    The robot starts in the middle, facing three goal zones 2 m ahead: floor patches, red 30° to its
    left, green straight ahead, blue 30° to its right (`n_goals=2`: left and right). A pillar stands in
    one of them, the cue: the camera and the lidar both see it. The robot is held still while the cue
    shows (`cue_s`, 1 s) and for a delay after it has sunk into the floor (`delay_s`, 1 s); then it is
    free. The zones look alike but for their colour, so without memory a policy can only guess.
    Reward: +1 for entering the cued zone (success), 0 for another zone; either ends the episode.
    Shaping: 0.3 per metre of approach to the nearest zone (the same for every zone, so it says
    nothing about which), and -0.5/T per second.
    obs["task"] = (x, y, cos yaw, sin yaw, t/T): odometry and the clock, no hint of the cue.

FusionAttn/Navigate-v0 (`NavigateTask`, 10 x 10 m, 14 obstacles, T = 40 s)
    Reach a target on the far side of a cluttered arena. By default the camera blacks out once per
    episode, for 5-10 s starting 2-6 s in (the `camera_blackout` fault; override with `faults=`).
FusionAttn/Control-v0 (`ControlTask`, 6 x 6 m, 3 obstacles, T = 15 s)
    Reach a target at least 1.5 m away: the sanity check, nothing needs remembering.
    Both: reward = progress towards the target [m] per step - 0.2/T per second, and +10 for coming
    within 0.4 m of it (success; the episode ends). The target is a green floor patch with a slim green
    retroreflective post at its centre that the robot drives through: the camera sees both, the lidar
    the post (at full intensity), while obstacle ground truth ignores it.
    obs["task"] = (target x, target y in the robot frame [m], distance [m], t/T).

`info` gets "is_success" (bool) from every task; Memory adds "cue" and "reached" (colour names).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .faults import FaultConfig, FaultSpec
from .scene import RIG_HEIGHT, ROBOT_Z, TASK_COLOURS, Geom, Layout, scatter_obstacles
from .sensors import SensorConfig

PATCH_HALF_HEIGHT = 0.003  # floor patches: flat discs, seen by the camera only
# Goal posts: the lidar's beams lie 2° apart, so a post of radius 8 m x sin(1°) = 0.14 m meets one of
# them anywhere within its 8 m range (a 5 cm pole would slip between beams beyond 2.9 m). 2 m tall, it
# stands over every obstacle (at most 1 m), so the camera sees its top across a cluttered arena, and
# both lidar rings meet it (from 0.32 m up, the 3° ring climbs 0.42 m over its range).
POST_RADIUS = 0.15
POST_HALF_HEIGHT = 1.0


def post_top_in_image(sensors: SensorConfig, bearing_rad: np.ndarray, distance_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the goal post's top edge (its rim nearest the camera) shows in the rig's panorama, from the
    goal's bearing and distance to the post's axis: shares of the image's width and height
    (SensorConfig.image_x, image_y; a height below 0: above the view)."""
    if sensors.camera_views == 1:
        raise ValueError("post_top_in_image reads the rig's panorama (camera_views > 1), whose views share the robot's centre")
    top = 2 * POST_HALF_HEIGHT - ROBOT_Z - RIG_HEIGHT
    return sensors.image_x(bearing_rad), sensors.image_y(bearing_rad, np.asarray(distance_m) - POST_RADIUS, top)


def _patch(name: str, x: float, y: float, radius: float, rgb: tuple[float, float, float]) -> Geom:
    return Geom(name, "cylinder", (x, y, PATCH_HALF_HEIGHT), (radius, PATCH_HALF_HEIGHT), rgb, collide=False)


def _post(name: str, x: float, y: float, rgb: tuple[float, float, float]) -> Geom:
    """A goal marker for camera and lidar alike: a slim retroreflective post the robot drives through."""
    return Geom(name, "cylinder", (x, y, POST_HALF_HEIGHT), (POST_RADIUS, POST_HALF_HEIGHT), rgb,
                collide=False, retroreflective=True)


class Task(ABC):
    """One kind of episode. An instance keeps the current episode's state: one instance per env."""

    episode_s: float
    obs_dim: int
    hold_s: float = 0.0  # the robot is held still (drive commands ignored) until this episode time

    def default_faults(self) -> FaultConfig:
        return FaultConfig()

    @abstractmethod
    def new_episode(self, rng: np.random.Generator) -> Layout:
        """Draw the next episode's world and reset the task's state."""

    @abstractmethod
    def observe(self, pose: np.ndarray, t_s: float) -> np.ndarray:
        """The task part of the observation: float32 (obs_dim,)."""

    @abstractmethod
    def evaluate(self, pose: np.ndarray, t_s: float) -> tuple[float, bool, dict]:
        """After a control step: (reward, terminated, info)."""

    def goal(self) -> tuple[float, float] | None:
        """The episode's goal (x, y) in the arena frame (ground truth for training and evaluation); None
        for a task without one."""
        return None


# the memory task's goal bearings from the start heading, left positive (REP-103)
MEMORY_BEARINGS_DEG = {2: (30.0, -30.0), 3: (30.0, 0.0, -30.0)}


class MemoryTask(Task):
    half = 3.0
    goal_radius = 0.45
    goal_distance = 2.0  # 30° apart at 2 m, the zones are 1.04 m apart: they do not touch
    heading = np.pi  # the start heading (facing -x)
    progress_reward = 0.3  # per metre of approach to the nearest zone
    obs_dim = 5

    def __init__(self, n_goals: int = 3, cue_s: float = 1.0, delay_s: float = 1.0, episode_s: float = 10.0):
        if n_goals not in MEMORY_BEARINGS_DEG:
            raise ValueError(f"n_goals must be 2 or 3, got {n_goals}")
        self.n_goals, self.cue_s, self.episode_s = n_goals, cue_s, episode_s
        self.hold_s = cue_s + delay_s
        self.goal_colours = list(TASK_COLOURS)[: self.n_goals]
        angles = self.heading + np.radians(MEMORY_BEARINGS_DEG[n_goals])
        self.goals = [(float(self.goal_distance * np.cos(a)), float(self.goal_distance * np.sin(a))) for a in angles]
        self._prev = (0.0, 0.0)  # (time, distance to the nearest zone) after the previous step

    def new_episode(self, rng: np.random.Generator) -> Layout:
        cued = int(rng.integers(self.n_goals))
        self.cue = self.goal_colours[cued]
        start = (0.0, float(rng.uniform(-0.1, 0.1)), float(self.heading + rng.uniform(-0.1, 0.1)))
        self._prev = (0.0, self._nearest(start))
        geoms = [Geom("cue", "cylinder", (*self.goals[cued], 0.4), (0.15, 0.4), TASK_COLOURS[self.cue],
                      hide_at_s=self.cue_s)]
        geoms += [_patch(f"goal{i}", x, y, self.goal_radius, TASK_COLOURS[colour])
                  for i, ((x, y), colour) in enumerate(zip(self.goals, self.goal_colours))]
        return Layout(self.half, start, tuple(geoms))

    def _nearest(self, pose) -> float:
        return min(float(np.hypot(pose[0] - x, pose[1] - y)) for x, y in self.goals)

    def observe(self, pose: np.ndarray, t_s: float) -> np.ndarray:
        x, y, yaw = pose
        return np.array([x, y, np.cos(yaw), np.sin(yaw), t_s / self.episode_s], np.float32)

    def evaluate(self, pose: np.ndarray, t_s: float) -> tuple[float, bool, dict]:
        prev_t, prev_dist = self._prev
        dist = self._nearest(pose)
        self._prev = (t_s, dist)
        reward = self.progress_reward * (prev_dist - dist) - 0.5 * (t_s - prev_t) / self.episode_s
        reached = next((c for (x, y), c in zip(self.goals, self.goal_colours)
                        if np.hypot(pose[0] - x, pose[1] - y) < self.goal_radius), None)
        if reached == self.cue:
            reward += 1.0
        info = {"is_success": reached == self.cue, "cue": self.cue, "reached": reached}
        return float(reward), reached is not None, info

    def goal(self) -> tuple[float, float]:
        return self.goals[self.goal_colours.index(self.cue)]


class ReachTask(Task):
    """Drive to a target whose position, relative to the robot, is part of the observation."""

    success_radius = 0.4
    success_bonus = 10.0
    obs_dim = 4

    def __init__(self, half: float, obstacles: int, episode_s: float):
        self.half, self.obstacles, self.episode_s = half, obstacles, episode_s
        self.target = (0.0, 0.0)
        self._prev = (0.0, 0.0)  # (time, distance) after the previous step

    @abstractmethod
    def endpoints(self, rng: np.random.Generator) -> tuple[tuple[float, float, float], tuple[float, float]]:
        """-> the start pose (x, y, yaw) and the target (x, y)."""

    def new_episode(self, rng: np.random.Generator) -> Layout:
        start, self.target = self.endpoints(rng)
        self._prev = (0.0, float(np.hypot(self.target[0] - start[0], self.target[1] - start[1])))
        clear = [(start[0], start[1], 0.5), (*self.target, self.success_radius + 0.2)]
        h = self.half
        geoms = [_patch("target", *self.target, self.success_radius, TASK_COLOURS["green"]),
                 _post("target_post", *self.target, TASK_COLOURS["green"])]
        geoms += scatter_obstacles(rng, self.obstacles, (-h, h, -h, h), clear)
        return Layout(h, start, tuple(geoms))

    def observe(self, pose: np.ndarray, t_s: float) -> np.ndarray:
        x, y, yaw = pose
        dx, dy = self.target[0] - x, self.target[1] - y
        c, s = np.cos(yaw), np.sin(yaw)
        ahead, left = c * dx + s * dy, -s * dx + c * dy
        return np.array([ahead, left, np.hypot(dx, dy), t_s / self.episode_s], np.float32)

    def evaluate(self, pose: np.ndarray, t_s: float) -> tuple[float, bool, dict]:
        dist = float(np.hypot(self.target[0] - pose[0], self.target[1] - pose[1]))
        prev_t, prev_dist = self._prev
        self._prev = (t_s, dist)
        reward = prev_dist - dist - 0.2 * (t_s - prev_t) / self.episode_s
        done = dist < self.success_radius
        return reward + (self.success_bonus if done else 0.0), done, {"is_success": done}

    def goal(self) -> tuple[float, float]:
        return self.target


class NavigateTask(ReachTask):
    def __init__(self, episode_s: float = 40.0, obstacles: int = 14):
        super().__init__(half=5.0, obstacles=obstacles, episode_s=episode_s)

    def default_faults(self) -> FaultConfig:
        return FaultConfig(camera_blackout=FaultSpec(prob=1.0, start_s=(2.0, 6.0), duration_s=(5.0, 10.0)))

    def endpoints(self, rng: np.random.Generator) -> tuple[tuple[float, float, float], tuple[float, float]]:
        e = self.half - 0.8
        start = rng.uniform(-e, -e + 1.0), rng.uniform(-e, e), rng.uniform(-np.pi, np.pi)
        target = rng.uniform(e - 1.0, e), rng.uniform(-e, e)
        return tuple(map(float, start)), tuple(map(float, target))


class ControlTask(ReachTask):
    def __init__(self, episode_s: float = 15.0, obstacles: int = 3):
        super().__init__(half=3.0, obstacles=obstacles, episode_s=episode_s)

    def endpoints(self, rng: np.random.Generator) -> tuple[tuple[float, float, float], tuple[float, float]]:
        e = self.half - 0.6
        start = (float(rng.uniform(-e, e)), float(rng.uniform(-e, e)), float(rng.uniform(-np.pi, np.pi)))
        while True:  # a target at least 1.5 m away: at most a few draws
            target = (float(rng.uniform(-e, e)), float(rng.uniform(-e, e)))
            if np.hypot(target[0] - start[0], target[1] - start[1]) >= 1.5:
                return start, target


TASKS: dict[str, type[Task]] = {"memory": MemoryTask, "navigate": NavigateTask, "control": ControlTask}
