"""Env workers (rl.workers): the same rollouts and training as envs in the learner's process, and a
failing or dead worker named in a clear error."""

import dataclasses
import functools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rl.config import AgentConfig, PPOConfig
from rl.ppo import make_env, train, vector_env
from rl.workers import WorkerError, WorkerVectorEnv

CUE = PPOConfig(env_id="rl.envs:FusionAttnRL/CueRecall-v0", env_kwargs={"delay": 3}, envs=4, rollout=16, steps=128,
                agent=AgentConfig(kind="gtrxl", memory=4, dim=16, heads=2))


def _rollout(cfg: PPOConfig, steps: int = 30):
    envs = vector_env(cfg)
    try:
        obs, _ = envs.reset(seed=7)
        rng = np.random.default_rng(0)
        seen, rewards, finals, successes = [obs], [], 0, []
        for _ in range(steps):
            obs, reward, _, _, info = envs.step(rng.integers(0, 3, envs.num_envs))
            seen.append(obs)
            rewards.append(reward)
            finals += int(info.get("_final_obs", np.zeros(1, bool)).sum())
            final = info.get("final_info", {})
            successes += final["is_success"][final["_is_success"]].tolist() if "is_success" in final else []
        return np.array(seen), np.array(rewards), finals, successes
    finally:
        envs.close()


def test_workers_give_the_same_rollouts_as_envs_in_process():
    local = _rollout(CUE)
    spread = _rollout(dataclasses.replace(CUE, workers=2))
    assert np.array_equal(local[0], spread[0]) and np.array_equal(local[1], spread[1])
    assert local[2] == spread[2] > 0 and local[3] == spread[3]  # episodes ended, with the same final infos


def test_training_with_workers_is_the_training_in_process(tmp_path):
    """Same seed, same envs: the learner sees the same transitions, so the weights come out identical."""
    train(CUE, tmp_path / "local", progress=False)
    train(dataclasses.replace(CUE, workers=2), tmp_path / "workers", progress=False)
    a, b = load_file(tmp_path / "local" / "agent.safetensors"), load_file(tmp_path / "workers" / "agent.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_that_raises_is_named():
    bad = dataclasses.replace(CUE, env_kwargs={"delay": 0})  # CueRecall refuses it when built
    with pytest.raises(WorkerError, match=r"env worker 0 \(envs 0\.\.1\) raised ConfigError: CueRecall delay 0"):
        WorkerVectorEnv(functools.partial(make_env, bad, True), workers=2, envs_per_worker=2)


def test_a_worker_that_dies_is_named_and_the_others_closed():
    envs = WorkerVectorEnv(functools.partial(make_env, CUE, True), workers=2, envs_per_worker=2)
    envs.reset(seed=0)
    envs.processes[1].kill()
    envs.processes[1].join()
    with pytest.raises(WorkerError, match=r"env worker 1 \(envs 2\.\.3\) (died|cannot be reached)"):
        envs.step(np.zeros(4, np.int64))
    assert envs.closed and not any(p.is_alive() for p in envs.processes)


def _navigate(index: int):
    import gymnasium as gym

    import fusion_attn.sim  # noqa: F401  registers the ids

    return gym.make("FusionAttn/Navigate-v0")


def test_dict_observations_come_back_whole_and_are_not_overwritten():
    """The simulator's own observation (a dict: camera image, lidar, IMU, ages, task) through a worker:
    the arrays of one step are the caller's; the next step does not write into them."""
    envs = WorkerVectorEnv(_navigate, workers=1, envs_per_worker=2)
    try:
        first, _ = envs.reset(seed=0)
        kept = {k: v.copy() for k, v in first.items()}
        for _ in range(3):
            envs.step(envs.action_space.sample())
        assert first.keys() == envs.single_observation_space.keys()
        assert all(np.array_equal(first[k], kept[k]) for k in kept)
        assert first["image"].shape[0] == 2 and first["image"].any()  # rendered frames, one per env
    finally:
        envs.close()


def test_envs_must_split_evenly_over_workers():
    from fusion_attn.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be split evenly over 3 workers"):
        PPOConfig(envs=8, workers=3)


def test_ray_workers_give_the_local_rollouts_and_training(local_ray, tmp_path):
    on_ray = dataclasses.replace(CUE, workers=2, ray="auto")
    local, remote = _rollout(dataclasses.replace(CUE, workers=2)), _rollout(on_ray)
    assert np.array_equal(local[0], remote[0]) and np.array_equal(local[1], remote[1]) and local[3] == remote[3]
    train(CUE, tmp_path / "local", progress=False)
    train(on_ray, tmp_path / "ray", progress=False)
    a, b = load_file(tmp_path / "local" / "agent.safetensors"), load_file(tmp_path / "ray" / "agent.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_ray_worker_is_replaced_and_its_rollout_discarded(local_ray, caplog):
    from rl.workers import RayVectorEnv, WorkerReplaced

    ray = local_ray
    envs = RayVectorEnv(functools.partial(make_env, CUE, True), workers=2, envs_per_worker=2)
    try:
        envs.reset(seed=0)
        old = ray.get(envs.actors[1].pid.remote())
        ray.kill(envs.actors[1], no_restart=True)
        with caplog.at_level("WARNING", logger="rl.workers"), pytest.raises(WorkerReplaced) as replaced:
            envs.step(np.zeros(4, np.int64))
        assert replaced.value.worker == 1 and replaced.value.starts[2:].all() and envs.replaced == 1
        assert "env worker 1 (envs 2..3) died: replaced" in caplog.text
        assert ray.get(envs.actors[1].pid.remote()) != old
        obs, *_ = envs.step(np.zeros(4, np.int64))  # and the new actor steps on
        assert obs.shape == (4, 4)
    finally:
        envs.close()
