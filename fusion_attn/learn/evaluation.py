"""Evaluation: what a trained model and its heads get right, clean and with each sensor fault.

One routine, `evaluate`, serves the training loop's validation and `eval-robustness` alike: per
condition (clean, then each fault of `augment.FAULTS` on each sensor) at a given global τ, the mean
loss per objective, the supervised heads' errors in physical units, and the attention mass per
modality (and on the faulted sensor). Means are taken per sample a metric covers (`RunningMeans`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import FusionConfig
from ..model import FusionModel, softmax_lipschitz
from ..outputs import TRUST_THRESHOLD
from .augment import FAULTS, FaultPlan, corrupt
from .data import SECTORS, Dataset
from .objectives import Heads, clean_targets, fused_feature, losses, post_pillars

SUPERVISED = ("velocity", "obstacles", "goal")
SELF_SUPERVISED = ("camera", "lidar", "imu", "imu_next")
LIPSCHITZ_SAMPLES = 16  # the diagnostic needs an eigen-decomposition per head, query and sample


def conditions(cfg: FusionConfig | None = None) -> list[tuple[str, int, str]]:
    """(name, faulted sensor or -1, fault): clean, then each fault on each of the model's sensors
    (None: camera, lidar and IMU)."""
    names = (cfg or FusionConfig()).sensor_names
    return [("clean", -1, "drop")] + [(f"{name}_{f}", m, f) for m, name in enumerate(names) for f in FAULTS]


def evaluate(model: nn.Module, heads: Heads, data: Dataset, cfg: FusionConfig, fusion_hz: float, tau: float = 1.0,
             **options) -> dict[str, dict[str, float]]:
    """condition -> metrics at one global τ: `evaluate_taus` at [tau]."""
    return evaluate_taus(model, heads, data, cfg, fusion_hz, [tau], **options)[tau]


@torch.no_grad()
def evaluate_taus(model: nn.Module, heads: Heads, data: Dataset, cfg: FusionConfig, fusion_hz: float,
                  taus: list[float], seed: int = 7, device: torch.device | str = "cpu", batch: int = 256,
                  lipschitz: bool = False, count_changed: bool = False,
                  clean_only: bool = False) -> dict[float, dict[str, dict[str, float]]]:
    """τ -> condition -> metrics at that global τ (modality τ = 1) on `data` (clean_only: the clean one):

        loss_<objective>    mean standardised squared error of each head
        ssl_loss            their mean over the self-supervised objectives
        head_error          ... over the supervised ones, and `physical_errors` (labelled data only)
        attention_<sensor>  the sensor's share of the fusion, and attention_faulted (attention models only)
        trust_<sensor>      mean trust, over the samples where the sensor is present (untrusted_<sensor>:
                            the share of them below outputs.TRUST_THRESHOLD); trust_faulted,
                            untrusted_faulted (an absent sensor counts as untrusted) and trust_auroc: how
                            well the faulted sensor's trust tells this condition from clean (1: every
                            faulted sample's trust below every clean one's); with count_changed
                            (it costs a clean copy of every faulted batch) also affected: the share
                            of samples whose inputs the fault changed at all (a freeze on a
                            recording's first frame changes nothing), and untrusted_affected:
                            untrusted_faulted over those samples only
        lipschitz           the softmax Lipschitz diagnostic where the fusion's τ acts (if asked): at the
                            sensor level for the "sensor" fusion, over tokens for the "token" one

    Every condition draws the same noise (`seed`), so runs and τ are compared on equal terms: each batch's
    faulted inputs and targets are made once and fused at every τ."""
    modes = model.training, heads.training
    model.eval()
    heads.eval()
    t = data.tensors()
    labelled = bool(data.arrays["labelled"].any())
    attends = isinstance(model, FusionModel)
    two_observers = lidar_reaches_post(t["lidar_points"], t["lidar_mask"])  # per sample, from its clean sweep
    reports, clean_trust = {tau: {} for tau in taus}, {}
    for name, sensor, fault in conditions(cfg)[:1] if clean_only else conditions(cfg):
        gen = torch.Generator().manual_seed(seed)
        running = {tau: RunningMeans() for tau in taus}
        lipschitz_values, trusts, affected = {}, {tau: [] for tau in taus}, []
        for start in range(0, len(data), batch):
            idx = torch.arange(start, min(start + batch, len(data)))
            x = corrupt(t, idx, FaultPlan.fixed(len(idx), sensor, fault), cfg, fusion_hz, gen)
            tgt = clean_targets(t, idx, cfg, device)
            if attends and sensor >= 0 and count_changed:
                clean = corrupt(t, idx, FaultPlan.fixed(len(idx), -1, "drop"), cfg, fusion_hz, torch.Generator())
                affected.append(changed_inputs(x, clean, cfg.sensor_names[sensor]))
            x = {k: v.to(device) for k, v in x.items()}
            for tau in taus:
                taus_in = torch.ones(len(idx), 1 + len(cfg.sensors), device=device)
                taus_in[:, 0] = tau
                feature, fusion = fused_feature(model, x, taus_in)
                pred = heads(feature, fusion.get("ego_rate"))
                loss = losses(heads, pred, tgt)
                m = {f"loss_{k}": v for k, v in loss.items()}
                m["ssl_loss"] = sum(loss[k] for k in SELF_SUPERVISED) / len(SELF_SUPERVISED)
                if labelled:
                    m["head_error"] = sum(loss[k] for k in SUPERVISED) / len(SUPERVISED)
                    m.update(physical_errors(heads, pred, tgt, two_observers[idx].to(tgt["goal"][1].device)))
                if fusion:
                    trust = fusion["trust"].cpu()
                    trust = torch.where(fusion["trust_logits"].isfinite().cpu(), trust, torch.nan)  # nan: absent
                    trusts[tau].append(trust)
                    for i, mod in enumerate(cfg.sensor_names):
                        m[f"attention_{mod}"] = fusion["attention"][:, i].mean()
                        m[f"trust_{mod}"] = trust[:, i][trust[:, i].isfinite()]
                        m[f"untrusted_{mod}"] = (trust[:, i][trust[:, i].isfinite()] < TRUST_THRESHOLD).float()
                    if lipschitz and start == 0:
                        lipschitz_values[tau] = fusion_lipschitz(model, fusion, tau)
                running[tau].add(m, len(idx))
        for tau in taus:
            metrics = running[tau].means()
            if trusts[tau]:
                trust = torch.cat(trusts[tau])
                if sensor < 0:
                    clean_trust[tau] = trust
                else:
                    faulted = trust[:, sensor].nan_to_num(0.0)  # an absent sensor is trusted not at all
                    metrics["trust_faulted"] = float(faulted.mean())
                    metrics["untrusted_faulted"] = float((faulted < TRUST_THRESHOLD).float().mean())
                    if affected:
                        hit = torch.cat(affected)
                        metrics["affected"] = float(hit.float().mean())
                        if hit.any():
                            metrics["untrusted_affected"] = float((faulted[hit] < TRUST_THRESHOLD).float().mean())
                    if tau in clean_trust:
                        metrics["trust_auroc"] = auroc(clean_trust[tau][:, sensor], faulted)
            if sensor >= 0 and attends:
                metrics["attention_faulted"] = metrics[f"attention_{cfg.sensor_names[sensor]}"]
            if tau in lipschitz_values:
                metrics["lipschitz"] = lipschitz_values[tau]
            reports[tau][name] = metrics
    model.train(modes[0])
    heads.train(modes[1])
    return reports


def changed_inputs(x: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], sensor: str) -> torch.Tensor:
    """(B,) whether a sample's inputs of `sensor` (content, masks, ages) differ from the clean ones."""
    keys = [k for k in x if k.startswith(f"{sensor}_")]
    return torch.stack([(x[k] != clean[k]).flatten(1).any(1) for k in keys]).any(0)


def auroc(healthy: torch.Tensor, faulted: torch.Tensor) -> float:
    """P(a healthy sample's trust > a faulted one's), ties counting half (the Mann-Whitney U statistic);
    healthy samples where the sensor is absent (nan) are left out."""
    healthy = healthy[healthy.isfinite()]
    if not len(healthy) or not len(faulted):
        return float("nan")
    values = torch.cat([healthy, faulted]).double()
    ranks = torch.empty_like(values)
    order = values.argsort()
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    for v in values.unique():  # ties share their mean rank
        tied = values == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[: len(healthy)].sum() - len(healthy) * (len(healthy) + 1) / 2
    return float(u / (len(healthy) * len(faulted)))


def fusion_lipschitz(model: FusionModel, fusion: dict[str, torch.Tensor], tau: float) -> float:
    """The softmax Lipschitz diagnostic where τ acts, mean over the first LIPSCHITZ_SAMPLES samples:
    the sensor-level softmax (over present sensors) of the "sensor" fusion, or the token-level softmax
    (per head and fusion token) of the "token" one."""
    if model.cfg.model.fusion == "sensor":
        return softmax_lipschitz_mean(fusion["sensor_weights"][:LIPSCHITZ_SAMPLES].cpu(), tau)
    return softmax_lipschitz_mean(fusion["token_weights"][:LIPSCHITZ_SAMPLES].cpu(), tau)


def softmax_lipschitz_mean(weights: torch.Tensor, tau: float) -> float:
    """Mean over samples (and heads and fusion tokens) of the softmax's local Lipschitz constant.

    It depends on the logits only through the weights p they give, so it is evaluated at logits
    τ·log p, which give back p exactly (masked entries keep zero weight)."""
    mask = weights > 0
    logits = torch.log(weights.clamp_min(1e-30)) * tau
    valid = mask.any(-1)
    if not valid.any():
        return 0.0
    return float(softmax_lipschitz(logits[valid], tau, mask[valid]).mean())


class RunningMeans:
    """Means over a whole evaluation set, fed batch by batch: a scalar is its batch's mean (weighed by
    the batch's size), a vector holds one value per sample it covers (how many varies by batch). A
    metric no sample covered has no mean, rather than a NaN."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in metrics.items():
            n = v.numel() if v.dim() else batch_size
            if n:
                self.sums[k] = self.sums.get(k, 0.0) + (float(v.sum()) if v.dim() else float(v) * batch_size)
                self.counts[k] = self.counts.get(k, 0) + n

    def means(self) -> dict[str, float]:
        return {k: total / self.counts[k] for k, total in self.sums.items()}


# --- errors in physical units, and what the camera sees ------------------------------------------


def physical_errors(heads: Heads, pred: dict[str, torch.Tensor], tgt,
                    two_observers: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Absolute errors of the supervised heads in their units, one per sample each covers (labelled
    samples; the goal's only where a goal exists); obstacle and goal distances also split by whether
    the simulated camera's view holds them, and with `two_observers` (B,) the goal's by observability
    class: the samples two sensors observe it in, and the camera's alone. Per sample, so that
    `RunningMeans` weighs subsets right."""
    valid = tgt["velocity"][1]
    v_pred, v_true = heads.denormalise("velocity", pred["velocity"])[valid], tgt["velocity"][0][valid]
    o_pred, o_true = heads.denormalise("obstacles", pred["obstacles"])[valid], tgt["obstacles"][0][valid]
    has_goal = tgt["goal"][1]
    g_pred, g_true = heads.denormalise("goal", pred["goal"])[has_goal], tgt["goal"][0][has_goal]
    g_bearing = torch.atan2(g_true[:, 2], g_true[:, 1])
    bearing_diff = torch.atan2(g_pred[:, 2], g_pred[:, 1]) - g_bearing
    hfov = sim_camera_hfov_deg()
    in_view = sectors_in_view(hfov)  # obstacles the simulated camera sees too, and those only the lidar sees
    out_of_view = [k for k in range(SECTORS) if k not in in_view]
    goal_in_view = torch.rad2deg(g_bearing).abs() <= hfov / 2  # the goal's centre, not its whole patch
    obstacle_err, goal_dist_err = (o_pred - o_true).abs(), (g_pred[:, 0] - g_true[:, 0]).abs()
    split = {"obstacle_in_view_mae_m": obstacle_err[:, in_view].mean(1)} if in_view else {}
    if out_of_view:  # none with the surround camera rig
        split["obstacle_out_of_view_mae_m"] = obstacle_err[:, out_of_view].mean(1)
    bearing_err = torch.rad2deg(torch.atan2(bearing_diff.sin(), bearing_diff.cos()).abs())
    if two_observers is not None:
        two = two_observers[has_goal]
        split |= {"goal_two_observers_share": two.float(),
                  "goal_distance_two_observers_mae_m": goal_dist_err[two],
                  "goal_distance_camera_only_mae_m": goal_dist_err[~two],
                  "goal_bearing_two_observers_mae_deg": bearing_err[two],
                  "goal_bearing_camera_only_mae_deg": bearing_err[~two]}
    return {"speed_mae_mps": (v_pred[:, 0] - v_true[:, 0]).abs(),
            "yaw_rate_mae_radps": (v_pred[:, 1] - v_true[:, 1]).abs(),
            "obstacle_mae_m": obstacle_err.mean(1), **split,
            "goal_distance_mae_m": goal_dist_err,
            "goal_distance_in_view_mae_m": goal_dist_err[goal_in_view],
            "goal_distance_out_of_view_mae_m": goal_dist_err[~goal_in_view],
            "goal_in_view_share": goal_in_view.float(),
            "goal_bearing_mae_deg": bearing_err}


def lidar_reaches_post(points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) whether each lidar frame's tokens (B, K, P, F) with mask (B, K, P) hold a return from the
    simulated goal post: the samples in which camera and lidar both observe the goal (the camera's
    rig sees the 2 m post in 97 % of samples, the lidar within its range and line of sight in 57 %:
    docs/OBSERVABILITY.md)."""
    return post_pillars(points, mask).any(1)


def sectors_in_view(hfov_deg: float) -> list[int]:
    """The obstacle sectors (sector 0 centred straight ahead) that lie wholly inside a forward-looking
    horizontal field of view: what a camera can tell about obstacles besides the lidar."""
    width = 360.0 / SECTORS
    if hfov_deg >= 360.0:
        return list(range(SECTORS))
    return [s for s in range(SECTORS) if abs((s * width + 180.0) % 360.0 - 180.0) + width / 2 <= hfov_deg / 2]


@functools.cache
def sim_camera_hfov_deg() -> float:
    """The simulated camera rig's horizontal field of view: 360° for the surround rig (several views),
    else the one pinhole view's (75° for 64x64 at fovy 75°)."""
    from fusion_attn.sim.sensors import SensorConfig

    return SensorConfig().camera_hfov_deg
