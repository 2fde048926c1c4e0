"""Env workers: groups of K envs in N processes (or Ray actors), behind one Gymnasium VectorEnv.

    envs = WorkerVectorEnv(partial(make_env, cfg, True), workers=2, envs_per_worker=4)
    envs = RayVectorEnv(partial(make_env, cfg, True), workers=14, envs_per_worker=4, address="auto")

gymnasium's AsyncVectorEnv runs one env per process and pays a round trip per env per step; on 2
cores two such workers were slower than one env in one process (docs/BENCHMARKS.md). Here a worker
steps its K envs one after the other (`EnvGroup`, same-step autoreset as SyncVectorEnv), so a round
trip carries K steps, and runs one thread for numpy, torch, OpenCV and ONNX Runtime: N workers on N
cores, not N x cores threads fighting for them. Env i (over all workers) is built by make_env(i)
and reset with seed + i, so the same seed gives the same rollouts as a SyncVectorEnv of the same
N x K envs, locally or on Ray.

Training does not step the workers one step at a time: `rollout` sends the learner's weights once
per update, each worker acts with them on its envs for a whole rollout (rl.ppo.collect_rollout, as
the learner does in process) and sends the rollout back. Stepping by hand (`step`) stays for any
other caller of a Gymnasium VectorEnv.

Per-step info keys that carry sensor payloads (LOCAL_INFO: the simulator's frames and the fused
state, megabytes per step) stay in the worker; every other key comes back as SyncVectorEnv gives it.
A local worker that fails raises WorkerError, naming the worker and its error. A Ray actor that dies
is replaced (a new actor, its envs reset): a rollout is run again on it, a hand-made step raises
WorkerReplaced so that the caller discards what it was collecting; `replaced` counts them.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

log = logging.getLogger(__name__)
LOCAL_INFO = ("frames", "fused")  # per-step sensor payloads of FusionAttn envs: used in the worker only
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerError(RuntimeError):
    """A worker process raised or died."""


class WorkerReplaced(RuntimeError):  # an event the learner handles, not a failure
    """A dead worker was replaced: the rollout in progress is to be discarded. `observations` are all
    envs' current observations, `starts` flags those that begin an episode (the replaced worker's)."""

    def __init__(self, worker: int, observations: np.ndarray, starts: np.ndarray):
        super().__init__(f"env worker {worker} was replaced")
        self.worker, self.observations, self.starts = worker, observations, starts


def _strip(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in LOCAL_INFO}


class EnvGroup:
    """Envs first..first+count-1, stepped in turn: what a worker process or a Ray actor runs."""

    def __init__(self, make_env: Callable[[int], gym.Env], first: int, count: int):
        from fusion_attn.batch import single_threaded

        single_threaded()
        self.first, self.envs = first, [make_env(i) for i in range(first, first + count)]
        self.agent = self.vector = self.carry = None  # the policy and its state, from the first rollout on

    def spaces(self) -> tuple[gym.Space, gym.Space]:
        return self.envs[0].observation_space, self.envs[0].action_space

    def step(self, actions) -> list[tuple]:
        out = []
        for env, action in zip(self.envs, actions):
            obs, reward, terminated, truncated, info = env.step(action)
            infos = [_strip(info)]
            if terminated or truncated:  # same-step autoreset: the final step's obs and info ride along
                infos = [{"final_obs": obs, "final_info": infos[0]}]
                obs, reset_info = env.reset()
                infos.append(_strip(reset_info))
            out.append((obs, float(reward), bool(terminated), bool(truncated), infos))
        return out

    def rollout(self, policy, steps: int, gamma: float, seed: int, iteration: int) -> tuple[dict, dict]:
        """`steps` decisions of each env by the policy (rl.ppo.RolloutPolicy, the learner's weights of this
        update), going on from where the last rollout left the envs and their memories; the first one
        resets env i with seed + i, as the learner's own envs would be. Actions are sampled from this
        worker's seed for (seed, iteration), so a rollout does not depend on where the worker runs.
        -> rl.ppo.collect_rollout's buffers (CPU tensors) and ended episodes."""
        import torch

        from rl.ppo import collect_rollout

        if self.agent is None:
            self.agent = policy.build().eval()
            # SyncVectorEnv over the envs themselves (same-step autoreset, as the learner's)
            self.vector = gym.vector.SyncVectorEnv([lambda env=env: env for env in self.envs],
                                                   autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        self.agent.load_state_dict(policy.weights)
        if self.carry is None:
            obs, _ = self.vector.reset(seed=[seed + 1000 * iteration + self.first + i for i in range(len(self.envs))])
            n = len(self.envs)
            self.carry = (torch.as_tensor(obs, dtype=torch.float32), *self.agent.initial_memory(n),
                          torch.ones(n, dtype=torch.bool))
        torch.manual_seed(int(np.random.SeedSequence([seed, iteration, self.first]).generate_state(1)[0]))
        buffers, self.carry, episodes = collect_rollout(self.agent, self.vector, self.carry, steps, gamma,
                                                        policy.aux_info, policy.aux_size)
        return buffers, episodes

    def reset(self, seeds, options) -> list[tuple]:
        return [(obs, _strip(info)) for obs, info in (env.reset(seed=s, options=options) for env, s in zip(self.envs, seeds))]

    def set_attr(self, name: str, values) -> None:
        for env, value in zip(self.envs, values):
            env.set_wrapper_attr(name, value)

    def call(self, name: str, args, kwargs) -> list:
        results = []
        for env in self.envs:
            attr = env.get_wrapper_attr(name)
            results.append(attr(*args, **kwargs) if callable(attr) else attr)
        return results

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        for env in self.envs:
            env.close()


class _GroupedVectorEnv(gym.vector.VectorEnv):
    """A VectorEnv over EnvGroups; subclasses say how a method runs on every group (`_all`)."""

    metadata: ClassVar[dict] = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, workers: int, envs_per_worker: int):
        if workers < 1 or envs_per_worker < 1:
            raise ValueError(f"workers ({workers}) and envs per worker ({envs_per_worker}) must be at least 1")
        self.num_envs, self.workers, self.per_worker = workers * envs_per_worker, workers, envs_per_worker
        self.closed = False

    def _all(self, method: str, payloads: list[tuple]) -> list:
        raise NotImplementedError

    def _set_spaces(self, spaces: tuple[gym.Space, gym.Space]) -> None:
        self.single_observation_space, self.single_action_space = spaces
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._observations = create_empty_array(self.single_observation_space, self.num_envs)

    def _split(self, values: list) -> list[list]:
        k = self.per_worker
        return [values[w * k:(w + 1) * k] for w in range(self.workers)]

    def _envs_of(self, worker: int) -> str:
        return f"envs {worker * self.per_worker}..{(worker + 1) * self.per_worker - 1}"

    def reset(self, *, seed=None, options=None):
        seeds = ([None] * self.num_envs if seed is None else
                 [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed))
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for {self.num_envs} envs")
        results = [r for part in self._all("reset", [(s, options) for s in self._split(seeds)]) for r in part]
        infos = {}
        for i, (_, info) in enumerate(results):
            infos = self._add_info(infos, info, i)
        self._observations = concatenate(self.single_observation_space, [o for o, _ in results], self._observations)
        return copy.deepcopy(self._observations), infos

    def step(self, actions):
        parts = self._all("step", [(a,) for a in self._split(list(iterate(self.action_space, actions)))])
        results = [r for part in parts for r in part]
        infos = {}
        for i, (*_, env_infos) in enumerate(results):
            for info in env_infos:
                infos = self._add_info(infos, info, i)
        self._observations = concatenate(self.single_observation_space, [r[0] for r in results], self._observations)
        rewards = np.array([r[1] for r in results], np.float64)
        terminated = np.array([r[2] for r in results], np.bool_)
        truncated = np.array([r[3] for r in results], np.bool_)
        return copy.deepcopy(self._observations), rewards, terminated, truncated, infos

    def set_attr(self, name: str, values) -> None:
        """Set a wrapper attribute on every env (one value) or env by env (a list of num_envs values)."""
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        self._all("set_attr", [(name, part) for part in self._split(list(values))])

    def call(self, name: str, *args, **kwargs) -> tuple:
        return tuple(r for part in self._all("call", [(name, args, kwargs)] * self.workers) for r in part)

    def rollout(self, policy, steps: int, gamma: float, seed: int, iteration: int) -> list[tuple[dict, dict]]:
        """EnvGroup.rollout on every worker, in parallel: the workers act, the learner learns."""
        return self._all("rollout", [(policy, steps, gamma, seed, iteration)] * self.workers)


