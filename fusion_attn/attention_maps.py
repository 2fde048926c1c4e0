"""Where the fusion looks: one fusion's camera patches and lidar pillars coloured by the attention the
fusion tokens gave them, as one RGB picture, and the occlusion test that checks what it shows.

Attention is correlation, not cause (docs/ATTENTION_MAPS.md): the picture shows which tokens the
fusion tokens weighted; `occlusion` measures whether masking those tokens changes the fused state more
than masking as many random tokens of the same sensor. The backends output each sensor's share only,
so the token weights come from a torch copy of the same weights (replay's pictures, the node's
optional attention image, tests).

Shapes: H heads, M fusion tokens, N = N_c + N_l + N_i sensor tokens, P points per pillar, D width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .config import FusionConfig, LidarTokens
from .frames import CameraFrame
from .tokenize import LIDAR_INDEX, denormalise_pixels

if TYPE_CHECKING:  # torch loads where a model runs: node and replay import this module on the torch-free default
    import torch

    from .model import FusionModel

MASKS = {"camera": "camera_mask", "lidar": "lidar_mask"}  # the sensors with a place to draw their tokens
CAMERA_SCALE = 4  # panel pixels per tokenizer pixel: 96x128 -> 384x512
BEV_SIZE = 384  # the lidar panel is square, as tall as the camera's
CAPTION_H = 80  # four lines of text; 464 rows in all, a multiple of 16 as video encoders like
OVERLAY_ALPHA = 0.55  # how much of the camera panel is the attention colour, the rest the image
BACKGROUND = (24, 24, 24)
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Attention:
    """What one fusion attended to."""

    token_weights: np.ndarray  # (H, M, N) each fusion token's weight on each sensor token, per head
    sensor_weights: np.ndarray  # (3,) each sensor's share of the fusion
    trust: np.ndarray  # (3,)
    fused: np.ndarray  # (D,)


def attend(model: FusionModel, inputs: dict[str, np.ndarray]) -> Attention:
    """Unbatched model inputs (tokenize.input_spec, τ included) -> what the torch model attended to."""
    out = _run(model, {k: v[None] for k, v in inputs.items()})
    return Attention(*(out[k][0].numpy() for k in ("token_weights", "sensor_weights", "trust", "fused")))


def _run(model: FusionModel, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    tau = x.pop("tau")
    with torch.no_grad():
        return model.run(x, tau)


def token_shares(token_weights: np.ndarray, cfg: FusionConfig, sensor: str) -> np.ndarray:
    """(H, M, N) -> (N_s,): each of `sensor`'s tokens' share of the attention that sensor got, averaged
    over heads and fusion tokens. Sums to 1, or is all 0 when the sensor got none (absent)."""
    start = 0 if sensor == "camera" else cfg.camera.tokens
    n = cfg.camera.tokens if sensor == "camera" else cfg.lidar.tokens
    mass = token_weights[..., start:start + n].mean(axis=(0, 1))  # (N_s,)
    total = mass.sum()
    return mass / total if total > 0 else np.zeros_like(mass)


def valid_tokens(inputs: dict[str, np.ndarray], sensor: str) -> np.ndarray:
    """Indices of `sensor`'s unmasked tokens (a pillar is valid if any of its points is)."""
    mask = inputs[MASKS[sensor]]
    return np.flatnonzero(mask if mask.ndim == 1 else mask.any(-1))


def occlusion(model: FusionModel, inputs: dict[str, np.ndarray], sensor: str, k: int, draws: int,
              rng: np.random.Generator) -> tuple[float, float]:
    """-> (L2 change of the fused state when `sensor`'s k most-attended valid tokens are masked, its mean
    over `draws` random sets of k valid tokens of the same sensor): one batched model call. NaN, NaN
    with fewer than 2k valid tokens (a random set would be mostly the top set)."""
    valid = valid_tokens(inputs, sensor)
    if len(valid) < 2 * k:
        return float("nan"), float("nan")
    att = attend(model, inputs)
    share = token_shares(att.token_weights, model.cfg, sensor)
    sets = [valid[np.argsort(-share[valid], kind="stable")[:k]]] + [rng.choice(valid, k, replace=False)
                                                                     for _ in range(draws)]
    batch = {name: np.repeat(v[None], len(sets), axis=0) for name, v in inputs.items()}
    for i, tokens in enumerate(sets):
        batch[MASKS[sensor]][i, tokens] = False  # masked: the model's own "no such token", weight exactly 0
    change = np.linalg.norm(_run(model, batch)["fused"].numpy() - att.fused, axis=-1)  # (1 + draws,)
    return float(change[0]), float(change[1:].mean())


