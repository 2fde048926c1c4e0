"""Learning curves and final success on the simulated memory task (issue #8): attention memory (GTrXL)
vs memoryless MLP vs LSTM / GRU (all our PPO; the recurrent ones trained through time) vs LSTM
(sb3-contrib RecurrentPPO), same env, env steps and seeds.

    python benchmarks/rl_memory_task.py --steps 60000 --seeds 0 1 2 [--agents gtrxl mlp ppo-lstm lstm] [--goals 2]

Each run trains on FusionAttn/Memory-Discrete-v0 with two goal zones (`--goals`; chance is 1/2) as
`fusion-attn rl train` does (fused state +
attention + task observation, decisions at 5 Hz, 8 envs, rollouts of 128, learning rate 1e-3; the
same settings for RecurrentPPO's LSTM), logging the success of
finished training episodes; then every agent is evaluated the same way: 40 deterministic episodes,
clean and with one sensor fault each (rl/evaluate.py). Writes benchmarks/results/rl_memory_task.json
and docs/figures/rl_memory_task.png (success vs env steps, mean and range over seeds).

Another env (--env) trains the same way, without the memory task's options (--goals) and action
repeat; its curves are the training return, its success is null unless it reports one
(info["is_success"]), and so is its success with faults (only FusionAttn envs have sensor faults).
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from fusion_attn.bench import machine
from rl.agent import AgentConfig
from rl.evaluate import EVAL_FAULTS
from rl.ppo import PPOConfig, fault_options, make_env, train

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--env", default="FusionAttn/Memory-Discrete-v0")
parser.add_argument("--goals", type=int, default=2, help="the memory task's n_goals (2: left or right; 3)")
parser.add_argument("--steps", type=int, default=60_000)
parser.add_argument("--action-repeat", type=int, default=10, help="FusionAttn envs: control steps per decision (10: 5 Hz)")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--memory", type=int, default=32, help="GTrXL memory K")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--agents", nargs="+", default=["gtrxl", "mlp", "lstm"],
                    choices=["gtrxl", "mlp", "ppo-lstm", "ppo-gru", "lstm"],
                    help="ppo-lstm, ppo-gru: our PPO's recurrent agents; lstm: sb3-contrib RecurrentPPO (the name "
                         "earlier runs' results carry)")
parser.add_argument("--fault-rate", type=float, default=0.0,
                    help="share of training episodes with one sensor fault (our PPO's agents; rl.ppo.TRAINING_FAULTS)")
parser.add_argument("--fault-after", type=float, default=0.0,
                    help="share of the steps trained clean before --fault-rate applies (rl.config.PPOConfig.fault_after)")
parser.add_argument("--fault-ramp", type=float, default=0.0,
                    help="share of the steps over which the fault share rises to --fault-rate (rl.config.PPOConfig.fault_ramp)")
parser.add_argument("--aux-info", default="", help="our PPO's agents also learn to predict this step info entry "
                    "(FusionAttn envs: goal), in training only (rl.config.PPOConfig.aux_info)")
parser.add_argument("--fusion-checkpoint", default="", help="FusionAttn envs: the fusion model the agents observe "
                    "through (default: the packaged one), e.g. a candidate default before it is packaged")
parser.add_argument("--fusion-trigger", default="timer", help="FusionAttn envs: fuse on the timer or on each message "
                    "of this sensor (camera, lidar, imu), as a fusion model trained with --trigger was")
parser.add_argument("--episodes", type=int, default=40)
parser.add_argument("--resume", action="store_true", help="continue each unfinished run of ours from its train_state.pt "
                                                          "(a run cut short; its train_seconds then count the rest)")
parser.add_argument("--runs", type=Path, default=Path("runs/rl_memory_task"))
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rl_memory_task.json")
parser.add_argument("--figure", type=Path, default=Path("docs/figures/rl_memory_task.png"))
args = parser.parse_args()
torch.set_num_threads(1)
FUSION = args.env.startswith("FusionAttn/")  # the memory task's options, action repeat and sensor faults


def config(seed: int, kind: str = "gtrxl") -> PPOConfig:
    return PPOConfig(env_id=args.env, env_kwargs={"task_options": {"n_goals": args.goals}} if FUSION else {},
                     fusion_checkpoint=args.fusion_checkpoint,
                     fusion_trigger=args.fusion_trigger, steps=args.steps, envs=8, rollout=128, seed=seed, lr=args.lr, fault_rate=args.fault_rate, fault_after=args.fault_after, fault_ramp=args.fault_ramp,
                     aux_info=args.aux_info, action_repeat=args.action_repeat if FUSION else None, agent=AgentConfig(kind=kind, memory=args.memory))


def ours(kind: str, seed: int, run: Path, resume: bool):
    from rl.evaluate import evaluate

    cfg = config(seed, kind)
    start = time.perf_counter()
    train(cfg, run, resume=resume, overwrite=not resume, progress=False)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    key = "episode_success" if FUSION else "episode_return"
    curve = [(r["global_step"], r.get(key, float("nan"))) for r in rows]
    clean = evaluate(run / "agent.safetensors", args.episodes, faults=False, out=run / "eval")
    faulted = evaluate(run / "agent.safetensors", args.episodes, faults=True) if FUSION else {}
    return (curve, clean.get("success_rate"), faulted.get("success_rate"), clean["return_mean"], seconds,
            faulted.get("success_by_fault"))


def lstm(seed: int, run: Path):
    import gymnasium as gym
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    cfg = config(seed)
    curve = []

    class Successes(BaseCallback):
        def _on_rollout_end(self):
            done = [e["is_success" if FUSION else "r"] for e in self.model.ep_info_buffer if "r" in e]
            curve.append((self.num_timesteps, float(np.mean(done[-50:])) if done else float("nan")))

        def _on_step(self):
            return True

    def env():
        from stable_baselines3.common.monitor import Monitor

        keys = ("is_success",) if FUSION else ()  # Monitor requires each key in every episode's last info
        return gym.wrappers.NormalizeReward(Monitor(make_env(cfg), info_keywords=keys), gamma=cfg.gamma)

    vec = DummyVecEnv([env for _ in range(8)])
    model = RecurrentPPO("MlpLstmPolicy", vec, n_steps=128, batch_size=128, n_epochs=4, learning_rate=cfg.lr,
                         gamma=cfg.gamma, gae_lambda=cfg.lam, ent_coef=cfg.ent_coef, seed=seed, device="cpu")
    start = time.perf_counter()
    model.learn(total_timesteps=args.steps, callback=Successes())
    seconds = time.perf_counter() - start
    vec.close()
    run.mkdir(parents=True, exist_ok=True)
    model.save(run / "recurrent_ppo")

    def score(faults: bool) -> tuple[float | None, float]:
        """-> (success rate, or None where the env reports none; mean return)."""
        e, rng, wins, returns = make_env(cfg), np.random.default_rng(10_000), [], []
        for i in range(args.episodes):
            options = fault_options(EVAL_FAULTS[i % len(EVAL_FAULTS)], rng) if faults else None
            obs, _ = e.reset(seed=10_000 + i, options=options)
            state, start_flag, info, total = None, np.ones(1, bool), {}, 0.0
            while True:
                action, state = model.predict(obs[None], state=state, episode_start=start_flag, deterministic=True)
                obs, reward, terminated, truncated, info = e.step(action[0])
                start_flag, total = np.zeros(1, bool), total + float(reward)
                if terminated or truncated:
                    break
            wins.append(info.get("is_success"))
            returns.append(total)
        e.close()
        return (None if None in wins else float(np.mean(wins))), float(np.mean(returns))

    (clean, clean_return), faulted = score(False), score(True)[0] if FUSION else None
    return curve, clean, faulted, clean_return, seconds, None


# Each run keeps its result in RUN/result.json and is skipped when that exists: several processes can
# share the runs (e.g. one per agent, on separate cores) and a last call gathers them into the report.
results = {}
for agent in args.agents:
    for seed in args.seeds:
        run = args.runs / f"{agent}-{seed}"
        done = run / "result.json"
        if not done.exists():  # not finished: start it over, or continue ours from its saved state (--resume)
            resume = args.resume and agent != "lstm" and (run / "train_state.pt").exists()
            curve, clean, faulted, clean_return, seconds, by_fault = (
                lstm(seed, run) if agent == "lstm" else ours(agent.removeprefix("ppo-"), seed, run, resume))
            done.write_text(json.dumps({"seed": seed, "curve": curve, "success_clean": clean, "success_faults": faulted,
                                        "success_by_fault": by_fault, "return_clean": clean_return,
                                        "train_seconds": seconds, "resumed": resume}))
        r = json.loads(done.read_text())
        results.setdefault(agent, []).append(r)
        shown = {k: "-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("success_clean", "success_faults", "return_clean")}
        print(f"{agent} seed {seed}: success clean {shown['success_clean']}, with faults {shown['success_faults']}, "
              f"return {shown['return_clean']}, {r['train_seconds']:.0f} s", flush=True)



def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(r["curve"]) for r in runs)
    return (np.array([s for s, _ in runs[0]["curve"][:n]]),
            np.nanmean(np.array([[v for _, v in r["curve"][:n]] for r in runs], float), 0))


def mean(runs: list[dict], key: str) -> float | None:
    values = [r.get(key) for r in runs]
    return None if None in values else float(np.mean(values))


targets = {agent: {key: mean(runs, key) for key in ("success_clean", "success_faults", "return_clean")}
           for agent, runs in results.items()}
for t in targets.values():
    if t["success_faults"] is not None:
        t["fault_drop_points"] = 100 * (t["success_clean"] - t["success_faults"])
if "gtrxl" in results and "lstm" in results:  # env steps GTrXL needs to reach the LSTM's final training success
    lstm_steps, lstm_curve = mean_curve(results["lstm"])
    steps, curve = mean_curve(results["gtrxl"])
    level = float(lstm_curve[-1])
    reached = steps[np.flatnonzero(curve >= level)]
    targets["gtrxl"]["steps_to_lstm_final"] = int(reached[0]) if len(reached) else None
    targets["gtrxl"]["steps_ratio_to_lstm"] = float(reached[0] / lstm_steps[-1]) if len(reached) else None
report = {"date": datetime.date.today().isoformat(), "machine": machine(), "env": args.env, "goals": args.goals,
          "fusion_checkpoint": args.fusion_checkpoint, "fusion_trigger": args.fusion_trigger, "fault_rate": args.fault_rate,
          "fault_after": args.fault_after, "fault_ramp": args.fault_ramp, "aux_info": args.aux_info, "steps": args.steps, "seeds": args.seeds, "eval_episodes": args.episodes, "targets": targets,
          "results": results}
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(report, indent=1))

import matplotlib  # plotting only after training

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 4))
for agent, runs in results.items():
    steps, mean = mean_curve(runs)
    ys = np.array([[v for _, v in r["curve"][:len(steps)]] for r in runs], float)
    ax.plot(steps, mean, label=f"{agent} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), alpha=0.2)
ax.set_xlabel("env steps (decisions)")
ax.set_ylabel("training episode success" if FUSION else "training episode return")
ax.set_title(args.env)
ax.legend()
fig.tight_layout()
args.figure.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.figure, dpi=100)
print(json.dumps(targets, indent=1))
