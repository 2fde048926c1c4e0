"""How precisely a `--rate-readout` run's rate reads and its heads tell the yaw rate, and what stands between
them (issue #15), on the run's own validation samples, clean:

    MUJOCO_GL=egl python benchmarks/rate_reads.py runs/imu2_rate-s0 [runs/imu2_rate_randinit-s0 ...]
        [--out benchmarks/results/rate_reads.json]

Per run: each six-axis stream's own read (ModelConfig.rate_readout) and the mean of the reads against the
truth; the heads' yaw rate and speed (`heads_*`: for a `--rate-output` model its own ego_rate, the heads'
velocity prediction), and the gain its EgoRate learned for each value; the newest gyro sample of each
stream read as it is (its token unscaled: what the read starts from). Where the rate is added onto the
latents (not `--rate-output`), the two things that mix it with them:
  spread          the per-sample spread (std) of the flattened latents, which the heads' first LayerNorm divides
                  each sample by, with the rate's embedding and without it (its weight zeroed), and the error a
                  yaw rate would get from that rescale alone: |yaw| * |1 - mean spread / spread|
  along_embedding the rate read back from the token mean along its embedding (the embedding's pseudo-inverse,
                  then an affine map fitted on the first half of the samples), its error on the second half,
                  before and after that LayerNorm
"""

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion_attn.config import cache_dir
from fusion_attn.learn.augment import gather
from fusion_attn.learn.data import build_datasets
from fusion_attn.learn.loop import read_state
from fusion_attn.learn.robustness import load_run
from fusion_attn.tokenize import IMU_AXES, imu_samples

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", type=Path, help="`fusion-attn train --rate-readout` run folders")
parser.add_argument("--out", type=Path)
args = parser.parse_args()
torch.set_num_threads(1)


def measure(folder: Path) -> dict:
    run = load_run(folder.name, folder)
    if getattr(run.model, "rate_readout", None) is None:
        raise SystemExit(f"{folder}: not a --rate-readout run")
    _, tc, cfg = read_state(folder / "train_state.pt")
    _, val = build_datasets(tc, cfg, cache_dir("train"), progress=False)
    t = val.tensors()
    idx = torch.arange(len(val))
    labelled = t["labelled"]
    truth = t["velocity"]
    x = gather(t, idx)
    tau = torch.ones(len(idx), 1 + len(cfg.sensors))
    model = run.model
    with torch.no_grad():
        out = model.run(x, tau)
        head = run.heads.denormalise("velocity", run.heads(out["latents"].flatten(1), out.get("ego_rate"))["velocity"])

    def error(value: torch.Tensor, k: int = 1) -> float:  # k: 0 speed, 1 yaw rate
        return round(float((value - truth[:, k]).abs()[labelled].mean()), 4)

    result = {"samples": int(labelled.sum()), "mean_abs_yaw_radps": round(float(truth[labelled, 1].abs().mean()), 4),
              "heads_yaw_radps": error(head[:, 1]), "reads_mean_yaw_radps": error(out["rate_reads"].mean(1)[:, 1]),
              "mean_abs_speed_mps": round(float(truth[labelled, 0].abs().mean()), 4), "heads_speed_mps": error(head[:, 0], 0)}
    if model.ego_rate is not None:  # a --rate-output run: how much of each value of the reads' average it takes
        result["ego_rate_gain"] = [round(float(g), 4) for g in model.ego_rate.gain]
    for i, name in enumerate(cfg.streams):
        result[f"{name}_read_speed_mps"] = error(out["rate_reads"][:, i, 0], 0)
        gyro = imu_samples(t[f"{name}_chunks"], cfg.chunk_tokens(name))[:, -1, -1, IMU_AXES.index("gyro_z")]
        scale = cfg.odometry.angular_scale if name == "odometry" else cfg.imu.gyro_scale
        result[f"{name}_read_yaw_radps"] = error(out["rate_reads"][:, i, 1])
        result[f"{name}_newest_sample_yaw_radps"] = error(gyro * scale)
    if model.rate_embed is None:  # a --rate-output run: the rate is not in the latents
        return result
    with torch.no_grad():
        embed = model.rate_embed.weight.clone()
        model.rate_embed.weight.zero_()
        plain = model.run(x, tau)["latents"].flatten(1)
        model.rate_embed.weight.copy_(embed)
    flat = out["latents"].flatten(1)
    spread, plain_spread = flat.std(1, unbiased=False), plain.std(1, unbiased=False)
    rescale = (truth[:, 1].abs() * (1 - spread.mean() / spread).abs())[labelled].mean()
    result["spread"] = {"with_rate": [round(float(spread.mean()), 4), round(float(spread.std()), 4)],
                        "without_rate": [round(float(plain_spread.mean()), 4), round(float(plain_spread.std()), 4)],
                        "rescale_yaw_radps": round(float(rescale), 4)}
    half = len(idx) // 2
    fit, judge = labelled.clone(), labelled.clone()
    fit[half:], judge[:half] = False, False
    tokens = out["latents"].shape[1]
    inverse = torch.linalg.pinv(embed.double())  # (2, D)
    along = {}
    for key, feature in (("raw", flat), ("after_layernorm", F.layer_norm(flat, flat.shape[1:]))):
        read = feature.reshape(len(feature), tokens, -1).mean(1).double() @ inverse.T  # (B, 2)
        design = torch.cat([read, torch.ones(len(read), 1, dtype=torch.float64)], 1)
        target = truth[:, 1:2].double()
        solution = torch.linalg.lstsq(design[fit], target[fit]).solution
        along[f"{key}_yaw_radps"] = round(float((design[judge] @ solution - target[judge]).abs().mean()), 4)
    result["along_embedding"] = along
    return result


results = {str(run): measure(run) for run in args.runs}
print(json.dumps(results, indent=1))
if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
                                    "torch": torch.__version__, "runs": results}, indent=1) + "\n")
