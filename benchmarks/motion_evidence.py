"""How much ego-motion the camera's frame pairs carry (issue #15): the floor of the column-shift evidence.

    MUJOCO_GL=egl python benchmarks/motion_evidence.py [--camera-size 96 128] [--shifts 6] [--trigger timer]
        [--out benchmarks/results/motion_evidence.json]

The model's camera motion evidence (`model.column_shift_match`, `--camera-shifts`) matches each
patch's column profile against the previous frame's shifted by -S..S columns. This measures what
those curves can tell about the robot's speed and yaw rate without any model, on the training and
validation episodes of `fusion-attn train` (the same cached shards, clean, simulated only):
- a linear probe (ridge regression on every patch's curve and its sub-column shift per second),
  fitted on the training episodes, its mean absolute error on the validation episodes;
- a direct yaw-rate estimate: the median over patches of the sub-column shift (a parabola through
  each curve's minimum), in radians per second of the panorama, with its least-squares scale; its
  error against the true yaw rate at the fusion instant and against the mean of the rates at the
  two frames' own capture times (what a frame pair can see at best: the rotation between them);
- the lag floor: how far the yaw rate at the fusion instant is from that mean (a frame is up to one
  frame period old when it is fused, and the pair spans another).
And the lidar (--lidar-samples, 0: skip): the same question for the lidar tokens the model sees
(every pillar's points, this sweep's and the previous one's): a point-to-line ICP (nearest
neighbours, normals from each current point's neighbourhood, a coarse yaw search over +-0.3 rad,
then Gauss-Newton steps with a shrinking gate) between the two sweeps' points, in numpy, on every
k-th validation sample; its speed and yaw rate (minus the translation along x and minus the rotation,
per second) against the truth now and the mean over the two sweeps' capture times: mean, median
and 90th percentile of the error, and the lag floor as for the camera (also against the truth at the
newer sweep's own time, "arrival": what a fusion on each sweep's arrival would have to match); and the same for the model's
own scan match (`model.lidar_scan_match`, `--lidar-motion`: lines per pillar, no neighbour search).
--trigger lidar takes the samples as `fusion-attn train --trigger lidar` does, one per sweep: the
truth "now" is then that sample's label (taken at the end of the control step the sweep arrived in),
and frame ticks are counted in sweeps, so the camera's figures are approximate there.
For reference: predicting the training mean, and the trained model's error with and without the IMU
are in its metrics.json (`val`).
"""

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
from fusion_attn.bench import machine
from fusion_attn.config import cache_dir
from fusion_attn.learn.augment import gather
from fusion_attn.learn.data import Dataset, build_datasets
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.model import column_shift_match, lidar_scan_match
from fusion_attn.tokenize import LIDAR_INDEX


def curves(ds: Dataset, cfg, shifts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> curves (n, N_c, 2S+1), sub-column shift per patch (n, N_c), true velocity (n, 2), and the
    index of each sample's previous camera frame, for the labelled samples with a previous frame."""
    data = {k: torch.from_numpy(v) for k, v in ds.arrays.items()}
    x = gather(data, torch.arange(len(ds)))
    keep = (x["camera_prev_mask"].any(1) & data["labelled"]).numpy()
    with torch.no_grad():
        c = column_shift_match(x["camera_patches"], x["camera_prev_patches"], cfg.camera, shifts).numpy()
    k = c.argmin(-1).clip(1, 2 * shifts - 1)
    left, mid, right = (np.take_along_axis(c, (k + o)[..., None], -1)[..., 0] for o in (-1, 0, 1))
    sub = k - shifts + 0.5 * (left - right) / np.maximum(left - 2 * mid + right, 1e-6)
    interval = (x["camera_prev_age"] - x["camera_age"])[:, 0].numpy()
    sub_per_s = sub / np.maximum(interval, 1e-3)[:, None]
    return c[keep], sub_per_s[keep], ds.arrays["velocity"][keep], np.flatnonzero(keep)


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _normals(p: np.ndarray, radius: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) points -> each one's normal (n, 2), and whether its neighbourhood is a line."""
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * (radius / 2) ** 2)) * (d2 < radius ** 2)
    centre = (w @ p) / w.sum(1, keepdims=True)
    offset = p[None] - centre[:, None]  # (n, n, 2)
    cov = np.einsum("ij,ijk,ijl->ikl", w, offset, offset) / w.sum(1)[:, None, None]
    values, vectors = np.linalg.eigh(cov)
    return vectors[:, :, 0], (values[:, 0] < 0.1 * np.maximum(values[:, 1], 1e-9)) & (w.sum(1) > 2.5)


