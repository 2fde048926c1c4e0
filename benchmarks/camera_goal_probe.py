"""Which camera patch embedding lets a learned camera path find the goal post (issue #15). The camera
alone, nothing else of the model: each embedding below, the model's fixed position embedding and a
camera goal objective's own head trained together on the clean camera patches of the default training
episodes, then read on the validation episodes. The head (`--head`): `columns`
(`objectives.CameraGoalColumns`, `--camera-goal-weight`'s: per 45° column of patches, whether the goal
stands in it, its distance and where across the column) or `tokens` (`objectives.CameraGoalTokens`:
per patch, whether the post's top edge is in it, the distance and where across and down the patch).
The embeddings:

- `linear`: one linear layer over each 16 x 16 patch (the packaged model's);
- `stem 4x4`: `model.PatchStem` over a 4 x 4 grid of 4-pixel cells, 32 features each (`--camera-stem 32`);
- `stem per pixel`: `PatchStem` whose cells are single pixels (`--camera-stem 8 --camera-stem-cells 16`):
  a per-pixel layer (a 1 x 1 convolution) before anything pools over the patch;
- `stem 4x4 + column`: the 4 x 4 stem and one self-attention block along each column of patches
  (`--camera-stem 32 --camera-column-blocks 1`): each patch sees what stands above and below it;
- `stem 4x4 + 2 columns`: the same with two such blocks (`--camera-column-blocks 2`).

The labels (`--labels`): `frame`, the goal as the camera's frame saw it (at its stamp, what
`--camera-goal-weight` trains on: `learn.data.goal_at_frames`), or `fusion`, the goal at the fusion
instant, up to a camera period later (the robot turns 5° in that time on average; what it trained on
before, kept to compare with the earlier figures; both on the samples whose frame has a goal at its
stamp, a few fewer than the earlier figures had).

The post is one or two pixels wide at the tokenizer's 96 x 128 (benchmarks/goal_range.py reads its range
off that image to 0.238 m by geometry). A linear layer over the patch averages its pixels into the
background before anything non-linear sees them; the question is how much of the post's place and
range each embedding lets a head learn in the same steps.

    python benchmarks/camera_goal_probe.py [--steps 2000] [--seeds 0 1] [--sim-episodes 48] [--head columns]
        [--embeddings linear "stem 4x4"] [--labels frame] [--out benchmarks/results/camera_goal_probe.json]

Batch 64, AdamW at 1e-3, one CPU thread; the share of validation samples whose goal column (of 45°)
the head picks (with `tokens`: the column of the patch it picks), the distance there (mean absolute
error), each after `--steps`, and the training samples' figures beside them (every fourth sample).
"""

import argparse
import datetime
import json
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from fusion_attn.bench import machine
from fusion_attn.config import FusionConfig, ModelConfig, cache_dir
from fusion_attn.learn.augment import gather
from fusion_attn.learn.data import build_datasets
from fusion_attn.learn.loop import TrainConfig
from fusion_attn.learn.objectives import (
    CameraGoalColumns,
    CameraGoalTokens,
    camera_goal_loss,
    camera_goal_token_loss,
    goal_column,
)
from fusion_attn.model import SensorEmbedding
from fusion_attn.sim.sensors import SensorConfig
from fusion_attn.sim.tasks import post_top_in_image

# camera_stem, camera_stem_cells, camera_column_blocks
EMBEDDINGS = {"linear": (0, 4, 0), "stem 4x4": (32, 4, 0), "stem per pixel": (8, 16, 0), "stem 4x4 + column": (32, 4, 1),
              "stem 4x4 + 2 columns": (32, 4, 2)}


class CameraPath(nn.Module):
    """Patches (B, N, p*p*3) -> the goal head's output, through the model's own camera path (its other
    sensors' layers stay unused)."""

    def __init__(self, cfg: FusionConfig, head: str):
        super().__init__()
        self.sensors = SensorEmbedding(cfg)
        self.head = CameraGoalTokens(cfg) if head == "tokens" else CameraGoalColumns(cfg)

    def forward(self, patches):
        return self.head(self.sensors.camera_appearance(patches))


