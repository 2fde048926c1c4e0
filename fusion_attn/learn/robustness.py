"""Robustness evaluation (`fusion-attn eval-robustness`): what one failed sensor costs each fusion.

Trained runs (folders of `fusion-attn train`, each model built from the config its training state
holds) are compared on the same held-out simulated episodes (`data.held_out_set`: seeds no training
or validation episode uses), each with every single-sensor fault of `augment.corrupt` -- the faults
as the node would tokenize them -- and, for attention models, a sweep of the global τ. Per run, τ
and condition (`evaluation.evaluate`, as in training's validation): the supervised heads' error (mean
standardised squared error over ego velocity, obstacle distances and goal, and each in its own units,
obstacles and goal in the simulated camera's view apart from the rest: what survives a failed
lidar; the goal also by observability class, `CLASSES`), the attention mass the faulted sensor
receives, and the softmax Lipschitz diagnostic of the cross-attention (`model.softmax_lipschitz`).
The real recordings, which have no labels, get the
self-supervised losses and the attention mass, clean and with each fault; they are read from the
same cached shards as training's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import FusionConfig, ModelConfig
from ..errors import CheckpointError, ConfigError
from ..frames import MODALITIES
from ..model import FusionModel
from .augment import FAULTS
from .data import SEED_STRIDE, SPLIT_SEEDS, Dataset, bag_set, held_out_set
from .evaluation import conditions, evaluate, evaluate_taus
from .loop import STATE_FILE, TrainConfig, read_state
from .objectives import Heads, build_heads, build_model, heads_path, load_heads


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


def with_checkpoint(run: TrainedRun, checkpoint: str | Path, name: str | None = None) -> TrainedRun:
    """A checkpoint (its heads beside it) as a run of its own, in `run`'s training config: e.g. the packaged
    default, whose training folder is not kept. Named by its path unless `name` is given."""
    from ..checkpoint import load_checkpoint

    return replace(run, name=name or str(checkpoint), model=load_checkpoint(checkpoint, expect=run.cfg),
                   heads=load_heads(heads_path(checkpoint)))


def sweep(run: TrainedRun, data: Dataset, taus: list[float], fusion_hz: float) -> dict[str, dict]:
    """{tau: {condition: metrics}} of one run on `data` (sampled at fusion_hz); a run without attention
    is measured at τ = 1 only (one trained at τ = 1 is swept: what τ does to it at run time)."""
    taus = taus if run.has_attention else [1.0]
    reports = evaluate_taus(run.model, run.heads, data, run.cfg, fusion_hz, taus, lipschitz=True)
    return {str(tau): reports[tau] for tau in taus}


def group_of(name: str) -> str:
    """Runs named "design#k" are seeds of one design: their figures are averaged (and spread given)."""
    return name.split("#", 1)[0]


# the supervised quantities in physical units, and the sensors that observe each in the simulator
# (docs/OBSERVABILITY.md: the share of samples in which each does)
QUANTITIES = (("speed_mae_mps", "speed", "m/s", 3), ("yaw_rate_mae_radps", "yaw rate", "rad/s", 3),
              ("obstacle_mae_m", "obstacle distance", "m", 3), ("goal_distance_mae_m", "goal distance", "m", 3),
              ("goal_bearing_mae_deg", "goal bearing", "°", 1))
OBSERVERS = {"speed_mae_mps": ("camera", "lidar", "imu", "odometry", "imu2"),
             "yaw_rate_mae_radps": ("camera", "lidar", "imu", "odometry", "imu2"),
             "obstacle_mae_m": ("camera", "lidar"), "goal_distance_mae_m": ("camera", "lidar"),
             "goal_bearing_mae_deg": ("camera", "lidar")}
# observability classes: a quantity whose observers the simulator lets a sample miss is also measured
# over the samples two sensors observe it in (the targets judge those) and over the rest. The goal: the
# lidar reaches the post in about half the samples, the camera sees it in nearly all
# (`evaluation.lidar_reaches_post`); camera and lidar observe every other quantity in every sample, but
# for the obstacles in 14 % of sectors (docs/OBSERVABILITY.md), not split here.
CLASSES = (("two_observers", "camera + lidar"), ("camera_only", "camera only"))
CLASSED = ("goal_distance_mae_m", "goal_bearing_mae_deg")


def class_key(quantity: str, cls: str) -> str:
    """The metric of `quantity` over the samples of observability class `cls`."""
    return quantity.replace("_mae_", f"_{cls}_mae_")


# every quantity's metric, and each class's of the classed ones: what the rises are taken of
QUANTITY_KEYS = (*(q for q, *_ in QUANTITIES), *(class_key(q, c) for q in CLASSED for c, _ in CLASSES))
TARGET_FAULTS = ("drop", "zero", "noise", "freeze")  # the "any single sensor failed"
MAX_RISE, CONCAT_RATIO, MAX_WEIGHT, AUROC_HARD, AUROC_SOFT = 0.25, 2.0, 0.10, 0.95, 0.90
ALL_SENSORS = FusionConfig(model=ModelConfig(odometry=True, second_imu=True))  # its conditions: every sensor's faults, in order


def summarise(report: dict, key: str = "head_error") -> dict:
    """Per run and condition: the error at the best τ for that condition, its rise over clean at the
    best clean τ, each quantity's rise (at the same τ), the weight on the faulted sensor at the lowest τ,
    and the trust's detection figures (trust does not depend on τ: taken at the first)."""
    out = {}
    for name, by_tau in report.items():
        taus = sorted(by_tau, key=float)
        best_clean = min(taus, key=lambda t: by_tau[t]["clean"][key])
        clean = by_tau[best_clean]["clean"]
        rows = {}
        for cond in by_tau[taus[0]]:
            best_tau = min(taus, key=lambda t: by_tau[t][cond][key])
            m = by_tau[best_tau][cond]
            low = by_tau[taus[0]][cond]
            rows[cond] = {"best_tau": float(best_tau), key: m[key], "rise": m[key] / clean[key] - 1.0,
                          "quantity_rise": {q: m[q] / clean[q] - 1.0 for q in QUANTITY_KEYS if q in m and clean.get(q)},
                          "attention_faulted_low_tau": low.get("attention_faulted"),
                          **{k: low[k] for k in ("trust_auroc", "trust_faulted", "untrusted_faulted") if k in low}}
        out[name] = rows
    return out


