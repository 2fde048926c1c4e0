"""The training loop (`fusion-attn train`): settings, schedule, resumable state, provenance, `train`.

AdamW, warm-up + cosine, fixed seeds, TensorBoard, tqdm; a resumable training state
(`torch.load(weights_only=True)`: never unpickles code) that also holds the model's FusionConfig, and
safetensors outputs: OUT/model.safetensors (loads with `checkpoint.load_checkpoint`) and
OUT/model.heads.safetensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_checkpoint, save_checkpoint
from ..config import CameraTokens, FusionConfig, ModelConfig, cache_dir
from ..errors import CheckpointError, ConfigError
from ..files import written_aside
from ..frames import Modality
from ..model import FusionModel
from .augment import FaultPlan, corrupt, gather, random_tau
from .data import Dataset, build_datasets
from .evaluation import evaluate
from .objectives import (
    CameraGoalColumns,
    CameraGoalTokens,
    LidarGoalPillars,
    build_heads,
    build_model,
    camera_goal_loss,
    camera_goal_token_loss,
    fault_attention,
    fit_normalisation,
    fused_consistency,
    heads_path,
    lidar_goal_loss,
    load_heads,
    losses,
    post_pillars,
    predict,
    rate_readout_loss,
    rate_sound,
    save_heads,
    stale_loss,
    trust_loss,
)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of a training run: `fusion-attn train`'s flags, saved in the training state."""

    seed: int = 0
    steps: int = 2000
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    clip_grad_norm: float = 0.0  # the gradients' global norm clipped to this (0: not clipped)
    # simulated data: episodes alternate over the tasks; validation episodes use other seeds
    sim_tasks: tuple[str, ...] = ("control", "navigate")
    sim_episodes: int = 48
    val_episodes: int = 8
    sim_seconds: float = 15.0
    stop_share: float = 0.0  # share of the driving policy's commands that are a stop (data.random_drive)
    mirror: bool = False  # also train on each simulated episode's mirror image (data.mirror_sequence)
    # pixels per side of each of the simulated rig's square camera views (sim.sensors.SensorConfig.camera_size);
    # the tokenizer resizes the panorama to camera_size whatever it is
    sim_camera_view: int = 64
    fusion_hz: float = 10.0  # samples per second of episode or recording (the node fuses at 20 Hz)
    trigger: str = "timer"  # or camera | lidar | imu: a sample at each message of that sensor (the node's `trigger`)
    bags: tuple[str, ...] = ()  # unlabelled recordings: self-supervised and trust objectives only
    bag_fraction: float = 0.2  # share of each batch drawn from the bags (when there are any)
    corrupt_prob: float = 0.6  # chance that a sample gets one faulted sensor
    # chance that a sample's camera (and, drawn apart, its lidar) comes without its previous frame, as at a
    # recording's start or after a gap: the trust then learns to judge a frame by its content alone
    first_frame_share: float = 0.0
    # chance that a sample keeps one sensor alone, every other one dropped: the trust of a sensor with no other to
    # compare with (a camera + lidar rig whose lidar failed) is learned, not left to inputs it never saw
    lone_sensor_share: float = 0.0
    # training episodes' fusion timer at phases spread over a period, each walking once through it, rather than with
    # the sensors' frames and samples: camera, lidar and IMU are seen at any age, as a node sees them
    # (learn.data.sim_episode)
    random_phase: bool = False
    fault_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # which one: camera, lidar, IMU[, odometry][, imu2: 1 unless given] in proportion
    tau_random_prob: float = 0.5  # chance that a sample gets a random τ instead of all ones (0: fixed τ = 1)
    fusion: str = "attention"  # or the baselines without attention: concat, mean (see PooledFusion)
    # the attention model's fusion across sensors: "sensor" (trust-weighted at τ) or "token" (one softmax
    # over all tokens, the earlier design: a baseline); see model.FusionModel
    sensor_fusion: str = "sensor"
    # weights of the head objectives (objectives.target_sizes' names; 1 where not given)
    objective_weights: dict[str, float] = field(default_factory=dict)
    trust_weight: float = 1.0  # weight of the trust objective (trust_loss)
    avoid_weight: float = 0.0  # attention-avoidance objective (fault_attention; the "token" baseline's: 1)
    consistency_weight: float = 0.0  # a faulted sample's fused state kept near its clean one (fused_consistency)
    camera_goal_weight: float = 0.0  # the goal read from the camera's tokens alone (simulated data)
    camera_goal_head: str = "columns"  # per 45° column (CameraGoalColumns) or per patch, at the post's top (CameraGoalTokens)
    lidar_goal_weight: float = 0.0  # the goal read from the lidar's pillar tokens alone (LidarGoalPillars; simulated data)
    lidar_goal_bearing: bool = False  # ... its bearing too, not only its distance
    log_every: int = 25
    eval_every: int = 500
    save_every: int = 500
    # model options (config.ModelConfig); the rest of the FusionConfig keeps its defaults
    latent_blocks: int = 1
    qk_norm: bool = False
    learned_head_temperature: bool = False
    trust_floor: float = 0.0
    # False: the weights train without the trust floor, and validation and the saved model use it (the
    # floor has no weights: it only lets a high τ admit a doubted sensor at run time)
    floor_in_training: bool = True
    camera_shifts: int = 0
    lidar_motion: bool = False
    lidar_motion_token: bool = False
    lidar_motion_direct: bool = False
    imu_direct: bool = False
    stale_evidence: bool = False
    camera_size: tuple[int, int] = (96, 128)  # height, width the camera tokenizer resizes to (config.CameraTokens)
    camera_patch: int = 16  # pixels per patch side (config.CameraTokens.patch)
    camera_stem: int = 0  # config.ModelConfig.camera_stem
    camera_stem_cells: int = 4  # config.ModelConfig.camera_stem_cells
    camera_column_blocks: int = 0  # config.ModelConfig.camera_column_blocks
    odometry: bool = False  # config.ModelConfig.odometry: wheel odometry as a fourth sensor
    second_imu: bool = False  # config.ModelConfig.second_imu: a second IMU (the simulated rig gets one)
    rate_readout: bool = False  # config.ModelConfig.rate_readout, each read trained where its stream is sound
    rate_output: bool = False  # config.ModelConfig.rate_output: the fused speed and yaw rate as an output, ego_rate
    # start from a trained checkpoint's weights and heads (None: from seed-initialised ones), and train only
    # the parameters whose names start with one of train_only (empty: all of them)
    init_from: str | None = None
    train_only: tuple[str, ...] = ()

    def rig(self):
        """The simulated sensors its episodes are rendered with."""
        from fusion_attn.sim.sensors import SensorConfig

        rig = SensorConfig(camera_size=(self.sim_camera_view, self.sim_camera_view))
        return rig.with_second_imu() if self.second_imu else rig

    def fusion_config(self) -> FusionConfig:
        """The config of the model this run trains."""
        return FusionConfig(camera=CameraTokens(height=self.camera_size[0], width=self.camera_size[1],
                                                patch=self.camera_patch),
                            model=ModelConfig(latent_blocks=self.latent_blocks, qk_norm=self.qk_norm,
                                              learned_head_temperature=self.learned_head_temperature,
                                              fusion=self.sensor_fusion, trust_floor=self.trust_floor,
                                              camera_shifts=self.camera_shifts, lidar_motion=self.lidar_motion,
                                              lidar_motion_token=self.lidar_motion_token,
                                              lidar_motion_direct=self.lidar_motion_direct, imu_direct=self.imu_direct,
                                              stale_evidence=self.stale_evidence, camera_stem=self.camera_stem,
                                              camera_stem_cells=self.camera_stem_cells,
                                              camera_column_blocks=self.camera_column_blocks,
                                              odometry=self.odometry, second_imu=self.second_imu,
                                              rate_readout=self.rate_readout, rate_output=self.rate_output))

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """A config saved as JSON (lists back to tuples); settings it predates keep their defaults."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this torch sees no CUDA device")
    return device


def _sampler_weights(train: Dataset, tc: TrainConfig) -> torch.Tensor:
    bag = torch.from_numpy(train.source == 1)
    n_bag = int(bag.sum())
    if n_bag == 0 or n_bag == len(train):
        return torch.ones(len(train))
    return torch.where(bag, tc.bag_fraction / n_bag, (1.0 - tc.bag_fraction) / (len(train) - n_bag))


# --- the training state --------------------------------------------------------------------------

STATE_FILE = "train_state.pt"


def sensor_goal(data: dict[str, torch.Tensor], idx: torch.Tensor, sensor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The goal (B, 2) as `sensor`'s frame saw it at samples idx (zero where unknown), and where it is known (B,)."""
    goal = data[f"goal_at_{sensor}"][idx]
    known = goal.isfinite().all(-1)
    return torch.where(known.unsqueeze(-1), goal, 0.0), known