def scan_match(p: np.ndarray, q: np.ndarray) -> tuple[float, np.ndarray] | None:
    """Point-to-line ICP: (rotation, translation) with p ≈ R q + t, or None with too few lines."""
    normal, line = _normals(p)
    if line.sum() < 10 or len(q) < 10:
        return None
    theta = min(np.linspace(-0.3, 0.3, 31), key=lambda th: np.sqrt(
        (((q @ _rotation(th).T)[:, None] - p[None]) ** 2).sum(-1).min(1)).clip(0, 1).mean())
    t = np.zeros(2)
    for gate in (1.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1):
        moved = q @ _rotation(theta).T + t
        d2 = ((moved[:, None] - p[None]) ** 2).sum(-1)
        j = d2.argmin(1)
        keep = (d2[np.arange(len(moved)), j] < gate ** 2) & line[j]
        if keep.sum() < 6:
            break
        n, m = normal[j[keep]], moved[keep]
        residual = (n * (m - p[j[keep]])).sum(1)
        turn = np.stack([-(m[:, 1] - t[1]), m[:, 0] - t[0]], 1)  # d(R q)/dθ
        step = np.linalg.lstsq(np.c_[(n * turn).sum(1), n], -residual, rcond=None)[0]
        theta, t = theta + step[0], t + step[1:]
    return float(theta), t


def frame_tick(ds: Dataset, i: np.ndarray, sensor: str, hz: float) -> np.ndarray:
    """Sample index of the fusion tick at which the frame fused at sample i was captured (age back), or
    the episode's first sample: where the ground truth for what that frame saw is."""
    back = np.rint(ds.arrays[f"{sensor}_age"][i, 0] * hz).astype(np.int64)
    return np.maximum(i - back, ds.arrays["seq_start"][i])


