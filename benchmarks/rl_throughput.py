"""End-to-end RL training throughput (issue #8): our PPO with the attention-memory agent vs sb3-contrib's
RecurrentPPO (LSTM), side by side in one run, same env, same number of envs and env steps.

    python benchmarks/rl_throughput.py [--env FusionAttn/Memory-Discrete-v0] [--steps 4096] [--envs 4]
                                       [--action-repeat 10] [--goals 2] [--rounds 3] [--workers N]

Both learn from the same observations (rl.ppo.make_env: for FusionAttn envs the fused state, attention
and task observation; the memory task as docs/RESULTS.md trains it: 10 control steps per decision,
two zones) with rollouts of 128 steps per env, 4 epochs. Reported: env steps per second over the
whole training call (env stepping, fusion, inference and updates), and the ratio. Also the same
vector env stepped alone with random actions: no trainer can be faster than that, so env-only
steps/s over RecurrentPPO's bounds the ratio any trainer could reach on this env and machine.
The three measures run in interleaved rounds (the VM's speed drifts by tens of percent within
minutes); reported are the medians over rounds of the speeds and of each round's ratios.
With --workers N our envs step in N worker processes (rl/workers.py, --envs / N each) and
RecurrentPPO's in a SubprocVecEnv (a process per env; --envs N gives both the same processes).
Writes benchmarks/results/rl_throughput_<env>.json.
"""

import argparse
import datetime
import functools
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from fusion_attn.bench import machine
from rl.agent import AgentConfig
from rl.ppo import PPOConfig, make_env, train, vector_env


def env_alone(args, cfg: PPOConfig) -> float:
    envs = vector_env(cfg)  # what every trainer pays
    envs.reset(seed=0)
    start = time.perf_counter()
    for _ in range(args.steps // args.envs):
        envs.step(envs.action_space.sample())
    seconds = time.perf_counter() - start
    envs.close()
    return args.steps / seconds


def ours(args, cfg: PPOConfig) -> float:
    start = time.perf_counter()
    train(cfg, Path("/tmp/rl_throughput_ours"), overwrite=True, progress=False)  # a fresh run each round
    return args.steps / (time.perf_counter() - start)


def sb3_env(cfg: PPOConfig):
    return gym.wrappers.NormalizeReward(make_env(cfg), gamma=cfg.gamma)


def recurrent_ppo(args, cfg: PPOConfig) -> float:
    vec = (SubprocVecEnv if args.workers else DummyVecEnv)([functools.partial(sb3_env, cfg) for _ in range(args.envs)])
    model = RecurrentPPO("MlpLstmPolicy", vec, n_steps=128, batch_size=128 * args.envs // 8, n_epochs=4,
                         learning_rate=cfg.lr, gamma=cfg.gamma, gae_lambda=cfg.lam, seed=0, device="cpu", verbose=0)
    start = time.perf_counter()
    model.learn(total_timesteps=args.steps)
    seconds = time.perf_counter() - start
    vec.close()
    return args.steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="FusionAttn/Memory-Discrete-v0")
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--action-repeat", type=int, default=10, help="FusionAttn envs: control steps per decision")
    parser.add_argument("--goals", type=int, default=2, help="the memory task's n_goals")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--workers", type=int, default=0, help="env worker processes (0: envs in the trainer's process)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env_kwargs = {"task_options": {"n_goals": args.goals}} if args.env.startswith("FusionAttn/Memory") else {}
    cfg = PPOConfig(env_id=args.env, env_kwargs=env_kwargs, steps=args.steps, envs=args.envs, rollout=128, epochs=4,
                    minibatches=8, action_repeat=args.action_repeat if args.env.startswith("FusionAttn/") else None,
                    workers=args.workers, agent=AgentConfig())

    # Interleaved rounds: the machine's speed drifts, so each round's ratios compare runs minutes apart.
    NAMES = {"ours": "ours: PPO + GTrXL memory (K=32, 2 layers)", "theirs": "sb3-contrib RecurrentPPO (MlpLstmPolicy)",
             "env": "the env alone, random actions (no trainer)"}
    rounds = []
    for r in range(args.rounds):
        rounds.append({"env": env_alone(args, cfg), "ours": ours(args, cfg), "theirs": recurrent_ppo(args, cfg)})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f} steps/s" for k, v in rounds[-1].items()), flush=True)
    ratio = float(np.median([x["ours"] / x["theirs"] for x in rounds]))
    bound = float(np.median([x["env"] / x["theirs"] for x in rounds]))
    results = {NAMES[k]: float(np.median([x[k] for x in rounds])) for k in ("ours", "theirs")}
    env_only = float(np.median([x["env"] for x in rounds]))

    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "env": args.env, "env_kwargs": env_kwargs,
              "action_repeat": args.action_repeat, "steps": args.steps, "envs": args.envs, "workers": args.workers,
              "steps_per_s": results,
              "env_only_steps_per_s": env_only, "ratio_ours_over_recurrent_ppo": ratio,
              "ratio_bound_env_only_over_recurrent_ppo": bound, "rounds": rounds}
    out = args.out or Path(__file__).parent / "results" / f"rl_throughput_{args.env.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"date: {report['date']}\nmachine: {report['machine']}\nenv: {args.env}, {args.envs} envs, {args.steps} steps\n")
    print("| trainer | env steps/s |\n|---|---|")
    for name, sps in results.items():
        print(f"| {name} | {sps:.0f} |")
    print(f"| the env alone, random actions (no trainer) | {env_only:.0f} |")
    print(f"\nratio (ours / RecurrentPPO): {report['ratio_ours_over_recurrent_ppo']:.2f}x; "
          f"bound (env alone / RecurrentPPO): {report['ratio_bound_env_only_over_recurrent_ppo']:.2f}x")


if __name__ == "__main__":
    main()
