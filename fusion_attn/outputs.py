"""What the fusion publishes, as plain data: the fused-state layout and the diagnostics.

The node fills rclpy messages from these and the bag writer fills rosbags messages, so the layout
and the thresholds exist once.

Fused state on the wire: a sensor_msgs/Image, encoding 32FC1, width D, height 1 + M + S, row-major,
little-endian, header = (the fusion's time on the data's clock, frame_id). Standard tools decode it
(`ros2 topic echo`, cv_bridge, `np.frombuffer(msg.data, np.float32).reshape(msg.height, msg.width)`);
`fused_state_layout` states M, H and the S sensors, which the message alone does not:

    row 0             the fused state vector (D)
    rows 1 .. M       the M fusion tokens (latents)
    rows M+1 .. M+S   one row each for the model's sensors, camera, lidar, imu[, odometry][, imu2]: its
                      attention mass (sensor weight) per head in columns 0 .. H-1, the model's trust in it in
                      column H (NaN from a model without a trust output), the rest 0
    row M+S+1         only from a model with an ego_rate output (ModelConfig.rate_output): the fusion's speed
                      [m/s] in column 0 and yaw rate [rad/s] in column 1, the rest 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .frames import MODALITIES, FusedState

OK, WARN, ERROR, STALE = 0, 1, 2, 3  # diagnostic_msgs/DiagnosticStatus levels

# A present sensor whose trust is below this is reported as not trusted: the fusion diagnostics WARN
# naming it, replay counts it in untrusted_share, `fusion-attn fuse` lists it.
TRUST_THRESHOLD = 0.5


def trust_values(state: FusedState) -> np.ndarray:
    """(S,) float32 trust per sensor; NaN from a model without a trust output (0 would read as "failed")."""
    return np.full(len(state.present), np.nan, np.float32) if state.trust is None else np.asarray(state.trust, np.float32)


def untrusted(state: FusedState) -> list[tuple[str, float]]:
    """(modality, trust) of each present sensor trusted below TRUST_THRESHOLD; an absent one has trust 0
    by definition and is reported as absent, not as untrusted."""
    trust = trust_values(state)
    return [(m, float(trust[i])) for i, m in enumerate(state.sensors) if state.present[i] and trust[i] < TRUST_THRESHOLD]


def fused_state_rows(state: FusedState) -> np.ndarray:
    """(1 + M + S [+ 1], D) float32 matrix of the wire layout above."""
    m, d = state.latents.shape
    sensors, heads = state.attention.shape
    rows = np.zeros((1 + m + sensors + (state.ego_rate is not None), d), np.float32)
    rows[0] = state.pooled
    rows[1 : 1 + m] = state.latents
    rows[1 + m : 1 + m + sensors, :heads] = state.attention
    rows[1 + m : 1 + m + sensors, heads] = trust_values(state)
    if state.ego_rate is not None:
        rows[-1, :2] = state.ego_rate
    return rows


def fused_state_layout(dim: int, fusion_tokens: int, heads: int, sensors: tuple[str, ...] = MODALITIES[:3],
                       ego_rate: bool = False) -> dict:
    """The wire layout above as data (the node publishes it as JSON on the latched `fused_state/layout`):
    every dimension, and [start, stop) row and column ranges, so a consumer needs no project code."""
    m, s = fusion_tokens, len(sensors)
    layout = {"encoding": "32FC1", "width": dim, "height": 1 + m + s + ego_rate, "fusion_tokens": m, "heads": heads,
              "sensor_order": list(sensors),
              "rows": {"fused": [0, 1], "latents": [1, 1 + m], "sensors": [1 + m, 1 + m + s]},
              "sensor_columns": {"attention": [0, heads], "trust": [heads, heads + 1]}}
    if ego_rate:
        layout["rows"]["ego_rate"] = [1 + m + s, 2 + m + s]
        layout["ego_rate_columns"] = {"speed_mps": [0, 1], "yaw_rate_radps": [1, 2]}
    return layout


def parse_fused_state_rows(rows: np.ndarray, heads: int, sensors: int = 3, ego_rate: bool = False) -> dict[str, np.ndarray]:
    """The inverse, for consumers: -> {"fused": (D,), "latents": (M, D), "attention": (S, heads),
    "trust": (S,)[, "ego_rate": (2,)]} (trust NaN from a model without a trust output); S `sensors` (the
    layout's sensor_order), ego_rate: the layout has that row."""
    end = len(rows) - ego_rate
    parts = {"fused": rows[0], "latents": rows[1:end - sensors], "attention": rows[end - sensors:end, :heads],
             "trust": rows[end - sensors:end, heads]}
    if ego_rate:
        parts["ego_rate"] = rows[-1, :2]
    return parts


@dataclass(frozen=True)
class Status:
    name: str
    level: int
    message: str
    values: dict[str, str]


def diagnostics(summary: dict[str, dict], state: FusedState | None, backend: dict[str, str],
                processing_ms: float | None, latency_ms: float, fusion_period_s: float,
                configured: tuple[str, ...]) -> list[Status]:
    """Per-sensor status (rate, age, drops, resets, masked) and one for the fusion itself.

    Thresholds are the sensor sync's, from each sensor's own period: WARN while it is late (older than a
    healthy sensor's data gets: stale_after_periods of its periods plus jitter_margin_s) but still fused,
    or it dropped messages since the start; ERROR when it is masked (late, but not before stale_min_s, or
    past its max age, or never seen). With a state, each carries the model's `trust` in it. The fusion is
    ERROR when every sensor is masked or processing takes over the whole fusion period; WARN when a
    present sensor's trust is below TRUST_THRESHOLD (naming it), else when processing takes over half the
    period or the backend fell back.
    backend: FusionPipeline.backend_info(), and from the node its fusion_terms (the policy contract's
    terms: weights digest, τ, sync settings). processing_ms None: not measured (replay leaves wall-clock figures out of its deterministic output).
    """
    out = []
    for name in configured:
        h = summary[name]
        values = {"rate_hz": f"{h['rate_hz']:.2f}", "age_ms": _ms(h["age_s"] * 1e3, 1),
                  "received": str(h["received"]), "dropped": str(h["dropped"]), "resets": str(h.get("resets", 0)),
                  "masked": str(h["masked"]).lower()}
        values.update({f"dropped_{reason}": str(n) for reason, n in sorted(h["drop_reasons"].items())})
        if h.get("last_drop"):  # each drop is logged at most every few seconds: the newest reason is here
            values["last_dropped"] = h["last_drop"]
        if state is not None and name in state.sensors:
            values["trust"] = _trust_text(state, state.sensors.index(name))
        if h["received"] == 0:
            level, message = ERROR, "no data received"
        elif h["masked"]:
            level, message = ERROR, f"stale: no data for {_ms(h['age_s'] * 1e3, 0)} ms, masked"
        elif h["late"]:
            level, message = WARN, f"late: {_ms(h['age_s'] * 1e3, 0)} ms old, period {1e3 / h['rate_hz']:.0f} ms"
        elif h["dropped"]:
            level, message = WARN, f"ok, {h['dropped']} message(s) dropped"
        else:
            level, message = OK, "ok"
        out.append(Status(f"fusion_attn: {name}", level, message, values))

    values = {**backend,  # backend, device, precision, any fallback (+ the node's contract terms)
              "processing_time_ms": "n/a" if processing_ms is None else f"{processing_ms:.2f}",
              "pipeline_latency_ms": _ms(latency_ms, 2)}
    processing_ms = processing_ms or 0.0
    if state is not None:
        values.update({f"tau_{k}": f"{v:g}" for k, v in zip(("global", *state.sensors), state.tau)})
        values.update({f"attention_{m}": f"{a:.4f}" for m, a in zip(state.sensors, state.modality_attention)})
        values.update({f"trust_{m}": _trust_text(state, i) for i, m in enumerate(state.sensors)})
    if state is None:
        level, message = WARN, "no fusion yet"
    elif state.all_masked:
        level, message = ERROR, "all sensors masked"
    elif processing_ms > 1e3 * fusion_period_s:
        level, message = ERROR, f"processing {processing_ms:.1f} ms exceeds the fusion period"
    elif low := untrusted(state):
        level, message = WARN, "not trusting " + ", ".join(f"{m} (trust {t:.2f})" for m, t in low)
    elif processing_ms > 0.5 * 1e3 * fusion_period_s:
        level, message = WARN, f"processing {processing_ms:.1f} ms is over half the fusion period"
    elif "backend_fallback" in backend:
        level, message = WARN, f"running on {backend['backend']}: {backend['backend_fallback']}"
    else:
        level, message = OK, "ok"
    out.append(Status("fusion_attn: fusion", level, message, values))
    return out


def _ms(age_ms: float, decimals: int) -> str:
    """An age as diagnostics show it: never negative (data stamped a little ahead of us, within the sync's
    future tolerance, is clock skew: age 0), n/a when there is none (no data)."""
    return "n/a" if math.isnan(age_ms) else f"{max(age_ms, 0.0):.{decimals}f}"


def _trust_text(state: FusedState, i: int) -> str:
    return "n/a" if state.trust is None else f"{state.trust[i]:.4f}"
