"""The attention-memory agent and its PPO harness: memory semantics, training, resume, export, evaluation."""

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnxruntime as ort
import pytest
import torch

import rl.envs  # noqa: F401  registers FusionAttnRL/CueRecall-v0
from fusion_attn.contract import CONTRACT_KEY, ObservationLayout, PolicyContract
from fusion_attn.errors import CheckpointError, ConfigError
from rl.__main__ import main as rl_main
from rl.agent import ActorCritic, AgentConfig, GRUGate, reset_memory
from rl.evaluate import EVAL_FAULTS, attention_entropy, evaluate
from rl.export import export_policy
from rl.ppo import PPOConfig, advantage_estimate, info_entry, load_agent, save_agent, train

SPACE = gym.spaces.Discrete(3)
CUE = "FusionAttnRL/CueRecall-v0"  # rl/envs.py


def _agent(**kw) -> ActorCritic:
    torch.manual_seed(0)
    return ActorCritic(5, SPACE, AgentConfig(dim=16, heads=2, memory=4, **kw)).eval()


def test_gates_start_near_identity():
    gate = GRUGate(16, bias=2.0)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    moved = (gate(x, y) - x).norm() / x.norm()
    assert moved < 0.35  # ~12% of the new value passes at init
    assert (GRUGate(16, bias=-2.0)(x, y) - x).norm() / x.norm() > moved  # and the bias is what does it


def test_memory_shifts_in_the_layer_inputs_and_fills_the_mask():
    agent = _agent()
    memory, mask = agent.initial_memory(2)
    assert memory.shape == (2, 2, 4, 16) and not mask.any()
    obs = torch.randn(3, 2, 5)
    for t in range(3):
        _, _, new_memory, new_mask, att = agent.step(obs[t], memory, mask)
        assert torch.equal(new_memory[:, :, :-1], memory[:, :, 1:])  # oldest slot dropped
        assert torch.equal(new_memory[:, 0, -1], agent.embed(obs[t]))  # layer 0 saw the embedded obs
        memory, mask = new_memory, new_mask
    assert mask.tolist() == [[False, True, True, True]] * 2
    assert torch.allclose(att.sum(-1), torch.ones(2)) and att.shape == (2, 5)


def test_episode_start_masks_the_past_exactly():
    """An env whose episode starts acts exactly as with a fresh memory, whatever it remembered."""
    agent = _agent()
    memory, mask = agent.initial_memory(2)
    for _ in range(4):
        _, _, memory, mask, _ = agent.step(torch.randn(2, 5), memory, mask)
    mask = reset_memory(mask, torch.tensor([True, False]))
    obs = torch.randn(2, 5)
    head, value, *_, att = agent.step(obs, memory, mask)
    fresh = agent.step(obs[:1], *agent.initial_memory(1))
    assert torch.allclose(head[0], fresh[0][0], atol=1e-6) and torch.allclose(value[0], fresh[1][0], atol=1e-6)
    assert att[0, :-1].sum() == 0 and att[1, :-1].sum() > 0  # only the continuing env looks back


def test_mlp_agent_has_no_memory():
    agent = _agent(kind="mlp")
    memory, mask = agent.initial_memory(3)
    assert memory.shape == (3, 0, 4, 16)
    head, value, *_ = agent.step(torch.randn(3, 5), memory, mask)
    assert head.shape == (3, 3) and value.shape == (3,)


@pytest.mark.parametrize("kind, slots", [("lstm", 2), ("gru", 1)])
def test_recurrent_agents_unroll_as_they_step_and_restart_at_episode_starts(kind, slots):
    """PPO trains LSTM / GRU agents on whole sequences (`unroll`): exactly what `step` gives step by step,
    with the state zeroed where an episode starts, so a new episode acts as with a fresh memory."""
    agent = _agent(kind=kind)
    memory, mask = agent.initial_memory(3)
    assert memory.shape == (3, 2, slots, 16) and mask.shape == (3, 1) and not mask.any()
    memory = torch.randn_like(memory)  # a state carried over from the previous rollout
    T, obs = 10, torch.randn(10, 3, 5)
    masks = torch.ones(T, 3, 1, dtype=torch.bool)
    masks[0, 0] = masks[4, 1] = masks[7, 2] = False  # episode starts
    heads, values = agent.heads(agent.unroll(obs, memory, masks))
    stepped, state = [], memory
    for t in range(T):
        head, value, state, next_mask, attention = agent.step(obs[t], state, masks[t])
        stepped.append((head, value))
        assert next_mask.all() and attention.shape == (3, 1)
    assert torch.allclose(heads, torch.cat([h for h, _ in stepped]), atol=1e-6)
    assert torch.allclose(values, torch.cat([v for _, v in stepped]), atol=1e-6)
    fresh = agent.step(obs[4, 1:2], *agent.initial_memory(1))  # env 1 restarted at step 4
    assert torch.allclose(stepped[4][0][1], fresh[0][0], atol=1e-6)
    assert not torch.allclose(stepped[3][0][1], agent.step(obs[3, 1:2], *agent.initial_memory(1))[0][0])


