"""Configurations of the RL agents and their training: plain dataclasses, importable without torch
(the command line builds its options from these defaults without loading the training stack)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from fusion_attn.errors import ConfigError


@dataclass(frozen=True)
class AgentConfig:
    kind: str = "gtrxl"  # gtrxl | mlp | lstm | gru
    dim: int = 64
    layers: int = 2  # GTrXL blocks, or stacked LSTM / GRU cells
    heads: int = 4  # GTrXL only, as memory and gate_bias
    memory: int = 32  # K: past steps each layer attends over
    gate_bias: float = 2.0  # initial update-gate bias: sigmoid(-2) = 0.12 of the new value passes

    def __post_init__(self):
        if self.kind not in ("gtrxl", "mlp", "lstm", "gru"):
            raise ConfigError(f"agent kind {self.kind!r}: gtrxl, mlp, lstm or gru")
        if min(self.dim, self.layers, self.heads, self.memory) < 1 or self.dim % self.heads:
            raise ConfigError(f"agent dim {self.dim}, layers {self.layers}, heads {self.heads}, memory {self.memory}: "
                              "each at least 1, dim a multiple of heads")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PPOConfig:
    env_id: str = "FusionAttn/Memory-Discrete-v0"
    env_kwargs: dict = field(default_factory=dict)
    imports: tuple[str, ...] = ()  # modules imported before gym.make: they register third-party env ids
    fusion_checkpoint: str = ""  # FusionAttn envs: the fusion model observed through ("": the packaged default)
    fusion_trigger: str = "timer"  # FusionAttn envs: when it fuses (the node's `trigger`; a model trained with --trigger)
    # control steps per decision. FusionAttn envs: None -> 5 (decide at 10 Hz, the drive runs at 50 Hz);
    # other envs step once per decision: None -> 1, anything else is refused (it would not be applied)
    action_repeat: int | None = None
    steps: int = 200_000  # total env steps (decisions) over all envs
    envs: int = 8  # over all workers
    workers: int = 0  # env processes, envs / workers each (0: every env in the learner's process)
    ray: str = ""  # workers as Ray actors: "auto" or a cluster address ("": local processes)
    rollout: int = 128  # steps per env per update
    epochs: int = 4
    minibatches: int = 8
    lr: float = 3e-4
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5
    seed: int = 0
    threads: int = 1
    device: str = "auto"  # the learner's: auto (CUDA when there is one), cpu, cuda, cuda:1, ...
    fault_rate: float = 0.0  # FusionAttn envs: share of training episodes with one sensor fault (rl.ppo.TRAINING_FAULTS)
    fault_after: float = 0.0  # share of the steps trained clean before faults start: learn the task, then its faults
    fault_ramp: float = 0.0  # share of the steps over which the fault rate then rises from 0 to fault_rate
    # a numeric entry of the env's step info (FusionAttn envs: "goal") that the trunk also learns to predict,
    # privileged in training only: it shapes what the memory keeps; the deployed policy never sees it
    aux_info: str = ""
    aux_coef: float = 0.5  # weight of that prediction's squared error in the loss
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self):
        numbers = {k: v for k, v in asdict(self).items() if isinstance(v, float)}
        if bad := [k for k, v in numbers.items() if not math.isfinite(v)]:
            raise ConfigError(", ".join(f"{k} {numbers[k]}" for k in bad) + ": finite numbers only")
        if min(self.steps, self.envs, self.rollout, self.epochs, self.minibatches, self.threads) < 1 or self.lr <= 0:
            raise ConfigError(f"steps {self.steps}, envs {self.envs}, rollout {self.rollout}, epochs {self.epochs}, "
                              f"minibatches {self.minibatches}, threads {self.threads} and lr {self.lr} must be > 0")
        if self.envs * self.rollout < 2 * self.minibatches:  # a minibatch of one sample has no advantage spread
            raise ConfigError(f"envs x rollout = {self.envs * self.rollout} samples per update: at least "
                              f"{2 * self.minibatches} ({self.minibatches} minibatches of 2)")
        if not (0.0 <= self.fault_rate <= 1.0 and self.ent_coef >= 0):
            raise ConfigError(f"fault_rate {self.fault_rate} must be a share in [0, 1], ent_coef {self.ent_coef} >= 0")
        if self.ray and not self.workers:
            raise ConfigError("ray: the env workers run on Ray; say how many with workers")
        if self.workers < 0 or (self.workers and self.envs % self.workers):
            raise ConfigError(f"{self.envs} envs cannot be split evenly over {self.workers} workers")
        if not 0.0 <= self.fault_after < 1.0:
            raise ConfigError(f"fault_after {self.fault_after}: a share of the training steps, in [0, 1)")
        if not 0.0 <= self.fault_ramp <= 1.0 - self.fault_after:
            raise ConfigError(f"fault_ramp {self.fault_ramp}: a share of the training steps after fault_after "
                              f"({self.fault_after}), in [0, {1.0 - self.fault_after:g}]")
        if self.aux_coef < 0:
            raise ConfigError(f"aux_coef {self.aux_coef}: a loss weight, at least 0")
        if self.action_repeat is None:  # the config records the repeat used, so a saved run says it
            object.__setattr__(self, "action_repeat", 5 if self.fusion_env else 1)
        elif not self.fusion_env and self.action_repeat != 1:
            raise ConfigError(f"action repeat {self.action_repeat}: only FusionAttn envs repeat actions (their drive "
                              f"runs at 50 Hz); {self.env_id} steps once per decision (wrap the env to repeat)")

    @property
    def fusion_env(self) -> bool:
        return self.env_id.startswith("FusionAttn/")

    @classmethod
    def from_dict(cls, d: dict) -> PPOConfig:
        d = dict(d)
        d["agent"] = AgentConfig(**d.get("agent", {}))
        d["imports"] = tuple(d.get("imports", ()))  # a list after JSON
        if not str(d.get("env_id", cls.env_id)).startswith("FusionAttn/"):
            d.pop("action_repeat", None)  # runs saved before recorded an unused 5 for every env
        return cls(**d)
