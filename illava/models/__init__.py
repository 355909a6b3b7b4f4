"""Vision encoders for illava: LLaVA-ViT re-implemented, and the packing encoders built on transformers models (plain
module structure, so the merging code can wrap their blocks)."""

from .llava_vit import (
    LLAVA_VIT_VARIANTS,
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
    llava_vit_packing_config,
)
from .packing_encoders import AIMv2Packing, DINOv3ViTPacking, Siglip2NaflexPacking, convert_to_packing_format

__all__ = [
    "AIMv2Packing",
    "DINOv3ViTPacking",
    "LLAVA_VIT_VARIANTS",
    "LlavaViTPackingConfig",
    "LlavaViTPackingModel",
    "Siglip2NaflexPacking",
    "compute_patch_positions_from_grid_thw",
    "compute_patch_positions_with_interpolated_temporal",
    "convert_to_packing_format",
    "interpolate_frame_indices",
    "llava_vit_packing_config",
]
