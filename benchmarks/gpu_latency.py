"""The fusion step on a GPU against the CPU path, side by side in one run (issues #6, #17).

    python benchmarks/gpu_latency.py [--repeats 2000] [--replay-seconds 10] [--replay-batches 16 64] [--compile] [--out benchmarks/results/gpu_latency.json]

Standard configuration (640x480 camera, 120,000-point cloud, 100 IMU samples; the core benchmark's
payloads), default model. Timed end to end as the node calls them, numpy in, numpy out:
- whole step, batch 1: FusionPipeline.fuse on a rolling sequence of snapshots (new camera and lidar
  frame objects each time, the previous ones fused before), so each path tokenizes what it would on
  a robot: the new frames only (the CPU path's host tokenizers and the CUDA-graph backend keep each
  frame's tokens; torch eager's whole step tokenizes both frames of every step);
- model alone, batch 1 (tokens in): ONNX Runtime 1 thread, torch eager CUDA, CUDA graphs, and TensorRT
  engines where TensorRT is installed;
- throughput: fusions per second at batch 1..4096 (model alone) and 1..64 (whole step, CUDA graphs);
- whether a batched whole step gives byte-identical rows to single calls on the same device;
- replay of a recorded standard configuration (benchmarks/replay_speed.py's bag) with each backend, and
  batched (replay --batch) on CUDA graphs, its fused bag compared message by message with batch 1's;
- `--compile`: the model alone and the whole step through torch.compile (inductor, default mode)
  before CUDA-graph capture (CudaGraphBackend(compile=True)), with the time to compile and capture.
Writes the JSON after each part, so a run cut short keeps what it measured. Needs a CUDA GPU.
"""

import argparse
import dataclasses
import datetime
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from fusion_attn import bench
from fusion_attn.adapters import image_to_frame, imu_to_sample, pointcloud2_to_frame
from fusion_attn.backends.cuda_graph_backend import CudaGraphBackend
from fusion_attn.backends.engine_cache import TensorRTOptions
from fusion_attn.backends.export import example_inputs
from fusion_attn.backends.torch_backend import TorchBackend
from fusion_attn.frames import NS_PER_S, ImuWindow
from fusion_attn.pipeline import FusionPipeline, create_backend, load_model
from fusion_attn.replay import ReplayOptions, fused_difference, replay
from fusion_attn.step import step_inputs
from fusion_attn.tokenize import SensorSnapshot

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--repeats", type=int, default=2000)
parser.add_argument("--checkpoint", type=Path)
parser.add_argument("--replay-seconds", type=float, default=10.0, help="0: no replay")
parser.add_argument("--replay-batches", type=int, nargs="*", default=[16, 64],
                    help="batched replays on CUDA graphs (replay --batch), each against batch 1")
parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd model and step in CUDA graphs")
parser.add_argument("--device", default="cuda:0", help="cpu: a dry run of the script's bookkeeping, no figures")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_latency.json")
args = parser.parse_args()
if args.device != "cpu" and not torch.cuda.is_available():
    raise SystemExit("gpu_latency: no CUDA GPU visible to torch; run this on the GPU machine or the robot")
torch.set_num_threads(1)
cv2.setNumThreads(1)

model, source = load_model(args.checkpoint)
cfg = model.cfg
report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(args.device) if args.device != "cpu" else "none (dry run)", "machine": bench.machine(),
          "torch": torch.__version__, "model": source, "repeats": args.repeats}


def save():
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


# -- the standard snapshots: 8 camera and lidar frame objects in turn, each fused after the one before
image, cloud, imus = bench.standard_messages()
camera, lidar = image_to_frame(image), pointcloud2_to_frame(cloud)
window = ImuWindow.from_samples([imu_to_sample(m) for m in imus])
period = NS_PER_S // 10
cams = [dataclasses.replace(camera, stamp_ns=i * period) for i in range(8)]
clouds = [dataclasses.replace(lidar, stamp_ns=i * period) for i in range(8)]
now = NS_PER_S  # after every frame
snaps = [SensorSnapshot(now, cams[i], clouds[i], window, cams[i - 1], clouds[i - 1]) for i in range(8)]


def rolling(pipeline):
    state = {"i": 0}

    def call():
        state["i"] += 1
        return pipeline.fuse(snaps[state["i"] % 8])
    return call


