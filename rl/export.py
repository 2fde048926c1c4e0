"""Export a trained agent's policy to ONNX with its memory as explicit inputs and outputs.

    inputs   obs (N, obs_dim) float32, memory (N, L, K, D) float32, memory_mask (N, K) bool
             (LSTM / GRU agents: their state, memory (N, L, 2 (h, c) / 1 (h), D), memory_mask (N, 1))
    outputs  action (N,) int64 or (N, A) float32 (argmax / mean: the deployed, deterministic policy),
             value (N,), next_memory, next_memory_mask, attention (N, K+1)

The caller keeps the memory between steps (policy_node does) and starts an episode with zeros and an
all-False mask. The export is checked against PyTorch with ONNX Runtime on two consecutive steps.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from fusion_attn.contract import CONTRACT_KEY

from .agent import ExportedPolicy
from .ppo import load_agent

INPUTS = ("obs", "memory", "memory_mask")
OUTPUTS = ("action", "value", "next_memory", "next_memory_mask", "attention")


def export_policy(agent_path: str | Path, out: str | Path) -> tuple[Path, float]:
    """-> (ONNX path, max abs difference to PyTorch over two steps)."""
    import onnxruntime as ort

    agent, meta = load_agent(agent_path)
    policy = ExportedPolicy(agent).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    memory, mask = agent.initial_memory(2)
    obs = torch.randn(2, meta["obs_dim"])
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(policy, (obs, memory, mask), str(out), input_names=list(INPUTS), output_names=list(OUTPUTS),
                          opset_version=17, dynamo=False, dynamic_axes={n: {0: "batch"} for n in INPUTS + OUTPUTS})
    graph = onnx.load(str(out))
    entry = graph.metadata_props.add()  # how it was trained (config, spaces, steps)
    entry.key, entry.value = "fusion_attn.rl", json.dumps(meta, sort_keys=True)
    if CONTRACT_KEY in meta:  # what policy_node checks and needs besides the weights
        entry = graph.metadata_props.add()
        entry.key, entry.value = CONTRACT_KEY, json.dumps(meta[CONTRACT_KEY], sort_keys=True)
    onnx.save(graph, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    diff, feeds = 0.0, {"obs": obs.numpy(), "memory": memory.numpy(), "memory_mask": mask.numpy()}
    for _ in range(2):  # the second step reads the memory the first one wrote
        got = session.run(list(OUTPUTS), feeds)
        with torch.no_grad():
            want = policy(*(torch.from_numpy(feeds[n]) for n in INPUTS))
        diff = max(diff, *(float(np.abs(g.astype(np.float64) - w.numpy().astype(np.float64)).max()) for g, w in zip(got, want)))
        feeds = {"obs": np.random.default_rng(1).normal(size=feeds["obs"].shape).astype(np.float32),
                 "memory": got[2], "memory_mask": got[3]}
    return out, diff
