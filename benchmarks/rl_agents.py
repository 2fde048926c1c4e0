"""The three agents on two small memory tasks made in the repo (issue #19): GTrXL (attention memory,
K = 8, 2 layers), LSTM (trained through time on whole rollouts) and MLP (memoryless), all by our PPO
with the same settings, on cue recall (rl/envs.py) with the cue 4 decisions back (within K) and 12
back (beyond K, within layers x K = 16: docs/RL.md, "The recall horizon"), 3 seeds each.

    python benchmarks/rl_agents.py [--steps 65536] [--seeds 0 1 2] [--delays 4 12] [--agents gtrxl lstm mlp] \
        [--memory 8] [--layers 2]

Settings as tests/test_rl.py's memory test: width 32, 2 heads, 8 envs, rollouts of 64, learning rate
1e-3. Final success: 100 deterministic episodes of each trained agent (rl/evaluate.py; chance is 1/3).
Writes benchmarks/results/rl_agents.json and docs/figures/rl_agents.png (training episodes' success
vs env steps, mean and range over seeds, one panel per delay) and prints a markdown table.
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

import rl.envs  # noqa: F401  registers FusionAttnRL/CueRecall-v0
from fusion_attn.bench import machine
from rl.agent import AgentConfig
from rl.evaluate import evaluate
from rl.ppo import PPOConfig, train

ENV = "FusionAttnRL/CueRecall-v0"
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=65_536)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--delays", type=int, nargs="+", default=[4, 12],
                    help="decisions from the cue to the answer, a task each")
parser.add_argument("--agents", nargs="+", default=["gtrxl", "lstm", "mlp"],
                    choices=["gtrxl", "lstm", "gru", "mlp"])
parser.add_argument("--memory", type=int, default=8, help="GTrXL memory K")
parser.add_argument("--layers", type=int, default=2, help="GTrXL blocks or LSTM / GRU layers")
parser.add_argument("--episodes", type=int, default=100)
parser.add_argument("--runs", type=Path, default=Path("runs/rl_agents"))
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rl_agents.json")
parser.add_argument("--figure", type=Path, default=Path("docs/figures/rl_agents.png"))
args = parser.parse_args()
torch.set_num_threads(1)


def run(kind: str, delay: int, seed: int) -> dict:
    cfg = PPOConfig(env_id=ENV, env_kwargs={"delay": delay}, imports=("rl.envs",), steps=args.steps, envs=8,
                    rollout=64, lr=1e-3, seed=seed,
                    agent=AgentConfig(kind=kind, dim=32, heads=2, memory=args.memory, layers=args.layers))
    out = args.runs / f"delay{delay}" / f"{kind}-L{args.layers}-K{args.memory}-seed{seed}"
    start = time.perf_counter()
    train(cfg, out, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    success = evaluate(out / "agent.safetensors", args.episodes)["success_rate"]
    return {"seed": seed, "success": success, "train_seconds": seconds,
            "curve": [(r["global_step"], r.get("episode_success", float("nan"))) for r in rows]}


start = time.perf_counter()
results = {}  # delay -> agent -> runs
for delay in args.delays:
    for kind in args.agents:
        for seed in args.seeds:
            r = run(kind, delay, seed)
            results.setdefault(str(delay), {}).setdefault(kind, []).append(r)
            print(f"delay {delay} {kind} seed {seed}: success {r['success']:.2f}, {r['train_seconds']:.0f} s",
                  flush=True)
wall = time.perf_counter() - start


def where(delay: int) -> str:
    """The delay against the GTrXL's horizon (docs/RL.md, "The recall horizon")."""
    if delay <= args.memory:
        return "within K"
    return "beyond K" if delay <= args.layers * args.memory else "beyond layers x K"


lines = ["| agent | " + " | ".join(f"delay {d} ({where(d)}): mean; per seed" for d in args.delays)
         + " | train time per run |", "|---|" + "---|" * len(args.delays) + "---|"]
for kind in args.agents:
    runs = [results[str(d)][kind] for d in args.delays]
    cells = [f"**{np.mean([r['success'] for r in rs]):.2f}**; " + " / ".join(f"{r['success']:.2f}" for r in rs)
             for rs in runs]
    seconds = [r["train_seconds"] for rs in runs for r in rs]
    lines.append(f"| {kind} | " + " | ".join(cells) + f" | {min(seconds):.0f}-{max(seconds):.0f} s |")
table = "\n".join(lines)
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "env": ENV, "steps": args.steps,
          "seeds": args.seeds, "memory": args.memory, "layers": args.layers, "eval_episodes": args.episodes,
          "wall_seconds": wall, "table": table, "results": results}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=1))

from matplotlib.figure import Figure  # plotting only after training; no pyplot: no global backend

fig = Figure(figsize=(5 * len(args.delays), 3.6), layout="constrained")
axes = fig.subplots(1, len(args.delays), sharey=True, squeeze=False)[0]
for ax, delay in zip(axes, args.delays):
    for kind, runs in results[str(delay)].items():
        n = min(len(r["curve"]) for r in runs)
        steps = [s for s, _ in runs[0]["curve"][:n]]
        ys = np.array([[v for _, v in r["curve"][:n]] for r in runs], float)
        ax.plot(steps, np.nanmean(ys, 0), label=f"{kind} ({len(runs)} seeds)")
        ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), alpha=0.2)
    ax.axhline(1 / 3, ls="--", c="grey", lw=0.8, label="chance")
    ax.set_title(f"cue {delay} decisions back ({where(delay)})")
    ax.set_xlabel("env steps (decisions)")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("training episode success")
axes[0].legend(loc="lower right")
fig.suptitle(f"{ENV}: GTrXL K = {args.memory}, layers x K = {args.layers * args.memory}; mean and range over seeds")
args.figure.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.figure, dpi=100)
print(f"\n{args.steps} env steps per run, {report['date']}, {report['machine']}; {wall / 60:.1f} min in all\n")
print(table)
