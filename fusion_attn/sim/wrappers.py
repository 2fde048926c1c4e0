"""The simulator as a front-end of the core: its frames fused by the same clock, sync and pipeline as
replay's, and the observation a deployed policy gets from policy_node."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..clock import FusionClock, trigger_modality
from ..contract import ObservationLayout, PolicyContract, observation_vector
from ..errors import ConfigError
from ..frames import Modality
from ..params import PARAM_DEFAULTS
from ..pipeline import FusionPipeline
from ..sync import SensorSync, SyncConfig


class FusedObservation(gym.Wrapper):
    """Observation = the newest fused state, as fusion_node would have published it by the end of the
    step: each step's info["frames"] go through a `FusionClock` at `fusion_rate_hz` (the node's default)
    on simulated time (first tick at 0), or on each message of the `trigger` sensor as the node's
    parameter does, and the last snapshot it gave is fused. The vector is
    `contract.observation_vector`: the fused state (D = 64 by default), with_attention the attention
    mass camera, lidar and IMU received (3), with_task the task's own observation (obs["task"],
    tasks.py): what a robot's mission layer would give its policy besides the sensors. The whole
    FusedState is in info["fused"]. A new sync and clock start with every episode.

    pipeline: default `FusionPipeline.create(None, backend="onnxruntime", threads=1)`: the packaged,
    trained model (docs/TRAINING.md). `fusion_terms` is the fusion's side of the policy contract.
    """

    def __init__(self, env: gym.Env, pipeline: FusionPipeline | None = None, sync_config: SyncConfig | None = None,
                 fusion_rate_hz: float = PARAM_DEFAULTS["fusion_rate_hz"], with_attention: bool = False, with_task: bool = False,
                 trigger: str = "timer"):
        super().__init__(env)
        self.pipeline = pipeline or FusionPipeline.create(None, backend="onnxruntime", threads=1)
        rig = getattr(env.unwrapped, "sensors", None)
        if Modality.IMU2 in self.pipeline.cfg.sensors and rig is not None and not rig.imu2_hz:
            raise ConfigError("the fusion model reads a second IMU and the simulated rig has none: make the env with "
                              "sensors=SensorConfig(imu2_hz=...)")
        self.sync_config = sync_config or SyncConfig.for_model(self.pipeline.cfg)
        self.fusion_rate_hz, self.trigger = fusion_rate_hz, trigger
        self._trigger = trigger_modality(trigger)  # a ConfigError now, not at the first reset
        task_dim = env.observation_space["task"].shape[0] if with_task else 0
        cfg = self.pipeline.cfg
        self.layout = ObservationLayout(cfg.model.dim, with_attention, task_dim, len(cfg.sensors), cfg.model.rate_output)
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.layout.size,), np.float32)
        self.clock = self.state = None

    @property
    def fusion_terms(self) -> dict[str, str]:
        """The fusion's side of the policy contract, as it is now (τ may have been set since)."""
        return self.pipeline.fusion_terms(self.sync_config, self.fusion_rate_hz, self.trigger)

    def contract(self, actions, decision_period_s: float) -> PolicyContract:
        """The contract of a policy trained on this observation (actions: the discrete table or None)."""
        table = None if actions is None else tuple((float(v), float(w)) for v, w in actions)
        return PolicyContract(self.fusion_terms, self.pipeline.cfg.model.heads, self.layout, table, decision_period_s)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.clock = FusionClock(SensorSync(self.sync_config), self.fusion_rate_hz, self._trigger, start_ns=0)
        self.state = None
        return self._observe(obs, info), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._observe(obs, info), reward, terminated, truncated, info

    def _observe(self, obs: dict, info: dict) -> np.ndarray:
        ticks = self.clock.step(info["frames"], info["time_ns"])
        if ticks:  # else the newest state stays what it was: no tick fell in this step
            self.state = self.pipeline.fuse(ticks[-1])
        info["fused"] = self.state
        return observation_vector(self.layout, self.state.pooled, self.state.modality_attention,
                                  obs["task"] if self.layout.task_dim else None, self.state.ego_rate)
