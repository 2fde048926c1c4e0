"""Env workers (rl.workers): the same rollouts and training as envs in the learner's process, and a
failing or dead worker named in a clear error."""

import dataclasses
import functools
import time

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


def _policy(envs, seed=0):
    from rl.agent import ActorCritic
    from rl.ppo import RolloutPolicy

    build = functools.partial(ActorCritic, envs.single_observation_space.shape[0], envs.single_action_space, CUE.agent)
    torch.manual_seed(seed)
    return RolloutPolicy(build, build().state_dict())


def test_workers_act_as_the_learner_would():
    """Each worker runs the policy on its envs: what it returns is what the learner needs to learn from
    -- its observations are the in-process envs' (same seeds), and the learner's agent, given the
    stored observations, memories and masks, gives back the recorded log-probabilities and values."""
    envs = WorkerVectorEnv(functools.partial(make_env, CUE, True), workers=2, envs_per_worker=2)
    try:
        policy = _policy(envs)
        first = envs.rollout(policy, 10, CUE.gamma, 5, 0)
        again = envs.rollout(policy, 10, CUE.gamma, 5, 1)  # goes on from where the first left its envs
    finally:
        envs.close()
    in_process = vector_env(CUE)
    reset_obs, _ = in_process.reset(seed=5)
    in_process.close()
    agent = policy.build().eval()
    agent.load_state_dict(policy.weights)
    for parts in (first, again):
        r = {k: torch.cat([p[0][k] for p in parts], dim=0 if k == "next_value" else 1) for k in parts[0][0]}
        assert r["obs"].shape[:2] == (10, 4) and r["mem"].shape[:2] == (10, 4)
        with torch.no_grad():
            head, value, *_ = agent.step(r["obs"].flatten(0, 1), r["mem"].flatten(0, 1), r["mask"].flatten(0, 1))
            logp = agent.log_prob(agent.distribution(head), r["act"].flatten(0, 1))
        assert torch.allclose(logp, r["logp"].flatten(), atol=1e-5) and torch.allclose(value, r["val"].flatten(), atol=1e-5)
        assert r["done"].any()  # episodes ended inside the rollout: memories were reset there
    assert np.array_equal(torch.cat([p[0]["obs"][0] for p in first]).numpy(), reset_obs)
    starts_memory = [torch.cat([p[0]["mask"][0] for p in parts]).any() for parts in (first, again)]
    assert starts_memory == [False, True]  # the second went on with the first's memories


@pytest.fixture(scope="module")
def trained_with_workers(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The agent's weights after training CUE with two env workers (the run the tests below compare with)."""
    out = tmp_path_factory.mktemp("workers")
    train(dataclasses.replace(CUE, workers=2), out, progress=False)
    return load_file(out / "agent.safetensors")


def test_training_with_workers_is_reproducible(tmp_path, trained_with_workers):
    """Actions are sampled from each worker's seed for the update: the same seed trains the same weights."""
    train(dataclasses.replace(CUE, workers=2), tmp_path / "again", progress=False)
    a, b = trained_with_workers, load_file(tmp_path / "again" / "agent.safetensors")
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


def test_ray_workers_give_the_local_rollouts_and_training(local_ray, tmp_path, trained_with_workers):
    on_ray = dataclasses.replace(CUE, workers=2, ray="auto")
    local, remote = _rollout(dataclasses.replace(CUE, workers=2)), _rollout(on_ray)
    assert np.array_equal(local[0], remote[0]) and np.array_equal(local[1], remote[1]) and local[3] == remote[3]
    train(on_ray, tmp_path / "ray", progress=False)
    a, b = trained_with_workers, load_file(tmp_path / "ray" / "agent.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()
    assert '"workers_replaced": 0' in rows[-1] and '"steps_discarded": 0' in rows[-1]


def _kill(ray, actor) -> None:
    """ray.kill, then wait until the actor is dead: the kill is asynchronous, and a call served before it
    lands would find the worker alive."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers after 30 s")


def test_a_killed_ray_worker_is_replaced_and_its_rollout_run_again(local_ray, caplog):
    from rl.workers import RayVectorEnv

    ray = local_ray
    envs = RayVectorEnv(functools.partial(make_env, CUE, True), workers=2, envs_per_worker=2)
    try:
        policy = _policy(envs)
        envs.rollout(policy, 6, CUE.gamma, 0, 0)  # episodes are 4 steps: the envs stop mid-episode
        old = ray.get(envs.actors[1].pid.remote())
        _kill(ray, envs.actors[1])
        with caplog.at_level("WARNING", logger="rl.workers"):
            parts = envs.rollout(policy, 8, CUE.gamma, 0, 1)
        assert envs.replaced == 1 and "env worker 1 (envs 2..3) died: replaced" in caplog.text
        assert ray.get(envs.actors[1].pid.remote()) != old
        assert [p[0]["obs"].shape for p in parts] == [(8, 2, 4)] * 2  # a whole rollout from the new actor too
        # the survivor went on with its memories; the new actor's envs started over, with none
        assert parts[0][0]["mask"][0].any() and not parts[1][0]["mask"][0].any()
    finally:
        envs.close()


def test_a_killed_ray_worker_stepped_by_hand_is_replaced_and_the_step_flagged(local_ray, caplog):
    """Stepped through the VectorEnv interface (a loop of the caller's own), a dead actor's envs start
    over and WorkerReplaced tells the caller."""
    from rl.workers import RayVectorEnv, WorkerReplaced

    ray = local_ray
    envs = RayVectorEnv(functools.partial(make_env, CUE, True), workers=2, envs_per_worker=2)
    try:
        envs.reset(seed=0)
        _kill(ray, envs.actors[1])
        with caplog.at_level("WARNING", logger="rl.workers"), pytest.raises(WorkerReplaced) as replaced:
            envs.step(np.zeros(4, np.int64))
        assert replaced.value.worker == 1 and replaced.value.starts[2:].all() and envs.replaced == 1
        obs, *_ = envs.step(np.zeros(4, np.int64))  # and the new actor steps on
        assert obs.shape == (4, 4)
    finally:
        envs.close()
