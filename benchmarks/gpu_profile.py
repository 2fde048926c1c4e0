"""Where the GPU time of the fusion step goes (issue #17): torch.profiler's kernel table.

    python benchmarks/gpu_profile.py [--out benchmarks/results/gpu_profile.json]

Profiles, after warm-up, eager calls with the inputs already on the GPU: the whole step
(step.FusionStep) at batch 1 on the standard configuration (640x480 camera, 120,000-point cloud,
100 IMU samples) and its parts (one camera frame, one lidar sweep, the fusion of their tokens), and the
model alone at batch 1 and 4096. Prints and writes the operators with the
most GPU time. Needs a CUDA GPU.
"""

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fusion_attn import bench
from fusion_attn.adapters import image_to_frame, imu_to_sample, pointcloud2_to_frame
from fusion_attn.backends.export import example_inputs
from fusion_attn.frames import NS_PER_S, ImuWindow
from fusion_attn.pipeline import load_model
from fusion_attn.step import STEP_INPUTS, FusionStep, lidar_tokens, step_inputs
from fusion_attn.tokenize import SensorSnapshot

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--calls", type=int, default=20)
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_profile.json")
args = parser.parse_args()
if not torch.cuda.is_available():
    raise SystemExit("gpu_profile: no CUDA GPU visible to torch")

model = load_model(None)[0].eval().cuda()
image, cloud, imus = bench.standard_messages()
camera, lidar = image_to_frame(image), pointcloud2_to_frame(cloud)
window = ImuWindow.from_samples([imu_to_sample(m) for m in imus])
snap = SensorSnapshot(NS_PER_S, camera, lidar, window, dataclasses.replace(camera, stamp_ns=1), dataclasses.replace(lidar, stamp_ns=1))
x = step_inputs([snap], np.ones((1, 4), np.float32), model.cfg)
step = FusionStep(model, camera.image.shape, camera.encoding).cuda().eval()
arrays = [torch.from_numpy(x[k]).cuda() for k in STEP_INPUTS]
cases = {"whole step, batch 1": (step, arrays)}
with torch.inference_mode():  # its parts, as the CUDA-graph backend runs them: each frame once, then the fusion
    frames = step.frame_tokens(*arrays[:6])
cases["camera patches, one frame"] = (step.camera, arrays[:1])
cases["lidar pillars, one sweep"] = (lambda points, count: lidar_tokens(points, count, model.cfg.lidar), arrays[2:4])
cases["fusion of frame tokens (FusionStep.fuse)"] = (step.fuse, [*frames, *arrays[6:]])
for batch in (1, 4096):
    cases[f"model alone, batch {batch}"] = (model, [torch.from_numpy(v).cuda() for v in example_inputs(model, batch).values()])

report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "machine": bench.machine(),
          "calls": args.calls, "cases": {}}
with torch.inference_mode():
    for name, (module, inputs) in cases.items():
        for _ in range(5):
            module(*inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                module(*inputs)
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        # kernel and memcpy rows only: an operator's row repeats its kernels' time
        on_gpu = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in on_gpu) / args.calls / 1e3
        kernels = sum(e.count for e in on_gpu) / args.calls
        top = [{"op": e.key, "gpu_ms_per_call": e.device_time_total / args.calls / 1e3, "calls": e.count // args.calls}
               for e in rows[:15]]
        report["cases"][name] = {"gpu_ms_per_call": total, "gpu_kernels_per_call": kernels, "top": top}
        print(f"\n{name}: {total:.3f} ms of GPU time per call, {kernels:.0f} kernels and copies")
        for r in top:
            print(f"  {r['gpu_ms_per_call']:8.3f} ms  x{r['calls']:<4} {r['op'][:90]}")
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2))