class DictObservation(gym.ObservationWrapper):
    """Pendulum's observation split into a Dict, to train on a Dict-observation, Box-action env."""

    def __init__(self, env):
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high
        self.observation_space = gym.spaces.Dict({"angle": gym.spaces.Box(low[:2], high[:2]),
                                                  "speed": gym.spaces.Box(low[2:], high[2:])})

    def observation(self, obs):
        return {"angle": obs[:2], "speed": obs[2:]}


gym.register("test/DictPendulum-v0", entry_point=lambda: DictObservation(gym.make("Pendulum-v1")), max_episode_steps=200)


def test_continuous_actions_and_dict_observations(tmp_path):
    """Any Box/Dict-observation, Discrete/Box-action env: a Box-action task with a Dict observation."""
    cfg = PPOConfig(env_id="test/DictPendulum-v0", steps=256, envs=2, rollout=64,
                    agent=AgentConfig(dim=16, heads=2, memory=4))
    row = train(cfg, tmp_path / "pend", progress=False)
    assert row["global_step"] == 256 and np.isfinite(row["value_loss"])
    agent, meta = load_agent(tmp_path / "pend" / "agent.safetensors")
    assert meta["action_space"]["type"] == "box" and agent.log_std is not None


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "cartpole"
    cfg = PPOConfig(env_id="CartPole-v1", steps=8192, envs=4, rollout=128, seed=3,
                    agent=AgentConfig(dim=32, heads=2, memory=8))
    row = train(cfg, out, progress=False)
    return cfg, out, row


def test_training_learns_and_logs(cartpole_run):
    _, out, row = cartpole_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[-1] == row and row["global_step"] == 8192
    assert rows[-1]["episode_return"] > 1.5 * rows[0]["episode_return"]  # random CartPole lasts ~22 steps
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG" and (out / "curve.png").stat().st_size > 5000


