"""Actor-critic agents for PPO (rl/ppo.py): attention memory over the agent's own history, or none.

GTrXLAgent: a gated transformer-XL. Each layer attends from the current step over the inputs that
layer saw at the last K steps (its memory) and at the current step; pre-norm, and GRU-type gates
whose update bias starts at +2, so every block starts as nearly the identity and the agent first
learns like a memoryless MLP, then learns to use its past. Memory slots from before an episode's
start are masked. Acting caches the memory: one step costs one token of attention per slot.

The baselines, same embedding, heads and sizes: "mlp" (memoryless) and the recurrent "lstm" and
"gru" (L layers of width D), whose memory is their hidden (and cell) state. PPO trains these on
whole sequences (`unroll`), so their gradient flows back through time.

Shapes: N environments (or samples), L layers, K memory slots, D model width, A action dims.
The memory is explicit data, not hidden module state: `step(obs, memory, memory_mask)` returns the
next memory, so PPO can store it per step, ONNX export can expose it, and a ROS node can keep it.
GTrXL: memory (N, L, K, D), mask (N, K) per slot. LSTM / GRU: memory (N, L, 2 (h, c) / 1 (h), D),
mask (N, 1): False zeroes the state (an episode start), as a masked slot gets no attention.
"""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Normal

from .config import AgentConfig


class GRUGate(nn.Module):
    """g(x, y) = (1 - z) * x + z * h, GRU-style, with z = sigmoid(W_z y + U_z x - b): near x at init."""

    def __init__(self, dim: int, bias: float):
        super().__init__()
        self.w = nn.Linear(dim, 3 * dim, bias=False)
        self.u = nn.Linear(dim, 2 * dim, bias=False)
        self.u_h = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.full((dim,), bias))

    def forward(self, x, y):
        wr, wz, wh = self.w(y).chunk(3, dim=-1)
        ur, uz = self.u(x).chunk(2, dim=-1)
        r = torch.sigmoid(wr + ur)
        z = torch.sigmoid(wz + uz - self.bias)
        h = torch.tanh(wh + self.u_h(r * x))
        return (1 - z) * x + z * h


