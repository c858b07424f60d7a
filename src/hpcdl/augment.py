"""Batch augmentations as tensor ops: one affine warp per batch (random crop = random translation, rotation)
plus a masked flip, each sample drawing its own parameters from a seeded generator (reproducible on resume)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENT_NAMES = ("random-crop", "hflip", "rotate")
MAX_SHIFT_FRACTION = 2 / 28  # random-crop: up to 2 pixels of a 28-pixel image (pad-2-then-crop)
MAX_ROTATION_DEGREES = 10.0


def augment_batch(x: torch.Tensor, names, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """x: normalised float batch (B, C, H, W); fill: per-channel value of a black pixel after normalisation,
    used for the area a shift or rotation uncovers. Returns an augmented batch of the same shape."""
    if not names or x.shape[0] == 0:
        return x
    batch = x.shape[0]
    # Parameters are drawn on the CPU generator so results do not depend on the device.
    theta = torch.zeros(batch, 2, 3)
    angle = torch.zeros(batch)
    if "rotate" in names:
        angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEGREES)
    theta[:, 0, 0] = torch.cos(angle)
    theta[:, 0, 1] = -torch.sin(angle)
    theta[:, 1, 0] = torch.sin(angle)
    theta[:, 1, 1] = torch.cos(angle)
    if "random-crop" in names:
        # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2*s/size.
        shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (2 * MAX_SHIFT_FRACTION)
        theta[:, :, 2] = torch.round(shift * x.shape[-1] / 2) * 2 / x.shape[-1]
    if "rotate" in names or "random-crop" in names:
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        background = fill.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background
    if "hflip" in names:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x
