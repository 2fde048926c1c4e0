"""PNG plots of a replay: attention, trust per modality and sensor health over time, latency, τ sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from .frames import NS_PER_S
from .outputs import TRUST_THRESHOLD

COLOURS = {"camera": "tab:blue", "lidar": "tab:orange", "imu": "tab:green", "odometry": "tab:purple", "imu2": "tab:olive"}
PNG = {"metadata": {"Software": None}, "dpi": 110}  # no version string: same data, same file


def replay_plots(out: Path, trace, configured: tuple[str, ...], taus: np.ndarray) -> None:
    if not trace.stamps:
        return
    t = (np.array(trace.stamps) - trace.stamps[0]) / NS_PER_S
    attention = np.array(trace.attention)[:, 0]  # (n, S) at the first τ
    sensors = trace.sensors

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.stackplot(t, attention.T, labels=sensors, colors=[COLOURS[m] for m in sensors], alpha=0.85)
    ax.set(xlabel="recorded time [s]", ylabel="attention mass", ylim=(0, 1),
           title=f"attention per sensor (τ global/{'/'.join(sensors)} = " + "/".join(f"{v:g}" for v in taus[0]) + ")")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "attention.png", **PNG)
    plt.close(fig)
    _trust_plot(out, t, trace, configured, sensors)

    ages = np.array(trace.ages) * 1e3
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, height_ratios=[3, 1])
    for i, m in enumerate(sensors):
        if m in configured:
            top.plot(t, ages[:, i], color=COLOURS[m], label=m)
    top.set(ylabel="age at fusion [ms]", title="sensor health")
    top.legend(loc="upper right")
    if trace.masked:
        # a fusion's mask holds until the next fusion: drawn as intervals, so that a single masked fusion shows
        masked = np.array(trace.masked)
        ends = np.append(t[1:], t[-1] + (np.median(np.diff(t)) if len(t) > 1 else 0.0))
        for j, m in enumerate(configured):
            first, last = _runs(masked[:, j])
            bottom.broken_barh(list(zip(t[first], ends[last] - t[first])), (j - 0.4, 0.8), color=COLOURS[m],
                               linewidth=1)  # an edge: a run shorter than a pixel still shows
        bottom.set(yticks=range(len(configured)), yticklabels=configured, ylim=(-0.5, len(configured) - 0.5))
    bottom.set(xlabel="recorded time [s]", ylabel="masked")
    fig.tight_layout()
    fig.savefig(out / "health.png", **PNG)
    plt.close(fig)

    lat = np.array(trace.latency_ms)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lat[np.isfinite(lat)], bins=40, color="tab:gray")
    ax.set(xlabel="fusion time - newest sensor stamp [ms]", ylabel="fusions", title="pipeline latency (recorded time)")
    fig.tight_layout()
    fig.savefig(out / "latency.png", **PNG)
    plt.close(fig)

    if len(taus) > 1:
        mean = np.array(trace.attention).mean(axis=0)  # (K, S)
        rows = [",".join(["tau_global", *(f"tau_{m}" for m in sensors), *(f"attention_{m}" for m in sensors)])]
        rows += [",".join(f"{v:g}" for v in tau) + "," + ",".join(f"{a:.6f}" for a in mean[k]) for k, tau in enumerate(taus)]
        (out / "sweep.csv").write_text("\n".join(rows) + "\n")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(taus))
        for i, m in enumerate(sensors):
            ax.plot(x, mean[:, i], marker="o", color=COLOURS[m], label=m)
        ax.set_xticks(x, ["/".join(f"{v:g}" for v in tau) if len(set(tau[1:])) > 1 else f"{tau[0]:g}" for tau in taus])
        ax.set(xlabel=f"τ (global, or global/{'/'.join(sensors)})", ylabel="mean attention mass", title="τ sweep")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sweep.png", **PNG)
        plt.close(fig)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the first and of the last element of each run of True in `mask`."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1


def _trust_plot(out: Path, t: np.ndarray, trace, configured: tuple[str, ...], sensors: tuple[str, ...]) -> None:
    """trust.png: the model's trust per sensor at the first τ, only while the sensor is present (an absent
    one has trust 0 by definition, which would read as a failure)."""
    trust = np.where(np.array(trace.present), np.array(trace.trust)[:, 0], np.nan)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for i, m in enumerate(sensors):
        if m in configured:
            ax.plot(t, trust[:, i], color=COLOURS[m], label=m)
    ax.axhline(TRUST_THRESHOLD, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {TRUST_THRESHOLD:g}")
    ax.set(xlabel="recorded time [s]", ylabel="trust", ylim=(0, 1.05), title="trust per sensor (while present)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: trust fills the top and the bottom
    fig.tight_layout()
    fig.savefig(out / "trust.png", **PNG)
    plt.close(fig)
