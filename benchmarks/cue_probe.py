"""How plainly each fusion model's fused state shows the memory task's cue: the signal a policy has to
find and remember (docs/RESULTS.md, the RL memory task on the candidate fusions).

    python benchmarks/cue_probe.py packaged= arrival=runs/arrival-s0/model.safetensors:lidar [--episodes 80]

Each LABEL=CHECKPOINT[:TRIGGER] (empty checkpoint: the packaged model; trigger as `--fusion-trigger`)
observes FusionAttn/Memory-Discrete-v0 (two goals) through the policy's own observation
(`rl.ppo.make_env`: fused state, attention per sensor), on the same episode seeds for every model,
during the 2 s the robot is held: the cue shows for the first second, then it has sunk. Per
decision (5 Hz) it reports, over the episodes:
- probe accuracy: a ridge classifier (standardized features, 5-fold cross-validation over episodes)
  that tells left from right from the fused state alone (attention and task input left out);
- separation: the distance between the two cues' mean fused states over the features' pooled
  standard deviation (what a linear read-out of the state can get from one observation);
- the fused state's scale (root mean square of its values), which PPO sees unnormalized.
And how far one failed sensor moves the state: each of the RL training's faults (`rl.ppo.TRAINING_FAULTS`,
at their magnitudes) from the episode's start, on the first --fault-episodes seeds, against the clean
episode of the same seed: the root mean square of the difference, over all held decisions, in units
of the cue's own step (the root mean square of the difference between the two cues' mean states
while the cue shows): 1 means a fault moves the state as far as the cue a policy learned to read.
Writes benchmarks/results/cue_probe.json.
"""

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from fusion_attn.bench import machine
from fusion_attn.sim.faults import FaultSpec
from rl.ppo import TRAINING_FAULTS, PPOConfig, make_env

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("models", nargs="+", help="LABEL=CHECKPOINT[:TRIGGER]")
parser.add_argument("--episodes", type=int, default=80)
parser.add_argument("--fault-episodes", type=int, default=20)
parser.add_argument("--seed", type=int, default=1000, help="the first episode seed (training uses 0.. per env)")
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cue_probe.json")
args = parser.parse_args()

HOLD_DECISIONS = 10  # 2 s held (cue 1 s + delay 1 s) at 5 Hz decisions (action repeat 10 at 50 Hz)


def held_states(env, episodes: int, fault: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(episodes, decisions, D) fused states while held, (episodes,) cue 0 left / 1 right, decision times [s]."""
    dim = env.get_wrapper_attr("layout").fused_dim
    options = {"faults": {fault: FaultSpec.window(0.0, 10.0, magnitude=TRAINING_FAULTS[fault])}} if fault else None
    states, cues, times = [], [], []
    for episode in range(episodes):
        obs, info = env.reset(seed=args.seed + episode, options=options)
        rows, times = [], []
        for _ in range(HOLD_DECISIONS):
            obs, _, _, _, info = env.step(0)  # held still whatever the action
            rows.append(obs[:dim])
            times.append(info["time_ns"] * 1e-9)
        states.append(rows)
        cues.append(info["cue"])
    return np.asarray(states, np.float64), np.array([sorted(set(cues)).index(c) for c in cues]), np.asarray(times)


def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 5, ridge: float = 1.0) -> float:
    """Cross-validated accuracy of a ridge classifier on +-1 labels, features standardized on the training fold."""
    order = np.random.default_rng(0).permutation(len(y))
    correct = 0
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-8
        a = np.c_[(x[train] - mean) / std, np.ones(len(train))]
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ (2.0 * y[train] - 1.0))
        predicted = np.c_[(x[fold] - mean) / std, np.ones(len(fold))] @ w > 0
        correct += int((predicted == (y[fold] == 1)).sum())
    return correct / len(y)


def separation(x: np.ndarray, y: np.ndarray) -> float:
    pooled = np.sqrt(0.5 * (x[y == 0].var(0) + x[y == 1].var(0)).mean())
    return float(np.linalg.norm(x[y == 0].mean(0) - x[y == 1].mean(0)) / (pooled + 1e-12))


report = {"machine": machine(), "date": datetime.date.today().isoformat(), "episodes": args.episodes,
          "first_seed": args.seed, "models": {}}
for spec in args.models:
    label, _, target = spec.partition("=")
    checkpoint, _, trigger = target.partition(":")
    env = make_env(PPOConfig(env_kwargs={"task_options": {"n_goals": 2}}, fusion_checkpoint=checkpoint,
                             fusion_trigger=trigger or "timer", action_repeat=10))
    states, cues, times = held_states(env, args.episodes)
    clean = states[: args.fault_episodes]
    showing = times <= 1.0  # decisions while the cue shows (cue_s = 1 s)
    cue_step = np.sqrt(((states[cues == 1][:, showing].mean(0) - states[cues == 0][:, showing].mean(0)) ** 2).mean())
    fault_shift = {fault: round(float(np.sqrt(((held_states(env, args.fault_episodes, fault)[0] - clean) ** 2).mean())
                                      / cue_step), 3) for fault in TRAINING_FAULTS}
    env.close()
    per_decision = [{"t_s": round(float(t), 2),
                     "probe_accuracy": probe_accuracy(states[:, k], cues),
                     "separation": round(separation(states[:, k], cues), 3),
                     "state_rms": round(float(np.sqrt((states[:, k] ** 2).mean())), 3)}
                    for k, t in enumerate(times)]
    report["models"][label] = {"checkpoint": checkpoint or "packaged", "trigger": trigger or "timer",
                               "right_cues": int(cues.sum()), "decisions": per_decision, "cue_step_rms": round(float(cue_step), 4),
                               "fault_shift": fault_shift}
    print(label, " ".join(f"{d['t_s']:.1f}s:{d['probe_accuracy']:.2f}/{d['separation']:.2f}" for d in per_decision),
          f"rms {per_decision[0]['state_rms']}", "shift", fault_shift, flush=True)
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {args.out}")
