"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`): ViT-stage
merging in the vision tower (`qwen_vision`), LLM-stage merging in the text model, and a processor that emits one
placeholder per surviving window. Checked on the tested window (`illava.compat`).
"""

from __future__ import annotations

from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)

from ..registry import Family, inner_of_generation_model
from ..state import IllavaState
from .decoder import LanguageModelMerger
from .qwen_vision import QwenVisionStage, patch_vlm


def apply(state: IllavaState, model, processor=None) -> None:
    config = state.config
    inner = inner_of_generation_model(model)
    visual = inner.visual
    config.validate_vit(len(visual.blocks))  # windows per image vary; each segment is checked when merged
    config.validate_llm(inner.config.text_config.num_hidden_layers)
    if not (config.enable_illava_vit or config.enable_illava_llm):
        return
    language_merger = LanguageModelMerger(state, inner.language_model, model) if config.enable_illava_llm else None
    vision = patch_vlm(state, model, inner, language_merger)
    if processor is not None and config.enable_illava_vit:
        patch_processor(state, processor, vision)


def patch_processor(state: IllavaState, processor, vision: QwenVisionStage) -> None:
    """Make a `Qwen2VLProcessor` instance emit one placeholder per surviving window."""

    def replace_image_token(self, original, image_inputs, image_idx, **kwargs):
        return self.image_token * vision.llm_tokens(image_inputs["image_grid_thw"][image_idx])

    def replace_video_token(self, original, video_inputs, video_idx, **kwargs):
        return self.video_token * vision.llm_tokens(video_inputs["video_grid_thw"][video_idx])

    state.override_method(processor, "replace_image_token", replace_image_token)
    state.override_method(processor, "replace_video_token", replace_video_token)


FAMILY = Family(
    name="qwen2_vl",
    model_classes=(Qwen2VLForConditionalGeneration, Qwen2VLModel, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel),
    apply=apply,
    vision_tower=lambda model: inner_of_generation_model(model).visual,
    inner_model=inner_of_generation_model,
    processor_class_names=("Qwen2VLProcessor", "Qwen2_5_VLProcessor"),
    model_types=("qwen2_vl", "qwen2_5_vl"),
)
