"""Where a fusion loses the lidar's scan match without the IMU (issue #15): each run's speed and yaw-rate
errors with the IMU dropped, on its validation samples split by how good the model's own scan match is.

    MUJOCO_GL=egl python benchmarks/match_split.py runs/arrival-s0 runs/arrival_direct-s0 [--good 0.05]
        [--out benchmarks/results/match_split.json]

The match (`model.lidar_scan_match`, `--lidar-motion`) is good on a sample where its yaw rate is within
`--good` rad/s of the label, bad where it is not, and absent where the sweeps gave nothing to match.
For each part: the samples, the match's own errors, the gyro's (its newest resampled yaw rate, read
as it is), the run's errors clean, with the IMU dropped and with the IMU alone (camera and lidar absent)
(validation episodes of the run's own training config, τ = 1, the IMU dropped as `fusion-attn train`'s
evaluation drops it). If the run errs far more than the match where the match is good, the fusion
loses what the match has; if only where it is bad, the loss is the match's outliers. Last, where the
gyro's precision goes: a linear probe of the yaw rate (ridge, fitted on the run's training samples,
scored on validation) from the IMU's chunks, its embedded tokens and the fused latents, clean.
"""

import argparse
import datetime
import json
from pathlib import Path

import torch

import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
from fusion_attn.bench import machine
from fusion_attn.config import cache_dir
from fusion_attn.frames import Modality
from fusion_attn.learn.augment import FaultPlan, corrupt
from fusion_attn.learn.data import build_datasets
from fusion_attn.learn.objectives import predict
from fusion_attn.learn.robustness import load_run
from fusion_attn.model import lidar_scan_match
from fusion_attn.tokenize import IMU_AXES, imu_samples

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="training run folders trained with --lidar-motion")
parser.add_argument("--good", type=float, default=0.05, help="a match within this many rad/s of the label is good")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "match_split.json")
args = parser.parse_args()


def errors(run, data) -> dict[str, torch.Tensor]:
    """Per labelled validation sample: the run's |error| in speed and yaw rate clean, with the IMU dropped and
    with the IMU alone; the gyro's read as it is; the scan match's, with whether it matched."""
    t, out = data.tensors(), {}
    for start in range(0, len(data), 256):
        idx = torch.arange(start, min(start + 256, len(data)))
        rows = {}
        for name, sensor in (("clean", -1), ("imu_drop", int(Modality.IMU)), ("imu_only", -1)):
            x = corrupt(t, idx, FaultPlan.fixed(len(idx), sensor, "drop"), run.cfg, run.tc.fusion_hz,
                        torch.Generator().manual_seed(0))
            if name == "imu_only":  # camera and lidar both absent: what the fusion makes of the IMU alone
                for key in ("camera_mask", "camera_prev_mask", "lidar_mask", "lidar_prev_mask"):
                    x[key] = torch.zeros_like(x[key])
            with torch.no_grad():
                pred, tgt, _ = predict(run.model, run.heads, t, idx, x, torch.ones(len(idx), 4), run.cfg)
                if name == "clean":
                    scan = lidar_scan_match(x, run.cfg.lidar)  # yaw rate, speed, sideways, share, log rms, matched
            truth, valid = tgt["velocity"]
            err = (run.heads.denormalise("velocity", pred["velocity"]) - truth).abs()
            rows[f"{name}_speed"], rows[f"{name}_yaw"] = err[:, 0], err[:, 1]
            if name == "clean":  # the gyro's newest resampled yaw rate as it is: what the IMU alone reads
                gyro_z = imu_samples(x["imu_chunks"], run.cfg.imu)[:, -1, -1, IMU_AXES.index("gyro_z")]
                rows["gyro_yaw"] = (gyro_z * run.cfg.imu.gyro_scale - truth[:, 1]).abs()
        rows["match_speed"], rows["match_yaw"] = (scan[:, 1] - truth[:, 0]).abs(), (scan[:, 0] - truth[:, 1]).abs()
        rows["matched"], rows["valid"] = scan[:, 5] > 0, valid
        for k, v in rows.items():
            out.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in out.items()}
    return {k: v[out["valid"]] for k, v in out.items() if k != "valid"}


