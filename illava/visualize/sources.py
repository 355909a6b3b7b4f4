"""Heatmap files for a traced forward: each original patch coloured by the merge group it ended in, per merge
layer, for both stages (LLM-stage groups mapped back through ViT merging, pooling, unpadding and newlines).

Group images (what each crop / frame / temporal slice looked like to the encoder) are rebuilt from the processed
inputs, so the patches line up exactly with the encoder's grid:
- LLaVA-OneVision: `pixel_values [images, crops, 3, H, W]` / `pixel_values_videos [videos, frames, 3, H, W]`;
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) / Qwen3.5(-MoE): flattened patches `[N, C*T*p*p]` in the processor's 2x2-window order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..trace import IllavaTrace, VisionTrace
from .heatmap import overlay_groups, save_panels

MAX_PANELS = 16


def _to_uint8(images: torch.Tensor, mean, std) -> np.ndarray:
    """`[..., 3, H, W]` normalised -> `[..., H, W, 3]` uint8."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.movedim(-3, -1).numpy() * 255).astype(np.uint8)


def _llava_onevision_images(processor, inputs, trace: IllavaTrace) -> list[list[np.ndarray]]:
    per_entry = []
    for entry in trace.vision:
        if entry.modality == "image":
            image_processor = processor.image_processor
            crops = [inputs["pixel_values"][item, :count] for item, count in enumerate(entry.groups_per_item)]
            pixels = torch.cat(crops)
        else:
            image_processor = processor.video_processor
            pixels = inputs["pixel_values_videos"].flatten(0, 1)
        per_entry.append(list(_to_uint8(pixels, image_processor.image_mean, image_processor.image_std)))
    return per_entry


def _qwen2_vl_images(processor, inputs, trace: IllavaTrace) -> list[list[np.ndarray]]:
    offsets = {"image": 0, "video": 0}
    keys = {"image": "pixel_values", "video": "pixel_values_videos"}
    per_entry = []
    for entry in trace.vision:
        image_processor = processor.image_processor if entry.modality == "image" else processor.video_processor
        merge, patch, temporal = image_processor.merge_size, image_processor.patch_size, image_processor.temporal_patch_size
        slices, (rows, cols) = entry.groups_per_item[0], entry.grid
        count = slices * rows * cols * merge * merge
        patches = inputs[keys[entry.modality]][offsets[entry.modality] : offsets[entry.modality] + count]
        offsets[entry.modality] += count
        patches = patches.view(slices, rows, cols, merge, merge, 3, temporal, patch, patch)[:, :, :, :, :, :, 0]
        frames = patches.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(slices, 3, rows * merge * patch, cols * merge * patch)
        per_entry.append(list(_to_uint8(frames, image_processor.image_mean, image_processor.image_std)))
    return per_entry


GROUP_IMAGES = {
    "llava_onevision": _llava_onevision_images,
    "qwen2_vl": _qwen2_vl_images,
    "qwen2_5_vl": _qwen2_vl_images,
    "qwen3_vl": _qwen2_vl_images,
    "qwen3_vl_moe": _qwen2_vl_images,
    "qwen3_5": _qwen2_vl_images,
    "qwen3_5_moe": _qwen2_vl_images,
}


def group_images(model, processor, inputs, trace: IllavaTrace) -> list[list[np.ndarray]]:
    """Per vision entry of `trace`, the image of each of its groups (crop / frame / temporal slice)."""
    model_type = model.config.model_type
    if model_type not in GROUP_IMAGES:
        raise ValueError(
            f"heatmaps from processed inputs are available for {sorted(GROUP_IMAGES)}, not {model_type!r}; "
            "draw them with illava.visualize.overlay_groups(image, VisionTrace.source_map(layer)[group])"
        )
    return GROUP_IMAGES[model_type](processor, inputs, trace)


def _panels(trace: IllavaTrace, images: list[list[np.ndarray]], groups_of) -> tuple[list[np.ndarray], list[str]]:
    panels, titles = [], []
    for index, (entry, entry_images) in enumerate(zip(trace.vision, images)):
        groups = groups_of(index, entry)
        for group, image in enumerate(entry_images):
            if len(panels) == MAX_PANELS:
                return panels, titles
            panels.append(overlay_groups(image, groups[group].numpy()))
            titles.append(f"{entry.modality} {index} · {'crop/frame' if entry.window == 1 else 'slice'} {group}")
    return panels, titles


def write_heatmaps(model, processor, inputs, trace: IllavaTrace, output_dir: str | Path) -> list[Path]:
    """Write `attention_map_vit_layer_{n}.jpg` for each ViT merge layer n and `attention_map_llm_layer_{n}.jpg` for
    each LLM merge layer n; the tokens left are in each figure's title. Named by layer, not by the tokens left:
    layers that leave the same count (nothing merged, or a ratio that rounds to zero) each keep their file."""
    if not trace.vision:
        return []
    images = group_images(model, processor, inputs, trace)
    written = []
    first: VisionTrace = trace.vision[0]
    for layer_index, layer in enumerate(first.merge_layers):
        if not first.source_history:
            break
        panels, titles = _panels(trace, images, lambda index, entry: entry.source_map(layer_index))
        remaining = first.tokens_per_group[layer_index + 1]
        path = Path(output_dir) / f"attention_map_vit_layer_{layer}.jpg"
        written.append(save_panels(panels, path, titles, f"ViT layer {layer}: {remaining} tokens per crop/frame"))
    for layer_index, language in enumerate(trace.language):
        if language.sources is None:
            break
        panels, titles = _panels(trace, images, lambda index, entry: trace.llm_source_map(index, layer_index)[1])
        remaining = language.visual_tokens_per_span[0]
        path = Path(output_dir) / f"attention_map_llm_layer_{language.layer}.jpg"
        written.append(save_panels(panels, path, titles, f"LLM layer {language.layer}: {remaining} visual tokens"))
    return written
