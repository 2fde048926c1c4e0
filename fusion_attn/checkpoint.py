"""Checkpoints: one safetensors file with the FusionConfig JSON in its metadata.

Loading never executes code (safetensors holds tensors and strings only), and every way a file can
be wrong -- missing, truncated, not safetensors, another project's, built for another config --
raises CheckpointError naming what is wrong. Reading as numpy arrays (framework="np") needs no torch:
the ONNX Runtime default runs a cached graph of the weights without importing it (pipeline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

from .config import FusionConfig
from .errors import CheckpointError, ConfigError
from .files import written_aside

if TYPE_CHECKING:
    from .model import FusionModel

FORMAT = "fusion_attn/1"


def save_checkpoint(model: FusionModel, path: str | Path, info: dict | None = None) -> Path:
    """Write the weights and config (plus optional JSON-able `info`, e.g. training provenance)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.cfg.to_json(), "info": json.dumps(info or {}, sort_keys=True)}
    with written_aside(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_safetensors(path: str | Path, expect_format: str, framework: str = "pt") -> tuple[dict[str, str], dict[str, Any]]:
    """-> (metadata, tensors) of a safetensors file whose metadata "format" is `expect_format`; the
    one place this project opens safetensors files (model, heads, RL agent). Tensors are torch's
    (framework "pt") or numpy arrays ("np"). CheckpointError on a missing, truncated, corrupt or foreign
    file, or one holding NaN or inf (a training that diverged)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "not found"
        raise CheckpointError(f"{expect_format} checkpoint {what}: {path}")
    try:
        with safe_open(str(path), framework=framework) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {exc}") from exc
    if meta.get("format") != expect_format:
        raise CheckpointError(f"{path} is not a {expect_format} checkpoint (metadata format={meta.get('format')!r})")
    if bad := [k for k, v in tensors.items() if not _finite(v)]:
        raise CheckpointError(f"{path}: {', '.join(bad[:3])} hold NaN or inf: not trained weights")
    return meta, tensors


def _finite(tensor) -> bool:
    """Whether every value of a torch tensor or numpy array is finite (any integer or bool one is)."""
    if isinstance(tensor, np.ndarray):
        return not np.issubdtype(tensor.dtype, np.floating) or bool(np.isfinite(tensor).all())
    return not tensor.is_floating_point() or bool(tensor.isfinite().all())


def read_checkpoint(path: str | Path, framework: str = "pt") -> tuple[FusionConfig, dict[str, Any], dict]:
    """-> (config, state dict, info) without building a model; the state dict as torch tensors (framework
    "pt") or numpy arrays ("np", which needs no torch)."""
    meta, tensors = read_safetensors(path, FORMAT, framework)
    try:
        cfg = FusionConfig.from_json(meta["config"])
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, ConfigError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: its config metadata is invalid: {exc}") from exc
    return cfg, tensors, info


def load_checkpoint(path: str | Path, expect: FusionConfig | None = None) -> FusionModel:
    """Build the model a checkpoint describes and load its weights (eval mode, CPU)."""
    from .model import FusionModel

    cfg, tensors, _ = read_checkpoint(path)
    if expect is not None and expect != cfg:
        raise CheckpointError(f"{path} was made for another config: {_config_diff(expect, cfg)}")
    model = FusionModel(cfg)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(own[name].shape)}")
    model.load_state_dict(tensors)
    return model.eval()


def _config_diff(a: FusionConfig, b: FusionConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    diffs = [f"{s}.{k}: {da[s][k]} != {db[s][k]}" for s in da for k in da[s] if da[s][k] != db[s][k]]
    return ", ".join(diffs)
