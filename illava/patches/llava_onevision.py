"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, SigLIP + Qwen2): ViT-stage merging.

After merging, every crop/frame holds n tokens instead of the full grid (27x27 = 729 for SigLIP-384/14). What the
language model receives is laid out as follows:

- n is a perfect square s*s (the paper's settings: 361 = 19x19, 169 = 13x13): survivors, in their original raster
  order, form a pseudo s x s grid per crop, and LLaVA-OneVision's own layout runs on it unchanged: anyres crops
  stitched, unpadded, capped by `anyres_max_9`, one `image_newline` per row, base crop first; video frames pooled
  2x2 bilinearly to ceil(s/2)^2 (100 per frame for 19x19) with one newline after the video.
- any other n: the base crop's survivors in raster order, then the survivors of all high-resolution crops sorted
  by their original position in the stitched image (row-major), then one `image_newline` (no unpadding, no
  downsampling); video frames are pooled by averaging groups of 4 consecutive survivors (ceil(n/4) per frame).

Both layouts have counts known from (image size, config) alone, so the processor emits matching placeholders:
`illava.apply(model, config, processor=processor)` patches the processor instance.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from ..compat import get_anyres_image_grid_shape, select_best_resolution, unpad_image
from ..registry import Family, inner_of_generation_model
from ..state import IllavaState
from .common import EncoderCall, patch_encoding
from .decoder import LanguageModelMerger
from .siglip import SiglipStage



def video_tokens_per_frame(tokens: int, stride: int = 2) -> int:
    """Tokens a frame of `tokens` survivors is pooled to (`stride` 2: transformers' 2x2 pooling; 1: none)."""
    side = math.isqrt(tokens)
    if side * side == tokens:
        return math.ceil(side / stride) ** 2
    return math.ceil(tokens / stride**2)


def pool_stride(inner) -> int:
    """Video pooling stride: LLaVA-NeXT's `mm_spatial_pool_stride`, read from the model config when set there
    (transformers' LLaVA-OneVision always pools 2x2; `model.config.mm_spatial_pool_stride = 1` turns it off)."""
    stride = getattr(inner.config, "mm_spatial_pool_stride", 2)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"mm_spatial_pool_stride={stride!r} must be a positive integer")
    return stride


def _validate(config, inner: LlavaOnevisionModel) -> int:
    """Check the config against the model; returns the full token count of one crop."""
    vision_config = inner.config.vision_config
    grid_side = vision_config.image_size // vision_config.patch_size
    full_tokens = grid_side * grid_side
    layers = inner.vision_tower.encoder.layers
    config.validate_vit(len(layers), full_tokens)
    config.validate_llm(inner.config.text_config.num_hidden_layers)
    if not config.enable_illava_vit:
        return full_tokens
    if inner.config.vision_feature_select_strategy != "full":
        raise ValueError(
            f"illava: vision_feature_select_strategy={inner.config.vision_feature_select_strategy!r} drops the "
            "first token of each crop, which merging reorders; LLaVA-OneVision with SigLIP uses 'full'"
        )
    feature_layers = inner.config.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    num_states = len(layers) + 1  # embeddings, then the output of each layer
    last_merge = max(config.illava_vit_k)
    early = [index for index in feature_layers if index % num_states <= last_merge]
    if early:
        raise ValueError(
            f"illava_vit_k={'-'.join(map(str, config.illava_vit_k))}: the model reads vision features from "
            f"hidden state(s) {early} (vision_feature_layer), which come before merge layer {last_merge} finishes; "
            f"merge only in layers below {min(index % num_states for index in feature_layers)}"
        )
    return full_tokens


def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    inner = inner_of_generation_model(model)
    full_tokens = _validate(config, inner)
    stride = pool_stride(inner)
    if not (config.enable_illava_vit or config.enable_illava_llm or stride != 2):
        return
    language_merger = LanguageModelMerger(state, inner.language_model, model) if config.enable_illava_llm else None
    call = EncoderCall()
    _patch_vision(state, inner, full_tokens, stride, call)
    patch_encoding(state, model, inner, language_merger, call)
    if processor is not None:
        merged = config.vit_token_counts(full_tokens)[-1] if config.enable_illava_vit else full_tokens
        patch_processor(state, processor, full_tokens, merged, stride)


