"""Rendering: colour every patch of an image by the merge group it ended in (pure numpy + matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

CUT_AWAY = np.array([0.15, 0.15, 0.15])  # patches that no token stands for (unpadded away)


def group_colors(groups: np.ndarray) -> np.ndarray:
    """`[rows, cols]` group ids -> `[rows, cols, 3]` colours in [0, 1]: one colour per id, -1 dark grey.

    Hues step by the golden ratio so neighbouring ids get far-apart colours; saturation and value cycle too, so
    hundreds of groups stay distinguishable.
    """
    from matplotlib.colors import hsv_to_rgb

    ids = np.asarray(groups)
    hsv = np.stack(
        ((ids * 0.6180339887) % 1.0, 0.55 + 0.45 * ((ids * 7) % 3) / 2, 0.70 + 0.30 * ((ids * 5) % 2)), axis=-1
    )
    colors = hsv_to_rgb(hsv)
    colors[ids < 0] = CUT_AWAY
    return colors


def overlay_groups(image: np.ndarray, groups: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend group colours over `image [H, W, 3]` (uint8); `groups [rows, cols]` must divide H and W.

    Borders between different groups are drawn dark so groups of similar colour stay apart.
    """
    height, width = image.shape[:2]
    rows, cols = groups.shape
    if height % rows or width % cols:
        raise ValueError(f"image {height}x{width} is not a whole number of {rows}x{cols} patches")
    cell_h, cell_w = height // rows, width // cols
    per_pixel = np.repeat(np.repeat(np.asarray(groups), cell_h, axis=0), cell_w, axis=1)
    blended = (1 - alpha) * image.astype(np.float64) / 255 + alpha * group_colors(per_pixel)
    border = np.zeros((height, width), dtype=bool)
    border[:, 1:] |= per_pixel[:, 1:] != per_pixel[:, :-1]
    border[1:, :] |= per_pixel[1:, :] != per_pixel[:-1, :]
    blended[border] *= 0.35
    return (blended.clip(0, 1) * 255).astype(np.uint8)


def save_panels(panels: list[np.ndarray], path: str | Path, titles: list[str] | None = None, title: str = "") -> Path:
    """Save images side by side in a grid (videos: one panel per frame) as one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(panels), 4 if len(panels) > 4 else len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows + 0.4), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(panels):
            axis.imshow(panels[index])
            if titles:
                axis.set_title(titles[index], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
