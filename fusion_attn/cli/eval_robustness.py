"""`fusion-attn eval-robustness`: trained runs compared under every single-sensor fault and a τ sweep
(docs/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FusionAttnError


def add_parser(verbs):
    robust = verbs.add_parser("eval-robustness", help="compare trained runs under every single-sensor fault and a τ sweep")
    robust.add_argument("runs", nargs="+", metavar="NAME=RUN", help="name=folder of a `fusion-attn train` run; "
                                                                    "NAME#k: seed k of design NAME (averaged); the "
                                                                    "first is the design the targets judge")
    robust.add_argument("-o", "--output", type=Path, required=True, help="folder for robustness.json and the plots")
    robust.add_argument("--tau", default="0.1,0.3,1,3,10", help="global τ sweep for attention runs trained with random τ")
    robust.add_argument("--episodes", type=int, default=16, help="held-out simulated episodes")
    robust.add_argument("--bag", nargs="*", type=Path, default=[], help="real recordings: self-supervised loss and trust, "
                                                                          "clean and corrupted")
    robust.add_argument("--cache", type=Path, help="tokenized dataset cache (default $FUSION_ATTN_CACHE/train)")
    robust.add_argument("--threads", type=int, default=1, help="torch threads per process")
    robust.add_argument("--jobs", type=int, default=1, help="runs evaluated at once, each in a process of its own")
    robust.add_argument("--reuse", action="store_true", help="keep the sweeps OUT/robustness.json holds for runs whose "
                                                              "training state is unchanged (same episodes and τ), and "
                                                              "those a stopped evaluation finished (OUT/sweeps/)")
    robust.add_argument("--beside", type=Path, metavar="REPORT", help="an earlier robustness.json whose runs join "
                                                                     "these as measured there (same episodes, τ and "
                                                                     "trigger): baselines without their folders")
    return robust


def run(args) -> int:
    from ..config import cache_dir
    from ..learn.robustness import run_evaluation

    runs = dict(r.split("=", 1) for r in args.runs if "=" in r)
    if len(runs) != len(args.runs):
        raise FusionAttnError(f"runs are NAME=FOLDER, got {args.runs}")
    try:
        taus = [float(t) for t in args.tau.split(",")]
    except ValueError:
        raise FusionAttnError(f"--tau takes comma-separated numbers, got {args.tau!r}") from None
    report = run_evaluation({n: Path(f) for n, f in runs.items()}, args.output, taus, args.episodes,
                            args.cache or cache_dir("train"), args.bag, args.threads, args.jobs, args.reuse,
                            args.beside)
    print(f"{report['test_samples']} held-out samples from {args.episodes} episodes; wrote {args.output}/robustness.json")
    for name, rows in report["summary"].items():
        worst = max((r for c, r in rows.items() if c != "clean"), key=lambda r: r["rise"])
        print(f"  {name}: clean head error {rows['clean']['head_error']:.3f}, worst rise {100 * worst['rise']:.0f}%")
    return 0
