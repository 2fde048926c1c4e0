"""`fusion-attn train`: the model and its heads trained on simulated episodes and recordings (docs/TRAINING.md)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import FusionAttnError


def add_parser(verbs):
    # defaults live in learn.loop.TrainConfig (docs/TRAINING.md lists them); unset flags keep them, and
    # building the parser does not import torch
    train = verbs.add_parser("train", help="train the model and its heads on simulated episodes and recordings",
                             argument_default=argparse.SUPPRESS)
    train.add_argument("-o", "--output", type=Path, required=True,
                       help="run folder: model.safetensors, model.heads.safetensors, tb/, metrics.json, train_state.pt")
    train.add_argument("--bag", dest="bags", nargs="+", type=Path, help="recordings to add (unlabelled: "
                                                                         "self-supervised objectives only)")
    train.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    train.add_argument("--batch", type=int, help="samples per step (default 64)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    train.add_argument("--clip-grad-norm", type=float, help="clip the gradients' global norm to this (default 0: not "
                                                            "clipped; the norm is logged as train/grad_norm either way)")
    train.add_argument("--seed", type=int, help="seeds the episodes, the initial weights and the data stream (default 0)")
    train.add_argument("--sim-episodes", type=int, help="simulated training episodes (default 48; 0: bags only)")
    train.add_argument("--val-episodes", type=int, help="held-out simulated episodes (default 8; 0: no validation)")
    train.add_argument("--sim-seconds", type=float, help="simulated time per episode (default 15)")
    train.add_argument("--sim-tasks", nargs="+", metavar="TASK",
                       help="simulated tasks the episodes alternate over: control, navigate, memory (default: control navigate)")
    train.add_argument("--stop-share", type=float, help="share of the simulated driving policy's commands that are a "
                       "stop (default 0): a robot standing still, whose healthy sensors change by their noise alone")
    train.add_argument("--mirror", action="store_const", const=True,
                       help="also train on each simulated episode's mirror image (left and right swapped: camera "
                            "columns, lidar y, the IMU's lateral and yaw axes, the labels): twice the scenes, no simulating")
    train.add_argument("--sim-camera-view", type=int, metavar="PIXELS",
                       help="pixels per side of each of the simulated camera rig's four square views (default 64: a "
                            "64 x 256 panorama); the tokenizer resizes it to --camera-size either way")
    train.add_argument("--trigger", choices=["timer", "camera", "lidar", "imu"],
                       help="a sample on the fusion timer (default) or on each message of this sensor, as the node's "
                            "`trigger` parameter (the timer while that sensor is silent): run such a model with it")
    train.add_argument("--fusion", choices=["attention", "concat", "mean"],
                       help="attention (default: FusionModel) or a baseline without attention (eval-robustness; "
                            "the attention model's own options are refused with it)")
    train.add_argument("--fixed-tau", dest="tau_random_prob", action="store_const", const=0.0,
                       help="train at τ = 1 only (a baseline; default: random τ for half the samples)")
    train.add_argument("--sensor-fusion", choices=["sensor", "token"],
                       help="sensor (default): sensors weighted by a softmax of log trust at τ, a softmax per sensor's "
                            "tokens; token: one softmax over all tokens at τ (the earlier design, a baseline)")
    train.add_argument("--trust-floor", type=float, help="sensor fusion: the least trust a present sensor counts with "
                                                         "in the sensor softmax, so a high τ averages all present "
                                                         "sensors (default 0: none)")
    train.add_argument("--floor-at-run-time", dest="floor_in_training", action="store_const", const=False,
                       help="train the weights without the trust floor; validation and the saved model use it "
                            "(a high τ then admits a doubted sensor at run time only)")
    train.add_argument("--camera-shifts", type=int, help="camera motion evidence: match each patch's columns to the "
                                                          "previous frame's shifted by up to this many columns "
                                                          "(default 0: none)")
    train.add_argument("--lidar-motion", action="store_const", const=True,
                       help="lidar motion evidence: scan-match each sweep's pillar points to the previous sweep's")
    train.add_argument("--lidar-motion-token", action="store_const", const=True,
                       help="with --lidar-motion: the scan match as a lidar token of its own, not added to every pillar")
    train.add_argument("--lidar-motion-direct", action="store_const", const=True,
                       help="with --lidar-motion: the scan match also added straight to the fused state, at the "
                            "lidar's sensor weight")
    train.add_argument("--imu-direct", action="store_const", const=True,
                       help="the IMU's window as tokenized also added straight to the fused state, at the IMU's "
                            "sensor weight")
    train.add_argument("--rate-readout", action="store_const", const=True,
                       help="each IMU's (and the odometry's) own linear read of speed and yaw rate, averaged at their "
                            "trust at τ and added to the fused state (model.rate_readout; the sensor fusion only)")
    train.add_argument("--rate-output", action="store_const", const=True,
                       help="with --rate-readout: the fused speed and yaw rate as the model's own output ego_rate "
                            "(the averaged reads, a learned gain, a correction from the fused tokens), which the "
                            "velocity objective trains, not added to the fused state (model.rate_output)")
    train.add_argument("--stale-evidence", action="store_const", const=True,
                       help="a second trust path for the camera that sees only how much its image changed, "
                            "trained to tell frozen or black content (model.SensorTrust)")
    train.add_argument("--camera-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                       help="the size camera images are resized to before patching (default 96 128)")
    train.add_argument("--camera-patch", type=int, help="pixels per camera patch side (default 16)")
    train.add_argument("--camera-stem", type=int, metavar="CHANNELS",
                       help="embed each camera patch by a two-layer strided convolution with this many features "
                            "per cell of a grid in the patch (default 0: one linear layer)")
    train.add_argument("--camera-stem-cells", type=int, metavar="K",
                       help="with --camera-stem: the grid's cells per patch side (default 4; the patch's side in "
                            "pixels: a per-pixel layer first)")
    train.add_argument("--camera-column-blocks", type=int, metavar="N",
                       help="self-attention blocks along each column of camera patches after the embedding, so a "
                            "patch sees what stands above and below it (default 0: none)")
    train.add_argument("--odometry", action="store_const", const=True,
                       help="wheel odometry (nav_msgs/Odometry's twist) as a fourth sensor after the IMU")
    train.add_argument("--second-imu", action="store_const", const=True,
                       help="a second IMU (its own topic, imu2) as the last sensor; the simulated rig gets one")
    train.add_argument("--fault-weights", type=float, nargs="+", metavar="W",
                       help="which sensor a training sample's fault hits, in proportion: camera, lidar, IMU[, "
                            "odometry][, imu2] (default 1 each; --fault-share of samples get one); e.g. 1 1 2 for twice the IMU faults")
    train.add_argument("--fault-share", type=float, dest="corrupt_prob", metavar="P",
                       help="share of training samples with one faulted sensor (default 0.6)")
    train.add_argument("--first-frame-share", type=float, metavar="P",
                       help="share of training samples whose camera, and apart from it whose lidar, come without "
                            "their previous frame, as at a recording's start or after a gap (default 0): the trust "
                            "learns to judge a first frame by its content")
    train.add_argument("--lone-sensor-share", type=float, metavar="P",
                       help="share of training samples that keep one sensor alone, every other one dropped (default "
                            "0): the trust learns to judge a sensor with no other present to compare with")
    train.add_argument("--random-phase", action="store_true",
                       help="the training episodes' fusion timer at phases spread over a period, each walking once "
                            "through it, not with the sensors' frames and samples: they are seen at any age, as a "
                            "node sees them (validation and held-out episodes keep phase 0)")
    train.add_argument("--objective-weights", nargs="+", metavar="NAME=WEIGHT",
                       help="weights of head objectives (default 1 each): camera, lidar, imu, imu_next, velocity, "
                            "obstacles, goal; e.g. goal=4")
    train.add_argument("--trust-weight", type=float, help="weight of the trust objective (default 1)")
    train.add_argument("--avoid-weight", type=float, help="weight of the attention-avoidance objective: attention mass "
                                                          "on a sensor whose content is gone (default 0; the token "
                                                          "baseline's 1)")
    train.add_argument("--consistency-weight", type=float,
                       help="weight of the consistency objective: a faulted sample's fused state kept near the one it "
                            "has with every sensor healthy, what a policy trained on clean fusion reads (default 0)")
    train.add_argument("--camera-goal-weight", type=float,
                       help="weight of the camera's own goal objective: each column of camera patches says whether the "
                            "goal stands in it, its distance and where (simulated samples; training only; default 0)")
    train.add_argument("--camera-goal-head", choices=("columns", "tokens"),
                       help="with --camera-goal-weight: ask each 45° column of patches (default), or each patch "
                            "whether the post's top edge is in it, the distance and where across and down the patch")
    train.add_argument("--lidar-goal-weight", type=float,
                       help="weight of the lidar's own goal objective: each pillar token says whether the goal post's "
                            "returns are in it and the goal's distance (simulated samples; training only; default 0)")
    train.add_argument("--lidar-goal-bearing", action="store_const", const=True,
                       help="with --lidar-goal-weight: the post's pillars say the goal's bearing too, not only its distance")
    train.add_argument("--latent-blocks", type=int, help="self-attention blocks over the fusion tokens (default 1)")
    train.add_argument("--qk-norm", action="store_const", const=True,
                       help="cosine attention logits with a learned scale per head (an implicit temperature)")
    train.add_argument("--learned-head-temperature", action="store_const", const=True,
                       help="a learned τ per head, multiplied with the input τ")
    train.add_argument("--init-from", type=str, metavar="CHECKPOINT",
                       help="start from a trained model's weights and heads (its tokenizer settings must be this run's)")
    train.add_argument("--train-only", nargs="+", metavar="PREFIX",
                       help="with --init-from: train only the parameters whose names start so (e.g. trust.stale, "
                            "fitting --stale-evidence's camera path onto a trained model); the rest stay as loaded")
    train.add_argument("--eval-every", type=int, help="validation every this many steps (default 500; also at the end)")
    train.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    train.add_argument("--cache", type=Path, default=None, help="tokenized dataset cache "
                                                                 "(default $FUSION_ATTN_CACHE/train)")
    train.add_argument("--jobs", type=int, default=1, help="make the dataset's missing shards (simulated episodes, "
                                                          "recordings) this many at a time, a process each")
    train.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="make them on Ray instead: 'auto' or a cluster address; --cache must be a folder every "
                            "node reaches (docs/SCALE_OUT.md)")
    train.add_argument("--resume", action="store_true", default=False, help="continue from OUT/train_state.pt")
    train.add_argument("--overwrite", action="store_true", default=False,
                       help="replace the run OUT holds (its model, state, metrics and tb/; without this or "
                            "--resume a folder that holds a run is refused)")
    train.add_argument("--stop-after", type=int, default=None, help="save and stop after this step (a time-boxed job); "
                                                                     "--resume continues exactly")
    train.add_argument("--no-progress", action="store_true", default=False)
    return train


# what only the attention model has (--fixed-tau is allowed with a baseline: it ignores τ either way)
ATTENTION_ONLY = {"--sensor-fusion": "sensor_fusion", "--trust-floor": "trust_floor",
                  "--floor-at-run-time": "floor_in_training", "--stale-evidence": "stale_evidence",
                  "--lidar-motion-direct": "lidar_motion_direct", "--imu-direct": "imu_direct",
                  "--rate-readout": "rate_readout", "--rate-output": "rate_output",
                  "--latent-blocks": "latent_blocks",
                  "--qk-norm": "qk_norm", "--learned-head-temperature": "learned_head_temperature",
                  "--trust-weight": "trust_weight", "--avoid-weight": "avoid_weight",
                  "--consistency-weight": "consistency_weight", "--camera-goal-weight": "camera_goal_weight",
                  "--camera-goal-head": "camera_goal_head", "--lidar-goal-weight": "lidar_goal_weight",
                  "--lidar-goal-bearing": "lidar_goal_bearing"}


def run(args) -> int:
    import dataclasses

    from ..errors import ConfigError
    from ..learn.loop import TrainConfig, train

    fields = ("seed", "steps", "batch", "lr", "clip_grad_norm", "sim_episodes", "val_episodes", "sim_seconds", "sim_tasks", "stop_share", "mirror", "sim_camera_view", "trigger", "bags", "fusion",
              "tau_random_prob", "sensor_fusion", "trust_floor", "floor_in_training", "camera_shifts", "lidar_motion", "lidar_motion_token", "lidar_motion_direct", "imu_direct", "stale_evidence", "camera_size", "camera_patch", "camera_stem", "camera_stem_cells", "camera_column_blocks", "odometry", "second_imu", "rate_readout", "rate_output", "fault_weights", "corrupt_prob", "first_frame_share", "lone_sensor_share", "random_phase", "objective_weights", "trust_weight", "avoid_weight", "consistency_weight", "camera_goal_weight", "camera_goal_head", "lidar_goal_weight", "lidar_goal_bearing", "eval_every", "latent_blocks", "qk_norm", "learned_head_temperature", "init_from", "train_only")
    given = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if "bags" in given:
        given["bags"] = tuple(str(b) for b in given["bags"])
    if "camera_size" in given:
        given["camera_size"] = tuple(given["camera_size"])
    for name in ("train_only", "sim_tasks", "fault_weights"):
        if name in given:
            given[name] = tuple(given[name])
    if "objective_weights" in given:
        given["objective_weights"] = objective_weights(given["objective_weights"])
    tc = dataclasses.replace(TrainConfig(), **given)
    if min(tc.sim_episodes, tc.val_episodes, tc.latent_blocks) < 0 or min(tc.steps, tc.batch, args.threads) < 1:
        raise ConfigError("--steps, --batch and --threads must be >= 1, --sim-episodes, --val-episodes and "
                          "--latent-blocks >= 0")
    if not tc.clip_grad_norm >= 0:  # nan too
        raise ConfigError(f"--clip-grad-norm {tc.clip_grad_norm}: a norm, 0 (not clipped) or above")
    if tc.sim_camera_view < 8:
        raise ConfigError(f"--sim-camera-view {tc.sim_camera_view}: at least 8 pixels per view side")
    if not 0.0 <= tc.stop_share <= 1.0:
        raise ConfigError(f"--stop-share {tc.stop_share}: a share, between 0 and 1")
    numbers = {k: v for k, v in given.items() if isinstance(v, float)}
    if bad := [k for k, v in numbers.items() if not math.isfinite(v)]:
        raise ConfigError(", ".join(f"--{k.replace('_', '-')} {numbers[k]}" for k in bad) + ": finite numbers only")
    if not (tc.lr > 0 and tc.sim_seconds > 0 and tc.eval_every >= 1):
        raise ConfigError(f"--lr {tc.lr}, --sim-seconds {tc.sim_seconds} and --eval-every {tc.eval_every} must be > 0")
    if negative := [k for k in given if k.endswith("_weight") and given[k] < 0]:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in negative)}: weights are >= 0")
    if not 0.0 <= tc.trust_floor < 1.0:
        raise ConfigError(f"--trust-floor {tc.trust_floor}: a share of the weight, from 0 up to 1")
    if (args.stop_after is not None and args.stop_after < 1) or args.jobs < 1:
        raise ConfigError("--stop-after and --jobs must be >= 1")
    for flag, share in (("--fault-share", tc.corrupt_prob), ("--first-frame-share", tc.first_frame_share),
                        ("--lone-sensor-share", tc.lone_sensor_share)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{flag} {share}: a share, between 0 and 1")
    weights = " ".join(map(str, tc.fault_weights))
    if not all(math.isfinite(w) and w >= 0 for w in tc.fault_weights) or sum(tc.fault_weights) <= 0:
        raise ConfigError(f"--fault-weights {weights}: non-negative, not all zero")
    sensors = ["camera", "lidar", "IMU"] + ["odometry"] * tc.odometry + ["imu2"] * tc.second_imu
    if len(tc.fault_weights) not in (3, len(sensors)):
        raise ConfigError(f"--fault-weights {weights}: one per sensor, {' '.join(sensors)}")
    if tc.fusion != "attention" and (unused := [flag for flag, key in ATTENTION_ONLY.items() if key in given]):
        raise ConfigError(f"--fusion {tc.fusion} has no trust, sensor weights or fusion tokens: {', '.join(unused)} "
                          f"would do nothing")
    if not tc.floor_in_training and tc.trust_floor <= 0:
        raise ConfigError("--floor-at-run-time needs a --trust-floor above 0")
    if tc.train_only and not tc.init_from:
        raise ConfigError("--train-only needs --init-from: the parameters it leaves out would keep untrained weights")
    if tc.sim_episodes == 0 and not tc.bags:
        raise ConfigError("no training data: give --sim-episodes > 0 or --bag")
    try:
        import torch.utils.tensorboard  # noqa: F401

        if tc.sim_episodes or tc.val_episodes:
            import fusion_attn.sim  # noqa: F401
            from fusion_attn.sim.tasks import TASKS

            if unknown := set(tc.sim_tasks) - set(TASKS):
                raise ConfigError(f"--sim-tasks {' '.join(sorted(unknown))}: the simulator's tasks are {', '.join(TASKS)}")
    except ImportError as exc:
        raise FusionAttnError(f"training needs the train and sim extras ({exc}); pip install -e '.[sim,train]'") from exc
    # the command as run (recorded in the checkpoint), with every setting spelled out
    spelled = {k: tuple(f"{name}={w:g}" for name, w in v.items()) if isinstance(v, dict) else v for k, v in given.items()}
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else " " + " ".join(map(str, v)) if isinstance(v, tuple)
                                            else f" {v}") for k, v in spelled.items()
             if k not in ("bags", "tau_random_prob", "floor_in_training")]
    flags += ["--fixed-tau"] if "tau_random_prob" in given else []
    flags += ["--floor-at-run-time"] if "floor_in_training" in given else []
    command = " ".join(["fusion-attn train -o", str(args.output), *flags, *(["--bag", *tc.bags] if tc.bags else []),
                        f"--threads {args.threads}", *(["--resume"] if args.resume else [])])
    m = train(tc, args.output, resume=args.resume, device=args.device, threads=args.threads, cache=args.cache,
              progress=not args.no_progress, command=command, stop_after=args.stop_after, jobs=args.jobs, ray=args.ray,
              overwrite=args.overwrite)
    clean = m["val"].get("clean", {})
    print(f"trained {m['steps']} steps in {m['train_s']:.0f} s on {m['device']} ({m['data']['train_samples']} training "
          f"samples, {m['data']['train_bag_samples']} from bags; dataset {m['data']['dataset_s']:.0f} s)")
    if clean:
        print("  validation, clean: " + "  ".join(f"{k} {v:.3g}" for k, v in clean.items()))
    model = "model.safetensors, " if tc.fusion == "attention" else ""  # a baseline's weights: train_state.pt only
    print(f"  wrote {args.output}/{model}model.heads.safetensors, metrics.json, tb/, train_state.pt")
    return 0


def objective_weights(pairs: list[str]) -> dict[str, float]:
    """--objective-weights goal=4 ... -> {"goal": 4.0}; ConfigError on an unknown name or a bad weight."""
    from ..errors import ConfigError
    from ..learn.objectives import OBJECTIVES

    weights = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if name not in OBJECTIVES or not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"--objective-weights {pair}: NAME=WEIGHT, NAME one of {', '.join(OBJECTIVES)}, "
                              "WEIGHT a number >= 0")
        weights[name] = weight
    return weights
