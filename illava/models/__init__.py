"""Vision encoders re-implemented for illava (plain module structure, so the merging code can wrap their blocks)."""

from .llava_vit import (
    LLAVA_VIT_VARIANTS,
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
    llava_vit_packing_config,
)

__all__ = [
    "LLAVA_VIT_VARIANTS",
    "LlavaViTPackingConfig",
    "LlavaViTPackingModel",
    "compute_patch_positions_from_grid_thw",
    "compute_patch_positions_with_interpolated_temporal",
    "interpolate_frame_indices",
    "llava_vit_packing_config",
]
