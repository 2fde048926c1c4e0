"""Where the fusion model's CPU time goes (ONNX Runtime, 1 thread): is it compute or per-call/per-node
overhead, and what each part of the model costs (issue #15's speed budget).

    python benchmarks/model_cost.py [--checkpoint CKPT] [--compare CKPT ...] [--rounds 5]
        [--out benchmarks/results/model_cost.json]

1. Per-sample latency of the exported model at batch 1, 2, 4, ..., 32. Overhead (Python, ONNX Runtime's
   per-node dispatch) is paid once per call, so if it dominated, batching would divide the cost.
2. The model exported again with one part left out, its result replaced by zeros of the same shape,
   timed at batch 1 round-robin with the full model (medians over the rounds): what leaving that
   part out saves is what it costs. The variants compute nothing useful; they only time.
3. --compare: other checkpoints (e.g. a candidate default), each timed whole in the same round-robin,
   with its ratio to the first.
"""

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from fusion_attn import model as fm
from fusion_attn.backends.export import example_inputs, export_onnx
from fusion_attn.bench import machine
from fusion_attn.pipeline import load_model

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--checkpoint", type=Path)
parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other checkpoints to time alongside")
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--repeats", type=int, default=300, help="calls per variant and round")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_cost.json")
args = parser.parse_args()


def without_previous_sweep():
    """The previous lidar sweep's PointNet (the second `pillars` call of each forward) left out."""
    pillars, forward = fm.SensorEmbedding.pillars, fm.SensorEmbedding.forward
    calls = []

    def counted_forward(self, x):
        calls.clear()
        return forward(self, x)

    def first_only(self, points, point_mask):
        calls.append(None)
        if len(calls) == 1:
            return pillars(self, points, point_mask)
        return torch.zeros(*points.shape[:2], self.cfg.model.dim), point_mask.any(dim=-1)

    return {"forward": counted_forward, "pillars": first_only}, fm.SensorEmbedding


def without_evidence():
    """The evidence statistics (SensorEmbedding._evidence) left out."""
    return {"_evidence": lambda self, x, change, *rest: torch.zeros(change.shape[0], 3, fm.EVIDENCE)}, fm.SensorEmbedding


def without_trust():
    """The trust estimate (SensorTrust) left out: every present sensor at logit 0."""
    def present_only(self, tokens, mask, membership, evidence):
        present = (mask.float().unsqueeze(-1) * membership).sum(1) > 0
        return torch.zeros(tokens.shape[0], 3), present, None, None  # no stale path either

    return {"forward": present_only}, fm.SensorTrust


def export_variant(model, patch, path: Path) -> Path:
    if patch is None:
        return export_onnx(model, path)
    methods, cls = patch()
    saved = {name: getattr(cls, name) for name in methods}
    for name, fn in methods.items():
        setattr(cls, name, fn)
    try:
        return export_onnx(model, path)
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def per_call_ms(sess, inputs, repeats: int) -> float:
    for _ in range(10):
        sess.run(None, inputs)
    start = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, inputs)
    return (time.perf_counter() - start) / repeats * 1e3


model, source = load_model(args.checkpoint)
variants = {"full model": None, "without the previous sweep's PointNet": without_previous_sweep,
            "without the evidence statistics": without_evidence, "without the trust estimate": without_trust}
with tempfile.TemporaryDirectory() as tmp:
    timed = {name: (session(export_variant(model, patch, Path(tmp) / f"{i}.onnx")), example_inputs(model, batch=1))
             for i, (name, patch) in enumerate(variants.items())}
    for i, path in enumerate(args.compare):
        other, other_source = load_model(path)
        timed[other_source] = (session(export_onnx(other, Path(tmp) / f"compare{i}.onnx")), example_inputs(other, batch=1))
    rounds = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, (sess, inputs) in timed.items():
            rounds[name].append(per_call_ms(sess, inputs, args.repeats))
    full = timed["full model"][0]
    batches = {}
    for b in (1, 2, 4, 8, 16, 32):
        inputs = example_inputs(model, batch=b)
        batches[b] = statistics.median(per_call_ms(full, inputs, max(20, args.repeats // b)) / b
                                       for _ in range(args.rounds))

median = {name: statistics.median(v) for name, v in rounds.items()}
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": source, "rounds": args.rounds,
          "repeats": args.repeats, "batch1_ms": median, "batch1_rounds_ms": rounds,
          "saved_ms": {name: median["full model"] - ms for name, ms in median.items() if name in variants and name != "full model"},
          "compared_over_full": {name: median[name] / median["full model"] for name in median if name not in variants},
          "per_sample_ms_by_batch": batches}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=2) + "\n")
print(f"{source}, ONNX Runtime CPU, 1 thread, median of {args.rounds} rounds\n")
print("| variant (batch 1) | ms per call | saved |\n|---|---|---|")
for name in variants:
    ms = median[name]
    saved = "" if name == "full model" else f"{median['full model'] - ms:.3f} ms ({(median['full model'] - ms) / median['full model']:.0%})"
    print(f"| {name} | {ms:.3f} | {saved} |")
for name, ratio in report["compared_over_full"].items():
    print(f"| {name} (whole) | {median[name]:.3f} | {ratio:.2f}x the full model |")
print("\n| batch | ms per sample |\n|---|---|")
for b, ms in batches.items():
    print(f"| {b} | {ms:.3f} |")
