"""Objectives: what the fusion latents are trained to tell, the heads that tell it, and the models.

Small heads sit on the fusion latents (`Heads`, kept out of `FusionModel` so the exported model's
contract never changes). Self-supervised targets that any bag has -- each modality's summary
(per-patch colour, per-sector nearest lidar range, IMU chunk means) and the next IMU window -- are
always computed from the *clean* sample, so a faulted or hidden sensor has to be filled in from the
others; supervised targets (ego velocity, obstacle distances, goal) come where the simulator gives
them. `PooledFusion` is the baseline without attention, on the same embeddings and heads.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import read_safetensors
from ..config import FusionConfig
from ..errors import CheckpointError, ConfigError
from ..files import written_aside
from ..frames import Modality
from ..model import MLP, FusionModel, SensorEmbedding
from ..tokenize import IMU_AXES, LIDAR_INDEX, LOG_INTENSITY_SCALE, imu_samples
from .augment import FAULTS, FaultPlan, gather
from .data import SECTORS

NEXT_CHUNKS = 3  # the newest chunks of the next sample's IMU window lie after the current one
# the head objectives, in target_sizes' order: self-supervised, then supervised
OBJECTIVES = ("camera", "lidar", "imu", "imu_next", "velocity", "obstacles", "goal")


# --- targets -------------------------------------------------------------------------------------


def target_sizes(cfg: FusionConfig) -> dict[str, int]:
    """Self-supervised (any sample): camera, lidar, imu, imu_next; supervised (simulated samples only):
    velocity, obstacles, goal (distance, cos and sin of the bearing)."""
    axes = len(IMU_AXES)
    sizes = (cfg.camera.tokens * 3, SECTORS, cfg.imu.chunks * axes, NEXT_CHUNKS * axes, 2, SECTORS, 3)
    return dict(zip(OBJECTIVES, sizes))


def targets(data: dict[str, torch.Tensor], idx: torch.Tensor, clean: dict[str, torch.Tensor],
            cfg: FusionConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (value (B, size), valid (B,)), from the clean sample and the simulator's truth."""
    B, L = len(idx), LIDAR_INDEX
    out = {}
    cam = clean["camera_patches"].reshape(B, cfg.camera.tokens, -1, 3).mean(2)  # mean colour per patch
    out["camera"] = (cam.reshape(B, -1), clean["camera_mask"].any(1))
    # nearest lidar return per sector (range / range_m; 1 where the sector has none)
    pts, mask = clean["lidar_points"].flatten(1, 2), clean["lidar_mask"].flatten(1, 2)
    angle = torch.atan2(pts[..., L["y"]], pts[..., L["x"]])
    sector = torch.remainder(torch.round(angle / (2 * math.pi / SECTORS)), SECTORS).long()
    rng = torch.where(mask, pts[..., L["range"]], 1.0)
    lidar = torch.ones(B, SECTORS).scatter_reduce(1, sector, rng, "amin")
    out["lidar"] = (lidar, mask.any(1))
    out["imu"] = (imu_samples(clean["imu_chunks"], cfg.imu).mean(-2).reshape(B, -1), clean["imu_mask"].any(1))
    nxt = data["next"][idx]
    has_next = nxt >= 0
    n = torch.where(has_next, nxt, idx)
    next_means = imu_samples(data["imu_chunks"][n][:, -NEXT_CHUNKS:], cfg.imu).mean(-2).reshape(B, -1)
    out["imu_next"] = (next_means, has_next & data["imu_mask"][n][:, -NEXT_CHUNKS:].all(1))
    labelled = data["labelled"][idx]
    out["velocity"] = (data["velocity"][idx], labelled)
    out["obstacles"] = (data["obstacles"][idx], labelled)
    dist, bearing = data["goal"][idx].unbind(-1)
    goal = torch.stack([dist, bearing.cos(), bearing.sin()], -1)
    has_goal = labelled & goal.isfinite().all(-1)  # a task without a goal gives nan
    out["goal"] = (torch.nan_to_num(goal), has_goal)
    return out


# --- heads and models ----------------------------------------------------------------------------


