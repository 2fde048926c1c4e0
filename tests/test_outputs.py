"""The fused-state wire layout and the diagnostics, on constructed fused states: trust included."""

import json

import numpy as np
import pytest

from fusion_attn.frames import FusedState
from fusion_attn.messages import TYPES, cdr, fused_state_layout_msg, fused_state_msg
from fusion_attn.outputs import ERROR, OK, TRUST_THRESHOLD, WARN, diagnostics, parse_fused_state_rows

M, D, H = 8, 64, 4


def state(trust=(0.97, 0.0, 0.91), present=(True, False, True), all_masked=False) -> FusedState:
    rng = np.random.default_rng(0)
    attention = np.zeros((3, H), np.float32)
    attention[np.array(present)] = rng.dirichlet(np.ones(sum(present)), H).T.astype(np.float32)
    return FusedState(stamp_ns=5, frame_id="base_link", pooled=rng.standard_normal(D).astype(np.float32),
                      latents=rng.standard_normal((M, D)).astype(np.float32), attention=attention,
                      present=np.array(present), ages_s=np.where(present, 0.01, np.nan).astype(np.float32),
                      tau=np.ones(4, np.float32), all_masked=all_masked,
                      trust=None if trust is None else np.array(trust, np.float32))


def health(masked=False) -> dict:
    return {"received": 10, "dropped": 0, "rate_hz": 20.0, "age_s": 0.01, "masked": masked, "drop_reasons": {}}


def statuses(s: FusedState | None, processing_ms=1.0, configured=("camera", "imu")) -> dict:
    summary = {m: health() for m in ("camera", "lidar", "imu")}
    out = diagnostics(summary, s, {"backend": "onnxruntime"}, processing_ms, 2.0, 0.05, configured)
    return {st.name.removeprefix("fusion_attn: "): st for st in out}


def _wire(s: FusedState) -> dict[str, np.ndarray]:
    """The state through the published message's bytes and back."""
    msg = TYPES.deserialize_cdr(cdr(fused_state_msg(s)), "sensor_msgs/msg/Image")
    return parse_fused_state_rows(msg.data.view("<f4").reshape(msg.height, msg.width), H)


def test_wire_layout_round_trip_carries_trust_after_the_attention_columns():
    s = state()
    parts = _wire(s)
    assert np.array_equal(parts["fused"], s.pooled) and np.array_equal(parts["latents"], s.latents)
    assert np.array_equal(parts["attention"], s.attention)  # columns 0 .. H-1 as before
    assert np.array_equal(parts["trust"], s.trust) and parts["trust"][1] == 0.0  # absent: exactly 0
    rows = fused_state_msg(s).data.view("<f4").reshape(1 + M + 3, D)
    assert np.array_equal(rows[1 + M:, H], s.trust) and not rows[1 + M:, H + 1:].any()


def test_wire_layout_without_a_trust_output_is_nan_not_zero():
    parts = _wire(state(trust=None))
    assert np.isnan(parts["trust"]).all() and np.isfinite(parts["attention"]).all()


def test_diagnostics_carry_trust_per_sensor_and_in_the_fusion_status():
    st = statuses(state())
    assert st["fusion"].level == OK, st["fusion"].message
    assert (st["fusion"].values["trust_camera"], st["fusion"].values["trust_lidar"],
            st["fusion"].values["trust_imu"]) == ("0.9700", "0.0000", "0.9100")
    assert st["camera"].values["trust"] == "0.9700" and st["imu"].values["trust"] == "0.9100"
    none = statuses(state(trust=None))
    assert none["fusion"].values["trust_camera"] == "n/a" and none["camera"].values["trust"] == "n/a"
    assert none["fusion"].level == OK
    before = statuses(None)  # no fusion yet: no trust to report
    assert "trust" not in before["camera"].values and "trust_camera" not in before["fusion"].values


def test_an_untrusted_present_sensor_warns_naming_it():
    st = statuses(state(trust=(0.08, 0.0, 0.91)))["fusion"]
    assert st.level == WARN and st.message == "not trusting camera (trust 0.08)"
    both = statuses(state(trust=(0.08, 0.0, 0.3)))["fusion"]
    assert both.message == "not trusting camera (trust 0.08), imu (trust 0.30)"
    at = statuses(state(trust=(TRUST_THRESHOLD, 0.0, 0.9)))["fusion"]
    assert at.level == OK  # the threshold itself is still trusted