def _serve(conn, make_env: Callable[[int], gym.Env], first: int, count: int) -> None:
    """A worker process: build the group, then run the learner's calls on it until "close"."""
    group = None
    try:
        group = EnvGroup(make_env, first, count)
        conn.send(("ok", group.spaces()))
        while True:
            method, payload = conn.recv()
            if method == "close":
                break
            conn.send(("ok", getattr(group, method)(*payload)))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - any env error: sent to the learner, which raises it with the worker's name
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if group is not None:
            group.close()
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


class WorkerVectorEnv(_GroupedVectorEnv):
    """`workers` spawned processes x `envs_per_worker` envs, env i built by make_env(i) (picklable)."""

    def __init__(self, make_env: Callable[[int], gym.Env], workers: int, envs_per_worker: int):
        super().__init__(workers, envs_per_worker)
        ctx = mp.get_context("spawn")  # a fresh interpreter: no GL context or threads inherited
        self.conns, self.processes = [], []
        with _one_thread_each():
            for w in range(workers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_serve, args=(child, make_env, w * envs_per_worker, envs_per_worker),
                                name=f"env-worker-{w}", daemon=True)
                p.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(p)
        self._set_spaces(self._gather()[0])

    def _all(self, method: str, payloads: list[tuple]) -> list:
        for w, (conn, payload) in enumerate(zip(self.conns, payloads)):
            try:
                conn.send((method, payload))
            except (BrokenPipeError, OSError) as exc:
                self._fail(w, f"cannot be reached ({exc}): it died")
        return self._gather()

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
        raise WorkerError(f"env worker {worker} ({self._envs_of(worker)}) {what}")

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


