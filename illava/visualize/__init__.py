"""Heatmaps of which original patches each surviving token stands for."""

from .heatmap import group_colors, overlay_groups, save_panels
from .sources import write_heatmaps

__all__ = ["group_colors", "overlay_groups", "save_panels", "write_heatmaps"]
