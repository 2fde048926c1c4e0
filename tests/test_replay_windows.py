"""A recording replayed in time windows on several processes writes what one replay of the whole writes."""

import json
from pathlib import Path

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from test_replay import _header_stamps, _restamped, _write_bag

from fusion_attn.cli import main
from fusion_attn.clock import FusionClock
from fusion_attn.errors import ConfigError
from fusion_attn.frames import NS_PER_S, CameraFrame, ImuSample
from fusion_attn.pipeline import FusionPipeline
from fusion_attn.replay import ReplayOptions, replay
from fusion_attn.sync import SensorSync, SyncConfig

PARAMS = {"backend": "onnxruntime", "threads": 1}
OUTPUTS = ("fused/fused.mcap", "summary.json", "attention.png", "trust.png", "health.png", "latency.png")


@pytest.fixture(scope="module")
def pipeline():
    return FusionPipeline.from_params(PARAMS)


def _euroc_copies(real_data, copies: int, gap_s: float = 0.05):
    """The EuRoC recording (2 s, camera and IMU) `copies` times one after the other, stamps moved on."""
    with AnyReader([real_data / "euroc_v1_01_cam_imu"]) as reader:
        rows = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]
    stamps = _header_stamps(rows)
    shift = max(t for _, _, t, _ in rows) - min(t for _, _, t, _ in rows) + int(gap_s * NS_PER_S)
    return [(topic, msgtype, t + k * shift, _restamped(raw, msgtype, s + k * shift) if k else raw, s + k * shift)
            for k in range(copies) for (topic, msgtype, t, raw), s in zip(rows, stamps)]


def _same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_windows_write_what_one_replay_writes_through_drops_and_a_silent_camera(real_data, pipeline, tmp_path):
    """Malformed camera messages and an out-of-limits IMU sample in both windows (their counts add up in
    /diagnostics and the summary), and a camera silent across the second window's start for longer than
    any warm-up (that window is redone from the end of the first): the bytes of one replay."""
    rows = _euroc_copies(real_data, 3)  # about 6 s: the second window starts at about 3 s
    first = rows[0][4]
    faulty, out_of_limits = [], False
    for topic, msgtype, t, raw, stamp in rows:
        at = (stamp - first) / NS_PER_S
        camera = topic == "/cam0/image_raw"
        if camera and 2.2 < at < 3.8:
            continue  # silent across the second window's start
        if camera and (0.5 < at < 0.65 or 4.5 < at < 4.6):
            raw = raw[:100]  # malformed
        if topic == "/imu0" and at > 2.0 and not out_of_limits:
            raw, out_of_limits = _out_of_limits(raw, msgtype), True
        faulty.append((topic, msgtype, t, raw))
    _write_bag(tmp_path / "faulty", faulty)
    opts = ReplayOptions(progress=False, taus=((1.0, 1.0, 1.0, 1.0), (0.2, 1.0, 1.0, 1.0)))
    whole = replay([tmp_path / "faulty"], pipeline, tmp_path / "whole", opts)
    windowed = replay([tmp_path / "faulty"], pipeline, tmp_path / "windows", opts, jobs=2, params=PARAMS)
    _same_outputs(tmp_path / "whole", tmp_path / "windows")
    assert (tmp_path / "whole" / "sweep.csv").read_bytes() == (tmp_path / "windows" / "sweep.csv").read_bytes()
    windows = windowed["timing"]["windows"]
    assert windows["windows"] == 2 and windows["redone"] == 1, windows
    sensors = whole["sensors"]
    assert set(sensors["camera"]["drop_reasons"]) == {"malformed"} and sensors["imu"]["drop_reasons"] == {"out_of_limits": 1}


def _out_of_limits(raw: bytes, msgtype: str) -> bytes:
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    msg = store.deserialize_cdr(raw, msgtype)
    msg.linear_acceleration.x = 1e6  # beyond limits.max_acceleration_mps2
    return bytes(store.serialize_cdr(msg, msgtype))


