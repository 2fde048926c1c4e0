"""End-to-end RL training throughput (issue #8): our PPO with the attention-memory agent vs sb3-contrib's
RecurrentPPO (LSTM), side by side in one run, same env, same number of envs and env steps.

    python benchmarks/rl_throughput.py [--env FusionAttn/Memory-Discrete-v0] [--steps 4096] [--envs 4]

Both learn from the same observations (rl.ppo.make_env: for FusionAttn envs the fused state, attention
and task observation, 5 control steps per decision) with rollouts of 128 steps per env, 4 epochs.
Reported: env steps per second over the whole training call (env stepping, fusion, inference and
updates), and the ratio. Writes benchmarks/results/rl_throughput_<env>.json.
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import gymnasium as gym
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.vec_env import DummyVecEnv

from fusion_attn.bench import machine
from rl.agent import AgentConfig
from rl.ppo import PPOConfig, make_env, train

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--env", default="FusionAttn/Memory-Discrete-v0")
parser.add_argument("--steps", type=int, default=4096)
parser.add_argument("--envs", type=int, default=4)
parser.add_argument("--out", type=Path)
args = parser.parse_args()
torch.set_num_threads(1)
cfg = PPOConfig(env_id=args.env, steps=args.steps, envs=args.envs, rollout=128, epochs=4, minibatches=8,
                agent=AgentConfig())
results = {}

start = time.perf_counter()
train(cfg, Path("/tmp/rl_throughput_ours"), progress=False)
results["ours: PPO + GTrXL memory (K=32, 2 layers)"] = args.steps / (time.perf_counter() - start)


def sb3_env():
    return gym.wrappers.NormalizeReward(make_env(cfg), gamma=cfg.gamma)


vec = DummyVecEnv([sb3_env for _ in range(args.envs)])
model = RecurrentPPO("MlpLstmPolicy", vec, n_steps=128, batch_size=128 * args.envs // 8, n_epochs=4,
                     learning_rate=cfg.lr, gamma=cfg.gamma, gae_lambda=cfg.lam, seed=0, device="cpu", verbose=0)
start = time.perf_counter()
model.learn(total_timesteps=args.steps)
results["sb3-contrib RecurrentPPO (MlpLstmPolicy)"] = args.steps / (time.perf_counter() - start)
vec.close()

ours, theirs = results.values()
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "env": args.env, "steps": args.steps,
          "envs": args.envs, "steps_per_s": results, "ratio_ours_over_recurrent_ppo": ours / theirs}
out = args.out or Path(__file__).parent / "results" / f"rl_throughput_{args.env.replace('/', '_')}.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2))
print(f"date: {report['date']}\nmachine: {report['machine']}\nenv: {args.env}, {args.envs} envs, {args.steps} steps\n")
print("| trainer | env steps/s |\n|---|---|")
for name, sps in results.items():
    print(f"| {name} | {sps:.0f} |")
print(f"\nratio (ours / RecurrentPPO): {report['ratio_ours_over_recurrent_ppo']:.2f}x")
