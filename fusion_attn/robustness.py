"""Robustness evaluation (`fusion-attn eval-robustness`): what one failed sensor costs each fusion.

Trained runs (folders of `fusion-attn train`) are compared on the same held-out simulated episodes
(seeds no training or validation episode uses), each with every single-sensor fault of
`train.corrupt` -- the faults as the node would tokenize them -- and, for attention models, a sweep of
the global τ. Per run, τ and condition: the supervised heads' error (mean standardised squared error
over ego velocity, obstacle distances and goal, and each in its own units, obstacles and goal in the
simulated camera's view apart from the rest: what survives a failed lidar), the attention mass the
faulted sensor receives, and the softmax Lipschitz diagnostic of the cross-attention
(`model.softmax_lipschitz`). The real recordings, which have no labels, get the self-supervised losses
and the attention mass, clean and with each fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import train as T
from .config import FusionConfig
from .errors import CheckpointError
from .frames import MODALITIES
from .model import FusionModel, softmax_lipschitz

SUPERVISED = ("velocity", "obstacles", "goal")
SELF_SUPERVISED = ("camera", "lidar", "imu", "imu_next")
TEST_SEED_OFFSET = 200_000  # training episodes use 0.., validation 100_000..
LIPSCHITZ_SAMPLES = 16  # the diagnostic needs an eigen-decomposition per head, query and sample


@dataclass
class TrainedRun:
    name: str
    tc: T.TrainConfig
    model: torch.nn.Module
    heads: T.Heads

    @property
    def has_attention(self) -> bool:
        return isinstance(self.model, FusionModel)


def load_run(name: str, folder: str | Path) -> TrainedRun:
    """A finished training run from its saved state (safetensors model files exist only for attention)."""
    path = Path(folder) / T.STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {T.STATE_FILE}; is it a `fusion-attn train` output folder?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["train_config"])
        tc = T.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        cfg = FusionConfig()
        model = T.build_model(cfg, tc.fusion)
        model.load_state_dict(state["model"])
        heads = T.Heads(cfg.model.fusion_tokens * cfg.model.dim, T.target_sizes(cfg))
        heads.load_state_dict(state["heads"])
    except Exception as exc:  # a damaged or foreign file surfaces as any of several errors
        raise CheckpointError(f"{path} is not a readable training state: {type(exc).__name__}: {exc}") from exc
    return TrainedRun(name, tc, model.eval(), heads.eval())


def held_out_set(tc: T.TrainConfig, cfg: FusionConfig, cache: Path, episodes: int) -> T.Dataset:
    """Held-out simulated episodes, tasks alternating as in training."""
    parts = []
    for k in range(episodes):
        task, seed = tc.sim_tasks[k % len(tc.sim_tasks)], tc.seed * 1_000_000 + TEST_SEED_OFFSET + k
        key = {"version": T.DATA_VERSION, "model": cfg.to_dict(), "hz": tc.fusion_hz, "kind": f"sim-{task}",
               "seed": seed, "seconds": tc.sim_seconds}
        parts.append((T._cached(cache, key, lambda t=task, s=seed: T.sim_episode(t, s, tc.sim_seconds, tc.fusion_hz, cfg)), 0))
    return T.Dataset.join(parts)


def conditions() -> list[tuple[str, int, str]]:
    return [("clean", -1, "drop")] + [(f"{MODALITIES[m]}_{f}", m, f) for m in range(3) for f in T.FAULTS]


@torch.no_grad()
def measure(run: TrainedRun, data: T.Dataset, tau: float, seed: int = 7, batch: int = 256) -> dict[str, dict]:
    """condition -> metrics of one run at global τ (modality τ = 1) on `data`."""
    cfg = FusionConfig()
    t = data.tensors()
    labelled = bool(data.arrays["labelled"].any())
    out = {}
    for name, sensor, fault in conditions():
        gen = torch.Generator().manual_seed(seed)  # the same noise for every run and τ
        running = T.RunningMeans()
        weights_seen: list[torch.Tensor] = []
        for start in range(0, len(data), batch):
            idx = torch.arange(start, min(start + batch, len(data)))
            x = T.corrupt(t, idx, T.FaultPlan.fixed(len(idx), sensor, fault), cfg, run.tc.fusion_hz, gen)
            tgt = T.targets(t, idx, T.gather(t, idx), cfg)
            taus = torch.full((len(idx), 4), 1.0)
            taus[:, 0] = tau
            weights = _capture_weights(run.model) if run.has_attention and start == 0 else None
            feature, attention = T.fused_feature(run.model, x, taus)
            if weights is not None:
                weights_seen.append(weights.pop()[:LIPSCHITZ_SAMPLES])
            pred = run.heads(feature)
            loss = T.losses(run.heads, pred, tgt)
            m = {f"loss_{k}": v for k, v in loss.items()}
            if labelled:
                m["head_error"] = sum(loss[k] for k in SUPERVISED) / len(SUPERVISED)
                m.update(T.physical_errors(run.heads, pred, tgt))
            m["ssl_loss"] = sum(loss[k] for k in SELF_SUPERVISED) / len(SELF_SUPERVISED)
            if attention is not None:
                for i, mod in enumerate(MODALITIES):
                    m[f"attention_{mod}"] = attention[:, i].mean()
            running.add(m, len(idx))
        metrics = running.means()
        if sensor >= 0 and run.has_attention:
            metrics["attention_faulted"] = metrics[f"attention_{MODALITIES[sensor]}"]
        if weights_seen:
            metrics["lipschitz"] = lipschitz(weights_seen[0], tau)
        out[name] = metrics
    return out


def _capture_weights(model: FusionModel) -> list:
    """The cross-attention weights (B, H, M, N) of the next forward pass, via a one-shot hook."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        seen.append(output[1])
        handle.remove()

    handle = model.cross.register_forward_hook(hook)
    return seen