def _patch_vision(state: IllavaState, inner: LlavaOnevisionModel, full_tokens: int, stride: int,
                  call: EncoderCall) -> None:
    """Trace the tower; lay merged crops/frames out for the LLM; record where each survivor's feature lands."""
    SiglipStage(state, inner.vision_tower, lambda: call.modality)

    def pack_image_features(self, original, image_features, image_sizes, image_newline=None,
                            vision_aspect_ratio="anyres_max_9"):
        entry = state.trace.vision[-1]
        entry.groups_per_item = [int(feature.shape[0]) for feature in image_features]
        entry.features = _image_feature_index(self, entry, image_sizes, image_newline is not None, vision_aspect_ratio)
        if image_features[0].shape[1] == full_tokens:
            return original(image_features, image_sizes, image_newline, vision_aspect_ratio)
        return _pack_merged_images(self, entry, image_features, image_sizes, image_newline, vision_aspect_ratio)

    def apply_pooling(self, original, image_features):
        frames, tokens = image_features.shape[:2]
        state.trace.vision[-1].features = _video_feature_index(frames, tokens, stride)
        if tokens == full_tokens and stride == 2:
            return original(image_features)
        return _pool_merged_frames(image_features, stride)

    def get_video_features(self, original, pixel_values_videos, *args, **kwargs):
        output = original(pixel_values_videos, *args, **kwargs)
        videos, frames = pixel_values_videos.shape[:2]
        state.trace.vision[-1].groups_per_item = [int(frames)] * int(videos)
        return output

    state.override_method(inner, "pack_image_features", pack_image_features)
    state.override_method(inner, "apply_pooling", apply_pooling)
    state.override_method(inner, "get_video_features", get_video_features)


def _pack_merged_images(inner, entry, image_features, image_sizes, image_newline, vision_aspect_ratio):
    vision_config = inner.config.vision_config
    tokens = image_features[0].shape[1]
    side = math.isqrt(tokens)
    packed, lengths = [], []
    first_group = 0
    for image_index, feature in enumerate(image_features):
        crops = feature.shape[0]
        parts = [feature[0]]
        if crops > 1:
            crop_rows, crop_cols = get_anyres_image_grid_shape(
                image_sizes[image_index], inner.config.image_grid_pinpoints, vision_config.image_size
            )
            if side * side == tokens:
                parts.append(
                    _pseudo_grid(feature[1:], crop_rows, crop_cols, side, image_sizes[image_index],
                                 image_newline, vision_aspect_ratio)
                )
            else:
                positions = entry.positions[first_group + 1 : first_group + crops]
                parts.append(_stitched_raster(feature[1:], positions, crop_cols, entry.grid))
                if image_newline is not None:
                    parts.append(image_newline[None].to(feature))
        elif image_newline is not None:
            parts.append(image_newline[None].to(feature))
        first_group += crops
        packed.append(torch.cat(parts, dim=0))
        lengths.append(packed[-1].shape[0])
    return packed, torch.tensor(lengths, dtype=torch.long, device=image_features[0].device)


def _image_feature_index(inner, entry, image_sizes, has_newline, vision_aspect_ratio) -> torch.Tensor:
    """`[G, K]`: where each survivor's feature lands within its image's placeholders (-1: unpadded away)."""
    groups, tokens = entry.positions.shape
    side = math.isqrt(tokens)
    index = torch.arange(tokens).repeat(groups, 1)  # base crops (and single-crop images) come first, in order
    first_group = 0
    for image_index, crops in enumerate(entry.groups_per_item):
        if crops > 1:
            crop_rows, crop_cols = get_anyres_image_grid_shape(
                image_sizes[image_index], inner.config.image_grid_pinpoints, inner.config.vision_config.image_size
            )
            if side * side == tokens:
                hires = _pseudo_grid_index(crop_rows, crop_cols, side, image_sizes[image_index], has_newline,
                                           vision_aspect_ratio)
            else:
                positions = entry.positions[first_group + 1 : first_group + crops].cpu()
                order = _stitched_order(positions, crop_cols, entry.grid)
                hires = torch.empty_like(order)
                hires[order] = torch.arange(order.numel())
            index[first_group + 1 : first_group + crops] = torch.where(hires >= 0, hires + tokens, -1).view(crops - 1, -1)
        first_group += crops
    return index


