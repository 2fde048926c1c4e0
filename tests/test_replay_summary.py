"""The replay summary and plots from constructed traces: trust per modality, per τ, and trust.png."""

import dataclasses
import json
from types import SimpleNamespace

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from fusion_attn.plots import replay_plots
from fusion_attn.replay import OUTPUTS, Recording, ReplayOptions, StampRate, _summary, _Trace
from fusion_attn.sync import SensorSync, SyncConfig

TAUS = np.array([[1, 1, 1, 1], [0.2, 1, 1, 1]], np.float32)
# 4 fusions; camera present throughout and failing in the last two (and worse at the second τ),
# lidar never present, imu present in the first three
PRESENT = [(True, False, True), (True, False, True), (True, False, True), (True, False, False)]
TRUST = [[(0.9, 0.0, 0.8), (0.9, 0.0, 0.8)],
         [(0.7, 0.0, 0.8), (0.6, 0.0, 0.8)],
         [(0.3, 0.0, 0.4), (0.2, 0.0, 0.4)],
         [(0.1, 0.0, 0.0), (0.1, 0.0, 0.0)]]


def trace(trust=TRUST) -> _Trace:
    n = len(PRESENT)
    return _Trace(stamps=[i * 50_000_000 for i in range(n)], attention=[np.full((2, 3), 1 / 3)] * n,
                  trust=[np.array(t, np.float32) for t in trust], present=[np.array(p) for p in PRESENT],
                  ages=[np.where(p, 0.01, np.nan) for p in PRESENT], latency_ms=[1.0] * n)


def summary(t: _Trace) -> dict:
    rec = Recording(topics=SimpleNamespace(sensors={}, skipped={}), configured=("camera", "imu"))
    out = _summary(["x.mcap"], rec, t, TAUS, SensorSync(SyncConfig()), ReplayOptions(progress=False))
    return json.loads(json.dumps(out))  # as summary.json holds it


def test_summary_has_trust_mean_and_untrusted_share_at_the_first_tau_and_per_sweep_tau():
    s = summary(trace())
    assert s["trust_mean"] == pytest.approx({"camera": 0.5, "lidar": None, "imu": (0.8 + 0.8 + 0.4) / 3})
    assert s["untrusted_share"] == {"camera": 0.5, "lidar": 0.0, "imu": 0.25}  # of all 4 fusions
    first, second = s["tau_sweep"]
    assert first["trust_mean"] == s["trust_mean"] and first["untrusted_share"] == s["untrusted_share"]
    assert second["trust_mean"]["camera"] == pytest.approx(0.45) and second["untrusted_share"]["camera"] == 0.5
    assert set(first) == {"tau", "attention_mean", "trust_mean", "untrusted_share"}


def test_a_model_without_trust_output_gives_no_trust_figures_rather_than_zeros():
    s = summary(trace(trust=[np.full((2, 3), np.nan)] * len(PRESENT)))
    assert s["trust_mean"] == s["untrusted_share"] == {"camera": None, "lidar": None, "imu": None}


def test_trust_plot_is_written_and_is_a_replay_output(tmp_path):
    replay_plots(tmp_path, trace(), ("camera", "imu"), TAUS)
    assert (tmp_path / "trust.png").stat().st_size > 5000 and "trust.png" in OUTPUTS


def test_a_fusion_long_mask_shows_in_the_health_plot(tmp_path):
    n = 1200  # 60 s at 20 Hz; the camera masked at 4 fusions (0.2 s) around 30 s, the IMU never
    masked = np.zeros((n, 2), bool)
    masked[602:606, 0] = True
    long = _Trace(stamps=[i * 50_000_000 for i in range(n)], attention=[np.full((1, 3), 1 / 3)] * n,
                  trust=[np.full((1, 3), 0.9, np.float32)] * n, present=[np.array([True, False, True])] * n,
                  ages=[np.array([0.01, np.nan, 0.01])] * n, latency_ms=[1.0] * n, masked=list(masked))
    pngs = []
    for name, trace in (("with", long), ("without", dataclasses.replace(long, masked=[np.zeros(2, bool)] * n))):
        (tmp_path / name).mkdir()
        replay_plots(tmp_path / name, trace, ("camera", "imu"), TAUS[:1])
        pngs.append(plt.imread(tmp_path / name / "health.png")[..., :3])
    changed = np.argwhere(np.any(pngs[0] != pngs[1], axis=-1))
    assert len(changed), "the mask is not drawn"
    blue = np.array(matplotlib.colors.to_rgb("tab:blue"))  # the camera's colour
    assert np.abs(pngs[0][tuple(changed.T)] - blue).sum(axis=-1).min() < 0.05
    assert np.ptp(changed[:, 1]) < 10  # one narrow mark, about 30 s in


def test_stamp_rate_is_over_the_recording_and_time_going_back_adds_nothing():
    rate = StampRate()
    for t_ms in (0, 10, 20, 5, 30, 40, 0, 10, 20, 30, 40, 50):  # a stray old stamp, then a loop
        rate.add(t_ms * 1_000_000)
    assert rate.hz == pytest.approx(5 / 0.05)  # 5 steps forward over 50 ms
    assert StampRate().hz == 0.0
    rate = StampRate()
    for t_ms in (0, 100, 200, 3_600_200, 3_600_300):  # 10 Hz, an hour's jump (a gap), 10 Hz
        rate.add(t_ms * 1_000_000)
    assert rate.hz == pytest.approx(10.0)  # the gap is no time of the sensor's