def lipschitz(weights: torch.Tensor, tau: float) -> float:
    """Mean over samples, heads and fusion tokens of the softmax's local Lipschitz constant.

    It depends on the logits only through the attention p they give, so it is evaluated at logits
    τ·log p, which give back p exactly (masked tokens keep zero weight)."""
    mask = weights > 0
    logits = torch.log(weights.clamp_min(1e-30)) * tau
    valid = mask.any(-1)
    if not valid.any():
        return 0.0
    return float(softmax_lipschitz(logits[valid], tau, mask[valid]).mean())


def evaluate_runs(runs: list[TrainedRun], data: T.Dataset, taus: list[float]) -> dict:
    """{run: {tau: {condition: metrics}}}; a run without attention, or trained at fixed τ, is measured at τ = 1."""
    return {run.name: {str(tau): measure(run, data, tau) for tau in _sweep(run, taus)} for run in runs}


def _sweep(run: TrainedRun, taus: list[float]) -> list[float]:
    return taus if run.has_attention and run.tc.tau_random_prob > 0 else [1.0]


def summarise(report: dict, key: str = "head_error") -> dict:
    """Per run and condition: the error at the best τ for that condition, its rise over clean at the best
    clean τ, and the attention mass on the faulted sensor at the lowest τ."""
    out = {}
    for name, by_tau in report.items():
        taus = sorted(by_tau, key=float)
        clean = min(by_tau[t]["clean"][key] for t in taus)
        rows = {}
        for cond in by_tau[taus[0]]:
            best_tau = min(taus, key=lambda t: by_tau[t][cond][key])
            err = by_tau[best_tau][cond][key]
            rows[cond] = {"best_tau": float(best_tau), key: err, "rise": err / clean - 1.0,
                          "attention_faulted_low_tau": by_tau[taus[0]][cond].get("attention_faulted")}
        out[name] = rows
    return out