def stages(run, data) -> dict[str, torch.Tensor]:
    """Per labelled sample, clean: the IMU's chunks as tokenized, its tokens as embedded, the fused latents
    the heads read, and the true yaw rate."""
    t, out = data.tensors(), {}
    for start in range(0, len(data), 256):
        idx = torch.arange(start, min(start + 256, len(data)))
        x = corrupt(t, idx, FaultPlan.fixed(len(idx), -1, "drop"), run.cfg, run.tc.fusion_hz, torch.Generator())
        with torch.no_grad():
            _, tgt, fusion = predict(run.model, run.heads, t, idx, x, torch.ones(len(idx), 4), run.cfg)
            rows = {"chunks": x["imu_chunks"].flatten(1), "latents": fusion["latents"].flatten(1),
                    "imu_tokens": run.model.embed(x)[0][:, run.model.spans[2]].flatten(1), "yaw": tgt["velocity"][0][:, 1]}
        for k, v in rows.items():
            out.setdefault(k, []).append(v[tgt["velocity"][1]])
    return {k: torch.cat(v).double() for k, v in out.items()}


def probe_mae(train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], key: str) -> float:
    """A ridge regression of the yaw rate on `key`, fitted on the training samples, scored on validation."""
    def design(d):
        return torch.cat([d[key], torch.ones(len(d[key]), 1, dtype=torch.float64)], 1)

    a = design(train)
    w = torch.linalg.solve(a.T @ a + 1e-3 * a.square().mean() * torch.eye(a.shape[1], dtype=torch.float64),
                           a.T @ train["yaw"])
    return float((design(val) @ w - val["yaw"]).abs().mean())


report = {"date": datetime.date.today().isoformat(), "machine": machine(), "good_radps": args.good, "runs": {}}
for folder in args.runs:
    run = load_run(folder.name, folder)
    if not run.cfg.model.lidar_motion:
        raise SystemExit(f"{folder}: trained without --lidar-motion: it has no scan match to split by")
    train, val = build_datasets(run.tc, run.cfg, cache_dir("train"), progress=False)
    e = errors(run, val)
    good = e["matched"] & (e["match_yaw"] < args.good)
    parts = {"good match": good, "bad match": e["matched"] & ~good, "no match": ~e["matched"], "all": torch.ones_like(good)}
    report["runs"][str(folder)] = {
        part: {"samples": int(m.sum()), **{f"{k}_mae": float(e[k][m].mean()) for k in
               ("match_speed", "match_yaw", "gyro_yaw", "clean_speed", "clean_yaw", "imu_drop_speed", "imu_drop_yaw",
                "imu_only_speed", "imu_only_yaw")}}
        for part, m in parts.items() if m.any()}
    fit, held_out = stages(run, train), stages(run, val)
    report["runs"][str(folder)]["probe_yaw_mae"] = {k: probe_mae(fit, held_out, k) for k in ("chunks", "imu_tokens", "latents")}

args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
print("| run | samples | share | match: speed / yaw | gyro: yaw | clean: speed / yaw | IMU dropped: speed / yaw | IMU alone: speed / yaw |")
print("|---|---|---|---|---|---|---|---|")
for folder, parts in report["runs"].items():
    n = parts["all"]["samples"]
    for part, r in parts.items():
        if part == "probe_yaw_mae":
            continue
        print(f"| {Path(folder).name} {part} | {r['samples']} | {r['samples'] / n:.0%} | {r['match_speed_mae']:.3f} / "
              f"{r['match_yaw_mae']:.3f} | {r['gyro_yaw_mae']:.3f} | {r['clean_speed_mae']:.3f} / {r['clean_yaw_mae']:.3f} | "
              f"{r['imu_drop_speed_mae']:.3f} / {r['imu_drop_yaw_mae']:.3f} | {r['imu_only_speed_mae']:.3f} / "
              f"{r['imu_only_yaw_mae']:.3f} |")
print("\n| run | linear probe of the yaw rate (clean) from: IMU chunks / IMU tokens / fused latents |\n|---|---|")
for folder, parts in report["runs"].items():
    p = parts["probe_yaw_mae"]
    print(f"| {Path(folder).name} | {p['chunks']:.3f} / {p['imu_tokens']:.3f} / {p['latents']:.3f} |")