def _pseudo_grid_index(crop_rows, crop_cols, side, image_size, has_newline, vision_aspect_ratio) -> torch.Tensor:
    """Feature index within the high-resolution block for each (crop, slot) of `_pseudo_grid`'s layout."""
    slots = torch.arange(crop_rows * crop_cols * side * side)
    grid = slots.view(crop_rows, crop_cols, side, side, 1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, image_size)[0]
    height, width = grid.shape
    max_num_patches = int(vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(height * width / (max_num_patches * side**2))
    out_height, out_width = (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)
    rows = torch.arange(height) * out_height // height  # the output cell each unpadded cell falls in
    cols = torch.arange(width) * out_width // width
    feature = rows[:, None] * (out_width + int(has_newline)) + cols[None, :]
    index = torch.full((slots.numel(),), -1, dtype=torch.long)
    index[grid.flatten()] = feature.flatten()
    return index


def _video_feature_index(frames: int, tokens: int, stride: int) -> torch.Tensor:
    """`[frames, tokens]`: where each survivor's feature lands within its video's placeholders."""
    per_frame = video_tokens_per_frame(tokens, stride)
    slots = torch.arange(tokens)
    side = math.isqrt(tokens)
    if side * side == tokens:
        pooled = math.ceil(side / stride)
        local = (slots // side) * pooled // side * pooled + (slots % side) * pooled // side
    else:
        local = slots // stride**2
    return torch.arange(frames)[:, None] * per_frame + local[None, :]


def _pseudo_grid(crops, crop_rows, crop_cols, side, image_size, image_newline, vision_aspect_ratio):
    """LLaVA-OneVision's anyres layout (`pack_image_features` of the tested window, `illava.compat`) on a pseudo side x side grid."""
    grid = crops.view(crop_rows, crop_cols, side, side, -1)
    grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, image_size)
    max_num_patches = int(vision_aspect_ratio.strip("anyres_max_"))
    _, height, width = grid.shape
    ratio = math.sqrt(height * width / (max_num_patches * side**2))
    if ratio > 1.1:
        grid = nn.functional.interpolate(grid[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
    if image_newline is not None:
        newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
        grid = torch.cat((grid, newline), dim=-1)
    return grid.flatten(1, 2).transpose(0, 1)


def _stitched_raster(crops, positions, crop_cols, grid):
    """All crops' survivors ordered by their original (row, col) in the stitched full-resolution image."""
    return crops.flatten(0, 1)[_stitched_order(positions, crop_cols, grid)]


def _stitched_order(positions, crop_cols, grid) -> torch.Tensor:
    rows, cols = grid
    crop_index = torch.arange(positions.shape[0], device=positions.device)[:, None]
    global_row = (crop_index // crop_cols) * rows + positions // cols
    global_col = (crop_index % crop_cols) * cols + positions % cols
    return (global_row * (crop_cols * cols) + global_col).flatten().argsort()


def _pool_merged_frames(frames: torch.Tensor, stride: int) -> torch.Tensor:
    if stride == 1:
        return frames
    num_frames, tokens, dim = frames.shape
    side = math.isqrt(tokens)
    if side * side == tokens:
        grid = frames.view(num_frames, side, side, dim).permute(0, 3, 1, 2)
        pooled = nn.functional.interpolate(grid, size=[math.ceil(side / stride)] * 2, mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(num_frames, -1, dim)
    group = stride**2  # no grid to pool on: average runs of `group` consecutive survivors
    pooled_tokens = video_tokens_per_frame(tokens, stride)
    padded = nn.functional.pad(frames, (0, 0, 0, pooled_tokens * group - tokens))
    counts = torch.full((pooled_tokens,), float(group), device=frames.device, dtype=frames.dtype)
    counts[-1] = tokens - group * (pooled_tokens - 1)
    return padded.view(num_frames, pooled_tokens, group, dim).sum(dim=2) / counts[:, None]


def patch_processor(state: IllavaState, processor, full_tokens: int, merged_tokens: int, stride: int = 2) -> None:
    """Make a `LlavaOnevisionProcessor` instance emit as many placeholders as the merged model produces."""
    if processor.num_image_tokens != full_tokens:
        raise ValueError(
            f"illava: processor.num_image_tokens={processor.num_image_tokens} does not match the model's "
            f"{full_tokens} tokens per crop; pass the processor that belongs to this model"
        )
    state.set_attribute(processor, "num_image_tokens", merged_tokens)
    side = math.isqrt(merged_tokens)
    if side * side == merged_tokens and stride == 2:
        return  # the processor's own arithmetic on a side x side grid is exactly the pseudo-grid layout

    def number_of_features(self, original, orig_height, orig_width, height, width):
        if side * side == merged_tokens:
            return original(orig_height, orig_width, height, width)
        best_height, best_width = select_best_resolution([orig_height, orig_width], self.image_processor.image_grid_pinpoints)
        crops = (best_height // height) * (best_width // width)
        return merged_tokens + crops * merged_tokens + 1

    def replace_video_token(self, original, video_inputs, video_idx, **kwargs):
        video = video_inputs["pixel_values_videos"][video_idx]
        frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
        return self.video_token * (frames * video_tokens_per_frame(merged_tokens, stride) + 1)

    def num_multimodal_tokens(self, original, image_sizes=None, video_sizes=None, **kwargs):
        data = original(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if video_sizes is not None:
            data["num_video_tokens"] = [
                frames * video_tokens_per_frame(merged_tokens, stride) + 1 for frames, _, _ in video_sizes
            ]
        return data

    state.override_method(processor, "_get_number_of_features", number_of_features)
    state.override_method(processor, "replace_video_token", replace_video_token)
    state.override_method(processor, "_get_num_multimodal_tokens", num_multimodal_tokens)


FAMILY = Family(
    name="llava_onevision",
    model_classes=(LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel),
    apply=apply,
    vision_tower=lambda model: inner_of_generation_model(model).vision_tower,
    inner_model=inner_of_generation_model,
    processor_class_names=("LlavaOnevisionProcessor",),
    model_types=("llava_onevision",),
)
