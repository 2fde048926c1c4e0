"""Temperature-controlled cross-attention fusion (PyTorch).

M learned fusion tokens attend over all sensor tokens (camera patches, lidar pillars, IMU chunks).
The softmax temperature is an input: logits of a token of modality m are divided by
τ_global * τ_m (* a learned per-head τ when enabled), so τ changes need no re-export. Small τ makes
the attention pointer-like (all mass on the best-matching tokens); large τ spreads it uniformly over
the valid tokens. Masked tokens get exactly zero weight; with every token masked the cross-attention
contributes nothing and `all_masked` is set.

Shapes: B batch, S sensors (FusionConfig.sensors), N_c/N_l/N_i/N_o tokens per sensor, N their sum,
P points per pillar, D model width, H heads, M fusion tokens.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CameraTokens, ChunkTokens, FusionConfig, LidarTokens, ModelConfig, OdometryTokens
from .tokenize import IMU_AXES, LIDAR_INDEX, ODOMETRY_AXES, imu_samples, output_names


def log_mask(mask: torch.Tensor) -> torch.Tensor:
    """0 where mask is True, -inf where False. Added to a larger tensor it masks exactly as masked_fill
    does, but as a broadcast Add, which ONNX Runtime runs several times faster than a broadcast Where."""
    return mask.float().log()


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, exactly 0 where mask is False, all-zero rows when nothing is valid."""
    logits = logits + log_mask(mask)
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


def column_shift_match(patches, prev_patches, cam: CameraTokens, shifts: int) -> torch.Tensor:
    """(B, N_c, p*p*3) patches of a frame and of the one before -> (B, N_c, 2S+1): for each patch, the
    mean absolute difference of its column profile (each pixel column's mean over the patch's rows)
    from the previous frame's shifted by -S..S columns, over the curve's mean. Where the curve dips
    is how far that part of the image moved sideways: yaw moves every column alike, driving moves
    the sides apart. Edges repeat the border column, so a pinhole camera and a panorama work alike."""
    B, p = patches.shape[0], cam.patch
    rows, cols = cam.height // p, cam.width // p

    def profile(x):  # (B, N_c, p*p*3) in (row, col) token order, (py, px, c) features -> (B, rows, W, 3)
        return x.view(B, rows, cols, p, p, 3).mean(3).reshape(B, rows, cols * p, 3)

    W = cols * p
    # column w of `before` shifted by s is its column w - s, clamped: one Gather for every shift
    w = torch.arange(W, device=patches.device)
    source = (w[:, None] - torch.arange(-shifts, shifts + 1, device=patches.device)).clamp(0, W - 1)  # (W, 2S+1)
    now, before = profile(patches), profile(prev_patches)
    err = (now.unsqueeze(3) - before[:, :, source]).abs().mean(-1)  # (B, rows, W, 2S+1)
    err = err.view(B, rows, cols, p, 2 * shifts + 1).mean(3).reshape(B, rows * cols, 2 * shifts + 1)
    return err / (err.mean(-1, keepdim=True) + 1e-2)


SCAN_MATCH_GATES_M = (0.5, 0.3, 0.2, 0.1)  # inlier distance of each Gauss-Newton step, shrinking
SCAN_MATCH_FEATURES = 6


def _pillar_lines(xy, mask):
    """(B, K, P, 2) points [m], (B, K, P) -> each pillar's centroid (B, K, 2), unit normal of its points'
    principal line (B, K, 2) and whether they form a line (B, K): a 2x2 covariance's eigenvector, closed form."""
    w = mask.to(xy.dtype)
    n = w.sum(-1).clamp_min(1e-6)
    centre = (xy * w.unsqueeze(-1)).sum(2) / n.unsqueeze(-1)
    d = (xy - centre.unsqueeze(2)) * w.unsqueeze(-1)
    a, b, c = (d[..., 0] ** 2).sum(-1) / n, (d[..., 0] * d[..., 1]).sum(-1) / n, (d[..., 1] ** 2).sum(-1) / n
    root = torch.sqrt((0.5 * (a - c)) ** 2 + b**2)
    low, high = 0.5 * (a + c) - root, 0.5 * (a + c) + root
    v1, v2 = torch.stack([b, low - a], -1), torch.stack([low - c, b], -1)  # both solve (cov - low) v = 0
    v = torch.where((v1.norm(dim=-1) >= v2.norm(dim=-1)).unsqueeze(-1), v1, v2)
    normal = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return centre, normal, (n >= 3) & (low < 0.1 * high) & (high > 1e-4)


def _cell_of(xy, lidar: LidarTokens):
    """(..., 2) points [m] -> (...) index of their grid cell, as tokenize_lidar bins them (edges clamped)."""
    ij = ((xy + lidar.range_m) * (lidar.grid / (2.0 * lidar.range_m))).floor().clamp(0, lidar.grid - 1)
    return (ij[..., 0] * lidar.grid + ij[..., 1]).long()


