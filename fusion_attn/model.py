"""Temperature-controlled cross-attention fusion (PyTorch).

M learned fusion tokens attend over all sensor tokens (camera patches, lidar pillars, IMU chunks).
The softmax temperature is an input: logits of a token of modality m are divided by
τ_global * τ_m (* a learned per-head τ when enabled), so τ changes need no re-export. Small τ makes
the attention pointer-like (all mass on the best-matching tokens); large τ spreads it uniformly over
the valid tokens. Masked tokens get exactly zero weight; with every token masked the cross-attention
contributes nothing and `all_masked` is set.

Shapes: B batch, N_c/N_l/N_i tokens per modality, N = N_c + N_l + N_i, P points per pillar,
D model width, H heads, M fusion tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig, ModelConfig
from .frames import Modality


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, exactly 0 where mask is False, all-zero rows when nothing is valid."""
    logits = logits.masked_fill(~mask, float("-inf"))
    peak = logits.amax(dim=-1, keepdim=True).clamp_min(-1e30)  # finite even for an all-masked row
    weights = torch.exp(logits - peak)  # exp(-inf) = 0 on masked entries
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def softmax_lipschitz(logits: torch.Tensor, tau: float | torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Local Lipschitz constant of z -> softmax(z / τ): the spectral norm of its Jacobian at `logits`.

    J = (diag(p) - p pᵀ) / τ is symmetric PSD, so its spectral norm is its largest eigenvalue; it is
    at most 1 / (2τ) and shrinks as p spreads out. logits (..., N) -> (...,). The stability diagnostic:
    a sharp (small-τ) attention amplifies perturbations of the logits by up to this factor.
    """
    tau = torch.as_tensor(tau, dtype=logits.dtype)
    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    p = masked_softmax(logits / tau.unsqueeze(-1) if tau.dim() else logits / tau, mask)
    jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    jac = jac / (tau[..., None, None] if tau.dim() else tau)
    return torch.linalg.eigvalsh(jac.double()).amax(dim=-1).clamp_min(0).to(logits.dtype)


def fourier_age(age: torch.Tensor, n: int) -> torch.Tensor:
    """(...,) age [s] -> (..., 2n) sin/cos features at geometric frequencies from 1 to 1000 rad/s."""
    freqs = torch.logspace(0, 3, n, dtype=age.dtype, device=age.device)
    angle = age.unsqueeze(-1) * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows*cols, dim) fixed 2-D sine-cosine position embedding, as in ViT/MAE."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij")
    r, c = r.reshape(-1, 1) * omega, c.reshape(-1, 1) * omega
    emb = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SensorEmbedding(nn.Module):
    """Named sensor inputs -> tokens (B, N, D), token mask (B, N) and modality id per token (N,)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d = cfg.model.dim
        self.camera = nn.Linear(cfg.camera.features, d)
        self.register_buffer("camera_pos", sincos_2d(cfg.camera.height // cfg.camera.patch,
                                                     cfg.camera.width // cfg.camera.patch, d), persistent=False)
        self.lidar = MLP(cfg.lidar.features, d, d)  # shared per-point MLP + masked max: a small PointNet
        self.imu = MLP(cfg.imu.features, d, d)
        self.modality = nn.Parameter(torch.randn(3, d) * 0.02)
        self.age = nn.Linear(2 * cfg.model.age_frequencies, d)
        self.age_frequencies = cfg.model.age_frequencies
        self.norm = nn.LayerNorm(d)
        ids = [Modality.CAMERA] * cfg.camera.tokens + [Modality.LIDAR] * cfg.lidar.tokens + [Modality.IMU] * cfg.imu.tokens
        self.register_buffer("modality_id", torch.tensor([int(m) for m in ids]), persistent=False)

    def forward(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.camera(x["camera_patches"]) + self.camera_pos  # (B, N_c, D)
        point_mask = x["lidar_mask"]  # (B, N_l, P)
        per_point = self.lidar(x["lidar_points"]).masked_fill(~point_mask.unsqueeze(-1), float("-inf"))
        lidar_mask = point_mask.any(dim=-1)  # (B, N_l)
        lidar = torch.where(lidar_mask.unsqueeze(-1), per_point.amax(dim=2), 0.0)  # (B, N_l, D)
        imu = self.imu(x["imu_chunks"])  # (B, N_i, D)
        tokens = torch.cat([cam, lidar, imu], dim=1) + self.modality[self.modality_id]  # (B, N, D)
        age = torch.cat([x["camera_age"], x["lidar_age"], x["imu_age"]], dim=1)  # (B, N)
        tokens = self.norm(tokens + self.age(fourier_age(age, self.age_frequencies)))
        mask = torch.cat([x["camera_mask"], lidar_mask, x["imu_mask"]], dim=1)  # (B, N)
        return tokens, mask


class CrossAttention(nn.Module):
    """Fusion tokens (queries) over sensor tokens with a per-token temperature."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.q, self.kv, self.out = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, 2 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.qk_norm = cfg.qk_norm
        # log of the learned scale (QK-norm) and of the per-head τ; both start neutral
        self.log_qk_scale = nn.Parameter(torch.full((cfg.heads,), math.log(math.sqrt(self.head_dim)))) if cfg.qk_norm else None
        self.log_head_tau = nn.Parameter(torch.zeros(cfg.heads)) if cfg.learned_head_temperature else None

    def forward(self, queries, tokens, mask, token_tau):
        # queries (B, M, D), tokens (B, N, D), mask (B, N), token_tau (B, N) -> (B, M, D), weights (B, H, M, N)
        B, M, D = queries.shape
        N = tokens.shape[1]
        q = self.q(queries).view(B, M, self.heads, self.head_dim).transpose(1, 2)  # (B, H, M, hd)
        k, v = self.kv(tokens).view(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        if self.log_qk_scale is not None:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            logits = (q @ k.transpose(-2, -1)) * self.log_qk_scale.exp().view(1, -1, 1, 1)
        else:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, M, N)
        tau = token_tau.unsqueeze(1)  # (B, 1, N)
        if self.log_head_tau is not None:
            tau = tau * self.log_head_tau.exp().view(1, -1, 1)  # (B, H, N)
        weights = masked_softmax(logits / tau.unsqueeze(2), mask[:, None, None, :])
        fused = (weights @ v).transpose(1, 2).reshape(B, M, D)
        return self.out(fused), weights


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block over the fusion tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv, self.proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x):  # (B, M, D)
        B, M, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, M, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, M, D))
        return x + self.mlp(self.norm2(x))


class FusionModel(nn.Module):
    """Named sensor inputs (see tokenize.input_spec) -> fused (B, D), latents (B, M, D),
    attention (B, 3, H) mass per modality and head, all_masked (B,)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.embed = SensorEmbedding(cfg)
        self.queries = nn.Parameter(torch.randn(m.fusion_tokens, m.dim) * 0.02)
        self.query_norm, self.token_norm = nn.LayerNorm(m.dim), nn.LayerNorm(m.dim)
        self.cross = CrossAttention(m)
        self.cross_mlp_norm = nn.LayerNorm(m.dim)
        self.cross_mlp = MLP(m.dim, m.mlp_ratio * m.dim, m.dim)
        self.blocks = nn.ModuleList(SelfAttentionBlock(m) for _ in range(m.latent_blocks))
        self.out_norm = nn.LayerNorm(m.dim)
        # one-hot modality membership of each token, to sum attention per modality with a matmul
        self.register_buffer("membership", F.one_hot(self.embed.modality_id, 3).float(), persistent=False)

    def forward(self, camera_patches, camera_mask, camera_age, lidar_points, lidar_mask, lidar_age,
                imu_chunks, imu_mask, imu_age, tau):
        x = {"camera_patches": camera_patches, "camera_mask": camera_mask, "camera_age": camera_age,
             "lidar_points": lidar_points, "lidar_mask": lidar_mask, "lidar_age": lidar_age,
             "imu_chunks": imu_chunks, "imu_mask": imu_mask, "imu_age": imu_age}
        tokens, mask = self.embed(x)  # (B, N, D), (B, N)
        token_tau = tau[:, :1] * (tau[:, 1:] @ self.membership.T)  # (B, N): τ_global * τ_modality
        B = tokens.shape[0]
        queries = self.queries.expand(B, -1, -1)
        attended, weights = self.cross(self.query_norm(queries), self.token_norm(tokens), mask, token_tau)
        latents = queries + attended
        latents = latents + self.cross_mlp(self.cross_mlp_norm(latents))
        for block in self.blocks:
            latents = block(latents)
        latents = self.out_norm(latents)  # (B, M, D)
        attention = (weights.mean(dim=2) @ self.membership).transpose(1, 2)  # (B, 3, H)
        return latents.mean(dim=1), latents, attention, ~mask.any(dim=1)
