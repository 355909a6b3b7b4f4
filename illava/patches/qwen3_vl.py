"""Qwen3-VL and Qwen3-VL-MoE (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`): ViT-stage
merging in the packed vision blocks, LLM-stage merging in the Qwen3 decoder; Qwen3.5 / Qwen3.5-MoE
(`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`: the same vision tower without DeepStack,
the same processor, and a hybrid decoder): both stages too. Checked on the tested window (`illava.compat`).

The vision tower is Qwen2-VL's without attention windows (every image / temporal slice is one `cu_seqlens`
segment), so the Qwen2-VL machinery applies: whole 2x2 windows are merged per image / frame, placeholders and
M-RoPE positions follow the survivors (each keeps its true position), the text between images and a video's
timestamp text stay. What Qwen3-VL adds:

- DeepStack: the outputs of blocks `deepstack_visual_indexes` go through their own mergers and are added to the
  LLM hidden states at the visual positions after the first decoder layers. A feature taken before a merge layer
  follows that merge (the same survivors, the same weighted means), so every injected feature stands for the
  same patches as the main token at its position.
- The prompt holds one placeholder run per temporal slice of a video, each after its `<t seconds>` text.
- `get_video_features` runs `self.get_image_features`: inside it that is the model's own method, so that illava's
  wrappers handle a video once, as a video.
- LLM stage: Qwen3 attention normalises q and k per head before RoPE (the decoder merger scores after the norms);
  a merge layer before a DeepStack injection layer injects at the kept positions.
- LLM stage on Qwen3.5: three Gated-DeltaNet linear-attention layers (a recurrent state and a short conv state, no
  per-token cache) come before each gated full-attention layer (layers 3, 7, 11, ...). A merge at any layer k after
  the first full-attention layer works, on either kind of layer: the tokens are scored in the nearest
  full-attention layer before k (linear attention has no attention weights to read; its gate only scales the
  attention output, and its partial rotary is applied as the layer does), later linear-attention layers run their
  recurrence over the kept tokens, and full-attention layers cache the kept tokens (`illava.patches.decoder`).
"""

from __future__ import annotations

import types

from transformers import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Model,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeModel,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeModel,
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
    _encode_videos_once(state, inner)
    language_merger = None
    if config.enable_illava_llm:
        language_merger = LanguageModelMerger(state, inner.language_model, model)
        if hasattr(inner.language_model, "_deepstack_process"):  # not Qwen3.5
            _inject_deepstack_at_kept_positions(state, inner.language_model, language_merger)
        if hasattr(inner.config.text_config, "num_experts"):
            _refuse_router_logits(state, model)
    vision = patch_vlm(state, model, inner, language_merger, videos_per_slice=True)
    if processor is not None and config.enable_illava_vit:
        patch_processor(state, processor, vision)


def _encode_videos_once(state: IllavaState, inner) -> None:
    def get_video_features(self, original, *args, **kwargs):
        wrapped = vars(self).get("get_image_features")
        self.get_image_features = types.MethodType(type(self).get_image_features, self)
        try:
            return original(*args, **kwargs)
        finally:
            if wrapped is None:
                del self.get_image_features
            else:
                self.get_image_features = wrapped

    state.override_method(inner, "get_video_features", get_video_features)


def _inject_deepstack_at_kept_positions(state: IllavaState, language_model, merger: LanguageModelMerger) -> None:
    """`_deepstack_process(hidden, visual_pos_masks [B, L], embeds [visual tokens, D])` after a merged layer: the
    mask and the embeddings at the positions the shortened sequence holds."""

    def deepstack_process(self, original, hidden_states, visual_pos_masks, visual_embeds):
        layout = merger.current_layout()
        if layout is None or visual_pos_masks is None:
            return original(hidden_states, visual_pos_masks, visual_embeds)
        mask = visual_pos_masks.to(layout.index.device)
        row_of_position = mask.flatten().long().cumsum(0).view_as(mask) - 1  # the embedding row of each position
        kept = mask.gather(1, layout.index) & layout.valid
        rows = row_of_position.gather(1, layout.index)[kept]
        return original(hidden_states, kept, visual_embeds[rows.to(visual_embeds.device)])

    state.override_method(language_model, "_deepstack_process", deepstack_process)


def _refuse_router_logits(state: IllavaState, model) -> None:
    """The MoE load-balancing loss pairs every layer's router logits with one full-length attention mask; layers
    after an LLM merge route fewer tokens."""
    text_config = inner_of_generation_model(model).config.text_config

    def check(module, args, kwargs):
        if kwargs.get("output_router_logits", getattr(text_config, "output_router_logits", False)):
            raise ValueError(
                "illava: output_router_logits=True (the MoE load-balancing loss) does not work with LLM-stage "
                "merging, whose merged layers route fewer tokens; turn one of them off"
            )

    state.before_forward(model, check, with_kwargs=True)


def patch_processor(state: IllavaState, processor, vision: QwenVisionStage) -> None:
    """Make a `Qwen3VLProcessor` instance emit one placeholder per surviving window: per image, and per temporal
    slice of a video (its timestamps and vision start/end tokens unchanged)."""

    def replace_image_token(self, original, image_inputs, image_idx, **kwargs):
        return self.image_token * vision.llm_tokens(image_inputs["image_grid_thw"][image_idx])

    def replace_video_token(self, original, video_inputs, video_idx, **kwargs):
        text = original(video_inputs, video_idx, **kwargs)
        _, height, width = (int(value) for value in video_inputs["video_grid_thw"][video_idx])
        per_slice = height * width // vision.unit
        # every slice's run is delimited by its own vision start / end tokens: one match each
        return text.replace(self.video_token * per_slice, self.video_token * vision.windows_after(per_slice))

    state.override_method(processor, "replace_image_token", replace_image_token)
    state.override_method(processor, "replace_video_token", replace_video_token)


FAMILY = Family(
    name="qwen3_vl",
    model_classes=(
        Qwen3VLForConditionalGeneration, Qwen3VLModel, Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel,
        Qwen3_5ForConditionalGeneration, Qwen3_5Model, Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeModel,
    ),
    apply=apply,
    vision_tower=lambda model: inner_of_generation_model(model).visual,
    inner_model=inner_of_generation_model,
    processor_class_names=("Qwen3VLProcessor",),
    model_types=("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
    timestamped_videos=True,
)