def _cell_table(x, centre, normal, is_line, lidar: LidarTokens):
    """A lookup from grid cell to pillar: (B, grid^2) pillar index, K where no line pillar is, and each
    pillar's line (B, K + 1, 4), the K-th "none". A pillar's cell is where its points' offsets (dx, dy
    from the cell's centre) put the centre."""
    per_m = lidar.grid / (2.0 * lidar.range_m)
    pts, mask = x["lidar_points"].detach(), x["lidar_mask"].to(centre.dtype)
    offset = pts[..., [LIDAR_INDEX["dx"], LIDAR_INDEX["dy"]]] / per_m  # (B, K, P, 2) [m]
    cell_centre = ((pts[..., [LIDAR_INDEX["x"], LIDAR_INDEX["y"]]] * lidar.range_m - offset) * mask.unsqueeze(-1)).sum(2) \
        / mask.sum(2).clamp_min(1).unsqueeze(-1)
    B, K = is_line.shape
    cells = lidar.grid * lidar.grid
    cell = torch.where(is_line, _cell_of(cell_centre, lidar), cells)  # no line: the spare slot
    pillar = torch.arange(K, device=centre.device).expand(B, K)
    table = torch.full((B, cells + 1), K, dtype=torch.long, device=centre.device).scatter(1, cell, pillar)[:, :cells]
    # per pillar, and a K-th "none" one: normal, the line's offset n . centre, 1 for a line
    line = torch.cat([normal, (normal * centre).sum(-1, keepdim=True), is_line.unsqueeze(-1).to(centre.dtype)], -1)
    return table, torch.cat([line, line.new_zeros(B, 1, 4)], 1), lidar


def _moved(q, pose, quarter_turn):
    """(B, N, 2) points moved by pose (B, 3: theta, tx, ty) -> R q + t, and R q turned by +90 degrees
    (the derivative of R q by theta)."""
    cos, sin = pose[:, 0].cos(), pose[:, 0].sin()
    rotation_t = torch.stack([cos, sin, -sin, cos], -1).view(-1, 2, 2)  # R transposed: row vectors times it
    rotated = q @ rotation_t
    return rotated + pose[:, None, 1:], rotated @ quarter_turn


def _line_residuals(moved, lines, gate):
    """Each moved point's signed distance to the line of the pillar whose cell it falls in (B, N), that
    line's normal (B, N, 2), and whether it is an inlier: in a line pillar's cell and within `gate` of the
    line. A lookup by grid cell, not a nearest-neighbour search: O(N), not O(N K)."""
    table, line, lidar = lines
    pillar = table.gather(1, _cell_of(moved, lidar))  # (B, N)
    hit = line.gather(1, pillar.unsqueeze(-1).expand(-1, -1, 4))  # (B, N, 4): its pillar's line
    n = hit[..., :2]
    r = (n * moved).sum(-1) - hit[..., 2]
    return r, n, (hit[..., 3] > 0) & (r.abs() < gate)


def _adjugate_map() -> torch.Tensor:
    """(81, 9): the outer product of a 3x3 matrix's entries with itself, flattened, times this is its
    adjugate, flattened: adj[i, j] = a[j+1, i+1] a[j+2, i+2] - a[j+1, i+2] a[j+2, i+1] (indices mod 3)."""
    m = torch.zeros(9, 9, 9)
    for i in range(3):
        for j in range(3):
            j1, j2, i1, i2 = (j + 1) % 3, (j + 2) % 3, (i + 1) % 3, (i + 2) % 3
            m[3 * j1 + i1, 3 * j2 + i2, 3 * i + j] += 1.0
            m[3 * j1 + i2, 3 * j2 + i1, 3 * i + j] -= 1.0
    return m.view(81, 9)


ADJUGATE_MAP = _adjugate_map()


def _solve3(a, g):
    """(B, 3, 3), (B, 3) -> a^-1 g by the adjugate: a product with a fixed matrix, few graph ops, no solver."""
    flat = a.flatten(1)  # (B, 9)
    adj = ((flat.unsqueeze(2) * flat.unsqueeze(1)).flatten(1) @ ADJUGATE_MAP.to(a)).view(-1, 3, 3)
    det = (a[:, 0] * adj[:, :, 0]).sum(-1, keepdim=True)  # (a adj)[0, 0]
    solvable = det.abs() > 1e-12  # fp32 cancellation can leave a degenerate system (one wall) at 0: no step
    return torch.where(solvable, (adj @ g.unsqueeze(-1)).squeeze(-1) / torch.where(solvable, det, 1.0), 0.0)


