"""What several verbs share: the model flags, and the pipeline, sync and replay options built from the
node's parameter file (--params) and the flags, so the CLI does what the node would."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backends import BACKENDS
from ..frames import MODALITIES
from ..params import TAU_NAMES, param


def model_args(p: argparse.ArgumentParser, backend: bool = True, tau: bool = True) -> None:
    p.add_argument("--checkpoint", type=Path, help="safetensors checkpoint (default: the packaged model)")
    if backend:
        p.add_argument("--backend", choices=BACKENDS, help="default: onnxruntime (a GPU backend that cannot run "
                                                            "here falls back to it, see backend_fallback)")
        p.add_argument("--threads", type=int)
    if tau:
        p.add_argument("--tau", type=float, nargs="+", metavar="TAU",
                       help="global, camera, lidar, imu (and odometry, imu2, for a model that reads them)")


def fusion_setup(args, tau=None):
    """The pipeline, sync config and parameters from --params (the node's file) and the flags."""
    from ..config import load_params
    from ..errors import ConfigError
    from ..pipeline import FusionPipeline
    from ..sync import SyncConfig

    params = load_params(args.params) if getattr(args, "params", None) else {}
    flags = {"checkpoint": args.checkpoint, "backend": args.backend, "threads": args.threads}
    params.update({k: v for k, v in flags.items() if v})
    pipeline = FusionPipeline.from_params(params)
    if tau:  # the model's τ, in its order
        names = ("tau.global", *(f"tau.{n}" for n in pipeline.cfg.sensor_names))
        if len(tau) > len(names):
            raise ConfigError(f"--tau takes at most {len(names)} values ({', '.join(names)}), got {len(tau)}")
        params.update(zip(names, tau))
        pipeline.set_tau([param(params, n) for n in TAU_NAMES])
    return pipeline, SyncConfig.for_model(pipeline.cfg, params), params


def replay_options(args, params, **overrides):
    """Replay options from the node's parameters (so replay does what the node would), then the flags."""
    from ..frames import Modality
    from ..replay import ReplayOptions

    topics = {Modality[m.upper()]: t for m in MODALITIES if (t := getattr(args, f"{m}_topic", None))}
    return ReplayOptions(
        fusion_rate_hz=args.rate if getattr(args, "rate", None) is not None else param(params, "fusion_rate_hz"),
        trigger=param(params, "trigger"), diagnostics_period_s=param(params, "diagnostics_period_s"),
        sensors=tuple(m for m in MODALITIES if param(params, f"{m}_type") != "none"), topics=topics, **overrides)
