"""Does the trust tell a robot standing still from a frozen sensor? (issue #15)

    MUJOCO_GL=egl python benchmarks/still_trust.py [CHECKPOINT ...] [--episodes 3]
        [--out benchmarks/results/still_trust.json]

A robot that stands still sees the same scene frame after frame: its healthy sensors change by their
noise alone (pixel noise, range noise), a frozen one not at all. Per checkpoint (default: the
packaged model), simulated episodes of each task (Control, Navigate, Memory; seeds no training,
validation or evaluation uses) in which the robot stands still for `--still-s` seconds, then drives
the training data's smooth random policy for `--drive-s` more. Their frames go through the node's
path (`SensorSync`, the fusion clock at 20 Hz, tokenizer, model on ONNX Runtime):

- healthy: per sensor, the share of fusions whose trust is below `outputs.TRUST_THRESHOLD` while
  the robot stands (after the first second: the first frames have no previous one to compare) and
  while it drives (false alarms);
- frozen while standing: each sensor in turn frozen from `--freeze-at-s` on (the simulator's
  `{sensor}_freeze` fault), the share of its fusions below the threshold while the robot still
  stands, and the time to the first.

Every checkpoint sees the same episodes, in one run.
"""

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

import fusion_attn.sim  # noqa: F401 - picks the headless GL backend before mujoco loads
from fusion_attn.bench import machine
from fusion_attn.clock import FusionClock
from fusion_attn.frames import NS_PER_S
from fusion_attn.learn.data import random_drive
from fusion_attn.outputs import TRUST_THRESHOLD
from fusion_attn.pipeline import FusionPipeline
from fusion_attn.sim.faults import FaultConfig, FaultSpec
from fusion_attn.sim.robot import RobotEnv
from fusion_attn.sync import SensorSync, SyncConfig

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoints", nargs="*", default=[None], help="fusion models (default: the packaged one)")
parser.add_argument("--episodes", type=int, default=3, help="per task and condition")
parser.add_argument("--still-s", type=float, default=5.0)
parser.add_argument("--drive-s", type=float, default=4.0)
parser.add_argument("--freeze-at-s", type=float, default=2.0)
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "still_trust.json")
args = parser.parse_args()
TASKS = ("control", "navigate", "memory")
SETTLE_S = 1.0  # the first frames have no previous frame to compare with


def episode(pipeline: FusionPipeline, task: str, seed: int, frozen: str | None) -> list[tuple[float, np.ndarray]]:
    """(fusion time [s], trust (3,) with NaN for an absent sensor) of one episode."""
    faults = FaultConfig(**({f"{frozen}_freeze": FaultSpec.window(args.freeze_at_s)} if frozen else {}))
    env = RobotEnv(task, faults=faults)
    clock = FusionClock(SensorSync(SyncConfig.for_model(pipeline.cfg)), 20.0)
    out = []
    try:
        for info in random_drive(env, np.random.default_rng(seed), seed, args.still_s + args.drive_s,
                                 stand_s=args.still_s):  # stands, then the training data's drive
            for snap in clock.step(info["frames"], info["time_ns"]):
                state = pipeline.fuse(snap)
                out.append((snap.stamp_ns / NS_PER_S, np.where(state.present, state.trust, np.nan)))
    finally:
        env.close()
    return out


def below(trust: list[np.ndarray], m: int) -> float | None:
    values = [t[m] for t in trust if not np.isnan(t[m])]
    return round(float(np.mean(np.array(values) < TRUST_THRESHOLD)), 4) if values else None


def mean(rows: list[dict], key: str, frozen: str | None = None) -> float | None:
    values = [r[key] for r in rows if r["frozen"] == frozen and r.get(key) is not None]
    return round(float(np.mean(values)), 4) if values else None


report = {"date": datetime.date.today().isoformat(), "machine": machine(), "threshold": TRUST_THRESHOLD,
          "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoints", "out")}, "models": {}}
for checkpoint in args.checkpoints:
    pipeline = FusionPipeline.create(checkpoint, backend="onnxruntime", threads=1)
    names = pipeline.cfg.sensor_names  # the model's sensors, in the order of its trust
    rows = []
    for t, task in enumerate(TASKS):
        for k in range(args.episodes):
            seed = 420_000 + 100 * t + k  # none of training's, validation's, eval-robustness's or freeze_detection's
            fused = episode(pipeline, task, seed, None)
            standing = [tr for s, tr in fused if SETTLE_S <= s < args.still_s]
            driving = [tr for s, tr in fused if s >= args.still_s]
            row = {"task": task, "seed": seed, "frozen": None}
            row.update({f"{m}_below_standing": below(standing, i) for i, m in enumerate(names)})
            row.update({f"{m}_below_driving": below(driving, i) for i, m in enumerate(names)})
            row.update({f"{m}_trust_standing": round(float(np.nanmean([tr[i] for tr in standing])), 4)
                        for i, m in enumerate(names)})
            rows.append(row)
            for i, sensor in enumerate(names):
                fused = episode(pipeline, task, seed, sensor)
                stuck = [(s, tr) for s, tr in fused if args.freeze_at_s <= s < args.still_s]
                caught = [s for s, tr in stuck if not tr[i] >= TRUST_THRESHOLD]  # NaN (absent) counts as caught
                rows.append({"task": task, "seed": seed, "frozen": sensor,
                             "frozen_below_standing": round(len(caught) / max(len(stuck), 1), 4),
                             "latency_s": round(caught[0] - args.freeze_at_s, 3) if caught else None})
            print(checkpoint or "packaged", task, seed, {k: v for k, v in rows[-4].items() if "below" in k}, flush=True)

    summary = {m: {"below_standing": mean(rows, f"{m}_below_standing"), "below_driving": mean(rows, f"{m}_below_driving"),
                   "trust_standing": mean(rows, f"{m}_trust_standing"),
                   "frozen_below_standing": mean(rows, "frozen_below_standing", m),
                   "latency_s_max": max((r["latency_s"] for r in rows if r["frozen"] == m and r["latency_s"] is not None),
                                        default=None),
                   "frozen_caught": sum(r["latency_s"] is not None for r in rows if r["frozen"] == m),
                   "frozen_episodes": sum(r["frozen"] == m for r in rows)} for m in names}
    report["models"][pipeline.model_source] = {"episodes": rows, "summary": summary}

args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
print("\n| model | sensor | healthy, standing: below threshold (mean trust) | healthy, driving: below | "
      "frozen while standing: below | caught, latency max [s] |\n| --- | --- | --- | --- | --- | --- |")
for source, result in report["models"].items():
    for m, s in result["summary"].items():
        print(f"| {'/'.join(Path(source).parts[-2:])} | {m} | {100 * s['below_standing']:.1f}% ({s['trust_standing']:.3f}) | "
              f"{100 * s['below_driving']:.1f}% | {100 * s['frozen_below_standing']:.0f}% | "
              f"{s['frozen_caught']} of {s['frozen_episodes']}, {s['latency_s_max']} |")
