"""The simulator as a front-end of the core: its frames fused by the same sync and pipeline as the node's."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from fusion_attn.pipeline import FusionPipeline
from fusion_attn.sync import SensorSync, SyncConfig


class FusedObservation(gym.Wrapper):
    """Observation = the fused state: each step's info["frames"] go into a SensorSync, and the
    observation is `pipeline.fuse(sync.snapshot(info["time_ns"])).pooled`, float32 (D,) (D = 64 by
    default), followed with_attention by the attention mass camera, lidar and IMU received (3,), and
    with_task by the task's own observation (obs["task"], tasks.py): what a robot's mission layer
    would give its policy besides the sensors. The whole FusedState is in info["fused"]. A new
    SensorSync starts with every episode.

    pipeline: default `FusionPipeline.create(None, backend="onnxruntime", threads=1)`: the packaged,
    trained model (docs/TRAINING.md).
    """

    def __init__(self, env: gym.Env, pipeline: FusionPipeline | None = None,
                 sync_config: SyncConfig | None = None, with_attention: bool = False, with_task: bool = False):
        super().__init__(env)
        self.pipeline = pipeline or FusionPipeline.create(None, backend="onnxruntime", threads=1)
        self.sync_config = sync_config or SyncConfig(imu_window_s=self.pipeline.cfg.imu.window_s)
        self.with_attention, self.with_task = with_attention, with_task
        task_dim = env.observation_space["task"].shape[0] if with_task else 0
        dim = self.pipeline.cfg.model.dim + (3 if with_attention else 0) + task_dim
        self.observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.sync = SensorSync(self.sync_config)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.sync = SensorSync(self.sync_config)
        return self._fuse(obs, info), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._fuse(obs, info), reward, terminated, truncated, info

    def _fuse(self, obs: dict, info: dict) -> np.ndarray:
        for frame in info["frames"]:
            self.sync.add(frame)
        state = self.pipeline.fuse(self.sync.snapshot(info["time_ns"]))
        info["fused"] = state
        parts = [state.pooled] + [state.modality_attention] * self.with_attention + [obs["task"]] * self.with_task
        return np.concatenate(parts).astype(np.float32)