def lidar_scan_match(x: dict[str, torch.Tensor], lidar: LidarTokens) -> torch.Tensor:
    """The lidar's own ego-motion evidence: (B, SCAN_MATCH_FEATURES) from its two sweeps' pillar points.

    A point-to-line ICP (Gauss-Newton on rotation and translation, fixed steps with a shrinking gate)
    of the previous sweep's points onto the lines of this sweep's pillars (each pillar's principal
    line through its centroid; a point is matched to the pillar whose grid cell it falls in).
    Features: yaw rate [rad/s], forward and sideways speed [m/s] of the sensor between the sweeps
    (clamped to +-10), the share of inliers, log of their RMS residual and 1 where there was
    something to match. A frozen sweep (nothing moved) and a noisy one (few inliers) show in them.
    Not trained: a fixed function of the inputs, so it exports as plain graph ops (no solver, no
    atan2, no neighbour search).
    """
    xy_i = [LIDAR_INDEX["x"], LIDAR_INDEX["y"]]
    now, before = x["lidar_points"][..., xy_i] * lidar.range_m, x["lidar_prev_points"][..., xy_i] * lidar.range_m
    centre, normal, is_line = _pillar_lines(now.detach(), x["lidar_mask"])
    lines = _cell_table(x, centre, normal, is_line, lidar)
    q, q_mask = before.detach().flatten(1, 2), x["lidar_prev_mask"].flatten(1, 2)  # (B, N, 2), (B, N)
    pose = q.new_zeros(q.shape[0], 3)  # theta, tx, ty: q moved onto now by R(theta) q + t
    damping = 1e-3 * torch.eye(3, dtype=q.dtype, device=q.device)
    quarter_turn = q.new_tensor([[0.0, 1.0], [-1.0, 0.0]])  # row vector v @ this = v turned by +90 degrees
    for gate in SCAN_MATCH_GATES_M:
        moved, turned = _moved(q, pose, quarter_turn)
        r, n, inlier = _line_residuals(moved, lines, gate)
        jac = torch.cat([(n * turned).sum(-1, keepdim=True), n], -1) * (inlier & q_mask).unsqueeze(-1)  # (B, N, 3)
        pose = pose - _solve3(jac.transpose(1, 2) @ jac + damping, (jac * r.unsqueeze(-1)).sum(1))
    theta, t = pose[:, 0], pose[:, 1:]
    r, _, inlier = _line_residuals(_moved(q, pose, quarter_turn)[0], lines, SCAN_MATCH_GATES_M[-1])
    w = (inlier & q_mask).to(q.dtype)
    n_q = q_mask.sum(1).clamp_min(1)
    share = w.sum(1) / n_q
    rms = ((r.pow(2) * w).sum(1) / w.sum(1).clamp_min(1)).sqrt()
    interval = (x["lidar_prev_age"] - x["lidar_age"])[:, 0]
    valid = (interval > 1e-3) & (is_line.sum(1) >= 3) & (w.sum(1) >= 10)
    per_s = 1.0 / interval.clamp_min(1e-3)
    # q moved onto now: the sensor turned by -theta and moved by -t (first order)
    rates = torch.stack([-theta * per_s, -t[:, 0] * per_s, -t[:, 1] * per_s], -1).clamp(-10.0, 10.0)
    out = torch.cat([rates, share.unsqueeze(-1), torch.log(rms + 1e-3).unsqueeze(-1), torch.ones_like(share).unsqueeze(-1)], -1)
    return torch.where(valid.unsqueeze(-1), out, 0.0)


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PatchStem(nn.Module):
    """Camera patches (B, N, p*p*3; rows, columns, RGB) -> tokens (B, N, D) by a two-layer strided
    convolution: one shared layer over each cell of a k x k grid in the patch, then one over the
    cells' features in place. One linear layer over the whole patch can weigh a thin post by where it
    stands, but not tell where from how large; here each cell reads it first (k = p: each pixel)."""

    def __init__(self, patch: int, channels: int, d: int, cells: int):
        super().__init__()
        self.k, self.cell = cells, patch // cells
        self.cells = nn.Linear(self.cell * self.cell * 3, channels)
        self.out = nn.Linear(cells * cells * channels, d)

    def forward(self, patches):
        k, c = self.k, self.cell
        x = patches.unflatten(-1, (k, c, k, c, 3)).transpose(-4, -3)  # (B, N, k, k, c, c, 3): cell row, col
        x = F.gelu(self.cells(x.flatten(-3)))  # (B, N, k, k, C)
        return self.out(x.flatten(-3))  # (B, N, D)