def grouped(summary: dict) -> dict:
    """{design: {condition: {figure: (mean, std over its seeds)}}} of `summarise`'s per-run rows."""
    groups: dict[str, list[dict]] = {}
    for name, rows in summary.items():
        groups.setdefault(group_of(name), []).append(rows)
    out = {}
    for g, runs in groups.items():
        out[g] = {}
        for cond in runs[0]:
            figures = {}
            for k, v in runs[0][cond].items():
                if isinstance(v, dict):
                    for q in v:
                        vals = [r[cond][k][q] for r in runs if q in r[cond][k]]
                        figures[f"{k}.{q}"] = (float(np.mean(vals)), float(np.std(vals)), len(vals))
                elif v is not None:
                    vals = [r[cond][k] for r in runs if r[cond].get(k) is not None]
                    figures[k] = (float(np.mean(vals)), float(np.std(vals)), len(vals))
            out[g][cond] = figures
    return out


def targets(groups: dict, design: str, baseline: str = "concat") -> list[dict]:
    """The issue's targets, one row per check, for `design` against `baseline`: per quantity observed by
    two or more sensors and any single sensor failed with TARGET_FAULTS, its rise and the baseline's
    (a CLASSED quantity's over the samples two sensors observe, where both reports measured them);
    the weight on the failed sensor at the lowest τ; the trust's AUROC per fault."""
    rows = []
    new, base = groups[design], groups.get(baseline)
    for sensor in MODALITIES:
        if f"{sensor}_drop" not in new:  # a sensor the design does not read
            continue
        for fault in TARGET_FAULTS:
            cond = f"{sensor}_{fault}"
            for q, label, *_ in QUANTITIES:
                if len(OBSERVERS[q]) < 2 or f"quantity_rise.{q}" not in new[cond]:
                    continue
                two = class_key(q, "two_observers")
                if q in CLASSED and all(_every_seed(g.get(cond, {}), f"quantity_rise.{two}") for g in (new, base) if g):
                    q, label = two, f"{label} ({dict(CLASSES)['two_observers']})"
                rise = new[cond][f"quantity_rise.{q}"][0]
                base_rise = base[cond][f"quantity_rise.{q}"][0] if base and f"quantity_rise.{q}" in base.get(cond, {}) else None
                # the ratio means something only where the failure costs the baseline (5 % or more)
                ratio_ok = None if base_rise is None or base_rise < 0.05 else base_rise >= CONCAT_RATIO * max(rise, 0.0)
                rows.append({"check": "rise", "condition": cond, "quantity": label, "key": q, "rise": rise,
                             "baseline_rise": base_rise,
                             "ok": rise <= MAX_RISE and ratio_ok is not False, "ratio_ok": ratio_ok})
            weight = new[cond].get("attention_faulted_low_tau")
            if weight is not None:
                rows.append({"check": "weight", "condition": cond, "value": weight[0], "ok": weight[0] <= MAX_WEIGHT})
        for fault in ("drop", "zero", "freeze", "noise", "partial"):
            cond = f"{sensor}_{fault}"
            if "trust_auroc" in new[cond]:
                need = AUROC_HARD if fault in ("drop", "zero", "freeze") else AUROC_SOFT
                value = new[cond]["trust_auroc"][0]
                rows.append({"check": "auroc", "condition": cond, "value": value, "need": need, "ok": value >= need})
    return rows


