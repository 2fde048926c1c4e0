"""A real recording's corrupted copies through trained runs, fusion by fusion: the corrupted sensor's trust
and the freeze evidence the trust is given (the log of the mean change since the previous frame,
`SensorEmbedding._evidence`), beside the same evidence on the simulator's held-out episodes. It says
whether a missed corruption was visible to the model at all, and how far the recording lies from what
training saw.

    python benchmarks/real_trust.py runs/default runs/default-s1 runs/default-s2 \\
        --bag ../shared/data/real/euroc_v1_01_cam_imu --faults camera_freeze camera_noise

Prints a markdown table per recording; --out writes the figures as JSON.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fusion_attn.config import cache_dir
from fusion_attn.learn.augment import FaultPlan, corrupt
from fusion_attn.learn.data import bag_set, held_out_set
from fusion_attn.learn.evaluation import changed_inputs
from fusion_attn.learn.objectives import predict
from fusion_attn.learn.robustness import load_run, with_checkpoint
from fusion_attn.outputs import TRUST_THRESHOLD

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="training run folders (train_state.pt)")
parser.add_argument("--bag", nargs="+", type=Path, required=True, help="recordings (as eval-robustness takes them)")
parser.add_argument("--faults", nargs="+", default=["camera_freeze", "camera_noise", "camera_zero", "lidar_noise",
                                                    "imu_freeze", "imu_zero"], help="SENSOR_FAULT conditions")
parser.add_argument("--episodes", type=int, default=12, help="held-out simulator episodes for the evidence's range")
parser.add_argument("--weights", type=Path, help="a checkpoint (its heads beside it) measured in the first run's "
                    "config, as a run of its own: e.g. the packaged default, whose training folder is not kept")
parser.add_argument("--out", type=Path, help="write the figures as JSON")
args = parser.parse_args()
NO_CHANGE = float(np.log(2e-6))  # the statistic is log(change + 1e-6): at its floor, nothing changed at all


@torch.no_grad()
def through(run, data, sensor: int, fault: str) -> dict[str, np.ndarray]:
    """Per fusion and sensor: trust (nan where absent), the first evidence statistic (camera, lidar: the
    log change since the previous frame, 0 without one; IMU: the log spread of its accelerometer),
    whether the camera's and the lidar's tokens equal their previous frame's bit for bit (nan without
    one; IMU: nan), and per fusion whether the fault changed the faulted sensor's inputs."""
    t = data.tensors()
    idx = torch.arange(len(data))
    x = corrupt(t, idx, FaultPlan.fixed(len(idx), sensor, fault), run.cfg, run.tc.fusion_hz, torch.Generator().manual_seed(7))
    clean = corrupt(t, idx, FaultPlan.fixed(len(idx), -1, "drop"), run.cfg, run.tc.fusion_hz, torch.Generator())
    _, _, fusion = predict(run.model, run.heads, t, idx, x, torch.ones(len(idx), 4), run.cfg)
    _, _, evidence, _ = run.model.embed(x)  # (B, 3, EVIDENCE)
    trust = torch.where(fusion["trust_logits"].isfinite(), fusion["trust"], torch.nan)
    changed = changed_inputs(x, clean, run.cfg.sensor_names[sensor]) if sensor >= 0 else torch.zeros(len(idx), dtype=torch.bool)
    identical = torch.full(trust.shape, torch.nan)
    for k, (name, content) in enumerate((("camera", "patches"), ("lidar", "points"))):
        has_prev = x[f"{name}_prev_mask"].flatten(1).any(1) & x[f"{name}_mask"].flatten(1).any(1)
        same = (x[f"{name}_{content}"] == x[f"{name}_prev_{content}"]).flatten(1).all(1) & \
            (x[f"{name}_mask"] == x[f"{name}_prev_mask"]).flatten(1).all(1)
        identical[:, k] = torch.where(has_prev, same.float(), torch.nan)
    return {"trust": trust.numpy(), "evidence": evidence[..., 0].numpy(), "identical": identical.numpy(),
            "changed": changed.numpy()}


