"""`fusion-attn` verbs as a user runs them: output on success, status 2 and a named problem on bad input."""

import json
import subprocess
import sys

import pytest

from fusion_attn.cli import main


def test_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "fusion_attn.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in ("fuse", "export", "bench"):
        assert verb in out


def test_fuse_bag_instant_prints_summary(real_data, capsys):
    assert main(["fuse", "--bag", str(real_data / "euroc_v1_01_cam_imu"), "--at", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "backend onnxruntime" in out and "/cam0/image_raw" in out and "/imu0" in out
    lidar_row = next(line for line in out.splitlines() if line.strip().startswith("lidar"))
    assert lidar_row.split()[1:5] == ["no", "-", "0.000", "0.000"]  # absent: no attention, trust 0
    assert "trust" in next(line for line in out.splitlines() if line.strip().startswith("modality"))


def test_fuse_json_with_params_file_and_tau_override(real_data, capsys, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    backend: torch\n    tau: {global: 0.5, imu: 2.0}\n")
    bag = str(real_data / "lidar_camera_frame")
    assert main(["fuse", "--bag", bag, "--at", "0", "--params", str(params), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["backend"]["backend"] == "torch" and state["tau"] == [0.5, 1.0, 1.0, 2.0]
    assert state["modalities"]["imu"] == {"present": False, "age_s": None, "attention_per_head": [0.0] * 4, "trust": 0.0}
    assert state["modalities"]["lidar"]["present"] and state["modalities"]["camera"]["present"]
    assert all(0.0 <= state["modalities"][m]["trust"] <= 1.0 for m in ("camera", "lidar"))
    assert main(["fuse", "--bag", bag, "--at", "0", "--tau", "1", "1", "0.1", "1", "--json"]) == 0
    sharp = json.loads(capsys.readouterr().out)
    assert sharp["modalities"]["lidar"]["attention_per_head"] != state["modalities"]["lidar"]["attention_per_head"]


def test_fuse_from_files(tmp_path, capsys):
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "img.png"), np.full((120, 160, 3), 128, np.uint8))
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).uniform(-20, 20, (5000, 3)).astype(np.float32))
    assert main(["fuse", "--image", str(tmp_path / "img.png"), "--points", str(tmp_path / "pts.npy"), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["modalities"]["camera"]["present"] and state["modalities"]["lidar"]["present"]
    assert not state["modalities"]["imu"]["present"]


def _fuse_outputs(trust):
    """`fuse`'s text table (rows by first word) and JSON for a constructed state: camera present, lidar
    absent, imu present; trust a tuple, or None for a model without a trust output."""
    from types import SimpleNamespace

    import numpy as np

    from fusion_attn.cli.fuse import _state_dict, _summary
    from fusion_attn.frames import FusedState

    state = FusedState(stamp_ns=0, frame_id="base_link", pooled=np.zeros(64, np.float32), latents=np.zeros((8, 64), np.float32),
                       attention=np.array([[0.1] * 4, [0.0] * 4, [0.9] * 4], np.float32), present=np.array([True, False, True]),
                       ages_s=np.array([0.01, np.nan, 0.002], np.float32), tau=np.ones(4, np.float32),
                       trust=None if trust is None else np.array(trust, np.float32))
    pipeline = SimpleNamespace(backend=SimpleNamespace(name="onnxruntime", device="cpu", precision="fp32"), backend_fallback=None,
                               model_source="default", backend_info=lambda: {"backend": "onnxruntime"})
    rows = {line.split()[0]: line.split() for line in _summary(state, pipeline, []).splitlines()}
    return rows, json.loads(json.dumps(_state_dict(state, pipeline)))


def test_fuse_shows_trust_per_modality_and_names_an_untrusted_sensor():
    rows, state = _fuse_outputs((0.08, 0.0, 0.95))
    assert "trust" in rows["modality"] and rows["camera"][4] == "0.080" and rows["lidar"][4] == "0.000"
    assert rows["imu"][4] == "0.950" and rows["NOT"][-2:] == ["camera", "0.080"]  # the absent lidar is not named
    assert [state["modalities"][m]["trust"] for m in ("camera", "lidar", "imu")] == [0.08, 0.0, 0.95]
    rows, state = _fuse_outputs(None)
    assert rows["camera"][4] == "-" and state["modalities"]["camera"]["trust"] is None and "NOT" not in rows


@pytest.mark.parametrize("argv,problem", [
    (["fuse", "--bag", "/nonexistent.mcap"], "bag not found: /nonexistent.mcap"),
    (["fuse", "--image", "/nonexistent.png"], "cannot read image"),
    (["fuse", "--tau", "0", "1", "1", "1", "--image", "x.png"], "tau must be finite and > 0"),
    (["fuse"], "fuse needs --bag"),
])
def test_bad_input_exits_2_naming_the_problem(argv, problem, capsys):
    assert main(argv) == 2
    assert problem in capsys.readouterr().err


def test_bag_without_sensor_topics_and_out_of_range_instant(real_data, capsys):
    assert main(["fuse", "--bag", str(real_data / "vlp16_raw_packets")]) == 2
    assert "no camera, lidar or IMU topic" in capsys.readouterr().err
    assert main(["fuse", "--bag", str(real_data / "euroc_v1_01_cam_imu"), "--at", "99"]) == 2
    assert "outside the bag" in capsys.readouterr().err
    assert main(["fuse", "--bag", str(real_data / "euroc_v1_01_cam_imu"), "--at", "nan"]) == 2
    assert "--at must be finite seconds" in capsys.readouterr().err


def test_corrupt_checkpoint_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert main(["export", "--checkpoint", str(bad), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "bad.safetensors is not a readable safetensors checkpoint" in capsys.readouterr().err


def test_export_checks_parity_and_operators(tmp_path, capsys):
    assert main(["export", "-o", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m.onnx").is_file()
    assert "all ops supported" in out and "max abs diff" in out


def _break_chunk(src, dst, after_s: float):
    """A copy of the rosbag2 MCAP folder `src` whose first chunk starting `after_s` or later into the recording
    has a wrong checksum: the index is intact (the bag opens, with its full length), reading stops there."""
    import shutil
    import struct

    from mcap.reader import make_reader

    shutil.copytree(src, dst)  # the shared data are read-only, and so is the copy
    dst.chmod(0o755)
    mcap = next(dst.glob("*.mcap"))
    mcap.chmod(0o644)
    with open(mcap, "rb") as f:
        summary = make_reader(f).get_summary()
    start = summary.statistics.message_start_time
    chunk = next(c for c in summary.chunk_indexes if c.message_start_time - start >= after_s * 1e9)
    data = bytearray(mcap.read_bytes())
    data[chunk.chunk_start_offset + 33:chunk.chunk_start_offset + 37] = struct.pack("<I", 1)  # opcode, length, 3 u64
    mcap.write_bytes(data)
    return dst


def test_fuse_names_the_read_fault_rather_than_blaming_at(real_data, tmp_path, capsys):
    bag = _break_chunk(real_data / "euroc_v1_01_cam_imu", tmp_path / "bag", 0.0)
    assert main(["fuse", "--bag", str(bag)]) == 2
    err = capsys.readouterr().err
    assert "read stopped" in err and "Chunk checksum mismatch" in err and "the bag's middle (1.000 s)" in err
    assert "try a later --at" not in err


def test_fuse_earlier_than_asked_says_so_with_topics_and_notes_in_json(real_data, tmp_path, capsys):
    bag = _break_chunk(real_data / "euroc_v1_01_cam_imu", tmp_path / "bag", 0.5)
    assert main(["fuse", "--bag", str(bag), "--at", "1.5", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["topics"] == {"camera": "/cam0/image_raw", "imu": "/imu0"} and state["skipped_topics"] == {}
    assert "Chunk checksum mismatch" in state["read_fault"] and state["notes"][0].startswith("read stopped: ")
    assert state["at_s"] == 1.5 and 0.4 < state["fused_at_s"] < 0.55
    assert f"fused at {state['fused_at_s']:.3f} s, not at --at 1.500 s: the read stopped before it" in state["notes"]
    assert main(["fuse", "--bag", str(bag)]) == 0  # the default instant, in text: times as --at takes them
    out = capsys.readouterr().out
    assert f"fused state @ {state['fused_at_s']:.3f} s into the bag" in out
    assert "not at the bag's middle (1.000 s): the read stopped before it" in out and "read stopped: " in out


def test_fuse_chooses_topics_as_replay_does(real_data, capsys):
    bag = str(real_data / "sick_lms1xx_scan_cloud_radar.bag")
    assert main(["fuse", "--bag", bag, "--lidar-topic", "/cloud", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["topics"] == {"lidar": "/cloud"} and state["modalities"]["lidar"]["present"]
    assert state["skipped_topics"]["/sick_lms_1xx/scan"].endswith("--lidar-topic chose /cloud; choose this one with "
                                                                   "--lidar-topic /sick_lms_1xx/scan")
    assert main(["fuse", "--bag", bag, "--imu-topic", "/cloud"]) == 2
    assert "--imu-topic /cloud: its messages are sensor_msgs/msg/PointCloud2; the imu input takes" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [
    (b"hi", "expected node names mapping to ros__parameters, got a str"),
    (bytes(range(128, 256)), "cannot read parameter file"),
    (b"/**:\n  ros__parameters: [1, 2]\n", "ros__parameters must be a mapping, got a list"),
])
def test_a_parameter_file_that_is_no_parameter_file_exits_2(real_data, tmp_path, capsys, content, problem):
    params = tmp_path / "p.yaml"
    params.write_bytes(content)
    assert main(["fuse", "--bag", str(real_data / "euroc_v1_01_cam_imu"), "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]


def test_export_paths_that_cannot_take_the_graph_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", "-o", str(tmp_path / "file" / "m.onnx")]) == 2  # under a file
    assert "fusion-attn export: error:" in capsys.readouterr().err
    assert main(["export", "-o", str(tmp_path)]) == 2
    assert "is a folder; give the .onnx file" in capsys.readouterr().err
    assert main(["export", "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1e5 and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("flags, problem", [
    (["--lr", "nan"], "--lr nan: finite numbers only"), (["--trust-weight", "nan"], "finite numbers only"),
    (["--lr", "-1"], "must be > 0"), (["--eval-every", "0"], "must be > 0"), (["--sim-seconds", "0"], "must be > 0"),
    (["--avoid-weight", "-1"], "--avoid-weight: weights are >= 0"), (["--trust-floor", "1"], "--trust-floor 1.0"),
    (["--stop-after", "0"], "--stop-after and --jobs must be >= 1"), (["--device", "bogus"], "device 'bogus'"),
])
def test_train_options_out_of_range_exit_2_before_the_run_folder_is_made(tmp_path, capsys, flags, problem):
    assert main(["train", "-o", str(tmp_path / "run"), "--steps", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert not (tmp_path / "run").exists()


def test_play_remap_and_bench_options_that_cannot_work_exit_2_at_once(real_data, tmp_path, capsys):
    bag = str(real_data / "euroc_v1_01_cam_imu")
    assert main(["play", bag, "--wait", "0", "--remap", "/cam0/image_raw:=bad topic"]) == 2
    assert "--remap to 'bad topic': Invalid topic name" in capsys.readouterr().err
    assert main(["play", bag, "--remap", ":=/x"]) == 2
    assert "--remap takes FROM:=TO" in capsys.readouterr().err
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats 0" in capsys.readouterr().err
    assert main(["bench", "--json", str(tmp_path / "no" / "b.json")]) == 2  # before the benchmark, not after it
    assert "not a file in an existing folder" in capsys.readouterr().err
