"""Many recordings in parallel (fusion_attn.batch, `replay --each --jobs N`): which paths name
recordings, outputs byte-identical to one replay each, and a bad recording that stops nothing else."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_attn.batch import expand_recordings, output_names
from fusion_attn.cli import main
from fusion_attn.errors import ConfigError


def test_recordings_from_folders_globs_and_list_files(real_data, tmp_path):
    everything = expand_recordings([real_data])
    assert [p.name for p in everything] == ["euroc_v1_01_cam_imu", "husky_imu_odom_gps.bag", "lidar_camera_frame",
                                            "sick_lms1xx_scan_cloud_radar.bag", "vlp16_raw_packets"]
    assert expand_recordings([f"{real_data}/*.bag"]) == [real_data / "husky_imu_odom_gps.bag",
                                                         real_data / "sick_lms1xx_scan_cloud_radar.bag"]
    listed = tmp_path / "list.txt"
    listed.write_text(f"# two recordings\n{real_data / 'lidar_camera_frame'}\n\n{real_data / 'euroc_v1_01_cam_imu'}  # stereo\n")
    # a recording named twice (list and folder) is replayed once, where it first appears
    assert [p.name for p in expand_recordings([listed, real_data / "euroc_v1_01_cam_imu"])] == [
        "lidar_camera_frame", "euroc_v1_01_cam_imu"]
    listed.write_text("missing.bag\n")
    with pytest.raises(ConfigError, match="listed recordings not found: .*missing.bag"):
        expand_recordings([listed])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a recording nor a folder that holds any"):
        expand_recordings([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="no file or folder matches"):
        expand_recordings([f"{tmp_path}/*.mcap"])
    assert output_names([Path("a/run.bag"), Path("b/run.bag"), Path("c/run")]) == ["run", "run-2", "run-3"]


def test_parallel_replay_is_byte_identical_and_a_bad_recording_stops_nothing(real_data, tmp_path, capsys):
    recordings = [real_data / "lidar_camera_frame", real_data / "sick_lms1xx_scan_cloud_radar.bag"]
    for rec in recordings:  # one plain replay each, in this process
        assert main(["replay", str(rec), "-o", str(tmp_path / "single" / rec.stem), "--no-progress"]) == 0
    broken = tmp_path / "broken.bag"
    broken.write_bytes(b"#ROSBAG V2.0\n" + bytes(100))  # a header and nothing readable
    listed = tmp_path / "recordings.txt"
    listed.write_text("\n".join(map(str, [recordings[0], broken, recordings[1]])))
    assert main(["replay", "--each", str(listed), "-o", str(tmp_path / "each"), "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "2 of 3 replayed" in out and "broken: FAILED: BagError" in out
    index = json.loads((tmp_path / "each" / "index.json").read_text())
    assert [(r["output"], r["ok"]) for r in index["recordings"]] == [
        ("lidar_camera_frame", True), ("broken", False), ("sick_lms1xx_scan_cloud_radar", True)]
    for rec in recordings:
        single, parallel = tmp_path / "single" / rec.stem, tmp_path / "each" / rec.stem
        for name in ("fused/fused.mcap", "summary.json"):
            assert (single / name).read_bytes() == (parallel / name).read_bytes(), f"{rec.stem}: {name} differs"


def test_training_shards_made_in_parallel_equal_those_made_in_turn(real_data, tmp_path):
    import numpy as np

    from fusion_attn.errors import FusionAttnError
    from fusion_attn.learn.data import build_datasets
    from fusion_attn.learn.loop import TrainConfig

    tc = TrainConfig(sim_episodes=2, val_episodes=1, sim_seconds=2.0, bags=(str(real_data / "lidar_camera_frame"),))
    cfg = tc.fusion_config()
    in_turn = build_datasets(tc, cfg, tmp_path / "one", progress=False)
    parallel = build_datasets(tc, cfg, tmp_path / "two", progress=False, jobs=2)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    for a, b in zip(in_turn, parallel):
        assert a.arrays.keys() == b.arrays.keys() and all(np.array_equal(a.arrays[k], b.arrays[k], equal_nan=True) for k in a.arrays)
    broken = tmp_path / "broken.bag"
    broken.write_bytes(b"#ROSBAG V2.0\n" + bytes(100))
    bad = TrainConfig(sim_episodes=3, val_episodes=0, sim_seconds=2.0, bags=(str(broken),))
    with pytest.raises(FusionAttnError, match=r"1 of 2 training sequences failed: .*broken\.bag: BagError"):
        build_datasets(bad, cfg, tmp_path / "two", progress=False, jobs=2)
    assert len(list((tmp_path / "two").glob("sim-*.npz"))) == 4  # the third episode was made all the same


def test_replay_on_ray_writes_what_local_jobs_write(local_ray, real_data, tmp_path):
    rec = real_data / "lidar_camera_frame"
    assert main(["replay", "--each", str(rec), "-o", str(tmp_path / "ray"), "--ray", "auto"]) == 0
    assert main(["replay", "--each", str(rec), "-o", str(tmp_path / "local")]) == 0
    for name in ("fused/fused.mcap", "summary.json"):
        assert (tmp_path / "ray" / rec.name / name).read_bytes() == (tmp_path / "local" / rec.name / name).read_bytes()
    assert json.loads((tmp_path / "ray" / "index.json").read_text())["ray"] == "auto"


@pytest.mark.parametrize("torch_first", [False, True])
def test_single_threaded_gives_torch_one_thread_whether_loaded_before_or_after(torch_first):
    """A job's process (batch.single_threaded) on ONNX Runtime alone never loads torch; where it loads
    torch before or after, torch still runs on one thread."""
    code = ("import sys; from fusion_attn.batch import single_threaded; single_threaded(); "
            "print('torch' in sys.modules); import torch; print(torch.get_num_threads())")
    run = subprocess.run([sys.executable, "-c", ("import torch; " if torch_first else "") + code], check=False,
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(torch_first), "1"]
