"""Where the goal's distance is lost between the camera and the fused state (issue #15): a ridge probe
of the goal distance fitted on a run's training episodes and read on its validation episodes, from

- `camera tokens`: the model's camera tokens as embedded (all patches, before any attention);
- `fused, clean` and `fused, lidar dropped`: the feature the heads read (the flattened latents; a
  baseline's pooled feature), with every sensor and with the lidar dropped (augment's `drop` fault),

beside the run's own goal head on the same samples and the training samples' mean distance taken as
every answer. If the camera tokens carry the distance far better than the fused state with the lidar
dropped, the fusion loses it, not the camera path.

    python benchmarks/goal_probe.py runs/default-s0 runs/default_stem-s0 [--out benchmarks/results/goal_probe.json]

Simulated samples with a goal only; tokens and states at τ = 1. Each probe is fitted and read in its own
condition; its ridge penalty is picked on the last fifth of the training samples (the last episodes),
then refitted on all of them. Nothing here trains the model: it says what a linear read-out of each
stage gives, a floor on what the stage carries.
"""

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

from fusion_attn.bench import machine
from fusion_attn.config import cache_dir
from fusion_attn.learn.augment import FaultPlan, corrupt, gather
from fusion_attn.learn.data import build_datasets
from fusion_attn.learn.objectives import fused_feature
from fusion_attn.learn.robustness import load_run

PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="finished `fusion-attn train` run folders")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "goal_probe.json")
args = parser.parse_args()


@torch.no_grad()
def stages(run, data) -> dict[str, np.ndarray]:
    """Per simulated sample with a goal: each stage's features, the goal head's distance and the truth."""
    t = data.tensors()
    keep = np.flatnonzero(data.arrays["labelled"] & np.isfinite(data.arrays["goal"]).all(-1) & (data.source == 0))
    n_cam = run.cfg.camera.tokens
    out: dict[str, list] = {"camera tokens": [], "fused, clean": [], "fused, lidar dropped": [], "head": [], "truth": []}
    for start in range(0, len(keep), 256):
        idx = torch.from_numpy(keep[start:start + 256])
        x = gather(t, idx)
        tau = torch.ones(len(idx), 4)
        tokens = run.model.embed(x)[0]
        out["camera tokens"].append(tokens[:, :n_cam].flatten(1).numpy())
        fused = fused_feature(run.model, x, tau)[0]
        out["fused, clean"].append(fused.numpy())
        out["head"].append(run.heads.denormalise("goal", run.heads(fused)["goal"])[:, 0].numpy())
        dropped = corrupt(t, idx, FaultPlan.fixed(len(idx), 1, "drop"), run.cfg, run.tc.fusion_hz, torch.Generator())
        out["fused, lidar dropped"].append(fused_feature(run.model, dropped, tau)[0].numpy())
        out["truth"].append(t["goal"][idx, 0].numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def ridge(features: np.ndarray, target: np.ndarray, penalty: float):
    mean, std = features.mean(0), features.std(0) + 1e-6
    z = (features - mean) / std
    offset = target.mean()
    weights = np.linalg.solve(z.T @ z + penalty * len(z) * np.eye(z.shape[1]), z.T @ (target - offset))
    return lambda f: ((f - mean) / std) @ weights + offset


def probe_error(train_x, train_y, test_x, test_y) -> tuple[float, float]:
    """-> (mean absolute error on the test samples, the penalty picked)."""
    cut = int(0.8 * len(train_x))
    picked = min(PENALTIES, key=lambda p: np.abs(ridge(train_x[:cut], train_y[:cut], p)(train_x[cut:]) - train_y[cut:]).mean())
    return float(np.abs(ridge(train_x, train_y, picked)(test_x) - test_y).mean()), picked


results = {}
print("| run | goal distance MAE [m]: the training mean | the goal head | probe of the camera tokens | of the fused "
      "state | of the fused state, lidar dropped |\n|---|---|---|---|---|---|")
for folder in args.runs:
    run = load_run(folder.name, folder)
    train_set, val_set = build_datasets(run.tc, run.cfg, cache_dir("train"), progress=False)
    if val_set is None:
        raise SystemExit(f"{folder}: trained without validation episodes; the probe reads on them")
    train, val = stages(run, train_set), stages(run, val_set)
    row = {"samples": {"train": len(train["truth"]), "validation": len(val["truth"])},
           "constant_mae_m": float(np.abs(val["truth"] - train["truth"].mean()).mean()),
           "goal_head_mae_m": float(np.abs(val["head"] - val["truth"]).mean())}
    for stage in ("camera tokens", "fused, clean", "fused, lidar dropped"):
        error, penalty = probe_error(train[stage], train["truth"], val[stage], val["truth"])
        row[stage] = {"probe_mae_m": error, "penalty": penalty, "features": int(train[stage].shape[1])}
    results[folder.name] = row
    print(f"| {folder.name} | {row['constant_mae_m']:.3f} | {row['goal_head_mae_m']:.3f} | " + " | ".join(
        f"{row[s]['probe_mae_m']:.3f}" for s in ("camera tokens", "fused, clean", "fused, lidar dropped")) + " |", flush=True)

args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine(),
                                "command": "python benchmarks/goal_probe.py " + " ".join(map(str, args.runs)),
                                "runs": results}, indent=2) + "\n")
print(f"wrote {args.out}")
