"""GPU model latency at batch 1 (issue #6): torch eager vs CUDA graphs, and TensorRT engines where installed.

    python benchmarks/gpu_latency.py [--repeats 2000] [--out benchmarks/results/gpu_latency.json]

All backends run side by side in one process on the same inputs (the standard configuration's model:
default FusionConfig, batch 1), timed end to end as the node calls them: numpy in, numpy out, so host
copies and synchronisation are included. With TensorRT importable, FP32 and FP16 engines are built
(cached under a temporary folder) and their outputs compared with torch FP32. Needs a CUDA GPU.
"""

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from fusion_attn import bench
from fusion_attn.backends.engine_cache import TensorRTOptions
from fusion_attn.backends.export import example_inputs
from fusion_attn.pipeline import create_backend, load_model

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--repeats", type=int, default=2000)
parser.add_argument("--checkpoint", type=Path)
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_latency.json")
args = parser.parse_args()
if not torch.cuda.is_available():
    raise SystemExit("gpu_latency: no CUDA GPU visible to torch; run this on the GPU machine or the robot")

model, source = load_model(args.checkpoint)
inputs = example_inputs(model, batch=1)
backends = {"torch eager (cuda)": create_backend("torch", model, device="cuda:0"),
            "torch CUDA graphs": create_backend("torch-cudagraph", model, device="cuda:0"),
            "onnxruntime (cpu, 1 thread)": create_backend("onnxruntime", model, threads=1)}
tmp = tempfile.TemporaryDirectory()
try:
    from fusion_attn.backends import tensorrt_backend  # is TensorRT here?

    for precision in ("fp32", "fp16"):
        backends[f"tensorrt {precision}"] = create_backend(
            "tensorrt", model, device="cuda:0", tensorrt=TensorRTOptions(precision=precision, cache_dir=Path(tmp.name)))
    tensorrt = tensorrt_backend.TRT_VERSION
except ImportError as exc:
    tensorrt = f"not installed ({exc})"

reference = backends["torch eager (cuda)"].run(inputs)
results = {}
for name, backend in backends.items():
    timing = bench._time(lambda b=backend: b.run(inputs), args.repeats, warmup=50)
    out = backend.run(inputs)
    timing["max_abs_diff_vs_torch_fp32"] = max(float(np.abs(out[k].astype(np.float64) - reference[k]).max())
                                               for k in ("fused", "latents", "attention"))
    timing["precision"] = backend.precision
    results[name] = timing

eager = results["torch eager (cuda)"]["p50_ms"]
report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
          "machine": bench.machine(), "tensorrt": tensorrt, "model": source, "repeats": args.repeats,
          "results": results, "speedup_p50_vs_eager": {k: eager / v["p50_ms"] for k, v in results.items()}}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2))
print(f"date: {report['date']}\ngpu: {report['gpu']}\nmachine: {report['machine']}\nTensorRT: {tensorrt}\n")
print("| backend (batch 1) | p50 ms | p99 ms | p50 speed-up vs eager | max abs diff vs torch fp32 | precision |")
print("|---|---|---|---|---|---|")
for name, r in results.items():
    print(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {report['speedup_p50_vs_eager'][name]:.2f}x | "
          f"{r['max_abs_diff_vs_torch_fp32']:.1e} | {r['precision']} |")