def camera_rgb(frame: CameraFrame | None) -> np.ndarray | None:
    """An 8-bit colour or mono frame as (H, W, 3) uint8 RGB; None otherwise (depth, 16-bit: the picture
    then shows the tokenized patches, which are scaled as the model saw them)."""
    if frame is None or frame.is_depth or frame.image.dtype != np.uint8:
        return None
    return np.repeat(frame.image, 3, axis=2) if frame.image.shape[2] == 1 else frame.image


def pillar_centres(points: np.ndarray, mask: np.ndarray, cfg: LidarTokens) -> np.ndarray:
    """(N_l, P, F) pillar points, (N_l, P) mask -> (N_l, 2) x, y of each pillar's grid cell centre [m]
    (NaN for an empty pillar): a point's position minus its offset from the cell centre."""
    per_m = cfg.grid / (2.0 * cfg.range_m)
    first = mask.argmax(axis=1)  # (N_l,) a valid point of each pillar
    p = points[np.arange(len(points)), first]  # (N_l, F)
    x = p[:, LIDAR_INDEX["x"]] * cfg.range_m - p[:, LIDAR_INDEX["dx"]] / per_m
    y = p[:, LIDAR_INDEX["y"]] * cfg.range_m - p[:, LIDAR_INDEX["dy"]] / per_m
    return np.where(mask.any(axis=1)[:, None], np.stack([x, y], axis=1), np.nan)


@dataclass(frozen=True)
class BevView:
    """The lidar panel's square view: x forward is up, y left is left, the sensor in the middle."""

    half_m: float
    size: int = BEV_SIZE

    @classmethod
    def around(cls, centres: np.ndarray, cfg: LidarTokens) -> BevView:
        """Just large enough for every pillar (at least 5 m, at most the grid's range)."""
        cell = 2.0 * cfg.range_m / cfg.grid
        reach = np.nanmax(np.abs(centres)) + cell if np.isfinite(centres).any() else 0.0
        return cls(float(np.clip(np.ceil(reach), 5.0, cfg.range_m)))

    def pixel(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) x, y [m] -> (..., 2) column, row (float pixels)."""
        scale = self.size / (2.0 * self.half_m)
        return np.stack([(self.half_m - xy[..., 1]) * scale, (self.half_m - xy[..., 0]) * scale], axis=-1)


def picture_size(cfg: FusionConfig) -> tuple[int, int]:
    """(width, height) of `picture`'s output."""
    return cfg.camera.width * CAMERA_SCALE + BEV_SIZE, cfg.camera.height * CAMERA_SCALE + CAPTION_H


def picture(inputs: dict[str, np.ndarray], att: Attention, cfg: FusionConfig, image: np.ndarray | None = None,
            caption: str = "") -> np.ndarray:
    """One fusion -> (height, width, 3) uint8 RGB (`picture_size`): the camera image with each patch's share
    of the camera's attention overlaid, beside a bird's-eye view of the lidar pillars coloured by their
    share of the lidar's; below, what the colours span, the sensor weights and trust. Each panel's colours
    run from 0 to its own largest share (written below it). `image`: the raw (H, W, 3) uint8 RGB frame,
    else the tokenized patches are shown."""
    cam, cam_notes = _camera_panel(inputs, att, cfg, image)
    bev, bev_notes = _bev_panel(inputs, att, cfg)
    top = np.concatenate([cam, bev], axis=1)
    strip = np.full((CAPTION_H, top.shape[1], 3), BACKGROUND, np.uint8)
    weights = "  ".join(f"{m} {w:.2f}" for m, w in zip(cfg.sensor_names, att.sensor_weights))
    trust = "  ".join(f"{m} {t:.2f}" for m, t in zip(cfg.sensor_names, att.trust))
    for i, line in enumerate([caption, *cam_notes, f"sensor weight  {weights}", f"trust  {trust}"]):
        _text(strip, line, (8, 18 + 18 * i))
    _colour_bar(strip, x=cam.shape[1] + 22, y=8)
    for i, line in enumerate(bev_notes):
        _text(strip, line, (cam.shape[1] + 8, 36 + 18 * i))
    return np.concatenate([top, strip], axis=0)


