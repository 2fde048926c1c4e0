"""The fused-state wire layout and the diagnostics, on constructed fused states: trust included."""

import dataclasses
import json

import numpy as np
import pytest

from fusion_attn.frames import NS_PER_S, CameraFrame, FusedState, ImuSample, LidarFrame
from fusion_attn.messages import TYPES, cdr, fused_state_layout_msg, fused_state_msg
from fusion_attn.outputs import ERROR, OK, TRUST_THRESHOLD, WARN, diagnostics, parse_fused_state_rows
from fusion_attn.sync import RATE_MEMORY, SensorSync

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
    return {"received": 10, "dropped": 0, "rate_hz": 20.0, "age_s": 0.01, "masked": masked, "late": False,
            "drop_reasons": {}}


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



def test_a_models_ego_rate_rides_in_a_last_row_its_layout_names():
    """From a model with an ego_rate output (ModelConfig.rate_output): one more row, speed and yaw rate in
    its first two columns; the layout locates it, the parser returns it, the other parts stay where they were."""
    s = dataclasses.replace(state(), ego_rate=np.array([0.42, -0.17], np.float32))
    msg = TYPES.deserialize_cdr(cdr(fused_state_msg(s)), "sensor_msgs/msg/Image")
    rows = msg.data.view("<f4").reshape(msg.height, msg.width)
    layout = json.loads(fused_state_layout_msg(D, M, H, ego_rate=True).data)
    assert layout["height"] == msg.height == 1 + M + 3 + 1
    ego = rows[slice(*layout["rows"]["ego_rate"])][0]
    assert ego[slice(*layout["ego_rate_columns"]["speed_mps"])] == np.float32(0.42)
    assert ego[slice(*layout["ego_rate_columns"]["yaw_rate_radps"])] == np.float32(-0.17) and not ego[2:].any()
    parts = parse_fused_state_rows(rows, H, ego_rate=True)
    assert np.array_equal(parts["ego_rate"], s.ego_rate) and np.array_equal(parts["latents"], s.latents)
    assert np.array_equal(parts["attention"], s.attention) and np.array_equal(parts["trust"], s.trust)
    assert "ego_rate" not in json.loads(fused_state_layout_msg(D, M, H).data)["rows"]


SENSORS = ("camera", "lidar", "imu")
FRAMES = {"camera": lambda t: CameraFrame(t, "cam", np.zeros((4, 4, 3), np.uint8), "rgb8"),
          "lidar": lambda t: LidarFrame(t, "lidar", np.ones((8, 4), np.float32)),
          "imu": lambda t: ImuSample(t, "imu", np.array([0.0, 0.0, 9.8]), np.zeros(3))}


def _healthy_stream(hz: float, seconds: float, max_gap_periods: float, max_delay_s: float, rng) -> tuple:
    """(stamps, arrivals) ns of a healthy sensor: each stamp up to (max_gap_periods - 1) periods behind its
    slot on the nominal grid (as a driver or a busy publisher is late, never early), so gaps reach
    max_gap_periods, and every 7th time exactly; each delivered up to max_delay_s after its stamp (those
    longest gaps with the longest delay), in order."""
    n = int(seconds * hz)
    behind = rng.uniform(0.0, max_gap_periods - 1.0, n)
    behind[::7], behind[1::7] = 0.0, max_gap_periods - 1.0
    delay = rng.uniform(0.0, max_delay_s, n)
    delay[1::7] = max_delay_s
    stamps = NS_PER_S + ((np.arange(n) + behind) * NS_PER_S / hz).astype(np.int64)
    return stamps, np.maximum.accumulate(stamps + (delay * NS_PER_S).astype(np.int64))


def _sensor_statuses(sync: SensorSync, now_ns: int) -> dict:
    out = diagnostics(sync.summary(now_ns), None, {"backend": "onnxruntime"}, None, float("nan"), 0.05, SENSORS)
    return {s.name.removeprefix("fusion_attn: "): s for s in out}


# Healthy sensors: rate, longest publish gap [periods], longest delivery delay [s]. Each next message is at most
# overdue by max(half a period, jitter_margin_s 25 ms), less the error of the measured period.
HEALTHY = {"camera": (30.0, 1.35, 0.010),  # gaps up to 45 ms, as the camera of the node benchmark
           "lidar": (10.0, 1.25, 0.015), "imu": (200.0, 1.5, 0.020)}


def test_healthy_jittered_sensors_are_never_late_nor_masked_and_a_stopped_one_is():
    """A 30 Hz camera, a 10 Hz lidar and a 200 Hz IMU with publish gaps up to 1.25-1.5 periods and delivery
    delays up to 10-20 ms, fed in arrival order for 20 s: judged just before every arrival (where a sensor's
    data is oldest) once their periods are measured, each is OK and fused. Then all stop: the camera is masked
    at max(1.5 periods, 1 period + jitter_margin_s), the IMU is late 25 ms after its next sample was due,
    masked after stale_min_s."""
    rng = np.random.default_rng(0)
    arrivals = []
    for name, (hz, max_gap_periods, max_delay_s) in HEALTHY.items():
        stamps, arrived = _healthy_stream(hz, 20.0, max_gap_periods, max_delay_s, rng)
        arrivals += [(int(a), name, int(s)) for s, a in zip(stamps, arrived)]
    arrivals.sort()
    sync, judged = SensorSync(), 0
    for arrival_ns, name, stamp_ns in arrivals:
        if all(sync.health[m].received > RATE_MEMORY for m in sync.cfg.sensors):
            statuses = _sensor_statuses(sync, arrival_ns - 1)
            assert all(statuses[n].level == OK for n in SENSORS), (arrival_ns, [statuses[n] for n in SENSORS])
            judged += 1
        assert sync.add(FRAMES[name](stamp_ns), arrival_ns) is None
    assert judged > 0.9 * len(arrivals)

    last = {n: max(s for _, m, s in arrivals if m == n) for n in SENSORS}
    assert _sensor_statuses(sync, last["camera"] + 55_000_000)["camera"].level == OK
    camera = _sensor_statuses(sync, last["camera"] + 62_000_000)["camera"]  # 33.3 + 25 ms, measured period +-5 %
    assert camera.level == ERROR and camera.message.startswith("stale"), camera
    imu_late = _sensor_statuses(sync, last["imu"] + 40_000_000)["imu"]
    assert imu_late.level == WARN and imu_late.message.startswith("late"), imu_late
    assert _sensor_statuses(sync, last["imu"] + 51_000_000)["imu"].level == ERROR
