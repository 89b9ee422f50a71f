"""Fixed spatial token patterns on a merged grid (h × w, row-major local indices).

The paper's Tab. 6 keeps each of these beside the foreground to show that *which* positional
tokens are kept matters. The paper names the patterns without defining them; our readings:
- ``corners``: the four corner tokens and the centre token (5 tokens at most);
- ``window``: the centre token of every 3 × 3 window (about 11 % of the grid, a regular lattice);
- ``diagonal``: the tokens on both diagonals of the grid (column = round(row · (w−1)/(h−1)) and its mirror);
- ``random``: round(ratio · N) tokens drawn uniformly with a seeded generator.
"""

from __future__ import annotations

import torch

from .scoring import count

PATTERNS = ("ivc", "none", "random", "corners", "window", "diagonal")


def corners(grid_h: int, grid_w: int) -> torch.Tensor:
    points = {(0, 0), (0, grid_w - 1), (grid_h - 1, 0), (grid_h - 1, grid_w - 1), ((grid_h - 1) // 2, (grid_w - 1) // 2)}
    return torch.tensor(sorted(r * grid_w + c for r, c in points), dtype=torch.long)


def window_centres(grid_h: int, grid_w: int, window: int = 3) -> torch.Tensor:
    rows = [min(r + window // 2, grid_h - 1) for r in range(0, grid_h, window)]
    cols = [min(c + window // 2, grid_w - 1) for c in range(0, grid_w, window)]
    return torch.tensor(sorted(r * grid_w + c for r in rows for c in cols), dtype=torch.long)


def diagonals(grid_h: int, grid_w: int) -> torch.Tensor:
    cells = set()
    for r in range(grid_h):
        c = round(r * (grid_w - 1) / (grid_h - 1)) if grid_h > 1 else 0
        cells.add(r * grid_w + c)
        cells.add(r * grid_w + (grid_w - 1 - c))
    return torch.tensor(sorted(cells), dtype=torch.long)


def random_tokens(n: int, ratio: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=generator)[: count(ratio, n)]).values


def pattern_tokens(pattern: str, grid_h: int, grid_w: int, ratio: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Local indices of a fixed pattern (``ivc`` is positional but model-dependent: see scoring)."""
    if pattern == "none":
        return torch.empty(0, dtype=torch.long)
    if pattern == "corners":
        return corners(grid_h, grid_w)
    if pattern == "window":
        return window_centres(grid_h, grid_w)
    if pattern == "diagonal":
        return diagonals(grid_h, grid_w)
    if pattern == "random":
        return random_tokens(grid_h * grid_w, ratio, seed)
    raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