def _heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (...) -> inferno RGB uint8 (..., 3): dark to bright as the value grows."""
    u8 = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8.reshape(-1, 1), cv2.COLORMAP_INFERNO)[:, 0, ::-1].reshape(*values.shape, 3)


def _camera_panel(inputs, att: Attention, cfg: FusionConfig, image) -> tuple[np.ndarray, list[str]]:
    c = cfg.camera
    h, w = c.height * CAMERA_SCALE, c.width * CAMERA_SCALE
    if not inputs["camera_mask"].any():
        return np.full((h, w, 3), BACKGROUND, np.uint8), ["camera: absent"]
    if image is None:  # the patches as the model saw them (resized, not cropped), back to pixels
        rows, cols, p = c.height // c.patch, c.width // c.patch, c.patch
        pixels = denormalise_pixels(inputs["camera_patches"].reshape(rows, cols, p, p, 3))
        image = np.clip(pixels.transpose(0, 2, 1, 3, 4).reshape(c.height, c.width, 3) * 255, 0, 255).astype(np.uint8)
    base = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    share = token_shares(att.token_weights, cfg, "camera")  # (N_c,) row-major over the patch grid
    top = share.max()
    grid = (share / top if top > 0 else share).reshape(c.height // c.patch, c.width // c.patch)
    heat = cv2.resize(_heat(grid), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.float32)  # a patch is a token
    panel = np.rint((1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * heat).astype(np.uint8)
    return panel, [f"camera: share per patch, max {top:.1%} (uniform {1 / len(share):.1%})"]


def _bev_panel(inputs, att: Attention, cfg: FusionConfig) -> tuple[np.ndarray, list[str]]:
    li = cfg.lidar
    panel = np.full((BEV_SIZE, BEV_SIZE, 3), BACKGROUND, np.uint8)
    valid = valid_tokens(inputs, "lidar")
    if not len(valid):
        return panel, ["lidar: absent"]
    points, mask = inputs["lidar_points"], inputs["lidar_mask"]
    centres = pillar_centres(points, mask, li)
    view = BevView.around(centres, li)
    step = next(s for s in (1, 2, 5, 10, 20, 50) if view.half_m / s <= 5)
    middle = tuple(int(v) for v in view.pixel(np.zeros(2)))
    for r in np.arange(step, view.half_m * 1.5, step):  # range rings, to the panel's corners
        cv2.circle(panel, middle, round(r * BEV_SIZE / (2 * view.half_m)), (60, 60, 60), 1, cv2.LINE_AA)
    share = token_shares(att.token_weights, cfg, "lidar")
    top = share.max()
    colours = _heat(share / top if top > 0 else share)
    half_cell = li.range_m / li.grid
    for i in valid[np.argsort(share[valid], kind="stable")]:  # the most attended drawn last, on top
        corners = view.pixel(centres[i] + np.array([[half_cell, half_cell], [-half_cell, -half_cell]]))
        a, b = np.rint(corners).astype(int)
        cv2.rectangle(panel, tuple(a), tuple(b), tuple(int(v) for v in colours[i]), cv2.FILLED)
    xy = points[mask][:, [LIDAR_INDEX["x"], LIDAR_INDEX["y"]]] * li.range_m
    col, row = np.rint(view.pixel(xy)).astype(int).T
    inside = (col >= 0) & (col < BEV_SIZE) & (row >= 0) & (row < BEV_SIZE)
    # the points, lighter: the scene's shape shows on dim pillars too, and the brightest stay the brightest
    panel[row[inside], col[inside]] = (0.5 * panel[row[inside], col[inside]] + 100).astype(np.uint8)
    cv2.fillConvexPoly(panel, np.array([middle, (middle[0] - 5, middle[1] + 9), (middle[0] + 5, middle[1] + 9)]),
                       (255, 255, 255))  # the sensor, pointing forward (up)
    return panel, [f"lidar: share per pillar, max {top:.1%} (uniform {1 / len(valid):.1%})",
                   f"bird's-eye view, x up, y left, rings every {step} m"]


def _colour_bar(img: np.ndarray, x: int, y: int, width: int = 120) -> None:
    img[y:y + 10, x:x + width] = _heat(np.linspace(0, 1, width))[None]
    _text(img, "0", (x - 14, y + 10))
    _text(img, "max share", (x + width + 4, y + 10))


def _text(img: np.ndarray, text: str, origin: tuple[int, int]) -> None:
    """Light text on a dark box: readable on the image and on the attention colours alike."""
    (w, h), base = cv2.getTextSize(text, FONT, 0.45, 1)
    x, y = origin
    cv2.rectangle(img, (x - 3, y - h - 3), (x + w + 3, y + base), BACKGROUND, cv2.FILLED)
    cv2.putText(img, text, origin, FONT, 0.45, (235, 235, 235), 1, cv2.LINE_AA)
