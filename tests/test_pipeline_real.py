"""The whole core on real recordings: bag -> adapters -> sync -> tokenizers -> model (ONNX Runtime and torch)."""

import numpy as np
import pytest

from fusion_attn.bag import find_topics, open_reader, read_messages
from fusion_attn.errors import BagError
from fusion_attn.frames import NS_PER_S, Modality
from fusion_attn.pipeline import FusionPipeline, create_backend, load_model
from fusion_attn.sync import SensorSync, SyncConfig


@pytest.fixture(scope="module")
def pipelines():
    model, _ = load_model(None)
    from fusion_attn.pipeline import onnx_for

    path = onnx_for(model)  # the run's shared cache (conftest)
    return {name: FusionPipeline(model.cfg, create_backend(name, model, onnx_path=path)) for name in ("onnxruntime", "torch")}


def _fuse_bag(pipeline, bag, every_s=0.1, sync_cfg=None, topics=None):
    """Feed a whole bag, fusing every `every_s` of recorded time; -> list of FusedState."""
    sync = SensorSync(sync_cfg or SyncConfig())
    states, next_ns = [], None
    with open_reader([bag]) as reader:
        found = find_topics(reader, topics)
        for msg in read_messages(reader, found):
            assert msg.frame is not None, msg.error
            sync.add(msg.frame)
            now = sync.newest_stamp_ns()
            next_ns = next_ns or now
            if now >= next_ns:
                states.append(pipeline.fuse(sync.snapshot(now)))
                next_ns = now + int(every_s * NS_PER_S)
    states.append(pipeline.fuse(sync.snapshot(sync.newest_stamp_ns())))  # and once at the end
    return states, sync


def _check(states, present):
    assert states
    for s in states:
        assert np.isfinite(s.pooled).all() and np.isfinite(s.latents).all() and np.isfinite(s.attention).all()
        for m in range(len(s.present)):  # the model's sensors
            if s.present[m]:
                assert s.attention[m].min() > 0.0
            else:
                assert np.all(s.attention[m] == 0.0)
        if s.present.any():
            np.testing.assert_allclose(s.attention.sum(0), 1.0, atol=1e-5)
    seen = np.array([s.present for s in states]).any(0)
    assert seen.tolist() == present


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_euroc_camera_and_imu(real_data, pipelines, backend):
    states, sync = _fuse_bag(pipelines[backend], real_data / "euroc_v1_01_cam_imu")
    _check(states, [True, False, True])
    assert sync.health[Modality.CAMERA].received == 40 and sync.health[Modality.IMU].received == 401
    assert abs(sync.health[Modality.IMU].rate_hz - 200) < 5
    late = [s for s in states if s.stamp_ns - states[0].stamp_ns > 0.3 * NS_PER_S]
    assert all(s.present[Modality.CAMERA] and s.present[Modality.IMU] for s in late)


def test_backends_agree_on_real_data(real_data, pipelines):
    a, _ = _fuse_bag(pipelines["onnxruntime"], real_data / "euroc_v1_01_cam_imu", every_s=0.5)
    b, _ = _fuse_bag(pipelines["torch"], real_data / "euroc_v1_01_cam_imu", every_s=0.5)
    for sa, sb in zip(a, b, strict=True):
        assert np.abs(sa.pooled - sb.pooled).max() <= 1e-4
        assert np.abs(sa.latents - sb.latents).max() <= 1e-4
        assert np.abs(sa.attention - sb.attention).max() <= 1e-4


def test_real_lidar_and_camera_frame(real_data, pipelines):
    states, _ = _fuse_bag(pipelines["onnxruntime"], real_data / "lidar_camera_frame")
    _check(states, [True, True, False])
    assert states[-1].present.tolist() == [True, True, False]


@pytest.mark.parametrize("topic", ["/sick_lms_1xx/scan", "/cloud"])
def test_sick_laserscan_or_pointcloud_only(real_data, pipelines, topic):
    states, sync = _fuse_bag(pipelines["onnxruntime"], real_data / "sick_lms1xx_scan_cloud_radar.bag",
                             topics={Modality.LIDAR: topic})
    _check(states, [False, True, False])
    assert sync.health[Modality.LIDAR].received == 89


def test_the_lidar_is_the_cloud_with_the_most_points_not_the_busiest(real_data):
    # the radar's raw targets (8 points) come 139 times, the scanner's sweeps (541 points) 89 times
    with open_reader([real_data / "sick_lms1xx_scan_cloud_radar.bag"]) as reader:
        topics = find_topics(reader)
    assert topics.sensors == {Modality.LIDAR: "/cloud"}
    assert topics.skipped["/cloud_radar_rawtarget"] == (
        "another lidar topic (1,112 points: 139 messages of 8): /cloud is busier (48,149 points: 89 messages "
        "of 541); choose this one with --lidar-topic /cloud_radar_rawtarget")
    assert "89 messages of 462" in topics.skipped["/sick_lms_1xx/scan"]  # the beams within its range limits


def test_the_lidar_is_chosen_by_points_in_a_bag_read_record_by_record(real_data, tmp_path):
    src = real_data / "sick_lms1xx_scan_cloud_radar.bag"
    cut = tmp_path / "cut.bag"
    cut.write_bytes(src.read_bytes()[: int(src.stat().st_size * 0.6)])  # its index, at the end, lost
    with open_reader([cut]) as reader:
        notes = list(reader.notes)
        assert find_topics(reader).sensors == {Modality.LIDAR: "/cloud"}
        assert reader.notes == notes  # the look at the first sweeps leaves the reading's notes to the reading


def test_husky_imu_only_ros1_bag(real_data, pipelines):
    with open_reader([real_data / "husky_imu_odom_gps.bag"]) as reader:
        topics = find_topics(reader, leave_out={Modality.ODOMETRY: "the model does not read odometry"})
        assert topics.sensors == {Modality.IMU: "/imu/data"}
        assert topics.skipped["/husky_velocity_controller/odom"] == "the model does not read odometry"
        sync = SensorSync(SyncConfig(max_age_s=(0.2, 0.3, 0.1)))  # a 30 Hz IMU needs a longer max age
        for i, msg in enumerate(read_messages(reader, topics)):
            sync.add(msg.frame)
            if i == 300:
                break
    state = pipelines["onnxruntime"].fuse(sync.snapshot(sync.newest_stamp_ns()))
    _check([state], [False, False, True])
    np.testing.assert_allclose(state.attention[Modality.IMU], 1.0, atol=1e-6)


def test_bag_without_definitions_reports_the_topic_as_unreadable(real_data):
    with open_reader([real_data / "vlp16_raw_packets"]) as reader:
        topics = find_topics(reader)
    assert topics.sensors == {}
    assert "velodyne_msgs/msg/VelodyneScan" in topics.skipped["/velodyne_packets"]


def test_truncated_bag_raises_bag_error(real_data, tmp_path):
    src = real_data / "sick_lms1xx_scan_cloud_radar.bag"
    cut = tmp_path / "cut.bag"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    with pytest.raises(BagError, match="cut.bag"), open_reader([cut]) as reader:
        list(read_messages(reader, find_topics(reader)))


def test_missing_bag(tmp_path):
    with pytest.raises(BagError, match="bag not found"), open_reader([tmp_path / "nope.mcap"]):
        pass