def clean_camera(ds, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The simulated samples with a goal and a camera frame: (patches (N, tokens, features), goal (N, 2)),
    the goal at the frame's stamp (labels "frame") or at the fusion instant ("fusion"). Either way the
    samples are those with both, so that the two read the same images."""
    t = ds.tensors()
    keep = np.flatnonzero(ds.arrays["labelled"] & np.isfinite(ds.arrays["goal"]).all(-1) & (ds.source == 0)
                          & ds.arrays["camera_mask"].any(1) & np.isfinite(ds.arrays["goal_at_camera"]).all(-1))
    idx = torch.from_numpy(keep)
    patches = torch.cat([gather(t, i, previous=False)["camera_patches"] for i in idx.split(512)])
    return patches, t["goal_at_camera" if labels == "frame" else "goal"][idx].float()


@torch.no_grad()
def read(path: CameraPath, patches, goal, scale) -> dict[str, float]:
    pred = torch.cat([path(p) for p in patches.split(512)])
    cols = pred.shape[-2]
    flat = pred.flatten(1, -2)  # (B, cols, 3) or (B, rows * cols, 4): one entry per column or per patch
    picked = flat[..., 0].argmax(1)
    distance = flat[torch.arange(len(flat)), picked, 1] * scale.std_goal[0] + scale.mean_goal[0]
    picked = picked % cols
    _, column, seen = goal_column(goal[:, 1], cols, SensorConfig().image_x)
    return {"right_column_share": float(((picked == column) & seen).float().mean()),
            "distance_mae_m": float((distance - goal[:, 0]).abs().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sim-episodes", type=int, default=TrainConfig.sim_episodes,
                        help="training episodes (the default's 48; the validation episodes stay the same)")
    parser.add_argument("--head", choices=("columns", "tokens"), default="columns")
    parser.add_argument("--embeddings", nargs="+", choices=tuple(EMBEDDINGS), default=list(EMBEDDINGS))
    parser.add_argument("--labels", choices=("frame", "fusion"), default="frame",
                        help="the goal at the camera frame's stamp, or at the fusion instant (the earlier figures')")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "camera_goal_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    tc = TrainConfig(sim_episodes=args.sim_episodes)
    train_set, val_set = build_datasets(tc, tc.fusion_config(), cache_dir("train"), progress=False)
    (train_p, train_g), (val_p, val_g) = clean_camera(train_set, args.labels), clean_camera(val_set, args.labels)
    scale = SimpleNamespace(mean_goal=train_g.mean(0), std_goal=train_g.std(0))
    frame, fusion = clean_camera(val_set, "frame")[1], clean_camera(val_set, "fusion")[1]
    turned = torch.rad2deg(torch.remainder(frame[:, 1] - fusion[:, 1] + torch.pi, 2 * torch.pi) - torch.pi).abs().mean()
    every = torch.ones(64, dtype=torch.bool)
    if args.head == "tokens":
        loss_of = partial(camera_goal_token_loss, post_top=partial(post_top_in_image, SensorConfig()), heads=scale)
    else:
        loss_of = partial(camera_goal_loss, image_x=SensorConfig().image_x, heads=scale)
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "steps": args.steps,
              "sim_episodes": args.sim_episodes, "head": args.head, "labels": args.labels,
              "samples": {"train": len(train_g), "validation": len(val_g)},
              "bearing_frame_to_fusion_deg": float(turned), "runs": {}}
    print(f"{len(train_g)} training, {len(val_g)} validation samples; {args.steps} steps; the goal's bearing "
          f"at the frame's stamp and at the fusion instant differ by {float(turned):.1f}° on average (validation)")
    print("| embedding | seed | goal column picked: validation / training | distance at it: validation / training "
          "| s per step |\n|---|---|---|---|---|")
    for name in args.embeddings:
        channels, cells, column_blocks = EMBEDDINGS[name]
        cfg = FusionConfig(model=ModelConfig(camera_stem=channels, camera_stem_cells=cells, camera_column_blocks=column_blocks))
        for seed in args.seeds:
            torch.manual_seed(seed)
            path = CameraPath(cfg, args.head)
            opt = torch.optim.AdamW(path.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            for _ in range(args.steps):
                i = torch.randint(0, len(train_g), (64,), generator=gen)
                loss = loss_of(path(train_p[i]), train_g[i], every)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            per_step = (time.perf_counter() - start) / args.steps
            val, train = read(path, val_p, val_g, scale), read(path, train_p[::4], train_g[::4], scale)
            report["runs"][f"{name}, seed {seed}"] = {"validation": val, "training": train, "s_per_step": per_step}
            print(f"| {name} | {seed} | {val['right_column_share']:.0%} / {train['right_column_share']:.0%} | "
                  f"{val['distance_mae_m']:.3f} / {train['distance_mae_m']:.3f} m | {per_step:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["command"] = (f"python benchmarks/camera_goal_probe.py --steps {args.steps} --sim-episodes {args.sim_episodes} "
                         f"--head {args.head} --labels {args.labels} --seeds " + " ".join(map(str, args.seeds)) + " --embeddings "
                         + " ".join(f"'{e}'" for e in args.embeddings))
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