pipelines = {"cpu path: host tokenizers + onnxruntime (1 thread)": FusionPipeline(cfg, create_backend("onnxruntime", model, threads=1)),
             "torch eager (cuda), whole step": FusionPipeline(cfg, TorchBackend(model, device=args.device, whole_step=True)),
             "torch CUDA graphs, whole step": FusionPipeline(cfg, create_backend("torch-cudagraph", model, device=args.device))}
cpu_name = next(iter(pipelines))
reference = pipelines[cpu_name].fuse(snaps[1])
whole = {}
for name, pipeline in pipelines.items():
    timing = bench._time(rolling(pipeline), args.repeats, warmup=50)
    out = pipeline.fuse(snaps[1])
    timing["max_abs_diff_vs_cpu_path"] = max(float(np.abs(getattr(out, k) - getattr(reference, k)).max())
                                             for k in ("pooled", "latents", "attention", "trust"))
    whole[name] = timing
    print(name, {k: round(v, 4) for k, v in timing.items()}, flush=True)
start = time.perf_counter()
for i in range(200):
    step_inputs([snaps[i % 8]], reference.tau[None], cfg)
whole["host packing for the one-graph engine alone (step_inputs)"] = {"mean_ms": (time.perf_counter() - start) / 200 * 1e3}
cpu_p50 = whole[cpu_name]["p50_ms"]
report["whole_step_batch1"] = whole
report["whole_step_speedup_p50_vs_cpu_path"] = {k: cpu_p50 / v["p50_ms"] for k, v in whole.items() if "p50_ms" in v}
save()

# -- the model alone, tokens in
inputs = example_inputs(model, batch=1)
backends = {"onnxruntime (cpu, 1 thread)": create_backend("onnxruntime", model, threads=1),
            "torch eager (cuda)": create_backend("torch", model, device=args.device),
            "torch CUDA graphs": create_backend("torch-cudagraph", model, device=args.device)}
tmp = tempfile.TemporaryDirectory()
try:
    from fusion_attn.backends import tensorrt_backend  # is TensorRT here?

    for precision in ("fp32", "fp16"):
        backends[f"tensorrt {precision}"] = create_backend(
            "tensorrt", model, device=args.device, tensorrt=TensorRTOptions(precision=precision, cache_dir=Path(tmp.name)))
    report["tensorrt"] = tensorrt_backend.TRT_VERSION
except ImportError as exc:
    report["tensorrt"] = f"not installed ({exc})"
model_ref = backends["torch eager (cuda)"].run(inputs)
alone = {}
for name, backend in backends.items():
    timing = bench._time(lambda b=backend: b.run(inputs), args.repeats, warmup=50)
    out = backend.run(inputs)
    timing["max_abs_diff_vs_torch_fp32"] = max(float(np.abs(out[k].astype(np.float64) - model_ref[k]).max())
                                               for k in ("fused", "latents", "attention"))
    timing["precision"] = backend.precision
    alone[name] = timing
    print(name, timing, flush=True)
report["model_alone_batch1"] = alone
save()

