"""Where the exported model's ONNX nodes come from: ONNX Runtime pays a few µs per node and call, on top
of the compute (benchmarks/model_cost.py measures how much of the latency that is; docs/BENCHMARKS.md).

    python benchmarks/onnx_nodes.py [--checkpoint CKPT] [--top 12]

Exports the model (the packaged default unless --checkpoint) and counts its nodes by the line of
fusion_attn/model.py that produced them (the exporter's stack trace), and by op type.
"""

import argparse
import collections
import tempfile
from pathlib import Path

import onnx

from fusion_attn.backends.export import export_onnx
from fusion_attn.pipeline import load_model

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--checkpoint", type=Path)
parser.add_argument("--top", type=int, default=12)
args = parser.parse_args()

model, source = load_model(args.checkpoint)
with tempfile.TemporaryDirectory() as tmp:
    graph = onnx.load(export_onnx(model, Path(tmp) / "model.onnx"))
by_line, by_op = collections.Counter(), collections.Counter()
for node in graph.graph.node:
    meta = {p.key: p.value for p in node.metadata_props}
    frames = [line.strip() for line in meta.get("pkg.torch.onnx.stack_trace", "").splitlines() if "model.py" in line]
    by_line[frames[-1].split(", in ")[0].split("model.py")[-1].strip('", ') if frames else "(no source line)"] += 1
    by_op[node.op_type] += 1
print(f"{source}: {len(graph.graph.node)} ONNX nodes")
print("\n| fusion_attn/model.py | nodes |\n|---|---|")
for where, n in by_line.most_common(args.top):
    print(f"| {where} | {n} |")
print("\n| op | nodes |\n|---|---|")
for op, n in by_op.most_common(args.top):
    print(f"| {op} | {n} |")
