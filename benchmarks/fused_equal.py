"""Where two fusion models feed a policy the same observation: the same simulated episodes (seeds,
actions, faults) observed through each (rl.ppo.make_env's FusedObservation, ONNX Runtime, 1 thread),
clean and with each sensor fault RL training injects (rl.ppo.TRAINING_FAULTS, at its magnitude) and
`rl evaluate --faults` injects (at its); per condition, the share of decisions whose observation is
bit-identical, and the largest difference. Where every share is 1, a policy trained and evaluated on
A sees on B exactly what it saw.

    python benchmarks/fused_equal.py fusion_attn/data/fusion_default.safetensors \\
        runs/default_stalefit/model.safetensors [--episodes 4] [--out benchmarks/results/fused_equal.json]
"""

import argparse
import json
from pathlib import Path

import numpy as np

from rl.config import PPOConfig
from rl.evaluate import EVAL_FAULTS
from rl.ppo import TRAINING_FAULTS, fault_options, make_env

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("a", help="fusion checkpoint A (e.g. the packaged default)")
parser.add_argument("b", help="fusion checkpoint B")
parser.add_argument("--env", default="FusionAttn/Memory-Discrete-v0")
parser.add_argument("--episodes", type=int, default=4, help="per condition")
parser.add_argument("--seed", type=int, default=10_000)
parser.add_argument("--out", type=Path, default=None)
args = parser.parse_args()


def observations(checkpoint: str, fault: str | None, magnitude: float) -> list[np.ndarray]:
    """Every decision's observation over `--episodes` episodes, random actions from a fixed seed."""
    env = make_env(PPOConfig(env_id=args.env, fusion_checkpoint=checkpoint))
    rng, seen = np.random.default_rng(args.seed), []
    try:
        for i in range(args.episodes):
            options = fault_options(fault, rng, magnitude) if fault else None
            obs, _ = env.reset(seed=args.seed + i, options=options)
            seen.append(obs)
            done = False
            while not done:
                obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
                seen.append(obs)
                done = terminated or truncated
    finally:
        env.close()
    return seen


report = {"a": args.a, "b": args.b, "env": args.env, "episodes": args.episodes, "conditions": {}}
EVAL_MAGNITUDE = 2.0  # fault_options' default, as rl evaluate calls it
conditions = [(None, 0.0), *TRAINING_FAULTS.items(),
              *((f, EVAL_MAGNITUDE) for f in EVAL_FAULTS if TRAINING_FAULTS.get(f) != EVAL_MAGNITUDE)]
for fault, magnitude in conditions:
    a, b = observations(args.a, fault, magnitude), observations(args.b, fault, magnitude)
    assert len(a) == len(b), "the episodes differ in length: the actions or the env are not the same"
    same = [np.array_equal(x, y) for x, y in zip(a, b)]
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    name = f"{fault} x{magnitude:g}" if fault else "clean"
    report["conditions"][name] = {"decisions": len(a), "identical_share": round(float(np.mean(same)), 4),
                                  "max_abs_difference": diff}
    print(f"{name:22s} {len(a):5d} decisions  identical {np.mean(same):6.1%}  max |difference| {diff:.3g}",
          flush=True)
if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