def test_time_going_back_is_replayed_from_the_window_before(real_data, pipeline, tmp_path):
    """A recording whose time goes back 1.5 s after its start (the same stamps again, off the first fusion
    instants) before the second window's warm-up: that window starts from a state its warm-up cannot know
    and is redone; the outputs are one replay's."""
    rows = _euroc_copies(real_data, 2)
    start = rows[0][2]
    head = [r for r in rows if r[2] - start < 1.5 * NS_PER_S]
    loop = [(topic, msgtype, t + 1_537_000_000, raw) for topic, msgtype, t, raw, _ in rows]
    _write_bag(tmp_path / "looped", [r[:4] for r in head] + loop)
    whole = replay([tmp_path / "looped"], pipeline, tmp_path / "whole", ReplayOptions(progress=False))
    windowed = replay([tmp_path / "looped"], pipeline, tmp_path / "windows", ReplayOptions(progress=False),
                      jobs=2, params=PARAMS)
    _same_outputs(tmp_path / "whole", tmp_path / "windows")
    assert whole["resets"] == 1 and windowed["timing"]["windows"]["redone"] == 1


def test_a_recording_read_without_its_index_is_replayed_whole_and_says_why(real_data, pipeline, tmp_path, capsys):
    folder = tmp_path / "no_metadata"
    _write_bag(folder, [r[:4] for r in _euroc_copies(real_data, 1)])
    (folder / "metadata.yaml").unlink()
    assert main(["replay", str(folder), "-o", str(tmp_path / "out"), "--no-progress", "--jobs", "2"]) == 0
    assert "replayed whole, not in windows: " in capsys.readouterr().out
    timing = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert timing["windows"]["replayed_whole"].endswith("were read directly")
    assert main(["replay", str(folder), "-o", str(tmp_path / "one"), "--no-progress"]) == 0
    _same_outputs(tmp_path / "one", tmp_path / "out")


def test_window_options_are_checked(real_data, pipeline, tmp_path, capsys):
    bag = real_data / "euroc_v1_01_cam_imu"
    with pytest.raises(ConfigError, match="params"):
        replay([bag], pipeline, tmp_path / "a", ReplayOptions(progress=False), jobs=2)
    with pytest.raises(ConfigError, match="attention maps"):
        replay([bag], pipeline, tmp_path / "a", ReplayOptions(progress=False, attention_at_s=(1.0,)), jobs=2,
               params=PARAMS)
    with pytest.raises(ConfigError, match="jobs"):
        replay([bag], pipeline, tmp_path / "a", ReplayOptions(progress=False), jobs=0, params=PARAMS)
    assert main(["replay", str(bag), "-o", str(tmp_path / "b"), "--ray", "auto"]) == 2
    assert "add --each" in capsys.readouterr().err


def _cam(stamp_ns: int) -> CameraFrame:
    return CameraFrame(stamp_ns, "cam", np.full((4, 4, 3), stamp_ns % 251, np.uint8), "rgb8")


def _imu(stamp_ns: int) -> ImuSample:
    return ImuSample(stamp_ns, "imu", np.array([0.0, 0.0, 9.8]), np.array([0.0, 0.0, stamp_ns % 7 * 1e-3]))


def test_a_sync_fed_from_later_reaches_the_same_state_and_ticks_on_the_same_instants():
    """What replay_windows rests on: the sync's state depends on recent frames only (the period's window,
    the IMU history a window can still read), and a clock given the first stamp ticks where one from it would."""
    ms = 1_000_000
    frames = sorted([_cam(i * 50 * ms + 3 * ms) for i in range(80)] + [_imu(i * 5 * ms) for i in range(800)],
                    key=lambda f: f.stamp_ns)
    whole, later = SensorSync(SyncConfig()), SensorSync(SyncConfig())
    clock_whole = FusionClock(whole, 20.0)
    clock_later = FusionClock(later, 20.0, phase_ns=frames[0].stamp_ns)
    ticks_whole = [s.stamp_ns for f in frames for s in clock_whole.add(f)]
    ticks_later = [s.stamp_ns for f in frames if f.stamp_ns >= 1000 * ms for s in clock_later.add(f)]
    assert whole.state_digest() == later.state_digest() and clock_whole.next_tick == clock_later.next_tick
    assert ticks_later and set(ticks_later) <= set(ticks_whole)
    assert whole.health[0].rate_hz == pytest.approx(20.0)
    short = SensorSync(SyncConfig())
    for f in frames[-20:]:  # too little: the camera's period window (11 frames) is not full
        short.add(f)
    assert short.state_digest() != whole.state_digest()