class RayVectorEnv(_GroupedVectorEnv):
    """`workers` Ray actors (one CPU each, on any node of the cluster) x `envs_per_worker` envs.

    address: "auto" (the cluster `ray start` made on this machine, else a new local instance) or a
    cluster address. An actor that dies is replaced by a new one with the same envs, reset with
    fresh seeds; the call that met it raises WorkerReplaced (a log line; `replaced` counts them).
    """

    def __init__(self, make_env: Callable[[int], gym.Env], workers: int, envs_per_worker: int, address: str = "auto"):
        try:
            import ray
        except ImportError:
            raise ImportError("RL workers on Ray need Ray: pip install 'fusion_attn[ray]'") from None
        super().__init__(workers, envs_per_worker)
        if not ray.is_initialized():
            ray.init(address=None if address == "auto" else address, log_to_driver=False)
        self.ray, self.make_env, self.replaced = ray, make_env, 0
        self.actor_class = ray.remote(num_cpus=1, max_restarts=0)(EnvGroup)
        self.actors = [self._start(w) for w in range(workers)]
        self._set_spaces(ray.get(self.actors[0].spaces.remote()))

    def _start(self, worker: int):
        return self.actor_class.remote(self.make_env, worker * self.per_worker, self.per_worker)

    def _all(self, method: str, payloads: list[tuple]) -> list:
        refs = [getattr(actor, method).remote(*payload) for actor, payload in zip(self.actors, payloads)]
        try:
            return self.ray.get(refs)  # one wait for all: the common case
        except self.ray.exceptions.RayActorError:
            pass
        results, dead = [], []  # which actors died
        for w, ref in enumerate(refs):
            try:
                results.append(self.ray.get(ref))
            except self.ray.exceptions.RayActorError:
                dead.append(w)
                results.append(None)
        for w in dead:
            self._replace(w)
            if method != "step":  # a reset, set_attr or call: run it again on the new actor
                results[w] = self.ray.get(getattr(self.actors[w], method).remote(*payloads[w]))
            else:  # its envs start over, with fresh seeds
                restarted = self.ray.get(self.actors[w].reset.remote([None] * self.per_worker, None))
                results[w] = [(obs, 0.0, False, False, [info]) for obs, info in restarted]
        if method != "step":
            return results
        # The others stepped; the learner discards the rollout in progress and goes on from here.
        obs = concatenate(self.single_observation_space, [r[0] for part in results for r in part], self._observations)
        starts = np.array([w in dead or r[2] or r[3] for w, part in enumerate(results) for r in part])
        raise WorkerReplaced(dead[0], copy.deepcopy(obs), starts)

    def rollout(self, policy, steps: int, gamma: float, seed: int, iteration: int) -> list[tuple[dict, dict]]:
        shared = self.ray.put(policy)  # the weights cross to the object store once, every actor reads them
        return self._all("rollout", [(shared, steps, gamma, seed, iteration)] * self.workers)

    def _replace(self, worker: int) -> None:
        self.replaced += 1
        log.warning("env worker %d (%s) died: replaced by a new actor, its envs reset; the rollout in progress is "
                    "discarded (%d replaced so far)", worker, self._envs_of(worker), self.replaced)
        self.actors[worker] = self._start(worker)

    def close(self, **kwargs) -> None:
        if self.closed:
            return
        self.closed = True
        for actor in self.actors:
            try:
                self.ray.get(actor.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001, S110 - a dead actor has nothing left to close
                pass
            self.ray.kill(actor)
