"""`python -m rl` (also `fusion-attn rl`): train, evaluate and export attention-memory agents.

    python -m rl train ENV_ID -o RUN [--agent gtrxl|mlp|lstm|gru] [--steps N] [--envs N] [--seed S] [--resume|--overwrite]
    python -m rl evaluate RUN/agent.safetensors [--episodes N] [--faults] [-o OUT]
    python -m rl export RUN/agent.safetensors -o policy.onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from fusion_attn.errors import FusionAttnError


def add_verbs(verbs) -> None:
    """The rl verbs on an argparse subparsers object (here, and under `fusion-attn rl`)."""
    from .config import AgentConfig, PPOConfig  # no torch: keeps `fusion-attn --help` fast

    ppo, agent = PPOConfig(), AgentConfig()
    train = verbs.add_parser("train", help="train an agent with PPO")
    train.add_argument("env_id", help="a Gymnasium id, e.g. FusionAttn/Memory-Discrete-v0 or CartPole-v1; a "
                       "third-party env as MODULE:EnvId (imports MODULE, which registers it) or with --import")
    train.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    train.add_argument("--env-kwargs", type=json.loads, default={}, metavar="JSON",
                       help='gym.make keyword arguments, e.g. \'{"task_options": {"n_goals": 2}}\'')
    train.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import MODULE before making the env (it registers its ids); repeatable, saved with the "
                            "run (evaluate asks for it by name too). The working folder is importable, as with python -m")
    train.add_argument("--fusion-checkpoint", default="", metavar="SAFETENSORS",
                       help="FusionAttn envs: the fusion model to observe through (default: the packaged one); "
                            "the policy's contract records it")
    train.add_argument("--fusion-trigger", choices=["timer", "camera", "lidar", "imu"], default="timer",
                       help="FusionAttn envs: fuse on the timer (default) or on each message of this sensor, as the "
                            "node's `trigger` (for a fusion model trained with --trigger); the contract records it")
    train.add_argument("--agent", choices=["gtrxl", "mlp", "lstm", "gru"], default=agent.kind,
                       help="gtrxl: attention memory; mlp: none; lstm, gru: recurrent baselines (same PPO, trained "
                            "through time on whole rollouts)")
    train.add_argument("--memory", type=int, default=agent.memory,
                       help="gtrxl: K, past steps each layer attends over, and the recall horizon: a cue more than "
                            "K decisions back is reached only if the layers below happen to carry it (no gradient "
                            "trains them to), and never beyond layers x K. Give K at least the longest delay to "
                            "recall (docs/RL.md)")
    train.add_argument("--layers", type=int, default=agent.layers, help="gtrxl blocks or lstm / gru layers")
    train.add_argument("--steps", type=int, default=ppo.steps)
    train.add_argument("--envs", type=int, default=ppo.envs, help="envs over all workers")
    train.add_argument("--workers", type=int, default=ppo.workers,
                       help="env worker processes (0: every env in the learner's process); one core each")
    train.add_argument("--envs-per-worker", type=int, help="K envs per worker: --envs becomes workers x K")
    train.add_argument("--ray", default=ppo.ray, metavar="ADDRESS",
                       help="the workers as Ray actors on a cluster: 'auto' (the cluster `ray start` made on this "
                            "machine, else a new local one) or its address (docs/SCALE_OUT.md)")
    train.add_argument("--rollout", type=int, default=ppo.rollout)
    train.add_argument("--lr", type=float, default=ppo.lr)
    train.add_argument("--ent-coef", type=float, default=ppo.ent_coef)
    train.add_argument("--action-repeat", type=int, help="FusionAttn envs: control steps per decision (default "
                       "5: decisions at 10 Hz, the drive at 50 Hz); other envs step once per decision and refuse it")
    train.add_argument("--seed", type=int, default=ppo.seed)
    train.add_argument("--threads", type=int, default=ppo.threads)
    train.add_argument("--device", default=ppo.device, help="the learner's device: auto (CUDA when there is one; the "
                                                            "envs stay on the CPU), cpu, cuda, cuda:1, ...")
    train.add_argument("--fault-rate", type=float, default=ppo.fault_rate,
                       help="FusionAttn envs: share of training episodes with one sensor fault, so the policy "
                            "learns to act when a sensor fails (rl.ppo.TRAINING_FAULTS)")
    train.add_argument("--fault-after", type=float, default=ppo.fault_after,
                       help="share of the steps trained without faults before --fault-rate applies (a curriculum: "
                            "the task first, then its faults)")
    train.add_argument("--fault-ramp", type=float, default=ppo.fault_ramp,
                       help="share of the steps over which the fault share then rises linearly from 0 to "
                            "--fault-rate (default 0: at once)")
    train.add_argument("--aux-info", default=ppo.aux_info, metavar="KEY",
                       help="a numeric entry of the env's step info that the agent also learns to predict from its "
                            "memory, in training only (FusionAttn envs: goal, the episode's goal in the arena): an "
                            "auxiliary loss that makes the memory keep what the task depends on (docs/RL.md)")
    train.add_argument("--aux-coef", type=float, default=ppo.aux_coef, help="weight of --aux-info's squared error")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue RUN/train_state.pt (same flags; a larger "
                        "--steps extends a finished run)")
    resume.add_argument("--overwrite", action="store_true", help="delete the run in RUN and start over (without "
                        "this or --resume, a folder that holds a run is refused)")
    train.add_argument("--no-progress", action="store_true")
    ev = verbs.add_parser("evaluate", help="success and return over episodes; attention plot, image strip")
    ev.add_argument("agent", type=Path)
    ev.add_argument("--episodes", type=int, default=20)
    ev.add_argument("--faults", action="store_true", help="one sensor fault per episode (rl/evaluate.py)")
    ev.add_argument("-o", "--output", type=Path)
    ev.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="a module the agent's env needs imported (its --import, or the MODULE of MODULE:EnvId); "
                         "named here, not taken from the checkpoint: importing runs its code")
    ex = verbs.add_parser("export", help="policy to ONNX, memory as explicit inputs/outputs")
    ex.add_argument("agent", type=Path)
    ex.add_argument("-o", "--output", type=Path, required=True)


def run(args) -> int:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's env module in the working folder, as `python -m rl` finds it
    if args.verb == "train":
        from .config import AgentConfig, PPOConfig
        from .ppo import train

        cfg = PPOConfig(env_id=args.env_id, env_kwargs=args.env_kwargs, imports=tuple(args.imports),
                        fusion_checkpoint=args.fusion_checkpoint, fusion_trigger=args.fusion_trigger,
                        steps=args.steps, envs=args.workers * args.envs_per_worker if args.envs_per_worker else args.envs,
                        workers=args.workers, ray=args.ray, rollout=args.rollout, lr=args.lr, ent_coef=args.ent_coef, action_repeat=args.action_repeat, seed=args.seed, threads=args.threads, device=args.device,
                        fault_rate=args.fault_rate, fault_after=args.fault_after, fault_ramp=args.fault_ramp,
                        aux_info=args.aux_info, aux_coef=args.aux_coef,
                        agent=AgentConfig(kind=args.agent, memory=args.memory, layers=args.layers))
        row = train(cfg, args.output, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        print(json.dumps({"run": str(args.output), "config": dataclasses.asdict(cfg), "last": row}, indent=1))
    elif args.verb == "evaluate":
        from .evaluate import evaluate

        print(json.dumps(evaluate(args.agent, args.episodes, args.faults, args.output, imports=args.imports), indent=1))
    else:
        from .export import export_policy

        path, diff = export_policy(args.agent, args.output)
        print(f"wrote {path}; ONNX Runtime vs PyTorch over two steps: max abs diff {diff:.2e}")
        return 0 if diff < 1e-4 else 1
    return 0


def cli_verb(verbs):
    """`fusion-attn rl`: adds the rl verbs under an `rl` subparser; -> the function that runs them. Found by
    fusion-attn through the entry-point group fusion_attn.cli (setup.py), so fusion_attn never imports rl."""
    add_verbs(verbs.add_parser("rl", help="attention-memory RL agents: train, evaluate, export").add_subparsers(
        dest="rl_verb", required=True))
    return _run_cli_verb


def _run_cli_verb(args) -> int:
    # run() dispatches on args.verb, which under fusion-attn is "rl" (kept there for its error messages)
    return run(argparse.Namespace(**{**vars(args), "verb": args.rl_verb}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rl", description=__doc__.split("\n\n")[0])
    add_verbs(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FusionAttnError as exc:
        print(f"rl {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