class Heads(nn.Module):
    """Decoders of every target from a fused feature vector (FusionModel: the flattened latents).

    Targets are standardised with the training set's mean and std (kept as buffers), so each
    objective's loss is a mean squared error in units of its own spread and they weigh alike."""

    def __init__(self, in_dim: int, sizes: dict[str, int], hidden: int = 256, ego_rate: bool = False):
        super().__init__()
        self.sizes = dict(sizes)
        self.trunk = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        # ego_rate: the model outputs the velocity itself (model.EgoRate), which these heads only normalise
        self.ego_rate = ego_rate
        self.out = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in sizes.items() if not (ego_rate and k == "velocity")})
        for k, n in sizes.items():
            self.register_buffer(f"mean_{k}", torch.zeros(n))
            self.register_buffer(f"std_{k}", torch.ones(n))

    def forward(self, feature: torch.Tensor, ego_rate: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """ego_rate: the fusion's own (speed, yaw rate) (B, 2; FusionModel's output), for heads built to take it."""
        h = self.trunk(feature)
        out = {k: layer(h) for k, layer in self.out.items()}
        if self.ego_rate:
            if ego_rate is None:
                raise ConfigError("these heads take the velocity from the model's ego_rate output; none was given")
            out["velocity"] = self.normalise("velocity", ego_rate)
        return out

    def normalise(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return (value - getattr(self, f"mean_{name}")) / getattr(self, f"std_{name}")

    def denormalise(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value * getattr(self, f"std_{name}") + getattr(self, f"mean_{name}")


class PooledFusion(nn.Module):
    """Baselines for the robustness evaluation, on the same token embeddings as FusionModel but without
    attention: `concat` -- each sensor's masked mean token, concatenated (zeros for a missing one);
    `mean` -- the masked mean of all tokens. An MLP turns that into a feature as wide as the flattened
    latents, so the same heads sit on top."""

    def __init__(self, cfg: FusionConfig, kind: str):
        super().__init__()
        if kind not in ("concat", "mean"):
            raise ConfigError(f"unknown fusion {kind!r}: attention, concat or mean")
        self.kind, d = kind, cfg.model.dim
        self.embed = SensorEmbedding(cfg)
        S = len(cfg.sensors)
        self.mlp = MLP(S * d if kind == "concat" else d, 4 * d, cfg.model.fusion_tokens * d)
        self.register_buffer("membership", F.one_hot(self.embed.modality_id, S).float(), persistent=False)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens, mask, _, _ = self.embed(x)  # (B, N, D), (B, N)
        if self.kind == "mean":
            w = mask.float().unsqueeze(-1)
            return self.mlp((tokens * w).sum(1) / w.sum(1).clamp_min(1.0))
        w = self.membership * mask.float().unsqueeze(-1)  # (B, N, S)
        pooled = torch.einsum("bnm,bnd->bmd", w, tokens) / w.sum(1).clamp_min(1.0).unsqueeze(-1)
        return self.mlp(pooled.flatten(1))


def build_model(cfg: FusionConfig, fusion: str) -> nn.Module:
    return FusionModel(cfg) if fusion == "attention" else PooledFusion(cfg, fusion)


def build_heads(cfg: FusionConfig) -> Heads:
    return Heads(cfg.model.fusion_tokens * cfg.model.dim, target_sizes(cfg), ego_rate=cfg.model.rate_output)


def fused_feature(model: nn.Module, x: dict[str, torch.Tensor], tau: torch.Tensor):
    """-> (feature (B, M*D) for the heads, FusionModel.run's outputs, or {} for a baseline without them)."""
    if isinstance(model, PooledFusion):
        return model(x), {}
    out = model.run(x, tau)
    return out["latents"].flatten(1), out


def clean_targets(data: dict[str, torch.Tensor], idx: torch.Tensor, cfg: FusionConfig,
                  device: torch.device | str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`targets` of samples idx from their clean inputs, on `device`."""
    tgt = targets(data, idx, gather(data, idx, previous=False), cfg)
    return {k: (value.to(device), valid.to(device)) for k, (value, valid) in tgt.items()}


def predict(model: nn.Module, heads: Heads, data: dict[str, torch.Tensor], idx: torch.Tensor,
            x: dict[str, torch.Tensor], tau: torch.Tensor, cfg: FusionConfig):
    """One pass on the (faulted) inputs x of samples idx, on tau's device: -> (predictions, the clean
    samples' targets, the fusion's outputs: attention, trust, sensor weights; {} for a baseline)."""
    device = tau.device
    tgt = clean_targets(data, idx, cfg, device)
    feature, fusion = fused_feature(model, {k: v.to(device) for k, v in x.items()}, tau)
    return heads(feature, fusion.get("ego_rate")), tgt, fusion


# --- losses --------------------------------------------------------------------------------------


def losses(heads: Heads, pred: dict[str, torch.Tensor], tgt: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Masked mean squared error per objective on standardised targets (0 where no sample has it)."""
    out = {}
    for k, (value, valid) in tgt.items():
        err = (pred[k] - heads.normalise(k, value)).pow(2).mean(-1)
        out[k] = (err * valid).sum() / valid.sum().clamp_min(1)
    return out


def trust_loss(trust_logits: torch.Tensor, plan: FaultPlan) -> torch.Tensor:
    """Binary cross-entropy of the trust logits (B, S) against the known faults: 0 for a sensor whose
    content the fault corrupts (black, noisy, frozen, partly blocked), 1 otherwise; over present
    sensors only (an absent one has no content to judge)."""
    present = trust_logits.isfinite()
    target = (~plan.content_faulted(trust_logits.shape[1])).float().to(trust_logits.device)
    loss = F.binary_cross_entropy_with_logits(torch.where(present, trust_logits, 0.0), target, reduction="none")
    return (loss * present).sum() / present.sum().clamp_min(1)


def stale_loss(stale_logits: torch.Tensor, valid: torch.Tensor, plan: FaultPlan) -> torch.Tensor:
    """Binary cross-entropy of the camera's stale-content logits (B,) against the faults that leave its
    content unchanged (frozen, or black), where the statistic applies (`valid`: the camera present, with
    a previous frame to compare with)."""
    stale = (plan.fault == FAULTS.index("freeze")) | (plan.fault == FAULTS.index("zero"))
    target = ((plan.sensor == Modality.CAMERA) & stale).float().to(stale_logits.device)
    loss = F.binary_cross_entropy_with_logits(stale_logits, target, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1)


def rate_sound(x: dict[str, torch.Tensor], plan: FaultPlan, cfg: FusionConfig) -> torch.Tensor:
    """(B, R): where each six-axis stream of the model (in FusionConfig.sensors' order) is present and unfaulted."""
    return torch.stack([x[f"{n}_mask"].any(1) & (plan.sensor != cfg.sensor_names.index(n)) for n in cfg.streams], 1)


def rate_readout_loss(reads: torch.Tensor, velocity: tuple[torch.Tensor, torch.Tensor], sound: torch.Tensor,
                      heads: Heads) -> torch.Tensor:
    """Mean squared error of each six-axis stream's own (speed, yaw rate) read (B, R, 2; ModelConfig.rate_readout)
    against the truth (value (B, 2), labelled (B,)), in the velocity head's standardised units, where the
    stream is sound (`rate_sound`): each read learns to stand alone, so the sensor weights can pick among them."""
    value, labelled = velocity
    err = (heads.normalise("velocity", reads) - heads.normalise("velocity", value).unsqueeze(1)).pow(2).mean(-1)
    used = (sound & labelled.unsqueeze(1)).float()
    return (err * used).sum() / used.sum().clamp_min(1)


def fault_attention(attention: torch.Tensor, plan: FaultPlan) -> torch.Tensor:
    """Attention-avoidance objective: the mean attention mass (B, S, H) the fusion tokens give a sensor
    whose content is gone (a black image, a zero IMU or odometry). The fault is known while training, so this asks
    directly for what the augmentation should teach: look away. A noisy sensor still carries
    information, and a frozen or late one looks valid in one sample: they are left out; so is a lidar
    without points, which is masked and gets no attention anyway."""
    zero = (plan.fault == FAULTS.index("zero")) & (plan.sensor >= 0) & (plan.sensor != Modality.LIDAR)
    weight = zero.float().to(attention.device)
    mass = attention.mean(-1).gather(1, plan.sensor.clamp_min(0).to(attention.device)[:, None])[:, 0]
    return (weight * mass).sum() / weight.sum().clamp_min(1.0)


class CameraGoalColumns(nn.Module):
    """Training only: the goal read from the camera's tokens alone, column by column. Each column of
    patches (the mean of its rows' tokens, (B, cols, D)) says whether the goal stands in it (a logit,
    softmax over columns) and, for the column it stands in, the goal's distance and where across the
    column's width. A dense, local target: a column only shows what lies in its slice of the view, so
    the camera path has to carry the post's range itself rather than lean on the lidar or on memory
    of the training scenes (docs/RESULTS.md: the fusion read the goal at three times what its sensors carry)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.rows, self.cols = cfg.camera.height // cfg.camera.patch, cfg.camera.width // cfg.camera.patch
        self.mlp = MLP(cfg.model.dim, cfg.model.dim, 3)

    def forward(self, camera_tokens: torch.Tensor) -> torch.Tensor:
        """(B, rows * cols, D) in (row, col) order -> (B, cols, 3): logit, standardised distance, offset."""
        return self.mlp(camera_tokens.unflatten(1, (self.rows, self.cols)).mean(1))


def goal_column(bearing: torch.Tensor, cols: int, image_x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the goal lies across the columns of patches: (its place in columns (B,) float, its column
    (B,) long, whether it is in view (B,) bool); image_x as in camera_goal_loss."""
    x = torch.as_tensor(image_x(bearing.detach().cpu().numpy()), dtype=torch.float32) * cols
    seen = x.isfinite()
    x = torch.nan_to_num(x).clamp(0.0, cols - 1e-3)
    return x, x.floor().long(), seen


def camera_goal_loss(pred: torch.Tensor, goal: torch.Tensor, valid: torch.Tensor, image_x, heads: Heads) -> torch.Tensor:
    """CameraGoalColumns' loss: cross-entropy of the goal's column, and at that column the squared
    errors of the standardised distance and of the offset from the column's centre (in half columns).
    goal (B, 2): distance, bearing; valid (B,): the camera's content clean and a goal to see; image_x:
    bearing -> share of the image's width (sim.sensors.SensorConfig.image_x, nan out of view)."""
    x, col, seen = goal_column(goal[:, 1], pred.shape[1], image_x)
    x, col, valid = x.to(pred), col.to(pred.device), valid & seen.to(valid.device)
    at = pred.gather(1, col[:, None, None].expand(-1, 1, 3))[:, 0]  # (B, 3)
    dist = (goal[:, 0] - heads.mean_goal[0]) / heads.std_goal[0]
    err = (F.cross_entropy(pred[..., 0], col, reduction="none") + (at[:, 1] - dist).pow(2)
           + (at[:, 2] - 2 * (x - col - 0.5)).pow(2))
    return (err * valid).sum() / valid.sum().clamp_min(1)


class CameraGoalTokens(nn.Module):
    """Training only: the goal read from the camera's tokens alone, patch by patch, at the post's own
    scale. Each patch says whether the post's top edge (its highest point in view) is in it (a logit,
    softmax over all patches) and, at that patch, the goal's distance and where the edge lies across
    and down the patch. The edge's row is the post's range by the rig's geometry (what
    benchmarks/goal_range.py reads), so this asks the patch that shows it, where CameraGoalColumns asks
    a 45° column's mean token."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.rows, self.cols = cfg.camera.height // cfg.camera.patch, cfg.camera.width // cfg.camera.patch
        self.mlp = MLP(cfg.model.dim, cfg.model.dim, 4)

    def forward(self, camera_tokens: torch.Tensor) -> torch.Tensor:
        """(B, rows * cols, D) in (row, col) order -> (B, rows, cols, 4): logit, standardised distance,
        offsets across and down the patch."""
        return self.mlp(camera_tokens.unflatten(1, (self.rows, self.cols)))


def camera_goal_token_loss(pred: torch.Tensor, goal: torch.Tensor, valid: torch.Tensor, post_top, heads: Heads) -> torch.Tensor:
    """CameraGoalTokens' loss: cross-entropy of the patch holding the post's top edge, and at that patch
    the squared errors of the standardised distance and of the edge's offsets from the patch's centre
    (in half patches). goal (B, 2): distance, bearing; valid (B,) as in camera_goal_loss; post_top:
    (bearing, distance) -> shares of the image's width and height (sim.tasks.post_top_in_image)."""
    rows, cols = pred.shape[1:3]
    x, y = (torch.as_tensor(v, dtype=torch.float32) for v in post_top(goal[:, 1].detach().cpu().numpy(),
                                                                        goal[:, 0].detach().cpu().numpy()))
    valid = valid & x.isfinite().to(valid.device)
    x = torch.nan_to_num(x).clamp(0.0, 1 - 1e-6) * cols
    y = torch.nan_to_num(y).clamp(0.0, 1 - 1e-6) * rows  # above the view: the post's highest pixel is the top row's
    row, col = y.floor().long(), x.floor().long()
    token = (row * cols + col).to(pred.device)
    flat = pred.flatten(1, 2)  # (B, rows * cols, 4)
    at = flat.gather(1, token[:, None, None].expand(-1, 1, 4))[:, 0]
    dist = (goal[:, 0] - heads.mean_goal[0]) / heads.std_goal[0]
    offsets = torch.stack([2 * (x - col - 0.5), 2 * (y - row - 0.5)], dim=1).to(pred)
    err = (F.cross_entropy(flat[..., 0], token, reduction="none") + (at[:, 1] - dist).pow(2)
           + (at[:, 2:] - offsets).pow(2).sum(1))
    return (err * valid).sum() / valid.sum().clamp_min(1)


def post_pillars(points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K) whether each pillar of the lidar tokens (B, K, P, F), mask (B, K, P), holds a return from
    the simulated goal post: its only retroreflective surface (sim.sensors; any other returns at most 200)."""
    code = points[..., LIDAR_INDEX["log_intensity"]]
    return ((code >= post_log_intensity() - 1e-3) & mask).any(-1)  # 1e-3: the tokens' float16


@functools.cache
def post_log_intensity() -> float:
    """The goal post's returns as the lidar tokens hold them (tokenize's log intensity scale)."""
    from fusion_attn.sim.sensors import RETROREFLECTIVE_INTENSITY

    return float(math.log1p(RETROREFLECTIVE_INTENSITY) / LOG_INTENSITY_SCALE)


class LidarGoalPillars(nn.Module):
    """Training only: the goal read from the lidar's pillar tokens alone. Each pillar says whether the
    goal post's returns are in it (a logit, softmax over the sweep's pillars) and, at the post's
    pillars, the goal's distance (and with `bearing`, the cosine and sine of its bearing, as the goal
    head states them). Which pillars hold the post is in the sweep itself (`post_pillars`); asking
    each pillar's token for it and for the goal makes the lidar path carry the goal, which the fusion
    otherwise read from the camera alone (docs/RESULTS.md: with the camera failed, the goal's error
    rose most in the samples where the lidar reaches the post). A pillar is 1.6 m wide at the default
    grid, 23° at 4 m: which pillar holds the post says the bearing only that coarsely, where the
    post's returns inside it (2° apart) say it to a few degrees."""

    def __init__(self, cfg: FusionConfig, bearing: bool = False):
        super().__init__()
        self.pillars = cfg.lidar.tokens
        self.mlp = MLP(cfg.model.dim, cfg.model.dim, 4 if bearing else 2)

    def forward(self, lidar_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N_l, D), the pillars first -> (B, K, 2 or 4): logit, standardised distance (, cosine and
        sine of the bearing, standardised)."""
        return self.mlp(lidar_tokens[:, :self.pillars])


def lidar_goal_loss(pred: torch.Tensor, post: torch.Tensor, present: torch.Tensor, goal: torch.Tensor,
                    valid: torch.Tensor, heads: Heads) -> torch.Tensor:
    """LidarGoalPillars' loss: cross-entropy of the pillars that hold the post (the target spread evenly
    over them, the softmax over present pillars), and at them the squared error of the standardised
    distance (and of the bearing's standardised cosine and sine where pred has them). post, present
    (B, K) bool; goal (B, 2): distance m, bearing rad; valid (B,): the lidar clean and a goal."""
    valid = valid & post.any(1)
    log_p = torch.where(present, F.log_softmax(pred[..., 0].masked_fill(~present, -torch.inf), dim=1), 0.0)
    share = post.float() / post.sum(1, keepdim=True).clamp_min(1)
    target = heads.normalise("goal", torch.stack([goal[:, 0], goal[:, 1].cos(), goal[:, 1].sin()], -1))
    asked = pred.shape[-1] - 1  # distance, or distance, cosine and sine
    err = (pred[..., 1:] - target[:, None, :asked]).pow(2).sum(-1)  # (B, K)
    err = -(share * log_p).sum(1) + (share * err).sum(1)
    return torch.where(valid, err, 0.0).sum() / valid.sum().clamp_min(1)


def fused_consistency(model: nn.Module, clean: dict[str, torch.Tensor], fused: torch.Tensor,
                      tau: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of faulted samples' fused states (B_f, D) from the ones the same samples
    give with every sensor healthy (`clean`, their inputs; no gradient into that pass): what a policy
    trained on the clean fusion reads should move no more than the lost sensor's own content forces
    it to. Only the faulted samples are passed, so the healthy pass costs nothing for the rest."""
    if fused.shape[0] == 0:
        return fused.sum()
    with torch.no_grad():
        target = model.run({k: v.to(fused.device) for k, v in clean.items()}, tau)["fused"]
    return ((fused - target) ** 2).mean()


def fit_normalisation(heads: Heads, data: dict[str, torch.Tensor], cfg: FusionConfig, n: int, chunk: int = 1024) -> None:
    """Mean and std of every target over the training samples that have it. The targets are made `chunk`
    samples at a time (the same values as all at once): every sample's camera decoded at once would
    take gigabytes."""
    parts = [targets(data, idx, gather(data, idx, previous=False), cfg) for idx in torch.arange(n).split(chunk)]
    for k in parts[0]:
        value, valid = (torch.cat([p[k][i] for p in parts]) for i in (0, 1))
        if valid.sum() < 2:
            continue  # no such target in the data (e.g. only bags: no labels): stays 0 and 1
        v = value[valid]
        std = v.std(0, unbiased=False)
        # a floor at a tenth of the target's typical spread: a (nearly) constant dimension, such as a
        # camera patch that never changes, must not blow its errors up
        getattr(heads, f"mean_{k}").copy_(v.mean(0))
        getattr(heads, f"std_{k}").copy_(std.clamp_min(max(0.1 * float(std.mean()), 1e-6)))


# --- the heads file ------------------------------------------------------------------------------

HEADS_FORMAT = "fusion_attn/heads/1"


def heads_path(model_path: str | Path) -> Path:
    """The heads file beside a model checkpoint: model.safetensors -> model.heads.safetensors."""
    p = Path(model_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".heads.safetensors")


def save_heads(heads: Heads, path: str | Path, info: dict | None = None) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    in_dim = heads.trunk[1].in_features
    meta = {"format": HEADS_FORMAT, "sizes": json.dumps(heads.sizes), "in_dim": str(in_dim),
            "hidden": str(heads.trunk[1].out_features), "ego_rate": str(heads.ego_rate).lower(),
            "info": json.dumps(info or {}, sort_keys=True)}
    with written_aside(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_heads(path: str | Path) -> Heads:
    """The heads saved beside a model (`heads_path`); CheckpointError on anything wrong."""
    meta, tensors = read_safetensors(path, HEADS_FORMAT)
    try:
        heads = Heads(int(meta["in_dim"]), json.loads(meta["sizes"]), int(meta["hidden"]), meta.get("ego_rate") == "true")
        heads.load_state_dict(tensors)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable heads file: {exc}") from exc
    return heads.eval()
