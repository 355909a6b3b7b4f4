"""A merge layer's attention scores its tokens itself (`illava.patches.scored_attention`): same survivors, same
features and logits as scoring in a second pass over the block's q and k; only that layer's module is rerouted,
and `remove` restores it."""

import pytest
import torch

import illava
from illava.patches import scored_attention

from .conftest import (QWEN_IMAGE, QWEN_VIDEO, QWEN_VIT, logits_of, random_image, random_video, tiny_ov, tiny_qwen2,
                       tiny_qwen3)

CASES = {
    "qwen2_5_vl": lambda backend: tiny_qwen2(attn_implementation=backend, model_class="Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": lambda backend: tiny_qwen3(attn_implementation=backend),
    "llava_onevision": lambda backend: tiny_ov(attn_implementation=backend),
}


def _layers(model):
    """Each vision layer and its attention module."""
    if hasattr(model.model, "visual"):
        return [(block, block.attn) for block in model.model.visual.blocks]
    return [(layer, layer.self_attn) for layer in model.model.vision_tower.encoder.layers]


def _inputs(processor):
    extra = {}
    text = QWEN_IMAGE + QWEN_VIDEO + "describe"
    if "Qwen3" in type(processor).__name__:
        extra["video_metadata"] = [dict(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])]
    if "LlavaOnevision" in type(processor).__name__:
        text = "<image><video>describe"
    return processor(images=[random_image(100, 150, seed=1)], videos=[random_video(4, 84, 112, seed=2)],
                     text=text, return_tensors="pt", **extra)


def _merged_run(model, processor):
    with illava.applied(model, processor=processor, **QWEN_VIT):
        inputs = _inputs(processor)
        logits = logits_of(model, inputs)
        trace = illava.last_trace(model)
    return logits, [entry.positions for entry in trace.vision]


@pytest.mark.parametrize("family", sorted(CASES))
def test_scoring_inside_the_attention_equals_a_second_pass(monkeypatch, family):
    model, processor = CASES[family]("sdpa")
    attentions = [attention for _, attention in _layers(model)]
    shared = attentions[0].config
    with illava.applied(model, processor=processor, **QWEN_VIT):
        rerouted = [index for index, attention in enumerate(attentions) if attention.config is not shared]
        assert rerouted == [2, 3]
        assert attentions[2].config._attn_implementation == scored_attention.NAME
        assert model.config.vision_config._attn_implementation == "sdpa"
    assert all(attention.config is shared and not hasattr(attention, "_illava_scores") for attention in attentions)

    logits, positions = _merged_run(model, processor)
    monkeypatch.setattr(scored_attention, "FUSED_IMPLEMENTATIONS", ())  # the side pass over captured q and k
    side_logits, side_positions = _merged_run(model, processor)
    assert all(torch.equal(a, b) for a, b in zip(positions, side_positions))
    torch.testing.assert_close(logits, side_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CASES))
def test_eager_attention_is_not_rerouted(family):
    model, processor = CASES[family]("eager")
    shared = _layers(model)[0][1].config
    with illava.applied(model, processor=processor, **QWEN_VIT):
        assert all(attention.config is shared for _, attention in _layers(model))


def test_a_scored_layer_refuses_an_attention_mask():
    model, processor = CASES["qwen3_vl"]("sdpa")
    with illava.applied(model, processor=processor, **QWEN_VIT):
        attention = model.model.visual.blocks[2].attn
        query = torch.randn(1, attention.num_heads, 4, attention.head_dim)
        slot, _ = attention._illava_scores
        slot["score"] = True
        with pytest.raises(RuntimeError, match="attention mask"):
            scored_attention.scored_attention(attention, query, query, query, torch.zeros(1, 1, 4, 4))