class GatedBlock(nn.Module):
    def __init__(self, cfg: AgentConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.age = nn.Parameter(torch.randn(cfg.memory + 1, d) * 0.02)  # slot K = the current step
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.gate_att, self.gate_mlp = GRUGate(d, cfg.gate_bias), GRUGate(d, cfg.gate_bias)

    def forward(self, x, memory, mask):
        # x (N, D) current input, memory (N, K, D) this layer's past inputs (oldest first), mask (N, K)
        N, K, D = memory.shape
        H, hd = self.heads, D // self.heads
        context = self.norm_kv(torch.cat([memory, x[:, None]], dim=1) + self.age)  # (N, K+1, D)
        valid = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # the current step is always valid
        q = self.q(self.norm_q(x)).view(N, H, 1, hd)
        k, v = self.kv(context).view(N, K + 1, 2, H, hd).permute(2, 0, 3, 1, 4)  # (N, H, K+1, hd)
        logits = (q @ k.transpose(-2, -1)) / hd**0.5  # (N, H, 1, K+1)
        weights = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
        attended = self.out((weights @ v).reshape(N, D))
        x = self.gate_att(x, F.relu(attended))
        x = self.gate_mlp(x, F.relu(self.mlp(self.norm_mlp(x))))
        return x, weights.mean(dim=1)[:, 0]  # (N, D), attention over [memory..., current] (N, K+1)


class ActorCritic(nn.Module):
    """Shared trunk -> policy head (Categorical or diagonal Normal) and value head."""

    def __init__(self, obs_dim: int, action_space: gym.Space, cfg: AgentConfig):
        super().__init__()
        self.cfg = cfg
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        n_out = int(action_space.n) if self.discrete else int(np.prod(action_space.shape))
        self.embed = nn.Sequential(nn.Linear(obs_dim, cfg.dim), nn.LayerNorm(cfg.dim))
        self.blocks = nn.ModuleList(GatedBlock(cfg) for _ in range(cfg.layers)) if cfg.kind == "gtrxl" else None
        self.trunk = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.Tanh()) if cfg.kind == "mlp" else None
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}.get(cfg.kind)
        self.rnn = rnn(cfg.dim, cfg.dim, cfg.layers) if rnn else None
        if cfg.kind not in ("gtrxl", "mlp", "lstm", "gru"):
            raise ValueError(f"agent kind {cfg.kind!r}: gtrxl | mlp | lstm | gru")
        self.recurrent = self.rnn is not None
        self.norm = nn.LayerNorm(cfg.dim)
        self.policy = nn.Linear(cfg.dim, n_out)
        self.value = nn.Linear(cfg.dim, 1)
        nn.init.orthogonal_(self.policy.weight, 0.01)  # near-uniform / near-zero-mean first policy
        nn.init.zeros_(self.policy.bias)
        self.log_std = None if self.discrete else nn.Parameter(torch.full((n_out,), -0.5))

    def memory_shape(self, n: int) -> tuple[int, ...]:
        if self.recurrent:
            return (n, self.cfg.layers, 2 if self.cfg.kind == "lstm" else 1, self.cfg.dim)
        layers = self.cfg.layers if self.blocks is not None else 0
        return (n, layers, self.cfg.memory, self.cfg.dim)

    def initial_memory(self, n: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """All-empty memory: zeros and a mask of False ((N, K); (N, 1) for the recurrent kinds)."""
        slots = 1 if self.recurrent else self.cfg.memory
        return torch.zeros(self.memory_shape(n), device=device), torch.zeros(n, slots, dtype=torch.bool, device=device)

    def step(self, obs, memory, mask):
        """obs (N, obs_dim), memory (N, L, K, D), mask (N, K) -> head output (N, A), value (N,),
        next memory, next mask, attention of the last layer over [memory, current] (N, K+1); agents
        without attention give (N, 1) ones."""
        x, memory, mask, attention = self.features(obs, memory, mask)
        return *self.heads(x), memory, mask, attention

    def heads(self, x):
        """Trunk features (N, D) -> policy head output (N, A), value (N,)."""
        return self.policy(x), self.value(x)[:, 0]

    def features(self, obs, memory, mask):
        """What both heads read: obs (N, obs_dim), memory, mask -> features (N, D), next memory, next
        mask, attention (as `step`)."""
        x = self.embed(obs)
        attention = torch.ones(obs.shape[0], 1, device=obs.device)
        if self.trunk is not None:
            return self.trunk(x), memory, mask, attention
        if self.recurrent:
            y, state = self.rnn(x[None], self._state(memory, mask))
            return self.norm(y[0]), self._memory(state), torch.ones_like(mask), attention
        inputs = []
        for layer, block in enumerate(self.blocks):
            inputs.append(x)  # what this layer saw now: the newest slot of its memory next step
            x, attention = block(x, memory[:, layer], mask)
        next_memory = torch.cat([memory[:, :, 1:], torch.stack(inputs, dim=1)[:, :, None]], dim=2)
        next_mask = torch.cat([mask[:, 1:], torch.ones_like(mask[:, :1])], dim=1)
        return self.norm(x), next_memory, next_mask, attention

    def unroll(self, obs, memory, mask):
        """The recurrent kinds over stored sequences, for training: obs (T, N, obs_dim), memory at the
        first step, mask (T, N, 1), False where an episode starts -> features (T * N, D), flat t * N +
        env: what `features` gives step by step. Each stretch without an episode start is one call of
        the fused RNN (several times faster than a call per step)."""
        x = self.embed(obs)
        cuts = [0, *((~mask[1:, :, 0]).any(1).nonzero()[:, 0] + 1).tolist(), len(obs)]
        out = []
        for a, b in itertools.pairwise(cuts):
            y, state = self.rnn(x[a:b], self._state(memory, mask[a]))
            memory = self._memory(state)
            out.append(y)
        return self.norm(torch.cat(out)).flatten(0, 1)

    def _state(self, memory, keep):
        """memory (N, L, S, D), keep (N, 1) -> torch's RNN state, (L, N, D) each, zero where not kept."""
        state = (memory * keep[:, :, None, None].to(memory.dtype)).transpose(0, 1)
        h = state[:, :, 0].contiguous()
        return (h, state[:, :, 1].contiguous()) if self.cfg.kind == "lstm" else h

    @staticmethod
    def _memory(state) -> torch.Tensor:
        """torch's RNN state -> memory (N, L, S, D)."""
        return torch.stack(state if isinstance(state, tuple) else (state,), dim=2).transpose(0, 1)

    def distribution(self, head):
        if self.discrete:
            return Categorical(logits=head)
        return Normal(head, self.log_std.exp().expand_as(head))

    def log_prob(self, dist, action):
        return dist.log_prob(action) if self.discrete else dist.log_prob(action).sum(-1)

    def entropy(self, dist):
        return dist.entropy() if self.discrete else dist.entropy().sum(-1)


def reset_memory(mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Mask out every memory slot of the environments whose episode starts now (starts (N,) bool)."""
    return mask & ~starts[:, None]


class ExportedPolicy(nn.Module):
    """The deterministic policy with its memory as explicit inputs and outputs (for ONNX)."""

    def __init__(self, agent: ActorCritic):
        super().__init__()
        self.agent = agent

    def forward(self, obs, memory, memory_mask):
        head, value, memory, memory_mask, attention = self.agent.step(obs, memory, memory_mask)
        action = head.argmax(-1) if self.agent.discrete else head
        return action, value, memory, memory_mask, attention