def save_state(path: Path, step: int, tc: TrainConfig, cfg: FusionConfig, model: nn.Module, heads: nn.Module,
               opt: torch.optim.Optimizer, gen: torch.Generator, readers: dict[str, nn.Module] | None = None) -> None:
    """readers: the training-only goal readers by name ("camera_goal", "lidar_goal"), saved beside the model."""
    state = {"step": step, "train_config": json.dumps(dataclasses.asdict(tc), sort_keys=True),
             "fusion_config": cfg.to_json(), "model": model.state_dict(), "heads": heads.state_dict(),
             "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             **{name: reader.state_dict() for name, reader in (readers or {}).items()}}
    with written_aside(path) as tmp:  # a crash while saving never leaves half a state behind
        torch.save(state, tmp)


def read_state(path: Path) -> tuple[dict, TrainConfig, FusionConfig]:
    """-> (the state, its TrainConfig, its model's FusionConfig: the defaults for a state that predates
    storing it). CheckpointError on a missing or unreadable file."""
    if not path.is_file():
        raise CheckpointError(f"no training state at {path}; is it a `fusion-attn train` output folder?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
        tc = TrainConfig.from_dict(json.loads(state["train_config"]))
        cfg = FusionConfig.from_json(state["fusion_config"]) if "fusion_config" in state else FusionConfig()
        state["step"] = int(state["step"])
    except Exception as exc:  # a damaged or foreign file surfaces as any of several errors
        raise CheckpointError(f"{path} is not a readable training state (corrupt or truncated?): "
                              f"{type(exc).__name__}: {exc}") from exc
    return state, tc, cfg


def _resumable_state(path: Path, tc: TrainConfig, cfg: FusionConfig) -> dict:
    """The saved state, if it can go on to become this run: the same settings (but steps), the same model."""
    try:
        state, saved, saved_cfg = read_state(path)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}") from exc
    now = dataclasses.asdict(tc)
    diff = {k: (v, now[k]) for k, v in dataclasses.asdict(saved).items() if k != "steps" and v != now[k]}
    if diff:
        raise CheckpointError(f"--resume: {path} was trained with other settings (saved, now): {diff}")
    if saved_cfg != cfg:
        raise CheckpointError(f"--resume: {path} holds another model config: {saved_cfg.to_json()}")
    if state["step"] > tc.steps:
        raise CheckpointError(f"--resume: {path} is at step {state['step']}, beyond --steps {tc.steps}")
    return state


# --- provenance ----------------------------------------------------------------------------------


def git_commit() -> str:
    """The checkout's commit, with "+uncommitted" when tracked files differ from it; "unknown" outside git."""
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- the loop ------------------------------------------------------------------------------------


RUN_FILES = ("model.safetensors", "model.heads.safetensors", STATE_FILE, "metrics.json", "tb")


def _run_folder(out: Path, resume: bool, overwrite: bool) -> Path:
    """The run folder, made; an earlier run in it is refused unless resumed, or removed (its files only)
    when `overwrite`: a new run must not replace one by accident."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a run folder")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(f"{out} already holds a run ({', '.join(held)}): --resume continues it, --overwrite "
                          "replaces it")
    if overwrite and not resume:
        for path in (out / name for name in held):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {out}: {exc}") from exc
    return out


def train(tc: TrainConfig, out: str | Path, resume: bool = False, device: str = "auto", threads: int = 1,
          cache: str | Path | None = None, progress: bool = True, command: str = "",
          stop_after: int | None = None, jobs: int = 1, ray: str | None = None, overwrite: bool = False) -> dict:
    """Train, write OUT/{model,model.heads}.safetensors, OUT/tb, OUT/metrics.json; -> the metrics. An
    earlier run in OUT is refused unless `resume` continues it or `overwrite` replaces it.

    jobs, ray: make the dataset's missing shards (episodes, recordings) in parallel (data.build_datasets).

    stop_after: save the training state after this step and return (a time-boxed job; `resume` goes on
    exactly as if it had not stopped)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    commit = git_commit()  # the code the run starts with: a commit made while it trains is not its
    dev = pick_device(device)
    out = _run_folder(Path(out), resume, overwrite)
    torch.set_num_threads(threads)
    cfg = tc.fusion_config()
    state = _resumable_state(out / STATE_FILE, tc, cfg) if resume else None

    t0 = time.perf_counter()
    train_set, val_set = build_datasets(tc, cfg, Path(cache) if cache else cache_dir("train"), progress, jobs, ray)
    data_s = time.perf_counter() - t0

    torch.manual_seed(tc.seed)  # initial weights
    model = build_model(cfg, tc.fusion).to(dev).train()
    fit_cfg = cfg if tc.floor_in_training else dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, trust_floor=0.0))
    model.cfg = fit_cfg  # what the training steps run with
    heads = build_heads(cfg).to(dev).train()
    data = train_set.tensors()
    base = _start_from(tc, cfg, model, heads) if tc.init_from else None
    if base is None:
        fit_normalisation(heads, data, cfg, len(train_set))
        if getattr(model, "ego_rate", None) is not None:  # the model's own velocity, in the target's units
            model.ego_rate.standardise(heads.mean_velocity, heads.std_velocity)
    camera_goal, camera_goal_of = None, None
    if tc.camera_goal_weight > 0:
        if not isinstance(model, FusionModel):
            raise ConfigError("--camera-goal-weight reads the camera's tokens of the attention fusion (--fusion attention)")
        from fusion_attn.sim.tasks import post_top_in_image

        rig = tc.rig()
        if tc.camera_goal_head == "tokens":
            camera_goal = CameraGoalTokens(cfg)
            camera_goal_of = functools.partial(camera_goal_token_loss, post_top=functools.partial(post_top_in_image, rig),
                                               heads=heads)
        elif tc.camera_goal_head == "columns":
            camera_goal = CameraGoalColumns(cfg)
            camera_goal_of = functools.partial(camera_goal_loss, image_x=rig.image_x, heads=heads)
        else:
            raise ConfigError(f"camera_goal_head must be 'columns' or 'tokens', got {tc.camera_goal_head!r}")
    lidar_goal = None
    if tc.lidar_goal_bearing and not tc.lidar_goal_weight > 0:
        raise ConfigError("--lidar-goal-bearing asks the lidar's goal objective for more: give --lidar-goal-weight too")
    if tc.lidar_goal_weight > 0:
        if not isinstance(model, FusionModel):
            raise ConfigError("--lidar-goal-weight reads the lidar's tokens of the attention fusion (--fusion attention)")
        lidar_goal = LidarGoalPillars(cfg, bearing=tc.lidar_goal_bearing)
    readers = {k: r.to(dev).train() for k, r in (("camera_goal", camera_goal), ("lidar_goal", lidar_goal)) if r is not None}
    for reader in readers.values():
        reader.requires_grad_(not tc.train_only)
    trained = [p for p in (*model.parameters(), *heads.parameters(),
                           *(q for r in readers.values() for q in r.parameters())) if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)  # batches, faults, τ: the whole data stream
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        for name, reader in readers.items():
            reader.load_state_dict(state[name])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
    weights = _sampler_weights(train_set, tc)
    # per sensor of the model; one it does not list (odometry, a second IMU: newer than the option) weighs 1
    fault_weights = tuple(tc.fault_weights[:len(cfg.sensors)]) + (1.0,) * (len(cfg.sensors) - len(tc.fault_weights))

    def validate() -> dict[str, dict[str, float]]:
        if val_set is None:
            return {}
        model.cfg = cfg  # the model as saved, its trust floor included
        try:
            return evaluate(model, heads, val_set, cfg, tc.fusion_hz, seed=tc.seed + 7, device=dev)
        finally:
            model.cfg = fit_cfg

    writer = SummaryWriter(str(out / "tb"), purge_step=step if step else None)
    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    first_losses, recent = None, {}
    t_train = time.perf_counter()
    stop = min(tc.steps, stop_after) if stop_after is not None else tc.steps
    while step < stop:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        idx = torch.multinomial(weights, tc.batch, replacement=True, generator=gen)
        plan = FaultPlan.draw(tc.batch, tc.corrupt_prob, gen, fault_weights, tc.first_frame_share, tc.lone_sensor_share)
        x = corrupt(data, idx, plan, cfg, tc.fusion_hz, gen)
        tau = random_tau(tc.batch, tc.tau_random_prob, gen, len(cfg.sensors))
        pred, tgt, fusion = predict(model, heads, data, idx, x, tau.to(dev), cfg)
        parts = {k: tc.objective_weights.get(k, 1.0) * v for k, v in losses(heads, pred, tgt).items()}
        if fusion and tc.trust_weight > 0:
            parts["trust"] = tc.trust_weight * trust_loss(fusion["trust_logits"], plan)
            if "stale_logits" in fusion:
                parts["stale"] = tc.trust_weight * stale_loss(fusion["stale_logits"], fusion["stale_valid"], plan)
        if "rate_reads" in fusion:
            parts["rate_readout"] = rate_readout_loss(fusion["rate_reads"], tgt["velocity"], rate_sound(x, plan, cfg).to(dev),
                                                      heads)
        if fusion and tc.avoid_weight > 0:
            parts["avoid"] = tc.avoid_weight * fault_attention(fusion["attention"], plan)
        if fusion and tc.consistency_weight > 0:
            faulted = plan.sensor >= 0
            parts["consistency"] = tc.consistency_weight * fused_consistency(
                model, gather(data, idx[faulted]), fusion["fused"][faulted.to(dev)], tau[faulted].to(dev))
        # the one-sensor objectives ask for the goal where that sensor's frame saw it (data.goal_at_frames)
        if camera_goal is not None:
            seen, known = sensor_goal(data, idx, "camera")
            sees = known.to(dev) & x["camera_mask"].any(1).to(dev) & (plan.sensor != Modality.CAMERA).to(dev)
            parts["camera_goal"] = tc.camera_goal_weight * camera_goal_of(camera_goal(fusion["camera_tokens"]),
                                                                          seen.to(dev), sees)
        if lidar_goal is not None:  # the post's pillars from the clean sweep; judged only where the lidar is clean
            post = post_pillars(data["lidar_points"][idx].float(), data["lidar_mask"][idx]).to(dev)
            seen, known = sensor_goal(data, idx, "lidar")
            clean = known.to(dev) & (plan.sensor != Modality.LIDAR).to(dev)
            parts["lidar_goal"] = tc.lidar_goal_weight * lidar_goal_loss(
                lidar_goal(fusion["lidar_tokens"]), post, x["lidar_mask"].any(-1).to(dev), seen.to(dev), clean, heads)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # the norm is logged either way; an unclipped step is left exactly as it was (a factor of 1)
        grad_norm = nn.utils.clip_grad_norm_(trained, tc.clip_grad_norm or math.inf)
        opt.step()
        step += 1
        values = {k: v.item() for k, v in parts.items()} | {"total": loss.item()}
        first_losses = first_losses or values
        recent = {k: 0.9 * recent.get(k, v) + 0.1 * v for k, v in values.items()}
        if step % tc.log_every == 0 or step == tc.steps:
            for k, v in values.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/lr", lr_at(step - 1, tc), step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), step)
            bar.set_postfix(loss=f"{recent['total']:.3f}")
        if step % tc.eval_every == 0 and step < tc.steps:
            _log_eval(writer, validate(), step)
        if step % tc.save_every == 0 or step == stop:
            save_state(out / STATE_FILE, step, tc, cfg, model, heads, opt, gen, readers)
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t_train

    report = validate()
    _log_eval(writer, report, step)
    model.cfg = cfg
    writer.close()
    metrics = {
        "command": command, "seed": tc.seed, "git_commit": commit, "torch": torch.__version__,
        "device": str(dev), "threads": threads, "steps": step, "resumed_from": int(state["step"]) if state else 0,
        "train_config": dataclasses.asdict(tc),
        "data": {"train_samples": len(train_set), "train_bag_samples": int((train_set.source == 1).sum()),
                 "val_samples": len(val_set) if val_set is not None else 0, "dataset_s": round(data_s, 1)},
        "train_s": round(train_s, 1),
        **({"init_from": base} if base else {}),
        "first_step_losses": {k: round(v, 4) for k, v in first_losses.items()} if first_losses else {},
        "final_train_losses_ema": {k: round(v, 4) for k, v in recent.items()},
        "val": {cond: {k: round(v, 4) for k, v in m.items()} for cond, m in report.items()},
    }
    info = {k: metrics[k] for k in ("command", "seed", "git_commit", "steps", "data", "train_s", "init_from") if k in metrics}
    info["val_clean"] = metrics["val"].get("clean", {})
    if isinstance(model, FusionModel):  # a baseline's weights stay in the training state only
        save_checkpoint(model.cpu(), out / "model.safetensors", info=info)
    save_heads(heads.cpu(), heads_path(out / "model.safetensors"), info={"command": command, "seed": tc.seed})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _start_from(tc: TrainConfig, cfg: FusionConfig, model: nn.Module, heads: nn.Module) -> dict:
    """Load tc.init_from's weights and heads into the new run's model and heads, and, when tc.train_only
    names any, freeze every other parameter, the heads included; -> the checkpoint's provenance
    (its path, command, seed, commit, steps), which the new checkpoint records. The checkpoint may lack
    only parameters that train: a part its configuration did not have (e.g. --stale-evidence's camera
    path, fitted onto a trained model without changing anything else)."""
    if not isinstance(model, FusionModel):
        raise ConfigError(f"--init-from starts an attention model's run, not a {tc.fusion} baseline's")
    trained_cfg, state, trained_info = read_checkpoint(tc.init_from)
    if dataclasses.replace(trained_cfg, model=cfg.model) != cfg:
        raise ConfigError(f"--init-from {tc.init_from}: its tokenizers are configured otherwise than this run's "
                          "(camera size, lidar or IMU settings): its weights would see other tokens")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        heads.load_state_dict(load_heads(heads_path(tc.init_from)).state_dict())
    except RuntimeError as exc:  # a parameter of another shape: another model option
        raise ConfigError(f"--init-from {tc.init_from}: its weights do not fit this run's model: {exc}") from exc
    untrained = [k for k in missing if not (k.startswith(tc.train_only) if tc.train_only else True)]
    if unexpected or untrained:
        raise ConfigError(f"--init-from {tc.init_from}: this run's model lacks {unexpected or 'nothing'} of the "
                          f"checkpoint's weights, and would leave {untrained or 'nothing'} untrained")
    if tc.train_only:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(tc.train_only))
        heads.requires_grad_(False)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"--train-only {' '.join(tc.train_only)}: names no parameter of the model")
    return {"checkpoint": str(tc.init_from), **{k: trained_info[k] for k in ("command", "seed", "git_commit", "steps")
                                                if k in trained_info}}


def _log_eval(writer, report: dict[str, dict[str, float]], step: int) -> None:
    for cond, m in report.items():
        for k, v in m.items():
            writer.add_scalar(f"val_{cond}/{k}", v, step)