def test_resume_continues_where_it_stopped(cartpole_run, tmp_path):
    cfg, _, _ = cartpole_run
    half = tmp_path / "half"
    train(PPOConfig(**{**cfg.__dict__, "steps": 2048}), half, progress=False)
    state = torch.load(half / "train_state.pt", weights_only=True)
    assert state["iteration"] == 4 and state["global_step"] == 2048
    with pytest.raises(ConfigError, match=r"another configuration \(lr 0.0003, now 0.001\)"):
        train(dataclasses.replace(cfg, lr=1e-3), half, resume=True, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(cfg, tmp_path / "bad", resume=True, progress=False)


def test_corrupt_agent_checkpoint_is_refused(tmp_path, cartpole_run):
    _, out, _ = cartpole_run
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((out / "agent.safetensors").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_agent(cut)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(out / "agent.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(out / "agent.safetensors")
    name = next(iter(tensors))
    save_file({**tensors, name: torch.full_like(tensors[name], float("nan"))}, tmp_path / "nan.safetensors", meta)
    with pytest.raises(CheckpointError, match=f"{name}.* hold NaN or inf"):
        load_agent(tmp_path / "nan.safetensors")
    bogus = json.loads(meta["meta"])
    bogus["config"]["agent"]["kind"] = "bogus"
    save_file(tensors, tmp_path / "kind.safetensors", {**meta, "meta": json.dumps(bogus)})
    with pytest.raises(CheckpointError, match="agent metadata is invalid: agent kind 'bogus'"):
        load_agent(tmp_path / "kind.safetensors")


def test_export_keeps_memory_explicit_and_matches_torch(cartpole_run, tmp_path):
    _, out, _ = cartpole_run
    path, diff = export_policy(out / "agent.safetensors", tmp_path / "policy.onnx")
    assert diff < 1e-4
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["obs", "memory", "memory_mask"]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["fusion_attn.rl"])
    assert meta["config"]["env_id"] == "CartPole-v1"


def test_a_run_folder_is_trained_into_once_unless_resumed_or_overwritten(tmp_path, capsys):
    """Training again into a run's folder would overwrite its agent and append a second curve: refused
    unless --overwrite (which starts over). --resume of a finished run reports its last row, and a
    larger --steps extends it."""
    run = tmp_path / "run"
    small = ["train", "CartPole-v1", "-o", str(run), "--envs", "2", "--rollout", "32", "--no-progress"]

    def steps():
        return [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rl_main([*small, "--steps", "128"]) == 0
    capsys.readouterr()
    assert rl_main([*small, "--steps", "128"]) == 2
    assert "already holds a run" in capsys.readouterr().err and steps() == [64, 128]
    assert rl_main([*small, "--steps", "128", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["last"]["global_step"] == 128
    assert rl_main([*small, "--steps", "256", "--resume"]) == 0
    assert steps() == [64, 128, 192, 256] and json.loads((run / "config.json").read_text())["steps"] == 256
    assert rl_main([*small, "--steps", "64", "--overwrite"]) == 0
    assert steps() == [64] and load_agent(run / "agent.safetensors")[1]["global_step"] == 64


def test_action_repeat_applies_to_fusion_envs_only(capsys):
    """Only the FusionAttn envs repeat actions: elsewhere a repeat is refused, not silently ignored, and the
    saved config records the 1 that was used (older runs recorded an unused 5)."""
    assert PPOConfig().action_repeat == 5 and PPOConfig(env_id="CartPole-v1").action_repeat == 1
    with pytest.raises(ConfigError, match="only FusionAttn envs repeat actions"):
        PPOConfig(env_id="CartPole-v1", action_repeat=5)
    assert PPOConfig.from_dict({"env_id": "CartPole-v1", "action_repeat": 5}).action_repeat == 1
    assert rl_main(["train", "CartPole-v1", "-o", "unused", "--action-repeat", "3"]) == 2
    assert "only FusionAttn envs repeat actions" in capsys.readouterr().err


def test_cli_trains_exports_and_evaluates_a_recurrent_agent(tmp_path, capsys):
    """`--agent lstm`: the same PPO, export (its hidden and cell state are the memory) and evaluation."""
    run = tmp_path / "lstm"
    assert rl_main(["train", "CartPole-v1", "-o", str(run), "--agent", "lstm", "--steps", "256", "--envs", "2",
                    "--rollout", "64", "--no-progress"]) == 0
    agent, meta = load_agent(run / "agent.safetensors")
    assert meta["config"]["agent"]["kind"] == "lstm" and agent.recurrent
    path, diff = export_policy(run / "agent.safetensors", tmp_path / "lstm.onnx")
    assert diff < 1e-4
    session = ort.InferenceSession(str(path))
    assert [i.shape[1:] for i in session.get_inputs()] == [[4], [2, 2, 64], [1]]  # obs, (h, c) per layer, mask
    capsys.readouterr()
    assert rl_main(["evaluate", str(run / "agent.safetensors"), "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 2


def test_memory_benchmark_compares_its_baselines_on_any_env(tmp_path):
    """benchmarks/rl_memory_task.py on an env that is not the project's: RecurrentPPO's LSTM no longer gets
    the memory task's options (it crashed), our GRU runs in the same harness, and what the env lacks
    (success, sensor faults) is null."""
    pytest.importorskip("sb3_contrib")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "benchmarks/rl_memory_task.py", "--env", "CartPole-v1", "--steps", "1024",
                           "--seeds", "0", "--agents", "ppo-gru", "lstm", "--episodes", "1", "--runs", str(tmp_path / "runs"),
                           "--out", str(out), "--figure", str(tmp_path / "curves.png")],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    targets = json.loads(out.read_text())["targets"]
    assert set(targets) == {"ppo-gru", "lstm"}
    assert all(t["success_faults"] is None and t["return_clean"] > 0 for t in targets.values())


def test_cli_evaluate_writes_results_and_attention_plot(cartpole_run, tmp_path, capsys):
    _, out, _ = cartpole_run
    assert rl_main(["evaluate", str(out / "agent.safetensors"), "--episodes", "3", "-o", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "eval.json").read_text())["summary"]
    assert summary["episodes"] == 3 and summary["return_mean"] > 20
    assert (tmp_path / "ev" / "attention.png").stat().st_size > 1000
    assert rl_main(["evaluate", str(tmp_path / "missing.safetensors")]) == 2


def test_evaluate_reports_only_what_the_env_and_the_agent_have(cartpole_run, tmp_path, capsys):
    """CartPole has no success signal and no sensor faults: no success rate, and --faults is refused. An
    env that reports success (CueRecall) gets its rate; an agent without attention no attention plot."""
    _, out, _ = cartpole_run
    assert rl_main(["evaluate", str(out / "agent.safetensors"), "--episodes", "2", "--faults"]) == 2
    assert "no sensor faults" in capsys.readouterr().err
    assert rl_main(["evaluate", str(out / "agent.safetensors"), "--episodes", "2"]) == 0
    assert "success_rate" not in json.loads(capsys.readouterr().out)
    run = tmp_path / "cue"
    train(PPOConfig(env_id=CUE, steps=64, envs=2, rollout=32, agent=AgentConfig(kind="mlp", dim=16)),
          run, progress=False)
    summary = evaluate(run / "agent.safetensors", 3, out=tmp_path / "ev")
    assert 0 <= summary["success_rate"] <= 1 and "attention_entropy_mean" not in summary
    assert [p.name for p in (tmp_path / "ev").iterdir()] == ["eval.json"]


def test_evaluate_with_faults_gives_the_success_per_fault(tmp_path, monkeypatch):
    """A FusionAttn agent evaluated with --faults: one fault per episode in turn, each fault's success rate
    beside the overall one. The episodes are real; whether one succeeded is set here per fault (a briefly
    trained agent would fail them all alike), so a success counted under the wrong fault shows."""
    import rl.evaluate

    run = tmp_path / "memory"
    train(PPOConfig(env_id="FusionAttn/Memory-Discrete-v0", steps=32, envs=1, rollout=16, agent=AgentConfig(memory=4)),
          run, progress=False)
    real_episode = rl.evaluate.run_episode

    def succeeds_without_lidar(agent, env, seed, faults, record=False):  # faults: the episode's reset options
        return dict(real_episode(agent, env, seed, faults, record), success=bool(faults) and "lidar_dropout" in faults["faults"])

    monkeypatch.setattr(rl.evaluate, "run_episode", succeeds_without_lidar)
    summary = evaluate(run / "agent.safetensors", 2 * len(EVAL_FAULTS), faults=True)
    assert summary["success_by_fault"] == {f: float(f == "lidar_dropout") for f in EVAL_FAULTS}
    assert summary["success_rate"] == pytest.approx(1 / len(EVAL_FAULTS))
    assert "success_by_fault" not in evaluate(run / "agent.safetensors", 1)
    # the memory task: the zone each robot entered, by the zone cued (None where it entered neither)
    from fusion_attn.sim.scene import TASK_COLOURS

    reached = summary["reached_by_cue"]
    assert set(reached) <= set(TASK_COLOURS) and sum(sum(c.values()) for c in reached.values()) == 2 * len(EVAL_FAULTS)
    assert all(set(c) <= {*TASK_COLOURS, "None"} for c in reached.values())


def test_attention_entropy_bounds():
    k = 9
    assert np.allclose(attention_entropy(np.full((2, k), 1 / k)), np.log(k))
    assert np.allclose(attention_entropy(np.eye(k)[:2]), 0.0, atol=1e-9)


def test_fused_observation_carries_the_task_and_its_contract(tmp_path):
    """The FusionAttn envs are observed through the fusion pipeline plus the task's own observation, and
    a policy trained on them records the fusion it saw."""
    from rl.ppo import make_env, policy_contract

    cfg = PPOConfig(env_id="FusionAttn/Control-Discrete-v0")
    env = make_env(cfg)
    try:
        obs, _ = env.reset(seed=0)
        contract = policy_contract(env, cfg)
        assert obs.shape == (64 + 3 + 4,) and contract.observation == ObservationLayout(64, True, 4)
        assert contract.fusion_heads == 4 and contract.decision_period_s == pytest.approx(0.1)
        assert contract.actions[1] == (0.8, 0.0) and len(contract.actions) == env.action_space.n
        assert contract.fusion["weights_digest"] == env.get_wrapper_attr("pipeline").weights_digest
        assert PolicyContract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract  # survives JSON
        env.get_wrapper_attr("pipeline").set_tau([0.5, 1, 1, 1])  # the fusion's τ changed after training
        assert contract.mismatches(env.get_wrapper_attr("fusion_terms")) == ["tau.global 0.5, the policy was trained with 1.0"]
        obs, *_ = env.step(1)
        assert np.all(np.isfinite(obs)) and abs(obs[64:67].sum() - 1.0) < 1e-4  # attention mass sums to 1
    finally:
        env.close()
    # fused on each lidar sweep instead (a model trained with --trigger lidar): other instants, another contract
    lidar = make_env(dataclasses.replace(cfg, fusion_trigger="lidar"))
    try:
        lidar.reset(seed=0)
        fused = [lidar.step(1)[-1]["fused"] for _ in range(10)]
        assert all(f.ages_s[1] == 0 for f in fused)  # each state fused as its sweep arrived (the timer's: 0.1 s old)
        assert contract.mismatches(lidar.get_wrapper_attr("fusion_terms")) == ["trigger lidar, the policy was trained with timer"]
    finally:
        lidar.close()


def test_training_faults_hit_the_configured_share_of_episodes():
    """fault_rate: that share of training episodes gets one sensor fault, and the simulator applies it;
    evaluation envs (training=False) and fault_rate 0 stay clean."""
    from rl.ppo import TRAINING_FAULTS, TrainingFaults, make_env

    cfg = PPOConfig(env_id="FusionAttn/Control-Discrete-v0", action_repeat=10, fault_rate=0.5)
    assert not any(isinstance(w, TrainingFaults) for w in _wrappers(make_env(cfg)))
    assert not any(isinstance(w, TrainingFaults) for w in _wrappers(make_env(dataclasses.replace(cfg, fault_rate=0.0), training=True)))
    env = make_env(cfg, training=True, index=0)
    try:
        seen = []
        for episode in range(12):
            env.reset(seed=episode)
            faults = set()
            for _ in range(40):  # 8 s at 5 Hz: past every fault's start (2-4 s)
                _, _, terminated, truncated, info = env.step(1)
                faults |= set(info.get("faults", {}))
                if terminated or truncated:
                    break
            assert len(faults) <= 1 and faults <= set(TRAINING_FAULTS)
            seen.append(bool(faults))
        assert 2 <= sum(seen) <= 10  # about half of 12
    finally:
        env.close()


def test_fault_curriculum_starts_faults_after_the_clean_share():
    from rl.ppo import scheduled_fault_rate

    cfg = PPOConfig(fault_rate=0.5, fault_after=0.4)
    assert [scheduled_fault_rate(cfg, i, 10) for i in range(10)] == [0.0] * 4 + [0.5] * 6
    assert scheduled_fault_rate(dataclasses.replace(cfg, fault_after=0.0), 0, 10) == 0.5
    with pytest.raises(ConfigError, match="fault_after"):
        PPOConfig(fault_after=1.0)
    # with a ramp over 0.4 of the updates the share rises over four updates, then stays
    ramp = dataclasses.replace(cfg, fault_ramp=0.4)
    assert [scheduled_fault_rate(ramp, i, 10) for i in range(10)] == [0.0] * 4 + [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="fault_ramp"):
        PPOConfig(fault_after=0.5, fault_ramp=0.6)


def _wrappers(env):
    while isinstance(env, gym.Wrapper):
        yield env
        env = env.env


def test_policy_node_builds_the_observation_the_simulator_gave(tmp_path):
    """The same fused state, once as the simulator wrapper's observation and once through the fused_state
    message and policy_node's parsing: identical vectors (one observation function for both)."""
    pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    from fusion_attn.messages import fused_state_msg, to_rclpy
    from rl.policy_node import fused_parts, observation
    from rl.ppo import make_env, policy_contract

    cfg = PPOConfig(env_id="FusionAttn/Navigate-Discrete-v0")
    env = make_env(cfg)
    try:
        obs, info = env.reset(seed=3)
        contract = policy_contract(env, cfg)
        for action in (1, 2, 4):
            task = env.unwrapped._observation(env.unwrapped._pose())["task"]
            msg = to_rclpy(fused_state_msg(info["fused"]))
            assert np.array_equal(observation(fused_parts(msg, contract), task, contract), obs)
            obs, _, _, _, info = env.step(action)
    finally:
        env.close()


def test_a_policy_on_another_fusion_is_refused_by_evaluate(tmp_path, capsys):
    """`rl evaluate` of an agent trained on one fusion model, with another model configured: exit 2, naming it."""
    from fusion_attn.checkpoint import save_checkpoint
    from fusion_attn.config import cache_dir
    from fusion_attn.pipeline import load_model, weights_digest

    run = tmp_path / "run"
    cfg = PPOConfig(env_id="FusionAttn/Control-Discrete-v0", steps=32, envs=1, rollout=16, agent=AgentConfig(memory=4))
    train(cfg, run, progress=False)
    model, _ = load_model(None)
    with torch.no_grad():
        model.queries.add_(0.01 + random.SystemRandom().random())  # "retrained": no cache holds its graph
    save_checkpoint(model, tmp_path / "retrained.safetensors")
    agent, meta = load_agent(run / "agent.safetensors")
    meta["config"]["fusion_checkpoint"] = str(tmp_path / "retrained.safetensors")  # evaluated on the new model
    save_agent(agent, tmp_path / "moved.safetensors", meta)
    assert rl_main(["evaluate", str(tmp_path / "moved.safetensors"), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "trained on another fusion" in err and "weights digest" in err and meta[CONTRACT_KEY]["fusion"]["weights_digest"] in err
    assert not list(cache_dir().glob(f"*{weights_digest(model)}*.onnx"))  # refused before it exported them


def test_advantages_stop_at_an_episode_end():
    """GAE by hand, γ = λ = 0.5, one env: step 1 ends its episode, so neither its bootstrap (the next
    episode's first value) nor step 2's advantage reaches it; step 0 gets step 1's, discounted by γλ."""
    rewards, values, next_values = torch.ones(3, 1), torch.tensor([[0.5], [0.0], [1.0]]), torch.full((3, 1), 2.0)
    dones = torch.tensor([[False], [True], [False]])
    advantages, returns = advantage_estimate(rewards, values, next_values, dones, 0.5, 0.5)
    # deltas r + γ(1 - done)V' - V: 1.5, 1, 1; advantages backwards: 1, 1 + 0, 1.5 + 0.25 * 1
    assert advantages.flatten().tolist() == [1.75, 1.0, 1.0] and returns.flatten().tolist() == [2.25, 1.0, 2.0]


def test_cue_recall_asks_for_the_cue_delay_decisions_later():
    env = gym.make(CUE, delay=3)
    obs, _ = env.reset(seed=0)
    cue = int(obs.argmax())
    assert obs[3] == 0 and [env.step(0)[0][3] for _ in range(3)] == [0, 0, 1]  # the flag: answer now
    _, reward, terminated, _, info = env.step(cue)
    assert terminated and reward == 1.0 and info["is_success"]
    with pytest.raises(ConfigError, match="delay 0"):
        gym.make(CUE, delay=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_an_observation_reaches_the_output_for_layers_times_memory_steps(layers):
    """The recall horizon (docs/RL.md): layer l > 0 remembers layer l - 1's outputs, each of which attended
    K steps further back, so an observation moves the output for L x K steps after it, and then no more."""
    agent = _agent(layers=layers)
    reach = layers * agent.cfg.memory
    obs = torch.randn(reach + 2, 1, 5)
    changed = obs.clone()
    changed[0] += 1.0

    def heads(observations):
        memory, mask = agent.initial_memory(1)
        out = []
        for o in observations:
            head, _, memory, mask, _ = agent.step(o, memory, mask)
            out.append(head)
        return out

    moved = [not torch.equal(a, b) for a, b in zip(heads(obs), heads(changed))]
    assert moved == [True] * (reach + 1) + [False]


# the LSTM and the memoryless agent step their envs in the learner's process, the attention-memory agent
# in env workers (rl.workers): both paths learn, and the run takes a third less time than both agents on both
@pytest.mark.parametrize("kind, low, high, workers", [("gtrxl", 0.9, 1.0, 2), ("lstm", 0.75, 1.0, 0), ("mlp", 0.0, 0.5, 0)])
def test_memory_is_learned_through_ppo(tmp_path, kind, low, high, workers):
    """End to end through PPO (stored memory, masking at episode starts): the attention-memory agent
    learns to recall the cue, and so does the LSTM, trained through time on whole rollouts; the
    memoryless one cannot beat chance."""
    cfg = PPOConfig(env_id=f"rl.envs:{CUE}", env_kwargs={"delay": 7}, steps=16384, envs=8, rollout=64, lr=1e-3, seed=0,
                    workers=workers, agent=AgentConfig(kind=kind, dim=32, heads=2, memory=8))
    train(cfg, tmp_path / kind, progress=False)
    rows = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    success = np.mean([r["episode_success"] for r in rows[-3:]])
    assert low <= success <= high, [round(r["episode_success"], 2) for r in rows]


def test_an_info_entry_is_read_from_the_step_that_gave_it():
    """Same-step autoreset: an env whose episode ended gives its final step's entry, not the next
    episode's reset info; an env that gave none is flagged."""
    info = {"goal": np.array([[1.0, 2.0], [9.0, 9.0], [0.0, 0.0]], np.float32), "_goal": np.array([True, True, False]),
            "final_info": {"goal": np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]], np.float32),
                           "_goal": np.array([False, True, False])}}
    values, given = info_entry(info, "goal", 2, ended=np.array([False, True, False]))
    np.testing.assert_array_equal(values, [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    assert given.tolist() == [True, True, False]
    with pytest.raises(ConfigError, match="aux_info goal: 3 values at the first step, 2 now"):
        info_entry(info, "goal", 3, ended=np.array([False, True, False]))


def test_an_auxiliary_prediction_trains_beside_the_agent_and_stays_out_of_it(tmp_path):
    """--aux-info: the trunk also learns to predict an entry of the env's step info (privileged, in
    training only). Its head is in the training state, so a run resumes, and never in the agent."""
    cfg = PPOConfig(env_id=f"rl.envs:{CUE}", env_kwargs={"delay": 3}, steps=2048, envs=4, rollout=64, lr=1e-3,
                    aux_info="cue", workers=2, agent=AgentConfig(dim=16, heads=2, memory=4))  # recorded in the workers
    train(cfg, tmp_path / "aux", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "aux" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["aux_loss"] < 0.1 * rows[0]["aux_loss"]  # the cue's index, from the memory, at every step
    state = torch.load(tmp_path / "aux" / "train_state.pt", weights_only=True)
    assert state["aux_head"]["weight"].shape == (1, 16)
    plain = tmp_path / "plain"
    train(dataclasses.replace(cfg, aux_info="", workers=0, steps=256), plain, progress=False)
    agent, meta = load_agent(tmp_path / "aux" / "agent.safetensors")
    assert agent.state_dict().keys() == load_agent(plain / "agent.safetensors")[0].state_dict().keys()
    assert meta["config"]["aux_info"] == "cue"
    train(dataclasses.replace(cfg, steps=2304), tmp_path / "aux", resume=True, progress=False)
    assert json.loads((tmp_path / "aux" / "metrics.jsonl").read_text().splitlines()[-1])["global_step"] == 2304
    with pytest.raises(ConfigError, match=r"aux_info goal: .*CueRecall-v0's step info has no such entry \(it has cue\)"):
        train(dataclasses.replace(cfg, aux_info="goal"), tmp_path / "missing", progress=False)
    # in the learner's process, and an LSTM trained through time on whole rollouts
    lstm = dataclasses.replace(cfg, workers=0, steps=1024, agent=AgentConfig(kind="lstm", dim=16))
    train(lstm, tmp_path / "lstm", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "lstm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["aux_loss"] < 0.5 * rows[0]["aux_loss"]


class GridDict(gym.Env):
    """A grid-world-like observation: a 7x7x3 uint8 view, a direction and a mission string."""

    observation_space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8),
                                         "direction": gym.spaces.Discrete(4),
                                         "mission": gym.spaces.Text(32, charset="abcdefghijklmnopqrstuvwxyz ")})
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(action == self.t % 3), False, self.t >= 20, {}

    def _obs(self):
        return {"image": np.full((7, 7, 3), 51 * (self.t % 6), np.uint8), "direction": self.t % 4, "mission": "go to the ball"}


gym.register("test/GridDict-v0", entry_point=GridDict)


def test_observations_of_every_common_kind_are_encoded(tmp_path, caplog):
    """Discrete, Tuple of Discrete, and a Dict of an image, a direction and a text: one float vector each
    (one-hot, scaled image, text dropped with a note); a space no agent can take is named."""
    from rl.ppo import make_env

    lake = make_env(PPOConfig(env_id="FrozenLake-v1"))
    obs, _ = lake.reset(seed=0)
    assert obs.shape == (16,) and obs[0] == 1.0 and obs.sum() == 1.0  # one-hot of state 0
    jack = make_env(PPOConfig(env_id="Blackjack-v1"))
    obs, _ = jack.reset(seed=0)
    assert obs.shape == (32 + 11 + 2,) and obs.sum() == 3.0
    with caplog.at_level("WARNING"):
        grid = make_env(PPOConfig(env_id="test/GridDict-v0"))
    assert "mission" in caplog.text and "dropped" in caplog.text
    obs, _ = grid.reset(seed=0)
    obs, *_ = grid.step(0)
    assert obs.shape == (4 + 147,) and obs[1] == 1.0 and np.allclose(obs[4:], 0.2)  # Dict keys in sorted order
    row = train(PPOConfig(env_id="test/GridDict-v0", steps=128, envs=2, rollout=32, agent=AgentConfig(dim=16, heads=2, memory=4)),
                tmp_path / "grid", progress=False)
    assert row["global_step"] == 128 and np.isfinite(row["value_loss"])
    gym.register("test/GraphObs-v0", entry_point=lambda: _with_space(GridDict(), gym.spaces.Dict(
        {"direction": gym.spaces.Discrete(4), "links": gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None)})))
    with pytest.raises(ConfigError, match="observation entry links is a Graph"):
        make_env(PPOConfig(env_id="test/GraphObs-v0"))


def _with_space(env, space):
    env.observation_space = space
    return env


class Dials(gym.Env):
    """Two dials read as MultiDiscrete([3, 4]); naming the first one's value pays."""

    observation_space = gym.spaces.MultiDiscrete([3, 4])
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        reward = float(action == self.t % 3)
        self.t += 1
        return self._obs(), reward, False, self.t >= 10, {}

    def _obs(self):
        return np.array([self.t % 3, self.t % 4], np.int64)


gym.register("test/Dials-v0", entry_point=Dials)


def test_multidiscrete_observations_are_one_hot_per_dimension(tmp_path):
    from rl.ppo import make_env

    env = make_env(PPOConfig(env_id="test/Dials-v0"))
    env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(0)
    assert obs.shape == (3 + 4,) and np.flatnonzero(obs).tolist() == [2, 3 + 1]  # dials (2, 1)
    row = train(PPOConfig(env_id="test/Dials-v0", steps=128, envs=2, rollout=32, agent=AgentConfig(dim=16, heads=2, memory=4)),
                tmp_path / "dials", progress=False)
    assert row["global_step"] == 128 and np.isfinite(row["value_loss"])


def test_a_third_party_env_module_is_imported(tmp_path, monkeypatch, capsys):
    """An env registered by the user's own module in the working folder: --import MODULE or the
    MODULE:EnvId form; without either, a clear error (exit 2), not a traceback. Evaluate imports it only
    when the user names it: a checkpoint that names a module must not get it run by being loaded."""
    (tmp_path / "my_envs.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('mine/Corridor-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv', max_episode_steps=50)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_envs", raising=False)
    small = ["--steps", "64", "--envs", "2", "--rollout", "32", "--no-progress"]
    assert rl_main(["train", "mine/Corridor-v0", "-o", "none", *small]) == 2
    assert "--import MODULE" in capsys.readouterr().err
    assert rl_main(["train", "mine/Corridor-v0", "--import", "my_envs", "-o", "a", *small]) == 0
    assert rl_main(["train", "my_envs:mine/Corridor-v0", "-o", "b", *small]) == 0
    monkeypatch.delitem(sys.modules, "my_envs")
    gym.registry.pop("mine/Corridor-v0")
    capsys.readouterr()
    for run in ("a", "b"):
        assert rl_main(["evaluate", f"{run}/agent.safetensors", "--episodes", "2"]) == 2
        assert "its env is made by importing my_envs, which runs that code" in capsys.readouterr().err
        assert "my_envs" not in sys.modules  # refused before anything was imported
        assert rl_main(["evaluate", f"{run}/agent.safetensors", "--episodes", "2", "--import", "my_envs"]) == 0
        assert json.loads(capsys.readouterr().out)["episodes"] == 2
        monkeypatch.delitem(sys.modules, "my_envs")
        gym.registry.pop("mine/Corridor-v0")


@pytest.mark.parametrize("flags, problem", [
    (["--envs", "0"], "must be > 0"), (["--rollout", "0"], "must be > 0"), (["--lr", "nan"], "lr nan: finite"),
    (["--memory", "0"], "memory 0: each at least 1"), (["--envs", "1", "--rollout", "8"], "8 samples per update"),
    (["--fault-rate", "2"], "fault_rate 2.0 must be a share"),
])
def test_rl_train_options_out_of_range_exit_2_before_the_run_folder_is_made(tmp_path, capsys, flags, problem):
    assert rl_main(["train", "CartPole-v1", "-o", str(tmp_path / "run"), "--envs", "2", "--rollout", "32",
                    "--steps", "64", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert not (tmp_path / "run").exists()
