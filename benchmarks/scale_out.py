"""Scale-out (issue #18): simulator steps/s over env workers, and replays of many recordings at once.

    python benchmarks/scale_out.py [--workers 1 2] [--envs-per-worker 4] [--steps 2000] [--replays 2]

Simulator: FusionAttn/Navigate-v0 with every sensor and its faults off, random actions (as
sim_throughput.py): one env in one process, then N workers x K envs (rl.workers.WorkerVectorEnv),
gymnasium's AsyncVectorEnv with N workers (one env each), and the workers as Ray actors (when Ray is
installed) at the same N. Each rate is env steps per second over all envs, resets included; the
scaling figure is rate / (N x one env's rate). The measures run in interleaved rounds (--rounds);
reported are the medians, and Ray's ratio to the local workers as the median of each round's.

Replay: R copies of the standard recording (replay_speed.py's, --seconds long) replayed one at a
time and then R at once, in --rounds interleaved rounds (medians) (`fusion-attn replay --each --jobs R`), each measured from the command's
start to its end (process start-up, model loading and plots included): recorded seconds per wall
second over all recordings, and its ratio to R x one replay's.

RL rollouts (--rollout-steps): what training runs on the workers since the policy acts there
(rl.workers EnvGroup.rollout, the learner's weights sent once per update): --rollout-steps decisions
of each env of the memory task (FusionAttn/Memory-Discrete-v0, fused observations, faults on), the
default GTrXL agent sampling, N local workers x K envs against N Ray actors x K envs, interleaved
rounds; env steps/s and Ray's ratio to the local workers, per round and median.

Profile of one vector step: one worker x K envs against the same K envs stepped in this process (the
difference is the round trip: sending actions, pickled observations and infos back, unpacking), and
the bytes a step returns; the same for AsyncVectorEnv, per env.

Writes benchmarks/results/scale_out.json and docs/figures/scale_out.png; prints markdown tables.
"""

import argparse
import datetime
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
from sim_throughput import ENV_ID, steps_per_s, vector_steps_per_s  # the same env and timing


def nav_env(index: int = 0) -> gym.Env:
    from fusion_attn.sim.faults import FaultConfig

    return gym.make(ENV_ID, faults=FaultConfig())