def test_an_absent_sensor_with_zero_trust_does_not_warn():
    st = statuses(state(trust=(0.9, 0.0, 0.0), present=(True, False, False)), configured=("camera", "lidar", "imu"))
    assert st["fusion"].level == OK and st["lidar"].values["trust"] == "0.0000"


@pytest.mark.parametrize(("kwargs", "processing_ms", "message"), [
    ({"trust": (0.0, 0.0, 0.0), "present": (False, False, False), "all_masked": True}, 1.0, "all sensors masked"),
    ({"trust": (0.08, 0.0, 0.9)}, 60.0, "processing 60.0 ms exceeds the fusion period"),
])
def test_error_rules_come_before_the_trust_warning(kwargs, processing_ms, message):
    st = statuses(state(**kwargs), processing_ms)["fusion"]
    assert st.level == ERROR and st.message == message


def test_the_trust_warning_comes_before_the_slow_processing_warning():
    st = statuses(state(trust=(0.08, 0.0, 0.9)), processing_ms=30.0)["fusion"]
    assert st.level == WARN and st.message.startswith("not trusting camera")


def test_diagnostics_ages_are_never_negative_or_nan():
    from fusion_attn.frames import NS_PER_S, ImuSample
    from fusion_attn.sync import SensorSync

    sync = SensorSync()
    sync.add(ImuSample(20 * NS_PER_S + 5676_000_000, "imu", np.zeros(3), np.zeros(3)))  # ahead of the time below
    sync.add(ImuSample(10 * NS_PER_S, "imu", np.zeros(3), np.zeros(3)))  # time went back: reset, counted
    sync.add(ImuSample(20 * NS_PER_S + 300_000_000, "imu", np.zeros(3), np.zeros(3)))  # a little ahead
    out = diagnostics(sync.summary(20 * NS_PER_S), None, {"backend": "onnxruntime"}, None, float("nan"), 0.05,
                      ("camera", "imu"))
    st = {s.name.removeprefix("fusion_attn: "): s for s in out}
    assert st["imu"].values["age_ms"] == "0.0" and st["imu"].values["resets"] == "1"
    assert st["camera"].values["age_ms"] == "n/a" and st["camera"].message == "no data received"
    assert st["fusion"].values["pipeline_latency_ms"] == "n/a"
    ahead = diagnostics(sync.summary(20 * NS_PER_S), None, {}, 1.0, -300.0, 0.05, ("imu",))
    assert ahead[-1].values["pipeline_latency_ms"] == "0.00"
    for s in out + ahead:
        text = " ".join([s.message, *s.values.values()])
        assert "nan" not in text and "-" not in text.replace("n/a", ""), (s.name, text)


def test_the_layout_message_states_every_dimension_and_where_each_part_is():
    """fused_state/layout's JSON alone locates every part of the message (no project code, no assumed M or H)."""
    s = state()
    msg = TYPES.deserialize_cdr(cdr(fused_state_msg(s)), "sensor_msgs/msg/Image")
    layout = json.loads(fused_state_layout_msg(D, M, H).data)
    assert (layout["width"], layout["height"], layout["encoding"]) == (msg.width, msg.height, msg.encoding)
    assert (layout["fusion_tokens"], layout["heads"], layout["sensor_order"]) == (M, H, ["camera", "lidar", "imu"])
    rows, columns = msg.data.view("<f4").reshape(msg.height, msg.width), layout["sensor_columns"]
    sensors = rows[slice(*layout["rows"]["sensors"])]
    assert np.array_equal(rows[slice(*layout["rows"]["fused"])][0], s.pooled)
    assert np.array_equal(rows[slice(*layout["rows"]["latents"])], s.latents)
    assert np.array_equal(sensors[:, slice(*columns["attention"])], s.attention)
    assert np.array_equal(sensors[:, slice(*columns["trust"])][:, 0], s.trust)
