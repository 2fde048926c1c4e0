"""Where the goal's distance is lost between the camera and the fused state (issue #15): a ridge probe
of the goal distance fitted on a run's training episodes and read on its validation episodes, from

- `camera tokens`: the model's camera tokens as embedded (all patches, before any attention);
- `fused, clean` and `fused, lidar dropped`: the feature the heads read (the flattened latents; a
  baseline's pooled feature), with every sensor and with the lidar dropped (augment's `drop` fault),

beside the run's own goal head on the same samples and the training samples' mean distance taken as
every answer; for a run trained with `--camera-goal-weight`, also that objective's own head on the
camera tokens (the distance at the column it picks, and how often it picks the goal's column). If the
camera tokens carry the distance far better than the fused state with the lidar dropped, the fusion
loses it, not the camera path.

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
from fusion_attn.learn.loop import STATE_FILE, read_state
from fusion_attn.learn.objectives import CameraGoalColumns, CameraGoalTokens, fused_feature, goal_column
from fusion_attn.learn.robustness import load_run
from fusion_attn.sim.sensors import SensorConfig

PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="finished `fusion-attn train` run folders")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "goal_probe.json")
args = parser.parse_args()


def camera_goal_head(folder: Path, run) -> CameraGoalColumns | CameraGoalTokens | None:
    """The run's camera goal objective's head, from its training state (None: trained without one)."""
    state = read_state(folder / STATE_FILE)[0]
    if "camera_goal" not in state:
        return None
    head = (CameraGoalTokens if run.tc.camera_goal_head == "tokens" else CameraGoalColumns)(run.cfg)
    head.load_state_dict(state["camera_goal"])
    return head.eval()


@torch.no_grad()
def stages(run, data, column_head: CameraGoalColumns | CameraGoalTokens | None) -> dict[str, np.ndarray]:
    """Per simulated sample with a goal: each stage's features, the goal head's distance and the truth;
    with column_head, its distance at the column it picks (a token head: at the patch it picks) and
    whether that column is the goal's."""
    t = data.tensors()
    keep = np.flatnonzero(data.arrays["labelled"] & np.isfinite(data.arrays["goal"]).all(-1) & (data.source == 0))
    n_cam = run.cfg.camera.tokens
    out: dict[str, list] = {"camera tokens": [], "fused, clean": [], "fused, lidar dropped": [], "head": [], "truth": [],
                            "column head": [], "column right": []}
    for start in range(0, len(keep), 256):
        idx = torch.from_numpy(keep[start:start + 256])
        x = gather(t, idx)
        tau = torch.ones(len(idx), 4)
        tokens = run.model.embed(x)[0]
        out["camera tokens"].append(tokens[:, :n_cam].flatten(1).numpy())
        if column_head is not None:
            pred = column_head(tokens[:, :n_cam]).flatten(1, -2)  # (B, cols, 3) or (B, rows * cols, 4)
            picked = pred[..., 0].argmax(1)
            distance = pred[torch.arange(len(idx)), picked, 1] * run.heads.std_goal[0] + run.heads.mean_goal[0]
            picked = picked % column_head.cols
            _, column, seen = goal_column(t["goal"][idx, 1], column_head.cols, SensorConfig().image_x)
            out["column head"].append(distance.numpy())
            out["column right"].append((picked == column).numpy() & seen.numpy())
        fused = fused_feature(run.model, x, tau)[0]
        out["fused, clean"].append(fused.numpy())
        out["head"].append(run.heads.denormalise("goal", run.heads(fused)["goal"])[:, 0].numpy())
        dropped = corrupt(t, idx, FaultPlan.fixed(len(idx), 1, "drop"), run.cfg, run.tc.fusion_hz, torch.Generator())
        out["fused, lidar dropped"].append(fused_feature(run.model, dropped, tau)[0].numpy())
        out["truth"].append(t["goal"][idx, 0].numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items() if v}


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
    column_head = camera_goal_head(folder, run)
    train, val = stages(run, train_set, column_head), stages(run, val_set, column_head)
    row = {"samples": {"train": len(train["truth"]), "validation": len(val["truth"])},
           "constant_mae_m": float(np.abs(val["truth"] - train["truth"].mean()).mean()),
           "goal_head_mae_m": float(np.abs(val["head"] - val["truth"]).mean())}
    if column_head is not None:
        row["camera_goal_head"] = {"mae_m": float(np.abs(val["column head"] - val["truth"]).mean()),
                                   "right_column_share": float(val["column right"].mean()),
                                   "training_mae_m": float(np.abs(train["column head"] - train["truth"]).mean()),
                                   "training_right_column_share": float(train["column right"].mean()),
                                   # a distant post is a pixel or two wide at the tokenizer's width: near and far apart
                                   "right_column_share_within_4m": float(val["column right"][val["truth"] < 4.0].mean()),
                                   "right_column_share_beyond_4m": float(val["column right"][val["truth"] >= 4.0].mean())}
    for stage in ("camera tokens", "fused, clean", "fused, lidar dropped"):
        error, penalty = probe_error(train[stage], train["truth"], val[stage], val["truth"])
        row[stage] = {"probe_mae_m": error, "penalty": penalty, "features": int(train[stage].shape[1])}
    results[folder.name] = row
    print(f"| {folder.name} | {row['constant_mae_m']:.3f} | {row['goal_head_mae_m']:.3f} | " + " | ".join(
        f"{row[s]['probe_mae_m']:.3f}" for s in ("camera tokens", "fused, clean", "fused, lidar dropped")) + " |", flush=True)
    if column_head is not None:
        head = row["camera_goal_head"]
        print(f"|   its camera goal head: {head['mae_m']:.3f} m at the column it picks, the goal's in "
              f"{100 * head['right_column_share']:.0f} % (on its training episodes {head['training_mae_m']:.3f} m, "
              f"{100 * head['training_right_column_share']:.0f} %; goals within 4 m "
              f"{100 * head['right_column_share_within_4m']:.0f} %, beyond {100 * head['right_column_share_beyond_4m']:.0f} %) |",
              flush=True)

args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine(),
                                "command": "python benchmarks/goal_probe.py " + " ".join(map(str, args.runs))
                                + f" --out {args.out}",
                                "runs": results}, indent=2) + "\n")
print(f"wrote {args.out}")