def lidar_motion(ds: Dataset, cfg, samples: int, hz: float) -> dict:
    """Scan matching between each sampled sweep's pillar points and the previous sweep's."""
    data = {k: torch.from_numpy(v) for k, v in ds.arrays.items()}
    every = max(1, len(ds) // samples)
    idx = torch.arange(0, len(ds), every)
    x = gather(data, idx)
    xy = [LIDAR_INDEX["x"], LIDAR_INDEX["y"]]
    interval = (x["lidar_prev_age"] - x["lidar_age"])[:, 0].numpy()
    rates, kept = [], []
    for k, i in enumerate(idx.tolist()):
        if not ds.arrays["labelled"][i] or interval[k] <= 0:
            continue
        p = x["lidar_points"][k][..., xy][x["lidar_mask"][k]].double().numpy() * cfg.lidar.range_m
        q = x["lidar_prev_points"][k][..., xy][x["lidar_prev_mask"][k]].double().numpy() * cfg.lidar.range_m
        match = scan_match(p, q)
        if match is not None:  # the sensor moved by -t and turned by -theta
            rates.append((-match[1][0] / interval[k], -match[0] / interval[k]))
            kept.append(i)
    rates, kept = np.array(rates), np.array(kept)
    out = {"sampled": len(idx), "matched": len(kept),
           "frame_age_s": float(np.median(ds.arrays["lidar_age"][kept, 0]))}
    out.update(_rate_errors(ds, rates, kept, hz))
    # the model's own scan match (model.lidar_scan_match, --lidar-motion) on the same samples
    with torch.no_grad():
        f = lidar_scan_match(x, cfg.lidar).numpy()  # yaw rate, speed, sideways, share, log rms, valid
    ok = ds.arrays["labelled"][idx.numpy()] & (f[:, 5] > 0)
    out["model_scan_match"] = {"matched": int(ok.sum()), "median_inlier_share": float(np.median(f[ok, 3])),
                               **_rate_errors(ds, f[ok][:, [1, 0]], idx.numpy()[ok], hz)}
    return out


def _rate_errors(ds: Dataset, rates: np.ndarray, kept: np.ndarray, hz: float) -> dict:
    """Errors of (speed, yaw rate) estimates at samples `kept` against the truth now and at the sweeps' times."""
    velocity = ds.arrays["velocity"]
    then, before = frame_tick(ds, kept, "lidar", hz), frame_tick(ds, ds.arrays["lidar_prev"][kept], "lidar", hz)
    frames = 0.5 * (velocity[then] + velocity[before])  # the mean over the two sweeps' own times
    out = {}
    for j, name in enumerate(("speed_mps", "yaw_rate_radps")):
        out[f"lag_floor_{name}"] = float(np.abs(velocity[kept, j] - frames[:, j]).mean())
        # fused as the newer sweep arrives (the node's trigger mode) the truth to match is the one at its time
        out[f"lag_floor_at_arrival_{name}"] = float(np.abs(velocity[then, j] - frames[:, j]).mean())
        for label, truth in (("now", velocity[kept, j]), ("frames", frames[:, j]), ("arrival", velocity[then, j])):
            err = np.abs(rates[:, j] - truth)
            out[f"{name}_vs_{label}"] = {"mae": float(err.mean()), "median": float(np.median(err)),
                                         "p90": float(np.percentile(err, 90))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--camera-size", type=int, nargs=2, default=(96, 128), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--shifts", type=int, default=6)
    parser.add_argument("--trigger", default="timer", help="the samples' instants, as `fusion-attn train --trigger`")
    parser.add_argument("--lidar-samples", type=int, default=400, help="validation samples scan-matched (0: skip)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "motion_evidence.json")
    args = parser.parse_args()
    tc = TrainConfig(bags=(), camera_size=tuple(args.camera_size), camera_shifts=args.shifts, trigger=args.trigger)
    cfg = tc.fusion_config()
    train, val = build_datasets(tc, cfg, cache_dir("train"), progress=False)
    c_tr, s_tr, v_tr, _ = curves(train, cfg, args.shifts)
    c_va, s_va, v_va, kept = curves(val, cfg, args.shifts)

    def design(c, s):
        return np.c_[c.reshape(len(c), -1), s, np.ones(len(c))]

    a, b = design(c_tr, s_tr), design(c_va, s_va)
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "camera_size": args.camera_size,
              "shifts": args.shifts, "trigger": args.trigger, "train_samples": len(a), "val_samples": len(b)}
    for j, name in enumerate(("speed_mps", "yaw_rate_radps")):
        w = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ v_tr[:, j])
        report[f"probe_{name}_mae"] = float(np.abs(b @ w - v_va[:, j]).mean())
        report[f"train_mean_{name}_mae"] = float(np.abs(v_va[:, j] - v_tr[:, j].mean()).mean())
    # direct yaw rate: the panorama's median shift, in rad/s; scaled by least squares (sign and lens)
    yaw = np.median(s_va, 1) * 2 * np.pi / cfg.camera.width
    truth = v_va[:, 1]
    velocity = val.arrays["velocity"]
    then, before = frame_tick(val, kept, "camera", tc.fusion_hz), frame_tick(val, val.arrays["camera_prev"][kept], "camera", tc.fusion_hz)
    frames = 0.5 * (velocity[then, 1] + velocity[before, 1])  # the mean over the two frames' own times
    for label, target in (("now", truth), ("frames", frames)):
        scale = float(yaw @ target / (yaw @ yaw))
        report[f"direct_yaw_vs_{label}"] = {"scale": scale, "mae_radps": float(np.abs(scale * yaw - target).mean())}
    report["camera_frame_age_s"] = float(np.median(val.arrays["camera_age"][kept, 0]))
    report["lag_floor_yaw_rate_radps"] = float(np.abs(truth - frames).mean())
    if args.lidar_samples:
        report["lidar_scan_match"] = lidar_motion(val, cfg, args.lidar_samples, tc.fusion_hz)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