def step_overhead(k: int, steps: int) -> dict:
    """Where the time of one vector step goes, one worker x k envs: the envs' own stepping (an EnvGroup
    in this process), the same through a worker (plus the round trip and the learner's unpacking),
    and the bytes a step sends back; AsyncVectorEnv's round trip per env for comparison."""
    import pickle

    from rl.workers import EnvGroup, WorkerVectorEnv

    group = EnvGroup(nav_env, 0, k)
    group.reset(list(range(k)), None)
    space = group.envs[0].action_space
    space.seed(0)
    start = time.perf_counter()
    for _ in range(steps // k):
        out = group.step([space.sample() for _ in range(k)])
    local_ms = (time.perf_counter() - start) / (steps // k) * 1e3
    sent = len(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    group.close()
    worker_ms = 1e3 * k / vector_steps_per_s(WorkerVectorEnv(nav_env, 1, k), steps)
    one_ms = 1e3 / steps_per_s(nav_env(), steps // 2)
    async_ms = 1e3 / vector_steps_per_s(gym.vector.AsyncVectorEnv([nav_env], context="spawn"), steps // 2)
    return {"envs_per_worker": k, "envs_in_process_ms": local_ms, "through_a_worker_ms": worker_ms,
            "overhead_ms": worker_ms - local_ms, "bytes_per_step": sent, "one_env_ms": one_ms,
            "async_vector_env_one_env_ms": async_ms, "async_overhead_ms": async_ms - one_ms}


def rl_rollout_rate(envs, steps: int) -> float:
    """Env steps/s over all envs of one PPO rollout of `steps` decisions per env, acted in the workers
    (after a short first one: agents built, envs reset)."""
    from rl.agent import ActorCritic
    from rl.config import AgentConfig
    from rl.ppo import RolloutPolicy

    try:
        build = partial(ActorCritic, envs.single_observation_space.shape[0], envs.single_action_space, AgentConfig())
        policy = RolloutPolicy(build, build().state_dict())
        envs.rollout(policy, 4, 0.99, 0, 0)
        start = time.perf_counter()
        envs.rollout(policy, steps, 0.99, 0, 1)
        return steps * envs.num_envs / (time.perf_counter() - start)
    finally:
        envs.close()


def replay_rate(bags: list[Path], out: Path, jobs: int) -> tuple[float, float]:
    """-> (recorded seconds per wall second over all bags, wall seconds) of one `replay --each` command."""
    import subprocess
    import sys

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fusion_attn.cli", "replay", "--each", *map(str, bags), "-o", str(out),
                    "--jobs", str(jobs), "--threads", "1"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    index = json.loads((out / "index.json").read_text())
    return sum(r["recorded_s"] for r in index["recordings"]) / wall, wall


def main() -> None:
    from fusion_attn.bench import machine, write_standard_bag
    from rl.workers import RayVectorEnv, WorkerVectorEnv

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--envs-per-worker", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000, help="env steps per measurement (over all envs)")
    parser.add_argument("--replays", type=int, default=2, help="recordings replayed at once (0: skip)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each recording")
    parser.add_argument("--rollout-steps", type=int, default=64, help="decisions per env of an RL rollout (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale_out.json")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/scale_out.png"))
    args = parser.parse_args()
    try:
        import ray
    except ImportError:
        ray = None
    use_ray = ray is not None and not args.no_ray

    overhead = step_overhead(args.envs_per_worker, args.steps // 2)
    print(json.dumps(overhead), flush=True)
    if use_ray:  # a local instance with a CPU per worker
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    k = args.envs_per_worker
    measures = {"workers_x_k": lambda n: WorkerVectorEnv(nav_env, n, k),
                "async_vector_env": lambda n: gym.vector.AsyncVectorEnv([partial(nav_env, i) for i in range(n)],
                                                                         context="spawn")}
    if use_ray:
        measures["ray_actors"] = lambda n: RayVectorEnv(nav_env, n, k)
    # Interleaved rounds, medians: this VM's speed drifts by tens of percent within minutes.
    rounds = []
    for r in range(args.rounds):
        rates = {"one_env": steps_per_s(nav_env(), args.steps)}
        for n in args.workers:
            for key, make in measures.items():
                rates[f"{key}@{n}"] = vector_steps_per_s(make(n), args.steps * n)
        rounds.append(rates)
        print(f"round {r + 1}: " + json.dumps({k: round(v) for k, v in rates.items()}), flush=True)
    one = float(np.median([r["one_env"] for r in rounds]))
    rows = []
    for n in args.workers:
        row = {"workers": n, "envs_per_worker": k}
        for key in measures:
            row[key] = float(np.median([r[f"{key}@{n}"] for r in rounds]))
            row[f"{key}_scaling"] = row[key] / (n * one)
        if use_ray:  # Ray against the local workers, round by round
            row["ray_over_local"] = float(np.median([r[f"ray_actors@{n}"] / r[f"workers_x_k@{n}"] for r in rounds]))
        rows.append(row)
    rl_rows = []
    if args.rollout_steps:  # the training path: the policy acting in the workers, local against Ray
        from rl.config import PPOConfig
        from rl.ppo import make_env

        rl_env = partial(make_env, PPOConfig(env_id="FusionAttn/Memory-Discrete-v0", fault_rate=0.5), True)
        paths = {"local": lambda n: WorkerVectorEnv(rl_env, n, k)}
        if use_ray:
            paths["ray"] = lambda n: RayVectorEnv(rl_env, n, k)
        rl_rounds = []
        for r in range(args.rounds):
            rates = {f"{key}@{n}": rl_rollout_rate(make(n), args.rollout_steps)
                     for n in args.workers for key, make in paths.items()}
            rl_rounds.append(rates)
            print(f"RL rollouts, round {r + 1}: " + json.dumps({k: round(v) for k, v in rates.items()}), flush=True)
        for n in args.workers:
            row = {"workers": n, "envs_per_worker": k, "rounds": [r[f"local@{n}"] for r in rl_rounds],
                   "local": float(np.median([r[f"local@{n}"] for r in rl_rounds]))}
            if use_ray:
                row["ray"] = float(np.median([r[f"ray@{n}"] for r in rl_rounds]))
                row["ray_over_local_rounds"] = [r[f"ray@{n}"] / r[f"local@{n}"] for r in rl_rounds]
                row["ray_over_local"] = float(np.median(row["ray_over_local_rounds"]))
            rl_rows.append(row)
    if use_ray:
        ray.shutdown()

    replays = None
    if args.replays:
        with tempfile.TemporaryDirectory() as tmp:
            bag = Path(tmp) / "standard"
            write_standard_bag(bag, args.seconds)
            copies = []
            for i in range(args.replays):  # links: the same bytes, one recording each
                (Path(tmp) / f"copy{i}").mkdir()
                for f in bag.iterdir():
                    os.symlink(f, Path(tmp) / f"copy{i}" / f.name)
                copies.append(Path(tmp) / f"copy{i}")
            runs = []
            for _ in range(args.rounds):  # interleaved, like the simulator's rounds
                single, single_wall = replay_rate(copies[:1], Path(tmp) / "one", jobs=1)
                many, many_wall = replay_rate(copies, Path(tmp) / "many", jobs=args.replays)
                runs.append({"one_x_real_time": single, "one_wall_s": single_wall, "parallel_x_real_time": many,
                             "parallel_wall_s": many_wall, "scaling": many / (args.replays * single)})
        replays = {"recordings": args.replays, "recording_s": args.seconds, "rounds": runs,
                   **{k: float(np.median([r[k] for r in runs])) for k in runs[0]}}
        print(json.dumps(replays), flush=True)

    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "cores": os.cpu_count(),
              "env": ENV_ID.split(":")[1], "one_env_steps_per_s": one, "steps": args.steps,
              "vector_step_profile": overhead, "sim": rows, "rounds": rounds,
              "rl_rollout_steps": args.rollout_steps, "rl_rollouts": rl_rows,
              "replay": replays}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n| workers | {args.envs_per_worker} envs each (steps/s, x N one env) | AsyncVectorEnv, 1 env each "
          "| Ray actors |\n|---|---|---|---|")
    for r in rows:
        ray_cell = (f"{r['ray_actors']:.0f} ({r['ray_actors_scaling']:.2f}; {r['ray_over_local']:.2f} x local)"
                    if "ray_actors" in r else "-")
        print(f"| {r['workers']} | {r['workers_x_k']:.0f} ({r['workers_x_k_scaling']:.2f}) | "
              f"{r['async_vector_env']:.0f} ({r['async_vector_env_scaling']:.2f}) | {ray_cell} |")
    if rl_rows:
        print("\n| workers | RL rollouts, local (steps/s) | on Ray | Ray / local |\n|---|---|---|---|")
        for r in rl_rows:
            print(f"| {r['workers']} | {r['local']:.0f} | {r.get('ray', float('nan')):.0f} | "
                  f"{r.get('ray_over_local', float('nan')):.2f} |")
    o = overhead
    print(f"\none vector step of {o['envs_per_worker']} envs: {o['envs_in_process_ms']:.2f} ms stepping them in "
          f"process, {o['through_a_worker_ms']:.2f} ms through a worker ({o['overhead_ms']:.2f} ms round trip, "
          f"{o['bytes_per_step'] / 1e3:.0f} kB back); AsyncVectorEnv: {o['async_vector_env_one_env_ms']:.2f} ms per "
          f"env step vs {o['one_env_ms']:.2f} ms in process ({o['async_overhead_ms']:.2f} ms round trip per env)")
    if replays:
        print(f"\nreplay: one {replays['one_x_real_time']:.2f}x real time; {replays['recordings']} at once "
              f"{replays['parallel_x_real_time']:.2f}x in all = {replays['scaling']:.2f} x {replays['recordings']} x one")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = np.array([r["workers"] for r in rows])
    ax.plot(ns, ns * one, "k--", label="N x one env")
    for key, label in (("workers_x_k", f"workers x {args.envs_per_worker} envs"), ("async_vector_env", "AsyncVectorEnv"),
                       ("ray_actors", "Ray actors")):
        if key in rows[0]:
            ax.plot(ns, [r[key] for r in rows], "o-", label=label)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("env steps/s (all envs)")
    ax.set_title(f"{report['env']}, {report['cores']} cores")
    ax.legend()
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=100)


if __name__ == "__main__":
    main()