def _every_seed(figures: dict, key: str) -> bool:
    """Does every seed of a design measure `key` (reports written before a metric lack it)?"""
    return key in figures and figures[key][2] == figures["rise"][2]


def measured_conditions(groups: dict) -> list[str]:
    """Every condition some design was measured in, in `conditions` order (one without odometry lacks its faults)."""
    have = {c for rows in groups.values() for c in rows}
    return [c for c, _, _ in conditions(ALL_SENSORS) if c in have]


def plots(report: dict, summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = grouped(summary)
    conds = measured_conditions(groups)
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(groups)
    for i, (name, rows) in enumerate(groups.items()):
        rise = [rows[c]["rise"] if c in rows else (np.nan, 0.0, 0) for c in conds]
        ax.bar(np.arange(len(conds)) + i * width, [100 * r[0] for r in rise], width, yerr=[100 * r[1] for r in rise],
               label=name)
    ax.axhline(100 * MAX_RISE, color="k", lw=0.8, ls="--")
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
        sensors = [m for m in MODALITIES if f"{m}_drop" in by_tau[taus[0]]]
        fig, axes = plt.subplots(2, len(sensors), figsize=(4 * len(sensors), 6.5), sharex=True)
        for m, (ax, ax_err) in enumerate(zip(axes[0], axes[1])):
            for f in FAULTS:
                c = f"{sensors[m]}_{f}"
                line, = ax.plot([float(t) for t in taus], [by_tau[t][c]["attention_faulted"] for t in taus], marker="o", label=f)
                ax_err.plot([float(t) for t in taus], [by_tau[t][c]["head_error"] for t in taus], marker="o", color=line.get_color())
            ax.plot([float(t) for t in taus], [by_tau[t]["clean"][f"attention_{sensors[m]}"] for t in taus], "k--", label="clean")
            ax_err.plot([float(t) for t in taus], [by_tau[t]["clean"]["head_error"] for t in taus], "k--")
            ax.set_xscale("log")
            ax.set_title(f"{sensors[m]} faulted ({name})")
            ax_err.set_xlabel("global τ")
        axes[0][0].set_ylabel("weight on the faulted sensor")
        axes[1][0].set_ylabel("head error")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "robustness_weight_vs_tau.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _fmt(fig: tuple[float, float, int] | None, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    """mean (± std over seeds when there are several)."""
    if fig is None:
        return "-"
    mean, std, n = fig
    text = f"{scale * mean:+.{digits}f}" if signed else f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


def _row(cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _share(values: list[float]) -> str:
    """Shares over seeds as a percentage: the mean, and the range where there are several."""
    text = f"{100 * np.mean(values):.0f}%"
    return text + (f" ({100 * min(values):.0f}-{100 * max(values):.0f}%)" if len(values) > 1 else "")


def _label(cond: str) -> str:
    return cond.replace("_", " ").replace("imu", "IMU")


def _sweep_tables(runs: dict, name: str, conds: list[str]) -> list[str]:
    """One run's τ sweep, {tau: {condition: metrics}}: error, failed-sensor weight and Lipschitz per τ, and
    per condition the quantity on which the lowest τ beats the highest most."""
    taus = sorted(runs, key=float)
    conds = [c for c in conds if c in runs[taus[0]]]
    lines = ["", f"### The τ sweep (`{name}`)", "",
              "Head error / weight on the faulted sensor / softmax Lipschitz diagnostic (where τ acts), per global τ:", "",
              _row(["condition", *(f"τ = {float(t):g}" for t in taus)]), _row(["---"] * (len(taus) + 1))]
    for c in conds:
        cells = []
        for t in taus:
            m = runs[t][c]
            att = "-" if c == "clean" else f"{m['attention_faulted']:.3f}"
            cells.append(f"{m['head_error']:.3f} / {att} / {m.get('lipschitz', float('nan')):.3f}")
        lines.append(_row([_label(c), *cells]))
    lines += ["", f"### Where τ matters (`{name}`)", "",
              (f"Per condition, the quantity on which the lowest τ ({float(taus[0]):g}) beats the highest "
              f"({float(taus[-1]):g}) most (error at the highest over the lowest, minus 1), and the same for clean: "
              "what a low τ costs or buys."), "",
              _row(["condition", "quantity", "error low τ", "error high τ", "high over low"]), _row(["---"] * 5)]
    for c in conds:
        lo, hi = runs[taus[0]][c], runs[taus[-1]][c]
        gains = [(hi[q] / lo[q] - 1.0, q, lab) for q, lab, *_ in QUANTITIES if q in lo and lo[q] > 0]
        if gains:
            gain, q, lab = max(gains)
            lines.append(_row([_label(c), lab, f"{lo[q]:.3f}", f"{hi[q]:.3f}", f"{100 * gain:+.0f}%"]))
    return lines


def tables(report: dict) -> str:
    """The report's tables in Markdown (OUT/robustness.md; docs/RESULTS.md quotes them)."""
    sim, groups = report["sim"], grouped(report["summary"])
    names, conds = list(groups), measured_conditions(groups)
    design = names[0]
    sweep_name = next((n for n, r in sim.items() if len(r) > 1), next(iter(sim)))
    taus = sorted(sim[sweep_name], key=float)

    seeds = ", ".join(f"{g}: {groups[g]['clean']['head_error'][2]}" for g in names)
    lines = ["### Head error with one sensor faulted", "",
             (f"Error (rise over clean), mean ± std over training seeds ({seeds}); each run at its best τ per "
             f"condition (`{sweep_name}`'s in the last column)."), "",
             _row(["condition", *names, "best τ"]), _row(["---"] * (len(names) + 2))]
    for c in conds:
        best = report["summary"][sweep_name].get(c, {}).get("best_tau")
        lines.append(_row([_label(c), *(f"{_fmt(groups[n].get(c, {}).get('head_error'))} "
                                        f"({_fmt(groups[n].get(c, {}).get('rise'), 100, 0, True)}%)" for n in names),
                           "-" if best is None else f"{best:g}"]))
    # the quantities, then the classed ones' classes where a design measured them
    label = {q: lab for q, lab, *_ in QUANTITIES}
    unit = {q: u for q, _, u, _ in QUANTITIES}
    digits = {q: d for q, _, _, d in QUANTITIES}
    for q in CLASSED:
        for c, text in CLASSES:
            k = class_key(q, c)
            label[k], unit[k], digits[k] = f"{label[q]}, {text}", unit[q], digits[q]
    measured = {k for n in names for c in conds[1:] for k in groups[n].get(c, {})}
    columns = [q for q, *_ in QUANTITIES] + [class_key(q, c) for q in CLASSED for c, _ in CLASSES
                                             if f"quantity_rise.{class_key(q, c)}" in measured]
    lines += ["", "### Each quantity's rise over clean", "",
              "Rise of each quantity's mean absolute error with one sensor failed (mean over seeds; each run at its "
              "best τ per condition). Observers: " + "; ".join(f"{lab}: {', '.join(OBSERVERS[q])}"
                                                               for q, lab, *_ in QUANTITIES) + "."
              + ("" if len(columns) == len(QUANTITIES) else
                 " The goal by observability class: the samples in which the lidar's tokens hold a return from the "
                 "post (camera and lidar observe it; the targets judge these), and the rest (the camera alone, or "
                 "in a few nothing)."), "",
              _row(["condition", "design", *(label[q] for q in columns)]), _row(["---"] * (len(columns) + 2))]
    for c in conds[1:]:
        for i, n in enumerate(names):
            lines.append(_row([_label(c) if i == 0 else "", n,
                              *(_fmt(groups[n].get(c, {}).get(f"quantity_rise.{q}"), 100, 0, True) + "%" for q in columns)]))
    lines += ["", "### In physical units (clean)", "",
              _row(["design", *(f"{label[q]} {unit[q]}" for q in columns)]), _row(["---"] * (len(columns) + 1))]
    for n in names:
        runs = [r for r in sim if group_of(r) == n]
        best = [sim[r][str(report["summary"][r]["clean"]["best_tau"]) if len(sim[r]) > 1 else "1.0"]["clean"] for r in runs]
        cells = []
        for q in columns:
            vals = [b[q] for b in best if q in b]
            cells.append(_fmt((float(np.mean(vals)), float(np.std(vals)), len(vals)), digits=digits[q]) if vals else "-")
        lines.append(_row([n, *cells]))
    shares = [rows["clean"]["goal_two_observers_share"] for by_tau in sim.values() for rows in by_tau.values()
              if "goal_two_observers_share" in rows["clean"]]  # the held-out samples' own: any run's
    if shares:
        lines += ["", f"Camera and lidar both observe the goal in {100 * shares[0]:.0f} % of the held-out samples that have one."]
    if any("trust_auroc" in groups[design].get(c, {}) for c in conds):
        lines += ["", f"### Trust (`{design}`)", "",
                  ("AUROC of the faulted sensor's trust, faulted against clean samples (1: every faulted sample below "
                  "every clean one); mean trust of the faulted sensor; share of faulted samples below the threshold "
                  "(outputs.TRUST_THRESHOLD), an absent sensor counting as below. Clean: each sensor's mean trust and "
                  "the share of clean samples below the threshold (false alarms)."), "",
                  _row(["condition", "AUROC", "trust", "below threshold"]), _row(["---"] * 4)]
        clean_run = sim[next(r for r in sim if group_of(r) == design)]["1.0" if "1.0" in sim[sweep_name] else taus[0]]["clean"]
        trusted = [m for m in MODALITIES if f"trust_{m}" in clean_run]
        lines.append(_row(["clean", "-", " / ".join(f"{m} {clean_run[f'trust_{m}']:.3f}" for m in trusted),
                          " / ".join(f"{100 * clean_run.get(f'untrusted_{m}', float('nan')):.1f}%" for m in trusted)]))
        for c in conds[1:]:
            g = groups[design].get(c)
            if g is None:
                continue
            lines.append(_row([_label(c), _fmt(g.get("trust_auroc")), _fmt(g.get("trust_faulted")),
                              _fmt(g.get("untrusted_faulted"), 100, 1) + "%"]))
    swept = [next(r for r in sim if group_of(r) == g) for g in names]  # each design's first seed
    for name in [r for r in swept if len(sim[r]) > 1]:
        lines += _sweep_tables(sim[name], name, conds)
    if "concat" in groups:
        checks = targets(groups, design)
        failed = [r for r in checks if not r["ok"]]
        lines += ["", f"### Targets (`{design}` against `concat`)", "",
                  (f"{len(checks) - len(failed)} of {len(checks)} checks hold: a quantity two or more sensors observe rises at "
                  f"most {100 * MAX_RISE:.0f} % with any single sensor failed ({', '.join(TARGET_FAULTS)}) and concat's rise "
                  f"is at least {CONCAT_RATIO:g}x (where concat loses 5 % or more); the failed sensor's weight at the lowest τ "
                  f"is at most {100 * MAX_WEIGHT:.0f} %; trust AUROC at least {AUROC_HARD} (drop, zero, freeze) or "
                  f"{AUROC_SOFT} (noise, partial). The goal is judged on the samples camera and lidar both observe, "
                  "where both designs' reports measured them. Those that do not:"), "",
                  _row(["check", "condition", "quantity", "value", "concat", "needed"]), _row(["---"] * 6)]
        for r in failed:
            if r["check"] == "rise":
                base = "-" if r["baseline_rise"] is None else f"{100 * r['baseline_rise']:+.0f}%"
                lines.append(_row(["rise", _label(r["condition"]), r["quantity"], f"{100 * r['rise']:+.0f}%", base,
                                  f"<= {100 * MAX_RISE:.0f}%, concat >= {CONCAT_RATIO:g}x"]))
            elif r["check"] == "weight":
                lines.append(_row(["weight", _label(r["condition"]), "", f"{r['value']:.3f}", "", f"<= {MAX_WEIGHT}"]))
            else:
                lines.append(_row(["AUROC", _label(r["condition"]), "", f"{r['value']:.3f}", "", f">= {r['need']}"]))
        others = {g: targets(groups, g) for g in names if g not in (design, "concat") and "trust_auroc" in groups[g].get(conds[1], {})}
        if others:
            lines += ["", "The same checks for the other designs with a trust (first seed's run, or the mean over "
                      "seeds), against concat: " + "; ".join(
                          f"`{g}` {sum(r['ok'] for r in rows)} of {len(rows)}" for g, rows in others.items()) + "."]
    if report.get("real"):
        lines += ["", "### Real recordings and their corrupted copies (no labels)", "",
                  (f"`{design}` at τ = 1 (mean over its seeds, the range over seeds in brackets where several): "
                   "self-supervised loss, mean trust per sensor (present ones), the share of fusions whose inputs the "
                   "corruption changed at all (a frozen first frame is the clean one), the share of those in which the "
                   "corrupted sensor's trust is below the threshold (absent counting as below), and the share of all "
                   "fusions in which each clean present sensor's trust is at or above it."), "",
                  _row(["recording", "condition", "SSL loss", "trust (per sensor it reads)", "changed", "corrupted below",
                        "clean ones at or above"]),
                  _row(["---"] * 7)]
        for bag, by_run in report["real"].items():
            runs = [r for r in by_run if group_of(r) == design] or [next(iter(by_run))]
            seeds = [by_run[r]["1.0"] if "1.0" in by_run[r] else next(iter(by_run[r].values())) for r in runs]
            present = [m for m in MODALITIES if seeds[0]["clean"].get(f"trust_{m}") is not None]
            for c in [c for c in conds if c == "clean" or c in REAL_CORRUPTIONS]:
                sensor = c.split("_")[0]
                if c != "clean" and sensor not in present:
                    continue
                ms = [m[c] for m in seeds]
                trust = " / ".join(f"{s} " + (f"{np.mean([m[f'trust_{s}'] for m in ms]):.3f}" if f"trust_{s}" in ms[0] else "-")
                                   for s in MODALITIES if f"attention_{s}" in ms[0])
                changed = below = ""
                if c != "clean":
                    # reports written before `affected` was measured: every fusion counted as changed
                    changed = _share([m.get("affected", 1.0) for m in ms])
                    hits = [m.get("untrusted_affected", m["untrusted_faulted"]) for m in ms if m.get("affected", 1.0) > 0]
                    below = _share(hits) if hits else "n/a"
                others = ", ".join(f"{s} {_share([1 - m[f'untrusted_{s}'] for m in ms])}" for s in present
                                   if s != sensor and f"untrusted_{s}" in ms[0])
                lines.append(_row([bag if c == "clean" else "", _label(c), f"{np.mean([m['ssl_loss'] for m in ms]):.3f}",
                                   trust, changed, below, others]))
    return "\n".join(lines) + "\n"


# the corrupted copies of the real recordings the evaluation reports (the list)
REAL_CORRUPTIONS = ("camera_zero", "camera_freeze", "camera_noise", "imu_freeze", "imu_zero", "lidar_noise", "lidar_drop")


def _sweep_job(name: str, folder: Path, data_tc: TrainConfig, cache: Path, episodes: int, taus: list[float],
               threads: int) -> dict:
    """One run's sweep on the held-out set, in a worker process of its own."""
    torch.set_num_threads(threads)
    run = load_run(name, folder)
    return sweep(run, held_out_set(data_tc, run.cfg, cache, episodes), taus, data_tc.fusion_hz)


def state_digest(folder: Path) -> str:
    """sha256 of a run's training state: what identifies the weights a sweep measured."""
    return hashlib.sha256((Path(folder) / STATE_FILE).read_bytes()).hexdigest()[:16]


def held_out_seed(report: dict) -> int:
    """The first held-out episode's seed a report measured on: before the test set was every run's, it
    followed the seed of the report's first run (the one whose data settings the evaluation took)."""
    if "test_seed" in report:
        return report["test_seed"]
    first = next(iter(report.get("runs", {}).values()), {})
    return SPLIT_SEEDS["test"] + SEED_STRIDE * first.get("seed", 0)


def reusable_sweeps(previous: dict, episodes: int, taus: list[float], trigger: str = "timer",
                    camera_view: int = 64) -> dict[str, dict]:
    """{state digest: sweep} of a previous report measured on the same held-out episodes (sampled on the
    same trigger, rendered by the same rig) and τ sweep."""
    if (previous.get("test_episodes"), held_out_seed(previous), previous.get("taus"), previous.get("trigger", "timer"),
            previous.get("camera_view", 64)) != (episodes, SPLIT_SEEDS["test"], taus, trigger, camera_view):
        return {}
    return {info["state"]: previous["sim"][name] for name, info in previous.get("runs", {}).items() if "state" in info}


def finished_sweeps(folder: Path, header: dict) -> dict[str, dict]:
    """{state digest: sweep} that an evaluation stopped before its report (Ctrl-C, a crash) finished on the
    same held-out samples and τ sweep (`header`); an unreadable file is measured again."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(saved, dict) and saved.get("header") == header:
            found[path.stem] = saved["sweep"]
    return found


def read_report(path: Path) -> dict:
    """An earlier evaluation's robustness.json, or a ConfigError that names what is wrong with it."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable robustness.json: {exc}") from exc
    if not isinstance(report, dict) or not {"runs", "sim", "test_samples"} <= report.keys():
        raise ConfigError(f"{path}: not a robustness.json of `fusion-attn eval-robustness` (no runs, sim or test_samples)")
    return report


def check_joinable(earlier: dict, header: dict, names, source: str) -> None:
    """An earlier report's runs can join this one only if it measured the same held-out samples and τ
    sweep (`header`: test_samples, test_episodes, test_seed, taus, trigger, the rig's camera_view) and no
    name is in both."""
    predate = {"trigger": "timer", "camera_view": 64}  # what a report written before the key measured
    theirs = {k: earlier.get(k, predate.get(k)) for k in header} | {"test_seed": held_out_seed(earlier)}
    if theirs != header:
        raise ConfigError(f"{source} measured other held-out samples or τ: {theirs}, this evaluation {header}")
    if clash := set(earlier["runs"]) & set(names):
        raise ConfigError(f"{source} already has runs named {sorted(clash)}: name the new ones differently")


def run_evaluation(run_dirs: dict[str, Path], out: Path, taus: list[float], episodes: int, cache: Path,
                   bags: list[Path], threads: int = 1, jobs: int = 1, reuse: bool = False,
                   beside: Path | None = None) -> dict:
    """Everything `fusion-attn eval-robustness` writes: OUT/robustness.json, its tables in
    OUT/robustness.md, and the plots. jobs: runs evaluated at once, each in a process of its own
    (with `threads` torch threads). reuse: a run whose training state OUT/robustness.json already
    measured (same state digest, episodes and τ sweep) keeps that sweep instead of running it again.
    beside: an earlier robustness.json whose runs join these as measured there (`check_joinable`), so
    that a new run is judged against baselines whose folders are gone; the first of `run_dirs` stays
    the design the targets judge."""
    earlier = read_report(Path(beside)) if beside else None  # read first: a bad report fails before any sweep
    torch.set_num_threads(threads)
    runs = [load_run(n, d) for n, d in run_dirs.items()]
    digests = {r.name: state_digest(run_dirs[r.name]) for r in runs}
    data_tc = runs[0].tc  # every run sees the episodes, rate and trigger of the first run's data settings
    hz = data_tc.fusion_hz
    test_samples = len(held_out_set(data_tc, runs[0].cfg, cache, episodes))  # also makes the shards, once
    header = {"test_samples": test_samples, "test_episodes": episodes, "test_seed": SPLIT_SEEDS["test"], "taus": taus,
              "trigger": data_tc.trigger, "camera_view": data_tc.sim_camera_view}
    if earlier is not None:
        check_joinable(earlier, header, run_dirs, str(beside))
    previous, finished = out / "robustness.json", out / "sweeps"
    known = reusable_sweeps(read_report(previous), episodes, taus, data_tc.trigger, data_tc.sim_camera_view) if reuse and previous.exists() else {}
    known |= finished_sweeps(finished, header) if reuse else {}
    sim = {r.name: known[digests[r.name]] for r in runs if digests[r.name] in known}
    reused = set(sim)
    todo = [r for r in runs if r.name not in reused]

    def keep(name: str, result: dict) -> None:  # each sweep as it finishes: a stopped evaluation resumes
        finished.mkdir(parents=True, exist_ok=True)
        (finished / f"{digests[name]}.json").write_text(json.dumps({"header": header, "sweep": result}, default=float))
        sim[name] = result

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_sweep_job, r.name, Path(run_dirs[r.name]), data_tc, cache, episodes, taus,
                                   threads): r.name for r in todo}
            failed = []
            for f in as_completed(futures):
                if f.exception() is None:
                    keep(futures[f], f.result())
                else:  # raised once the others have finished and been kept
                    failed.append(f.exception())
            if failed:
                raise failed[0]
    else:
        test_set = functools.cache(lambda cfg: held_out_set(data_tc, cfg, cache, episodes))  # loaded once per config
        for r in todo:
            keep(r.name, sweep(r, test_set(r.cfg), taus, hz))
    report = {**header,
              "runs": {r.name: {"folder": str(run_dirs[r.name]), "fusion": r.tc.fusion, "sensor_fusion": r.tc.sensor_fusion,
                                "seed": r.tc.seed, "tau_random_prob": r.tc.tau_random_prob,
                                "trust_floor": r.cfg.model.trust_floor, "state": digests[r.name],
                                "reused": r.name in reused} for r in runs},
              "sim": {r.name: sim[r.name] for r in runs}}
    # the real recordings at τ = 1: every seed of the design the targets judge, the first of each other design
    design = group_of(runs[0].name)
    firsts = {group_of(r.name): r for r in reversed(runs) if r.has_attention}
    on_real = [r for r in runs if r.has_attention and group_of(r.name) == design]
    on_real += [r for g, r in firsts.items() if g != design]
    report["real"] = {Path(bag).name: {r.name: {"1.0": evaluate(r.model, r.heads, bag_set(bag, hz, r.cfg, cache, data_tc.trigger),
                                                                r.cfg, hz, count_changed=True)} for r in on_real}
                      for bag in bags}
    if earlier is not None:  # the earlier runs as measured there, after the new ones
        report["runs"] |= {n: info | {"reused": True, "report": str(beside)} for n, info in earlier["runs"].items()}
        report["sim"] |= earlier["sim"]
        for bag, by_run in earlier.get("real", {}).items():
            report["real"][bag] = report["real"].get(bag, {}) | by_run
    report["summary"] = summarise(report["sim"])
    report["groups"] = grouped(report["summary"])
    report["targets"] = targets(report["groups"], group_of(runs[0].name)) if "concat" in report["groups"] else []
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "robustness.md").write_text(tables(report))
    report["plots"] = [str(p) for p in plots(report["sim"], report["summary"], out)]
    shutil.rmtree(finished, ignore_errors=True)  # robustness.json holds them all now
    return report
