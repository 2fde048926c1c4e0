"""PPO for the memory agents (rl/agent.py), in one file that reads top to bottom (CleanRL style).

    fusion-attn rl train FusionAttn/Memory-Discrete-v0 -o runs/mem --agent gtrxl --steps 500000

Any Gymnasium env with Box or Dict observations and Discrete or Box actions works; the FusionAttn
envs are observed through the fusion pipeline (FusedObservation: fused state, attention per
modality, and the task's own observation). Rollouts come from a vector env with same-step
autoreset, so an observation that starts an episode is flagged and the agent's memory is masked
there (`collect_rollout`; with --workers each worker runs it on its envs with the learner's weights,
rl/workers.py). A truncated episode is bootstrapped with the value of its final observation, computed with
the memory it had. Advantages: GAE (`advantage_estimate`); the clipped surrogate, value loss and
entropy bonus are a few lines below; with cfg.aux_info, a squared error that trains a head on the
trunk to predict that step info entry (privileged, training only: the head is not in the agent).
Minibatches: for GTrXL (and MLP) single steps, the stored memory an input of each; for LSTM / GRU
whole rollouts of a subset of envs, unrolled from the state stored at their first step with the
state zeroed at episode starts, so the loss backpropagates through time (a recurrent state only
learns to hold what a gradient through it asked for).

Outputs in the run folder: agent.safetensors (weights + config as metadata), train_state.pt
(agent and aux head weights, optimizer, counters, RNG; loaded with weights_only=True), tb/ (TensorBoard), metrics.jsonl,
curve.png (the learning curve). A folder that holds a run is not trained into again unless resumed
or overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import save_file

from fusion_attn.checkpoint import read_safetensors
from fusion_attn.contract import CONTRACT_KEY, PolicyContract
from fusion_attn.errors import CheckpointError, ConfigError
from fusion_attn.files import written_aside

from .agent import ActorCritic, reset_memory
from .config import PPOConfig

log = logging.getLogger(__name__)
FORMAT = "fusion_attn.rl/1"


# --- environments --------------------------------------------------------------------------------

class ActionRepeat(gym.Wrapper):
    """Repeat each action n control steps; rewards add up, info["frames"] (if any) concatenate."""

    def __init__(self, env: gym.Env, n: int):
        super().__init__(env)
        self.n = n

    def step(self, action):
        total, frames = 0.0, []
        for _ in range(self.n):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if "frames" in info:
                frames.append(info["frames"])
            if terminated or truncated:
                break
        if frames:  # FrameLists: each frame with the sensor it came from
            info = {**info, "frames": sum(frames[1:], frames[0])}
        return obs, total, terminated, truncated, info


# Single-sensor faults a policy meets in training (fault_rate > 0), with the magnitude of each (see
# fusion_attn.sim.faults); the evaluation's kinds (rl.evaluate.EVAL_FAULTS) are among them.
TRAINING_FAULTS = {"camera_blackout": 1.0, "camera_freeze": 1.0, "camera_noise": 40.0, "camera_dropout": 1.0,
                   "lidar_dropout": 1.0, "lidar_freeze": 1.0, "lidar_sparse": 0.1,
                   "imu_dropout": 1.0, "imu_freeze": 1.0, "imu_noise_burst": 2.0}


def fault_options(name: str, rng: np.random.Generator, magnitude: float = 2.0) -> dict:
    """Reset options with one fault, starting 2-4 s in (after the memory task's cue and delay, while
    the robot drives) and lasting 5-15 s."""
    from fusion_attn.sim.faults import FaultSpec

    start = float(rng.uniform(2.0, 4.0))
    return {"faults": {name: FaultSpec.window(start, float(rng.uniform(5.0, 15.0)), magnitude=magnitude)}}


def scheduled_fault_rate(cfg: PPOConfig, iteration: int, iterations: int) -> float:
    """The share of new training episodes with a fault at this update: none until cfg.fault_after of
    the updates are done (the task is learned first: a memory learned under faults from the start
    was not learned at all in 60k steps, docs/RESULTS.md), then rising linearly to cfg.fault_rate over
    cfg.fault_ramp of them (a gentler shift for a policy that has learned the task clean), then
    cfg.fault_rate."""
    start = cfg.fault_after * iterations
    if iteration < start:
        return 0.0
    ramp = cfg.fault_ramp * iterations
    return cfg.fault_rate * min(1.0, (iteration - start + 1) / ramp) if ramp > 0 else cfg.fault_rate


class TrainingFaults(gym.Wrapper):
    """One random sensor fault (TRAINING_FAULTS) in a share `rate` of the episodes: a policy that
    never saw a sensor fail acts on a fused state it never saw either."""

    def __init__(self, env: gym.Env, rate: float, rng: np.random.Generator):
        super().__init__(env)
        self.rate, self.rng = rate, rng

    def reset(self, *, seed=None, options=None):
        if options is None and self.rng.random() < self.rate:
            name = str(self.rng.choice(list(TRAINING_FAULTS)))
            options = fault_options(name, self.rng, TRAINING_FAULTS[name])
        return self.env.reset(seed=seed, options=options)


class FlatObservation(gym.ObservationWrapper):
    """Any common observation space -> one float32 vector, so every agent takes every env: Box values
    flattened (uint8 images scaled to [0, 1]), Discrete and MultiDiscrete one-hot, MultiBinary as 0/1,
    Dict and Tuple entries concatenated in their order. Text entries are dropped with a log line; any
    other space is a ConfigError that names the entry."""

    def __init__(self, env: gym.Env, env_id: str):
        super().__init__(env)
        self.parts: list[tuple[tuple, callable]] = []  # (path to the entry, its encoder)
        size = self._plan(env.observation_space, (), env_id)
        if size == 0:
            raise ConfigError(f"{env_id}: no observation entry the agents can take in {env.observation_space}")
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)

    def _plan(self, space: gym.Space, path: tuple, env_id: str) -> int:
        name = "/".join(map(str, path)) or "the observation"
        if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
            items = space.spaces.items() if isinstance(space, gym.spaces.Dict) else enumerate(space.spaces)
            return sum(self._plan(sub, (*path, key), env_id) for key, sub in items)
        if isinstance(space, gym.spaces.Box):
            scale = 1 / 255 if space.dtype == np.uint8 else 1.0
            encode, size = (lambda v, s=scale: np.asarray(v, np.float32).reshape(-1) * s), int(np.prod(space.shape))
        elif isinstance(space, gym.spaces.Discrete):
            n, start = int(space.n), int(space.start)
            encode, size = (lambda v, n=n, start=start: np.eye(n, dtype=np.float32)[int(v) - start]), n
        elif isinstance(space, gym.spaces.MultiDiscrete):
            nvec, start = space.nvec.reshape(-1), np.asarray(space.start).reshape(-1)
            offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]])
            size = int(nvec.sum())

            def encode(v, offsets=offsets, start=start, size=size):
                out = np.zeros(size, np.float32)
                out[offsets + np.asarray(v).reshape(-1) - start] = 1.0
                return out
        elif isinstance(space, gym.spaces.MultiBinary):
            encode, size = (lambda v: np.asarray(v, np.float32).reshape(-1)), int(np.prod(space.shape))
        elif isinstance(space, gym.spaces.Text):
            log.warning("%s: observation entry %s (%s) is dropped: text is not encoded", env_id, name, space)
            return 0
        else:
            raise ConfigError(f"{env_id}: observation entry {name} is a {type(space).__name__} ({space}), which the "
                              "agents cannot take (Box, Discrete, MultiDiscrete, MultiBinary, Text, and Dict or Tuple of them)")
        self.parts.append((path, encode))
        return size

    def observation(self, obs):
        out = []
        for path, encode in self.parts:
            value = obs
            for key in path:
                value = value[key]
            out.append(encode(value))
        return np.concatenate(out)


def env_modules(cfg: PPOConfig) -> tuple[str, ...]:
    """The modules outside this project that making cfg's env imports (--import, and the MODULE of a
    MODULE:EnvId id): code, which a checkpoint that names them must never get run by being loaded
    (evaluate asks for them by name). This project's own (rl.envs, fusion_attn.sim) are installed code."""
    if cfg.fusion_env:
        return ()
    named = (*cfg.imports, *([cfg.env_id.split(":", 1)[0]] if ":" in cfg.env_id else []))
    return tuple(m for m in named if m.split(".")[0] not in ("rl", "fusion_attn"))


