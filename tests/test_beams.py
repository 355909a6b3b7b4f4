"""Beam search and several returned sequences, with and without a KV cache, on every VLM family: the merged
model generates the same sequences either way (generate() encodes each prompt's images once and repeats rows;
re-run without a cache, the beams' rows share their images but not their text)."""

import pytest
import torch

import illava
from illava.tools.tiny_models import tiny_llava_onevision, tiny_qwen2_vl, tiny_qwen3_vl

from .conftest import random_image

QWEN_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>describe"
FAMILIES = {
    "llava_onevision": (lambda: tiny_llava_onevision(image_size=56, vision_layers=6), "<image>describe"),
    "qwen2_vl": (tiny_qwen2_vl, QWEN_PROMPT),
    "qwen3_vl": (tiny_qwen3_vl, QWEN_PROMPT),
}
STAGES = {
    "vit": dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=0.3),
    "both": dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=0.3, enable_illava_llm=True,
                 illava_llm_k="2", illava_llm_r=0.5),
}


@pytest.mark.parametrize("stages", sorted(STAGES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_beams_and_returned_sequences_with_and_without_cache(family, stages):
    build, prompt = FAMILIES[family]
    model, processor = build()
    with illava.applied(model, processor=processor, **STAGES[stages]):
        inputs = processor(images=[random_image(70, 98)], text=prompt, return_tensors="pt")
        # a random model may generate a placeholder token, which a cache-free re-run would read as one
        media = [model.config.image_token_id, model.config.video_token_id]
        for options in (dict(num_beams=2), dict(num_beams=3, num_return_sequences=2)):
            options["suppress_tokens"] = media
            with torch.no_grad():
                cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, **options)
                uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, **options)
            assert torch.equal(uncached, cached), options
            assert cached.shape[0] == options.get("num_return_sequences", 1)
