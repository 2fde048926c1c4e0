"""The policy contract: the fusion a policy was trained on, so that it is never fed features it did not see.

A policy learns on fused states, and those depend on the fusion's weights, its τ and the sync settings
that decide what is fresh. `PolicyContract` records all of it, with the observation layout, the action
table and the decision period; RL training writes it into the agent checkpoint and `rl export` into the
ONNX metadata. A fusion reports its own side as `fusion_terms` (fusion_node in /diagnostics, the
simulator's fused observation as an attribute); `PolicyContract.mismatches` compares the two, and
policy_node and `rl evaluate` refuse to act on any difference.

`observation_vector` is the one function that turns a fused state and the task input into the
policy's observation: the simulator wrapper and policy_node both call it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

CONTRACT_KEY = "fusion_attn.contract"  # in agent metadata and ONNX metadata_props


def fusion_terms(weights_digest: str, sensors: tuple[str, ...], tau, fusion_rate_hz: float, max_age_s,
                 stale_after_periods: float, trigger: str = "timer") -> dict[str, str]:
    """A fusion's side of the contract as name -> text (diagnostic values; names as the node's parameters).
    sensors: the model's (FusionConfig.sensor_names), which τ after the global one and max_age_s follow.
    trigger: when it fuses (timer, or on each message of a sensor): fused states at other instants."""
    terms = {"weights_digest": weights_digest, "fusion_rate_hz": repr(float(fusion_rate_hz)),
             "stale_after_periods": repr(float(stale_after_periods)), "trigger": trigger}
    terms.update({f"tau.{k}": repr(float(v)) for k, v in zip(("global", *sensors), tau, strict=True)})
    terms.update({f"max_age_s.{k}": repr(float(v)) for k, v in zip(sensors, max_age_s, strict=True)})
    return terms


@dataclass(frozen=True)
class ObservationLayout:
    """The policy's observation: the fused state vector (fused_dim), then with `attention` the attention
    mass each of the fusion's sensors received (camera, lidar, IMU[, odometry][, imu2]), then with
    `ego_rate` the fusion's speed and yaw rate (from a model with that output), then the task's own input
    (task_dim)."""

    fused_dim: int
    attention: bool
    task_dim: int
    sensors: int = 3  # the fusion's (FusionConfig.sensors); contracts from before odometry lack it: 3
    ego_rate: bool = False  # contracts from before the ego_rate output lack it

    @property
    def size(self) -> int:
        return self.fused_dim + self.sensors * self.attention + 2 * self.ego_rate + self.task_dim


def observation_vector(layout: ObservationLayout, fused: np.ndarray, modality_attention: np.ndarray,
                       task: np.ndarray | None, ego_rate: np.ndarray | None = None) -> np.ndarray:
    """(layout.size,) float32 from a fused state's vector (fused_dim,), its attention per sensor (S,)
    (mean over heads), the task input (task_dim,) and the fused ego_rate (2,); ConfigError on a width that
    does not fit or a missing part."""
    parts = [np.asarray(fused, np.float32).reshape(-1)]
    if layout.attention:
        parts.append(np.asarray(modality_attention, np.float32).reshape(-1))
    if layout.ego_rate:
        if ego_rate is None:
            raise ConfigError("the policy reads the fusion's ego_rate (speed, yaw rate); this fusion has none")
        parts.append(np.asarray(ego_rate, np.float32).reshape(-1))
    if layout.task_dim:
        if task is None:
            raise ConfigError(f"the policy needs a task input of {layout.task_dim} values, got none")
        parts.append(np.asarray(task, np.float32).reshape(-1))
    vector = np.concatenate(parts)
    if parts[0].size != layout.fused_dim or vector.size != layout.size:
        raise ConfigError(f"observation of {vector.size} values ({parts[0].size} fused), the policy's layout has "
                          f"{layout.size} ({layout.fused_dim} fused, attention {layout.attention}, "
                          f"ego_rate {layout.ego_rate}, task {layout.task_dim})")
    return vector


@dataclass(frozen=True)
class PolicyContract:
    fusion: dict[str, str]  # fusion_terms of the fusion the policy was trained on
    fusion_heads: int  # attention heads in the fused-state message (its attention rows' width)
    observation: ObservationLayout
    actions: tuple[tuple[float, float], ...] | None  # discrete (v [m/s], omega [rad/s]) table; None: Box (v, omega)
    decision_period_s: float

    def mismatches(self, fusion: dict[str, str]) -> list[str]:
        """What differs between the trained-on fusion and `fusion` (its fusion_terms), one line per term."""
        out = []
        for key, want in self.fusion.items():
            got = fusion.get(key)
            if got is None:
                out.append(f"{key}: trained with {want}, the fusion does not report it")
            elif key == "weights_digest":
                if got != want:
                    out.append(f"fusion weights digest {got}, the policy was trained on {want} (the fusion model changed)")
            elif not _close(got, want):
                out.append(f"{key} {got}, the policy was trained with {want}")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PolicyContract:
        try:
            actions = d["actions"]
            return cls(fusion={str(k): str(v) for k, v in d["fusion"].items()}, fusion_heads=int(d["fusion_heads"]),
                       observation=ObservationLayout(**d["observation"]),
                       actions=None if actions is None else tuple((float(v), float(w)) for v, w in actions),
                       decision_period_s=float(d["decision_period_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"policy contract is invalid: {type(exc).__name__}: {exc}") from exc


def _close(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    except ValueError:
        return a == b
