"""Robustness evaluation (`fusion-attn eval-robustness`): what one failed sensor costs each fusion.

Trained runs (folders of `fusion-attn train`, each model built from the config its training state
holds) are compared on the same held-out simulated episodes (`data.held_out_set`: seeds no training
or validation episode uses), each with every single-sensor fault of `augment.corrupt` -- the faults
as the node would tokenize them -- and, for attention models, a sweep of the global τ. Per run, τ
and condition (`evaluation.evaluate`, as in training's validation): the supervised heads' error (mean
standardised squared error over ego velocity, obstacle distances and goal, and each in its own units,
obstacles and goal in the simulated camera's view apart from the rest: what survives a failed
lidar), the attention mass the faulted sensor receives, and the softmax Lipschitz diagnostic of the
cross-attention (`model.softmax_lipschitz`). The real recordings, which have no labels, get the
self-supervised losses and the attention mass, clean and with each fault; they are read from the
same cached shards as training's.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import FusionConfig
from ..errors import CheckpointError
from ..frames import MODALITIES
from ..model import FusionModel
from .augment import FAULTS
from .data import Dataset, bag_set, held_out_set
from .evaluation import conditions, evaluate
from .loop import STATE_FILE, TrainConfig, read_state
from .objectives import Heads, build_heads, build_model


@dataclass
class TrainedRun:
    name: str
    tc: TrainConfig
    cfg: FusionConfig
    model: torch.nn.Module
    heads: Heads

    @property
    def has_attention(self) -> bool:
        return isinstance(self.model, FusionModel)


def load_run(name: str, folder: str | Path) -> TrainedRun:
    """A finished training run from its saved state (safetensors model files exist only for attention),
    its model and heads built from the config the state holds."""
    path = Path(folder) / STATE_FILE
    state, tc, cfg = read_state(path)
    try:
        model = build_model(cfg, tc.fusion)
        model.load_state_dict(state["model"])
        heads = build_heads(cfg)
        heads.load_state_dict(state["heads"])
    except (KeyError, RuntimeError) as exc:
        msg = f"{path}: its weights do not fit its own config: {type(exc).__name__}: {exc}"
        raise CheckpointError(msg) from exc
    return TrainedRun(name, tc, cfg, model.eval(), heads.eval())


def sweep(run: TrainedRun, data: Dataset, taus: list[float], fusion_hz: float) -> dict[str, dict]:
    """{tau: {condition: metrics}} of one run on `data` (sampled at fusion_hz); a run without attention,
    or trained at fixed τ, is measured at τ = 1 only."""
    taus = taus if run.has_attention and run.tc.tau_random_prob > 0 else [1.0]
    return {str(tau): evaluate(run.model, run.heads, data, run.cfg, fusion_hz, tau, lipschitz=True)
            for tau in taus}


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
            for f in FAULTS:
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
    data_tc = runs[0].tc  # every run sees the episodes and rate of the first run's data settings
    hz = data_tc.fusion_hz
    test_set = functools.cache(lambda cfg: held_out_set(data_tc, cfg, cache, episodes))  # loaded once per config
    report = {"test_samples": len(test_set(runs[0].cfg)), "test_episodes": episodes, "taus": taus,
              "runs": {r.name: {"folder": str(run_dirs[r.name]), "fusion": r.tc.fusion,
                                "tau_random_prob": r.tc.tau_random_prob} for r in runs},
              "sim": {r.name: sweep(r, test_set(r.cfg), taus, hz) for r in runs}}
    report["summary"] = summarise(report["sim"])
    report["real"] = {Path(bag).name: {r.name: sweep(r, bag_set(bag, hz, r.cfg, cache), taus, hz)
                                       for r in runs if r.has_attention} for bag in bags}
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "robustness.md").write_text(tables(report))
    report["plots"] = [str(p) for p in plots(report["sim"], report["summary"], out)]
    return report