# -- throughput, CUDA graphs
graphs = backends["torch CUDA graphs"]
through = {"model alone": {}, "whole step": {}}
for batch in (1, 16, 256, 4096):
    x = example_inputs(model, batch=batch)
    t = bench._time(lambda x=x: graphs.run(x), max(20, args.repeats // batch), warmup=5)
    through["model alone"][batch] = {"p50_ms": t["p50_ms"], "fusions_per_s": batch / t["p50_ms"] * 1e3}
step_backend = pipelines["torch CUDA graphs, whole step"].backend
taus = np.ones((1, 4), np.float32)
for batch in (1, 4, 16, 64):
    rows, row_taus = [snaps[i % 8] for i in range(batch)], np.repeat(taus, batch, 0)
    t = bench._time(lambda rows=rows, row_taus=row_taus: step_backend.run_step(rows, row_taus, cfg),
                    max(10, args.repeats // (4 * batch)), warmup=3)
    through["whole step"][batch] = {"p50_ms": t["p50_ms"], "fusions_per_s": batch / t["p50_ms"] * 1e3}
    if batch == 16:  # one batch of 16 against 16 single calls, same device
        batched = step_backend.run_step(rows, row_taus, cfg)
        single = [step_backend.run_step([snap], taus, cfg) for snap in rows]
        report["batched_vs_single_whole_step"] = {
            k: {"byte_identical": bool(all(np.array_equal(batched[k][i], single[i][k][0]) for i in range(batch))),
                "max_abs_diff": float(max(np.abs(batched[k][i].astype(np.float64) - single[i][k][0]).max() for i in range(batch)))}
            for k in ("fused", "latents", "attention", "trust")}
report["throughput"] = through
print(json.dumps(through, indent=1), json.dumps(report.get("batched_vs_single_whole_step"), indent=1), flush=True)
save()

# -- replay of the standard recording
if args.replay_seconds > 0:
    report["replay"] = {}
    with tempfile.TemporaryDirectory() as folder:
        bag = Path(folder) / "standard"
        bench.write_standard_bag(bag, args.replay_seconds)
        runs = [("onnxruntime", 1), ("torch-cudagraph", 1)] + [("torch-cudagraph", b) for b in args.replay_batches]
        for name, batch in runs:
            pipeline = FusionPipeline.create(args.checkpoint, backend=name, threads=1,
                                             device=None if name == "onnxruntime" else args.device)
            label = name if batch == 1 else f"{name} --batch {batch}"
            out = Path(folder) / label.replace(" ", "_")
            summary = replay([bag], pipeline, out, ReplayOptions(progress=False, batch=batch))
            report["replay"][label] = {k: summary["timing"][k] for k in ("recorded_s", "wall_s", "speed_x_real_time")}
            if batch > 1:  # against one instant at a time on the same device
                report["replay"][label]["vs_batch_1"] = fused_difference(Path(folder) / name, out)
            print("replay", label, report["replay"][label], flush=True)
    save()

# -- torch.compile'd modules (inductor: fewer, fused kernels) in CUDA graphs
if args.compile:
    try:
        start = time.perf_counter()
        compiled = CudaGraphBackend(model, device=args.device, compile=True)
        compiled.run(inputs)
        t = bench._time(lambda: compiled.run(inputs), args.repeats, warmup=50)
        out = compiled.run(inputs)
        t["max_abs_diff_vs_torch_fp32"] = max(float(np.abs(out[k].astype(np.float64) - model_ref[k]).max())
                                              for k in ("fused", "latents", "attention"))
        t["compile_and_capture_s"] = time.perf_counter() - start
        report["model_alone_batch1"]["torch.compile + CUDA graphs"] = t
        print("compiled model", t, flush=True)
        save()
        start = time.perf_counter()
        pipeline = FusionPipeline(cfg, CudaGraphBackend(model, device=args.device, compile=True))
        pipeline.fuse(snaps[1])
        pipeline.fuse(snaps[2])
        first_s = time.perf_counter() - start
        name = "torch.compile + CUDA graphs, whole step"
        whole[name] = timing = bench._time(rolling(pipeline), args.repeats, warmup=50)
        out = pipeline.fuse(snaps[1])
        timing["max_abs_diff_vs_cpu_path"] = max(float(np.abs(getattr(out, k) - getattr(reference, k)).max())
                                                 for k in ("pooled", "latents", "attention", "trust"))
        timing["compile_and_capture_s"] = first_s
        report["whole_step_speedup_p50_vs_cpu_path"][name] = cpu_p50 / timing["p50_ms"]
        print(name, timing, flush=True)
        save()
    except Exception as exc:  # noqa: BLE001 - a compiler failure is a result too: keep what was measured
        report["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print("compile failed:", report["compile_error"], flush=True)
        save()

print(f"\ndate: {report['date']}\ngpu: {report['gpu']}\nmachine: {report['machine']}\nTensorRT: {report['tensorrt']}\n")
print("| whole step, batch 1 | p50 ms | p99 ms | p50 speed-up vs CPU path |\n|---|---|---|---|")
for name, r in whole.items():
    if "p50_ms" in r:
        print(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {report['whole_step_speedup_p50_vs_cpu_path'][name]:.1f}x |")
print("\n| model alone, batch 1 | p50 ms | p99 ms | max abs diff vs torch fp32 |\n|---|---|---|---|")
for name, r in report["model_alone_batch1"].items():
    print(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['max_abs_diff_vs_torch_fp32']:.1e} |")
if report.get("replay"):
    print("\n| replay of the standard recording | x real time | messages byte-identical to batch 1 | max abs diff |"
          "\n|---|---|---|---|")
    for name, r in report["replay"].items():
        vs = r.get("vs_batch_1")
        same, diff = (f"{vs['byte_identical']} of {vs['messages'][0]}", f"{vs['max_abs_diff']:.1e}") if vs else ("-", "-")
        print(f"| {name} | {r['speed_x_real_time']:.1f} | {same} | {diff} |")
