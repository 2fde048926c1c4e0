"""Env workers: N processes, each stepping K envs in turn, behind one Gymnasium VectorEnv.

    envs = WorkerVectorEnv(partial(make_env, cfg, True), workers=2, envs_per_worker=4)

gymnasium's AsyncVectorEnv runs one env per process and pays a round trip per env per step; on 2
cores two such workers were slower than one env in one process (docs/BENCHMARKS.md). Here a worker
steps its K envs one after the other (same-step autoreset, as SyncVectorEnv does), so a round trip
carries K steps. Each worker runs one thread for numpy, torch, OpenCV and ONNX Runtime: N workers
on N cores, not N x cores threads fighting for them. Env i (over all workers) is built by
make_env(i) and reset with seed + i, so the same seed gives the same rollouts as a SyncVectorEnv of
the same N x K envs.

Per-step info keys that carry sensor payloads (LOCAL_INFO: the simulator's frames and the fused
state, megabytes per step) stay in the worker; every other key comes back as SyncVectorEnv gives it.
A worker that fails raises WorkerError here, naming the worker and its error; the other workers are
closed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

LOCAL_INFO = ("frames", "fused")  # per-step sensor payloads of FusionAttn envs: used in the worker only
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerError(RuntimeError):
    """A worker process raised or died."""


def _strip(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in LOCAL_INFO}


def _worker(conn, make_env: Callable[[int], gym.Env], first: int, count: int) -> None:
    """Runs in the worker process: build envs first..first+count-1, then answer commands until close."""
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    envs = []
    try:
        envs = [make_env(first + j) for j in range(count)]
        conn.send(("ok", (envs[0].observation_space, envs[0].action_space)))
        while True:
            command, payload = conn.recv()
            if command == "step":
                out = []
                for env, action in zip(envs, payload):
                    obs, reward, terminated, truncated, info = env.step(action)
                    infos = [_strip(info)]
                    if terminated or truncated:  # same-step autoreset: the final step's obs and info ride along
                        infos = [{"final_obs": obs, "final_info": infos[0]}]
                        obs, reset_info = env.reset()
                        infos.append(_strip(reset_info))
                    out.append((obs, float(reward), bool(terminated), bool(truncated), infos))
                conn.send(("ok", out))
            elif command == "reset":
                seeds, options = payload
                conn.send(("ok", [(obs, _strip(info)) for obs, info in
                                  (env.reset(seed=s, options=options) for env, s in zip(envs, seeds))]))
            elif command == "set_attr":
                name, values = payload
                for env, value in zip(envs, values):
                    env.set_wrapper_attr(name, value)
                conn.send(("ok", None))
            elif command == "call":
                name, args, kwargs = payload
                results = []
                for env in envs:
                    attr = env.get_wrapper_attr(name)
                    results.append(attr(*args, **kwargs) if callable(attr) else attr)
                conn.send(("ok", results))
            elif command == "close":
                break
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - any env error: sent to the learner, which raises it with the worker's name
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        for env in envs:
            env.close()
        conn.close()


@contextmanager
def _one_thread_each():
    """Spawned workers inherit the environment: one BLAS/OpenMP thread each, set before they import."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class WorkerVectorEnv(gym.vector.VectorEnv):
    """`workers` processes x `envs_per_worker` envs, env i built by make_env(i) (a picklable callable).
    Same-step autoreset: an episode's last step returns the next episode's first observation, with
    info["final_obs"] and info["final_info"] for the one that ended (as SyncVectorEnv SAME_STEP)."""

    metadata: ClassVar[dict] = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, make_env: Callable[[int], gym.Env], workers: int, envs_per_worker: int, context: str = "spawn"):
        if workers < 1 or envs_per_worker < 1:
            raise ValueError(f"workers ({workers}) and envs per worker ({envs_per_worker}) must be at least 1")
        self.num_envs = workers * envs_per_worker
        self.per_worker = envs_per_worker
        self.closed = False
        ctx = mp.get_context(context)  # spawn: a fresh interpreter, no GL context or threads inherited
        self.conns, self.processes = [], []
        with _one_thread_each():
            for w in range(workers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, make_env, w * envs_per_worker, envs_per_worker),
                                name=f"env-worker-{w}", daemon=True)
                p.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(p)
        spaces = self._gather()
        self.single_observation_space, self.single_action_space = spaces[0]
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._observations = create_empty_array(self.single_observation_space, self.num_envs)

    def _send(self, command: str, payloads: list) -> None:
        for w, (conn, payload) in enumerate(zip(self.conns, payloads)):
            try:
                conn.send((command, payload))
            except (BrokenPipeError, OSError) as exc:
                self._fail(w, f"cannot be reached ({exc}): it died")

    def _gather(self) -> list:
        results = []
        for w, conn in enumerate(self.conns):
            try:
                status, payload = conn.recv()
            except (EOFError, OSError):
                self.processes[w].join(timeout=5)
                self._fail(w, f"died (exit code {self.processes[w].exitcode})")
            if status != "ok":
                self._fail(w, f"raised {payload}")
            results.append(payload)
        return results

    def _fail(self, worker: int, what: str):
        self.close(terminate=True)
        first = worker * self.per_worker
        raise WorkerError(f"env worker {worker} (envs {first}..{first + self.per_worker - 1}) {what}")

    def _split(self, values: list) -> list[list]:
        k = self.per_worker
        return [values[w * k:(w + 1) * k] for w in range(len(self.conns))]

    def reset(self, *, seed=None, options=None):
        seeds = [None] * self.num_envs if seed is None else [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for {self.num_envs} envs")
        self._send("reset", [(s, options) for s in self._split(seeds)])
        results = [r for part in self._gather() for r in part]
        infos = {}
        for i, (_, info) in enumerate(results):
            infos = self._add_info(infos, info, i)
        self._observations = concatenate(self.single_observation_space, [o for o, _ in results], self._observations)
        return self._observations.copy(), infos

    def step(self, actions):
        self._send("step", self._split(list(iterate(self.action_space, actions))))
        results = [r for part in self._gather() for r in part]
        infos = {}
        for i, (*_, parts) in enumerate(results):
            for info in parts:
                infos = self._add_info(infos, info, i)
        self._observations = concatenate(self.single_observation_space, [r[0] for r in results], self._observations)
        rewards = np.array([r[1] for r in results], np.float64)
        terminated = np.array([r[2] for r in results], np.bool_)
        truncated = np.array([r[3] for r in results], np.bool_)
        return self._observations.copy(), rewards, terminated, truncated, infos

    def set_attr(self, name: str, values) -> None:
        """Set a wrapper attribute on every env (one value) or env by env (a list of num_envs values)."""
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        self._send("set_attr", [(name, part) for part in self._split(list(values))])
        self._gather()

    def call(self, name: str, *args, **kwargs) -> tuple:
        self._send("call", [(name, args, kwargs)] * len(self.conns))
        return tuple(r for part in self._gather() for r in part)

    def close(self, terminate: bool = False, **kwargs) -> None:
        if self.closed:
            return
        self.closed = True
        for conn, p in zip(self.conns, self.processes):
            if not terminate and p.is_alive():
                try:
                    conn.send(("close", None))
                except (BrokenPipeError, OSError):
                    pass
        for conn, p in zip(self.conns, self.processes):
            p.join(timeout=1 if terminate else 30)
            if p.is_alive():
                p.terminate()
                p.join()
            conn.close()
