"""Simulator throughput (issue #5): env steps per second, one env and a 2-worker AsyncVectorEnv.

    python benchmarks/sim_throughput.py [--steps 3000] [--out benchmarks/results/sim_throughput.json]

Standard configuration: FusionAttn/Navigate-v0 (10 x 10 m, 14 obstacles) with its faults off, every
sensor on (camera 64x64 at 10 Hz, lidar 2 x 180 beams at 10 Hz, IMU 200 Hz), control 50 Hz,
physics 200 Hz, random actions, episodes reset as they end (resets are included in the rate).
The cost of each sensor is measured twice: the whole env with that sensor off (the time per step
it saves), and its capture call alone (time per call x calls per step). Prints markdown tables and
writes the raw report. Exit status 1 when one env makes fewer than 500 steps/s (the issue's target).
"""

import argparse
import dataclasses
import datetime
import json
import os
import time
from importlib.metadata import version
from pathlib import Path

import gymnasium as gym
import numpy as np

import fusion_attn.sim  # noqa: F401  (registers the ids and selects headless rendering before mujoco loads)
from fusion_attn.bench import machine
from fusion_attn.sim.faults import FaultConfig
from fusion_attn.sim.sensors import Camera, Imu, Lidar, SensorConfig

ENV_ID = "fusion_attn.sim:FusionAttn/Navigate-v0"  # "module:id": a spawned worker imports fusion_attn.sim first
TARGET_STEPS_PER_S = 500.0
SENSORS = ("camera", "lidar", "imu")


def make(sensors: SensorConfig | None = None) -> gym.Env:
    return gym.make(ENV_ID, sensors=sensors, faults=FaultConfig())


def steps_per_s(env: gym.Env, steps: int) -> float:
    env.reset(seed=0)
    env.action_space.seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        *_, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def vector_steps_per_s(envs: gym.vector.VectorEnv, steps: int) -> float:
    """Env steps (all sub-envs together) per second of a vector env; it resets finished envs itself."""
    envs.reset(seed=0)
    envs.action_space.seed(0)
    n = envs.num_envs
    start = time.perf_counter()
    for _ in range(steps // n):
        envs.step(envs.action_space.sample())
    rate = (steps // n) * n / (time.perf_counter() - start)
    envs.close()
    return rate


def capture_us(env: gym.Env, repeats: int) -> dict[str, float]:
    """Microseconds per capture call of each sensor, on the env's current model and state."""
    model, data, cfg = env.unwrapped.model, env.unwrapped.data, env.unwrapped.sensors
    rng = np.random.default_rng(0)
    out = {}
    camera = Camera(cfg)
    camera.bind(model)
    sensors = {"camera": camera, "lidar": Lidar(model, cfg, rng), "imu": Imu(model, cfg, rng)}
    for name, sensor in sensors.items():
        sensor.capture(data, 0)
        start = time.perf_counter()
        for _ in range(repeats):
            sensor.capture(data, 0)
        out[name] = (time.perf_counter() - start) / repeats * 1e6
    camera.close()
    return out


def reset_ms(repeats: int) -> float:
    env = make()
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(repeats):
        env.reset()
    env.close()
    return (time.perf_counter() - start) / repeats * 1e3


def gl_renderer() -> str:
    """The OpenGL implementation the camera renders with (llvmpipe: Mesa on the CPU)."""
    env = make()
    env.reset(seed=0)  # makes the camera's GL context current on this thread
    from OpenGL import GL

    name = GL.glGetString(GL.GL_RENDERER).decode()
    env.close()
    return name


def fused_steps_per_s(steps: int) -> float:
    from fusion_attn.sim.wrappers import FusedObservation

    return steps_per_s(FusedObservation(make()), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="env steps per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sim_throughput.json")
    args = parser.parse_args()

    base = SensorConfig()
    off = {name: {f"{name}_hz": 0.0} for name in SENSORS}
    configs = {"all sensors": base}
    configs |= {f"{name} off": dataclasses.replace(base, **off[name]) for name in SENSORS}
    configs["no sensors"] = dataclasses.replace(base, **off["camera"], **off["lidar"], **off["imu"])
    single = {name: steps_per_s(make(cfg), args.steps) for name, cfg in configs.items()}
    vector = {"AsyncVectorEnv, 2 workers (total)": lambda: gym.vector.AsyncVectorEnv([make] * 2, context="spawn"),
              "SyncVectorEnv, 2 envs in one process (total)": lambda: gym.vector.SyncVectorEnv([make] * 2)}
    vector = {name: vector_steps_per_s(create(), args.steps * 2) for name, create in vector.items()}
    fused = fused_steps_per_s(args.steps // 4)
    probe = make()
    probe.reset(seed=0)
    per_call = capture_us(probe, 200)
    probe.close()
    per_step_calls = {name: getattr(base, f"{name}_hz") / 50.0 for name in SENSORS}
    ms_all = 1e3 / single["all sensors"]
    sensors = {name: {"saved_ms_per_step_when_off": ms_all - 1e3 / single[f"{name} off"],
                      "capture_us_per_call": per_call[name], "calls_per_step": per_step_calls[name],
                      "capture_ms_per_step": per_call[name] * per_step_calls[name] / 1e3}
               for name in SENSORS}
    report = {"date": datetime.date.today().isoformat(),
              "machine": f"{machine()}, mujoco {version('mujoco')}, gymnasium {gym.__version__}",
              "rendering": f"MUJOCO_GL={os.environ['MUJOCO_GL']}, {gl_renderer()}",
              "config": {"env": ENV_ID.split(":")[1], "faults": "off", "control_hz": 50, "physics_hz": 200,
                         "sensors": dataclasses.asdict(base)},
              "steps_per_measurement": args.steps,
              "steps_per_s": {"one env, " + k: v for k, v in single.items()}
              | vector | {"one env + FusedObservation (ORT, 1 thread)": fused},
              "sensors": sensors, "reset_ms": reset_ms(20)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"date: {report['date']}\nmachine: {report['machine']}\nrendering: {report['rendering']}\n")
    print("| configuration | env steps/s | ms per step |\n|---|---|---|")
    for name, rate in report["steps_per_s"].items():
        print(f"| {name} | {rate:.0f} | {1e3 / rate:.3f} |")
    print("\n| sensor | rate | capture per call | calls per step | capture ms/step | ms/step saved if off |")
    print("|---|---|---|---|---|---|")
    for name, s in sensors.items():
        hz = per_step_calls[name] * 50.0
        print(f"| {name} | {hz:.0f} Hz | {s['capture_us_per_call']:.0f} us | {s['calls_per_step']:.1f} | "
              f"{s['capture_ms_per_step']:.3f} | {s['saved_ms_per_step_when_off']:.3f} |")
    print(f"\nreset (new arena: MJCF compile, render context, sensors): {report['reset_ms']:.1f} ms")
    met = single["all sensors"] >= TARGET_STEPS_PER_S
    print(f"{'met' if met else 'MISSED'}: at least {TARGET_STEPS_PER_S:.0f} env steps/s per core (one env)")
    raise SystemExit(0 if met else 1)


if __name__ == "__main__":
    main()