class SensorEmbedding(nn.Module):
    """Named sensor inputs -> tokens (B, N, D), token mask (B, N), per-sensor evidence (B, S, E) and, with
    model.lidar_motion, the scan match (B, SCAN_MATCH_FEATURES) (else None).

    Each token also carries what changed since its sensor's previous frame: a camera patch its
    difference from the same patch one frame back, every lidar pillar the change of the whole
    sweep's PointNet descriptor (and, with model.lidar_motion, the two sweeps' scan match; with
    model.lidar_motion_token that match is one more lidar token instead, after the pillars). That is
    the model's evidence of motion, and of a frozen sensor (no change at all). `evidence` adds a few statistics per sensor for the trust estimate (see _evidence).
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d = cfg.model.dim
        self.cfg = cfg
        stem = cfg.model.camera_stem
        self.camera = PatchStem(cfg.camera.patch, stem, d, cfg.model.camera_stem_cells) if stem else nn.Linear(cfg.camera.features, d)
        self.camera_change = nn.Linear(cfg.camera.features, d, bias=False)
        shifts = cfg.model.camera_shifts
        self.camera_motion = nn.Linear(2 * shifts + 1, d, bias=False) if shifts else None
        self.camera_grid = (cfg.camera.height // cfg.camera.patch, cfg.camera.width // cfg.camera.patch)  # rows, cols
        self.register_buffer("camera_pos", sincos_2d(*self.camera_grid, d), persistent=False)
        self.camera_columns = nn.ModuleList(SelfAttentionBlock(cfg.model) for _ in range(cfg.model.camera_column_blocks))
        self.lidar = MLP(cfg.lidar.features, d, d)  # shared per-point MLP + masked max: a small PointNet
        self.lidar_change = nn.Linear(d, d, bias=False)
        self.lidar_motion = nn.Linear(SCAN_MATCH_FEATURES, d, bias=False) if cfg.model.lidar_motion else None
        self.imu = MLP(cfg.imu.features, d, d)
        self.odometry = MLP(cfg.odometry.features, d, d) if cfg.model.odometry else None
        self.modality = nn.Parameter(torch.randn(len(cfg.sensors), d) * 0.02)
        self.no_previous = nn.Parameter(torch.randn(2, d) * 0.02)  # camera, lidar: no previous frame to compare
        self.age = nn.Linear(2 * cfg.model.age_frequencies, d)
        self.interval = nn.Linear(2 * cfg.model.age_frequencies, d, bias=False)  # time to the previous frame
        self.age_frequencies = cfg.model.age_frequencies
        self.norm = nn.LayerNorm(d)
        self.counts = (cfg.camera.tokens, cfg.lidar.tokens + cfg.model.lidar_motion_token,
                       *(cfg.chunk_tokens(n).tokens for n in cfg.streams))  # per sensor
        # each token's sensor, by its place in cfg.sensors (a second IMU is the fourth sensor of a model without odometry)
        ids = [s for s, n in enumerate(self.counts) for _ in range(n)]
        self.register_buffer("modality_id", torch.tensor(ids), persistent=False)

    def pillars(self, points, point_mask):
        """(B, N_l, P, F), (B, N_l, P) -> pillar tokens (B, N_l, D), pillar mask (B, N_l)."""
        per_point = self.lidar(points) + log_mask(point_mask).unsqueeze(-1)
        mask = point_mask.any(dim=-1)
        return torch.where(mask.unsqueeze(-1), per_point.amax(dim=2), 0.0), mask

    def camera_appearance(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches (B, N_c, p*p*3) -> what each camera token shows (B, N_c, D): the patch embedded at its
        place, then through the column blocks (model.camera_column_blocks), each column's rows a
        sequence of their own; what changed since the previous frame is added in `forward`."""
        cam = self.camera(patches) + self.camera_pos
        if not self.camera_columns:
            return cam
        (rows, cols), D = self.camera_grid, cam.shape[-1]
        x = cam.reshape(-1, rows, cols, D).transpose(1, 2).reshape(-1, rows, D)  # (B * cols, rows, D)
        for block in self.camera_columns:
            x = block(x)
        return x.reshape(-1, cols, rows, D).transpose(1, 2).reshape(cam.shape)

    def forward(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> tokens (B, N, D), mask (B, N), evidence (B, S, E) and the scan match (B, SCAN_MATCH_FEATURES)
        with model.lidar_motion, else None."""
        fourier = functools.partial(fourier_age, n=self.age_frequencies)
        # camera (B, N_c, D): the patch, its change since the previous frame (or "no previous frame")
        cam_mask, cam_prev = x["camera_mask"], x["camera_prev_mask"] & x["camera_mask"]
        change = (x["camera_patches"] - x["camera_prev_patches"]) * cam_prev.unsqueeze(-1)
        since_prev = self.camera_change(change) + self.interval(fourier(x["camera_prev_age"] - x["camera_age"]))
        if self.camera_motion is not None:
            since_prev = since_prev + self.camera_motion(column_shift_match(
                x["camera_patches"], x["camera_prev_patches"], self.cfg.camera, self.cfg.model.camera_shifts))
        cam = self.camera_appearance(x["camera_patches"]) + torch.where(
            cam_prev.unsqueeze(-1), since_prev, self.no_previous[0])
        # lidar (B, N_l, D): pillars, plus the change of the sweep's descriptor (masked max over pillars)
        lidar, lidar_mask = self.pillars(x["lidar_points"], x["lidar_mask"])
        prev, prev_mask = self.pillars(x["lidar_prev_points"], x["lidar_prev_mask"])
        has_prev = prev_mask.any(dim=1) & lidar_mask.any(dim=1)  # (B,)
        sweep = _masked_max(lidar, lidar_mask)
        sweep_change = torch.where(has_prev.unsqueeze(-1), sweep - _masked_max(prev, prev_mask), 0.0)  # (B, D)
        lidar_interval = (x["lidar_prev_age"] - x["lidar_age"])[:, 0]  # (B,)
        since_prev = self.lidar_change(sweep_change) + self.interval(fourier(lidar_interval))
        motion, motion_mask, motion_age = [], [], []  # the scan match as a token of its own (lidar_motion_token)
        scan = None
        if self.lidar_motion is not None:
            scan = lidar_scan_match(x, self.cfg.lidar)  # (B, SCAN_MATCH_FEATURES); its last feature: 1 if matched
            if self.cfg.model.lidar_motion_token:
                motion = [self.lidar_motion(scan).unsqueeze(1)]  # (B, 1, D)
                motion_mask, motion_age = [scan[:, -1:] > 0], [x["lidar_age"][:, :1]]
            else:
                since_prev = since_prev + self.lidar_motion(scan)
        lidar = lidar + torch.where(has_prev[:, None, None], since_prev.unsqueeze(1), self.no_previous[1])
        # (B, N_i, D) each: the IMU's chunks, the odometry's, a second IMU's through the first's layers (one make
        # of sensor, read alike; its sensor embedding tells them apart)
        streams = [(self.odometry if n == "odometry" else self.imu)(x[f"{n}_chunks"]) for n in self.cfg.streams]
        tokens = torch.cat([cam, lidar, *motion, *streams], dim=1) + self.modality[self.modality_id]  # (B, N, D)
        age = torch.cat([x["camera_age"], x["lidar_age"], *motion_age, *(x[f"{n}_age"] for n in self.cfg.streams)], dim=1)  # (B, N)
        tokens = self.norm(tokens + self.age(fourier(age)))
        mask = torch.cat([cam_mask, lidar_mask, *motion_mask, *(x[f"{n}_mask"] for n in self.cfg.streams)], dim=1)  # (B, N)
        return tokens, mask, self._evidence(x, change, cam_prev, sweep_change, has_prev), scan

    def _evidence(self, x, cam_change, cam_prev, sweep_change, lidar_has_prev) -> torch.Tensor:
        """(B, S, EVIDENCE) log-scale statistics a detector needs and a mean of tokens hides: how much
        the camera and lidar changed since their previous frame (exactly nothing when frozen), the
        camera's pixel spread and its spread across patches (black, noisy, half occluded), the share
        of the lidar's octants with points (a blocked sector), the IMU's (and odometry's) spread over its
        window per axis group (a stuck or zeroed IMU has none). Zero where it does not apply."""
        eps = 1e-6
        B = cam_change.shape[0]
        patches, cam_mask = x["camera_patches"], x["camera_mask"]
        n_cam = cam_mask.sum(1).clamp_min(1)
        n_prev = cam_prev.sum(1).clamp_min(1)
        cam_delta = (cam_change.abs().mean(-1) * cam_prev).sum(1) / n_prev
        patch_std = patches[..., ::4].std(-1)  # (B, N_c); every 4th value of a patch is plenty, and cheaper
        mean_std = (patch_std * cam_mask).sum(1) / n_cam
        patch_mean = patches.mean(-1)
        mu = (patch_mean * cam_mask).sum(1, keepdim=True) / n_cam.unsqueeze(1)
        across = (((patch_mean - mu) ** 2 * cam_mask).sum(1) / n_cam).sqrt()
        camera = torch.stack([torch.log(cam_delta + eps) * cam_prev.any(1), torch.log(mean_std + eps),
                              torch.log(across + eps), cam_prev.any(1).float()], dim=1)
        # lidar: octants by sign and |x| vs |y|, so no atan2 (the exported graph stays plain)
        pts, pmask = x["lidar_points"], x["lidar_mask"]
        px, py = pts[..., LIDAR_INDEX["x"]], pts[..., LIDAR_INDEX["y"]]
        octant = (px >= 0).long() * 4 + (py >= 0).long() * 2 + (px.abs() >= py.abs()).long()  # (B, N_l, P)
        hits = F.one_hot(octant, 8).float() * pmask.unsqueeze(-1)
        occupied = (hits.flatten(1, 2).sum(1) > 0).float().mean(1)  # (B,)
        delta = sweep_change.abs().mean(-1)
        lidar = torch.stack([torch.log(delta + eps) * lidar_has_prev, occupied,
                             torch.log(pmask.any(-1).float().sum(1) + 1.0), lidar_has_prev.float()], dim=1)
        rates = [_rate_evidence(x[f"{n}_chunks"], x[f"{n}_mask"], self.cfg.chunk_tokens(n)) for n in self.cfg.streams]
        return torch.stack([camera, lidar, *rates], dim=1).reshape(B, len(self.cfg.sensors), EVIDENCE)


def _rate_evidence(chunks, mask, cfg) -> torch.Tensor:
    """(B, EVIDENCE) of a six-axis stream (IMU, odometry): the spread of each axis group (accel, gyro; velocity,
    turn rate) over the valid chunks' samples, the first group's mean magnitude, and whether any chunk is valid."""
    eps = 1e-6
    samples = imu_samples(chunks, cfg)  # (B, n, S, 6)
    w = mask.float()[:, :, None, None]
    n = (w.sum((1, 2)) * samples.shape[2]).clamp_min(1)  # (B, 1)
    mean = (samples * w).sum((1, 2)) / n
    var = (((samples - mean[:, None, None]) ** 2) * w).sum((1, 2)) / n  # (B, 6)
    return torch.stack([torch.log(var[:, :3].mean(1).sqrt() + eps), torch.log(var[:, 3:].mean(1).sqrt() + eps),
                        torch.log(mean[:, :3].norm(dim=1) + eps), mask.any(1).float()], dim=1)


def _masked_max(tokens, mask):
    """(B, N, D), (B, N) -> (B, D): the max over valid tokens, 0 with none."""
    return torch.where(mask.any(1, keepdim=True), (tokens + log_mask(mask).unsqueeze(-1)).amax(1), 0.0)


EVIDENCE = 4  # statistics per sensor in SensorEmbedding._evidence


class SensorTrust(nn.Module):
    """Per-sensor trust logits (B, S) from each sensor's tokens (masked mean and max), its evidence
    statistics and the other present sensors' summaries (disagreement between sensors is evidence
    too). An absent sensor's logit is -inf: trust sigmoid(logit) = 0, and no weight in the fusion."""

    def __init__(self, cfg: ModelConfig, sensors: int):
        super().__init__()
        d = cfg.dim
        self.summary = MLP(2 * d + EVIDENCE, d, d)
        self.modality = nn.Parameter(torch.randn(sensors, d) * 0.02)
        self.logit = MLP(2 * d, d, 1)
        # stale_evidence: for the camera, a logistic (slope, bias) on its change statistic alone
        # (evidence[:, 0, 0]); it starts silent (a stale logit of -6 caps the trust at 0.9975). The camera
        # only: a working camera's pixel noise makes no two of its frames alike, while a point cloud may
        # repeat on a healthy sensor (a radar's targets in a still scene: the SICK recording's, docs/RESULTS.md)
        self.stale = nn.Parameter(torch.tensor([0.0, -6.0])) if cfg.stale_evidence else None

    def forward(self, tokens, mask, membership, evidence):
        # tokens (B, N, D), mask (B, N), membership (N, S), evidence (B, S, E) -> logits (B, S), present (B, S),
        # and with stale_evidence the camera's stale-content logit (B,) and where it applies (B,), else None
        w = mask.float().unsqueeze(-1) * membership  # (B, N, S)
        present = w.sum(1) > 0  # (B, S)
        mean = torch.einsum("bnm,bnd->bmd", w, tokens) / w.sum(1).clamp_min(1.0).unsqueeze(-1)
        inside = (w > 0).permute(0, 2, 1).unsqueeze(-1)  # (B, S, N, 1)
        peak = (tokens.unsqueeze(1) + log_mask(inside)).amax(2)
        peak = torch.where(present.unsqueeze(-1), peak, 0.0)  # (B, S, D)
        h = self.summary(torch.cat([mean, peak, evidence], dim=-1)) + self.modality  # (B, S, D)
        p = present.float().unsqueeze(-1)
        others = ((h * p).sum(1, keepdim=True) - h * p) / (p.sum(1, keepdim=True) - p).clamp_min(1.0)
        logits = self.logit(torch.cat([h, others], dim=-1)).squeeze(-1)  # (B, S)
        stale = valid = None
        if self.stale is not None:
            # a veto: where this path judges the camera stale (its logit above 0), the camera's trust is at most
            # 1 - sigmoid(stale logit); elsewhere the trust head's alone, so a fresh camera's fused state is
            # the one a model without the path gives, bit for bit (the path fitted onto a trained model changes
            # nothing else: docs/TRAINING.md). An additive penalty (logit - softplus(stale)) was tried first:
            # trained, it stayed too small to move the trust of EuRoC's frozen camera (docs/RESULTS.md)
            stale = evidence[:, 0, 0] * self.stale[0] + self.stale[1]  # (B,)
            vetoed = torch.where(stale > 0, torch.minimum(logits[:, 0], -stale), logits[:, 0])
            logits = torch.cat([vetoed.unsqueeze(1), logits[:, 1:]], dim=1)
            valid = present[:, 0] & (evidence[:, 0, EVIDENCE - 1] > 0)  # a previous frame to compare with
        return logits.masked_fill(~present, float("-inf")), present, stale, valid


class CrossAttention(nn.Module):
    """Fusion tokens (queries) over sensor tokens. Token-level: each sensor's tokens get their own
    softmax (`sensor_weights` given), or one softmax spans all tokens at a per-token temperature
    (`sensor_weights` None: the token-level fusion, the baseline)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.q, self.kv, self.out = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, 2 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.qk_norm = cfg.qk_norm
        # log of the learned scale (QK-norm) and of the per-head τ; both start neutral
        self.log_qk_scale = nn.Parameter(torch.full((cfg.heads,), math.log(math.sqrt(self.head_dim)))) if cfg.qk_norm else None
        self.log_head_tau = nn.Parameter(torch.zeros(cfg.heads)) if cfg.learned_head_temperature else None

    def forward(self, queries, tokens, mask, token_tau, spans=None, sensor_weights=None):
        # queries (B, M, D), tokens (B, N, D), mask (B, N), token_tau (B, N); spans: each sensor's token
        # slice; sensor_weights (B, S) -> (B, M, D), token weights (B, H, M, N)
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
        logits = logits / tau.unsqueeze(2)
        if sensor_weights is None:
            weights = masked_softmax(logits, mask[:, None, None, :])
        else:  # a softmax per sensor, each scaled by its sensor weight: rows still sum to 1
            weights = torch.cat([masked_softmax(logits[..., s], mask[:, None, None, s]) * sensor_weights[:, m, None, None, None]
                                 for m, s in enumerate(spans)], dim=-1)
        fused = (weights @ v).transpose(1, 2).reshape(B, M, D)
        return self.out(fused), weights


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block over a sequence of tokens (the fusion tokens; a column of camera patches)."""

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


def newest_rate_read(window: ChunkTokens) -> nn.Linear:
    """A stream's window (flattened chunks) -> (speed, yaw rate), starting as its newest sample's turn rate (and,
    for the odometry, forward speed) unscaled: the read a gyro gives at its own precision, which training then
    refines. From a random start, Adam's steps of about the learning rate each could not reach the one weight of
    about 3 (the gyro's scale) in a run's 2,000 steps, and the read spread over the window, lagging the turn
    (docs/RESULTS.md: 0.057 rad/s where the newest sample reads 0.015)."""
    read = nn.Linear(window.tokens * window.features, 2)
    newest = (window.tokens - 1) * window.features + (window.samples_per_chunk - 1) * len(IMU_AXES)
    with torch.no_grad():
        read.weight.zero_()
        read.bias.zero_()
        if isinstance(window, OdometryTokens):
            read.weight[0, newest + ODOMETRY_AXES.index("linear_x")] = window.speed_scale
            read.weight[1, newest + ODOMETRY_AXES.index("angular_z")] = window.angular_scale
        else:
            read.weight[1, newest + IMU_AXES.index("gyro_z")] = window.gyro_scale
    return read


class EgoRate(nn.Module):
    """The fused ego-motion (B, 2): speed [m/s] and yaw rate [rad/s] (ModelConfig.rate_output). The six-axis
    streams' averaged reads, each value's departure from the training set's mean times a learned gain (the
    IMUs read the yaw rate to 0.009 rad/s but the speed hardly: 0.31 m/s, docs/RESULTS.md), plus a
    correction read from the fused tokens in units of the training set's spread; trained by the velocity
    objective, whose prediction it is, so a robot gets the estimate that was evaluated."""

    def __init__(self, m: ModelConfig, hidden: int = 256):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(2))
        self.correction = nn.Sequential(nn.LayerNorm(m.fusion_tokens * m.dim), nn.Linear(m.fusion_tokens * m.dim, hidden),
                                        nn.GELU(), nn.Linear(hidden, 2))
        # the velocity target's mean and std (`standardise`): about the mean the gain scales the reads' spread
        # alone (about 0 it moves their mean too, and in a first trial two seeds of three kept the poor speed read)
        self.register_buffer("mean", torch.zeros(2))
        self.register_buffer("std", torch.ones(2))

    def standardise(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, rate: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.mean + self.gain * (rate - self.mean) + self.std * self.correction(latents.flatten(1))  # (B, 2)


class FusionModel(nn.Module):
    """Named sensor inputs (see tokenize.input_spec) -> fused (B, D), latents (B, M, D), attention
    (B, S, H) mass per sensor and head, all_masked (B,), trust (B, S); S sensors, FusionConfig.sensors;
    with model.rate_output also ego_rate (B, 2), speed and yaw rate (tokenize.output_names).

    Two levels (ModelConfig.fusion "sensor", the default): inside each sensor the fusion tokens attend
    over its tokens (a softmax per sensor); across sensors, each sensor's share is the softmax over
    present sensors of log(trust) / (τ_global * τ_sensor), i.e. proportional to trust^(1/τ): a low τ
    keeps only the most trusted sensors, a high τ averages all present ones, doubtful or not. The
    trust is a learned per-sensor output (SensorTrust), trained on known faults; the fusion uses it
    without passing gradients back, so it stays a detector. "token": today's single softmax over all
    tokens at τ_global * τ_modality per token (the baseline); its trust is reported, not used.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.embed = SensorEmbedding(cfg)
        self.trust = SensorTrust(m, len(cfg.sensors))
        self.queries = nn.Parameter(torch.randn(m.fusion_tokens, m.dim) * 0.02)
        self.query_norm, self.token_norm = nn.LayerNorm(m.dim), nn.LayerNorm(m.dim)
        self.cross = CrossAttention(m)
        self.cross_mlp_norm = nn.LayerNorm(m.dim)
        self.cross_mlp = MLP(m.dim, m.mlp_ratio * m.dim, m.dim)
        self.blocks = nn.ModuleList(SelfAttentionBlock(m) for _ in range(m.latent_blocks))
        self.motion_direct = nn.Linear(SCAN_MATCH_FEATURES, m.dim, bias=False) if m.lidar_motion_direct else None
        self.imu_direct = nn.Linear(cfg.imu.tokens * cfg.imu.features, m.dim, bias=False) if m.imu_direct else None
        self.out_norm = nn.LayerNorm(m.dim)
        if m.rate_readout:  # (speed, yaw rate) per six-axis stream, in the sensors' order
            self.rate_readout = nn.ModuleDict({n: newest_rate_read(cfg.chunk_tokens(n)) for n in cfg.streams})
            self.rate_embed = None if m.rate_output else nn.Linear(2, m.dim, bias=False)
            self.ego_rate = EgoRate(m) if m.rate_output else None
            self.rate_sensors = [cfg.sensor_names.index(n) for n in cfg.streams]
        else:
            self.rate_readout = None
        # one-hot modality membership of each token, to sum attention per modality with a matmul
        self.register_buffer("membership", F.one_hot(self.embed.modality_id, len(cfg.sensors)).float(), persistent=False)
        ends = torch.cumsum(torch.tensor(self.embed.counts), 0).tolist()
        self.spans = [slice(a, b) for a, b in zip([0, *ends[:-1]], ends)]

    def sensor_logits(self, log_trust: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """(B, S) log trust, (B, 1 + S) τ -> the sensor-level softmax's logits log(trust) / (τ_global * τ_sensor),
        log trust floored at log(trust_floor) when there is one (an absent sensor stays masked)."""
        if self.cfg.model.trust_floor > 0:
            log_trust = log_trust.clamp_min(math.log(self.cfg.model.trust_floor))
        return log_trust / (tau[:, :1] * tau[:, 1:])

    def forward(self, camera_patches, camera_mask, camera_age, camera_prev_patches, camera_prev_mask, camera_prev_age,
                lidar_points, lidar_mask, lidar_age, lidar_prev_points, lidar_prev_mask, lidar_prev_age,
                imu_chunks, imu_mask, imu_age, tau, odometry_chunks=None, odometry_mask=None, odometry_age=None,
                imu2_chunks=None, imu2_mask=None, imu2_age=None):
        # the odometry's and a second IMU's inputs come after τ, only for a model that reads them (tokenize.input_spec;
        # the exporter names them, so a model with a second IMU and no odometry takes imu2_* by name)
        x = {"camera_patches": camera_patches, "camera_mask": camera_mask, "camera_age": camera_age,
             "camera_prev_patches": camera_prev_patches, "camera_prev_mask": camera_prev_mask,
             "camera_prev_age": camera_prev_age, "lidar_points": lidar_points, "lidar_mask": lidar_mask,
             "lidar_age": lidar_age, "lidar_prev_points": lidar_prev_points, "lidar_prev_mask": lidar_prev_mask,
             "lidar_prev_age": lidar_prev_age, "imu_chunks": imu_chunks, "imu_mask": imu_mask, "imu_age": imu_age,
             "odometry_chunks": odometry_chunks, "odometry_mask": odometry_mask, "odometry_age": odometry_age,
             "imu2_chunks": imu2_chunks, "imu2_mask": imu2_mask, "imu2_age": imu2_age}
        out = self.run(x, tau)
        return tuple(out[name] for name in output_names(self.cfg))

    def run(self, x: dict[str, torch.Tensor], tau: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named inputs -> the outputs of `forward` by name, plus what training and evaluation look at:
        trust_logits (B, S), sensor_weights (B, S), the cross-attention's token weights (B, H, M, N), the
        camera's tokens (B, N_c, D) and the lidar's (B, N_l, D); with model.rate_readout the six-axis streams' own
        reads rate_reads (B, R, 2), and with model.rate_output the fused ego_rate (B, 2; EgoRate), an output of `forward`."""
        tokens, mask, evidence, scan = self.embed(x)  # (B, N, D), (B, N), (B, S, E), (B, SCAN_MATCH_FEATURES) | None
        trust_logits, present, stale_logits, stale_valid = self.trust(tokens, mask, self.membership, evidence)  # (B, S)
        log_trust = F.logsigmoid(trust_logits)  # -inf for an absent sensor
        B = tokens.shape[0]
        queries = self.queries.expand(B, -1, -1)
        if self.cfg.model.fusion == "sensor":
            sensor_weights = masked_softmax(self.sensor_logits(log_trust.detach(), tau), present)  # (B, S)
            token_tau = torch.ones_like(mask, dtype=tokens.dtype)
            attended, weights = self.cross(self.query_norm(queries), self.token_norm(tokens), mask, token_tau,
                                           self.spans, sensor_weights)
            attention = sensor_weights.unsqueeze(-1).repeat(1, 1, self.cfg.model.heads)  # (B, S, H), static H on export
        else:
            token_tau = tau[:, :1] * (tau[:, 1:] @ self.membership.T)  # (B, N): τ_global * τ_modality
            attended, weights = self.cross(self.query_norm(queries), self.token_norm(tokens), mask, token_tau)
            attention = (weights.mean(dim=2) @ self.membership).transpose(1, 2)  # (B, S, H)
            sensor_weights = attention.mean(-1)
        latents = queries + attended
        if self.motion_direct is not None:  # the match as it is, weighted as the lidar's tokens are
            latents = latents + (self.motion_direct(scan) * sensor_weights[:, 1:2]).unsqueeze(1)
        if self.imu_direct is not None:  # the IMU's window as it is (its masked chunks zero), weighted as its tokens are
            window = (x["imu_chunks"] * x["imu_mask"].unsqueeze(-1)).flatten(1)  # (B, chunks * features)
            latents = latents + (self.imu_direct(window) * sensor_weights[:, 2:3]).unsqueeze(1)
        latents = latents + self.cross_mlp(self.cross_mlp_norm(latents))
        for block in self.blocks:
            latents = block(latents)
        latents = self.out_norm(latents)  # (B, M, D)
        rates = {}
        if self.rate_readout is not None:
            reads = torch.stack([self.rate_readout[n]((x[f"{n}_chunks"] * x[f"{n}_mask"].unsqueeze(-1)).flatten(1))
                                 for n in self.cfg.streams], 1)  # (B, R, 2): each stream's speed, yaw rate
            # the streams' own softmax at τ over their trust, without the trust floor: the floor keeps a doubted
            # sensor's tokens in reach of the heads, which can outweigh them, but an average has nothing to outweigh
            # a frozen gyro's 1 % (measured: floored, a frozen or noisy IMU cost the fused yaw rate +37 to +66 % at
            # τ = 1, where τ = 0.1 kept it within 4 %); a distrusted IMU's share goes to the other, no stream: zeros
            s = self.rate_sensors
            share = masked_softmax(log_trust.detach()[:, s] / (tau[:, :1] * tau[:, 1:][:, s]), present[:, s])  # (B, R)
            # the reads train on their own objective only: the heads' losses, through the fused state, would make
            # them features for every head (measured: trained so, the IMUs' reads erred 0.045-0.050 rad/s on
            # validation, from a start at their newest gyro sample's 0.015)
            rate = (share.unsqueeze(-1) * reads.detach()).sum(1)  # (B, 2)
            if self.rate_embed is None:
                rates = {"rate_reads": reads, "ego_rate": self.ego_rate(rate, latents)}
            else:
                latents = latents + self.rate_embed(rate).unsqueeze(1)
                rates = {"rate_reads": reads}
        return {"fused": latents.mean(dim=1), "latents": latents, "attention": attention,
                "all_masked": ~mask.any(dim=1), "trust": log_trust.exp(), "trust_logits": trust_logits,
                "sensor_weights": sensor_weights, "token_weights": weights, "camera_tokens": tokens[:, self.spans[0]],
                "lidar_tokens": tokens[:, self.spans[1]],
                **({"stale_logits": stale_logits, "stale_valid": stale_valid} if stale_logits is not None else {}),
                **rates}
