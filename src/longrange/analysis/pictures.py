"""Pictures of attention graphs: the n×n matrix (query rows, key columns) as a PNG, like the
figures of the BigBird and Longformer papers.

Small n is drawn at token resolution; larger n on cells of p×p tokens (p = ceil(n / max_pixels),
rounded to a divisor or a multiple of the layout's block size), each shaded by the fraction of its
real (query, key) pairs that attend, computed from the block layout's tiles (full tiles count their
real pairs, partial tiles evaluate the predicate on that tile only): never an n×n tensor.
One panel per head where heads differ, at most MAX_PANELS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from longrange.analysis.graph import Tiles, graph_tiles, resolve_source, selected_heads
from longrange.sparse.layout import compile_layout

#: inches per panel (width, height) and dots per inch: a figure of c columns and r rows of panels
#: is exactly (c·PANEL_INCHES[0]·DPI) × (r·PANEL_INCHES[1]·DPI) pixels; a panel's matrix gets about
#: 580 pixels a side, more than the 512 cells of the default max_pixels
PANEL_INCHES = (8.0, 8.6)
DPI = 100
MAX_PANELS = 8
MAX_COLUMNS = 4


def picture_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a PNG with `panels` panels."""
    cols = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / MAX_COLUMNS)
    return round(cols * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def cell_size(n: int, b: int, max_pixels: int) -> int:
    """Tokens per cell side: 1 when n <= max_pixels, else the smallest divisor or multiple of b
    that keeps the matrix within max_pixels cells a side."""
    p = math.ceil(n / max_pixels)
    if p <= 1:
        return 1
    if p <= b:
        return min(d for d in range(p, b + 1) if b % d == 0)
    return b * math.ceil(p / b)


def cell_fractions(tiles: Tiles, p: int) -> torch.Tensor:
    """[m, m] float: fraction of each p×p cell's real pairs that attend (m = ceil(n / p)). Needs
    tiles built with pool = min(p, b)."""
    n, b = tiles.n, tiles.b
    u = min(p, b)  # the tiles' pooling: u×u sub-cells
    r, g = b // u, max(1, p // b)  # sub-cells per block side; blocks per cell side
    real_u = (torch.arange(tiles.num_blocks * b) < n).view(-1, u).sum(1).double()  # [nu]
    m = math.ceil(len(real_u) / g)
    edges = torch.zeros(m * m, dtype=torch.float64)
    sub = torch.arange(r)
    # full tiles: every real pair of each sub-cell attends
    rows = (tiles.full_q[:, None, None] * r + sub[None, :, None]).expand(-1, r, r)  # [Tf, r, r]
    cols = (tiles.full_k[:, None, None] * r + sub[None, None, :]).expand(-1, r, r)
    _add_cells(edges, rows, cols, real_u[rows] * real_u[cols], g, m)
    # partial tiles: their pooled edge counts
    rows = (tiles.part_q[:, None, None] * r + sub[None, :, None]).expand(-1, r, r)  # [P, r, r]
    cols = (tiles.part_k[:, None, None] * r + sub[None, None, :]).expand(-1, r, r)
    _add_cells(edges, rows, cols, tiles.pooled.double(), g, m)
    real_cell = torch.zeros(m, dtype=torch.float64).index_add_(0, torch.arange(len(real_u)) // g, real_u)
    pairs = real_cell[:, None] * real_cell[None, :]
    keep = math.ceil(n / p)  # cells past it hold only block padding
    return (edges.view(m, m) / pairs.clamp(min=1))[:keep, :keep].float()


def _add_cells(edges: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor, g: int, m: int):
    """Accumulate counts at sub-cells (rows, cols) into the flat [m·m] grid of g×g-grouped cells."""
    flat = (rows // g) * m + cols // g
    edges.index_add_(0, flat.flatten(), counts.flatten())


def draw_pattern(
    pattern_or_module,
    n: int,
    path: str | Path,
    tile: int | None = None,
    heads: int | Sequence[int] | None = None,
    max_pixels: int = 512,
    *,
    global_tokens: int = 0,
) -> Path:
    """Write the attention graph of a Pattern or mechanism module at length n as a PNG at `path`.

    Rows are queries, columns keys; shade = fraction of a cell's pairs that attend. tile: the
    layout's tile (default: the module's or the pattern's, or 64). heads: which heads get a panel
    where heads differ (None: the first MAX_PANELS; an int or a list: those). max_pixels: cells per
    side at most. The size in pixels is `picture_size(panels)`. Returns the path.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    src = resolve_source(pattern_or_module, tile, global_tokens)
    layout = compile_layout(src.pattern, n, src.tile)
    hp = layout.kv_index.shape[0]
    differ = src.pattern.num_heads is not None
    chosen = selected_heads(heads, hp) if differ else [None]
    shown = chosen[:MAX_PANELS]
    p = cell_size(n, src.tile, max_pixels)
    panels = []
    for h in shown:
        tiles = graph_tiles(layout, list(range(hp)) if h is None else [h], pool=min(p, src.tile),
                            keep_masks=False)
        panels.append((h, cell_fractions(tiles, p)))
    title = _title(src.name, n, src.tile, p, panels, len(shown), len(chosen), hp if differ else None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _render(panels, n, p, title, path)
    return path


def _density(frac: torch.Tensor, n: int, p: int) -> float:
    """Edges / n² from cell fractions (cells weighted by their real pairs)."""
    m = frac.shape[0]
    real = torch.full((m,), float(p))
    real[-1] = n - p * (m - 1)
    return float((frac.double() * real[:, None] * real[None, :]).sum()) / n**2


def _title(name, n, b, p, panels, shown, chosen, layer_heads) -> str:
    dens = [_density(f, n, p) for _, f in panels]
    res = "token resolution" if p == 1 else f"cells of {p}×{p} tokens (shade: fraction of pairs attending)"
    density = f"density {dens[0]:.2%}" if len(dens) == 1 else f"density {sum(dens) / len(dens):.2%} (mean of heads)"
    lines = [name, f"n = {n} · block {b} · {density}", res]
    if layer_heads is not None and shown < chosen:
        lines.append(f"heads {', '.join(str(h) for h, _ in panels)} of {layer_heads} shown (at most {MAX_PANELS})")
    return "\n".join(lines)


def _render(panels: list, n: int, p: int, title: str, path: Path) -> None:
    """Matplotlib (Agg, no pyplot state): one image per panel at a fixed size, dpi and margins."""
    from matplotlib import colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(len(panels), MAX_COLUMNS)
    rows = math.ceil(len(panels) / MAX_COLUMNS)
    width, height = cols * PANEL_INCHES[0], rows * PANEL_INCHES[1]
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    margins = {"left": 0.9 / width, "right": 1 - 1.3 / width, "bottom": 0.7 / height, "top": 1 - 1.3 / height,
               "wspace": 0.35, "hspace": 0.45}
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=margins)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    # square-root shades at cell resolution, so a lone global token (1/p of a cell) stays visible
    norm = colors.PowerNorm(0.5, vmin=0.0, vmax=1.0) if p > 1 else colors.Normalize(0.0, 1.0)
    image = None
    for ax, (h, frac) in zip(axes.flat, panels, strict=False):
        m = frac.shape[0]
        image = ax.imshow(frac.numpy(), cmap="Blues", norm=norm, interpolation="antialiased",
                          extent=(0, m * p, m * p, 0))
        ax.set_xlim(0, n)
        ax.set_ylim(n, 0)
        for spine in ax.spines.values():  # thin and light: token 0's row and column lie on the frame
            spine.set(linewidth=0.4, color="0.75")
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        ax.set_title(f"{'every head' if h is None else f'head {h}'}: density {_density(frac, n, p):.2%}", fontsize=10)
    if p > 1 and image is not None:
        cax = fig.add_axes((1 - 0.95 / width, 0.3, 0.15 / width, 0.4))
        fig.colorbar(image, cax=cax, label="fraction of pairs attending (square-root scale)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=DPI, format="png")
