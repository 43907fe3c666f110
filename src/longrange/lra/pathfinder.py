"""Pathfinder-style images: are the two dots joined by one dashed contour?

A stand-in for the Pathfinder data (Linsley et al. 2018) that LRA releases as PNG folders, drawn the
same way in spirit: every image holds two "main" contours of `num_dashes` straight dashes (each
dash turns by at most `max_turn` from the previous one) plus distractor contours of the same kind;
two dots mark contour ends. Positive (label 1): both dots on the ends of the same main contour.
Negative (label 0): one dot on an end of each main contour. Both classes draw the same number of
contours and dots, so the answer needs the path to be followed.

Different contours (dots included) never touch: each contour's footprint keeps a Chebyshev
distance of at least `margin + 1` pixels from every other one, so with `gap=0` (solid contours)
an 8-connected flood fill from one dot reaches the other exactly when the label is 1 -- the
tests check this at the generator's resolution.

    image, label = draw_example(np.random.default_rng(0), PathfinderStyle.for_resolution(32), label=1)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

#: LRA's difficulty folders and the contour length (dashes per contour) each one stands for
DIFFICULTIES = {"curv_baseline": 6, "curv_contour_length_9": 9, "curv_contour_length_14": 14}
_SAMPLE_STEP = 0.25  # px between points sampled along a dash (< 1, so a solid contour is 8-connected)
_MAX_IMAGE_TRIES = 50
_MAX_CONTOUR_TRIES = 48  # placements tried per main contour (a quarter of that per distractor)
_CANDIDATES = 128  # contour shapes drawn at once per image (vectorised)


@dataclass(frozen=True)
class PathfinderStyle:
    """How images are drawn. Lengths are in pixels of the output image."""

    resolution: int = 32
    num_dashes: int = 14  # dashes per contour (LRA's "contour length")
    dash: float = 1.5  # length of one dash
    gap: float = 1.5  # empty stretch between dashes (0 = solid contours)
    max_turn: float = 0.8  # radians a dash may turn relative to the previous one
    num_distractors: int = 2  # extra contours without dots (fewer when there is no room)
    dot_radius: int = 1  # dots are (2r+1)^2 squares centred on contour ends
    margin: int = 1  # empty pixels kept between different contours (>= 1 keeps them apart)

    @classmethod
    def for_resolution(cls, resolution: int, difficulty: str = "curv_contour_length_14", **overrides):
        """The default style at `resolution` (lengths scale with resolution / 32) for an LRA difficulty."""
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty: expected one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
        if resolution < 12:
            raise ValueError(f"resolution: expected at least 12 pixels, got {resolution}")
        scale = resolution / 32
        style = cls(resolution=resolution, num_dashes=DIFFICULTIES[difficulty], dash=1.5 * scale, gap=1.5 * scale,
                    dot_radius=max(1, round(scale / 2 + 0.49)), margin=max(1, round(scale / 2)))
        return replace(style, **overrides)


def draw_example(rng: np.random.Generator, style: PathfinderStyle, label: int) -> tuple[np.ndarray, dict]:
    """One image ([R, R] uint8, 0 background, 255 ink) with `label` (1 = connected) and what was drawn.

    The info dict holds "dots" (two (row, col) dot centres) and "contours" (pixel arrays [M, 2], the
    two main contours first). Raises RuntimeError when the style leaves no room for two contours.
    """
    if label not in (0, 1):
        raise ValueError(f"label: expected 0 or 1, got {label!r}")
    for _ in range(_MAX_IMAGE_TRIES):
        placed = _place_contours(rng, style)
        if placed is not None:
            return _render(rng, style, placed, label)
    raise RuntimeError(f"Pathfinder: could not place two contours of {style.num_dashes} dashes in a "
                       f"{style.resolution}x{style.resolution} image; use fewer or shorter dashes")


def _place_contours(rng: np.random.Generator, style: PathfinderStyle) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Two main contours then up to num_distractors more, none touching; None when the mains do not fit."""
    occupied = np.zeros((style.resolution, style.resolution), dtype=bool)
    shapes, extents = _candidate_shapes(rng, style, _CANDIDATES)
    next_shape, contours = 0, []
    for k in range(2 + style.num_distractors):
        for _ in range(_MAX_CONTOUR_TRIES if k < 2 else _MAX_CONTOUR_TRIES // 4):
            if next_shape == len(shapes):
                return contours if k >= 2 else None
            contour = _place(rng, style, shapes[next_shape], extents[next_shape])
            next_shape += 1
            if not _footprint_hits(occupied, contour, style):
                _mark(occupied, contour, style)
                contours.append(contour)
                break
        else:
            if k < 2:
                return None
    return contours


def _candidate_shapes(rng: np.random.Generator, style: PathfinderStyle, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to k random contours small enough to fit: sampled points [k', M, 2] from (0, 0) and extents [k', 2].

    Each contour is `num_dashes` straight dashes; dash i+1 starts `dash + gap` after dash i starts and
    turns by uniform(-max_turn, max_turn) from it. Points are (row, col), every ~0.25 px along the dashes.
    """
    n, period = style.num_dashes, style.dash + style.gap
    turns = np.concatenate([np.zeros((k, 1)), np.cumsum(rng.uniform(-1, 1, (k, n - 1)), axis=1)], axis=1)
    heading = rng.uniform(0, 2 * np.pi, (k, 1)) + turns * style.max_turn  # (k, n)
    direction = np.stack([np.sin(heading), np.cos(heading)], axis=-1)  # (k, n, 2): d(row), d(col) per dash
    dash_starts = np.concatenate([np.zeros((k, 1, 2)), np.cumsum(period * direction[:, :-1], axis=1)], axis=1)
    t = np.linspace(0.0, style.dash, int(np.ceil(style.dash / _SAMPLE_STEP)) + 1)  # (s,)
    points = (dash_starts[:, :, None, :] + t[None, None, :, None] * direction[:, :, None, :]).reshape(k, -1, 2)
    low = points.min(axis=1)  # (k, 2)
    extent = points.max(axis=1) - low
    fits = (extent < _room(style)).all(axis=1)
    return points[fits] - low[fits][:, None, :], extent[fits]


def _room(style: PathfinderStyle) -> float:
    """Side of the square a contour's points must stay in, so that its end dots fit in the image."""
    return style.resolution - 2 * style.dot_radius - 1e-6


def _place(rng: np.random.Generator, style: PathfinderStyle, points: np.ndarray, extent: np.ndarray):
    """A random placement of one candidate shape: ink pixels [M, 2] (row, col) and end pixels [2, 2]."""
    offset = style.dot_radius + rng.uniform(0, 1, size=2) * (_room(style) - extent)
    pixels = (points + offset).astype(np.int64)
    return pixels, pixels[[0, -1]]


@functools.lru_cache(maxsize=32)
def _square(radius: int) -> np.ndarray:
    """Offsets [(2r+1)^2, 2] of a square of Chebyshev radius r."""
    span = np.arange(-radius, radius + 1)
    return np.stack(np.meshgrid(span, span, indexing="ij"), axis=-1).reshape(-1, 2)


def _footprint(contour: tuple[np.ndarray, np.ndarray], style: PathfinderStyle, grow: int) -> np.ndarray:
    """Pixels of the contour and of its two end dots, grown by `grow` (Chebyshev), as [M, 2]."""
    pixels, ends = contour
    base = np.concatenate([pixels, (ends[:, None, :] + _square(style.dot_radius)[None]).reshape(-1, 2)])
    if grow:
        base = np.clip((base[:, None, :] + _square(grow)[None]).reshape(-1, 2), 0, style.resolution - 1)
    return base


def _footprint_hits(occupied: np.ndarray, contour, style: PathfinderStyle) -> bool:
    """Whether the contour (with its dots) lands on ground kept for earlier contours."""
    foot = _footprint(contour, style, 0)  # inside the image by construction
    return bool(occupied[foot[:, 0], foot[:, 1]].any())


def _mark(occupied: np.ndarray, contour, style: PathfinderStyle) -> None:
    """Keep the contour's footprint, grown by the margin, free of later contours."""
    foot = _footprint(contour, style, style.margin)
    occupied[foot[:, 0], foot[:, 1]] = True


def _render(rng: np.random.Generator, style: PathfinderStyle, contours, label: int) -> tuple[np.ndarray, dict]:
    """Draw every contour and the two dots."""
    image = np.zeros((style.resolution, style.resolution), dtype=np.uint8)
    for pixels, _ in contours:
        image[pixels[:, 0], pixels[:, 1]] = 255
    (_, ends_a), (_, ends_b) = contours[0], contours[1]
    if label == 1:
        dots = [ends_a[0], ends_a[1]]
    else:
        dots = [ends_a[rng.integers(2)], ends_b[rng.integers(2)]]
    r = style.dot_radius
    for row, col in dots:
        image[row - r: row + r + 1, col - r: col + r + 1] = 255
    info = {"dots": [tuple(int(v) for v in dot) for dot in dots], "contours": [pixels for pixels, _ in contours]}
    return image, info


def balanced_labels(num: int, rng: np.random.Generator) -> np.ndarray:
    """`num` labels, half 1 and half 0 (one more 0 when num is odd), in a seeded random order."""
    labels = np.arange(num) % 2
    rng.shuffle(labels)
    return labels


def generate_images(num: int, *, seed: int = 0, style: PathfinderStyle | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`num` images [num, R, R] uint8 and balanced labels [num] int64; image i depends only on (seed, i)."""
    style = style or PathfinderStyle()
    labels = balanced_labels(num, np.random.default_rng([seed, 2**31 - 1]))
    images = np.empty((num, style.resolution, style.resolution), dtype=np.uint8)
    for i in range(num):
        images[i], _ = draw_example(np.random.default_rng([seed, i]), style, int(labels[i]))
    return images, labels.astype(np.int64)
