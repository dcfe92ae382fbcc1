"""Data augmentation for CIFAR-10 / Tiny-ImageNet (paper App. B), with scipy.ndimage.

Per image, one random affine transform combining rotation (up to ``rotation`` degrees),
shift (up to ``shift`` of the width/height), shear (up to ``shear`` radians, Keras
convention), zoom (factor in [1 - zoom, 1 + zoom] per axis) and a horizontal flip with
probability 1/2. One ``scipy.ndimage.affine_transform`` per channel (same matrix for
all channels of one image), nearest-edge fill, bilinear interpolation.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 20.0   # degrees
    shift: float = 0.2       # fraction of height / width
    shear: float = 0.1       # radians
    zoom: float = 0.1        # zoom factor range [1 - zoom, 1 + zoom]
    hflip: bool = True


DEFAULT = AugmentConfig()


def random_matrix(rng: np.random.Generator, h: int, w: int, cfg: AugmentConfig = DEFAULT):
    """(matrix 2x2, offset 2) mapping output (row, col) coords to input coords, about the centre."""
    theta = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation)) if cfg.rotation else 0.0
    ty = rng.uniform(-cfg.shift, cfg.shift) * h if cfg.shift else 0.0
    tx = rng.uniform(-cfg.shift, cfg.shift) * w if cfg.shift else 0.0
    sh = rng.uniform(-cfg.shear, cfg.shear) if cfg.shear else 0.0
    zy, zx = (rng.uniform(1 - cfg.zoom, 1 + cfg.zoom, size=2) if cfg.zoom else (1.0, 1.0))
    flip = bool(cfg.hflip and rng.random() < 0.5)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    shear = np.array([[1.0, 0.0], [np.tan(sh), 1.0]]) if sh else np.eye(2)
    zoom = np.diag([zy, zx])
    m = rot @ shear @ zoom
    if flip:
        m = m @ np.diag([1.0, -1.0])
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    offset = centre - m @ centre + np.array([ty, tx])
    return m, offset


def augment_batch(x: np.ndarray, rng: np.random.Generator,
                  cfg: AugmentConfig = DEFAULT) -> np.ndarray:
    """x (N, C, H, W) float -> new array, same shape and dtype, each image transformed."""
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects NCHW, got shape {x.shape}")
    n, ch, h, w = x.shape
    out = np.empty_like(x)
    for i in range(n):
        m, off = random_matrix(rng, h, w, cfg)
        for c in range(ch):
            ndimage.affine_transform(x[i, c], m, offset=off, output=out[i, c], order=1,
                                     mode="nearest")
    np.clip(out, 0.0, 1.0, out=out)
    return out
