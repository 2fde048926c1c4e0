"""How soon the fusion stops trusting a frozen sensor, through the node's own path (issue #15).

    MUJOCO_GL=egl python benchmarks/freeze_detection.py [--episodes 4] [--checkpoint PATH]
        [--out benchmarks/results/freeze_detection.json]

Per sensor (camera, lidar, IMU) and episode: a simulated Control episode whose sensor freezes at a
random time 3-6 s in and stays frozen (the simulator's `{sensor}_freeze` fault: the driver keeps
re-sending its last image, sweep or reading with fresh stamps), driven by the training data's smooth
random policy. Its frames go through the node's path -- `SensorSync`, the fusion clock at 20 Hz
(`--fusion-hz`), the tokenizer and the model on ONNX Runtime -- and the detection latency is the time from the
freeze to the first fusion in which the sensor's trust is below `outputs.TRUST_THRESHOLD`. Before
the freeze, the share of fusions in which any sensor is below it counts the false alarms.
"""

import argparse
import dataclasses
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
parser.add_argument("--episodes", type=int, default=4, help="episodes per sensor")
parser.add_argument("--seconds", type=float, default=10.0)
parser.add_argument("--checkpoint", default=None, help="fusion model (default: the packaged one)")
parser.add_argument("--fusion-hz", type=float, default=20.0, help="the fusion clock (the node's default 20 Hz)")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "freeze_detection.json")
args = parser.parse_args()

pipeline = FusionPipeline.create(args.checkpoint, backend="onnxruntime", threads=1)
names = pipeline.cfg.sensor_names  # the model's sensors; those the simulator can freeze are measured
frozen = [n for n in names if f"{n}_freeze" in {f.name for f in dataclasses.fields(FaultConfig)}]
rows = []
for sensor in frozen:
    m = names.index(sensor)
    for k in range(args.episodes):
        seed = 400_000 + 100 * m + k  # none of training's, validation's or eval-robustness's episodes
        rng = np.random.default_rng(seed)
        onset_s = float(rng.uniform(3.0, 6.0))
        env = RobotEnv("control", faults=FaultConfig(**{f"{sensor}_freeze": FaultSpec.window(onset_s)}))
        clock = FusionClock(SensorSync(SyncConfig.for_model(pipeline.cfg)), args.fusion_hz)
        trust = []  # (t [s], trust (S,), present (S,))
        try:
            for info in random_drive(env, rng, seed, args.seconds):  # as training's episodes
                for snap in clock.step(info["frames"], info["time_ns"]):
                    state = pipeline.fuse(snap)
                    trust.append((snap.stamp_ns / NS_PER_S, state.trust, state.present))
        finally:
            env.close()
        before = [(tr, p) for t, tr, p in trust if t < onset_s]
        alarms = sum(bool(np.any(p & (tr < TRUST_THRESHOLD))) for tr, p in before)
        below = np.mean([p & (tr < TRUST_THRESHOLD) for tr, p in before], axis=0) if before else np.zeros(len(names))
        detected = [t for t, tr, p in trust if t >= onset_s and tr[m] < TRUST_THRESHOLD]
        after = [tr[m] for t, tr, p in trust if t >= onset_s]
        rows.append({"sensor": sensor, "seed": seed, "onset_s": round(onset_s, 3),
                     "latency_s": round(detected[0] - onset_s, 3) if detected else None,
                     "frozen_fusions_below": round(len(detected) / max(len(after), 1), 3),
                     "false_alarm_share_before": round(alarms / max(len(before), 1), 4),
                     "false_alarm_share_before_by_sensor": dict(zip(names, np.round(below, 4).tolist())),
                     "ended_s": round(trust[-1][0], 2) if trust else 0.0})
        print(rows[-1])

summary = {}
for sensor in frozen:
    mine = [r for r in rows if r["sensor"] == sensor]
    latencies = [r["latency_s"] for r in mine if r["latency_s"] is not None]
    summary[sensor] = {"episodes": len(mine), "detected": len(latencies),
                       "latency_s_max": max(latencies) if latencies else None,
                       "latency_s_median": float(np.median(latencies)) if latencies else None,
                       "frozen_fusions_below_mean": float(np.mean([r["frozen_fusions_below"] for r in mine])),
                       "false_alarm_share_before_mean": float(np.mean([r["false_alarm_share_before"] for r in mine]))}
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": pipeline.model_source,
          "threshold": TRUST_THRESHOLD, "episodes": rows, "summary": summary}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
print("| sensor | detected | latency median / max [s] | frozen fusions below threshold | false alarms before |")
print("| --- | --- | --- | --- | --- |")
for sensor, s in summary.items():
    lat = "-" if s["latency_s_max"] is None else f"{s['latency_s_median']:.2f} / {s['latency_s_max']:.2f}"
    print(f"| {sensor} | {s['detected']} of {s['episodes']} | {lat} | {100 * s['frozen_fusions_below_mean']:.0f}% "
          f"| {100 * s['false_alarm_share_before_mean']:.1f}% |")