def runs():
    for folder in args.runs:
        yield load_run(folder.name, folder)
    if args.weights:
        yield with_checkpoint(load_run(args.weights.name, args.runs[0]), args.weights, args.weights.name)


report, cache = {}, cache_dir("train")  # the tokenized datasets eval-robustness and training use
for run in runs():
    run.model.eval()
    sim = through(run, held_out_set(run.tc, run.cfg, cache, args.episodes), -1, "drop")
    names = run.cfg.sensor_names  # the model's sensors, in its order
    report[run.name] = {"sensors": names, "sim_clean_evidence": {
        m: np.quantile(sim["evidence"][:, k][sim["evidence"][:, k] != 0], [0.0, 0.05, 0.5]).tolist()
        for k, m in enumerate(names)}}
    for bag in args.bag:
        data = bag_set(bag, run.tc.fusion_hz, run.cfg, cache, run.tc.trigger)
        rows = {"clean": through(run, data, -1, "drop")}
        for condition in args.faults:
            sensor_name, fault = condition.split("_", 1)
            if sensor_name in names and np.isfinite(rows["clean"]["trust"][:, names.index(sensor_name)]).any():
                rows[condition] = through(run, data, names.index(sensor_name), fault)  # the sensor is in it
        report[run.name][bag.name] = {c: {k: v.tolist() for k, v in r.items()} for c, r in rows.items()}

print(f"trust threshold {TRUST_THRESHOLD}; evidence: the sensor's first statistic (camera, lidar: log change since "
      "the previous frame, 0 without one; IMU: log accelerometer spread), median over fusions where it is not 0; "
      "no change at all: of those, the fusions where it is at its floor (log 1e-6); identical tokens: of the fusions "
      "with a previous frame, those whose tokens equal its tokens bit for bit\n")
for name, by_bag in report.items():
    names = by_bag["sensors"]
    sim = ", ".join(f"{m} min {q[0]:.2f} / 5 % {q[1]:.2f} / median {q[2]:.2f}" for m, q in by_bag["sim_clean_evidence"].items())
    print(f"## {name}\n\nSimulator held-out episodes, clean, evidence: {sim}\n")
    print("| recording | condition | sensor | fusions changed | below threshold | trust median | evidence median | no change at all "
          "| identical tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bag, rows in ((b, r) for b, r in by_bag.items() if b not in ("sensors", "sim_clean_evidence")):
        for condition, r in rows.items():
            trust, evidence, identical, changed = (np.asarray(r[k], float) for k in ("trust", "evidence", "identical", "changed"))
            sensors = [condition.split("_", 1)[0]] if condition != "clean" else [
                m for k, m in enumerate(names) if np.isfinite(trust[:, k]).any()]
            for m in sensors:
                k = names.index(m)
                rows_of = changed > 0 if condition != "clean" else np.isfinite(trust[:, k])
                value = np.nan_to_num(trust[rows_of, k], nan=0.0)  # absent: trusted not at all
                e = evidence[rows_of, k]
                e = e[e != 0]  # 0: no previous frame
                still = int((e <= NO_CHANGE).sum())
                same = identical[rows_of, k]
                same = same[np.isfinite(same)]
                print(f"| {bag} | {condition} | {m} | {'-' if condition == 'clean' else f'{int(rows_of.sum())} of {len(trust)}'} | "
                      f"{int((value < TRUST_THRESHOLD).sum())} of {len(value)} | {np.median(value) if len(value) else float('nan'):.3f} | "
                      f"{np.median(e) if len(e) else float('nan'):.2f} | {still} of {len(e)} | "
                      f"{'-' if m == 'imu' else f'{int(same.sum())} of {len(same)}'} |")
    print()
if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
