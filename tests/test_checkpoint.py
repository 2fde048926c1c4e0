"""Checkpoints: round trip, and every kind of bad file gives CheckpointError naming the problem."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fusion_attn.backends.export import example_inputs
from fusion_attn.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fusion_attn.config import FusionConfig, ModelConfig
from fusion_attn.errors import CheckpointError
from fusion_attn.model import FusionModel


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(1)
    model = FusionModel(FusionConfig(model=ModelConfig(qk_norm=True))).eval()
    return model, save_checkpoint(model, tmp_path / "m.safetensors", info={"steps": 3})


def test_round_trip_keeps_config_weights_and_info(saved):
    model, path = saved
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg and loaded.cfg.model.qk_norm
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert read_checkpoint(path)[2] == {"steps": 3}


def test_truncated_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(bad)


def test_a_save_that_fails_part_way_leaves_the_earlier_checkpoint_whole(saved, tmp_path, monkeypatch):
    """Saved beside and renamed over (files.written_aside): a crash or Ctrl-C mid-write loses nothing."""
    import safetensors.torch

    model, path = saved
    before = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)  # checkpoint imports it when it saves
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    load_checkpoint(path)


def test_pickle_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a fusion_attn/1 checkpoint"):
        load_checkpoint(foreign)


def test_mismatched_tensors_are_named(saved, tmp_path):
    model, _ = saved
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {"format": "fusion_attn/1", "config": model.cfg.to_json(), "info": "{}"}
    tensors["cross.q.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"cross\.q\.weight has shape \(3, 3\)"):
        load_checkpoint(tmp_path / "shape.safetensors")
    del tensors["cross.q.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing \['cross\.q\.weight'\]"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_nan_weights_and_bad_config(saved, tmp_path):
    model, _ = saved
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["queries"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={"format": "fusion_attn/1", "config": model.cfg.to_json()})
    with pytest.raises(CheckpointError, match="queries hold NaN or inf"):
        load_checkpoint(tmp_path / "nan.safetensors")
    cfg = json.loads(model.cfg.to_json())
    cfg["model"]["width"] = 3
    save_file(model.state_dict(), str(tmp_path / "cfg.safetensors"), metadata={"format": "fusion_attn/1", "config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) in 'model': \['width'\]"):
        load_checkpoint(tmp_path / "cfg.safetensors")


def test_expected_config_mismatch_is_explained(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="model.qk_norm: False != True"):
        load_checkpoint(path, expect=FusionConfig())


@pytest.mark.parametrize("section,key,value", [("model", "heads", 0), ("model", "dim", -8), ("lidar", "grid", 256),
                                               ("camera", "patch", "16"), ("model", "fusion", "pooled")])
def test_invalid_config_in_a_checkpoint_is_named(saved, tmp_path, section, key, value):
    model, _ = saved
    cfg = json.loads(model.cfg.to_json())
    cfg[section][key] = value
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": "fusion_attn/1", "config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match=f"{section}.{key}"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_token_fusion_round_trips_and_differs_from_the_default(tmp_path):
    torch.manual_seed(2)
    model = FusionModel(FusionConfig(model=ModelConfig(fusion="token"))).eval()
    path = save_checkpoint(model, tmp_path / "token.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.cfg.model.fusion == "token"
    x = {k: torch.from_numpy(v) for k, v in example_inputs(model, batch=2, seed=1).items()}
    with torch.no_grad():
        for a, b in zip(model(**x), loaded(**x)):
            assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="model.fusion: sensor != token"):
        load_checkpoint(path, expect=FusionConfig())


def test_checkpoint_from_before_the_trust_output_names_what_it_lacks(saved, tmp_path):
    # what an older checkpoint (such as a packaged default trained before the trust output) looks like
    model, _ = saved
    tensors = {k: v.clone() for k, v in model.state_dict().items()
               if not k.startswith("trust.") and k not in ("embed.no_previous", "embed.camera_change.weight")}
    meta = {"format": "fusion_attn/1", "config": model.cfg.to_json(), "info": "{}"}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing \[.*'embed\.camera_change\.weight'.*'trust\.logit\.fc1\.bias'"):
        load_checkpoint(tmp_path / "old.safetensors")


def test_read_as_numpy_arrays_matches_torch_and_refuses_nan(saved, tmp_path):
    """framework="np" (the torch-free read of the ONNX Runtime default): the same config and values, and the
    same refusal of NaN weights."""
    model, path = saved
    cfg, arrays, info = read_checkpoint(path, framework="np")
    assert cfg == model.cfg and info == {"steps": 3}
    assert arrays.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy(), err_msg=name)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["queries"][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata={"format": "fusion_attn/1", "config": model.cfg.to_json()})
    with pytest.raises(CheckpointError, match="queries hold NaN or inf"):
        read_checkpoint(tmp_path / "inf.safetensors", framework="np")