def make_env(cfg: PPOConfig, training: bool = False, index: int = 0) -> gym.Env:
    """One env as the agent sees it. FusionAttn envs: ActionRepeat (only these: cfg.action_repeat is 1
    elsewhere), then the fused state (on the fusion model cfg.fusion_checkpoint, default the packaged
    one; a fusion that reads a second IMU gets a robot with one); cfg.fault_rate of the training
    episodes get a sensor fault (env `index` seeds which). Other envs: observations of any common kind encoded as one vector (FlatObservation). Training scales
    rewards by a running std of the discounted return: value and policy share a trunk, and large value
    errors would otherwise dominate the clipped gradient (episode statistics stay raw)."""
    for module in ("fusion_attn.sim",) if cfg.fusion_env else cfg.imports:  # fusion_attn.sim registers its ids
        importlib.import_module(module)
    kwargs = cfg.env_kwargs
    if cfg.fusion_env:
        from fusion_attn.frames import Modality
        from fusion_attn.pipeline import FusionPipeline
        from fusion_attn.sim.sensors import SensorConfig
        from fusion_attn.sim.wrappers import FusedObservation

        pipeline = FusionPipeline.create(cfg.fusion_checkpoint or None, backend="onnxruntime", threads=1)
        if Modality.IMU2 in pipeline.cfg.sensors:  # the simulated robot carries the second IMU the fusion reads
            kwargs = {"sensors": SensorConfig().with_second_imu()} | kwargs
    try:
        env = gym.make(cfg.env_id, **kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"{cfg.env_id}: {exc}. A third-party env registers its ids when its module is imported: "
                          "pass --import MODULE, or give the id as MODULE:EnvId") from exc
    if cfg.fusion_env:
        env = FusedObservation(ActionRepeat(env, cfg.action_repeat), pipeline, with_attention=True, with_task=True,
                               trigger=cfg.fusion_trigger)
        if training and cfg.fault_rate > 0:  # the rate at step 0; train() sets it per update
            env = TrainingFaults(env, scheduled_fault_rate(cfg, 0, 1), np.random.default_rng([cfg.seed, index]))
    elif not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1):
        env = FlatObservation(env, cfg.env_id)
    if not isinstance(env.action_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise ConfigError(f"{cfg.env_id}: actions must be Discrete or Box, got {env.action_space}")
    env = gym.wrappers.RecordEpisodeStatistics(env)
    return gym.wrappers.NormalizeReward(env, gamma=cfg.gamma) if training else env


def vector_env(cfg: PPOConfig) -> gym.vector.VectorEnv:
    """The training envs: in the learner's process, or spread over cfg.workers processes (rl.workers);
    the same envs and seeds either way."""
    if cfg.workers:
        from .workers import RayVectorEnv, WorkerVectorEnv

        build = functools.partial(make_env, cfg, True)
        if cfg.ray:
            return RayVectorEnv(build, cfg.workers, cfg.envs // cfg.workers, cfg.ray)
        return WorkerVectorEnv(build, cfg.workers, cfg.envs // cfg.workers)
    return gym.vector.SyncVectorEnv([functools.partial(make_env, cfg, True, i) for i in range(cfg.envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def policy_contract(env: gym.Env, cfg: PPOConfig) -> PolicyContract | None:
    """The contract of a policy trained on `env` (FusionAttn envs; None for others): the fusion it
    was trained on, the observation layout, the action table and the decision period."""
    if not cfg.env_id.startswith("FusionAttn/"):
        return None
    sim = env.unwrapped
    table = sim.action_table
    return env.get_wrapper_attr("contract")(None if table is None else np.round(table.astype(float), 6).tolist(),
                                            sim.dt_ns * sim.substeps * cfg.action_repeat / 1e9)


def check_contract(meta: dict, cfg: PPOConfig, env: gym.Env | None = None) -> None:
    """ConfigError when the agent (its metadata) was trained on another fusion than `env` fuses with. Without
    an env, the weights alone, read from cfg's fusion checkpoint: new weights would first be exported to ONNX
    (half a minute on a CPU) only for the env to be refused."""
    if not cfg.fusion_env:
        return
    if CONTRACT_KEY not in meta:
        raise ConfigError("the agent records no fusion contract (trained before policies carried one): retrain it")
    trained = PolicyContract.from_dict(meta[CONTRACT_KEY])
    if env is None:
        from fusion_attn.pipeline import load_model, weights_digest

        terms = {**trained.fusion, "weights_digest": weights_digest(load_model(cfg.fusion_checkpoint or None)[0])}
    else:
        terms = env.get_wrapper_attr("fusion_terms")
    wrong = trained.mismatches(terms)
    if wrong:
        raise ConfigError("the agent was trained on another fusion than this env fuses with: " + "; ".join(wrong))


def advantage_estimate(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, dones: torch.Tensor,
                       gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over a rollout: (T, N) rewards, values, the
    values of the next observations and dones -> (T, N) advantages and returns. An episode's end (done)
    stops both the bootstrap and the sum."""
    live = (~dones).float()
    deltas = rewards + gamma * live * next_values - values
    discount = lam * gamma * live
    advantages = torch.empty_like(values)
    last = torch.zeros_like(values[0])
    for t in reversed(range(len(values))):
        last = advantages[t] = deltas[t] + last * discount[t]
    return advantages, advantages + values


def env_action(space: gym.Space, action: torch.Tensor) -> np.ndarray:
    a = action.cpu().numpy()
    return a if isinstance(space, gym.spaces.Discrete) else np.clip(a, space.low, space.high)


# --- rollouts ------------------------------------------------------------------------------------

@dataclasses.dataclass
class RolloutPolicy:
    """What an env worker needs to act as the learner would: how to build the agent, and its weights."""

    build: Callable[[], ActorCritic]
    weights: dict[str, torch.Tensor]
    aux_info: str = ""  # the step info entry collect_rollout records (PPOConfig.aux_info), and its size
    aux_size: int = 0


def collect_rollout(agent: ActorCritic, envs: gym.vector.VectorEnv, carry: tuple, steps: int, gamma: float,
                    aux_info: str = "", aux_size: int = 0):
    """`steps` decisions of every env, actions sampled from `agent`. carry: the envs' observations
    (n, obs_dim), memory, memory mask and episode-start flags (n,), as the last call left them.
    -> buffers by name, (steps, n, ...): obs, mem, mask (what the agent saw), act, logp, val, rew (a
    cut-off episode's last reward bootstrapped with the value of its final observation), done, and
    with `aux_info` aux (the step info's entry, `aux_size` values) and aux_valid (where the env gave
    it); next_value (n,) after the last step; the carry to go on from; the episodes that ended (lists)."""
    obs, memory, mask, starts = carry
    tensor = functools.partial(torch.as_tensor, device=obs.device)
    names = ("obs", "mem", "mask", "act", "logp", "val", "rew", "done") + (("aux", "aux_valid") if aux_info else ())
    buffers = {k: [] for k in names}
    episodes = {"return": [], "length": [], "success": []}
    for _ in range(steps):
        mask = reset_memory(mask, starts)
        for k, v in (("obs", obs), ("mem", memory), ("mask", mask)):
            buffers[k].append(v)
        with torch.no_grad():
            head, value, memory, mask, _ = agent.step(obs, memory, mask)
            dist = agent.distribution(head)
            action = dist.sample()
            buffers["logp"].append(agent.log_prob(dist, action))
        buffers["act"].append(action)
        buffers["val"].append(value)
        next_obs, reward, terminated, truncated, info = envs.step(env_action(envs.single_action_space, action))
        reward = tensor(reward, dtype=torch.float32)
        if truncated.any():  # bootstrap the cut-off episode from its final observation, with its memory
            idx = np.flatnonzero(truncated & ~terminated)
            if len(idx):
                final = tensor(np.stack([info["final_obs"][i] for i in idx]), dtype=torch.float32)
                with torch.no_grad():
                    _, final_value, *_ = agent.step(final, memory[idx], mask[idx])
                reward[idx] += gamma * final_value
        done = tensor(terminated | truncated)
        if aux_info:
            target, given = info_entry(info, aux_info, aux_size, terminated | truncated)
            buffers["aux"].append(tensor(target))
            buffers["aux_valid"].append(tensor(given))
        buffers["rew"].append(reward)
        buffers["done"].append(done.float())
        _episode_stats(info, episodes)
        obs, starts = tensor(next_obs, dtype=torch.float32), done
    with torch.no_grad():
        _, next_value, *_ = agent.step(obs, memory, reset_memory(mask, starts))
    return {**{k: torch.stack(v) for k, v in buffers.items()}, "next_value": next_value}, (obs, memory, mask, starts), episodes


def info_entry(info: dict, key: str, size: int, ended: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A vector env's step info entry `key` per env -> values (n, size) float32, and (n,) True where the
    env gave one. An env whose episode ended this step gives its final step's (same-step autoreset puts
    the next episode's reset info at the top level)."""
    values, given = np.zeros((len(ended), size), np.float32), np.zeros(len(ended), bool)
    for source, rows in ((info, ~ended), (info.get("final_info", {}), ended)):
        for i in np.flatnonzero(source.get(f"_{key}", np.zeros(len(ended), bool)) & rows):
            value = np.asarray(source[key][i], np.float32).reshape(-1)
            if value.size != size:
                raise ConfigError(f"aux_info {key}: {size} values at the first step, {value.size} now")
            values[i], given[i] = value, True
    return values, given


def aux_info_size(env: gym.Env, cfg: PPOConfig) -> int:
    """How many values cfg.aux_info holds, from the step info of one random action after a reset."""
    env.reset(seed=cfg.seed)
    info = env.step(env.action_space.sample())[-1]
    if cfg.aux_info not in info:
        raise ConfigError(f"aux_info {cfg.aux_info}: {cfg.env_id}'s step info has no such entry "
                          f"(it has {', '.join(sorted(info)) or 'none'})")
    try:
        size = np.asarray(info[cfg.aux_info], np.float32).size
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"aux_info {cfg.aux_info}: {cfg.env_id}'s entry is not numeric: {info[cfg.aux_info]!r}") from exc
    if size == 0:
        raise ConfigError(f"aux_info {cfg.aux_info}: {cfg.env_id}'s entry is empty: nothing to predict")
    return size


# --- checkpoints ---------------------------------------------------------------------------------

def save_agent(agent: ActorCritic, path: Path, meta: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in agent.state_dict().items()}
    with written_aside(path) as tmp:  # a Ctrl-C mid-save leaves the last whole checkpoint
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta, sort_keys=True)})


def load_agent(path: str | Path) -> tuple[ActorCritic, dict]:
    """-> (agent in eval mode, its metadata: config, obs_dim, action space, env, steps)."""
    header, tensors = read_safetensors(path, FORMAT)
    try:
        meta = json.loads(header["meta"])
        cfg = PPOConfig.from_dict(meta["config"])
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: its agent metadata is invalid: {exc}") from exc
    agent = ActorCritic(meta["obs_dim"], _space(meta["action_space"]), cfg.agent)
    try:
        agent.load_state_dict(tensors)
    except RuntimeError as exc:  # the first line names the tensor; the rest is torch's list of every one
        raise CheckpointError(f"{path} does not match its own config: {str(exc).splitlines()[0]}") from exc
    return agent.eval(), meta


def _space_dict(space: gym.Space) -> dict:
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    return {"type": "box", "low": space.low.tolist(), "high": space.high.tolist()}


def _space(d: dict) -> gym.Space:
    if d["type"] == "discrete":
        return gym.spaces.Discrete(d["n"])
    return gym.spaces.Box(np.array(d["low"], np.float32), np.array(d["high"], np.float32))


# --- training ------------------------------------------------------------------------------------

RUN_FILES = ("agent.safetensors", "train_state.pt", "metrics.jsonl", "config.json", "curve.png", "tb")


def train(cfg: PPOConfig, out: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train; -> the last metrics row. With resume, continue from out/train_state.pt (same config; a
    larger cfg.steps extends the run, the learning rate annealing over the new total). Without it, a
    folder that already holds a run is refused, or cleared first with overwrite."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    out = Path(out)
    state_path = out / "train_state.pt"
    if not resume:
        _clear_run(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    state = _load_state(state_path, cfg) if resume else None  # refused before any env worker starts
    envs = vector_env(cfg)
    obs_dim = envs.single_observation_space.shape[0]
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       "cpu" if cfg.device == "auto" else cfg.device)
    agent = ActorCritic(obs_dim, envs.single_action_space, cfg.agent).to(dev)
    contract, aux_size = None, 0
    if cfg.fusion_env or cfg.aux_info:  # an env in this process (the training envs may be in workers)
        probe = make_env(cfg)
        try:
            contract = policy_contract(probe, cfg)
            aux_size = aux_info_size(probe, cfg) if cfg.aux_info else 0
        except BaseException:
            envs.close()  # a refused entry leaves no worker running
            raise
        finally:
            probe.close()
    meta = {"config": dataclasses.asdict(cfg), "obs_dim": obs_dim, "action_space": _space_dict(envs.single_action_space),
            **({CONTRACT_KEY: contract.to_dict()} if contract is not None else {})}
    # the auxiliary prediction's head: trained beside the agent, saved with the training state only
    aux_head = torch.nn.Linear(cfg.agent.dim, aux_size).to(dev) if aux_size else None
    params = [*agent.parameters(), *(aux_head.parameters() if aux_head is not None else ())]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5, fused=True)  # one kernel, not one per tensor
    iterations = max(1, cfg.steps // (cfg.envs * cfg.rollout))
    start_iteration, global_step = 0, 0
    metrics_path = out / "metrics.jsonl"
    rows = []
    if state is not None:
        agent.load_state_dict(state["agent"])
        if aux_head is not None:
            aux_head.load_state_dict(state["aux_head"])
        optimizer.load_state_dict(state["optimizer"])
        start_iteration, global_step = state["iteration"], state["global_step"]
        torch.set_rng_state(state["torch_rng"])
        # rows past the saved state (stopped between the two writes) are trained again: keep one curve
        rows = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["global_step"] <= global_step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))
    writer = SummaryWriter(str(out / "tb"))
    metrics_file = metrics_path.open("a")

    T, N = cfg.rollout, cfg.envs
    if cfg.workers:  # each worker keeps its envs' observations and memories between rollouts
        policy = RolloutPolicy(functools.partial(ActorCritic, obs_dim, envs.single_action_space, cfg.agent), {},
                               cfg.aux_info, aux_size)
    else:
        obs, _ = envs.reset(seed=cfg.seed + 1000 * start_iteration)
        carry = (torch.as_tensor(obs, dtype=torch.float32, device=dev), *agent.initial_memory(N, dev),
                 torch.ones(N, dtype=torch.bool, device=dev))
    recent = {"return": [], "length": [], "success": []}
    bar = tqdm(total=iterations * T * N, initial=global_step, disable=not progress, unit="step", dynamic_ncols=True)
    t_start = t_plot = time.perf_counter()
    steps_at_start = global_step
    for iteration in range(start_iteration, iterations):
        for g in optimizer.param_groups:  # linear annealing
            g["lr"] = cfg.lr * (1.0 - iteration / iterations)
        if cfg.fault_rate > 0 and cfg.fusion_env:
            envs.set_attr("rate", scheduled_fault_rate(cfg, iteration, iterations))
        agent.eval()
        if cfg.workers:  # the workers act with the current weights; a replaced Ray worker runs its part again
            policy.weights = {k: v.cpu() for k, v in agent.state_dict().items()}
            parts = envs.rollout(policy, T, cfg.gamma, cfg.seed, iteration)
            rollout = {k: torch.cat([p[0][k] for p in parts], dim=0 if k == "next_value" else 1).to(dev) for k in parts[0][0]}
            episodes = {k: [v for p in parts for v in p[1][k]] for k in recent}
        else:
            rollout, carry, episodes = collect_rollout(agent, envs, carry, T, cfg.gamma, cfg.aux_info, aux_size)
        for k in recent:
            recent[k] += episodes[k]
        global_step += T * N
        bar.update(T * N)
        obs_buf, mem_buf, mask_buf, act_buf, logp_buf, rew_buf, val_buf, done_buf = (
            rollout[k] for k in ("obs", "mem", "mask", "act", "logp", "rew", "val", "done"))
        next_value = rollout["next_value"]
        advantages, returns = advantage_estimate(rew_buf, val_buf, torch.cat([val_buf[1:], next_value[None]]),
                                                 done_buf.bool(), cfg.gamma, cfg.lam)

        agent.train()
        b = {"obs": obs_buf.flatten(0, 1), "mem": mem_buf.flatten(0, 1), "mask": mask_buf.flatten(0, 1),
             "act": act_buf.flatten(0, 1), "logp": logp_buf.flatten(), "adv": advantages.flatten(),
             "ret": returns.flatten(), "val": val_buf.flatten()}
        if aux_head is not None:
            b.update(aux=rollout["aux"].flatten(0, 1), aux_valid=rollout["aux_valid"].flatten(0, 1).float())
        size = T * N
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0,
                 **({"aux_loss": 0.0} if aux_head is not None else {})}
        for _ in range(cfg.epochs):
            # GTrXL / MLP: single steps; LSTM / GRU: envs, each with its whole rollout (the same sample count)
            parts = (torch.randperm(N).split(max(1, N // cfg.minibatches)) if agent.recurrent
                     else torch.randperm(size).split(size // cfg.minibatches))
            for part in parts:
                if agent.recurrent:
                    x = agent.unroll(obs_buf[:, part], mem_buf[0, part], mask_buf[:, part])
                    idx = (torch.arange(T)[:, None] * N + part).flatten()  # the same samples in b: index t * N + env
                else:
                    idx = part
                    x, *_ = agent.features(b["obs"][idx], b["mem"][idx], b["mask"][idx])
                head, value = agent.heads(x)
                dist = agent.distribution(head)
                logp = agent.log_prob(dist, b["act"][idx])
                ratio = (logp - b["logp"][idx]).exp()
                adv = b["adv"][idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
                value_loss = 0.5 * (value - b["ret"][idx]).pow(2).mean()
                entropy = agent.entropy(dist).mean()
                loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
                if aux_head is not None:
                    given = b["aux_valid"][idx]
                    error = (aux_head(x) - b["aux"][idx]).pow(2).sum(-1)
                    aux_loss = (error * given).sum() / given.sum().clamp_min(1.0)
                    loss = loss + cfg.aux_coef * aux_loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
                optimizer.step()
                with torch.no_grad():
                    for k, v in (("policy_loss", policy_loss), ("value_loss", value_loss), ("entropy", entropy),
                                 ("approx_kl", ((ratio - 1) - ratio.log()).mean()),
                                 ("clip_fraction", ((ratio - 1).abs() > cfg.clip).float().mean()),
                                 *((("aux_loss", aux_loss),) if aux_head is not None else ())):
                        stats[k] += float(v) / (cfg.epochs * len(parts))

        sps = (global_step - steps_at_start) / (time.perf_counter() - t_start)
        row = {"iteration": iteration + 1, "global_step": global_step, "steps_per_s": sps, **stats,
               # a replaced worker's rollout is run again: T x its envs' steps collected twice
               **({"workers_replaced": envs.replaced, "steps_discarded": envs.replaced * T * (N // cfg.workers)}
                  if cfg.ray else {}),
               **{f"episode_{k}": float(np.mean(v)) for k, v in recent.items() if v}}
        for k, v in row.items():
            if k not in ("iteration", "global_step"):
                writer.add_scalar(f"train/{k}", v, global_step)
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        rows.append(row)
        bar.set_postfix({k: f"{row[k]:.2f}" for k in ("episode_return", "episode_success") if k in row})
        recent = {k: v[-50:] for k, v in recent.items()}
        save_agent(agent, out / "agent.safetensors", {**meta, "global_step": global_step})
        with written_aside(state_path) as tmp:
            torch.save({"agent": agent.state_dict(), **({"aux_head": aux_head.state_dict()} if aux_head is not None else {}),
                        "optimizer": optimizer.state_dict(), "iteration": iteration + 1, "global_step": global_step,
                        "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg)}, tmp)
        if time.perf_counter() - t_plot > 60 or iteration + 1 == iterations:  # a plot a minute at most: cheap
            plot_curve(rows, out / "curve.png", cfg.env_id)
            t_plot = time.perf_counter()
    bar.close()
    writer.close()
    metrics_file.close()
    envs.close()
    return rows[-1] if rows else {}


def plot_curve(rows: list[dict], path: Path, title: str) -> None:
    """The learning curve (training episodes' return, and success where the env reports it) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing left open

    keys = [k for k in ("episode_return", "episode_success") if any(k in r for r in rows)]
    if not keys:
        return
    fig = Figure(figsize=(7, 2.2 * len(keys) + 0.6), layout="constrained")
    for ax, key in zip(fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0], keys):
        points = [(r["global_step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points))
        ax.set_ylabel(key.removeprefix("episode_"))
        ax.grid(alpha=0.3)
    ax.set_xlabel("env steps (decisions)")
    fig.suptitle(f"{title}: training episodes (running mean)")
    fig.savefig(path, dpi=80)


def _clear_run(out: Path, overwrite: bool) -> None:
    """A second training into one folder would overwrite its agent and append a second curve to its metrics."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}): --resume to continue it, "
                          "--overwrite to start over")
    for name in found:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()


def _episode_stats(info: dict, recent: dict) -> None:
    final = info.get("final_info", {})
    if "episode" not in final:
        return
    ended = final["_episode"]
    recent["return"] += final["episode"]["r"][ended].tolist()
    recent["length"] += final["episode"]["l"][ended].tolist()
    if "is_success" in final:
        recent["success"] += final["is_success"][ended].astype(float).tolist()


def _load_state(path: Path, cfg: PPOConfig) -> dict:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as exc:
        raise CheckpointError(f"nothing to resume: {path} does not exist") from exc
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"cannot resume from {path} (corrupt or truncated?): {exc}") from exc
    saved = PPOConfig.from_dict(state.get("config", {}))  # fields added since take their defaults
    changed = [f"{f.name} {getattr(saved, f.name)!r}, now {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if f.name not in ("steps", "workers", "ray", "device")  # more steps extend the run; the others
               # say where it runs, not what it learns
               and getattr(saved, f.name) != getattr(cfg, f.name)]
    if changed:
        raise ConfigError(f"{path} was saved with another configuration ({'; '.join(changed)}); resume with the same flags")
    return state
