"""Evaluate a trained agent: success and return over episodes (clean, or with sensor faults), an image
strip of an episode, and where its memory attention went while it acted.

    fusion-attn rl evaluate runs/mem/agent.safetensors --episodes 50 [--faults] -o runs/mem/eval

Outputs: eval.json (per-episode results and summary; a success rate only where the env reports
success, as an episode's last info["is_success"]; on the memory task, the zone each episode's robot
entered by the zone cued: `reached_by_cue`), strip.png (the camera every second of the first
episode, FusionAttn envs), attention.png (GTrXL agents: the last layer's attention over the memory
slots at every step of the first episode, with its entropy), attention.csv. Sensor faults
(--faults) exist in the FusionAttn envs only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fusion_attn.errors import ConfigError

from .agent import ActorCritic, reset_memory
from .ppo import PPOConfig, check_contract, env_modules, fault_options, load_agent, make_env

# one sensor fault per faulted episode (rl.ppo.fault_options: starting 2-4 s in, after the memory
# task's cue and delay, so remembering it matters, while the robot drives to its goal)
EVAL_FAULTS = ("camera_blackout", "lidar_dropout", "imu_noise_burst", "camera_freeze")


def run_episode(agent: ActorCritic, env, seed: int, faults: dict | None, record: bool = False) -> dict:
    """One deterministic episode (argmax / mean action), the memory carried step to step. Records the
    attention only of an agent that has it (GTrXL)."""
    obs, info = env.reset(seed=seed, options=faults)
    memory, mask = agent.initial_memory(1)
    mask = reset_memory(mask, torch.ones(1, dtype=torch.bool))
    total, steps, attention, images = 0.0, 0, [], []
    while True:
        with torch.no_grad():
            head, _, memory, mask, att = agent.step(torch.as_tensor(obs, dtype=torch.float32)[None], memory, mask)
        action = head.argmax(-1) if agent.discrete else head
        a = action[0].numpy()
        if not agent.discrete:
            a = np.clip(a, env.action_space.low, env.action_space.high)
        if record and agent.cfg.kind == "gtrxl":  # the one kind with attention
            attention.append(att[0].numpy())
            images += [f.image for f in info.get("frames", ()) if hasattr(f, "image")][-1:]
        obs, reward, terminated, truncated, info = env.step(a)
        total += float(reward)
        steps += 1
        if terminated or truncated:
            break
    out = {"seed": seed, "return": total, "steps": steps}
    if "is_success" in info:
        out["success"] = bool(info["is_success"])
    if "cue" in info:  # the memory task: which zone was cued, and which one the robot entered (None: neither)
        out["cue"], out["reached"] = info["cue"], info.get("reached")
    if record:
        out["attention"], out["images"] = np.array(attention), images
    return out


def evaluate(agent_path: str | Path, episodes: int = 20, faults: bool = False, out: str | Path | None = None,
             seed: int = 10_000, imports: Sequence[str] = ()) -> dict:
    """`imports`: the modules the agent's env needs (env_modules), named by the user: the checkpoint names
    them too, but loading it must not run code it names."""
    agent, meta = load_agent(agent_path)
    cfg = PPOConfig.from_dict(meta["config"])
    if missing := [m for m in env_modules(cfg) if m not in imports]:
        raise ConfigError(f"{agent_path}: its env is made by importing {', '.join(missing)}, which runs that code; "
                          "if you trust it, evaluate with " + " ".join(f"--import {m}" for m in missing))
    if faults and not cfg.fusion_env:
        raise ConfigError(f"{cfg.env_id} has no sensor faults to inject: faults apply to FusionAttn envs only")
    check_contract(meta, cfg)  # never evaluate a policy on features it was not trained on: its weights first
    env = make_env(cfg)
    rng = np.random.default_rng(seed)
    results = []
    try:
        check_contract(meta, cfg, env)  # then τ, sync and trigger as the env fuses
        for i in range(episodes):
            fault = EVAL_FAULTS[i % len(EVAL_FAULTS)] if faults else None
            r = run_episode(agent, env, seed + i, fault_options(fault, rng) if fault else None, record=(i == 0 and out is not None))
            r["fault"] = fault
            results.append(r)
    finally:
        env.close()
    first = results[0]
    summary = {"agent": str(agent_path), "env_id": cfg.env_id, "episodes": episodes, "faults": faults}
    if any("success" in r for r in results):  # an env without a success signal has no success rate
        summary["success_rate"] = float(np.mean([r.get("success", False) for r in results]))
        if faults:  # which fault costs what
            summary["success_by_fault"] = {f: float(np.mean([r.get("success", False) for r in results if r["fault"] == f]))
                                           for f in EVAL_FAULTS if any(r["fault"] == f for r in results)}
    if cued := [r for r in results if "cue" in r]:  # a policy at chance that always drives to one zone shows here
        summary["reached_by_cue"] = {cue: dict(Counter(str(r["reached"]) for r in cued if r["cue"] == cue))
                                     for cue in sorted({r["cue"] for r in cued})}
    summary.update(return_mean=float(np.mean([r["return"] for r in results])),
                   steps_mean=float(np.mean([r["steps"] for r in results])), trained_steps=meta.get("global_step"))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if len(first["attention"]):
            summary["attention_entropy_mean"] = _attention_plot(out, first["attention"], cfg)
        if first["images"]:
            _strip(out, first["images"])
        rows = [{k: v for k, v in r.items() if k not in ("attention", "images")} for r in results]
        (out / "eval.json").write_text(json.dumps({"summary": summary, "episodes": rows}, indent=2) + "\n")
    return summary


def attention_entropy(attention: np.ndarray) -> np.ndarray:
    """Entropy [nats] of each step's attention over [memory..., current] (T, K+1) -> (T,)."""
    p = np.clip(attention, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1)


def _attention_plot(out: Path, attention: np.ndarray, cfg: PPOConfig) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entropy = attention_entropy(attention)
    np.savetxt(out / "attention.csv", attention, delimiter=",", fmt="%.5f",
               header="attention weight per slot: oldest memory slot ... newest, current step (last column)")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(3, 1))
    k = attention.shape[1] - 1
    ax.imshow(attention.T, aspect="auto", cmap="viridis", extent=(0, len(attention), -0.5, k + 0.5))
    ax.set_ylabel("steps ago (0 = now)")
    ax.set_title(f"where the agent's memory attention went: {cfg.env_id}\n(last layer, mean over heads)")
    ax2.plot(entropy, label="entropy")
    ax2.axhline(np.log(k + 1), ls="--", c="grey", label="uniform over full memory")
    ax2.set_xlabel(f"decision step ({cfg.action_repeat} control steps each)" if cfg.fusion_env else "env step")
    ax2.set_ylabel("nats")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=100)
    plt.close(fig)
    return float(entropy.mean())


def _strip(out: Path, images: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = max(1, len(images) // 12)
    strip = images[::every][:12]
    fig, axes = plt.subplots(1, len(strip), figsize=(2 * len(strip), 2))
    for i, (a, img) in enumerate(zip(np.atleast_1d(axes), strip)):
        a.imshow(img)
        a.set_title(f"frame {i * every}", fontsize=8)
        a.axis("off")
    fig.tight_layout()
    fig.savefig(out / "strip.png", dpi=80)
    plt.close(fig)