def plots(report: dict, summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    conds = [c for c, _, _ in conditions()]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(summary)
    for i, (name, rows) in enumerate(summary.items()):
        ax.bar(np.arange(len(conds)) + i * width, [100 * rows[c]["rise"] for c in conds], width, label=name)
    ax.axhline(25, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(conds)) + 0.4 - width / 2, conds, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("head error rise over clean [%]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "robustness_error_rise.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    sweeps = {n: r for n, r in report.items() if len(r) > 1}
    if sweeps:
        name, by_tau = next(iter(sweeps.items()))
        taus = sorted(by_tau, key=float)
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
        for m, ax in enumerate(axes):
            for f in T.FAULTS:
                ax.plot([float(t) for t in taus], [by_tau[t][f"{MODALITIES[m]}_{f}"]["attention_faulted"] for t in taus],
                        marker="o", label=f)
            ax.plot([float(t) for t in taus], [by_tau[t]["clean"][f"attention_{MODALITIES[m]}"] for t in taus],
                    "k--", label="clean")
            ax.set_xscale("log")
            ax.set_title(f"{MODALITIES[m]} faulted ({name})")
            ax.set_xlabel("global τ")
        axes[0].set_ylabel("attention mass on the faulted sensor")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "robustness_attention_vs_tau.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


UNITS = (("speed_mae_mps", "speed m/s", 3), ("yaw_rate_mae_radps", "yaw rate rad/s", 3),
         ("obstacle_mae_m", "obstacle distance m", 3), ("goal_distance_mae_m", "goal distance m", 3),
         ("goal_bearing_mae_deg", "goal bearing °", 1))
# per quantity: which sensors observe it in the simulator (a single snapshot of each)
OBSERVED_BY = (("speed_mae_mps", "speed"), ("yaw_rate_mae_radps", "yaw rate (gyro only)"),
               ("obstacle_in_view_mae_m", "obstacles ahead (camera and lidar)"),
               ("obstacle_out_of_view_mae_m", "obstacles beside and behind (lidar only)"),
               ("goal_distance_in_view_mae_m", "goal distance, its centre in the camera's view"),
               ("goal_distance_out_of_view_mae_m", "goal distance, centre out of view"),
               ("goal_bearing_mae_deg", "goal bearing"))


def tables(report: dict) -> str:
    """The report's tables in Markdown (OUT/robustness.md; docs/RESULTS.md quotes them)."""
    sim, summary = report["sim"], report["summary"]
    names, conds = list(summary), [c for c, _, _ in conditions()]
    sweep_name = next((n for n, r in sim.items() if len(r) > 1), names[0])
    taus = sorted(sim[sweep_name], key=float)

    def row(cells) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    def label(cond: str) -> str:
        return cond.replace("_", " ").replace("imu", "IMU")

    def at_best_tau(n: str, c: str) -> dict:
        return sim[n][str(summary[n][c]["best_tau"]) if n == sweep_name else "1.0"][c]

    lines = ["### Head error with one sensor faulted", "",
             f"Error (rise over clean); each run at its best τ per condition (`{sweep_name}`'s in the last column).", "",
             row(["condition", *names, "best τ"]), row(["---"] * (len(names) + 2))]
    for c in conds:
        lines.append(row([label(c), *(f"{summary[n][c]['head_error']:.3f} ({100 * summary[n][c]['rise']:+.0f}%)"
                                      for n in names), f"{summary[sweep_name][c]['best_tau']:g}"]))
    lines += ["", "### In physical units", "",
              f"Mean absolute error; `{sweep_name}` at its best τ per condition, the others at τ = 1.", "",
              row(["run, condition", *(u for _, u, _ in UNITS)]), row(["---"] * (len(UNITS) + 1))]
    for n in names:
        for c in ("clean", "camera_zero", "lidar_drop", "imu_drop"):
            m = at_best_tau(n, c)
            lines.append(row([f"{n}, {label(c)}", *(f"{m[k]:.{d}f}" for k, _, d in UNITS)]))
    share = at_best_tau(sweep_name, "clean").get("goal_in_view_share")
    lines += ["", "### What survives a dropped sensor", "",
              ("Rise of each quantity's mean absolute error over clean (τ as above). A quantity another sensor "
               "also observes can survive the failure; one only the failed sensor observes cannot, in any fusion."
               + (f" The goal's centre lies within the camera's view in {100 * share:.0f} % of the test samples "
                  "with a goal." if share is not None else "")), "",
              row(["run, condition", *(u for _, u in OBSERVED_BY)]), row(["---"] * (len(OBSERVED_BY) + 1))]
    for n in names:
        clean = at_best_tau(n, "clean")
        for c in ("camera_drop", "lidar_drop", "imu_drop"):
            m = at_best_tau(n, c)
            lines.append(row([f"{n}, {label(c)}", *(f"{100 * (m[k] / clean[k] - 1):+.0f}%" if k in m and k in clean
                                                    else "-" for k, _ in OBSERVED_BY)]))
    lines += ["", f"### The τ sweep (`{sweep_name}`)", "",
              "Head error / attention mass on the faulted sensor / softmax Lipschitz diagnostic, per global τ:", "",
              row(["condition", *(f"τ = {float(t):g}" for t in taus)]), row(["---"] * (len(taus) + 1))]
    for c in conds:
        cells = []
        for t in taus:
            m = sim[sweep_name][t][c]
            att = "-" if c == "clean" else f"{m['attention_faulted']:.3f}"
            cells.append(f"{m['head_error']:.3f} / {att} / {m['lipschitz']:.3f}")
        lines.append(row([label(c), *cells]))
    if report.get("real"):
        order = ", ".join(next(iter(report["real"].values())))
        lines += ["", "### Real recordings (no labels)", "",
                  f"Self-supervised loss and attention mass at τ = 1 per attention run (`a / b`: {order}):", "",
                  row(["recording", "condition", "SSL loss", "attention camera / lidar / IMU", "on the faulted sensor"]),
                  row(["---"] * 5)]
        for bag, by_run in report["real"].items():
            present = [m for m in MODALITIES if by_run[next(iter(by_run))]["1.0"]["clean"][f"attention_{m}"] > 0]
            for c in conds:
                if c != "clean" and (c.split("_")[0] not in present or c.endswith(("_freeze", "_delay"))):
                    continue
                ms = [r["1.0"][c] for r in by_run.values()]
                ssl = " / ".join(f"{m['ssl_loss']:.3f}" for m in ms)
                mass = " / ".join(f"{ms[0][f'attention_{m}']:.3f}" for m in MODALITIES) if c == "clean" else ""
                faulted = "" if c == "clean" else " / ".join(f"{m['attention_faulted']:.3f}" for m in ms)
                lines.append(row([bag if c == "clean" else "", label(c), ssl, mass, faulted]))
    return "\n".join(lines) + "\n"


def run_evaluation(run_dirs: dict[str, Path], out: Path, taus: list[float], episodes: int, cache: Path,
                   bags: list[Path], threads: int = 1) -> dict:
    """Everything `fusion-attn eval-robustness` writes: OUT/robustness.json, its tables in
    OUT/robustness.md, and the plots."""
    torch.set_num_threads(threads)
    runs = [load_run(n, d) for n, d in run_dirs.items()]
    cfg = FusionConfig()
    data = held_out_set(runs[0].tc, cfg, cache, episodes)
    report = {"test_samples": len(data), "test_episodes": episodes, "taus": taus,
              "runs": {r.name: {"folder": str(run_dirs[r.name]), "fusion": r.tc.fusion,
                                "tau_random_prob": r.tc.tau_random_prob} for r in runs},
              "sim": evaluate_runs(runs, data, taus)}
    report["summary"] = summarise(report["sim"])
    report["real"] = {}
    attention_runs = [r for r in runs if r.has_attention]
    for bag in bags:
        seq = T._cached(cache, {"version": T.DATA_VERSION, "model": cfg.to_dict(), "hz": runs[0].tc.fusion_hz,
                                "kind": "bag", "path": str(Path(bag).resolve())},
                        lambda b=bag: T.bag_sequence([b], runs[0].tc.fusion_hz, cfg))
        real = T.Dataset.join([(seq, 1)])
        report["real"][Path(bag).name] = {r.name: {str(tau): measure(r, real, tau) for tau in _sweep(r, taus)}
                                          for r in attention_runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "robustness.md").write_text(tables(report))
    report["plots"] = [str(p) for p in plots(report["sim"], report["summary"], out)]
    return report
